"""Load a trained model for evaluation, search and serving from a model folder (config
+ safetensors + tokenizer) or a run folder's exported `model/`: no training code is
imported. Training checkpoints are the training package's business
(`phoclip_train.export.load_for_inference` accepts them too, and calls this first)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)


class NotAModelFolder(FileNotFoundError):
    """The path holds no saved model (phoclip_config.json + model.safetensors)."""


# sizes of a model config: a positive integer where given (transformers fills the text
# tower's missing ones with its defaults; `embed_dim` has none)
_POSITIVE = {"vision": ("image_size",), "text": ("max_length",),
             "text.hf_config": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                "intermediate_size", "max_position_embeddings", "type_vocab_size")}
MAX_CONFIG_BYTES = 16 << 20


def check_model_config(cfg, where: str) -> dict:
    """`cfg` if it is a model config we can build, else ValueError naming `where` and
    the field: sizes must be positive integers (a negative one would surface as a torch
    traceback), `embed_dim` and the towers must be there."""
    def bad(field: str, why: str):
        return ValueError(f"{where}: model config {field} {why}")

    def size(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 24

    if not isinstance(cfg, dict):
        raise bad("", f"is a {type(cfg).__name__}, not an object")
    if not size(cfg.get("embed_dim")):
        raise bad("embed_dim", f"must be a positive integer, not {cfg.get('embed_dim')!r}")
    vision, text = cfg.get("vision"), cfg.get("text")
    if not isinstance(vision, dict) or not isinstance(vision.get("timm_model"), str):
        raise bad("vision", "must be an object naming its timm_model")
    if not isinstance(text, dict):
        raise bad("text", "must be an object")
    hf = text.get("hf_config")
    if hf is not None and not isinstance(hf, dict):
        raise bad("text.hf_config", "must be an object")
    if hf is None and not isinstance(text.get("hf_model"), str):
        raise bad("text", "needs hf_config or hf_model")
    for section, keys in _POSITIVE.items():
        d = cfg
        for k in section.split("."):
            d = d.get(k) if isinstance(d, dict) else None
        for k in keys:
            if isinstance(d, dict) and k in d and not size(d[k]):
                raise bad(f"{section}.{k}", f"must be a positive integer, not {d[k]!r}")
    pad = text.get("pad_id", 1)
    if not (isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0):
        raise bad("text.pad_id", f"must be a non-negative integer, not {pad!r}")
    head = cfg.get("head", {})
    drop = head.get("dropout", 0.1) if isinstance(head, dict) else None
    if not (isinstance(drop, (int, float)) and not isinstance(drop, bool) and 0 <= drop < 1):
        raise bad("head.dropout", f"must be a number in [0, 1), not {drop!r}")
    return cfg


def read_model_config(folder: Path) -> dict:
    """A saved model's phoclip_config.json, checked (`check_model_config`); refused in
    one line naming the file when unreadable or unusable."""
    import json

    from phoclip.fileio import read_regular
    from phoclip.model import CONFIG_NAME

    f = Path(folder) / CONFIG_NAME
    try:
        cfg = json.loads(read_regular(f, MAX_CONFIG_BYTES))
    except RecursionError:
        raise ValueError(f"{f}: JSON nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    return check_model_config(cfg, str(f))


def model_folder(path: str) -> Optional[Path]:
    """The saved model at `path`: the folder itself, or a run folder's `model/`."""
    from phoclip.model import CONFIG_NAME

    p = Path(path)
    for folder in (p, p / "model"):
        if (folder / CONFIG_NAME).is_file():
            return folder
    return None


def load_model_folder(path: str, device: str = "cpu"):
    """(model, tokenizer name or folder) from a model folder or a run folder's `model/`."""
    from phoclip.model import load_model, model_tokenizer_path

    folder = model_folder(path)
    if folder is None:
        raise NotAModelFolder(f"{path}: not a model folder (phoclip_config.json + model.safetensors) "
                              "nor a run folder with an exported model/")
    read_model_config(folder)  # a config that would not build is refused here, in one line
    return load_model(folder, device), model_tokenizer_path(folder)


def load_encoder(path: str, backend: str = "torch", device: str = "cpu", loader=load_model_folder):
    """(model, tokenizer) for search and serving: the PyTorch model (`loader`, by default
    `load_model_folder`) or, with backend="onnx", its ONNX export run by onnxruntime (a
    model folder, or a run folder's exported model, made by `export_model.py --format onnx`)."""
    if backend != "onnx":
        return loader(path, device)
    from phoclip.model import model_tokenizer_path
    from phoclip.onnx_backend import OnnxModel

    folder = model_folder(path)
    if folder is None:
        raise NotAModelFolder(f"{path}: the onnx backend needs a model folder (or a run folder with one)")
    read_model_config(folder)
    return OnnxModel(folder), model_tokenizer_path(folder)
