"""Run logging: metrics.jsonl (one JSON object per logged step) and TensorBoard.
Created on rank 0 only; other ranks get a logger that writes nothing."""
from __future__ import annotations

import json
import os
from pathlib import Path


class RunLogger:
    def __init__(self, run_dir: str | os.PathLike, enabled: bool) -> None:
        self.enabled = enabled
        self.tb = None
        self.file = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

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
