"""The DeepSpeed JSON: read it (capped, regular files only), its precision, whether
DeepSpeed checks overflow itself under it, and the config DeepSpeed receives ("auto"
filled from the run config; values that disagree with it refused)."""
from __future__ import annotations

import json
from typing import Optional

import torch

from phoclip.fileio import read_regular
from phoclip_train.config import ConfigError, RunConfig

MAX_JSON_BYTES = 16 << 20  # a DeepSpeed JSON or state summary is kilobytes


def _block(ds: dict, *names: str) -> dict:
    """A precision block of a DeepSpeed JSON ("fp16", "bf16" or its "bfloat16" spelling,
    "torch_autocast"): an object, or absent; anything else is a ConfigError."""
    for name in names:
        if name in ds:
            if not isinstance(ds[name], dict):
                raise ConfigError(f"\"{name}\" must be an object such as {{\"enabled\": true}}")
            return ds[name]
    return {}


def ds_precision(ds: dict) -> tuple[str, Optional[torch.dtype]]:
    """(train.precision the JSON trains in, the dtype DeepSpeed casts the weights to:
    fp16 and a "bf16" block do, torch_autocast keeps them fp32)."""
    if _block(ds, "fp16").get("enabled"):
        return "fp16", torch.float16
    if _block(ds, "bf16", "bfloat16").get("enabled"):
        return "bf16", torch.bfloat16
    return ("bf16" if _block(ds, "torch_autocast").get("enabled") else "fp32"), None


def ds_checks_overflow(ds_config: dict, zero_stage: int) -> bool:
    """Whether DeepSpeed (0.19) finds non-finite gradients itself and skips the step: fp16
    (its loss scaler, every stage), and a "bf16" block under ZeRO-1/2 (check_grad_overflow,
    default true). Not: fp32, torch_autocast bf16 (the shipped bf16 JSONs), ZeRO-3 bf16."""
    if _block(ds_config, "fp16").get("enabled"):
        return True
    bf16 = _block(ds_config, "bf16", "bfloat16")
    return bool(bf16.get("enabled")) and bool(bf16.get("check_grad_overflow", True)) and zero_stage in (1, 2)


def read_ds_json(path: str) -> dict:
    """A DeepSpeed JSON config, or a one-line ConfigError naming it."""
    try:
        ds = json.loads(read_regular(path, MAX_JSON_BYTES))
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config {path} does not exist") from None
    except (OSError, ValueError, RecursionError) as e:
        raise ConfigError(f"DeepSpeed config {path}: not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"DeepSpeed config {path}: expected a JSON object")
    return ds


def decide_ds_precision(path: str, precision: str) -> str:
    """The train.precision a DeepSpeed JSON trains in, from the file alone (so a mismatch
    is refused before anything is built): `precision` 'auto' takes the JSON's; any other
    must be the JSON's, else a ConfigError naming both and the fix."""
    ds = read_ds_json(path)
    try:
        ds_prec = ds_precision(ds)[0]
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if precision not in ("auto", ds_prec):
        tiny = " (launch/deepspeed/zero2_fp32.json is the fp32 one, for tiny-debug and CPUs)" if ds_prec != "fp32" else ""
        raise ConfigError(f"{path} trains in {ds_prec} but train.precision={precision}; "
                          f"set train.precision={ds_prec} or pick the matching JSON{tiny}")
    return ds_prec


def resolve_ds_config(path: str, cfg: RunConfig, world_size: int) -> dict:
    """The config DeepSpeed receives: "auto" filled from the run config; values that
    disagree with it (precision included) refused."""
    ds = read_ds_json(path)
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
    decide_ds_precision(path, cfg.train.precision)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{path}: remove the '{key}' block: PhoCLIP passes its own AdamW with "
                              "per-module learning rates and its warmup+cosine schedule")
    return ds
