"""Search with a trained model: text → image, image → text, zero-shot tagging. Queries are
embedded by `phoclip.models.embed` (prepared as the shards' captions were); the index
lives in `phoclip.search.index`, result pictures in `phoclip.search.gallery`."""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from phoclip.models.embed import embed_images, embed_texts
from phoclip.search.index import EmbeddingIndex, Match

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("một bức ảnh về {}", "ảnh chụp {}", "{}")


def find_matches(model, index: EmbeddingIndex, queries: Sequence[str], text_processor,
                 k: int = 25, backend: str = "exact") -> list[list[Match]]:
    """Text → image: the k best images of the index for each Vietnamese query."""
    index.check_model(model)
    q = embed_texts(model, text_processor, queries)
    return _matches(index, q, k, "images", backend)


def find_captions(model, index: EmbeddingIndex, images: Sequence, k: int = 25,
                  backend: str = "exact") -> list[list[Match]]:
    """Image → text: the k best *distinct* captions of the index for each PIL image (a
    caption shared by several images, or written twice, is listed once, at its best)."""
    index.check_model(model)
    q = embed_images(model, images, model.config["vision"].get("image_size", 224))
    return caption_matches(index, q, k, backend)


def caption_matches(index: EmbeddingIndex, q: torch.Tensor, k: int, backend: str = "exact",
                    over_fetch: int = 4) -> list[list[Match]]:
    """The k best captions for each query row, duplicates of a caption's text dropped
    (searched `over_fetch` x k deep, then ranked again)."""
    s, i = index.topk(q, k * over_fetch, "captions", backend)
    out = []
    for a in range(s.shape[0]):
        seen, row = set(), []
        for r in range(s.shape[1]):
            it = index.item("captions", int(i[a, r]))
            text = " ".join(str(it.get("caption") or "").split()).casefold()
            if text in seen:
                continue
            seen.add(text)
            row.append(Match(len(row) + 1, float(s[a, r]), int(i[a, r]), it))
            if len(row) == k:
                break
        out.append(row)
    return out


def _matches(index, q, k, kind, backend):
    return index.search(q, k, kind, backend)


def zero_shot_tags(model, index: EmbeddingIndex, tags: Sequence[str], text_processor,
                   templates: Sequence[str] = DEFAULT_TEMPLATES, k: int = 3) -> list[list[tuple[str, float]]]:
    """Top-k tags for every image of the index; each tag's embedding is the normalised
    mean of its prompt templates' embeddings (as open_clip builds zero-shot classifiers).
    An image whose index row was skipped at load (not a finite unit vector) gets []."""
    index.check_model(model)
    W = tag_embeddings(model, tags, text_processor, templates)
    sc = index.embeddings("images") @ W.T
    top = sc.topk(min(k, len(tags)), dim=1)
    bad = set(index.bad_ids("images").tolist())
    return [[] if n in bad else [(tags[int(j)], float(v)) for v, j in zip(vs, js)]
            for n, (vs, js) in enumerate(zip(top.values, top.indices))]


def tag_embeddings(model, tags: Sequence[str], text_processor, templates: Sequence[str] = DEFAULT_TEMPLATES,
                   batch: int = 256) -> torch.Tensor:
    """[len(tags), dim]: each tag's normalised mean over its prompt templates, embedded
    in batches (one forward per `batch` prompts, not one per tag)."""
    prompts = [tpl.format(t) for t in tags for tpl in templates]
    emb = torch.cat([embed_texts(model, text_processor, prompts[s:s + batch])
                     for s in range(0, len(prompts), batch)])
    return torch.nn.functional.normalize(emb.view(len(tags), len(templates), -1).mean(1), dim=1)


def zero_shot_accuracy(predicted: Sequence[str], labels: Sequence[str]) -> float:
    """Top-1 accuracy (percent) of predicted tags against class labels."""
    if not labels:
        return 0.0
    return 100.0 * sum(p == l for p, l in zip(predicted, labels)) / len(labels)
