"""One small interface over DDP and DeepSpeed: wrap, backward, step, save, load.

The step (train/phoclip_train/step.py) only talks to an `Engine`; there is one loop."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from phoclip.models.checkpoints import STATE_FILE
from phoclip_train.checkpointer import atomic_torch_save

logger = logging.getLogger(__name__)


def precision_dtype(precision: str) -> Optional[torch.dtype]:
    """train.precision → the autocast dtype (None: fp32, no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


class Engine:
    """The interface; see DDPEngine and DeepSpeedEngine."""

    model: nn.Module       # the unwrapped model (what is saved and evaluated)
    wrapped: nn.Module     # what is called in the forward pass
    optimizer: torch.optim.Optimizer
    input_dtype: Optional[torch.dtype] = None  # cast images to this (DeepSpeed fp16 weights)
    handles_overflow: bool = False
    """True where an inf gradient is an overflow the engine skips itself (fp16 loss
    scaling), not a fault for the trainer's non-finite guard."""
    skips_on_device: bool = False
    """True where `step` takes the skip decision as a device tensor (no host sync);
    otherwise it needs a Python bool, read from the device every step."""
    skips_itself: bool = False
    """True where the engine finds non-finite gradients itself and skips the step
    (DeepSpeed's overflow check): a non-finite loss is then turned into non-finite
    gradients in `backward`, and `step` learns from the engine whether it stepped."""
    partitioned: bool = False
    """True where each rank holds only a slice of every parameter (ZeRO-3): each forward
    is then a collective, so all ranks must run the same forwards, and reading a weight
    needs `gathered()`."""

    def gathered(self):
        """A context in which `model`'s parameters are whole on every rank (collective)."""
        return contextlib.nullcontext()

    def autocast(self):
        raise NotImplementedError

    def no_sync(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def grad_norm(self) -> Optional[torch.Tensor]:
        """Unscale (fp16) and clip; returns the global gradient norm before clipping, or
        None where the engine clips inside `step` (then see `last_grad_norm`)."""
        raise NotImplementedError

    def last_grad_norm(self) -> torch.Tensor:
        """The gradient norm the last `step` measured (engines that clip inside step)."""
        raise NotImplementedError

    def step(self, skip) -> None:
        """Optimizer + scheduler step; the optimizer step is skipped when `skip` (a bool,
        or a 0-d device tensor > 0 where `skips_on_device`)."""
        raise NotImplementedError

    def lrs(self) -> dict[str, float]:
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

    def save(self, folder: Path) -> None:
        raise NotImplementedError

    def load(self, folder: Path) -> None:
        raise NotImplementedError


class DDPEngine(Engine):
    """DistributedDataParallel (a no-op wrapper on one process), AMP and AdamW."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, *, precision: str,
                 grad_clip: float, device: torch.device, world_size: int, rank: int) -> None:
        self.model = model.to(device)
        self.device, self.rank = device, rank
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.wrapped = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            self.wrapped = self.model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.precision, self.grad_clip = precision, grad_clip
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.handles_overflow = self.scaler.is_enabled()
        # a fused optimizer reads the skip decision from the device (found_inf)
        self.skips_on_device = bool(optimizer.defaults.get("fused"))

    def autocast(self):
        dtype = precision_dtype(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def no_sync(self):
        return self.wrapped.no_sync() if hasattr(self.wrapped, "no_sync") else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def grad_norm(self) -> torch.Tensor:
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def step(self, skip) -> None:
        if self.scaler.is_enabled():
            # fp16: a non-finite loss or gradient is an overflow the scaler finds on the
            # device itself (its found_inf reaches the fused optimizer; no host sync)
            if not (isinstance(skip, bool) and skip):
                self.scaler.step(self.optimizer)
            self.scaler.update()
        elif isinstance(skip, torch.Tensor) and not self.skips_on_device:
            if not bool(skip):  # an unfused optimizer cannot skip on the device: a host read
                self.optimizer.step()
        elif isinstance(skip, torch.Tensor):
            self.optimizer.found_inf = skip.float().reshape(())  # read by the fused kernel
            self.optimizer.grad_scale = None
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf, self.optimizer.grad_scale
        elif not skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def save(self, folder: Path) -> None:
        if self.rank == 0:
            atomic_torch_save({"model": self.model.state_dict(),
                               "optimizer": self.optimizer.state_dict(),
                               "scheduler": self.scheduler.state_dict(),
                               "scaler": self.scaler.state_dict()}, folder / STATE_FILE)

    def load(self, folder: Path) -> None:
        st = torch.load(folder / STATE_FILE, map_location=self.device, weights_only=True)
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        if st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
