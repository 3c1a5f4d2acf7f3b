"""Loading a trained model for inference, without the training package: the one
resolution of a path (an exported model folder, a run folder - its exported `model/`,
else its newest checkpoint that verifies -, a checkpoint folder, or an ONNX export) to
an encoder and its tokenizer. `phoclip.load` (phoclip/models/api.py) wraps it for users; the
entry points (evaluate, build_index, search, serve) use the same call."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

from phoclip.errors import CheckpointError
from phoclip.models.pretrained import (CONFIG_NAME, check_model_config, model_tokenizer_path,
                                       offline_model_config, read_model_config)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class NotAModelFolder(FileNotFoundError):
    """The path holds no saved model (phoclip_config.json + model.safetensors)."""


def model_folder(path: str | os.PathLike) -> Optional[Path]:
    """The saved model at `path`: the folder itself, or a run folder's `model/`."""
    p = Path(path)
    for folder in (p, p / "model"):
        if (folder / CONFIG_NAME).is_file():
            return folder
    return None


class Loaded(NamedTuple):
    """What `load_encoder` found: the encoder (a `PhoCLIP` in eval mode, or an
    `OnnxModel`) and its tokenizer (a folder or a hub name)."""

    module: Any
    tokenizer_path: Optional[str]


BACKENDS = ("torch", "onnx")


def load_encoder(path: str | os.PathLike, backend: str = "torch", device: str | torch.device = "cpu") -> Loaded:
    """The one way a trained model is loaded for inference. `path`: an exported model
    folder, a run folder (its exported `model/`, else its newest checkpoint that
    verifies), a checkpoint folder (`runs/NAME/checkpoints/step_N`: only the model's
    weights are read, weights_only=True, after the whole folder verified), or with
    backend="onnx" a model folder with an ONNX export (`phoclip-export ... --format
    onnx`; its `onnx/` folder is accepted too). Refusals are one line naming the path."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    p = Path(path)
    if backend == "onnx":
        from phoclip.models.onnx import ONNX_DIR, OnnxModel  # lazy: torch (see the checkpoints import)

        folder = model_folder(p.parent if p.name == ONNX_DIR and not model_folder(p) else p)
        if folder is None:
            raise NotAModelFolder(f"{path}: the onnx backend needs an exported model folder with an ONNX "
                                  "export (or a run folder with one): python launch/export_model.py "
                                  "SRC OUT --format onnx")
        read_model_config(folder)
        return Loaded(OnnxModel(folder), model_tokenizer_path(folder))
    folder = model_folder(p)
    if folder is not None:
        from phoclip.models.factory import load_model  # lazy: torch (see the checkpoints import)

        return Loaded(check_weights(load_model(folder, device).eval(), folder), model_tokenizer_path(folder))
    # this module imports in 0.06 s without torch, 1.7 s with it (the index and the commands' --help use it)
    from phoclip.models.checkpoints import checkpoints_dir, is_checkpoint, newest_verified  # lazy: torch

    ckpt = p
    if checkpoints_dir(p).is_dir():
        ckpt = newest_verified(p)
        if ckpt is None:
            raise NotAModelFolder(f"{path}: a run folder with no exported model and no complete checkpoint")
    if not is_checkpoint(ckpt):
        raise NotAModelFolder(f"{path}: not a model folder (phoclip_config.json + model.safetensors), "
                              "run folder or checkpoint folder")
    logger.info("loading the model of checkpoint %s", ckpt)
    model, tok = model_from_checkpoint(ckpt, device)
    return Loaded(check_weights(model, ckpt), tok)


# the parts of a model whose weight matrices all zero make every embedding the same
MAIN_PARTS = {"visual": "image tower", "text": "text tower", "image_head": "image projection",
              "text_head": "text projection"}


def check_weights(model: Any, where: str | os.PathLike) -> Any:
    """`model` as given, or a one-line ValueError naming `where` when its weights cannot
    give embeddings: a NaN or infinite weight (NaN embeddings), or a part (the image or
    text tower, a projection head) whose weight matrices are all zero (every embedding
    zero or the same; a trained model never has one). One host read for the model."""
    import torch  # lazy: torch (see the checkpoints import in load_encoder)

    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    tensors = list(model.parameters()) + list(model.buffers())
    floats = [(n, t) for n, t in zip(names, tensors) if t.is_floating_point() and t.numel()]
    finite = torch.stack([torch.isfinite(t).all() for _, t in floats]) if floats else torch.ones(0, dtype=torch.bool)
    parts = {}
    for part in MAIN_PARTS:
        mats = [t for n, t in floats if n.startswith(part + ".") and t.ndim >= 2]
        if mats:
            parts[part] = torch.stack([t.count_nonzero() > 0 for t in mats]).any()
    flags = torch.cat([finite, torch.stack(list(parts.values())) if parts else finite[:0]]).tolist()
    bad = [n for (n, _), ok in zip(floats, flags) if not ok]
    if bad:
        raise ValueError(f"{where}: non-finite weights (NaN or inf) in {len(bad)} tensor(s), first {bad[0]}: "
                         "the model cannot embed (a diverged run? load an earlier checkpoint)")
    zero = [MAIN_PARTS[p] for p, ok in zip(parts, flags[len(floats):]) if not ok]
    if zero:
        raise ValueError(f"{where}: the {', '.join(zero)} weights are all zero: every embedding would be the "
                         "same (an empty or damaged weights file)")
    return model


def checkpoint_model_config(ckpt: Path, meta: dict) -> dict:
    """The architecture a checkpoint recorded (meta.json `model_config`), checked, made
    to build without the hub or any pretrained file (the checkpoint holds every weight)."""
    from phoclip.models.checkpoints import META_FILE  # lazy: see load_encoder

    where = f"{Path(ckpt) / META_FILE}"
    if "model_config" not in meta:
        raise CheckpointError(f"{where}: no 'model_config': not a checkpoint written by phoclip's trainer")
    where = f"{where} model_config"
    return offline_model_config(check_model_config(meta["model_config"], where), where)


def model_from_checkpoint(ckpt: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer name or folder) from a training checkpoint folder:
    verified first (every .pt weights_only-loadable), then the model's weights only. The
    model is built from the architecture the checkpoint recorded (meta.json
    `model_config`); a checkpoint without one is refused."""
    from phoclip.models.checkpoints import (  # lazy: torch (see load_encoder)
        checkpoint_tokenizer, load_checkpoint_weights, verify_checkpoint)
    from phoclip.models.clip import PhoCLIP  # lazy: torch (see load_encoder)

    ckpt = Path(ckpt)
    meta = verify_checkpoint(ckpt)  # before zero_to_fp32 (weights_only=False inside DeepSpeed) touches it
    mc = checkpoint_model_config(ckpt, meta)
    model, tok = PhoCLIP(mc), checkpoint_tokenizer(ckpt) or mc["text"].get("tokenizer")
    return load_checkpoint_weights(model, ckpt).to(device).eval(), tok
