"""Typed run config, resolved as defaults → YAML file → `key=value` overrides.

Each field's docstring-comment says what it is (what --help and --print-config show); each
value is checked against the field's declared type as it is set (config_engine: pydantic,
strict, so a refusal is one line naming the key). `validate()` refuses impossible settings
before any work is done, and only checks: settings derived from the config and the machine
(accumulation from the global batch, precision 'auto') are decided once by the run builder.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional, Sequence

import yaml
from pydantic import Strict

from phoclip.fileio import atomic_write_text
from phoclip.models.pretrained import MAX_IMAGE_SIZE
from phoclip_train.config_engine import ConfigError, apply_override, apply_tree, check_types, load_yaml

# Upper bounds of the sizes a run config sets: far above any real run, low enough that a
# stray run of zeros is refused naming its key instead of failing in a DataLoader worker or
# filling the machine's memory. The image size is the model config's own cap.
SIZE_CAPS = {"data.batch_size": 1 << 20, "data.global_batch_size": 1 << 30, "data.workers": 256,
             "data.image_size": MAX_IMAGE_SIZE, "data.shuffle_buffer": 1 << 20, "data.length_buckets": 1024,
             "data.trim_padding": 4096, "train.accum_steps": 1 << 16}


@dataclass
class ModelConfig:
    name: str = "phobert-large-rn50"
    """Architecture config (phoclip.list_models()) or a path to a JSON config."""
    tokenizer: Optional[str] = None
    """Tokenizer hub name or folder; default: the architecture's."""
    overrides: dict = field(default_factory=dict)
    """Deep-merged into the architecture config, e.g. {vision: {pretrained: false}}."""
    lock_image: bool = False
    """Freeze the image tower (BatchNorm statistics too)."""
    lock_text: bool = False
    """Freeze the text tower except its last `unlocked_text_layers` layers."""
    unlocked_text_layers: int = 0
    """With lock_text: how many of the text tower's last layers still train."""
    grad_checkpointing: bool = False
    """Recompute the text tower's activations in the backward pass (saves memory)."""


@dataclass
class DataConfig:
    train_shards: str = ""
    """Brace pattern(s) of training shards, several sources joined with '::'."""
    train_weights: Optional[str] = None
    """Sampling weight per source, '1::2' (resampled mode)."""
    val_shards: Optional[str] = None
    """Brace pattern of validation shards (recall at train.eval_every and at the end)."""
    manifest: Optional[str] = None
    """manifest.json of the shards when it is not beside them, as a path or URL (needed for
    `pipe:` shards); sizes.json is read beside it. Shards may be local paths, `pipe:CMD`,
    http(s):// or fsspec URLs (s3://, gs://, with its fsspec package installed)."""
    batch_size: int = 64
    """Per rank, per micro-step."""
    global_batch_size: int = 0
    """Samples per optimizer step over all ranks. When set, train.accum_steps is derived
    from it (global / (batch_size x world size), which must divide), so a run resumed on
    another number of ranks keeps its global batch and so its learning-rate schedule's
    meaning. 0: the global batch is batch_size x accum_steps x world size."""
    workers: int = 2
    """DataLoader worker processes per rank."""
    resampled: bool = True
    """Draw shards with replacement (default for training); false: split shards by rank and worker."""
    shuffle_buffer: int = 1000
    """Samples each stream holds to shuffle within (0 or 1: shard order)."""
    image_size: int = 224
    """Training crop size in pixels; the exported model records it for evaluation and search."""
    trim_padding: int = 8
    """Cut each batch's token ids after its longest caption, rounded up to a multiple of
    this (8: tensor-core friendly, and few distinct shapes for train.compile); exact, the
    same loss and gradients as the padded batch. 0: keep every row at the shards' max length."""
    pack_captions: bool = True
    """Pack each batch's captions end to end into rows as wide as its longest caption
    (on the CPU ids, before the copy), so the text tower computes about the real tokens
    (the fill measured in bench/RESULTS.md) in one forward, instead of every caption
    at the batch's longest. Exact: a block-diagonal attention mask and the captions' own
    position ids give every caption's embedding, the loss over the whole batch (the same
    negatives) and every gradient of the padded batch. In training and evaluation, with
    DDP, DeepSpeed (ZeRO-3 too: still one forward) and train.compile. Text towers that
    number positions otherwise (not BERT/RoBERTa) run the trimmed batch. false: off."""
    length_buckets: int = 0
    """Group samples of similar caption length into the same batch, so trimming cuts more:
    the stream then fills a pool of `length_buckets` x batch_size decoded samples and
    emits the batch of the fullest length bucket. It changes which samples meet as
    negatives (batches are less random: captions of one batch have similar lengths)
    and delays each sample by up to the pool size. 0: off (plain shuffled batches)."""
    resize_on: Literal["worker", "device"] = "worker"
    """Where the training crop is resized: worker (DataLoader workers ship the finished
    crop) or device (workers only decode; the batch of decoded images and crop boxes is
    resized on the training device, antialiased bilinear, within ~1 grey level of the
    worker's result; for GPUs whose data workers are CPU-bound)."""


@dataclass
class OptimConfig:
    lr_image: float = 1e-4
    """Peak learning rate of the image tower."""
    lr_text: float = 1e-5
    """Peak learning rate of the text tower (pretrained PhoBERT wants a small one)."""
    lr_head: float = 1e-3
    """Peak learning rate of the projection heads and the temperature."""
    weight_decay: float = 0.2
    """AdamW decoupled weight decay (not on biases, norms, gains or the temperature)."""
    betas: Annotated[tuple, Strict(False)] = (0.9, 0.98)
    """AdamW betas (a YAML list, [0.9, 0.98])."""
    eps: float = 1e-6
    """AdamW epsilon."""
    warmup_steps: int = 100
    """Linear warmup from 0 to the peak learning rates."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """cosine or constant (after the linear warmup)."""
    min_lr_ratio: float = 0.0
    """Where the cosine ends, as a fraction of the peak."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps of the whole run (the schedule's length)."""
    precision: Literal["bf16", "fp16", "fp32", "auto"] = "bf16"
    """bf16 (autocast), fp16 (autocast + gradient scaler), fp32, or auto: bf16 where the
    device computes it natively (CUDA with bf16; CPUs with AVX512-BF16/AMX), else fp16 on
    CUDA and fp32 on CPU (bf16 autocast on a CPU without it is much slower than fp32:
    bench/RESULTS.md)."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping (the norm is still logged)."""
    accum_steps: int = 1
    """Micro-batches per step; features are cached so the negatives stay global."""
    loss: Literal["clip", "siglip"] = "clip"
    """clip or siglip."""
    local_loss: bool = True
    """Memory-light loss form (local rows x gathered columns)."""
    seed: int = 0
    """Seeds the initial weights, the data order and every augmentation."""
    log_every: int = 10
    """Steps between metric lines (metrics.jsonl, TensorBoard, the log)."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "none"]] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers that get the logged scalars (rank 0), as Hugging Face's report_to:
    tensorboard (RUN_DIR/tensorboard/), wandb (its WANDB_* variables; WANDB_MODE=offline
    logs locally), mlflow (MLFLOW_TRACKING_URI; unset: a file store in RUN_DIR/mlruns).
    wandb and mlflow also get the config and, at the end, the exported model; they need
    pip install 'phoclip[trackers]'. [none] (or []): metrics.jsonl only. One name alone
    works too: train.report_to=wandb."""
    report_model: bool = True
    """Send the exported model to wandb/mlflow as an artifact at the end of the run
    (phobert-large-rn50 is over a GB per run: false keeps only the metrics and config there)."""
    eval_every: int = 0
    """Validation every N steps (0: only at the end when val_shards is set)."""
    eval_queries: list = field(default_factory=list)
    """Vietnamese queries whose top-5 validation images are logged to TensorBoard at each validation."""
    eval_sets: dict = field(default_factory=dict)
    """More evaluation sets, {name: shard pattern}, e.g. {ktvic_test: 'shards/ktvic/val-{000000..000003}.tar'}:
    each is evaluated with the validation shards and logged on its own (kind/prefix val_NAME)."""
    vncorenlp_dir: str = ""
    """VnCoreNLP model folder, to segment `eval_queries` as VnCoreNLP shards were (default: $VNCORENLP_DIR)."""
    save_every: int = 500
    """Steps between checkpoints (and one at the end, and on SIGTERM)."""
    keep_last: int = 3
    """Checkpoints kept (older ones are deleted once a newer one is complete)."""
    max_nonfinite: int = 5
    """Stop after this many consecutive non-finite steps."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto (cuda if available), cpu or cuda."""
    channels_last: Literal["auto", "true", "false"] = "auto"
    """Image tower and images in NHWC memory format, which cuDNN's bf16/fp16 convolutions
    use natively: auto (on CUDA with the DDP engine; the speed-up measured in
    bench/RESULTS.md), true or false."""
    engine: Literal["ddp", "deepspeed"] = "ddp"
    """ddp or deepspeed."""
    overwrite: bool = False
    """Start afresh in a run_dir that already holds checkpoints, deleting them (without
    it, and without --resume, such a run_dir is refused)."""
    deepspeed_config: Optional[str] = None
    """The DeepSpeed JSON (launch/deepspeed/) when train.engine=deepspeed."""
    compile: Literal["off", "default", "max-autotune"] = "off"
    """torch.compile the image and text towers: off, default or max-autotune (the DDP
    engine only; not built for DeepSpeed runs). The text tower's
    sequence length varies with data.trim_padding: it is compiled once static, then
    once with a dynamic length (automatic dynamic shapes) - no recompile per length."""
    sync_every: int = 10
    """Steps between the host's reads of the device-side step flags (non-finite streak,
    stop signal); logging, saving and evaluation steps read them too. Between reads a
    step issues no host sync: a non-finite step is skipped on the device (the DDP
    engine's fused AdamW). 1: read every step. DeepSpeed: no read of ours where DeepSpeed
    checks overflow itself (fp16; a "bf16" block under ZeRO-1/2), one per step elsewhere
    (its skip cannot be decided on the device); see bench/RESULTS.md."""


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    """The run's folder: config.yaml, checkpoints/, metrics.jsonl, tensorboard/, model/."""
    resume: Optional[str] = None
    """'latest', a checkpoint folder, or none."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The architecture, its tokenizer and what trains."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards, batching, the stream and its images."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop: steps, precision, engine, logging, evaluation, checkpoints."""

    def accum_steps_for(self, world_size: int) -> int:
        """The micro-batches per optimizer step on `world_size` ranks: derived from
        data.global_batch_size when it is set and divides evenly (`validate` refuses it
        otherwise), else train.accum_steps. A derived setting: the run builder applies it;
        nothing here changes the config."""
        d = self.data
        per_step = d.batch_size * world_size
        if d.global_batch_size > 0 and per_step > 0 and d.global_batch_size % per_step == 0:
            return d.global_batch_size // per_step
        return self.train.accum_steps

    def validate(self, world_size: int = 1) -> None:
        """Refuse impossible combinations; only checks, never changes a value (derived
        settings, e.g. `accum_steps_for`, precision 'auto', are decided by the run
        builder). Each field's type (its `Literal` choices too) is checked as it is set, and
        again here for fields set in code."""
        t, d = self.train, self.data
        check_types(self)
        if t.compile != "off" and t.engine == "deepspeed":
            raise ConfigError("train.compile works with train.engine=ddp only (not built for "
                              "DeepSpeed); set train.compile=off")
        for k in ("trim_padding", "length_buckets"):
            if getattr(d, k) < 0:
                raise ConfigError(f"data.{k} must be >= 0, not {getattr(d, k)}")
        if t.sync_every < 1:
            raise ConfigError(f"train.sync_every must be >= 1, not {t.sync_every}")
        for k in ("max_steps", "accum_steps", "log_every", "save_every", "keep_last", "max_nonfinite"):
            if getattr(t, k) < 1:
                raise ConfigError(f"train.{k} must be >= 1, not {getattr(t, k)}")
        if d.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, not {d.batch_size}")
        if d.batch_size * world_size < 2:
            raise ConfigError("a contrastive loss needs at least 2 samples in the global batch; "
                              "raise data.batch_size")
        if d.global_batch_size:
            per_step = d.batch_size * world_size
            if d.global_batch_size < 0 or d.global_batch_size % per_step:
                raise ConfigError(f"data.global_batch_size={d.global_batch_size} is not a multiple of "
                                  f"data.batch_size x ranks = {d.batch_size} x {world_size}")
        for key, cap in SIZE_CAPS.items():
            group, name = key.split(".")
            v = getattr(getattr(self, group), name)
            if v > cap:
                raise ConfigError(f"{key} must be at most {cap:,}, not {v:,}")
        if not d.train_shards:
            raise ConfigError("data.train_shards is empty: pass data.train_shards=PATTERN")
        if self.optim.warmup_steps < 0:
            raise ConfigError("optim.warmup_steps must be >= 0")
        if d.workers < 0:
            raise ConfigError("data.workers must be >= 0")
        if d.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer must be >= 0, not {d.shuffle_buffer}")
        if d.image_size < 8:
            raise ConfigError(f"data.image_size must be >= 8, not {d.image_size}")
        if not math.isfinite(t.grad_clip) or t.grad_clip < 0:
            raise ConfigError(f"train.grad_clip must be >= 0 (0 disables clipping), not {t.grad_clip}")
        if t.eval_every < 0:
            raise ConfigError(f"train.eval_every must be >= 0, not {t.eval_every}")
        o = self.optim
        for k in ("lr_image", "lr_text", "lr_head", "weight_decay", "min_lr_ratio"):
            v = getattr(o, k)
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"optim.{k} must be a finite number >= 0, not {v}")
        if o.min_lr_ratio > 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], not {o.min_lr_ratio}")
        if not (math.isfinite(o.eps) and o.eps > 0):
            raise ConfigError(f"optim.eps must be a finite number > 0, not {o.eps}")
        if (len(o.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                         and 0 <= b < 1 for b in o.betas)):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), not {o.betas}")
        if not all(isinstance(q, str) for q in t.eval_queries):
            raise ConfigError(f"train.eval_queries must be a list of Vietnamese queries, not {t.eval_queries}")
        if "none" in t.report_to and len(t.report_to) > 1:
            raise ConfigError(f"train.report_to={t.report_to}: 'none' means no tracker; drop it or the others")
        if self.model.lock_text and self.model.unlocked_text_layers < 0:
            raise ConfigError("model.unlocked_text_layers must be >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)



def resolve_config(config_file: Optional[str], overrides: Sequence[str] = (),
                   sources: Optional[dict] = None) -> RunConfig:
    """defaults → YAML file → `a.b=value` overrides (values parsed as YAML). With
    `sources` (a dict), where each value set came from: {dotted key: "YAML file PATH" or
    "override"} (keys not in it kept their default)."""
    cfg = RunConfig()
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config file {config_file} does not exist")
        with open(config_file, encoding="utf-8") as f:
            saved = f.readline() == SAVED_HEADER
            f.seek(0)
            tree = load_yaml(f, f"config file {config_file}") or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {config_file}: expected a mapping of config groups "
                              f"(data:, model:, train:, ...), got {type(tree).__name__}")
        # a run's saved config.yaml holds every field: where each first came from is not in it
        apply_tree(cfg, tree, sources=sources, origin=f"saved run config {config_file}, as that run resolved it"
                   if saved else f"YAML file {config_file}")
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not key=value (e.g. train.max_steps=20)")
        k, v = o.split("=", 1)
        apply_override(cfg, k.strip(), v)
        if sources is not None:
            sources[k.strip()] = "override"
    return cfg


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string under it in the class body) of a config
    dataclass, on one line: what --help and --print-config show."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)}


def config_groups() -> list[tuple[str, str]]:
    """(name, what it holds) of each top-level field of RunConfig, groups and plain fields."""
    docs = field_docs(RunConfig)
    return [(f.name, docs.get(f.name, "")) for f in dataclasses.fields(RunConfig)]


def describe_config(cfg: RunConfig, sources: Optional[dict] = None) -> str:
    """The resolved config, one field per entry: `key = value`, where it came from
    (default, YAML file, override) and the default, then the field's doc."""
    sources = sources or {}
    lines: list[str] = []

    def walk(obj: Any, default: Any, prefix: str) -> None:
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            key, v = prefix + f.name, getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                lines.append(f"\n[{key}] {docs.get(f.name, '')}")
                walk(v, getattr(default, f.name), key + ".")
                continue
            src = sources.get(key) or next((s for k, s in sources.items() if k.startswith(key + ".")), "default")
            d = getattr(default, f.name)
            shown = lambda x: yaml.safe_dump(_plain(x), default_flow_style=True, allow_unicode=True, width=1 << 16
                                             ).strip().removesuffix("...").strip()
            origin = "default" if src == "default" else f"{src}; default {shown(d)}"
            lines.append(f"{key} = {shown(v)}    ({origin})")
            if docs.get(f.name):
                lines.append(f"    {docs[f.name]}")

    walk(cfg, RunConfig(), "")
    return "\n".join(lines).lstrip("\n")


SAVED_HEADER = "# PhoCLIP run config saved by its run: every field as the run resolved it\n"


def save_config(cfg: RunConfig, path: str) -> None:
    """The resolved config as YAML, marked as a run's own (--print-config then says so)."""
    atomic_write_text(path, SAVED_HEADER + yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False, allow_unicode=True))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
