"""Loading a trained model for inference, without the training package: the one
resolution of a path (an exported model folder, a run folder - its exported `model/`,
else its newest checkpoint that verifies -, a checkpoint folder, or an ONNX export) to
an encoder and its tokenizer. `phoclip.load` (phoclip/models/api.py) wraps it for users; the
entry points (evaluate, build_index, search, serve) use the same call."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class NotAModelFolder(FileNotFoundError):
    """The path holds no saved model (phoclip_config.json + model.safetensors)."""


# sizes of a model config: a positive integer where given, at most the cap (transformers
# fills the text tower's missing ones with its defaults; `embed_dim` has none). The caps
# are far above any model we train (PhoBERT: 258 positions, 1024 hidden, 24 layers,
# 64001 tokens, images of 224) and keep a hostile config from making a model, or every
# image and caption it embeds, too large for the machine.
_SIZE_CAPS = {
    "": {"embed_dim": 8192},
    "vision": {"image_size": 2048},
    "text": {"max_length": 512},
    "text.hf_config": {"vocab_size": 1 << 20, "hidden_size": 8192, "num_hidden_layers": 128,
                       "num_attention_heads": 256, "intermediate_size": 65536,
                       "max_position_embeddings": 4096, "type_vocab_size": 1024},
}
MAX_CONFIG_BYTES = 16 << 20


def check_model_config(cfg, where: str) -> dict:
    """`cfg` if it is a model config we can build, else ValueError naming `where` and
    the field: sizes must be positive integers (a negative one would surface as a torch
    traceback) within their caps (_SIZE_CAPS), `embed_dim` and the towers must be there,
    and nothing may ask transformers for remote code (`hf_config.auto_map`)."""
    def bad(field: str, why: str):
        return ValueError(f"{where}: model config {field} {why}")

    def check_size(field: str, v, cap: int) -> None:
        if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise bad(field, f"must be a positive integer, not {v!r}")
        if v > cap:
            raise bad(field, f"must be at most {cap}, not {v}")

    if not isinstance(cfg, dict):
        raise bad("", f"is a {type(cfg).__name__}, not an object")
    check_size("embed_dim", cfg.get("embed_dim"), _SIZE_CAPS[""]["embed_dim"])
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
    if isinstance(hf, dict) and "auto_map" in hf:
        raise bad("text.hf_config.auto_map", "is refused: a model config never names code to run")
    for section, caps in _SIZE_CAPS.items():
        d = cfg
        for k in filter(None, section.split(".")):
            d = d.get(k) if isinstance(d, dict) else None
        for k, cap in caps.items():
            if isinstance(d, dict) and k in d:
                check_size(f"{section}.{k}" if section else k, d[k], cap)
    pad = text.get("pad_id", 1)
    if not (isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0):
        raise bad("text.pad_id", f"must be a non-negative integer, not {pad!r}")
    head = cfg.get("head", {})
    drop = head.get("dropout", 0.1) if isinstance(head, dict) else None
    if not (isinstance(drop, (int, float)) and not isinstance(drop, bool) and 0 <= drop < 1):
        raise bad("head.dropout", f"must be a number in [0, 1), not {drop!r}")
    return cfg


def offline_model_config(cfg: dict, where: str) -> dict:
    """A copy of a checked model config that builds without the hub or any file outside
    the saved model (whose weights file or checkpoint holds every weight): no pretrained
    towers, no vision.weights_file. A text tower must be recorded by its hf_config (an
    hf_model name or folder would be fetched or read), and the image tower must be a timm
    architecture name (timm fetches `hf-hub:` names' configs even without weights);
    ValueError naming `where` otherwise."""
    import json

    mc = json.loads(json.dumps(cfg))
    if not isinstance(mc["text"].get("hf_config"), dict):
        raise ValueError(f"{where}: model config text.hf_config is missing: a saved model records its text "
                         f"tower's architecture (text.hf_model {mc['text'].get('hf_model')!r} would be fetched "
                         "or read from outside the model); re-export the model")
    if ":" in mc["vision"]["timm_model"]:
        raise ValueError(f"{where}: model config vision.timm_model {mc['vision']['timm_model']!r} is not a timm "
                         "architecture name (a hub or folder reference would be fetched or read)")
    mc["vision"]["pretrained"] = False
    mc["vision"].pop("weights_file", None)
    mc["text"]["pretrained"] = False
    return mc


def read_model_config(folder: Path) -> dict:
    """A saved model's phoclip_config.json, checked (`check_model_config`); refused in
    one line naming the file when unreadable or unusable."""
    import json

    from phoclip.fileio import read_regular
    from phoclip.models.clip import CONFIG_NAME

    f = Path(folder) / CONFIG_NAME
    try:
        cfg = json.loads(read_regular(f, MAX_CONFIG_BYTES))
    except RecursionError:
        raise ValueError(f"{f}: JSON nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    return check_model_config(cfg, str(f))


def model_folder(path: str | os.PathLike) -> Optional[Path]:
    """The saved model at `path`: the folder itself, or a run folder's `model/`."""
    from phoclip.models.clip import CONFIG_NAME

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
        from phoclip.models.onnx import ONNX_DIR, OnnxModel

        folder = model_folder(p.parent if p.name == ONNX_DIR and not model_folder(p) else p)
        if folder is None:
            raise NotAModelFolder(f"{path}: the onnx backend needs an exported model folder with an ONNX "
                                  "export (or a run folder with one): python launch/export_model.py "
                                  "SRC OUT --format onnx")
        read_model_config(folder)
        return Loaded(OnnxModel(folder), _tokenizer_path(folder))
    folder = model_folder(p)
    if folder is not None:
        from phoclip.models.clip import load_model  # checks the config first: one line, not a torch traceback

        return Loaded(load_model(folder, device).eval(), _tokenizer_path(folder))
    # lazy: this module imports in 0.06 s without torch, 1.7 s with (the index and --help use it)
    from phoclip.models.checkpoints import checkpoints_dir, is_checkpoint, newest_verified

    ckpt = p
    if checkpoints_dir(p).is_dir():
        ckpt = newest_verified(p)
        if ckpt is None:
            raise NotAModelFolder(f"{path}: a run folder with no exported model and no complete checkpoint")
    if not is_checkpoint(ckpt):
        raise NotAModelFolder(f"{path}: not a model folder (phoclip_config.json + model.safetensors), "
                              "run folder or checkpoint folder")
    logger.info("loading the model of checkpoint %s", ckpt)
    return Loaded(*model_from_checkpoint(ckpt, device))


def checkpoint_model_config(ckpt: Path, meta: dict) -> dict:
    """The architecture a checkpoint recorded (meta.json `model_config`), checked, made
    to build without the hub or any pretrained file (the checkpoint holds every weight)."""
    from phoclip.errors import CheckpointError
    from phoclip.models.checkpoints import META_FILE  # lazy: see load_encoder

    where = f"{Path(ckpt) / META_FILE}"
    if "model_config" not in meta:
        raise CheckpointError(f"{where}: no 'model_config' (written before checkpoints recorded it): "
                              f"export it first, python launch/export_model.py {ckpt} OUT")
    where = f"{where} model_config"
    return offline_model_config(check_model_config(meta["model_config"], where), where)


def model_from_checkpoint(ckpt: str | os.PathLike, device: str | torch.device = "cpu",
                          rebuild: Optional[Callable[[Path, dict], tuple[Any, Optional[str]]]] = None):
    """(model in eval mode, tokenizer name or folder) from a training checkpoint folder:
    verified first (every .pt weights_only-loadable), then the model's weights only. The
    model is built from the architecture the checkpoint recorded (meta.json
    `model_config`); a checkpoint without one is refused, unless `rebuild(ckpt, meta)`
    builds its untrained model and names its tokenizer (export passes the training
    package's rebuild from the run config; inference never does)."""
    # lazy: see load_encoder
    from phoclip.models.checkpoints import checkpoint_tokenizer, load_checkpoint_weights, verify_checkpoint
    from phoclip.models.clip import PhoCLIP

    ckpt = Path(ckpt)
    meta = verify_checkpoint(ckpt)  # before zero_to_fp32 (weights_only=False inside DeepSpeed) touches it
    if "model_config" in meta or rebuild is None:
        mc = checkpoint_model_config(ckpt, meta)
        model, tok = PhoCLIP(mc), checkpoint_tokenizer(ckpt) or mc["text"].get("tokenizer")
    else:
        model, tok = rebuild(ckpt, meta)
    return load_checkpoint_weights(model, ckpt).to(device).eval(), tok


def _tokenizer_path(folder: Path) -> Optional[str]:
    """Where a saved model's tokenizer is (a folder inside it, or the hub name)."""
    from phoclip.models.clip import model_tokenizer_path

    return model_tokenizer_path(folder)
