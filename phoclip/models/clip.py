"""The PhoCLIP model: a timm image tower and a transformers text tower, each with a
projection head into one shared space, and a learnable temperature.

The model is pure: no ranks, no launcher state. Parallelism is the trainer's job.
Captions are packed for the text tower in `packing`, a model is saved and read back
through `pretrained`, and built by name in `factory`.
"""
from __future__ import annotations

import copy
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from phoclip.models.packing import POSITION_STYLES, TextPacking, pack_captions
from phoclip.models.pretrained import load_pretrained, save_pretrained

logger = logging.getLogger(__name__)


class ProjectionHead(nn.Module):
    """Linear → act → Linear → dropout → residual → norm (the seed's head)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1,
                 act_layer: Callable[[], nn.Module] = nn.GELU,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.act = act_layer()
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = norm_layer(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        x = self.dropout(self.fc(self.act(projected)))
        return self.norm(x + projected)


def _build_image_tower(cfg: dict) -> nn.Module:
    import timm

    kwargs: dict[str, Any] = {"num_classes": 0, "global_pool": "avg"}
    if "vit" in cfg["timm_model"]:
        kwargs["img_size"] = cfg.get("image_size", 224)
        kwargs.pop("global_pool")
    weights = cfg.get("weights_file")
    pretrained = bool(cfg.get("pretrained")) or bool(weights)
    if weights:
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
    try:
        return timm.create_model(cfg["timm_model"], pretrained=pretrained, **kwargs)
    except Exception as e:  # the hub being unreachable surfaces as many exception types
        if pretrained and not weights:
            raise RuntimeError(
                f"cannot fetch ImageNet weights for {cfg['timm_model']!r} ({e}). Offline, pass "
                f"vision.weights_file=/path/to/weights.safetensors, or vision.pretrained=false"
            ) from e
        raise


ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def _build_text_tower(cfg: dict) -> nn.Module:
    """The transformers encoder, with PyTorch SDPA attention (`text.attn_implementation`,
    default "sdpa": fused kernels for the padding mask and bf16) where the architecture
    has it; otherwise it falls back to eager attention with a warning."""
    want = cfg.get("attn_implementation", "sdpa")
    if want not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"text.attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, not {want!r}")
    try:
        tower = _load_text_tower(cfg, want)
    except ValueError as e:  # transformers: "... does not support an attention implementation through ..."
        if want == "eager" or "attention" not in str(e).lower():
            raise
        logger.warning("text tower: %s; FALLING BACK to eager attention (slower, more memory)", e)
        tower = _load_text_tower(cfg, "eager")
    got = getattr(tower.config, "_attn_implementation", "eager")
    if got != want:
        logger.warning("text tower: asked for %s attention, runs %s (slower, more memory)", want, got)
    return tower


def _load_text_tower(cfg: dict, attn: str) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    kw = {"add_pooling_layer": False, "attn_implementation": attn}
    if cfg.get("hf_config"):
        hc = dict(cfg["hf_config"])
        return AutoModel.from_config(AutoConfig.for_model(**hc), **kw)
    name = cfg["hf_model"]
    try:
        if cfg.get("pretrained", True):
            return AutoModel.from_pretrained(name, **kw)
        return AutoModel.from_config(AutoConfig.from_pretrained(name), **kw)
    except OSError as e:
        raise RuntimeError(
            f"cannot load text encoder {name!r}: {e}\nPass text.hf_model=/local/folder (made by "
            "save_pretrained or a hub snapshot) on a machine without hub access.") from e


class PhoCLIP(nn.Module):
    """Image and text towers + projection heads + temperature.

    `forward(images, input_ids)` returns L2-normalised image and text features and the
    logit scale exp(t); the loss lives in `phoclip.models.loss`."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = copy.deepcopy(config)
        self.visual = _build_image_tower(config["vision"])
        self.text = _build_text_tower(config["text"])
        if config["text"].get("hf_config") is None:
            # a tower loaded by name: record its real config so save/load needs no hub
            self.config["text"]["hf_config"] = self.text.config.to_diff_dict()
            self.config["text"]["hf_config"]["model_type"] = self.text.config.model_type
        head = config.get("head", {})
        dim = config["embed_dim"]
        self.image_head = ProjectionHead(self.visual.num_features, dim, head.get("dropout", 0.1))
        self.text_head = ProjectionHead(self.text.config.hidden_size, dim, head.get("dropout", 0.1))
        ls = config.get("logit_scale", {})
        init = torch.full([1], float(ls.get("init", math.log(1 / 0.07))))  # 1-d: DeepSpeed-safe
        if ls.get("learnable", True):
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)
        self.logit_scale_max = float(ls.get("max", math.log(100)))
        lb = config.get("logit_bias")  # SigLIP's learnable bias (init -10 in the paper)
        self.logit_bias = nn.Parameter(torch.full([1], float(lb["init"]))) if lb else None
        self.pad_id = int(config["text"].get("pad_id", 1))
        self.pooling = config["text"].get("pooling", "cls")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"text.pooling must be cls or mean, not {self.pooling!r}")
        self._position_style = POSITION_STYLES.get(self.text.config.model_type)
        if getattr(self.text.config, "position_embedding_type", "absolute") != "absolute":
            self._position_style = None  # relative positions are measured in the attention: no packing
        self._image_locked = False

    # ------------------------------------------------------------------ encoders
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.image_head(self.visual(images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids: torch.Tensor, normalize: bool = True,
                    packing: Optional[TextPacking] = None) -> torch.Tensor:
        """Text features; with `packing` (`pack_text` of the CPU ids) one forward over the
        captions packed into rows, the same features for about the real tokens' compute
        (`input_ids` are then not read)."""
        if packing is None:
            pooled = self._pool_text(input_ids)
        else:
            pooled = self._pool_packed(packing.to(input_ids.device, non_blocking=True))
        x = self.text_head(pooled)
        return F.normalize(x, dim=-1) if normalize else x

    def pack_text(self, input_ids: torch.Tensor) -> Optional[TextPacking]:
        """`pack_captions` for this text tower (CPU ids); None where the tower cannot take
        packed rows (position ids it numbers in another way, relative positions) or where
        packing would save under a tenth of the tokens of `input_ids` as they are (say,
        captions all about one length): then the plain forward, without the mask."""
        if self._position_style is None or input_ids.ndim != 2 or 0 in input_ids.shape:
            return None
        packing = pack_captions(input_ids, self.pad_id, self._position_style)
        return packing if packing.computed_tokens <= 0.9 * input_ids.numel() else None

    def _pool_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != self.pad_id).long()
        h = self.text(input_ids=input_ids, attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            return h[:, 0]
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)

    def _pool_packed(self, p: TextPacking) -> torch.Tensor:
        # block-diagonal [R, P, P]: a slot attends to the real tokens of its own caption,
        # as in its padded row (the room left in a row is one more block of its own, so
        # no row of the mask is empty)
        key = (p.ids != self.pad_id) | (p.segments < 0)
        # a caption of pads only (one slot) attends to itself: its padded row attends
        # evenly over pads that are all alike, the same value; with no key at all it
        # would attend over the whole packed row, other captions included
        empty = torch.zeros_like(key).view(-1).scatter_(0, p.starts, p.lengths == 0).view_as(key)
        key = key | empty
        mask = ((p.segments[:, :, None] == p.segments[:, None, :]) & key[:, None, :]).long()
        h = self.text(input_ids=p.ids, attention_mask=mask, position_ids=p.positions).last_hidden_state
        flat = torch.cat([h.reshape(-1, h.shape[-1]), h.new_zeros(1, h.shape[-1])])  # slot R*P: zeros
        if self.pooling == "cls":  # the caption's first slot, whatever it holds (as h[:, 0])
            return flat[p.starts]
        return flat[p.gather].sum(1) / p.lengths[:, None].clamp(min=1).to(h.dtype)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                text_packing: Optional[TextPacking] = None) -> dict[str, torch.Tensor]:
        out = {"image_features": self.encode_image(images),
               "text_features": self.encode_text(input_ids, packing=text_packing),
               # clamped here too: engines that keep master weights (DeepSpeed) undo an
               # in-place clamp of the module's copy at their next step
               "logit_scale": self.logit_scale.clamp(max=self.logit_scale_max).exp().squeeze()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias.squeeze()
        return out

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep exp(t) <= 100 (CLIP's clamp); call after each optimizer step."""
        self.logit_scale.clamp_(0, self.logit_scale_max)

    # ------------------------------------------------------------------ freezing
    def lock_image_tower(self) -> None:
        """Freeze the image encoder, BatchNorm running statistics included."""
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self._image_locked = True
        self.visual.eval()

    def lock_text_tower(self, unlocked_layers: int = 0) -> None:
        """Freeze the text encoder except its last `unlocked_layers` transformer layers."""
        layers = _find_layers(self.text)
        for p in self.text.parameters():
            p.requires_grad_(False)
        if unlocked_layers > 0:
            for layer in layers[-unlocked_layers:]:
                for p in layer.parameters():
                    p.requires_grad_(True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.text.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.text.gradient_checkpointing_disable()

    def train(self, mode: bool = True) -> "PhoCLIP":
        super().train(mode)
        if self._image_locked:
            self.visual.eval()  # frozen BatchNorm statistics stay frozen
        return self

    # ------------------------------------------------------------------ optimizer groups
    def param_groups(self, lr_image: float = 1e-4, lr_text: float = 1e-5, lr_head: float = 1e-3,
                     weight_decay: float = 0.2) -> list[dict]:
        """AdamW groups: image tower, text tower, heads + temperature, each split into
        decay and no-decay (biases, norms, gains and the temperature: ndim < 2)."""
        towers = {"image": (self.visual, lr_image), "text": (self.text, lr_text)}
        groups = []
        seen = set()
        for name, (mod, lr) in towers.items():
            params = [(n, p) for n, p in mod.named_parameters() if p.requires_grad]
            seen.update(id(p) for _, p in params)
            groups += _split_decay(name, params, lr, weight_decay)
        rest = [(n, p) for n, p in self.named_parameters() if p.requires_grad and id(p) not in seen
                and not n.startswith(("visual.", "text."))]
        groups += _split_decay("head", rest, lr_head, weight_decay)
        return groups

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> "PhoCLIP":
        """Load a folder written by `save_pretrained` (`phoclip.models.pretrained.load_pretrained`;
        for inference with text preparation included, `phoclip.load`)."""
        return load_pretrained(cls, folder, map_location)

    def save_pretrained(self, folder: str | os.PathLike, tokenizer=None, training: Optional[dict] = None,
                        data: Optional[dict] = None, evaluation: Optional[dict] = None,
                        curves: Optional[str | os.PathLike] = None) -> Path:
        """Write config + safetensors weights (+ tokenizer) and a model card: a folder
        `from_pretrained` reads without any training state or hub access
        (`phoclip.models.pretrained.save_pretrained`)."""
        return save_pretrained(self, folder, tokenizer, training, data, evaluation, curves)


def _split_decay(name, named_params, lr, wd) -> list[dict]:
    decay = [p for n, p in named_params if p.ndim >= 2]
    no_decay = [p for n, p in named_params if p.ndim < 2]
    out = []
    if decay:
        out.append({"name": name, "params": decay, "lr": lr, "weight_decay": wd})
    if no_decay:
        out.append({"name": f"{name}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    return out


def _find_layers(module: nn.Module) -> nn.ModuleList:
    enc = getattr(module, "encoder", None)
    layers = getattr(enc, "layer", None) or getattr(enc, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the transformer layers of {type(module).__name__}")
    return layers
