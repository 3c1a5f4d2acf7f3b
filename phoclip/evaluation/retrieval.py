"""Retrieval metrics and embedding extraction.

Recall is computed in chunks of queries, so a gallery of 100k+ images never needs the
full similarity matrix in memory. Ties count in the query's favour (rank = number of
items scoring strictly higher).

One protocol for a run's validation and phoclip-eval (`evaluate_shards`): the eval crop
at the model's image size, EVAL_BATCH_SIZE images per forward with their captions packed,
the weights' own precision (fp32 for every saved model: no autocast), model.eval(), and
the tie rule above; so both give the same numbers to the last digit on the CPU
(docs/evaluation.md names where they can still differ)."""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from phoclip.data.catalog import count_samples
from phoclip.data.samples import decode_counted
from phoclip.data.tar import read_shards
from phoclip.data.transforms import image_to_tensor
from phoclip.evaluation import EVAL_BATCH_SIZE
from phoclip.models.packing import trim_padding

logger = logging.getLogger(__name__)


class ProgressLog:
    """Progress of a long loop as log lines, at most one per `every_s` seconds (and one at
    the end): done / total, rate and time left. Through logging, not a terminal bar, so a
    SLURM log or a pipe shows it too."""

    def __init__(self, what: str, total: Optional[int] = None, unit: str = "images", every_s: float = 10.0,
                 enabled: bool = True, log: logging.Logger = logger) -> None:
        self.what, self.total, self.unit, self.every_s, self.enabled, self.log = what, total, unit, every_s, enabled, log
        self.done = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        """Count `n` more done; log a line when `every_s` has passed since the last one."""
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            self.log.info("%s", self.line(now))

    def line(self, now: Optional[float] = None) -> str:
        """`what: done / total unit (pct), rate/s, ~left` (total and time left when known)."""
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        rate = self.done / elapsed
        of = f" / {self.total:,}" if self.total else ""
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        left = (f", ~{(self.total - self.done) / rate:.0f} s left"
                if self.total and rate > 0 and self.done < self.total else "")
        return f"{self.what}: {self.done:,}{of} {self.unit}{pct}, {rate:.1f} {self.unit}/s, {elapsed:.0f} s{left}"

    def close(self) -> None:
        """The final line (when enabled)."""
        if self.enabled:
            self.log.info("%s (done)", self.line())


def _summ(ranks: torch.Tensor, prefix: str, ks=(1, 5, 10)) -> dict[str, float]:
    out = {f"{prefix}_R@{k}": float((ranks < k).double().mean() * 100) for k in ks}
    out[f"{prefix}_mean_rank"] = float((ranks + 1).double().mean())
    out[f"{prefix}_median_rank"] = float((ranks + 1).float().median())
    return out


@torch.no_grad()
def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      text_to_image: torch.Tensor, chunk: int = 4096,
                      ks=(1, 5, 10)) -> dict[str, float]:
    """R@k (percent), mean and median rank, text→image and image→text.

    text_to_image[j] is the index of caption j's image. Image→text counts a hit when
    any of the image's captions is in the top k."""
    img, txt = image_features.float(), text_features.float()
    t2i = text_to_image.long()
    n_img = img.shape[0]
    t2i_ranks = []
    for s in range(0, txt.shape[0], chunk):
        sc = txt[s:s + chunk] @ img.T
        own = sc.gather(1, t2i[s:s + chunk, None])
        t2i_ranks.append((sc > own).sum(1))
    # best score among each image's own captions
    i2t_ranks = []
    for s in range(0, n_img, chunk):
        sc = img[s:s + chunk] @ txt.T                              # [c, M]
        rows = torch.arange(s, min(s + chunk, n_img))
        own_mask = t2i[None, :] == rows[:, None]                   # [c, M]
        best_own = sc.masked_fill(~own_mask, float("-inf")).max(1, keepdim=True).values
        i2t_ranks.append((sc > best_own).sum(1))
    out = _summ(torch.cat(t2i_ranks), "t2i", ks)
    out.update(_summ(torch.cat(i2t_ranks), "i2t", ks))
    out["n_images"], out["n_captions"] = float(n_img), float(txt.shape[0])
    return out


def weights_dtype(model) -> Optional[torch.dtype]:
    """The dtype to autocast an evaluation to: None (plain fp32) where the weights are
    fp32, whatever precision the run trains in (autocast is a forward mode, not the
    model); the weights' own dtype where an engine cast them (DeepSpeed fp16, or a
    "bf16" block), the only precision such a model computes in."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32) \
        if hasattr(model, "parameters") else torch.float32
    return None if dtype == torch.float32 else dtype


def eval_memory_format(model, device: torch.device) -> None:
    """The image tower's memory layout of a run's validation under train.channels_last
    auto (DDP): channels_last on CUDA, as it was trained, so phoclip-eval runs the same
    kernels; left as it is on the CPU (contiguous, training's default there)."""
    if device.type == "cuda" and isinstance(getattr(model, "visual", None), torch.nn.Module):
        model.visual.to(memory_format=torch.channels_last)


def chance_recall(n_images: int, k: int) -> float:
    """R@k of a random ranking, in percent."""
    return 100.0 * min(k, n_images) / max(n_images, 1)


@torch.no_grad()
def embed_samples(model, samples: Iterable[dict], device: torch.device, batch_size: int = EVAL_BATCH_SIZE,
                  autocast_dtype: Optional[torch.dtype] = None, progress: bool = False,
                  lockstep: bool = False, pack_captions: bool = True, total: Optional[int] = None,
                  progress_every_s: float = 10.0):
    """Embed images and all their captions. Returns (image feats [N,D], text feats [M,D],
    text_to_image [M] (local indices), keys [N], metas [N]).

    progress: log a line every `progress_every_s` seconds (images done / `total` when
    known, rate, time left) and one at the end.

    autocast_dtype: None computes in the weights' precision (`weights_dtype`: fp32 for
    a saved model and for a DDP run, whatever its train.precision).

    pack_captions: a batch's captions go through the text tower packed into rows
    (`PhoCLIP.pack_text`: the same embeddings, about the real tokens computed); models
    without `pack_text` (ONNX) get the trimmed batch.

    lockstep: every rank of the process group runs the same number of image and text
    forwards (a rank out of samples, or with a batch without captions, runs a one-row
    dummy whose output is dropped). Needed where a forward is itself a collective
    (ZeRO-3 gathers each layer's weights), so ranks with fewer samples do not hang."""
    from itertools import islice

    model.eval()
    autocast_dtype = autocast_dtype or weights_dtype(model)
    img_f, txt_f, t2i, keys, metas = [], [], [], [], []
    ctx = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else \
        (lambda: torch.autocast(device.type, enabled=False))
    size = int(model.config["vision"].get("image_size", 224))
    it = iter(samples)
    bar = ProgressLog("embedding", total, enabled=progress, every_s=progress_every_s)
    while True:
        buf = list(islice(it, batch_size))
        if lockstep:
            more = torch.tensor([float(bool(buf))], device=device)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if not more.item():
                break
        elif not buf:
            break
        with ctx():
            if buf:
                ims = torch.stack([b["image"] for b in buf]).to(device)
                img_f.append(model.encode_image(ims).float().cpu())
            elif lockstep:
                model.encode_image(torch.zeros(1, 3, size, size, device=device))
            ids = torch.cat([b["ids"] for b in buf]) if buf else torch.zeros(0, 2)
            if ids.shape[0] and hasattr(model, "pad_id"):  # no compute on padding (exact)
                ids = trim_padding(ids, model.pad_id, 8)
            packing = model.pack_text(ids) if pack_captions and ids.shape[0] and hasattr(model, "pack_text") else None
            if packing is not None:  # one forward, still: lockstep holds
                txt_f.append(model.encode_text(ids.to(device), packing=packing.to(device)).float().cpu())
            elif ids.shape[0]:  # a folder of photos has no captions
                txt_f.append(model.encode_text(ids.to(device)).float().cpu())
            elif lockstep:
                model.encode_text(torch.tensor([[0, 2]], device=device))
        base = len(keys)
        for i, b in enumerate(buf):
            t2i.extend([base + i] * b["ids"].shape[0])
            keys.append(b["key"])
            metas.append(dict(b.get("meta", {}), **{"__shard_url__": b.get("url", "")}))  # webdataset-style: not a caption field
        bar.update(len(buf))
    bar.close()
    d = model.config["embed_dim"]
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, d)
    return cat(img_f), cat(txt_f), torch.tensor(t2i, dtype=torch.long), keys, metas


def gather_embeddings(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, keys: list,
                      metas: list, world_size: int):
    """Concatenate every rank's part (rank order); text_to_image re-indexed globally."""
    if world_size == 1:
        return img, txt, t2i, keys, metas
    parts: list = [None] * world_size
    dist.all_gather_object(parts, (img.numpy(), txt.numpy(), t2i.numpy(), keys, metas))
    all_img, all_txt, all_t2i, all_keys, all_metas = [], [], [], [], []
    offset = 0
    for r_img, r_txt, r_t2i, r_keys, r_metas in parts:
        all_img.append(torch.from_numpy(r_img))
        all_txt.append(torch.from_numpy(r_txt))
        all_t2i.append(torch.from_numpy(r_t2i) + offset)  # image indices: global
        all_keys.extend(r_keys)
        all_metas.extend(r_metas)
        offset += r_img.shape[0]
    return torch.cat(all_img), torch.cat(all_txt), torch.cat(all_t2i), all_keys, all_metas


def gather_counts(counts: Counter, world_size: int) -> Counter:
    """Sum every rank's counter (e.g. skipped samples by reason)."""
    if world_size == 1:
        return Counter(counts)
    parts: list = [None] * world_size
    dist.all_gather_object(parts, dict(counts))
    out: Counter = Counter()
    for p in parts:
        out.update(p)
    return out


def evaluate_shards(model, urls: list[str], image_size: int, device: torch.device,
                    rank: int = 0, world_size: int = 1, batch_size: int = EVAL_BATCH_SIZE,
                    autocast_dtype: Optional[torch.dtype] = None, progress: bool = False,
                    return_embeddings: bool = False, lockstep: bool = False,
                    ids_width: Optional[int] = None, vocab_size: Optional[int] = None,
                    manifest: Optional[str] = None, pack_captions: bool = True):
    """Embed the shards (each rank its part), gather, and compute the recalls; the
    samples skipped (by reason, all ranks) are in the result as `skipped`. With
    return_embeddings: (metrics, image features, keys, metas). `lockstep` and
    `pack_captions`: see `embed_samples`. `ids_width`/`vocab_size`: see `decode_ids`.
    With `progress`, the lines count against this rank's share of the samples (sizes.json).

    The evaluation protocol (module doc): a run's validation and phoclip-eval call this
    with its defaults for `batch_size`, `autocast_dtype` and `pack_captions`, so the
    same weights on the same shards give the same numbers."""
    skipped: Counter = Counter()
    total = None
    if progress:
        try:
            total = count_samples(urls[rank::world_size], manifest)
        except (ValueError, OSError):  # shards without sizes.json: progress without a total
            total = None
    parts = embed_samples(model, eval_samples(urls, image_size, rank, world_size, skipped, ids_width,
                                              vocab_size, manifest), device, batch_size, autocast_dtype, progress, lockstep,
                          pack_captions, total)
    img, txt, t2i, keys, metas = gather_embeddings(*parts, world_size)
    skipped = gather_counts(skipped, world_size)
    if img.shape[0] == 0:
        raise ValueError(f"no images could be read from the evaluation shards {urls[:3]} "
                         f"(skipped: {dict(skipped) or 'none'})")
    res = retrieval_metrics(img, txt, t2i)
    res["skipped"] = dict(sorted(skipped.items()))
    return (res, img, keys, metas) if return_embeddings else res


def eval_samples(urls: list[str], image_size: int, rank: int = 0, world_size: int = 1,
                 skipped: Optional[Counter] = None, ids_width: Optional[int] = None,
                 vocab_size: Optional[int] = None, manifest: Optional[str] = None) -> Iterator[dict]:
    """Each image once, with all its captions, in shard order; this rank's shards only.
    Unusable samples are skipped and counted in `skipped` by reason."""
    skipped = skipped if skipped is not None else Counter()
    shards = ({"url": u} for u in urls[rank::world_size])
    for sample in read_shards(shards, skipped, manifest):
        decoded = decode_counted(sample, skipped, ids_width, vocab_size)
        if decoded is None:
            continue
        img, ids, meta = decoded
        yield {"key": sample["__key__"], "image": image_to_tensor(img, image_size, train=False),
               "ids": torch.from_numpy(ids), "meta": meta,
               "url": sample.get("__url__", "")}
