"""Models by name: the architecture configs in `model_configs/` (`list_models`,
`get_model_config`), a model built from one (`create_model`), or loaded from a folder
`save_pretrained` wrote (`load_model`)."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch

from phoclip.models.clip import PhoCLIP

CONFIG_DIR = Path(__file__).parent / "model_configs"


def deep_update(base: dict, upd: dict) -> dict:
    """`upd` merged into `base` in place, nested dicts key by key; returns `base`."""
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
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


def create_model(name: str = "phobert-large-rn50", **overrides: Any) -> PhoCLIP:
    """Build a model by config name (see `list_models()`); keyword overrides are deep-
    merged into the config, e.g. `create_model("tiny-debug", text={"hf_config": {"vocab_size": 99}})`."""
    cfg = deep_update(get_model_config(name), copy.deepcopy(overrides))
    cfg["name"] = cfg.get("name", name)
    return PhoCLIP(cfg)


def load_model(folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> PhoCLIP:
    """Load a model folder saved by `save_pretrained` (no hub access needed); its config
    is checked first (`phoclip.models.pretrained.read_model_config`) and built offline
    (`offline_model_config`: no pretrained towers or weights files, whatever the config
    says; the safetensors file holds every weight). Most callers want `phoclip.load`,
    which also takes run and checkpoint folders and ONNX exports."""
    return PhoCLIP.from_pretrained(folder, map_location)
