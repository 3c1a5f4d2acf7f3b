"""Rebuild a trained model from a training checkpoint (DDP state.pt or a DeepSpeed ZeRO
checkpoint). Model and run folders are loaded by `phoclip.loading`, which calls this
only for checkpoint folders."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def load_for_inference(path: str, device: str = "cpu"):
    """(model, tokenizer name or folder) from a model folder, a run folder (its exported
    model, else its newest checkpoint that verifies) or a checkpoint folder: what the
    entry points (evaluate, build_index, search, serve) accept."""
    from phoclip.loading import NotAModelFolder, load_model_folder

    try:
        return load_model_folder(path, device)
    except NotAModelFolder:
        pass
    p = ckpt = Path(path)
    if (p / "checkpoints").is_dir():
        from phoclip_train.checkpoint import Checkpointer

        ckpt = Checkpointer(p, 1, 0, 1).resolve("latest")  # the newest that verifies
        if ckpt is None:
            raise FileNotFoundError(f"run {p} has no exported model and no complete checkpoint")
    if (ckpt / "meta.json").is_file():
        return model_from_checkpoint(ckpt, device)
    raise FileNotFoundError(f"{path}: not a model folder (phoclip_config.json + model.safetensors), "
                            "run folder or checkpoint folder")


def load_encoder(path: str, backend: str = "torch", device: str = "cpu"):
    """`phoclip.loading.load_encoder`, with checkpoints accepted for the torch backend."""
    from phoclip.loading import load_encoder as library_load_encoder

    return library_load_encoder(path, backend, device, loader=load_for_inference)


def model_from_checkpoint(ckpt: Path, device: str = "cpu"):
    """Rebuild the model from the config saved in a checkpoint and load its weights:
    a DDP `state.pt`, or a DeepSpeed ZeRO checkpoint (partitions gathered to fp32).
    Returns (model, tokenizer name or folder)."""
    import json

    from phoclip.model import get_model_config
    from phoclip.text import load_tokenizer
    from phoclip_train.config import RunConfig, apply_tree
    from phoclip_train.build import build_model

    from phoclip.errors import CheckpointError
    from phoclip_train.checkpoint import verify_checkpoint

    # before zero_to_fp32 or torch.load(weights_only=False) inside DeepSpeed touch it
    meta = verify_checkpoint(ckpt)
    tok_name = str(ckpt / "tokenizer") if (ckpt / "tokenizer").is_dir() else None
    where = f"{ckpt / 'meta.json'}"
    if "model_config" in meta:
        # the resolved architecture the run trained (text tower config included): no hub,
        # no pretrained-weights file needed, the checkpoint holds every weight
        from phoclip.loading import check_model_config
        from phoclip.model import PhoCLIP

        mc = json.loads(json.dumps(check_model_config(meta["model_config"], f"{where} model_config")))
        mc["vision"]["pretrained"] = False
        mc["vision"].pop("weights_file", None)
        mc["text"]["pretrained"] = False
        tok_name = tok_name or mc["text"].get("tokenizer")
        model = PhoCLIP(mc)
    else:  # checkpoints written before the model config was saved in them
        if not isinstance(meta.get("config"), dict):
            raise CheckpointError(f"{where}: neither 'model_config' nor 'config': the model cannot be rebuilt")
        cfg = RunConfig()
        apply_tree(cfg, meta["config"])
        check_resolved_config(cfg, where)
        tok_name = tok_name or cfg.model.tokenizer or get_model_config(cfg.model.name)["text"].get("tokenizer")
        cfg.model.overrides.setdefault("vision", {})["pretrained"] = False
        cfg.model.overrides.setdefault("text", {})["pretrained"] = False
        model = build_model(cfg, load_tokenizer(tok_name))
    if (ckpt / "state.pt").is_file():
        sd = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)["model"]
    else:
        sd = _zero_state_dict(ckpt)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing:
        # buffers (BatchNorm statistics) are not in ZeRO's fp32 partitions: take them
        # from the module state DeepSpeed saved beside them
        from phoclip_train.ds_engine import DS_TAG

        mp = ckpt / DS_TAG / "mp_rank_00_model_states.pt"
        if mp.is_file():
            mod = torch.load(mp, map_location="cpu", weights_only=True)["module"]
            model.load_state_dict({k: mod[k] for k in missing if k in mod}, strict=False)
            missing = [k for k in missing if k not in mod]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt} does not fit its config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model.to(device).eval(), tok_name


def check_resolved_config(cfg, where: str) -> None:
    """The architecture an old checkpoint's run config names, with its overrides, checked
    as a saved model config is (`phoclip.loading.check_model_config`): one line, not a
    torch traceback, for a negative size."""
    import copy

    from phoclip.loading import check_model_config
    from phoclip.model import _deep_update, get_model_config

    arch = _deep_update(get_model_config(cfg.model.name), copy.deepcopy(dict(cfg.model.overrides)))
    text = arch.get("text")
    if isinstance(text, dict) and text.get("hf_model") is None and text.get("hf_config") is None:
        text["hf_config"] = {}  # filled from the tokenizer by build_model
    check_model_config(arch, f"{where} config")


def _zero_state_dict(ckpt: Path) -> dict:
    """Full fp32 weights gathered from a ZeRO (stage 1-3) checkpoint's partitions."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from phoclip_train.ds_engine import DS_TAG

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)
