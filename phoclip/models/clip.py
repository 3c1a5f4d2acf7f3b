"""The PhoCLIP model: a timm image tower and a transformers text tower, each with a
projection head into one shared space, and a learnable temperature.

The model is pure: no ranks, no launcher state. Parallelism is the trainer's job.
"""
from __future__ import annotations

import bisect
import copy
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "phoclip_config.json"


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


def _deep_update(base: dict, upd: dict) -> dict:
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def list_models() -> list[str]:
    """Names of the built-in architecture configs."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_model_config(name: str) -> dict:
    """The architecture config by built-in name or path to a JSON file."""
    p = Path(name)
    if p.suffix == ".json" and p.is_file():
        return json.loads(p.read_text())
    f = CONFIG_DIR / f"{name}.json"
    if not f.is_file():
        raise ValueError(f"unknown model {name!r}; built-in models: {', '.join(list_models())} "
                         "(or pass a path to a JSON config)")
    return json.loads(f.read_text())


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
    batch's longest (fill and speed: bench/RESULTS.md, #28). The rows are as wide as
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
        """Load a folder written by `save_pretrained` (`load_model`; for inference with
        text preparation included, `phoclip.load`)."""
        return load_model(folder, map_location)

    def save_pretrained(self, folder: str | os.PathLike, tokenizer=None, training: Optional[dict] = None,
                        data: Optional[dict] = None, evaluation: Optional[dict] = None,
                        curves: Optional[str | os.PathLike] = None) -> Path:
        """Write config + safetensors weights (+ tokenizer) and a model card (README.md:
        architecture, text preparation, `training` config, `data` manifest summary,
        `evaluation` results, the training `curves` PNG when given, how to load): a
        folder `load_model` reads without any training state or hub access."""
        from safetensors.torch import save_file

        from phoclip.fileio import atomic_write_json, atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = copy.deepcopy(self.config)
        cfg["vision"]["pretrained"] = False
        cfg["vision"].pop("weights_file", None)
        cfg["text"]["pretrained"] = False
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder / "tokenizer"))
            cfg["text"]["tokenizer"] = "tokenizer"
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = folder / (WEIGHTS_NAME + ".tmp")
        save_file(sd, str(tmp))
        # safetensors writes 0600; a model folder is meant to be shared (group members
        # on a cluster): the usual mode under the user's umask
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, folder / WEIGHTS_NAME)
        atomic_write_json(folder / CONFIG_NAME, cfg, indent=2)
        from phoclip.models.card import attach_curves, model_card

        curves_name = None
        if curves is not None:
            try:
                curves_name = attach_curves(folder, curves)
            except (OSError, ValueError) as e:  # a picture never fails a save
                logger.warning("training curves not attached to %s: %s", folder, e)
        atomic_write_text(folder / "README.md", model_card(cfg, training, data, evaluation,
                                                           model_fingerprint(self), curves=curves_name))
        return folder


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


def create_model(name: str = "phobert-large-rn50", **overrides: Any) -> PhoCLIP:
    """Build a model by config name (see `list_models()`); keyword overrides are deep-
    merged into the config, e.g. `create_model("tiny-debug", text={"hf_config": {"vocab_size": 99}})`."""
    cfg = _deep_update(get_model_config(name), copy.deepcopy(overrides))
    cfg["name"] = cfg.get("name", name)
    return PhoCLIP(cfg)


def load_model(folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> PhoCLIP:
    """Load a model folder saved by `save_pretrained` (no hub access needed); its config
    is checked first (`phoclip.models.loading.read_model_config`) and built offline
    (`offline_model_config`: no pretrained towers or weights files, whatever the config
    says; the safetensors file holds every weight). Most callers want `phoclip.load`,
    which also takes run and checkpoint folders and ONNX exports."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from phoclip.models.loading import offline_model_config, read_model_config

    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not a saved PhoCLIP model (no {CONFIG_NAME}); "
                                "export a checkpoint first (see README, 'Evaluation and search')")
    model = PhoCLIP(offline_model_config(read_model_config(folder), str(folder / CONFIG_NAME)))
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing; re-export the model")
    try:
        sd = load_file(str(weights), device=str(map_location))
    except SafetensorError as e:
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (config: {tuple(own[k].shape)})" for k, v in sd.items()
             if k in own and v.shape != own[k].shape]
    if wrong:  # load_state_dict would raise a many-line RuntimeError
        raise ValueError(f"{weights}: weights do not fit {CONFIG_NAME}: {len(wrong)} of another shape, "
                         f"e.g. {wrong[0]}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights}: weights do not fit {CONFIG_NAME}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.to(map_location)  # load_state_dict copies into the module's own (CPU) tensors


def model_tokenizer_path(folder: str | os.PathLike) -> Optional[str]:
    """Where a saved model's tokenizer is (a folder inside it, or the hub name)."""
    from phoclip.models.loading import read_model_config

    tok = read_model_config(Path(folder))["text"].get("tokenizer")
    if tok and (Path(folder) / tok).is_dir():
        return str(Path(folder) / tok)
    return tok


def model_fingerprint(model: nn.Module) -> str:
    """A hash of every weight: two models give the same embeddings iff this matches."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
