"""Run logging: metrics.jsonl (one JSON object per logged step) and the experiment
trackers of train.report_to (TensorBoard by default; `trackers.py`), together the
`RunLogger` (created on rank 0 only; other ranks get one that writes nothing), and the
run's metrics writer with its cadence and throughput (`MetricsWriter`)."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Optional, Sequence

from phoclip_train.trackers import Tracker, build_trackers, scalars

logger = logging.getLogger(__name__)


class RunLogger:
    """metrics.jsonl, whatever the trackers, and each tracker of `report_to`. A tracker
    whose call fails is warned about once and dropped: a dashboard that stops answering
    does not end a training run, and metrics.jsonl still holds every line."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, report_to: Sequence[str] = ("tensorboard",),
                 config: Optional[dict] = None, resume: bool = False) -> None:
        self.enabled = enabled
        self.file = None
        self.trackers: list[Tracker] = []
        if enabled:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8")
            try:
                self.trackers = build_trackers(report_to, Path(run_dir), config or {}, resume)
            except BaseException:
                self.file.close()
                raise

    def _each(self, call: str, *args) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, call)(*args)
            except Exception as e:
                logger.warning("%s failed (%s: %s): it gets nothing more from this run; metrics.jsonl has "
                               "every line", t.name, type(e).__name__, e)
                self.trackers.remove(t)
                try:
                    t.close()
                except Exception:  # already failing: the warning above said so
                    pass

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "kind": prefix, **metrics}) + "\n")
        self.file.flush()
        self._each("log_scalars", step, scalars(metrics, prefix))

    def images(self, step: int, tag: str, images, caption: str = "") -> None:
        """A row of uint8 CHW images, with its caption as text."""
        if self.enabled:
            self._each("log_images", step, tag, images, caption)

    def artifact(self, folder: Optional[Path], name: str = "model") -> None:
        """The exported model folder, to the trackers that keep artifacts (wandb, MLflow)."""
        if self.enabled and folder is not None:
            self._each("log_artifact", Path(folder), name)

    def close(self) -> None:
        if self.enabled:
            self.enabled = False
            self.file.close()
            for t in self.trackers:
                try:
                    t.close()
                except Exception as e:  # the others still close, and the run's result stands
                    logger.warning("%s did not close cleanly (%s: %s)", t.name, type(e).__name__, e)
            self.trackers = []


class MetricsWriter:
    """metrics.jsonl + the trackers (rank 0), with its cadence (`due`: train.log_every and
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

    def artifact(self, folder: Optional[Path]) -> None:
        """The exported model folder, as the trackers' model artifact."""
        self.out.artifact(folder)

    def close(self) -> None:
        self.out.close()


def _hms(seconds: float) -> str:
    """12:34:56 (or 4:05 under an hour)."""
    m, sec = divmod(int(max(0, seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
