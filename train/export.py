"""Load a trained model for inference from a model folder, a run folder or a checkpoint."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml

logger = logging.getLogger(__name__)


def load_for_inference(path: str, device: str = "cpu"):
    """Returns (model, tokenizer name or folder). `path` may be a saved model folder
    (config + safetensors), a run folder (its exported model, else its latest
    checkpoint) or a checkpoint folder."""
    from phoclip.model import CONFIG_NAME, load_model, model_tokenizer_path

    p = Path(path)
    if (p / CONFIG_NAME).is_file():
        return load_model(p, device), model_tokenizer_path(p)
    if (p / "model" / CONFIG_NAME).is_file():
        return load_model(p / "model", device), model_tokenizer_path(p / "model")
    ckpt = p
    if (p / "checkpoints").is_dir():
        from train.checkpoint import Checkpointer

        ckpt = Checkpointer(p, 1, 0, 1).latest()
        if ckpt is None:
            raise FileNotFoundError(f"run {p} has no exported model and no complete checkpoint")
    if (ckpt / "state.pt").is_file():
        return model_from_checkpoint(ckpt, device)
    raise FileNotFoundError(f"{path}: not a model folder, run folder or checkpoint. For a "
                            "DeepSpeed ZeRO checkpoint, convert it first: "
                            "python launch/export_model.py CHECKPOINT OUT")


def model_from_checkpoint(ckpt: Path, device: str = "cpu"):
    """Rebuild the model from the config saved in a checkpoint and load its weights."""
    import json

    from train.config import resolve_config
    from train.trainer import build_model
    from phoclip.text import load_tokenizer

    meta = json.loads((ckpt / "meta.json").read_text())
    cfg = resolve_config(None, [])
    from train.config import _apply_tree
    _apply_tree(cfg, meta["config"])
    from phoclip.model import get_model_config

    tok_name = cfg.model.tokenizer or get_model_config(cfg.model.name)["text"].get("tokenizer")
    tok = load_tokenizer(tok_name)
    cfg.model.overrides.setdefault("vision", {})["pretrained"] = False
    model = build_model(cfg, tok)
    st = torch.load(ckpt / "state.pt", map_location=device, weights_only=True)
    model.load_state_dict(st["model"])
    return model.to(device).eval(), tok_name
