"""Captions packed for the text tower: the batch's padding trimmed (`trim_padding`), or
its captions packed end to end into rows with a block-diagonal attention mask
(`pack_captions`), both exact: every caption's embedding is that of the padded batch."""
from __future__ import annotations

import bisect
from typing import NamedTuple, Optional

import numpy as np
import torch


def trim_padding(input_ids: torch.Tensor, pad_id: int, multiple_of: int = 1) -> torch.Tensor:
    """Drop the columns after the batch's longest caption (rounded up to `multiple_of`,
    never past the original width). Exact: pads are masked out of attention and
    pooling, and RoBERTa's position ids count only non-pad tokens, so every caption's
    embedding is the same as with the padded batch. Call it on the CPU ids, before the
    copy to the device: on a GPU tensor finding the width would be a host sync."""
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        return input_ids
    used = (input_ids != pad_id).any(0).nonzero()
    n = int(used.max()) + 1 if used.numel() else 1
    if multiple_of > 1:
        n = -(-n // multiple_of) * multiple_of
    n = min(n, input_ids.shape[1])
    return input_ids if n == input_ids.shape[1] else input_ids[:, :n]


# how a tower numbers the positions of a padded row: RoBERTa-style counts the real tokens
# after the padding index (pads get the padding index), BERT-style numbers every slot from 0
POSITION_STYLES = {"roberta": "roberta", "xlm-roberta": "roberta", "camembert": "roberta", "bert": "bert"}


class TextPacking(NamedTuple):
    """A batch's captions packed end to end into rows (`pack_captions`)."""

    ids: torch.Tensor        # [R, P] token ids; pad where a row has room left
    positions: torch.Tensor  # [R, P] each token's position id, as in its padded row
    segments: torch.Tensor   # [R, P] the caption each slot holds; -1: room left
    gather: torch.Tensor     # [B, Lmax] each caption's real tokens' slots in the flattened rows (R*P: none)
    lengths: torch.Tensor    # [B] real (non-pad) tokens per caption
    starts: torch.Tensor     # [B] each caption's first slot in the flattened rows

    def to(self, device, non_blocking: bool = False) -> "TextPacking":
        return TextPacking(*(t.to(device, non_blocking=non_blocking) for t in self))

    @property
    def computed_tokens(self) -> int:
        return self.ids.numel()


def pack_captions(input_ids: torch.Tensor, pad_id: int, position_style: str = "roberta",
                  row_tokens: Optional[int] = None) -> TextPacking:
    """Pack a batch's captions end to end into rows (best fit, longest first), so one
    text-tower forward computes about the real tokens instead of every caption at the
    batch's longest (fill and speed: bench/RESULTS.md). The rows are as wide as
    the trimmed batch (its longest caption rounded up to 8) unless `row_tokens` is
    wider: each token's attention then spans no more than it did trimmed (wider rows
    filled no better).

    Exact: a block-diagonal attention mask keeps each caption's attention on its own
    real tokens, its position ids are those of its padded row (`position_style`, see
    POSITION_STYLES), and every other layer works token by token; so each caption's
    embedding, the loss over the whole batch and every gradient are those of the padded
    batch (dropout draws its masks in another shape). A pad inside a caption stays what
    it is in the padded row: never a key, not pooled. Call it on the CPU ids, as
    trim_padding: it reads the lengths."""
    if position_style not in ("roberta", "bert"):
        raise ValueError(f"position_style must be roberta or bert, not {position_style!r}")
    # numpy, not torch: a few hundred microseconds single-threaded, where torch's small
    # CPU ops waited on their thread pool for tens of ms on a busy machine
    x = input_ids.numpy()
    n, width = x.shape
    real = x != pad_id
    span = np.where(real, np.arange(1, width + 1), 0).max(1).clip(min=1)  # up to the last real token
    L = span.tolist()
    P = max(row_tokens or 0, -(-max(L) // 8) * 8)
    row, off = np.zeros(n, np.int64), np.zeros(n, np.int64)
    rooms, rows = [], 0  # (room left, row), sorted: the first that fits fits best
    for i in sorted(range(n), key=lambda i: -L[i]):
        j = bisect.bisect_left(rooms, (L[i], -1))
        if j == len(rooms):
            room, r = P, rows
            rows += 1
        else:
            room, r = rooms.pop(j)
        row[i], off[i] = r, P - room
        if room > L[i]:
            bisect.insort(rooms, (room - L[i], r))
    tok = np.repeat(np.arange(n), span)                              # each token's caption
    k = np.arange(len(tok)) - np.repeat(np.cumsum(span) - span, span)  # its index in the caption
    starts = row * P + off
    dest = starts[tok] + k                                           # its slot
    ids = np.full(rows * P, pad_id, dtype=x.dtype)
    ids[dest] = x[tok, k]
    if position_style == "roberta":  # as create_position_ids_from_input_ids
        pos, empty = np.where(real, pad_id + np.cumsum(real, 1), pad_id), pad_id
    else:
        pos, empty = np.broadcast_to(np.arange(width), (n, width)), 0
    positions = np.full(rows * P, empty, dtype=np.int64)
    positions[dest] = pos[tok, k]
    segments = np.full(rows * P, -1, dtype=np.int64)
    segments[dest] = tok
    gather = np.full((n, max(L)), rows * P, dtype=np.int64)
    gather[tok, k] = np.where(real[tok, k], dest, rows * P)  # pads inside a caption: not pooled
    t = torch.from_numpy
    return TextPacking(t(ids).view(rows, P), t(positions).view(rows, P), t(segments).view(rows, P), t(gather),
                       t(real.sum(1)), t(starts))
