"""The training loop, split into named steps: build, resume, train_step, evaluate, save."""
from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from phoclip.data import StreamLayout, StreamTracker, relayout
from phoclip.model import trim_padding
from phoclip.retrieval import evaluate_shards
from phoclip.transforms import normalize_images, resize_on_device
from phoclip_train.build import (auto_precision, build_data, build_engine, build_loader, build_loss,
                                 build_model, build_stream, close_loader, wants_channels_last)
from phoclip_train.checkpoint import Checkpointer, rng_state, set_rng_state
from phoclip_train.config import ConfigError, RunConfig, save_config
from phoclip_train.distributed import DistInfo, all_reduce_max
from phoclip_train.engine import precision_dtype
from phoclip_train.lock import RunLock
from phoclip_train.metrics import RunLogger
from phoclip_train.signals import STUCK_WAIT_S, StoppedWaitingForData, StopSignal  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    pass




class Trainer:
    def __init__(self, cfg: RunConfig, dist_info: DistInfo) -> None:
        self.cfg, self.dist = cfg, dist_info
        cfg.validate(dist_info.world_size)
        self.run_dir = Path(cfg.run_dir)
        self.step = 0
        self.samples_seen = 0
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        self._nf = None  # device counters [streak, total since the last read] (no host sync)
        self.stop_signal = StopSignal(STUCK_WAIT_S, lambda: self.ckpt.latest())
        self._last_val: Optional[dict] = None  # the newest validation metrics (model card)
        self._saved: Optional[tuple] = None  # (step, evaluation) of the newest checkpoint
        self._eval_step: Optional[int] = None  # the step of the newest evaluation
        self.lock = RunLock(self.run_dir)
        try:  # a refusal while claiming or building releases the run folder's lock
            if dist_info.is_main:
                self._claim_run_dir()
            self._build()
        except BaseException:
            self.lock.release()
            raise

    @property
    def tokenizer(self):
        return self.data.tokenizer

    @property
    def manifest(self) -> dict:
        return self.data.manifest

    @property
    def train_urls(self) -> list:
        return self.data.train_urls

    @property
    def eval_sets(self) -> dict:
        return self.data.eval_sets

    def _claim_run_dir(self) -> None:
        """One job per run folder, and a fresh run never lands silently on an old one."""
        self.lock.acquire()
        old = Checkpointer(self.run_dir, 1, 0, 1).list() if (self.run_dir / "checkpoints").is_dir() else []
        if old and not self.cfg.resume:
            if not self.cfg.train.overwrite:
                raise ConfigError(f"{self.run_dir} already holds checkpoints (newest {old[-1].name}): "
                                  "continue it with --resume latest, use another run_dir, or start "
                                  "over with train.overwrite=true (deletes them)")
            logger.warning("train.overwrite=true: deleting the %d checkpoints and the metrics of the "
                           "run in %s", len(old), self.run_dir)
            for c in old:
                shutil.rmtree(c)
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)

    def _build(self) -> None:
        """The run's parts, built once (train/phoclip_train/build.py); the rest of the class loops."""
        cfg, dist_info, t = self.cfg, self.dist, self.cfg.train
        if t.precision == "auto" and t.engine != "deepspeed":  # DeepSpeed: its JSON decides
            t.precision = auto_precision(dist_info.device)
            logger.info("train.precision=auto: %s on %s", t.precision, dist_info.device)
        # data first: bad shards are refused before any model is built
        t0 = time.time()
        logger.info("reading the shard catalogue (%s)", cfg.data.train_shards)
        self.data = build_data(cfg, dist_info)
        logger.info("data: %d train shards, %d samples; %d evaluation set(s)", len(self.data.train_urls),
                    self.data.dataset_size, len(self.data.eval_sets))
        # the retrieval grids segment their queries as the shards were: refuse now, not
        # silently at the first validation, when that segmenter cannot be built
        self._query_proc = self._build_query_processor() if t.eval_queries and self.data.val_urls else None

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        logger.info("building the model %s", cfg.model.name)
        model = build_model(cfg, self.tokenizer, self.manifest)
        logger.info("building the %s engine%s", t.engine, " (DeepSpeed compiles its CPU Adam op once per "
                    "machine: a few minutes the first time, cached in TORCH_EXTENSIONS_DIR)"
                    if t.engine == "deepspeed" and dist_info.device.type == "cpu" else "")
        self.channels_last = wants_channels_last(cfg, dist_info.device)
        self.engine = build_engine(cfg, dist_info, model)
        self.model = self.engine.model
        self.loss_fn = build_loss(cfg, dist_info)
        self.stream = build_stream(cfg, dist_info, self.data, self.model.pad_id)
        self.tracker = StreamTracker()
        self.workers = max(1, cfg.data.workers)  # logical streams per rank
        self.ckpt = Checkpointer(self.run_dir, t.keep_last, dist_info.rank, dist_info.world_size)
        if dist_info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, str(self.run_dir / "config.yaml"))
        self.metrics = RunLogger(self.run_dir, dist_info.is_main)
        torch.manual_seed(t.seed + 1000 * dist_info.rank)  # dropout differs per rank
        self._resume()
        logger.info("built in %.0f s; training to step %d", time.time() - t0, t.max_steps)

    # ------------------------------------------------------------------ resume / save
    def _resume(self) -> None:
        path = self.ckpt.resolve(self.cfg.resume)
        if path is None:
            if self.cfg.resume:
                logger.info("--resume %s: no checkpoint yet, starting from scratch", self.cfg.resume)
            return
        self.engine.load(path)
        meta = self.ckpt.meta(path)
        self.step, self.samples_seen = meta["step"], meta["samples_seen"]
        self.nonfinite_total = meta.get("nonfinite_total", 0)
        old_world = int(meta.get("world_size", 0))
        old_data = meta.get("config", {}).get("data", {})
        old_workers = max(1, int(old_data.get("workers", 1)))
        rs = self.ckpt.load_rank_state(path)
        if rs is not None and (old_world, old_workers) == (self.dist.world_size, self.workers):
            self.tracker.load_state_dict(rs["data"])
            self.stream.load_state_dict(rs["data"])
            self.stream.cfg.layout = StreamLayout.from_state(rs.get("layout"))
            set_rng_state(rs["rng"])
        else:
            self._continue_on_new_layout(path, meta, old_world, old_workers)
        logger.info("resumed from %s at step %d", path, self.step)

    def _continue_on_new_layout(self, path: Path, meta: dict, old_world: int, old_workers: int) -> None:
        """A checkpoint of another number of ranks or workers: continue its data order
        (see `phoclip.data.relayout`) rather than restart it, and say what changes."""
        old_states = {}
        for r in range(old_world):
            st = self.ckpt.load_rank_state(path, r)
            old_states[r] = st["data"] if st else {}
        first = self.ckpt.load_rank_state(path, 0) or {}
        layout = relayout(self.train_urls, self.cfg.train.seed, self.cfg.data.resampled,
                          StreamLayout.from_state(first.get("layout")), old_world, old_workers,
                          old_states, salt=self.step)
        self.stream.cfg.layout = layout
        if self.dist.is_main:  # the logged skipped-sample count carries over (kept as stream -1)
            self.tracker.skipped[-1] = dict(sum((Counter(c) for st in old_states.values()
                                                 for c in st.get("skipped", {}).values()), Counter()))
        old = meta.get("config", {})
        old_global = (int(old.get("data", {}).get("batch_size", 0))
                      * int(old.get("train", {}).get("accum_steps", 1)) * old_world)
        new_global = self.cfg.data.batch_size * self.cfg.train.accum_steps * self.dist.world_size
        where = ("fresh draws (resampled)" if self.cfg.data.resampled else
                 f"epoch {layout.start_epoch}, less the {len(layout.done.get(layout.start_epoch, []))} "
                 f"of {len(self.train_urls)} shards already read")
        logger.warning("checkpoint %s was written by %d ranks x %d workers, this run has %d x %d: the "
                       "data order continues with %s; global batch %d -> %d%s; the learning-rate "
                       "schedule continues at step %d", path, old_world, old_workers,
                       self.dist.world_size, self.workers, where, old_global, new_global,
                       "" if old_global == new_global else
                       " (set data.global_batch_size to keep it)", self.step)

    def save(self) -> None:
        """Checkpoint this step (collective), once: the end of a run whose last step was a
        save step saves again only if an evaluation has run since (its figures go in meta)."""
        if self._saved == (self.step, id(self._last_val)):
            return
        self._saved = (self.step, id(self._last_val))
        # the model's resolved config and the tokenizer travel with every checkpoint, so
        # exporting one needs neither the hub nor the files the run started from
        meta = {"samples_seen": self.samples_seen, "nonfinite_total": self.nonfinite_total,
                "config": self.cfg.to_dict(), "model_config": self.model.config,
                "data": manifest_summary(self.manifest), "evaluation": self._last_val}
        self.ckpt.save(self.step, self.engine, {"data": self.tracker.state_dict(), "rng": rng_state(),
                                                "layout": self.stream.cfg.layout.state_dict()},
                       meta, extra=lambda d: self.tokenizer.save_pretrained(str(d / "tokenizer")))

    # ------------------------------------------------------------------ the loop
    def should_continue(self) -> bool:
        return self.step < self.cfg.train.max_steps

    def train(self) -> dict:
        """Loop until train.max_steps (or a stop signal); evaluate, save and export."""
        with self.stop_signal.installed():
            return self._loop()

    def _loop(self) -> dict:
        t = self.cfg.train
        loader = build_loader(self.stream, self.cfg.data.workers, pin_memory=self.dist.device.type == "cuda")
        it = iter(loader)
        last: dict = {}
        t_log, n_log, wait = time.time(), 0, 0.0
        last_step = self.step
        try:
            while self.should_continue():
                t0 = time.time()
                with self.stop_signal.waiting():
                    batches = [next(it) for _ in range(t.accum_steps)]
                wait += time.time() - t0
                for b in batches:
                    self.tracker.update(b)
                metrics = self.train_step(batches, sync=self.is_sync_step(self.step + 1))
                self.step += 1
                n = sum(b["images"].shape[0] for b in batches) * self.dist.world_size
                self.samples_seen += n
                n_log += n
                stop = metrics.pop("_stop")
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    dt = time.time() - t_log
                    metrics.update(samples_per_s=n_log / max(dt, 1e-9), data_wait_s=wait,
                                   epoch=self.samples_seen / max(1, self.data.dataset_size),
                                   skipped_samples=sum(self.tracker.total_skipped().values()),
                                   skipped=self.tracker.total_skipped(),
                                   nonfinite_steps=self.nonfinite_total)
                    self.metrics.log(self.step, metrics)
                    self.lock.refresh()
                    eta = (t.max_steps - self.step) * dt / max(1, self.step - last_step)
                    last_step = self.step
                    logger.info("step %d/%d loss %.4f lr %.2e scale %.2f %.1f samples/s ETA %s",
                                self.step, t.max_steps, metrics["loss"], metrics["lr"], metrics["logit_scale"],
                                metrics["samples_per_s"], _hms(eta))
                    t_log, n_log, wait = time.time(), 0, 0.0
                if "loss" in metrics:  # read on this step (see is_sync_step)
                    last = metrics
                if self.nonfinite_streak >= t.max_nonfinite:
                    self.save()
                    raise NonFiniteError(
                        f"{self.nonfinite_streak} consecutive non-finite steps (last at step "
                        f"{self.step}); the weights are those from before the fault, saved in "
                        f"{self.ckpt.latest()}. Look for bad data, lower the learning rates, set "
                        "train.grad_clip=1.0, or switch fp16 to train.precision=bf16")
                if self.eval_sets and ((t.eval_every and self.step % t.eval_every == 0)
                                       or self.step == t.max_steps):  # the end: before its save
                    last.update(self.evaluate())
                if stop:
                    self.save()
                    logger.warning("stopped by signal at step %d; resume with --resume latest", self.step)
                    return last
                if self.step % t.save_every == 0:
                    self.save()
            if self.eval_sets and self._eval_step != self.step:  # resumed at max_steps: nothing ran
                last.update(self.evaluate())
            self.save()
            self.export()
            return last
        finally:
            close_loader(it)

    def is_sync_step(self, step: int) -> bool:
        """Steps on which the host reads the device-side flags and metrics: the same on
        every rank (they agree on stopping there), and every step under DeepSpeed."""
        t = self.cfg.train
        return (not self.engine.skips_on_device or step % t.sync_every == 0 or step % t.log_every == 0
                or step % t.save_every == 0 or step >= t.max_steps
                or bool(t.eval_every and step % t.eval_every == 0))

    def device_inputs(self, batches: list[dict]) -> list[tuple]:
        """Batches → device inputs; uint8 pixels (the stream's) are normalised there,
        float images are taken as already normalised; the ids are trimmed to the
        batch's longest caption on the CPU, before the copy (data.trim_padding), and
        the captions packed into rows there (data.pack_captions). Each input: (images,
        ids, packing or None)."""
        dev, dt = self.dist.device, self.engine.input_dtype
        out = []
        trim = self.cfg.data.trim_padding
        for b in batches:
            img = b["images"].to(dev, non_blocking=True)
            if "boxes" in b:  # data.resize_on=device: the crop is resized here
                img = resize_on_device(img, b["boxes"], self.cfg.data.image_size)
            img = normalize_images(img, dt) if img.dtype == torch.uint8 else img.to(dt or img.dtype)
            if self.channels_last:
                img = img.contiguous(memory_format=torch.channels_last)
            ids = b["input_ids"]
            if trim:
                ids = trim_padding(ids, self.model.pad_id, trim)
            packing = self.model.pack_text(ids) if self.cfg.data.pack_captions else None
            out.append((img, ids.to(dev, non_blocking=True),
                        packing.to(dev, non_blocking=True) if packing else None))
        return out


    def train_step(self, batches: list[dict], sync: bool = True) -> dict:
        """One optimizer step over `accum_steps` micro-batches. With `sync` the host reads
        the step's flags and metrics (floats returned); without, the step issues no host
        sync and returns only `_stop` (False)."""
        # BatchNorm statistics move in the forward pass; a skipped (non-finite) step
        # must not leave NaN in them, so they are restored (they are small)
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        total, losses, scale = self.forward_backward(batches)
        return self.optimizer_step(total, losses, buffers, scale, sync=sync)

    def forward_backward(self, batches: list[dict]) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """Gradients of the loss over all micro-batches, global negatives kept: with
        k > 1, features of all micro-batches are computed without gradient first, then
        each micro-batch is recomputed with gradient against all the others. Returns the
        loss, its named parts and the temperature exp(t) the forward used."""
        self.model.train()
        eng = self.engine
        data = self.device_inputs(batches)
        if len(data) == 1:
            with eng.autocast():
                out = eng.wrapped(*data[0])
                losses = self.loss_fn(**out)
                total = sum(losses.values())
            eng.backward(total)
        else:
            with torch.no_grad(), eng.autocast():
                cached = [self.model(*d) for d in data]
            for j, d in enumerate(data):
                ctx = eng.no_sync() if j < len(data) - 1 else contextlib.nullcontext()
                with ctx, eng.autocast():
                    out = eng.wrapped(*d)
                    img = torch.cat([c["image_features"] if i != j else out["image_features"]
                                     for i, c in enumerate(cached)])
                    txt = torch.cat([c["text_features"] if i != j else out["text_features"]
                                     for i, c in enumerate(cached)])
                    if j < len(data) - 1:
                        # the temperature's gradient must be counted once, not k times
                        out = dict(out, logit_scale=out["logit_scale"].detach())
                        if "logit_bias" in out:
                            out["logit_bias"] = out["logit_bias"].detach()
                    losses = self.loss_fn(**dict(out, image_features=img, text_features=txt))
                    total = sum(losses.values())
                eng.backward(total)
        return total, losses, out["logit_scale"].detach()

    def optimizer_step(self, total: torch.Tensor, losses: dict, buffers: list = (),
                       logit_scale: Optional[torch.Tensor] = None, sync: bool = True) -> dict:
        """Clip, skip a non-finite step (on every rank alike), step; `buffers` (module
        buffer, its value before the forward pass) are restored on a skip. The skip is
        decided on the device; the host reads the flags (streak, stop signal) and the
        metrics only when `sync` (see `is_sync_step`). `logit_scale` (the step's exp(t),
        logged) is read from the forward's output: under ZeRO-3 the parameter itself is
        only a slice on each rank."""
        eng = self.engine
        gnorm = eng.grad_norm()
        bad_grad = (torch.zeros((), device=total.device) if gnorm is None or eng.handles_overflow
                    else (~torch.isfinite(gnorm)).float())
        flags = torch.stack([(~torch.isfinite(total.detach())).float(), bad_grad])
        all_reduce_max(flags)  # every rank must agree to skip (a device collective)
        bad = flags.max()
        if not eng.skips_on_device:
            bad = bool(bad.item())  # this engine needs the decision on the host: a sync
        if isinstance(bad, torch.Tensor):
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(torch.where(bad > 0, saved, b))
        elif bad:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
        eng.step(skip=bad)
        bad_t = torch.as_tensor(bad, dtype=torch.float32, device=total.device)
        if self._nf is None:
            self._nf = torch.zeros(2, device=total.device)
        self._nf = torch.stack([(self._nf[0] + 1) * bad_t, self._nf[1] + bad_t])
        if gnorm is None:
            gnorm = eng.last_grad_norm()
        self.model.clamp_logit_scale()
        if not sync:
            return {"_stop": False}
        names = list(losses)
        if logit_scale is None:
            with eng.gathered():
                logit_scale = self.model.logit_scale.detach().clamp(max=self.model.logit_scale_max).exp()
        stop = torch.tensor([float(self.stop_signal.requested)], device=total.device)
        all_reduce_max(stop)  # every rank stops at the same step
        values = torch.cat([self._nf, stop,
                            torch.stack([total.detach().float(), *(losses[k].detach().float() for k in names),
                                         gnorm.detach().float().to(total.device),
                                         logit_scale.squeeze().float().to(total.device)])]).tolist()
        streak, new_bad, stop_v, values = int(values[0]), int(values[1]), values[2], values[3:]  # the read
        self._nf = torch.stack([self._nf[0], torch.zeros_like(self._nf[1])])
        self.nonfinite_total += new_bad
        self.nonfinite_streak = streak
        if new_bad:
            logger.warning("%d non-finite step(s) skipped up to step %d (%d in a row now)",
                           new_bad, self.step + 1, streak)
        lrs = eng.lrs()
        return {"loss": values[0], **dict(zip(names, values[1:-2])),
                "lr": lrs.get("head", next(iter(lrs.values()))), "lrs": lrs,
                "grad_norm": values[-2], "logit_scale": values[-1], "_stop": bool(stop_v)}

    # ------------------------------------------------------------------ eval / export
    def evaluate(self) -> dict:
        """Recall on the validation shards and on every named set of train.eval_sets,
        each logged under its own name (metrics.jsonl kind, TensorBoard prefix)."""
        self._eval_step = self.step
        out = {}
        for name, urls in self.eval_sets.items():
            res, img, keys, metas = self._evaluate_set(urls)
            self.metrics.log(self.step, res, prefix=name)
            if name == "val":
                self._last_val = res
                if self._query_proc is not None:
                    self._log_retrieval_grids(img, keys, metas)
            logger.info("%s step %d: t2i R@1 %.1f R@5 %.1f R@10 %.1f | i2t R@1 %.1f R@5 %.1f R@10 %.1f%s",
                        name, self.step, res["t2i_R@1"], res["t2i_R@5"], res["t2i_R@10"],
                        res["i2t_R@1"], res["i2t_R@5"], res["i2t_R@10"],
                        f" | skipped {res['skipped']}" if res["skipped"] else "")
            out.update({f"{name}_{k}": v for k, v in res.items()})
        self.model.train()
        return out

    def _evaluate_set(self, urls: list):
        dtype = precision_dtype(self.cfg.train.precision)
        return evaluate_shards(
            self.model, urls, self.cfg.data.image_size, self.dist.device, self.dist.rank,
            self.dist.world_size, self.cfg.data.batch_size, dtype, return_embeddings=True,
            lockstep=self.engine.partitioned, ids_width=int(self.manifest["tokenizer"]["max_length"]),
            vocab_size=len(self.tokenizer), manifest=self.cfg.data.manifest,
            pack_captions=self.cfg.data.pack_captions)

    def _log_retrieval_grids(self, img: torch.Tensor, keys: list, metas: list, k: int = 5) -> None:
        """Top-k validation images of each configured query, as TensorBoard images:
        where a person would rather look than read."""
        from phoclip.gallery import load_item_image
        from phoclip.images import BadImage
        from phoclip.search import embed_texts

        # every rank embeds the queries (under ZeRO-3 a forward is a collective); rank 0 logs
        q = embed_texts(self.model, self._query_proc, self.cfg.train.eval_queries,
                        self.dist.device).to(img.dtype)
        if not self.dist.is_main:
            return
        top = (q @ img.T).topk(min(k, img.shape[0]), dim=1).indices
        for i, (query, idx) in enumerate(zip(self.cfg.train.eval_queries, top.tolist())):
            tiles = []
            for j in idx:
                try:
                    im = load_item_image({"shard": metas[j].get("__shard_url__", ""), "key": keys[j]},
                                         allow_remote=True).resize((96, 96))
                    tiles.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
                except (BadImage, OSError, KeyError) as e:  # a picture is not worth the run
                    logger.warning("retrieval grid: no picture for %s: %s", keys[j], e)
                    tiles.append(torch.full((3, 96, 96), 128, dtype=torch.uint8))
            self.metrics.images(self.step, f"val_retrieval/{i}", torch.stack(tiles), query)

    def _build_query_processor(self):
        from phoclip.text import TextProcessor, create_segmenter

        name = self.manifest.get("segmenter", {}).get("name", "none")
        try:
            seg = create_segmenter(name, self.cfg.train.vncorenlp_dir or None)
        except (RuntimeError, ImportError) as e:
            raise ConfigError(f"train.eval_queries are segmented with the shards' segmenter {name}, "
                              f"which cannot be built: {e} (for VnCoreNLP set train.vncorenlp_dir=DIR "
                              "or VNCORENLP_DIR; or turn the grids off with train.eval_queries=[])") from e
        return TextProcessor(self.tokenizer, seg, self.manifest["tokenizer"]["max_length"])

    def export(self) -> Optional[Path]:
        """The final model as a plain folder (config + safetensors + tokenizer); collective
        (ZeRO-3 gathers the parameters' slices first)."""
        with self.engine.gathered():
            if not self.dist.is_main:
                return None
            return self.model.save_pretrained(self.run_dir / "model", tokenizer=self.tokenizer,
                                              training=self.cfg.to_dict(), data=manifest_summary(self.manifest),
                                              evaluation=self._last_val)

    def close(self) -> None:
        if hasattr(self, "metrics"):
            self.metrics.close()
        self.lock.release()


def manifest_summary(manifest: dict) -> dict:
    """What a model card says of its data: counts, sources, tokenizer, segmenter."""
    return {k: manifest.get(k) for k in ("counts", "captions", "sources", "tokenizer", "segmenter")}


def _hms(seconds: float) -> str:
    """12:34:56 (or 4:05 under an hour)."""
    m, sec = divmod(int(max(0, seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
