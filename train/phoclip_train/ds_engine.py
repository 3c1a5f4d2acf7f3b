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
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from phoclip.errors import CheckpointError
from phoclip.fileio import atomic_write_json
from phoclip.models.checkpoints import DS_ANY_MODULE_STATES, DS_STATE_FILE, DS_TAG, deepspeed_globals
from phoclip_train.config import ConfigError
from phoclip_train.distributed import barrier, current_rank, current_world_size
from phoclip_train.ds_config import ds_checks_overflow, ds_precision, resolve_ds_config
from phoclip_train.ds_state import compare_summaries, read_state_summary, saved_layout, state_summary
from phoclip_train.engine import Engine

logger = logging.getLogger(__name__)


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
        summary = state_summary(self)  # collective
        if current_rank() == 0:
            atomic_write_json(folder / DS_STATE_FILE, summary, indent=1)

    def load(self, folder: Path) -> None:
        folder = Path(folder)
        if not (folder / DS_TAG).is_dir():
            raise CheckpointError(f"{folder} holds no DeepSpeed checkpoint (written by train_ddp.py? resume it "
                                  "with that engine)")
        saved = read_state_summary(folder / DS_STATE_FILE)
        stage, world = self.ds.zero_optimization_stage(), current_world_size()
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
                    "checkpoint", folder, old_world, current_world_size())
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
        base = self.base_optimizer()
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
        if current_rank() == 0:
            shutil.rmtree(out, ignore_errors=True)

    def _check_loaded(self, folder: Path, saved: Optional[dict]) -> None:
        if not saved:
            logger.warning("%s has no %s (copied without it?): the loaded DeepSpeed state cannot be "
                           "checked against the saved one", folder, DS_STATE_FILE)
            return
        now = state_summary(self)
        # the buffers saved are rank 0's (under ZeRO-3 each rank keeps its own BatchNorm statistics)
        bad = compare_summaries(saved, now, buffers=current_rank() == 0)
        if now["step"] and now["step"][1] > now["scheduler"]["last_epoch"]:
            bad.append(f"optimizer step {now['step'][1]:.0f} beyond the schedule's {now['scheduler']['last_epoch']}")
        if torch.distributed.is_initialized():  # every rank refuses, or none
            everyone = [None] * current_world_size()
            torch.distributed.all_gather_object(everyone, bad)
            bad = next((b for b in everyone if b), [])
        if bad:
            raise CheckpointError(f"{folder}: the DeepSpeed state after loading is not the one saved "
                                  f"({'; '.join(bad[:4])}{'; ...' if len(bad) > 4 else ''}): not resuming")
        logger.info("loaded DeepSpeed state verified against %s: weights, AdamW moments, optimizer step %s, "
                    "%d parameter groups, schedule at step %d", DS_STATE_FILE,
                    "-".join(sorted({f"{v:.0f}" for v in saved["step"] or [0]})), len(saved["groups"]),
                    saved["scheduler"]["last_epoch"])

    def base_optimizer(self) -> torch.optim.Optimizer:
        """Our AdamW inside DeepSpeed's ZeRO optimizer."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

def _on_rank0(fn: Callable[[], None]) -> None:
    """Run fn on rank 0 while the others wait; its failure is raised on every rank."""
    err = [None]
    if current_rank() == 0:
        try:
            fn()
        except Exception as e:
            err[0] = str(e)
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(err, src=0)
    if err[0] is not None:
        raise CheckpointError(err[0])
