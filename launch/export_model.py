"""Turn a checkpoint (DDP `state.pt` or a DeepSpeed ZeRO checkpoint) into the plain model
folder (config + safetensors + tokenizer) that evaluation and search load.

    python launch/export_model.py runs/exp1/checkpoints/step_00020000 runs/exp1/model
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from phoclip.log import init_logger


def zero_state_dict(ckpt: Path) -> dict:
    """Full fp32 weights gathered from a ZeRO (stage 1-3) checkpoint's partitions."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from train.ds_engine import DS_TAG

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)


def export(ckpt: Path, out: Path) -> Path:
    from phoclip.text import load_tokenizer
    from phoclip.model import get_model_config
    from train.config import RunConfig, _apply_tree
    from train.trainer import build_model

    meta = json.loads((ckpt / "meta.json").read_text())
    cfg = RunConfig()
    _apply_tree(cfg, meta["config"])
    tok_name = cfg.model.tokenizer or get_model_config(cfg.model.name)["text"].get("tokenizer")
    tok = load_tokenizer(tok_name)
    cfg.model.overrides.setdefault("vision", {})["pretrained"] = False
    cfg.model.overrides.setdefault("text", {})["pretrained"] = False
    model = build_model(cfg, tok)
    if (ckpt / "state.pt").is_file():
        sd = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)["model"]
    else:
        sd = zero_state_dict(ckpt)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # buffers (BatchNorm statistics) are not in ZeRO's fp32 partitions: take them from
    # the module state DeepSpeed saved beside them
    if missing:
        from train.ds_engine import DS_TAG

        mp = ckpt / DS_TAG / "mp_rank_00_model_states.pt"
        if mp.is_file():
            mod = torch.load(mp, map_location="cpu", weights_only=True)["module"]
            model.load_state_dict({k: mod[k] for k in missing if k in mod}, strict=False)
            missing = [k for k in missing if k not in mod]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt} does not fit its config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model.save_pretrained(out, tokenizer=tok)


def main(argv: Optional[Sequence[str]] = None) -> int:
    init_logger()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint folder (runs/NAME/checkpoints/step_N)")
    p.add_argument("out", help="the model folder to write")
    args = p.parse_args(argv)
    print(f"model written to {export(Path(args.checkpoint), Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
