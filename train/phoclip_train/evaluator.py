"""Evaluation during training: recall on the validation shards and each named set, with
its cadence (`Evaluator.due`), and the retrieval grids of train.eval_queries in
TensorBoard."""
from __future__ import annotations

import logging
import re
from typing import Optional

import numpy as np
import torch

from phoclip.data.images import BadImage
from phoclip.data.text import TextProcessor, create_segmenter
from phoclip.evaluation.retrieval import evaluate_shards
from phoclip.search.gallery import load_item_image
from phoclip.models.embed import embed_texts
from phoclip_train.build import RunData
from phoclip_train.config import ConfigError, RunConfig
from phoclip_train.distributed import DistInfo
from phoclip_train.engine import Engine, precision_dtype
from phoclip_train.metrics import MetricsWriter

logger = logging.getLogger(__name__)


class Evaluator:
    """Recall on the validation shards and each named set (train.eval_sets), with its
    cadence (`due`: train.eval_every and the last step) and, on the validation set, the
    retrieval grids of train.eval_queries in TensorBoard."""

    def __init__(self, cfg: RunConfig, dist: DistInfo, data: RunData, engine: Engine, metrics: MetricsWriter,
                 precision: str, query_proc: Optional[TextProcessor] = None) -> None:
        self.cfg, self.dist, self.data, self.engine, self.metrics = cfg, dist, data, engine, metrics
        self.dtype = precision_dtype(precision)
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
        # the evaluation protocol's batch size, precision and packing (evaluate_shards'
        # defaults), not the training's: phoclip-eval of the export gives the same numbers
        return evaluate_shards(
            self.engine.model, urls, c.data.image_size, self.dist.device, self.dist.rank,
            self.dist.world_size, return_embeddings=True,
            lockstep=self.engine.partitioned, ids_width=self.data.manifest.tokenizer.max_length,
            vocab_size=len(self.data.tokenizer), manifest=c.data.manifest)

    def _log_retrieval_grids(self, step: int, img: torch.Tensor, keys: list, metas: list, k: int = 5) -> None:
        """Top-k validation images of each configured query, as TensorBoard images tagged
        with the query itself (where a person would rather look than read)."""
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
    words = re.sub(r"[^\w\-.]+", "_", query.strip(), flags=re.UNICODE).strip("_")[:60]
    return f"val_retrieval/{i:02d}_{words}" if words else f"val_retrieval/{i:02d}"


def build_query_processor(cfg: RunConfig, data: RunData):
    """The text processor of train.eval_queries: the shards' segmenter and max length."""
    name = data.manifest.segmenter.name or "none"
    try:
        seg = create_segmenter(name, cfg.train.vncorenlp_dir or None)
    except (RuntimeError, ImportError) as e:
        raise ConfigError(f"train.eval_queries are segmented with the shards' segmenter {name}, "
                          f"which cannot be built: {e} (for VnCoreNLP set train.vncorenlp_dir=DIR "
                          "or VNCORENLP_DIR; or turn the grids off with train.eval_queries=[])") from e
    return TextProcessor(data.tokenizer, seg, data.manifest.tokenizer.max_length)
