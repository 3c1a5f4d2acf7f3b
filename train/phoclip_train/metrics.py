"""Run logging: metrics.jsonl (one JSON object per logged step) and TensorBoard
(`RunLogger`: created on rank 0 only; other ranks get one that writes nothing), and the
run's metrics writer with its cadence and throughput (`MetricsWriter`)."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

logger = logging.getLogger(__name__)


class RunLogger:
    def __init__(self, run_dir: str | os.PathLike, enabled: bool) -> None:
        self.enabled = enabled
        self.tb = None
        self.file = None
        if enabled:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            self.file = open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8")

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "kind": prefix, **metrics}) + "\n")
        self.file.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
            elif isinstance(v, dict):
                for kk, vv in v.items():
                    if isinstance(vv, (int, float)):
                        self.tb.add_scalar(f"{prefix}/{k}/{kk}", vv, step)

    def images(self, step: int, tag: str, images, caption: str = "") -> None:
        """A row of uint8 CHW images, with its caption as text."""
        if not self.enabled:
            return
        self.tb.add_images(tag, images, step, dataformats="NCHW")
        if caption:
            self.tb.add_text(tag + "/query", caption, step)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.file.close()
            self.enabled = False


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


def _hms(seconds: float) -> str:
    """12:34:56 (or 4:05 under an hour)."""
    m, sec = divmod(int(max(0, seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
