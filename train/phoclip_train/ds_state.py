"""What a DeepSpeed checkpoint must restore, as a summary independent of the rank count:
computed from a live engine (`state_summary`, collective), saved beside the checkpoint
(DS_STATE_FILE), compared after a load (`compare_summaries`); the layout a checkpoint was
written with (`saved_layout`)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from phoclip.errors import CheckpointError
from phoclip.fileio import read_regular
from phoclip.models.checkpoints import DS_ZERO3_MODULE_STATES, ds_optim_file
from phoclip_train.distributed import current_world_size
from phoclip_train.ds_config import MAX_JSON_BYTES

if TYPE_CHECKING:  # annotations only: ds_engine imports this module
    from phoclip_train.ds_engine import DeepSpeedEngine

_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


def _fragments(engine: DeepSpeedEngine, p):
    """(state key, this rank's slice of the parameter's fp32 weight or AdamW moment,
    offset of the slice in the flattened parameter); padding left out."""
    z = engine.optimizer
    if hasattr(p, "ds_id"):  # ZeRO-3: each rank holds one contiguous partition
        if not p.requires_grad:
            return
        n = p.ds_tensor.ds_numel
        off = z._get_param_partition_rank(p) * n
        for key in _KEYS:
            try:
                t = z.get_local_fp32_param(p, None if key == "fp32" else key)
            except KeyError:  # no optimizer state yet
                continue
            yield key, t.reshape(-1)[:max(0, min(n, p.ds_numel - off))], off
        return
    m = getattr(p, "_hp_mapping", None)  # ZeRO-1/2: a fragment of a flat partition
    if m is None:
        return
    flat = z.single_partition_of_fp32_groups[m.param_group_index]
    a = m.hp_fragment_address
    for key in _KEYS:
        src = flat if key == "fp32" else engine.base_optimizer().state.get(flat, {}).get(key)
        if src is not None:
            yield key, src.narrow(0, a.start, a.numel), m.lp_fragment_address.start


@torch.no_grad()
def state_summary(engine: DeepSpeedEngine) -> dict:
    """What must survive a save and load, independent of the rank count (collective):
    per trainable parameter and state (fp32 weight, exp_avg, exp_avg_sq) the sum of
    squares and a position-weighted sum, over all ranks' slices; the buffers; the
    optimizer step; each group's hyperparameters; the schedule's position."""
    named = [(n, p) for n, p in engine.model.named_parameters() if p.requires_grad]
    sums = torch.zeros(len(named), len(_KEYS), 3, dtype=torch.float64, device=engine.device)
    for i, (_, p) in enumerate(named):
        for key, t, off in _fragments(engine, p):
            j = _KEYS.index(key)
            sums[i, j, :2] += _stats(t, off).to(sums.device)
            sums[i, j, 2] = 1  # present on some rank
    base = engine.base_optimizer()
    steps = [float(st["step"]) for st in base.state.values() if "step" in st]
    ext = torch.tensor([max(steps, default=-1e30), -min(steps, default=1e30)], dtype=torch.float64,
                       device=engine.device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(ext, op=torch.distributed.ReduceOp.MAX)
    sums = sums.cpu().tolist()
    params = {n: {k: s[:2] for k, s in zip(_KEYS, sums[i]) if s[2]} for i, (n, _) in enumerate(named)}
    numel = {n: int(getattr(p, "ds_numel", p.numel())) for n, p in named}
    buffers = {n: _stats(b.detach().reshape(-1), 0).tolist() for n, b in engine.model.named_buffers()}
    hp = ("name", "lr", "initial_lr", "weight_decay", "betas", "eps")
    groups = [{k: (list(g[k]) if isinstance(g[k], tuple) else g[k]) for k in hp if k in g}
              for g in base.param_groups]
    sched = engine.scheduler.state_dict()
    return {"zero_stage": int(engine.ds.zero_optimization_stage()), "world_size": current_world_size(),
            "step": None if ext[0] <= -1e30 else [-ext[1].item(), ext[0].item()],  # [min, max]
            "params": params, "numel": numel, "buffers": buffers, "groups": groups,
            "scheduler": {"last_epoch": int(sched["last_epoch"]), "base_lrs": list(sched["base_lrs"])},
            "global_steps": int(engine.ds.global_steps)}


def _stats(t: torch.Tensor, off: int, chunk: int = 1 << 20) -> torch.Tensor:
    """[sum of squares, sum of x_i * w_i] of a flat slice starting at `off`, in float64,
    w_i = (i mod 13) - 6 (a moved or mis-partitioned slice changes it); bounded memory."""
    out = torch.zeros(2, dtype=torch.float64, device=t.device)
    for s in range(0, t.numel(), chunk):
        c = t[s:s + chunk].double()
        w = (torch.arange(off + s, off + s + c.numel(), device=c.device) % 13 - 6).double()
        out += torch.stack([c.square().sum(), (c * w).sum()])
    return out


def compare_summaries(saved: dict, now: dict, rtol: float = 1e-7, buffers: bool = True) -> list[str]:
    """What differs between the summary saved with a checkpoint and the loaded state's."""
    bad = []
    for n, keys in saved["params"].items():
        got = now["params"].get(n, {})
        for k, (sq, ws) in keys.items():
            if k not in got:
                bad.append(f"{n} {k} missing")
                continue
            sq2, ws2 = got[k]
            bound = 6 * math.sqrt(max(sq, 0.0) * saved.get("numel", {}).get(n, 1)) + 1e-30
            if abs(sq - sq2) > rtol * max(abs(sq), 1e-30) or abs(ws - ws2) > rtol * bound:
                bad.append(f"{n} {k} differs")
    for n, (sq, ws) in (saved.get("buffers", {}) if buffers else {}).items():
        sq2, ws2 = now["buffers"].get(n, (math.nan, math.nan))
        bound = abs(ws) + math.sqrt(max(sq, 0.0)) + 1e-30
        if not (abs(sq - sq2) <= rtol * max(abs(sq), 1e-30) and abs(ws - ws2) <= rtol * bound):
            bad.append(f"buffer {n} differs")
    if saved.get("step") != now.get("step"):
        bad.append(f"optimizer step {now.get('step')} instead of {saved.get('step')}")
    if len(saved["groups"]) != len(now["groups"]):
        bad.append(f"{len(now['groups'])} parameter groups instead of {len(saved['groups'])}")
    for i, (a, b) in enumerate(zip(saved["groups"], now["groups"])):
        diff = [f"{k} {b.get(k)} instead of {v}" for k, v in a.items() if b.get(k) != v]
        if diff:
            bad.append(f"parameter group {a.get('name', i)}: {', '.join(diff)}")
    if saved["scheduler"] != now["scheduler"]:
        bad.append(f"schedule {now['scheduler']} instead of {saved['scheduler']}")
    return bad


def saved_layout(ds_dir: Path, saved: Optional[dict]) -> tuple[Optional[int], int]:
    """(ZeRO stage, rank count) a DeepSpeed checkpoint folder was written with; the stage
    from its summary, else 3 or None (1 or 2) from the file names."""
    world = len(list(ds_dir.glob(ds_optim_file("*"))))
    if saved:
        return int(saved["zero_stage"]), int(saved.get("world_size", world))
    return (3 if (ds_dir / DS_ZERO3_MODULE_STATES).is_file() else None), world


def read_state_summary(path: Path) -> Optional[dict]:
    """DS_STATE_FILE: a capped regular file holding an object with the layout keys,
    None when absent, else a CheckpointError naming it."""
    try:
        out = json.loads(read_regular(path, MAX_JSON_BYTES))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(out, dict) or not isinstance(out.get("zero_stage"), int):
        raise CheckpointError(f"{path}: not a DeepSpeed state summary (an object with an integer zero_stage)")
    what = _summary_problem(out)
    if what:  # compare_summaries would end in a KeyError or TypeError on every rank, after DeepSpeed's load
        raise CheckpointError(f"{path}: not a DeepSpeed state summary ({what}); it is written with each DeepSpeed "
                              "checkpoint: resume from another checkpoint")
    return out


def _pair(v) -> bool:
    return (isinstance(v, list) and len(v) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v))


def _summary_problem(s: dict) -> Optional[str]:
    """What is not of the shape `state_summary` writes (None when all is), each part as
    `saved_layout` and `compare_summaries` read it."""
    params, sched = s.get("params"), s.get("scheduler")
    if not isinstance(params, dict) or not all(
            isinstance(v, dict) and all(k in _KEYS and _pair(x) for k, x in v.items()) for v in params.values()):
        return "params must map each parameter to {fp32|exp_avg|exp_avg_sq: [sum of squares, weighted sum]}"
    if not isinstance(s.get("numel", {}), dict) or not all(isinstance(v, int) for v in s.get("numel", {}).values()):
        return "numel must map parameters to integers"
    if not isinstance(s.get("buffers", {}), dict) or not all(_pair(v) for v in s.get("buffers", {}).values()):
        return "buffers must map each buffer to [sum of squares, weighted sum]"
    if s.get("step") is not None and not _pair(s["step"]):
        return "step must be [min, max] or null"
    if not isinstance(s.get("groups"), list) or not all(isinstance(g, dict) for g in s["groups"]):
        return "groups must be a list of objects"
    if (not isinstance(sched, dict) or not isinstance(sched.get("last_epoch"), int)
            or not isinstance(sched.get("base_lrs"), list)):
        return "scheduler must be {last_epoch: integer, base_lrs: list}"
    if not isinstance(s.get("world_size", 1), int) or s.get("world_size", 1) < 1:
        return "world_size must be a positive integer"
    return None
