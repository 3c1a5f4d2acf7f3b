"""The DeepSpeed engine behind the same interface as DDPEngine.

Our AdamW with the per-module parameter groups goes in as a client optimizer (so the
three learning rates hold), our warmup+cosine LambdaLR as the client scheduler (DeepSpeed
steps it at each accumulation boundary, as the DDP engine does). Batch size,
accumulation, clipping and precision come from the run config: the JSON may leave them
"auto"; a value that disagrees with the run config is refused. Checkpoints resume on the
same or another number of ranks (DeepSpeed's universal checkpoint), checked against a
fingerprint of the saved state: see `DeepSpeedEngine.save` and `load`."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from phoclip.models.checkpoints import (DS_ANY_MODULE_STATES, DS_STATE_FILE, DS_TAG, DS_ZERO3_MODULE_STATES,
                                        deepspeed_globals, ds_optim_file)
from phoclip.errors import CheckpointError
from phoclip.fileio import atomic_write_json, read_regular
from phoclip_train.config import ConfigError
from phoclip_train.distributed import barrier
from phoclip_train.engine import Engine

logger = logging.getLogger(__name__)

MAX_JSON_BYTES = 16 << 20  # a DeepSpeed JSON or state summary is kilobytes
_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


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


def check_ds_precision(path: str, cfg) -> str:
    """The JSON's precision against train.precision (which `auto` takes from the JSON),
    decided from the file alone: called before anything is built (a mismatch used to be
    found after the model and DeepSpeed's op build, minutes in)."""
    ds = read_ds_json(path)
    try:
        ds_prec = ds_precision(ds)[0]
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if cfg.train.precision == "auto":
        cfg.train.precision = ds_prec
    if ds_prec != cfg.train.precision:
        tiny = " (launch/deepspeed/zero2_fp32.json is the fp32 one, for tiny-debug and CPUs)" if ds_prec != "fp32" else ""
        raise ConfigError(f"{path} trains in {ds_prec} but train.precision={cfg.train.precision}; "
                          f"set train.precision={ds_prec} or pick the matching JSON{tiny}")
    return ds_prec


def resolve_ds_config(path: str, cfg, world_size: int) -> dict:
    """Fill "auto" from the run config; refuse values that disagree with it."""
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
    check_ds_precision(path, cfg)
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
        self.ckpt_dir = Path(cfg.run_dir) / "checkpoints"  # where a conversion goes (see load)
        alone = world_size == 1 and not torch.distributed.is_initialized() and "LOCAL_RANK" not in os.environ
        if alone:
            # started without a launcher (`python launch/train_deepspeed.py`, or main() in
            # process): DeepSpeed would look for MPI (mpi4py) and assert on LOCAL_RANK; one
            # process is a process group of one, its own local rank 0 while DeepSpeed starts
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                                 store=torch.distributed.HashStore(), rank=0, world_size=1)
            os.environ["LOCAL_RANK"] = "0"
        try:
            self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
                model_parameters=None)
        finally:
            if alone:
                del os.environ["LOCAL_RANK"]
        self.model = self.ds.module
        self.wrapped = self.ds
        self._micro = 0
        self._last_norm = torch.tensor(float("nan"))
        prec, self.input_dtype = ds_precision(self.ds_config)  # images come in the weights' dtype
        fp16 = prec == "fp16"
        self.handles_overflow = fp16  # DeepSpeed's dynamic loss scale skips overflow steps
        self.partitioned = self.ds.zero_optimization_stage() == 3
        self.skips_itself = ds_checks_overflow(self.ds_config, self.ds.zero_optimization_stage())
        # where DeepSpeed finds non-finite gradients itself (and skips the step), a
        # non-finite loss is made a non-finite gradient (see backward) and the skip needs
        # no read of ours; elsewhere the trainer reads its skip flag once per step
        self.skips_on_device = self.skips_itself

    def gathered(self):
        if not self.partitioned:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)

    def autocast(self):
        # DeepSpeed's torch_autocast block (bf16) wraps its own forward; fp16 casts weights
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if self.skips_itself:
            # a non-finite loss poisons every gradient (x NaN; x 1.0, exact, when finite),
            # so DeepSpeed's own overflow check skips the step on every rank
            loss = loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan")).to(loss.dtype)
        # our accumulation recomputes the full loss per micro-batch: no 1/accum scaling
        self.ds.backward(loss, scale_wrt_gas=False)
        self._micro += 1
        if self._micro < self.accum_steps:
            self.ds.step()  # not a boundary: DeepSpeed only counts the micro-step

    def grad_norm(self):
        return None  # DeepSpeed clips and measures inside step()

    def last_grad_norm(self) -> torch.Tensor:
        return self._last_norm

    def step(self, skip) -> None:
        """`skip`: a bool (our decision, read on the host), or, where DeepSpeed checks
        overflow itself, the device flag, which DeepSpeed's check has already seen in the
        poisoned gradients: its `was_step_applied()` (a host bool it keeps) says whether
        it stepped."""
        self._micro = 0
        if isinstance(skip, bool) and skip:
            # drop the bad gradients; the schedule still advances as under DDP
            self.ds.zero_grad()
            self.optimizer.zero_grad()
            self.scheduler.step()
            return
        self.ds.step()
        if self.skips_itself and not self.ds.was_step_applied():
            # DeepSpeed skipped an overflow step without its schedule: ours advances as under DDP
            self.scheduler.step()
            return
        norm = self.ds.get_global_grad_norm()
        # kept a tensor: read with the step's other figures on a logging step, not here
        self._last_norm = (norm.detach() if isinstance(norm, torch.Tensor)
                           else torch.tensor(float("nan") if norm is None else float(norm)))

    # ------------------------------------------------------------------ checkpoints
    # Same ZeRO stage and rank count: DeepSpeed's own files, loaded as saved. Another rank
    # count: the checkpoint is converted once to DeepSpeed's universal format (one file per
    # parameter and state: fp32 weight, exp_avg, exp_avg_sq, step), which every rank loads
    # and re-partitions. Either way the loaded state is compared with a fingerprint of the
    # saved one (DS_STATE_FILE): a load that "works" but lost the weights, the moments or the
    # step (DeepSpeed's known trap) is refused instead of training on from scratch.

    def save(self, folder: Path) -> None:
        self.ds.save_checkpoint(str(folder), tag=DS_TAG, save_latest=False)
        summary = self.state_summary()  # collective
        if _rank() == 0:
            atomic_write_json(folder / DS_STATE_FILE, summary, indent=1)

    def load(self, folder: Path) -> None:
        folder = Path(folder)
        if not (folder / DS_TAG).is_dir():
            raise CheckpointError(f"{folder} holds no DeepSpeed checkpoint (written by train_ddp.py? resume it "
                                  "with that engine)")
        saved = _read_json(folder / DS_STATE_FILE)
        stage, world = self.ds.zero_optimization_stage(), _world()
        old_stage, old_world = saved_layout(folder / DS_TAG, saved)
        if old_stage != stage if saved else (old_stage == 3) != (stage == 3):
            raise CheckpointError(f"{folder} was written under ZeRO stage {old_stage or '1 or 2'}, this run uses "
                                  f"stage {stage}: a change of ZeRO stage is not supported; resume with the "
                                  "DeepSpeed JSON it was written with")
        if old_world == world:
            path, _ = self.ds.load_checkpoint(str(folder), tag=DS_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint in {folder}")
        else:
            self._load_universal(folder, old_world)
        self._check_loaded(folder, saved)

    def _load_universal(self, folder: Path, old_world: int) -> None:
        """A checkpoint of `old_world` ranks on this run's: DeepSpeed's universal checkpoint,
        converted by rank 0 into this run's checkpoints folder (step_N.universal.tmp, as large
        as the optimizer state; removed after the load, a leftover is pruned with the killed
        saves), then loaded by every rank."""
        from deepspeed.checkpoint import ds_to_universal

        out = self.ckpt_dir / f"{folder.name}.universal.tmp"

        def convert() -> None:
            if out.is_symlink():  # planted: remove the link, never what it points at
                out.unlink()
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            args = argparse.Namespace(input_folder=str(folder / DS_TAG), output_folder=str(out / DS_TAG),
                                      num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                      strict=True, inject_missing_state=True)
            chatter = io.StringIO()  # its prints and progress bars; shown only on failure
            try:
                with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                    ds_to_universal.main(args)
            except Exception as e:
                raise CheckpointError(f"{folder}: converting the {old_world}-rank DeepSpeed checkpoint to "
                                      f"DeepSpeed's universal format failed: {type(e).__name__}: {e} "
                                      f"({chatter.getvalue().strip().splitlines()[-1:]})") from e

        logger.info("%s was written by %d ranks, this run has %d: converting it to DeepSpeed's universal "
                    "checkpoint", folder, old_world, _world())
        _on_rank0(convert)
        cfg = self.ds._config
        cfg.load_universal_checkpoint = True
        try:
            path, _ = self.ds.load_checkpoint(str(out), tag=DS_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        finally:
            cfg.load_universal_checkpoint = False
        if path is None:
            raise CheckpointError(f"{folder}: DeepSpeed loaded nothing from its universal conversion {out}")
        # DeepSpeed's ZeRO-3 universal load gives every parameter group the hyperparameters of
        # the first (our three learning rates and the no-decay groups would be lost): restore
        # each group's own, as saved
        base = self._base()
        groups = torch.load(out / DS_TAG / "zero" / "optimizer_state.pt", map_location="cpu",
                            weights_only=False)["param_groups"]
        for g, s in zip(base.param_groups, groups):
            g.update({k: v for k, v in s.items() if k != "params"})
        # ... and it hands them all one and the same step tensor, which AdamW increments in
        # place: once per group and step (the step count would run 6x too fast)
        for st in base.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()
        # module buffers (BatchNorm statistics) are not in the universal files: from the
        # saved module state, which holds them whole under every stage
        ms = sorted((folder / DS_TAG).glob(DS_ANY_MODULE_STATES))[0]
        with torch.serialization.safe_globals(deepspeed_globals()):
            module = torch.load(ms, map_location="cpu", weights_only=True, mmap=True)["module"]
        with torch.no_grad():
            for name, b in self.model.named_buffers():
                if name in module:
                    b.copy_(module[name])
        barrier()
        if _rank() == 0:
            shutil.rmtree(out, ignore_errors=True)

    def _check_loaded(self, folder: Path, saved: Optional[dict]) -> None:
        if not saved:
            logger.warning("%s has no %s (written before it existed): the loaded DeepSpeed state is not "
                           "checked", folder, DS_STATE_FILE)
            return
        now = self.state_summary()
        # the buffers saved are rank 0's (under ZeRO-3 each rank keeps its own BatchNorm statistics)
        bad = compare_summaries(saved, now, buffers=_rank() == 0)
        if now["step"] and now["step"][1] > now["scheduler"]["last_epoch"]:
            bad.append(f"optimizer step {now['step'][1]:.0f} beyond the schedule's {now['scheduler']['last_epoch']}")
        if torch.distributed.is_initialized():  # every rank refuses, or none
            everyone = [None] * _world()
            torch.distributed.all_gather_object(everyone, bad)
            bad = next((b for b in everyone if b), [])
        if bad:
            raise CheckpointError(f"{folder}: the DeepSpeed state after loading is not the one saved "
                                  f"({'; '.join(bad[:4])}{'; ...' if len(bad) > 4 else ''}): not resuming")
        logger.info("loaded DeepSpeed state verified against %s: weights, AdamW moments, optimizer step %s, "
                    "%d parameter groups, schedule at step %d", DS_STATE_FILE,
                    "-".join(sorted({f"{v:.0f}" for v in saved["step"] or [0]})), len(saved["groups"]),
                    saved["scheduler"]["last_epoch"])

    def _base(self) -> torch.optim.Optimizer:
        """Our AdamW inside DeepSpeed's ZeRO optimizer."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _fragments(self, p):
        """(state key, this rank's slice of the parameter's fp32 weight or AdamW moment,
        offset of the slice in the flattened parameter); padding left out."""
        z = self.optimizer
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
            src = flat if key == "fp32" else self._base().state.get(flat, {}).get(key)
            if src is not None:
                yield key, src.narrow(0, a.start, a.numel), m.lp_fragment_address.start

    @torch.no_grad()
    def state_summary(self) -> dict:
        """What must survive a save and load, independent of the rank count (collective):
        per trainable parameter and state (fp32 weight, exp_avg, exp_avg_sq) the sum of
        squares and a position-weighted sum, over all ranks' slices; the buffers; the
        optimizer step; each group's hyperparameters; the schedule's position."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        sums = torch.zeros(len(named), len(_KEYS), 3, dtype=torch.float64, device=self.device)
        for i, (_, p) in enumerate(named):
            for key, t, off in self._fragments(p):
                j = _KEYS.index(key)
                sums[i, j, :2] += _stats(t, off).to(sums.device)
                sums[i, j, 2] = 1  # present on some rank
        base = self._base()
        steps = [float(st["step"]) for st in base.state.values() if "step" in st]
        ext = torch.tensor([max(steps, default=-1e30), -min(steps, default=1e30)], dtype=torch.float64,
                           device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(ext, op=torch.distributed.ReduceOp.MAX)
        sums = sums.cpu().tolist()
        params = {n: {k: s[:2] for k, s in zip(_KEYS, sums[i]) if s[2]} for i, (n, _) in enumerate(named)}
        numel = {n: int(getattr(p, "ds_numel", p.numel())) for n, p in named}
        buffers = {n: _stats(b.detach().reshape(-1), 0).tolist() for n, b in self.model.named_buffers()}
        hp = ("name", "lr", "initial_lr", "weight_decay", "betas", "eps")
        groups = [{k: (list(g[k]) if isinstance(g[k], tuple) else g[k]) for k in hp if k in g}
                  for g in base.param_groups]
        sched = self.scheduler.state_dict()
        return {"zero_stage": int(self.ds.zero_optimization_stage()), "world_size": _world(),
                "step": None if ext[0] <= -1e30 else [-ext[1].item(), ext[0].item()],  # [min, max]
                "params": params, "numel": numel, "buffers": buffers, "groups": groups,
                "scheduler": {"last_epoch": int(sched["last_epoch"]), "base_lrs": list(sched["base_lrs"])},
                "global_steps": int(self.ds.global_steps)}


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


def _read_json(path: Path) -> Optional[dict]:
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
    return out


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _on_rank0(fn: Callable[[], None]) -> None:
    """Run fn on rank 0 while the others wait; its failure is raised on every rank."""
    err = [None]
    if _rank() == 0:
        try:
            fn()
        except Exception as e:
            err[0] = str(e)
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(err, src=0)
    if err[0] is not None:
        raise CheckpointError(err[0])
