"""One optimizer step as plain functions: device inputs, forward/backward with
accumulation, the non-finite skip decision, clipping, the optimizer step, and the one
host read of a step's figures. They take a model, an engine and a loss, not a run: a
test drives them on tensors with a tiny model (tests/test_step.py).

The skip of a non-finite step is decided on the device and agreed by every rank (a
device all-reduce), so steps between host reads issue no host sync where the engine
takes the decision as a tensor (`Engine.skips_on_device`: DDP's fused AdamW; DeepSpeed
where it checks overflow itself, `Engine.skips_itself`)."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from phoclip.models.packing import trim_padding
from phoclip.data.transforms import normalize_images, resize_on_device
from phoclip_train.distributed import all_reduce_max
from phoclip_train.state import NonFiniteCounter

logger = logging.getLogger(__name__)


@dataclass
class InputPrep:
    """How a stream batch becomes device inputs (decided once by `build_run`)."""

    device: torch.device
    image_size: int
    input_dtype: Optional[torch.dtype] = None  # DeepSpeed fp16 weights take fp16 images
    channels_last: bool = False
    trim_padding: int = 0  # cut the ids after the batch's longest caption (multiple of this)
    pack_captions: bool = False


def device_inputs(batches: Sequence[dict], prep: InputPrep, model) -> list[tuple]:
    """Batches → device inputs (images, ids, packing or None). uint8 pixels (the stream's)
    are normalised on the device, float images are taken as already normalised; the ids
    are trimmed to the batch's longest caption on the CPU, before the copy, and the
    captions packed into rows there."""
    out = []
    for b in batches:
        img = b["images"].to(prep.device, non_blocking=True)
        if "boxes" in b:  # data.resize_on=device: the crop is resized here
            img = resize_on_device(img, b["boxes"], prep.image_size)
        dt = prep.input_dtype
        img = normalize_images(img, dt) if img.dtype == torch.uint8 else img.to(dt or img.dtype)
        if prep.channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        ids = b["input_ids"]
        if prep.trim_padding:
            ids = trim_padding(ids, model.pad_id, prep.trim_padding)
        packing = model.pack_text(ids) if prep.pack_captions else None
        out.append((img, ids.to(prep.device, non_blocking=True),
                    packing.to(prep.device, non_blocking=True) if packing else None))
    return out


@dataclass
class StepOutput:
    """A step's figures, still on the device (read them with `read_step`)."""

    loss: torch.Tensor
    losses: dict
    logit_scale: torch.Tensor  # the exp(t) the forward used (under ZeRO-3 the parameter is a slice)
    grad_norm: torch.Tensor
    bad: torch.Tensor  # 1.0 where the step was skipped as non-finite (every rank alike)


def forward_backward(model, engine, loss_fn, inputs: list[tuple]) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """Gradients of the loss over all micro-batches, global negatives kept: with k > 1,
    the features of all micro-batches are computed without gradient first, then each
    micro-batch is recomputed with gradient against all the others (so the gradient
    equals that of one k-times-larger batch). Returns the loss, its named parts, the
    temperature exp(t) the forward used, and a device flag: 1.0 when any micro-batch's
    loss was non-finite."""
    model.train()
    nonfinite = None
    if len(inputs) == 1:
        with engine.autocast():
            out = engine.wrapped(*inputs[0])
            losses = loss_fn(**out)
            total = sum(losses.values())
        nonfinite = (~torch.isfinite(total.detach())).float()
        engine.backward(total)
    else:
        with torch.no_grad(), engine.autocast():
            cached = [model(*d) for d in inputs]
        for j, d in enumerate(inputs):
            ctx = engine.no_sync() if j < len(inputs) - 1 else contextlib.nullcontext()
            with ctx, engine.autocast():
                out = engine.wrapped(*d)
                img = torch.cat([c["image_features"] if i != j else out["image_features"]
                                 for i, c in enumerate(cached)])
                txt = torch.cat([c["text_features"] if i != j else out["text_features"]
                                 for i, c in enumerate(cached)])
                if j < len(inputs) - 1:
                    # the temperature's gradient must be counted once, not k times
                    out = dict(out, logit_scale=out["logit_scale"].detach())
                    if "logit_bias" in out:
                        out["logit_bias"] = out["logit_bias"].detach()
                losses = loss_fn(**dict(out, image_features=img, text_features=txt))
                total = sum(losses.values())
            flag = (~torch.isfinite(total.detach())).float()
            nonfinite = flag if nonfinite is None else torch.maximum(nonfinite, flag)
            engine.backward(total)
    return total, losses, out["logit_scale"].detach(), nonfinite


def snapshot_buffers(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, its value now) of every module buffer: BatchNorm statistics move in the
    forward pass, and a skipped (non-finite) step must not leave NaN in them (small)."""
    return [(b, b.detach().clone()) for b in model.buffers()]


def restore_buffers(buffers: Sequence[tuple[torch.Tensor, torch.Tensor]], bad) -> None:
    """Put back the saved buffers where `bad` (a device flag: no host read; or a bool)."""
    with torch.no_grad():
        if isinstance(bad, torch.Tensor):
            for b, saved in buffers:
                b.copy_(torch.where(bad > 0, saved, b))
        elif bad:
            for b, saved in buffers:
                b.copy_(saved)


def skip_flag(nonfinite_loss: torch.Tensor, grad_norm: Optional[torch.Tensor], engine) -> torch.Tensor:
    """1.0 when this step must be skipped: a non-finite loss, or a non-finite gradient
    norm that is not an overflow the engine handles itself (fp16 loss scaling); agreed
    by every rank (a device all-reduce, no host read)."""
    bad_grad = (torch.zeros((), device=nonfinite_loss.device) if grad_norm is None or engine.handles_overflow
                else (~torch.isfinite(grad_norm.detach())).float().to(nonfinite_loss.device))
    flags = torch.stack([nonfinite_loss.reshape(()), bad_grad])
    all_reduce_max(flags)
    return flags.max()


def optimizer_step(model, engine, nonfinite_loss: torch.Tensor, buffers: Sequence = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip, skip a non-finite step on every rank alike (restoring `buffers`), step the
    optimizer and the schedule (which advances on a skipped step too). Returns the
    gradient norm before clipping and the skip flag, both on the device. The host reads
    nothing where the engine skips on the device; an engine that needs the decision on
    the host (an unfused optimizer; DeepSpeed without its own overflow check) reads it
    once here."""
    gnorm = engine.grad_norm()
    bad = skip_flag(nonfinite_loss, gnorm, engine)
    if engine.skips_on_device:
        restore_buffers(buffers, bad)
        engine.step(skip=bad)
    else:
        skip = bool(bad.item())  # this engine needs the decision on the host: one read
        restore_buffers(buffers, skip)
        engine.step(skip=skip)
    if gnorm is None:
        gnorm = engine.last_grad_norm()
    model.clamp_logit_scale()
    return gnorm, bad


def train_step(model, engine, loss_fn, inputs: list[tuple]) -> StepOutput:
    """One optimizer step over the micro-batches `inputs` (see `device_inputs`); no host
    read where the engine skips on the device."""
    buffers = snapshot_buffers(model)
    total, losses, scale, nonfinite = forward_backward(model, engine, loss_fn, inputs)
    gnorm, bad = optimizer_step(model, engine, nonfinite, buffers)
    return StepOutput(total, losses, scale, gnorm, bad)


def read_step(out: StepOutput, counter: NonFiniteCounter, stop_requested: bool,
              lrs: dict) -> tuple[dict, bool]:
    """The step's one host read: its figures, the non-finite streak and the stop request
    (every rank stops at the same step: a max over ranks). Returns (metrics, stop)."""
    dev = out.loss.device
    stop = torch.tensor([float(stop_requested)], device=dev)
    all_reduce_max(stop)
    names = list(out.losses)
    values = torch.cat([counter.device_values(dev).to(dev), stop,
                        torch.stack([out.loss.detach().float(), *(out.losses[k].detach().float() for k in names),
                                     out.grad_norm.detach().float().to(dev),
                                     out.logit_scale.squeeze().float().to(dev)])]).tolist()  # the read
    streak, new, stop_v, values = values[0], values[1], values[2], values[3:]
    new = counter.fold(streak, new)
    if new:
        logger.warning("%d non-finite step(s) skipped (%d in a row now)", new, counter.streak)
    return ({"loss": values[0], **dict(zip(names, values[1:-2])),
             "lr": lrs.get("head", next(iter(lrs.values()))), "lrs": lrs,
             "grad_norm": values[-2], "logit_scale": values[-1]}, bool(stop_v))
