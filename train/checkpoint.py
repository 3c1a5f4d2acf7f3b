"""Atomic checkpoints: every rank writes into `step_N.tmp/`, then rank 0 renames the
folder to `step_N/`. A rename is atomic, so a kill at any moment leaves either the
complete new checkpoint or none: `latest()` only ever sees complete ones."""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from train.distributed import barrier

logger = logging.getLogger(__name__)

_STEP = re.compile(r"^step_(\d{8})$")


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def rng_state() -> dict:
    np_state = np.random.get_state()
    st = {"python": random.getstate(), "torch": torch.get_rng_state(),
          "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(_tuplify(st["python"]))
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


class Checkpointer:
    """Save, find and load checkpoints under `run_dir/checkpoints`, keeping the last K."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int, rank: int, world_size: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last, self.rank, self.world_size = keep_last, rank, world_size
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        out = [p for p in self.dir.iterdir() if _STEP.match(p.name) and (p / "meta.json").is_file()]
        return sorted(out, key=lambda p: int(_STEP.match(p.name).group(1)))

    def latest(self) -> Optional[Path]:
        ckpts = self.list()
        return ckpts[-1] if ckpts else None

    def save(self, step: int, engine, rank_state: dict, meta: dict,
             extra: Optional[Callable[[Path], None]] = None) -> Optional[Path]:
        """Collective: every rank calls it; `extra(folder)` writes more files on rank 0
        (e.g. the tokenizer). Returns the final folder."""
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f"step_{step:08d}.tmp"
        if final.is_dir() and (final / "meta.json").is_file():
            return final  # this exact state is already saved (e.g. SIGTERM right after a save)
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        engine.save(tmp)
        atomic_torch_save(rank_state, tmp / f"rank{self.rank:05d}.pt")
        barrier()
        if self.rank == 0:
            if extra is not None:
                extra(tmp)
            (tmp / "meta.json").write_text(json.dumps(dict(meta, step=step,
                                                           world_size=self.world_size), indent=2))
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            self._prune()
            logger.info("saved checkpoint %s", final)
        barrier()
        return final

    def _prune(self) -> None:
        ckpts = self.list()
        for p in ckpts[:-self.keep_last]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.dir.glob("step_*.tmp"):  # leftovers of killed saves
            shutil.rmtree(p, ignore_errors=True)

    def resolve(self, resume: Optional[str]) -> Optional[Path]:
        """'latest' → newest complete checkpoint (None when there is none yet)."""
        if not resume:
            return None
        if resume == "latest":
            return self.latest()
        p = Path(resume)
        if not (p / "meta.json").is_file():
            raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder "
                                    f"(no meta.json); complete ones: {[c.name for c in self.list()]}")
        return p

    def load_rank_state(self, path: Path, rank: Optional[int] = None) -> Optional[dict]:
        """A rank's own state (data position, RNG) from a checkpoint; default: this rank's."""
        f = path / f"rank{self.rank if rank is None else rank:05d}.pt"
        if not f.is_file():
            return None
        return torch.load(f, map_location="cpu", weights_only=True)

    @staticmethod
    def meta(path: Path) -> dict:
        return json.loads((path / "meta.json").read_text())
