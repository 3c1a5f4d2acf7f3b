"""The run as a value: `build_run(cfg, dist)` returns every part a training run needs,
each derived setting decided once (`decide_settings`, logged once), each part owning its
state and its cadence. `Trainer` (trainer.py) takes a `Run` and only loops.

    Run.settings      the derived settings (precision, accumulation, memory format, ...)
    Run.data          shard lists, tokenizer, checked manifest
    Run.model/engine  the model inside DDP or DeepSpeed, with its optimizer and schedule
    Run.loss_fn       the contrastive loss
    Run.position      the stream, its tracker, its resume state (state.py)
    Run.checkpointer  when to save (`due`), what to save (its stateful parts), restore (checkpointer.py)
    Run.metrics       when to log (`due`), metrics.jsonl + TensorBoard, throughput (metrics.py)
    Run.evaluator     when to evaluate (`due`), recall, retrieval grids (evaluator.py)
"""
from __future__ import annotations

import copy
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from phoclip.data.manifest import text_positions
from phoclip.data.stream import ShardStream
from phoclip.lock import RunLock
from phoclip.models.checkpoints import TOKENIZER_DIR, list_checkpoints
from phoclip.models.factory import get_model_config
from phoclip_train.build import (RunData, auto_precision, build_data, build_engine, build_loader, build_loss,
                                 build_model, build_stream, wants_channels_last)
from phoclip_train.checkpointer import Checkpointer, RunCheckpointer
from phoclip_train.config import ConfigError, RunConfig, save_config
from phoclip_train.distributed import DistInfo
from phoclip_train.ds_config import decide_ds_precision
from phoclip_train.engine import Engine
from phoclip_train.evaluator import Evaluator, build_query_processor
from phoclip_train.metrics import MetricsWriter, RunLogger
from phoclip_train.plots import try_render_curves
from phoclip_train.state import DataPosition, NonFiniteCounter, Progress, RngState
from phoclip_train.step import InputPrep
from phoclip_train.trackers import check_trackers

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Settings:
    """Every setting derived from the config and the machine, decided once
    (`decide_settings`) and read from here by the parts that need it."""

    precision: str
    """bf16, fp16 or fp32: train.precision, with 'auto' decided (the DeepSpeed JSON's, else the device's best)."""
    accum_steps: int
    """Micro-batches per optimizer step (from data.global_batch_size when it is set)."""
    channels_last: bool
    """The image tower in channels_last memory format (train.channels_last, 'auto' decided)."""
    compile: str
    """torch.compile of the towers (train.compile)."""
    max_positions: int
    """The text tower's position limit."""
    sync_every: int
    """Steps between host reads where the engine skips non-finite steps on the device."""

    def describe(self, skips_on_device: bool) -> str:
        return (f"precision {self.precision}, channels_last {self.channels_last}, compile {self.compile}, "
                f"accum_steps {self.accum_steps}, max positions {self.max_positions}, host reads "
                + (f"every {self.sync_every} steps and on log/save/eval steps" if skips_on_device
                   else "every step (the skip decision is read on the host)"))

    def apply(self, cfg: RunConfig) -> RunConfig:
        """A copy of `cfg` carrying the decided values (what config.yaml and every
        checkpoint record, and what the builders read); the caller's config is left as given."""
        cfg = copy.deepcopy(cfg)
        cfg.train.precision, cfg.train.accum_steps = self.precision, self.accum_steps
        return cfg


def decide_settings(cfg: RunConfig, dist: DistInfo) -> Settings:
    """The derived settings, from the config, the files it names and the device alone,
    before anything is built: accumulation from data.global_batch_size; precision 'auto'
    (the DeepSpeed JSON's, else the device's best; a DeepSpeed JSON of another precision
    refused); the memory format; the text tower's position limit."""
    t = cfg.train
    if t.engine == "deepspeed" and t.deepspeed_config:
        precision = decide_ds_precision(t.deepspeed_config, t.precision)
    else:
        precision = auto_precision(dist.device) if t.precision == "auto" else t.precision
    return Settings(precision=precision, accum_steps=cfg.accum_steps_for(dist.world_size),
                    channels_last=wants_channels_last(cfg, dist.device), compile=t.compile,
                    max_positions=text_positions(get_model_config(cfg.model.name)), sync_every=t.sync_every)


@dataclass(kw_only=True)
class Run:
    """Every part of one training run (see `build_run`)."""

    cfg: RunConfig
    """The config with the derived settings applied (`Settings.apply`)."""
    dist: DistInfo
    settings: Settings
    data: RunData
    engine: Engine
    loss_fn: torch.nn.Module
    prep: InputPrep
    position: DataPosition
    progress: Progress
    nonfinite: NonFiniteCounter
    checkpointer: RunCheckpointer
    metrics: MetricsWriter
    evaluator: Evaluator
    lock: RunLock
    closed: bool = field(default=False, repr=False)

    @property
    def model(self):
        return self.engine.model

    @property
    def stream(self) -> ShardStream:
        return self.position.stream

    def loader(self) -> torch.utils.data.DataLoader:
        return build_loader(self.stream, self.cfg.data.workers, pin_memory=self.dist.device.type == "cuda")

    def export(self) -> Optional[Path]:
        """The final model as a plain folder (config + safetensors + tokenizer); collective
        (ZeRO-3 gathers the parameters' slices first)."""
        with self.engine.gathered():
            if not self.dist.is_main:
                return None
            curves = try_render_curves(self.cfg.run_dir)  # RUN_DIR/curves.png, also linked from the card
            folder = self.model.save_pretrained(Path(self.cfg.run_dir) / "model", tokenizer=self.data.tokenizer,
                                                training=self.cfg.to_dict(), data=self.data.manifest.summary(),
                                                evaluation=self.evaluator.last_val, curves=curves)
        if self.cfg.train.report_model:
            self.metrics.artifact(folder)  # after the gather: no rank waits on an upload
        return folder

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.metrics.close()
            self.lock.release()


def build_run(cfg: RunConfig, dist: DistInfo) -> Run:
    """Every part of a run, in order: the derived settings decided (a refusal there
    leaves no trace), the run folder claimed (lock, a fresh run never on old
    checkpoints), data checked before any model, seeds, model, engine, loss, stream,
    checkpointer, metrics, evaluator; then the newest checkpoint restored. A refusal on
    the way releases the run folder's lock."""
    cfg.validate(dist.world_size)
    check_trackers(cfg.train.report_to)  # a missing package refused now, not after the model is built
    settings = decide_settings(cfg, dist)
    cfg = settings.apply(cfg)
    run_dir = Path(cfg.run_dir)
    lock = RunLock(run_dir)
    try:
        if dist.is_main:
            claim_run_dir(lock, run_dir, cfg)
        return _build(cfg, settings, dist, lock)
    except BaseException:
        lock.release()
        raise


def claim_run_dir(lock: RunLock, run_dir: Path, cfg: RunConfig) -> None:
    """One job per run folder, and a fresh run never lands silently on an old one."""
    lock.acquire()
    old = list_checkpoints(run_dir)
    if old and not cfg.resume:
        if not cfg.train.overwrite:
            raise ConfigError(f"{run_dir} already holds checkpoints (newest {old[-1].name}): "
                              "continue it with --resume latest, use another run_dir, or start "
                              "over with train.overwrite=true (deletes them)")
        logger.warning("train.overwrite=true: deleting the %d checkpoints and the metrics of the "
                       "run in %s", len(old), run_dir)
        for c in old:
            shutil.rmtree(c)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)


def _build(cfg: RunConfig, settings: Settings, dist: DistInfo, lock: RunLock) -> Run:
    t, run_dir = cfg.train, Path(cfg.run_dir)
    t0 = time.time()
    # data first: bad shards are refused before any model is built
    logger.info("reading the shard catalogue (%s)", cfg.data.train_shards)
    data = build_data(cfg, dist)
    logger.info("data: %d train shards, %d samples; %d evaluation set(s)", len(data.train_urls),
                data.dataset_size, len(data.eval_sets))
    # the retrieval grids segment their queries as the shards were: refuse now, not
    # silently at the first validation, when that segmenter cannot be built
    query_proc = build_query_processor(cfg, data) if t.eval_queries and data.val_urls else None

    # the checkpoint to resume, verified (its DeepSpeed state summary too) before any model is built
    files = Checkpointer(run_dir, t.keep_last, dist.rank, dist.world_size)
    resume_from = files.resolve(cfg.resume)

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    logger.info("building the model %s", cfg.model.name)
    model = build_model(cfg, data.tokenizer, data.manifest)
    logger.info("building the %s engine%s", t.engine, " (DeepSpeed compiles its CPU Adam op once per "
                "machine: a few minutes the first time, cached in TORCH_EXTENSIONS_DIR)"
                if t.engine == "deepspeed" and dist.device.type == "cpu" else "")
    engine = build_engine(cfg, dist, model, channels_last=settings.channels_last)
    logger.info("settings: %s", settings.describe(engine.skips_on_device))
    loss_fn = build_loss(cfg, dist)
    stream = build_stream(cfg, dist, data, engine.model.pad_id)
    prep = InputPrep(device=dist.device, image_size=cfg.data.image_size, input_dtype=engine.input_dtype,
                     channels_last=settings.channels_last, trim_padding=cfg.data.trim_padding,
                     pack_captions=cfg.data.pack_captions)
    position = DataPosition(stream, data.train_urls, cfg, dist)
    progress, nonfinite = Progress(), NonFiniteCounter()
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, str(run_dir / "config.yaml"))
    metrics = MetricsWriter(RunLogger(run_dir, dist.is_main, t.report_to, cfg.to_dict(), resume=cfg.resume is not None),
                            t.log_every, t.max_steps)
    evaluator = Evaluator(cfg, dist, data, engine, metrics, settings.precision, query_proc)

    def meta() -> dict:
        # the model's resolved config and the tokenizer travel with every checkpoint, so
        # exporting one needs neither the hub nor the files the run started from
        return {"config": cfg.to_dict(), "model_config": engine.model.config,
                "data": data.manifest.summary(), "evaluation": evaluator.last_val}

    checkpointer = RunCheckpointer(files, t.save_every, engine, progress, nonfinite, position, RngState(), meta,
                                   extra=lambda d: data.tokenizer.save_pretrained(str(d / TOKENIZER_DIR)))
    run = Run(cfg=cfg, dist=dist, settings=settings, data=data, engine=engine, loss_fn=loss_fn, prep=prep,
              position=position, progress=progress, nonfinite=nonfinite, checkpointer=checkpointer,
              metrics=metrics, evaluator=evaluator, lock=lock)
    try:
        torch.manual_seed(t.seed + 1000 * dist.rank)  # dropout differs per rank
        checkpointer.restore(resume_from, cfg.resume)
    except BaseException:
        metrics.close()
        raise
    logger.info("built in %.0f s; training to step %d", time.time() - t0, t.max_steps)
    return run
