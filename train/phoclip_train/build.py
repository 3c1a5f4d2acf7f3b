"""Build, then loop: every part a run needs, built once from its config.

    build_data     shard lists, tokenizer, manifest checks (refused before any model)
    build_model    the architecture, text-processing record, freezing, checkpointing
    build_optimizer  AdamW (per-module learning rates) + warmup/cosine schedule, shared
                   by both engines
    build_engine   memory format, torch.compile, then DDP or DeepSpeed around the model
    build_stream   the training stream of this rank; build_loader its DataLoader (the
                   workers' signal policy lives here, not in the library)
    build_loss     the contrastive loss over the global batch

`build_run` (run.py) calls them in order and returns the run as a value; `Trainer`
(trainer.py) receives it and only loops; `export.py` rebuilds a model from a checkpoint
with `build_model` and nothing else of training.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch

import phoclip
from phoclip.data.stream import ShardStream, StreamConfig
from phoclip.models.loss import create_loss
from phoclip.models.factory import get_model_config
from phoclip.data.manifest import Manifest
from phoclip.data.catalog import check_shards_fit, count_samples, expand_urls
from phoclip.data.text import load_tokenizer
from phoclip_train.config import ConfigError, OptimConfig, RunConfig
from phoclip_train.distributed import DistInfo
from phoclip_train.ds_engine import DeepSpeedEngine
from phoclip_train.engine import DDPEngine, Engine

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RunData:
    """What the run reads: shard lists, their checked manifest, the tokenizer."""

    train_urls: list
    train_weights: list
    eval_sets: dict  # name ("val", "val_NAME") -> shard urls
    tokenizer: object
    manifest: Manifest
    dataset_size: int

    @property
    def val_urls(self) -> list:
        return self.eval_sets.get("val", [])


def build_data(cfg: RunConfig, dist: DistInfo) -> RunData:
    """Expand the shard patterns and refuse shards that do not fit the model's tokenizer
    (fingerprint, pad id, max length) before anything is built."""
    d = cfg.data
    train_urls, weights = expand_urls(d.train_shards, d.train_weights, flag="data.train_shards")
    val_urls = expand_urls(d.val_shards, split="val", flag="data.val_shards")[0] if d.val_shards else []
    # named evaluation sets beside the validation shards, each logged on its own
    eval_sets = {"val": val_urls} if val_urls else {}
    for name, pattern in cfg.train.eval_sets.items():
        eval_sets[f"val_{name}"] = expand_urls(str(pattern), split="val", flag=f"train.eval_sets.{name}")[0]
    if not d.resampled and len(train_urls) < dist.world_size * max(1, d.workers):
        raise ConfigError(f"{len(train_urls)} train shards cannot feed {dist.world_size} "
                          f"ranks x {max(1, d.workers)} workers without resampling; "
                          "set data.resampled=true, lower data.workers, or make smaller shards")
    arch = get_model_config(cfg.model.name)
    tok_name = cfg.model.tokenizer or arch["text"].get("tokenizer")
    if not tok_name:
        raise ConfigError(f"model {cfg.model.name} names no tokenizer: set model.tokenizer=DIR")
    tokenizer = load_tokenizer(tok_name)
    manifest = check_shards_fit(train_urls + [u for us in eval_sets.values() for u in us], tokenizer, arch,
                                tok_name, d.manifest)
    return RunData(train_urls=train_urls, train_weights=weights, eval_sets=eval_sets, tokenizer=tokenizer,
                   manifest=manifest, dataset_size=count_samples(train_urls, d.manifest))


def build_model(cfg: RunConfig, tokenizer, manifest: Optional[Manifest] = None):
    """The model of the config; an inline (untrained) text tower gets the tokenizer's
    vocab; `manifest` records how the captions were made (segmenter, max length)."""
    arch = get_model_config(cfg.model.name)
    overrides = dict(cfg.model.overrides)
    if arch["text"].get("hf_model") is None and not overrides.get("text", {}).get("hf_model"):
        text = dict(overrides.get("text", {}))
        hc = dict(text.get("hf_config", {}))
        hc.setdefault("vocab_size", len(tokenizer))
        text["hf_config"] = hc
        overrides["text"] = text
    # the size the model sees in training is the size evaluation and search must use
    overrides["vision"] = dict(overrides.get("vision", {}), image_size=cfg.data.image_size)
    if cfg.train.loss == "siglip":
        overrides.setdefault("logit_bias", {"init": -10.0})
        overrides.setdefault("logit_scale", {"init": math.log(10.0)})
    model = phoclip.create_model(cfg.model.name, **overrides)
    if cfg.model.tokenizer:
        model.config["text"]["tokenizer"] = cfg.model.tokenizer
    if manifest is not None:
        record_text_processing(model, manifest)
    if cfg.model.lock_image:
        model.lock_image_tower()
    if cfg.model.lock_text:
        model.lock_text_tower(cfg.model.unlocked_text_layers)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def record_text_processing(model, manifest: Manifest) -> None:
    """Write into the model's config how its captions were made (segmenter name and
    version, max length), so every exported folder tells search how to prepare queries."""
    model.config["text"]["segmenter"] = manifest.segmenter.name
    model.config["text"]["segmenter_version"] = manifest.segmenter.version
    model.config["text"]["max_length"] = manifest.tokenizer.max_length


def lr_lambda(warmup: int, total: int, schedule: str, min_ratio: float):
    """Linear warmup to 1, then cosine to `min_ratio` (or constant)."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def build_optimizer(model, optim: OptimConfig, max_steps: int, fused: Optional[bool] = True):
    """AdamW over the model's groups (image tower, text tower, heads; decay / no decay)
    and the warmup + cosine schedule: the one optimizer both engines step."""
    groups = model.param_groups(optim.lr_image, optim.lr_text, optim.lr_head, optim.weight_decay)
    opt = torch.optim.AdamW(groups, betas=tuple(optim.betas), eps=optim.eps, fused=fused)
    lr_fn = lr_lambda(optim.warmup_steps, max_steps, optim.schedule, optim.min_lr_ratio)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_fn)


def wants_channels_last(cfg: RunConfig, device: torch.device) -> bool:
    """train.channels_last, 'auto' decided: on CUDA under DDP."""
    cl = str(cfg.train.channels_last).lower()
    return cl == "true" or (cl == "auto" and device.type == "cuda" and cfg.train.engine == "ddp")


def build_engine(cfg: RunConfig, dist: DistInfo, model, channels_last: bool = False) -> Engine:
    """Memory format (`channels_last`, as the run decided it) and torch.compile first
    (before DDP wraps the model, so its buckets match the strides), then the engine with
    its optimizer and schedule."""
    t = cfg.train
    if channels_last:
        model.visual.to(memory_format=torch.channels_last)
    if t.compile != "off":
        compile_towers(model, t.compile)
    if t.engine == "deepspeed":
        # DeepSpeed steps the optimizer itself: torch's default (unfused) implementation
        opt, sched = build_optimizer(model, cfg.optim, t.max_steps, fused=None)
        return DeepSpeedEngine(model, opt, sched, cfg=cfg, device=dist.device, world_size=dist.world_size)
    model.to(dist.device)
    # fused: one kernel for all parameters (measured in bench/RESULTS.md), and it takes
    # the skip decision as a device tensor (no host sync)
    opt, sched = build_optimizer(model, cfg.optim, t.max_steps, fused=True)
    return DDPEngine(model, opt, sched, precision=t.precision, grad_clip=t.grad_clip,
                     device=dist.device, world_size=dist.world_size, rank=dist.rank)


def build_stream(cfg: RunConfig, dist: DistInfo, data: RunData, pad_id: int) -> ShardStream:
    """This rank's training stream (see `phoclip.data.stream.ShardStream`)."""
    d = cfg.data
    return ShardStream(StreamConfig(
        urls=data.train_urls, weights=data.train_weights, batch_size=d.batch_size, image_size=d.image_size,
        seed=cfg.train.seed, rank=dist.rank, world_size=dist.world_size, resampled=d.resampled,
        shuffle_buffer=d.shuffle_buffer, ids_width=data.manifest.tokenizer.max_length,
        vocab_size=len(data.tokenizer), length_buckets=d.length_buckets, pad_id=pad_id, resize_on=d.resize_on,
        manifest=d.manifest))


def _worker_init(_: int) -> None:
    # a preempted job signals the whole process group: the workers leave the clean
    # shutdown to the main process, and die with it (Linux parent-death signal), even
    # when blocked in a read that never returns
    import signal
    import sys

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform == "linux":
        try:
            import ctypes

            ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def build_loader(stream: ShardStream, num_workers: int, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over an already-batched stream (pin_memory for asynchronous copies to a GPU)."""
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                       worker_init_fn=_worker_init if num_workers else None,
                                       persistent_workers=False, prefetch_factor=2 if num_workers else None)


def close_loader(it) -> None:
    """Stop a DataLoader iterator's workers now. Left to garbage collection, an iterator
    still referenced by an exception's traceback keeps its workers, which ignore SIGTERM
    (see `_worker_init`), and the interpreter's exit then waits on them for ever."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def build_loss(cfg: RunConfig, dist: DistInfo) -> torch.nn.Module:
    """The loss; it takes the model's output as is (`loss(**model_out)`)."""
    return create_loss(cfg.train.loss, dist.rank, dist.world_size, cfg.train.local_loss)


def compile_towers(model, mode: str) -> None:
    """torch.compile the image and text towers in place (`nn.Module.compile`: the
    state-dict keys, and so checkpoints and exports, stay those of the eager model)."""
    kw = {} if mode == "default" else {"mode": mode}
    model.visual.compile(**kw)
    model.text.compile(**kw)
    logger.info("train.compile=%s: the towers compile at their first forward (and once more "
                "with a dynamic caption length at the first other length)", mode)


def compile_stats() -> dict:
    """How many graphs torch.compile built so far, and how many recompiles it made."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "recompiles": int(sum(v for k, v in counters["recompiles"].items()))}


def auto_precision(device: torch.device) -> str:
    """bf16 where the device computes it natively, else fp16 (CUDA) or fp32 (CPU)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
