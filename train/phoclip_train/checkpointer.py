"""Writing checkpoints, atomically: every rank writes into `step_N.tmp/`, then rank 0
renames the folder to `step_N/`. A rename is atomic, so a kill at any moment leaves
either the complete new checkpoint or none: `latest()` only ever sees complete ones.
The layout (file names, the step folders, listing, meta reading, verification) is the
library's `phoclip.models.checkpoints`; this module writes and resolves through it.

    Checkpointer     the files: save (collective), keep the last K, resolve --resume, read
    RunCheckpointer  the run's stateful parts into and out of those files, and its cadence"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from phoclip.errors import CheckpointError
from phoclip.fileio import atomic_open, atomic_write_json, fsync_dir
from phoclip.models.checkpoints import (DS_STATE_FILE, DS_TAG, META_FILE, checkpoints_dir, list_checkpoints,
                                        newest_verified, rank_file, read_meta, step_dir, verify_checkpoint)
from phoclip_train.distributed import barrier
from phoclip_train.ds_state import read_state_summary
from phoclip_train.state import DataPosition, NonFiniteCounter, Progress, RngState

if TYPE_CHECKING:  # annotations only: the engines import this module for atomic_torch_save
    from phoclip_train.engine import Engine

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through `atomic_open`: a random, exclusively created temporary name (no
    link planted in the run folder is written through), fsynced, then renamed."""
    with atomic_open(path) as f:
        torch.save(obj, f)


class Checkpointer:
    """Save, find and load checkpoints under `run_dir/checkpoints`, keeping the last K."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int, rank: int, world_size: int):
        self.run_dir, self.dir = Path(run_dir), checkpoints_dir(run_dir)
        self.keep_last, self.rank, self.world_size = keep_last, rank, world_size
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first (`phoclip.models.checkpoints.list_checkpoints`)."""
        return list_checkpoints(self.run_dir)

    def latest(self) -> Optional[Path]:
        ckpts = self.list()
        return ckpts[-1] if ckpts else None

    def save(self, step: int, engine, rank_state: dict, meta: dict,
             extra: Optional[Callable[[Path], None]] = None) -> Optional[Path]:
        """Collective: every rank calls it; `extra(folder)` writes more files on rank 0
        (e.g. the tokenizer). Returns the final folder."""
        final = self.dir / step_dir(step)
        tmp = self.dir / f"{step_dir(step)}.tmp"
        if self.rank == 0:
            if tmp.is_symlink():  # planted: remove the link, never what it points at
                tmp.unlink()
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        engine.save(tmp)
        atomic_torch_save(rank_state, tmp / rank_file(self.rank))
        barrier()
        if self.rank == 0:
            if extra is not None:
                extra(tmp)
            atomic_write_json(tmp / META_FILE, dict(meta, step=step, world_size=self.world_size), indent=2)
            if final.exists():  # a checkpoint of this step already exists: replace it, whole
                old = self.dir / f"{step_dir(step)}.replaced"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            fsync_dir(self.dir)
            self._prune()
            logger.info("saved checkpoint %s", final)
        barrier()
        return final

    def _prune(self) -> None:
        ckpts = self.list()
        for p in ckpts[:-self.keep_last]:
            shutil.rmtree(p, ignore_errors=True)
        for p in [*self.dir.glob("step_*.tmp"), *self.dir.glob("step_*.replaced")]:  # killed saves
            shutil.rmtree(p, ignore_errors=True)

    def resolve(self, resume: Optional[str]) -> Optional[Path]:
        """'latest' → the newest checkpoint that verifies (`verify_checkpoint`), saying why
        newer ones were passed over; None when there is none yet. A named folder must
        verify. Rank 0 decides and every rank gets its answer."""
        if not resume:
            return None
        choice: list = [None]
        if self.rank == 0:
            choice[0] = self._pick(resume)
        if torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], str) and choice[0].startswith("error:"):
            raise CheckpointError(choice[0][6:])
        return None if choice[0] is None else Path(choice[0])

    def _pick(self, resume: str) -> Optional[str]:
        if resume == "latest":
            try:  # checkpoints that exist but none can be trusted: never restart silently
                newest = newest_verified(self.run_dir, passing="not resuming from")
            except CheckpointError as e:
                return f"error:--resume latest: {e}"
            path = newest
        else:
            try:
                verify_checkpoint(Path(resume))
            except CheckpointError as e:
                return f"error:--resume {resume}: {e}; complete ones: {[c.name for c in self.list()]}"
            path = Path(resume)
        if path is not None and (path / DS_TAG).is_dir():
            try:  # its shape now, while nothing is built: DeepSpeed's load comes after the model and engine
                read_state_summary(path / DS_STATE_FILE)
            except CheckpointError as e:
                return f"error:--resume {resume}: {e}"
        return None if path is None else (resume if resume != "latest" else str(path))

    def load_rank_state(self, path: Path, rank: Optional[int] = None) -> Optional[dict]:
        """A rank's own state (data position, RNG) from a checkpoint; default: this rank's."""
        f = path / rank_file(self.rank if rank is None else rank)
        if not f.is_file():
            return None
        return torch.load(f, map_location="cpu", weights_only=True)

    @staticmethod
    def meta(path: Path) -> dict:
        """A checkpoint's meta.json, read as verification reads it (capped, checked)."""
        return read_meta(path)


class RunCheckpointer:
    """Saves and restores the run's stateful parts: the engine (its own files), the
    progress and non-finite count (meta.json), this rank's data position and RNG
    (rankNNNNN.pt: its keys are what a resume reads). `due(step)` is
    its cadence (train.save_every)."""

    def __init__(self, files: Checkpointer, save_every: int, engine: Engine, progress: Progress,
                 nonfinite: NonFiniteCounter, position: DataPosition, rng: RngState,
                 meta: Callable[[], dict], extra: Optional[Callable[[Path], None]] = None) -> None:
        self.files, self.save_every = files, save_every
        self.engine, self.progress, self.nonfinite, self.position, self.rng = engine, progress, nonfinite, position, rng
        self.meta, self.extra = meta, extra
        self._saved: Optional[tuple] = None  # (step, meta version) of the newest save

    def due(self, step: int) -> bool:
        return step % self.save_every == 0

    def latest(self) -> Optional[Path]:
        return self.files.latest()

    def save(self, version: object = None) -> None:
        """Checkpoint this step (collective), once: the same step is saved again only
        when `version` (e.g. the newest evaluation, which goes in meta) changed."""
        step = self.progress.step
        if self._saved == (step, version):
            return
        self._saved = (step, version)
        rank_state = {**self.position.state_dict(), "rng": self.rng.state_dict()}
        meta = {"samples_seen": self.progress.samples_seen, **self.nonfinite.state_dict(), **self.meta()}
        self.files.save(step, self.engine, rank_state, meta, extra=self.extra)

    def restore(self, path: Optional[Path], resume: Optional[str] = None) -> Optional[Path]:
        """Load the checkpoint at `path` (what `Checkpointer.resolve(resume)` chose, before
        the model was built); None when there is none yet."""
        if path is None:
            if resume:
                logger.info("--resume %s: no checkpoint yet, starting from scratch", resume)
            return None
        self.engine.load(path)
        meta = self.files.meta(path)
        self.progress.load_state_dict(meta)
        self.nonfinite.load_state_dict(meta)
        old_world = int(meta.get("world_size", 0))
        old_workers = max(1, int(meta.get("config", {}).get("data", {}).get("workers", 1)))
        rs = self.files.load_rank_state(path)
        if rs is not None and self.position.same_layout(old_world, old_workers):
            self.position.load_state_dict(rs)
            self.rng.load_state_dict(rs["rng"])
        else:
            old_states = {r: self.files.load_rank_state(path, r) for r in range(old_world)}
            self.position.continue_on_new_layout(path, old_states, meta, old_workers, self.progress.step)
        logger.info("resumed from %s at step %d", path, self.progress.step)
        return path
