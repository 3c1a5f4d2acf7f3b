"""The DeepSpeed engine behind the same interface as DDPEngine.

Our AdamW with the per-module parameter groups goes in as a client optimizer (so the
three learning rates hold), our warmup+cosine LambdaLR as the client scheduler (DeepSpeed
steps it at each accumulation boundary, as the DDP engine does). Batch size,
accumulation, clipping and precision come from the run config: the JSON may leave them
"auto"; a value that disagrees with the run config is refused."""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from phoclip_train.config import ConfigError
from phoclip_train.engine import Engine

logger = logging.getLogger(__name__)

DS_TAG = "deepspeed"


def resolve_ds_config(path: str, cfg, world_size: int) -> dict:
    """Fill "auto" from the run config; refuse values that disagree with it."""
    try:
        ds = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config {path} does not exist") from None
    want = {"train_micro_batch_size_per_gpu": cfg.data.batch_size,
            "gradient_accumulation_steps": cfg.train.accum_steps,
            "train_batch_size": cfg.data.batch_size * cfg.train.accum_steps * world_size,
            "gradient_clipping": float(cfg.train.grad_clip)}
    for k, v in want.items():
        cur = ds.get(k, "auto")
        if cur == "auto":
            ds[k] = v
        elif float(cur) != float(v):
            src = {"train_micro_batch_size_per_gpu": "data.batch_size",
                   "gradient_accumulation_steps": "train.accum_steps",
                   "train_batch_size": "data.batch_size x train.accum_steps x world size",
                   "gradient_clipping": "train.grad_clip"}[k]
            raise ConfigError(f"{path}: {k}={cur} disagrees with the run config ({src} gives {v}); "
                              f"set it to \"auto\" or change {src}")
    ds_prec = ("fp16" if ds.get("fp16", {}).get("enabled") else
               "bf16" if ds.get("bf16", {}).get("enabled") or ds.get("torch_autocast", {}).get("enabled")
               else "fp32")
    if cfg.train.precision == "auto":
        cfg.train.precision = ds_prec
    if ds_prec != cfg.train.precision:
        raise ConfigError(f"{path} trains in {ds_prec} but train.precision={cfg.train.precision}; "
                          f"set train.precision={ds_prec} or pick the matching JSON")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{path}: remove the '{key}' block: PhoCLIP passes its own AdamW with "
                              "per-module learning rates and its warmup+cosine schedule")
    return ds


class DeepSpeedEngine(Engine):
    def __init__(self, model, optimizer, scheduler, *, cfg, device, world_size) -> None:
        import deepspeed

        if not cfg.train.deepspeed_config:
            raise ConfigError("train.engine=deepspeed needs --deepspeed_config launch/deepspeed/NAME.json")
        self.ds_config = resolve_ds_config(cfg.train.deepspeed_config, cfg, world_size)
        self.accum_steps = cfg.train.accum_steps
        self.device = device
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            model_parameters=None)
        self.model = self.ds.module
        self.wrapped = self.ds
        self._micro = 0
        self._last_norm = float("nan")
        fp16 = bool(self.ds_config.get("fp16", {}).get("enabled"))
        self.input_dtype = torch.float16 if fp16 else None
        self.handles_overflow = fp16  # DeepSpeed's dynamic loss scale skips overflow steps
        self.partitioned = self.ds.zero_optimization_stage() == 3

    def gathered(self):
        if not self.partitioned:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)

    def autocast(self):
        # DeepSpeed's torch_autocast block (bf16) wraps its own forward; fp16 casts weights
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # our accumulation recomputes the full loss per micro-batch: no 1/accum scaling
        self.ds.backward(loss, scale_wrt_gas=False)
        self._micro += 1
        if self._micro < self.accum_steps:
            self.ds.step()  # not a boundary: DeepSpeed only counts the micro-step

    def grad_norm(self):
        return None  # DeepSpeed clips and measures inside step()

    def last_grad_norm(self) -> torch.Tensor:
        return torch.tensor(self._last_norm)

    def step(self, skip: bool) -> None:
        self._micro = 0
        if skip:
            # drop the bad gradients; the schedule still advances as under DDP
            self.ds.zero_grad()
            self.optimizer.zero_grad()
            self.scheduler.step()
            return
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        self._last_norm = float(norm) if norm is not None else float("nan")

    def save(self, folder: Path) -> None:
        self.ds.save_checkpoint(str(folder), tag=DS_TAG, save_latest=False)

    def load(self, folder: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(folder), tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {folder}")
