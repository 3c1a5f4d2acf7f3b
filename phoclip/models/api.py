"""The Python API: load a trained model and embed photos and Vietnamese sentences.

    import phoclip
    model = phoclip.load("demo_out/run")                  # or a run/checkpoint folder; backend="onnx"
    img = model.embed_images(["photo.jpg"])                   # paths or PIL images -> [n, d], L2-normalised
    txt = model.embed_texts(["Một con chó chạy trên bãi cỏ"]) # raw Vietnamese
    print(model.similarity(img, txt))                         # cosine matrix [n_images, n_texts]

Texts are prepared as the model's training captions were (Unicode NFC, the segmenter
its folder records, its tokenizer and max length); images as evaluation prepares them
(safe decoding, RGB, the centre crop at the model's image size)."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from phoclip.data.images import BadImage, read_image_file
from phoclip.models.loading import Loaded, load_encoder
from phoclip.search import query

logger = logging.getLogger(__name__)

ImageLike = Any  # a path (str or os.PathLike) or a PIL image
PROGRESS_EVERY_S = 10.0  # a long embedding logs its progress at most this often


class PhoCLIPModel:
    """A loaded model, ready to embed: `embed_images`, `embed_texts`, `similarity`;
    `.backend` ("torch" or "onnx"), `.config` (the model config), `.device` (where the
    PyTorch model runs; onnxruntime takes host tensors: cpu). `.module` is the encoder
    itself (a `PhoCLIP`, or an `OnnxModel`) and `.tokenizer_path` its tokenizer, for the
    library functions that take them (index building, search, evaluation)."""

    def __init__(self, loaded: Loaded, path: Path, backend: str, device: torch.device,
                 segmenter: Optional[str] = None, vncorenlp_dir: Optional[str] = None) -> None:
        self.module = loaded.module
        self.tokenizer_path = loaded.tokenizer_path
        self.path = path
        self.backend = backend
        self.device = device
        self._segmenter, self._vncorenlp_dir = segmenter, vncorenlp_dir
        self._processor = None

    def __repr__(self) -> str:
        return (f"PhoCLIPModel({str(self.path)!r}, backend={self.backend!r}, device={str(self.device)!r}, "
                f"embed_dim={self.embed_dim})")

    @property
    def config(self) -> dict:
        return self.module.config

    @property
    def embed_dim(self) -> int:
        return int(self.config["embed_dim"])

    @property
    def image_size(self) -> int:
        return int(self.config["vision"].get("image_size", 224))

    @property
    def text_processor(self):
        """Queries prepared as the training captions were (built on first use: a
        segmenter such as VnCoreNLP takes seconds to start)."""
        if self._processor is None:
            if not self.tokenizer_path:
                raise ValueError(f"{self.path}: the model records no tokenizer (a tokenizer/ folder or "
                                 "text.tokenizer in its config): texts cannot be prepared")
            if not (self._segmenter or self.config["text"].get("segmenter")):
                raise ValueError(f"{self.path}: the model does not record which segmenter its captions were "
                                 "made with (exported before that was recorded): pass phoclip.load(..., "
                                 "segmenter=NAME), the one its shards' manifest.json names")
            self._processor = query.query_processor(self.module, self.tokenizer_path, self._segmenter, self._vncorenlp_dir)
        return self._processor

    def embed_images(self, images: Union[ImageLike, Sequence[ImageLike]], batch_size: int = 32) -> torch.Tensor:
        """[n, embed_dim] L2-normalised float32 (on the CPU) for image files or PIL images.
        A file that is not a decodable image is refused: ValueError naming it."""
        items = [images] if isinstance(images, (str, os.PathLike)) or hasattr(images, "mode") else list(images)

        def run(chunk):
            return query.embed_images(self.module, [_open_image(x) for x in chunk], self.image_size, self.device)

        return self._batched(items, batch_size, run, "images")

    def embed_texts(self, texts: Union[str, Sequence[str]], batch_size: int = 256) -> torch.Tensor:
        """[n, embed_dim] L2-normalised float32 (on the CPU) for raw Vietnamese texts: NFC,
        word segmentation and tokenisation as the model was trained."""
        items = [texts] if isinstance(texts, str) else list(texts)
        bad = next((type(t).__name__ for t in items if not isinstance(t, str)), None)
        if bad:
            raise TypeError(f"embed_texts takes strings, got a {bad}")
        proc = self.text_processor
        return self._batched(items, batch_size, lambda chunk: query.embed_texts(self.module, proc, chunk, self.device), "texts")

    @staticmethod
    def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity [len(a), len(b)] of two sets of embeddings (rows
        normalised here too, so any embeddings give cosines)."""
        a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
        return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T

    def _batched(self, items: list, batch_size: int, run, what: str) -> torch.Tensor:
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
        if not items:
            return torch.empty(0, self.embed_dim)
        out, t0 = [], time.monotonic()
        last = t0
        for s in range(0, len(items), batch_size):
            out.append(run(items[s:s + batch_size]).float().cpu())
            now, done = time.monotonic(), min(s + batch_size, len(items))
            if now - last >= PROGRESS_EVERY_S and done < len(items):
                last = now
                logger.info("embedded %d/%d %s (%.1f/s)", done, len(items), what, done / (now - t0))
        return torch.cat(out)


def _open_image(x: Any):
    """A PIL image as given, or a file decoded safely (caps on bytes and pixels)."""
    if hasattr(x, "mode") and hasattr(x, "convert"):
        return x
    try:
        return read_image_file(x)
    except BadImage as e:
        raise ValueError(f"{x}: not a usable image ({e})") from None


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """None or "auto": the GPU when there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load(path: Union[str, os.PathLike], backend: str = "torch", device: Union[str, torch.device, None] = None, *,
         segmenter: Optional[str] = None, vncorenlp_dir: Optional[str] = None) -> PhoCLIPModel:
    """Load a trained model for inference: an exported model folder, a run folder (its
    exported model, else its newest checkpoint that verifies), a checkpoint folder (only
    its model weights, read with weights_only=True after the folder verified), or with
    backend="onnx" an exported folder's ONNX towers run by onnxruntime. No training code
    is imported. `segmenter` overrides the one the model records (needed only for models
    exported before it was recorded); VnCoreNLP's folder: `vncorenlp_dir` or
    $VNCORENLP_DIR."""
    dev = torch.device("cpu") if backend == "onnx" else resolve_device(device)
    return PhoCLIPModel(load_encoder(path, backend, dev), Path(path), backend, dev, segmenter, vncorenlp_dir)

