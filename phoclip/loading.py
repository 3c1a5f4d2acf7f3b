"""Load a trained model for evaluation, search and serving: from a model folder
(config + safetensors + tokenizer, no training code involved), a run folder (its
exported model), or - through the training package, lazily - a checkpoint folder."""
from __future__ import annotations

import logging
from pathlib import Path

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
        from phoclip_train.checkpoint import Checkpointer  # a training artifact

        ckpt = Checkpointer(p, 1, 0, 1).resolve("latest")  # the newest that verifies
        if ckpt is None:
            raise FileNotFoundError(f"run {p} has no exported model and no complete checkpoint")
    if (ckpt / "meta.json").is_file():
        from phoclip_train.export import model_from_checkpoint  # a training artifact

        return model_from_checkpoint(ckpt, device)
    raise FileNotFoundError(f"{path}: not a model folder (phoclip_config.json + model.safetensors), "
                            "run folder or checkpoint folder")


def load_encoder(path: str, backend: str = "torch", device: str = "cpu"):
    """(model, tokenizer) for search and serving: the PyTorch model (`load_for_inference`)
    or, with backend="onnx", its ONNX export run by onnxruntime (a model folder, or a
    run folder's exported model, exported with `export_model.py --format onnx`)."""
    if backend != "onnx":
        return load_for_inference(path, device)
    from phoclip.model import CONFIG_NAME, model_tokenizer_path
    from phoclip.onnx_backend import OnnxModel

    p = Path(path)
    folder = p if (p / CONFIG_NAME).is_file() else p / "model"
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path}: --backend onnx needs a model folder (or a run folder with one)")
    return OnnxModel(folder), model_tokenizer_path(folder)
