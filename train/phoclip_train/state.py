"""What a checkpoint saves and restores besides the engine's own state, each part with
`state_dict()`/`load_state_dict()` (torchtitan's Stateful): the step counter and samples
seen (`Progress`), the non-finite step counts (`NonFiniteCounter`), this rank's random
generators (`RngState`) and its place in the data (`DataPosition`)."""
from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import torch

from phoclip.data.stream import ShardStream, StreamLayout, StreamTracker, relayout
from phoclip_train.config import RunConfig
from phoclip_train.distributed import DistInfo

logger = logging.getLogger(__name__)


class Stateful(Protocol):
    """torchtitan's shape: what a checkpoint saves and restores."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Progress:
    """The step counter and the samples seen (global: saved in the checkpoint's meta)."""

    step: int = 0
    samples_seen: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])


@dataclass
class NonFiniteCounter:
    """Non-finite steps, counted on the device between host reads: [streak, new since
    the last read]; `read` folds them into the host's figures. Stateful: the total
    travels with checkpoints."""

    total: int = 0
    streak: int = 0
    _dev: Optional[torch.Tensor] = field(default=None, repr=False)

    def update(self, bad: torch.Tensor) -> None:
        bad = bad.detach().float().reshape(())
        if self._dev is None:
            self._dev = torch.stack([torch.full_like(bad, float(self.streak)), torch.zeros_like(bad)])
        self._dev = torch.stack([(self._dev[0] + 1) * bad, self._dev[1] + bad])

    def device_values(self, device: torch.device) -> torch.Tensor:
        return self._dev if self._dev is not None else torch.tensor([float(self.streak), 0.0], device=device)

    def fold(self, streak: float, new: float) -> int:
        """The host's view after a read; returns the number of new non-finite steps."""
        self.streak, new = int(streak), int(new)
        self.total += new
        if self._dev is not None:
            self._dev = torch.stack([self._dev[0], torch.zeros_like(self._dev[1])])
        return new

    def state_dict(self) -> dict:
        return {"nonfinite_total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.total = int(state.get("nonfinite_total", 0))


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states of this process."""
    np_state = np.random.get_state()
    st = {"python": random.getstate(), "torch": torch.get_rng_state(),
          "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(_tuplify(st["python"]))
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


class RngState:
    """Python, numpy, torch (and CUDA) generators of this rank."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)


class DataPosition:
    """Where this rank's stream is: its tracker's position and skipped counts, and the
    stream's layout. Restored exactly on the same ranks x workers; on another layout
    the data order continues (`phoclip.data.stream.relayout`) rather than restarting."""

    def __init__(self, stream: ShardStream, urls: list, cfg: RunConfig, dist: DistInfo) -> None:
        self.stream, self.urls, self.cfg, self.dist = stream, urls, cfg, dist
        self.tracker = StreamTracker()
        self.workers = max(1, cfg.data.workers)  # logical streams per rank

    def update(self, batch: dict) -> None:
        self.tracker.update(batch)

    def state_dict(self) -> dict:
        return {"data": self.tracker.state_dict(), "layout": self.stream.cfg.layout.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["data"])
        self.stream.load_state_dict(state["data"])
        self.stream.cfg.layout = StreamLayout.from_state(state.get("layout"))

    def same_layout(self, old_world: int, old_workers: int) -> bool:
        return (old_world, old_workers) == (self.dist.world_size, self.workers)

    def continue_on_new_layout(self, path: Path, old_states: dict[int, Optional[dict]], meta: dict,
                               old_workers: int, step: int) -> None:
        """A checkpoint (`path`, its `meta`) of another number of ranks or workers, with
        every old rank's saved state (`old_states`, rank -> state or None): continue its
        data order rather than restart it, and say what changes."""
        old_world = len(old_states)
        data = {r: st["data"] if st else {} for r, st in old_states.items()}
        first = old_states.get(0) or {}
        cfg = self.cfg
        layout = relayout(self.urls, cfg.train.seed, cfg.data.resampled, StreamLayout.from_state(first.get("layout")),
                          old_world, old_workers, data, salt=step)
        self.stream.cfg.layout = layout
        if self.dist.is_main:  # the logged skipped-sample count carries over (kept as stream -1)
            self.tracker.skipped[-1] = dict(sum((Counter(c) for st in data.values()
                                                 for c in st.get("skipped", {}).values()), Counter()))
        old = meta.get("config", {})
        old_global = (int(old.get("data", {}).get("batch_size", 0))
                      * int(old.get("train", {}).get("accum_steps", 1)) * old_world)
        new_global = cfg.data.batch_size * cfg.train.accum_steps * self.dist.world_size
        where = ("fresh draws (resampled)" if cfg.data.resampled else
                 f"epoch {layout.start_epoch}, less the {len(layout.done.get(layout.start_epoch, []))} "
                 f"of {len(self.urls)} shards already read")
        logger.warning("checkpoint %s was written by %d ranks x %d workers, this run has %d x %d: the "
                       "data order continues with %s; global batch %d -> %d%s; the learning-rate "
                       "schedule continues at step %d", path, old_world, old_workers,
                       self.dist.world_size, self.workers, where, old_global, new_global,
                       "" if old_global == new_global else
                       " (set data.global_batch_size to keep it)", step)
