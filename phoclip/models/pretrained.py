"""A saved model folder: its file names, its config checked before anything is built
from it, writing one (`save_pretrained`: config, safetensors weights, tokenizer, model
card) and reading its weights into a model built from that config (`load_pretrained`).
Nothing here knows the model class, and nothing here imports torch at import time:
`phoclip.models.loading` reads configs through this module without it."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from phoclip.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, fsync_dir, read_regular, real_dir
from phoclip.models.card import attach_curves, model_card

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "phoclip_config.json"
TOKENIZER_DIR = "tokenizer"  # a saved tokenizer's folder inside the model folder


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
MAX_IMAGE_SIZE = _SIZE_CAPS["vision"]["image_size"]  # a run's data.image_size is capped with it too
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
    f = Path(folder) / CONFIG_NAME
    try:
        cfg = json.loads(read_regular(f, MAX_CONFIG_BYTES))
    except RecursionError:
        raise ValueError(f"{f}: JSON nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    return check_model_config(cfg, str(f))


def model_tokenizer_path(folder: str | os.PathLike) -> Optional[str]:
    """Where a saved model's tokenizer is (a folder inside it, or the hub name)."""
    tok = read_model_config(Path(folder))["text"].get("tokenizer")
    if tok and (Path(folder) / tok).is_dir():
        return str(Path(folder) / tok)
    return tok


def model_fingerprint(model: nn.Module) -> str:
    """A hash of every weight: two models give the same embeddings iff this matches."""
    import torch  # lazy: this module imports without torch (see the module's docstring)

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def save_pretrained(model: nn.Module, folder: str | os.PathLike, tokenizer=None, training: Optional[dict] = None,
                    data: Optional[dict] = None, evaluation: Optional[dict] = None,
                    curves: Optional[str | os.PathLike] = None) -> Path:
    """Write `model` (anything with a `config` dict it is built from, and a state dict) as
    config + safetensors weights (+ tokenizer) and a model card (README.md: architecture,
    text preparation, `training` config, `data` manifest summary, `evaluation` results,
    the training `curves` PNG when given, how to load): a folder `load_pretrained` reads
    without any training state or hub access. Every file goes through an exclusive
    temporary name and a rename (`phoclip.fileio`): a link planted in an existing folder
    is replaced, never written through; the folder itself must not be a link."""
    from safetensors.torch import save

    folder = real_dir(folder)
    cfg = copy.deepcopy(model.config)
    cfg["vision"]["pretrained"] = False
    cfg["vision"].pop("weights_file", None)
    cfg["text"]["pretrained"] = False
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder / TOKENIZER_DIR)
        cfg["text"]["tokenizer"] = TOKENIZER_DIR
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # safetensors' save_file opens a name of its choosing: the bytes go through our
    # exclusive temporary file instead; 0666 under the user's umask, as a model folder is
    # meant to be shared (group members on a cluster)
    atomic_write_bytes(folder / WEIGHTS_NAME, save(sd), mode=0o666)
    atomic_write_json(folder / CONFIG_NAME, cfg, indent=2)
    curves_name = None
    if curves is not None:
        try:
            curves_name = attach_curves(folder, curves)
        except (OSError, ValueError) as e:  # a picture never fails a save
            logger.warning("training curves not attached to %s: %s", folder, e)
    atomic_write_text(folder / "README.md", model_card(cfg, training, data, evaluation,
                                                       model_fingerprint(model), curves=curves_name))
    return folder


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> Path:
    """`tokenizer.save_pretrained` into `folder` without following links: it opens its
    files by name (a link planted at vocab.txt would be written through), so it writes
    into a fresh private folder beside it, and each file is renamed into place (a rename
    replaces a link, never its target)."""
    import shutil
    import tempfile

    folder = real_dir(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        for f in sorted(tmp.iterdir()):
            if f.is_file() and not f.is_symlink():
                os.replace(f, folder / f.name)
        fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _check_image_architecture(config: dict, where: Path) -> None:
    """An image tower timm does not know is refused in one line naming the file and the
    name (timm.create_model raises a RuntimeError from deep inside the build)."""
    import timm  # lazy: imports torch; this module reads configs without it, and a model is about to be built

    name = config["vision"]["timm_model"]
    if not timm.is_model(name):
        raise ValueError(f"{where}: vision.timm_model {name!r} is not an architecture this timm ({timm.__version__}) "
                         "knows (timm.list_models() lists them)")


def load_pretrained(build: Callable[[dict], Any], folder: str | os.PathLike,
                    map_location: str | torch.device = "cpu"):
    """The model a folder `save_pretrained` wrote: its config checked first
    (`read_model_config`: one line naming the file, not a torch traceback), made to
    build offline (`offline_model_config`), the model built by `build(config)`, then
    every weight read from the safetensors file, refused in one line where they do not
    fit the config."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not a saved PhoCLIP model (no {CONFIG_NAME}); "
                                "export a checkpoint first (see README, 'Evaluation and search')")
    config = offline_model_config(read_model_config(folder), str(folder / CONFIG_NAME))
    _check_image_architecture(config, folder / CONFIG_NAME)
    model = build(config)
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
