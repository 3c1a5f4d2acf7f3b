"""The run as a value: `build_run(cfg, dist)` returns every part a training run needs,
each derived setting decided once (and logged once), each part owning its state and its
cadence. `Trainer` (trainer.py) takes a `Run` and only loops.

    Run.data          shard lists, tokenizer, checked manifest
    Run.model/engine  the model inside DDP or DeepSpeed, with its optimizer and schedule
    Run.loss_fn       the contrastive loss
    Run.position      the stream, its tracker, its resume state (also on another layout)
    Run.checkpointer  when to save (`due`), what to save (its stateful parts), restore
    Run.metrics       when to log (`due`), metrics.jsonl + TensorBoard, throughput
    Run.evaluator     when to evaluate (`due`), recall, retrieval grids
"""
from __future__ import annotations

import copy
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

import numpy as np
import torch

from phoclip.data.stream import ShardStream, StreamLayout, StreamTracker, relayout
from phoclip.models.factory import get_model_config
from phoclip.evaluation.retrieval import evaluate_shards
from phoclip.data.manifest import text_positions
from phoclip.lock import RunLock
from phoclip.models.checkpoints import TOKENIZER_DIR, list_checkpoints
from phoclip_train.build import (RunData, auto_precision, build_data, build_engine, build_loader, build_loss,
                                 build_model, build_stream, wants_channels_last)
from phoclip_train.checkpointer import Checkpointer, rng_state, set_rng_state
from phoclip_train.config import ConfigError, RunConfig, save_config
from phoclip_train.distributed import DistInfo
from phoclip_train.ds_config import decide_ds_precision
from phoclip_train.engine import Engine, precision_dtype
from phoclip_train.metrics import RunLogger
from phoclip_train.step import InputPrep, NonFiniteCounter

logger = logging.getLogger(__name__)


class Stateful(Protocol):
    """torchtitan's shape: what a checkpoint saves and restores."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Progress:
    """The step counter and the samples seen (global: saved in the checkpoint's meta)."""

    step: int = 0
    samples_seen: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])


class RngState:
    """Python, numpy, torch (and CUDA) generators of this rank."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)


@dataclass
class Settings:
    """Every setting derived from the config and the machine, decided once."""

    precision: str
    channels_last: bool
    compile: str
    accum_steps: int
    max_positions: int
    skips_on_device: bool
    sync_every: int

    def describe(self) -> str:
        return (f"precision {self.precision}, channels_last {self.channels_last}, compile {self.compile}, "
                f"accum_steps {self.accum_steps}, max positions {self.max_positions}, host reads "
                + (f"every {self.sync_every} steps and on log/save/eval steps" if self.skips_on_device
                   else "every step (the skip decision is read on the host)"))


class DataPosition:
    """Where this rank's stream is: its tracker's position and skipped counts, and the
    stream's layout. Restored exactly on the same ranks x workers; on another layout
    the data order continues (`phoclip.data.stream.relayout`) rather than restarting."""

    def __init__(self, stream: ShardStream, urls: list, cfg: RunConfig, dist: DistInfo) -> None:
        self.stream, self.urls, self.cfg, self.dist = stream, urls, cfg, dist
        self.tracker = StreamTracker()
        self.workers = max(1, cfg.data.workers)  # logical streams per rank

    def update(self, batch: dict) -> None:
        self.tracker.update(batch)

    def state_dict(self) -> dict:
        return {"data": self.tracker.state_dict(), "layout": self.stream.cfg.layout.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["data"])
        self.stream.load_state_dict(state["data"])
        self.stream.cfg.layout = StreamLayout.from_state(state.get("layout"))

    def same_layout(self, old_world: int, old_workers: int) -> bool:
        return (old_world, old_workers) == (self.dist.world_size, self.workers)

    def continue_on_new_layout(self, ckpt: Checkpointer, path: Path, meta: dict, old_world: int,
                               old_workers: int, step: int) -> None:
        """A checkpoint of another number of ranks or workers: continue its data order
        rather than restart it, and say what changes."""
        old_states = {}
        for r in range(old_world):
            st = ckpt.load_rank_state(path, r)
            old_states[r] = st["data"] if st else {}
        first = ckpt.load_rank_state(path, 0) or {}
        cfg = self.cfg
        layout = relayout(self.urls, cfg.train.seed, cfg.data.resampled, StreamLayout.from_state(first.get("layout")),
                          old_world, old_workers, old_states, salt=step)
        self.stream.cfg.layout = layout
        if self.dist.is_main:  # the logged skipped-sample count carries over (kept as stream -1)
            self.tracker.skipped[-1] = dict(sum((Counter(c) for st in old_states.values()
                                                 for c in st.get("skipped", {}).values()), Counter()))
        old = meta.get("config", {})
        old_global = (int(old.get("data", {}).get("batch_size", 0))
                      * int(old.get("train", {}).get("accum_steps", 1)) * old_world)
        new_global = cfg.data.batch_size * cfg.train.accum_steps * self.dist.world_size
        where = ("fresh draws (resampled)" if cfg.data.resampled else
                 f"epoch {layout.start_epoch}, less the {len(layout.done.get(layout.start_epoch, []))} "
                 f"of {len(self.urls)} shards already read")
        logger.warning("checkpoint %s was written by %d ranks x %d workers, this run has %d x %d: the "
                       "data order continues with %s; global batch %d -> %d%s; the learning-rate "
                       "schedule continues at step %d", path, old_world, old_workers,
                       self.dist.world_size, self.workers, where, old_global, new_global,
                       "" if old_global == new_global else
                       " (set data.global_batch_size to keep it)", step)


class RunCheckpointer:
    """Saves and restores the run's stateful parts: the engine (its own files), the
    progress and non-finite count (meta.json), this rank's data position and RNG
    (rankNNNNN.pt: the same keys as ever, so older checkpoints resume). `due(step)` is
    its cadence (train.save_every)."""

    def __init__(self, files: Checkpointer, save_every: int, engine: Engine, progress: Progress,
                 nonfinite: NonFiniteCounter, position: DataPosition, rng: RngState,
                 meta: Callable[[], dict], extra: Optional[Callable[[Path], None]] = None) -> None:
        self.files, self.save_every = files, save_every
        self.engine, self.progress, self.nonfinite, self.position, self.rng = engine, progress, nonfinite, position, rng
        self.meta, self.extra = meta, extra
        self._saved: Optional[tuple] = None  # (step, meta version) of the newest save

    def due(self, step: int) -> bool:
        return step % self.save_every == 0

    def latest(self) -> Optional[Path]:
        return self.files.latest()

    def save(self, version: object = None) -> None:
        """Checkpoint this step (collective), once: the same step is saved again only
        when `version` (e.g. the newest evaluation, which goes in meta) changed."""
        step = self.progress.step
        if self._saved == (step, version):
            return
        self._saved = (step, version)
        rank_state = {**self.position.state_dict(), "rng": self.rng.state_dict()}
        meta = {"samples_seen": self.progress.samples_seen, **self.nonfinite.state_dict(), **self.meta()}
        self.files.save(step, self.engine, rank_state, meta, extra=self.extra)

    def restore(self, resume: Optional[str]) -> Optional[Path]:
        """Load the checkpoint `resume` names (the newest that verifies for 'latest');
        None when there is none yet."""
        path = self.files.resolve(resume)
        if path is None:
            if resume:
                logger.info("--resume %s: no checkpoint yet, starting from scratch", resume)
            return None
        self.engine.load(path)
        meta = self.files.meta(path)
        self.progress.load_state_dict(meta)
        self.nonfinite.load_state_dict(meta)
        old_world = int(meta.get("world_size", 0))
        old_workers = max(1, int(meta.get("config", {}).get("data", {}).get("workers", 1)))
        rs = self.files.load_rank_state(path)
        if rs is not None and self.position.same_layout(old_world, old_workers):
            self.position.load_state_dict(rs)
            self.rng.load_state_dict(rs["rng"])
        else:
            self.position.continue_on_new_layout(self.files, path, meta, old_world, old_workers,
                                                 self.progress.step)
        logger.info("resumed from %s at step %d", path, self.progress.step)
        return path


class MetricsWriter:
    """metrics.jsonl + TensorBoard (rank 0), with its cadence (`due`: train.log_every and
    the last step) and the throughput since the last line."""

    def __init__(self, logger_: RunLogger, log_every: int, max_steps: int) -> None:
        self.out, self.log_every, self.max_steps = logger_, log_every, max_steps
        self._t, self._n, self._wait, self._step = time.time(), 0, 0.0, None

    def due(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.max_steps

    def count(self, samples: int, wait_s: float) -> None:
        self._n += samples
        self._wait += wait_s

    def log_train(self, step: int, metrics: dict, extra: dict) -> dict:
        """Write one training line (with samples/s and the data wait since the last one)
        and say where the run is; returns the metrics written."""
        dt = time.time() - self._t
        last = self._step if self._step is not None else step - 1
        metrics = dict(metrics, samples_per_s=self._n / max(dt, 1e-9), data_wait_s=self._wait, **extra)
        self.out.log(step, metrics)
        eta = (self.max_steps - step) * dt / max(1, step - last)
        logger.info("step %d/%d loss %.4f lr %.2e scale %.2f %.1f samples/s ETA %s", step, self.max_steps,
                    metrics["loss"], metrics["lr"], metrics["logit_scale"], metrics["samples_per_s"], _hms(eta))
        self._t, self._n, self._wait, self._step = time.time(), 0, 0.0, step
        return metrics

    def start(self, step: int) -> None:
        self._t, self._n, self._wait, self._step = time.time(), 0, 0.0, step

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        self.out.log(step, metrics, prefix=prefix)

    def images(self, step: int, tag: str, images, caption: str = "") -> None:
        self.out.images(step, tag, images, caption)

    def close(self) -> None:
        self.out.close()


class Evaluator:
    """Recall on the validation shards and each named set (train.eval_sets), with its
    cadence (`due`: train.eval_every and the last step) and, on the validation set, the
    retrieval grids of train.eval_queries in TensorBoard."""

    def __init__(self, cfg: RunConfig, dist: DistInfo, data: RunData, engine: Engine,
                 metrics: MetricsWriter, query_proc=None) -> None:
        self.cfg, self.dist, self.data, self.engine, self.metrics = cfg, dist, data, engine, metrics
        self.query_proc = query_proc
        self.last_val: Optional[dict] = None  # the newest validation metrics (model card)
        self.last_step: Optional[int] = None  # the step of the newest evaluation

    @property
    def enabled(self) -> bool:
        return bool(self.data.eval_sets)

    def due(self, step: int) -> bool:
        t = self.cfg.train
        return self.enabled and (bool(t.eval_every and step % t.eval_every == 0) or step == t.max_steps)

    def run(self, step: int) -> dict:
        """Evaluate every set (collective), log each under its own name; returns
        {set_metric: value}."""
        self.last_step = step
        model = self.engine.model
        out = {}
        for name, urls in self.data.eval_sets.items():
            res, img, keys, metas = self._evaluate_set(urls)
            self.metrics.log(step, res, prefix=name)
            if name == "val":
                self.last_val = res
                if self.query_proc is not None:
                    self._log_retrieval_grids(step, img, keys, metas)
            logger.info("%s step %d: t2i R@1 %.1f R@5 %.1f R@10 %.1f | i2t R@1 %.1f R@5 %.1f R@10 %.1f%s",
                        name, step, res["t2i_R@1"], res["t2i_R@5"], res["t2i_R@10"],
                        res["i2t_R@1"], res["i2t_R@5"], res["i2t_R@10"],
                        f" | skipped {res['skipped']}" if res["skipped"] else "")
            out.update({f"{name}_{k}": v for k, v in res.items()})
        model.train()
        return out

    def _evaluate_set(self, urls: list):
        c = self.cfg
        return evaluate_shards(
            self.engine.model, urls, c.data.image_size, self.dist.device, self.dist.rank,
            self.dist.world_size, c.data.batch_size, precision_dtype(c.train.precision), return_embeddings=True,
            lockstep=self.engine.partitioned, ids_width=self.data.manifest.tokenizer.max_length,
            vocab_size=len(self.data.tokenizer), manifest=c.data.manifest, pack_captions=c.data.pack_captions)

    def _log_retrieval_grids(self, step: int, img: torch.Tensor, keys: list, metas: list, k: int = 5) -> None:
        """Top-k validation images of each configured query, as TensorBoard images tagged
        with the query itself (where a person would rather look than read)."""
        from phoclip.search.gallery import load_item_image
        from phoclip.data.images import BadImage
        from phoclip.search.query import embed_texts

        queries = self.cfg.train.eval_queries
        # every rank embeds the queries (under ZeRO-3 a forward is a collective); rank 0 logs
        q = embed_texts(self.engine.model, self.query_proc, queries, self.dist.device).to(img.dtype)
        if not self.dist.is_main:
            return
        top = (q @ img.T).topk(min(k, img.shape[0]), dim=1).indices
        for i, (query, idx) in enumerate(zip(queries, top.tolist())):
            tiles = []
            for j in idx:
                try:
                    im = load_item_image({"shard": metas[j].get("__shard_url__", ""), "key": keys[j]},
                                         allow_remote=True).resize((96, 96))
                    tiles.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
                except (BadImage, OSError, KeyError) as e:  # a picture is not worth the run
                    logger.warning("retrieval grid: no picture for %s: %s", keys[j], e)
                    tiles.append(torch.full((3, 96, 96), 128, dtype=torch.uint8))
            self.metrics.images(step, grid_tag(i, query), torch.stack(tiles), query)


def grid_tag(i: int, query: str) -> str:
    """TensorBoard tag of query i's retrieval grid: the query's own words (TensorBoard
    keeps letters, digits and _-./ in tags; the index keeps two queries apart)."""
    import re

    words = re.sub(r"[^\w\-.]+", "_", query.strip(), flags=re.UNICODE).strip("_")[:60]
    return f"val_retrieval/{i:02d}_{words}" if words else f"val_retrieval/{i:02d}"


@dataclass
class Run:
    """Every part of one training run (see `build_run`)."""

    cfg: RunConfig
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
            from phoclip_train.plots import try_render_curves

            curves = try_render_curves(self.cfg.run_dir)  # RUN_DIR/curves.png, also linked from the card
            return self.model.save_pretrained(Path(self.cfg.run_dir) / "model", tokenizer=self.data.tokenizer,
                                              training=self.cfg.to_dict(), data=self.data.manifest.summary(),
                                              evaluation=self.evaluator.last_val, curves=curves)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.metrics.close()
            self.lock.release()


def decide_settings(cfg: RunConfig, dist: DistInfo) -> RunConfig:
    """A copy of `cfg` with the derived settings resolved (accumulation from
    data.global_batch_size; precision 'auto': the DeepSpeed JSON's, else the device's
    best; a DeepSpeed JSON of another precision refused); the caller's config is left as
    given. Decided from the config, the files it names and the device alone, before
    anything is built."""
    cfg = copy.deepcopy(cfg)
    t = cfg.train
    t.accum_steps = cfg.accum_steps_for(dist.world_size)  # data.global_batch_size, when set
    if t.engine == "deepspeed" and t.deepspeed_config:
        t.precision = decide_ds_precision(t.deepspeed_config, t.precision)
    elif t.precision == "auto":
        t.precision = auto_precision(dist.device)
    return cfg


def build_run(cfg: RunConfig, dist: DistInfo) -> Run:
    """Every part of a run, in order: the derived settings decided (a refusal there
    leaves no trace), the run folder claimed (lock, a fresh run never on old
    checkpoints), data checked before any model, seeds, model, engine, loss, stream,
    checkpointer, metrics, evaluator; then the newest checkpoint restored. A refusal on
    the way releases the run folder's lock."""
    cfg.validate(dist.world_size)
    cfg = decide_settings(cfg, dist)
    run_dir = Path(cfg.run_dir)
    lock = RunLock(run_dir)
    try:
        if dist.is_main:
            claim_run_dir(lock, run_dir, cfg)
        return _build(cfg, dist, lock)
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


def _build(cfg: RunConfig, dist: DistInfo, lock: RunLock) -> Run:
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

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    logger.info("building the model %s", cfg.model.name)
    model = build_model(cfg, data.tokenizer, data.manifest)
    logger.info("building the %s engine%s", t.engine, " (DeepSpeed compiles its CPU Adam op once per "
                "machine: a few minutes the first time, cached in TORCH_EXTENSIONS_DIR)"
                if t.engine == "deepspeed" and dist.device.type == "cpu" else "")
    channels_last = wants_channels_last(cfg, dist.device)
    engine = build_engine(cfg, dist, model)
    settings = Settings(precision=t.precision, channels_last=channels_last, compile=t.compile,
                        accum_steps=t.accum_steps, max_positions=text_positions(get_model_config(cfg.model.name)),
                        skips_on_device=engine.skips_on_device, sync_every=t.sync_every)
    logger.info("settings: %s", settings.describe())
    loss_fn = build_loss(cfg, dist)
    stream = build_stream(cfg, dist, data, engine.model.pad_id)
    prep = InputPrep(dist.device, cfg.data.image_size, engine.input_dtype, channels_last,
                     cfg.data.trim_padding, cfg.data.pack_captions)
    position = DataPosition(stream, data.train_urls, cfg, dist)
    progress, nonfinite = Progress(), NonFiniteCounter()
    files = Checkpointer(run_dir, t.keep_last, dist.rank, dist.world_size)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, str(run_dir / "config.yaml"))
    metrics = MetricsWriter(RunLogger(run_dir, dist.is_main), t.log_every, t.max_steps)
    evaluator = Evaluator(cfg, dist, data, engine, metrics, query_proc)

    def meta() -> dict:
        # the model's resolved config and the tokenizer travel with every checkpoint, so
        # exporting one needs neither the hub nor the files the run started from
        return {"config": cfg.to_dict(), "model_config": engine.model.config,
                "data": data.manifest.summary(), "evaluation": evaluator.last_val}

    checkpointer = RunCheckpointer(files, t.save_every, engine, progress, nonfinite, position, RngState(), meta,
                                   extra=lambda d: data.tokenizer.save_pretrained(str(d / TOKENIZER_DIR)))
    run = Run(cfg, dist, settings, data, engine, loss_fn, prep, position, progress, nonfinite,
              checkpointer, metrics, evaluator, lock)
    try:
        torch.manual_seed(t.seed + 1000 * dist.rank)  # dropout differs per rank
        checkpointer.restore(cfg.resume)
    except BaseException:
        metrics.close()
        raise
    logger.info("built in %.0f s; training to step %d", time.time() - t0, t.max_steps)
    return run


def build_query_processor(cfg: RunConfig, data: RunData):
    """The text processor of train.eval_queries: the shards' segmenter and max length."""
    from phoclip.data.text import TextProcessor, create_segmenter

    name = data.manifest.segmenter.name or "none"
    try:
        seg = create_segmenter(name, cfg.train.vncorenlp_dir or None)
    except (RuntimeError, ImportError) as e:
        raise ConfigError(f"train.eval_queries are segmented with the shards' segmenter {name}, "
                          f"which cannot be built: {e} (for VnCoreNLP set train.vncorenlp_dir=DIR "
                          "or VNCORENLP_DIR; or turn the grids off with train.eval_queries=[])") from e
    return TextProcessor(data.tokenizer, seg, data.manifest.tokenizer.max_length)


def _hms(seconds: float) -> str:
    """12:34:56 (or 4:05 under an hour)."""
    m, sec = divmod(int(max(0, seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
