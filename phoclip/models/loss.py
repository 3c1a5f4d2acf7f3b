"""Contrastive losses over the global batch.

All communication is in `gather_features`; with `world_size=1` nothing is gathered.
Features are gathered *with gradient*: the gradient that flows into each rank's own
features then includes the terms from every other rank's rows, so after DDP's
gradient averaging each parameter's gradient equals that of one process holding the
whole W×B batch (tests/test_loss_distributed.py proves it).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """All-gather one feature set across ranks, keeping the autograd graph."""
    if world_size == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), 0)


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor,
                    world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather both feature sets across ranks, keeping the autograd graph."""
    return gather_with_grad(image_features, world_size), gather_with_grad(text_features, world_size)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the global batch, computed in fp32.

    local_loss=True (default, memory-light): each rank scores its own B rows against
    all W·B columns, [B, W·B] logits. local_loss=False: the full [W·B, W·B] matrix on
    every rank. Both give the same loss and gradients; the first costs W times less."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_loss: bool = True) -> None:
        super().__init__()
        self.rank, self.world_size, self.local_loss = rank, world_size, local_loss

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, **_: torch.Tensor) -> dict[str, torch.Tensor]:
        """Takes the model's output as is: `loss(**model(images, ids))`."""
        img, txt = image_features.float(), text_features.float()
        scale = logit_scale.float()
        b = img.shape[0]
        all_img, all_txt = gather_features(img, txt, self.world_size)
        with torch.autocast(device_type=img.device.type, enabled=False):
            if self.local_loss:
                logits_i = scale * img @ all_txt.T
                logits_t = scale * txt @ all_img.T
                labels = torch.arange(b, device=img.device) + self.rank * b
            else:
                logits_i = scale * all_img @ all_txt.T
                logits_t = logits_i.T
                # every rank holds the whole loss; the all-gather backward sums its W
                # copies of each feature's gradient and DDP's average divides them again
                labels = torch.arange(all_img.shape[0], device=img.device)
            loss = (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2
        return {"contrastive_loss": loss}


class SigLipLoss(nn.Module):
    """Sigmoid loss (SigLIP, Zhai et al. 2023) over the global batch: each rank scores
    its B images against all W·B texts; normalised by the local batch size, so DDP's
    averaging gives the single-process loss on W·B / (W·B)."""

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.rank, self.world_size = rank, world_size

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor, **_: torch.Tensor) -> dict[str, torch.Tensor]:
        """Takes the model's output as is: `loss(**model(images, ids))`."""
        img, txt = image_features.float(), text_features.float()
        b = img.shape[0]
        all_txt = gather_with_grad(txt, self.world_size)  # only the texts are scored across ranks
        with torch.autocast(device_type=img.device.type, enabled=False):
            logits = logit_scale.float() * img @ all_txt.T + logit_bias.float()
            labels = -torch.ones_like(logits)
            idx = torch.arange(b, device=img.device)
            labels[idx, idx + self.rank * b] = 1.0
            loss = -F.logsigmoid(labels * logits).sum() / b
        return {"sigmoid_loss": loss}


def create_loss(kind: str, rank: int, world_size: int, local_loss: bool = True) -> nn.Module:
    """'clip' or 'siglip'."""
    if kind == "clip":
        return ClipLoss(rank, world_size, local_loss)
    if kind == "siglip":
        return SigLipLoss(rank, world_size)
    raise ValueError(f"loss must be clip or siglip, not {kind!r}")
