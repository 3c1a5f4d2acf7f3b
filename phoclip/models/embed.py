"""Embedding with a model: queries prepared as the shards' captions were (Unicode NFC, the
segmenter and max length the model records, its tokenizer), images preprocessed as at
evaluation. The Python API (`phoclip.models.api`), search, evaluation and the service
embed through these."""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import torch

from phoclip.data.images import to_rgb
from phoclip.data.text import TextProcessor, create_segmenter, load_tokenizer
from phoclip.data.transforms import image_to_tensor
from phoclip.models.packing import trim_padding

logger = logging.getLogger(__name__)


def query_processor(model, tokenizer_name: str, segmenter: Optional[str] = None,
                    vncorenlp_dir: Optional[str] = None):
    """The TextProcessor that prepares queries as the model's training captions were:
    the segmenter and max length the model records (`segmenter` overrides the name;
    VnCoreNLP's folder: `vncorenlp_dir`, else $VNCORENLP_DIR)."""
    tc = model.config["text"]
    name = segmenter or tc.get("segmenter")
    if not name:
        raise ValueError("the model does not record which segmenter its captions were made with "
                         "(a model saved without it): pass --segmenter NAME, the one "
                         "its shards' manifest.json names")
    seg = create_segmenter(name, vncorenlp_dir)
    want = tc.get("segmenter_version")
    if name == tc.get("segmenter") and want and want != seg.version:
        logger.warning("the model's captions were segmented with %s %s, queries now with %s: "
                       "results may differ slightly", name, want, seg.version)
    return TextProcessor(load_tokenizer(tokenizer_name), seg, int(tc.get("max_length", 70)))


@torch.no_grad()
def embed_texts(model, text_processor, texts: Sequence[str], device="cpu") -> torch.Tensor:
    """Normalise and segment as at sharding time, tokenize, embed."""
    _, ids = text_processor(list(texts))
    model.eval()
    x = torch.from_numpy(ids.astype(np.int64))
    if hasattr(model, "pad_id"):  # no compute on padding (exact)
        x = trim_padding(x, model.pad_id, 8)
    return model.encode_text(x.to(device)).float().cpu()


@torch.no_grad()
def embed_images(model, images: Sequence, image_size: int, device="cpu") -> torch.Tensor:
    model.eval()
    x = torch.stack([image_to_tensor(to_rgb(im), image_size, train=False) for im in images])
    return model.encode_image(x.to(device)).float().cpu()
