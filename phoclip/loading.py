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
    return OnnxModel(folder), model_tokenizer_path(folder)
