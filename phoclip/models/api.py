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
import stat
import sys
import time
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional, Sequence, Union

import torch
from PIL import Image
from tqdm.auto import tqdm

from phoclip.data.images import MAX_FILE_BYTES, BadImage, probe_image, read_image_file
from phoclip.models.loading import Loaded, load_encoder
from phoclip.models import embed

logger = logging.getLogger(__name__)

ImageLike = Any  # a path (str or os.PathLike) or a PIL image
PROGRESS_EVERY_S = 10.0  # a long embedding logs its progress at most this often
SKIPPED_NAMED = 5  # the skipped images a warning names (all are in ImageEmbeddings.skipped)


class ImageEmbeddings(NamedTuple):
    """What `embed_images(..., on_error="skip")` returns: the embeddings of the usable
    images, the position in the input of each row, and what was skipped as
    (position, the item as given, why)."""

    embeddings: torch.Tensor
    indices: list[int]
    skipped: list[tuple[int, Any, str]]


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
                                 "made with (a model saved without it): pass phoclip.load(..., "
                                 "segmenter=NAME), the one its shards' manifest.json names")
            self._processor = embed.query_processor(self.module, self.tokenizer_path, self._segmenter, self._vncorenlp_dir)
        return self._processor

    def embed_images(self, images: Union[ImageLike, Sequence[ImageLike]], batch_size: int = 32, *,
                     on_error: Literal["raise", "skip"] = "raise",
                     progress: bool = True) -> Union[torch.Tensor, ImageEmbeddings]:
        """[n, embed_dim] L2-normalised float32 (on the CPU) for image files (str or
        os.PathLike) or PIL images, row i for image i.

        Every path is checked before any image is embedded: it must be a regular file no
        larger than 64 MiB whose header is an image format Pillow reads. Where one is not
        (or a file turns out undecodable while embedding), `on_error="raise"` (the
        default: the rows always match the input, as open_clip's and
        sentence-transformers' encoders) raises ValueError naming the first and counting
        the others; `on_error="skip"` embeds the usable ones, logs a warning naming the
        first few skipped, and returns an `ImageEmbeddings` (`.embeddings`, `.indices`:
        the input position of each row, `.skipped`: (position, item, why)). An empty
        list, or none usable, is a ValueError either way. An int (a file descriptor to
        open()) or bytes is a TypeError.

        progress: a bar in a terminal or a notebook, a log line every 10 s elsewhere,
        for calls of more than one batch; False for neither."""
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        items = _image_items(images)
        checked = [_check_image(x) for x in items]
        bad = [(i, items[i], why) for i, why in enumerate(checked) if why]
        if bad and on_error == "raise":
            i, x, why = bad[0]
            more = f" (and {len(bad) - 1:,} more of {len(items):,})" if len(bad) > 1 else ""
            raise ValueError(f"{x}: not a usable image ({why}){more}; nothing was embedded: "
                             "on_error='skip' embeds the others and says which were skipped")
        keep = [i for i, why in enumerate(checked) if not why]
        if not keep:
            raise ValueError(f"none of the {len(items):,} images is usable (first: {bad[0][1]}: {bad[0][2]})")
        skipped = list(bad)

        def run(chunk: list[int]) -> torch.Tensor:
            opened, ok = [], []
            for i in chunk:
                x = items[i]
                try:  # decoded safely (caps on bytes and pixels)
                    opened.append(x if _is_pil(x) else read_image_file(x))
                    ok.append(i)
                except BadImage as e:  # a header that read well, then data that did not
                    if on_error == "raise":
                        raise ValueError(f"{x}: not a usable image ({e})") from None
                    skipped.append((i, x, str(e)))
            rows.extend(ok)
            if not opened:
                return torch.empty(0, self.embed_dim)
            return embed.embed_images(self.module, opened, self.image_size, self.device)

        rows: list[int] = []
        emb = self._batched(keep, batch_size, run, "images", progress)
        if on_error == "raise":
            return emb
        if not rows:
            raise ValueError(f"none of the {len(items):,} images is usable (first: {skipped[0][1]}: {skipped[0][2]})")
        skipped.sort(key=lambda s: s[0])
        if skipped:
            named = ", ".join(f"{x} ({why})" for _, x, why in skipped[:SKIPPED_NAMED])
            logger.warning("skipped %d of %d images (not usable): %s%s", len(skipped), len(items), named,
                           ", ..." if len(skipped) > SKIPPED_NAMED else "")
        return ImageEmbeddings(emb, rows, skipped)

    def embed_texts(self, texts: Union[str, Sequence[str]], batch_size: int = 256, *,
                    progress: bool = True) -> torch.Tensor:
        """[n, embed_dim] L2-normalised float32 (on the CPU) for raw Vietnamese texts: NFC,
        word segmentation and tokenisation as the model was trained. `progress`: as
        `embed_images`."""
        items = [texts] if isinstance(texts, str) else list(texts)
        bad = next((type(t).__name__ for t in items if not isinstance(t, str)), None)
        if bad:
            raise TypeError(f"embed_texts takes strings, got a {bad}")
        proc = self.text_processor
        return self._batched(items, batch_size, lambda chunk: embed.embed_texts(self.module, proc, chunk, self.device),
                             "texts", progress)

    @staticmethod
    def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity [len(a), len(b)] of two sets of embeddings (rows
        normalised here too, so any embeddings give cosines)."""
        a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
        return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T

    def _batched(self, items: list, batch_size: int, run, what: str, progress: bool = True) -> torch.Tensor:
        if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
        if not items:
            return torch.empty(0, self.embed_dim)
        several = progress and len(items) > batch_size
        bar = tqdm(total=len(items), unit=what[:-1], desc="embedding") if several and _interactive() else None
        out, t0 = [], time.monotonic()
        last = t0
        try:
            for s in range(0, len(items), batch_size):
                out.append(run(items[s:s + batch_size]).float().cpu())
                now, done = time.monotonic(), min(s + batch_size, len(items))
                if bar is not None:
                    bar.update(done - bar.n)
                elif several and now - last >= PROGRESS_EVERY_S and done < len(items):
                    last = now
                    logger.info("embedded %d/%d %s (%.1f/s)", done, len(items), what, done / (now - t0))
        finally:
            if bar is not None:
                bar.close()
        return torch.cat(out)


def _interactive() -> bool:
    """A person watching: stderr is a terminal, or this runs in a notebook's kernel
    (where tqdm.auto draws its widget); elsewhere (a pipe, a log file, a job) progress
    goes to log lines."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


def _image_items(images: Any) -> list:
    """The input as a list of items, or a one-line TypeError for what is no image path:
    open() takes an int as a file descriptor, and list(b"...") is ints."""
    if isinstance(images, (str, os.PathLike)) or _is_pil(images):
        return [images]
    if isinstance(images, (bytes, bytearray, memoryview, int)):
        raise TypeError(f"embed_images takes image paths (str or pathlib.Path) or PIL images, not "
                        f"{type(images).__name__}")
    try:
        items = list(images)
    except TypeError:
        raise TypeError(f"embed_images takes image paths (str or pathlib.Path) or PIL images, not "
                        f"{type(images).__name__}") from None
    if not items:
        raise ValueError("embed_images got no images (an empty list: an empty folder, or a pattern that "
                         "matched nothing?)")
    for i, x in enumerate(items):
        if not (isinstance(x, (str, os.PathLike)) or _is_pil(x)) or isinstance(x, bytes):
            raise TypeError(f"embed_images takes image paths (str or pathlib.Path) or PIL images; item {i} is "
                            f"{type(x).__name__}" + (" (not taken as a file descriptor)" if isinstance(x, int) else ""))
    return items


def _is_pil(x: Any) -> bool:
    return isinstance(x, Image.Image)


def _check_image(x: Any) -> str:
    """Why `x` cannot be embedded, from what is cheap to learn (a stat and the
    format's header), or "" (a PIL image, a file that looks usable)."""
    if _is_pil(x):
        return ""
    try:
        st = os.stat(x)
    except FileNotFoundError:
        return "no such file"
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if stat.S_ISDIR(st.st_mode):
        return "a folder: pass its pictures, e.g. sorted(Path(folder).rglob('*.jpg'))"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size > MAX_FILE_BYTES:
        return f"{st.st_size:,} bytes, over {MAX_FILE_BYTES:,}"
    try:
        with open(x, "rb") as f:
            head = f.read(1 << 16)  # enough for a format's header and its size
        probe_image(head)
    except BadImage as e:
        if e.reason not in ("corrupt",):  # a header cut at 64 KiB reads as corrupt: decided when decoded
            return str(e)
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    return ""


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
    is imported. `segmenter` overrides the one the model records (needed only for a
    model that records none); VnCoreNLP's folder: `vncorenlp_dir` or
    $VNCORENLP_DIR."""
    dev = torch.device("cpu") if backend == "onnx" else resolve_device(device)
    return PhoCLIPModel(load_encoder(path, backend, dev), Path(path), backend, dev, segmenter, vncorenlp_dir)

