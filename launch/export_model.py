"""Turn a checkpoint (DDP `state.pt` or a DeepSpeed ZeRO checkpoint) into the plain model
folder (config + safetensors + tokenizer + model card) that evaluation and search load;
optionally both towers as ONNX too.

    python launch/export_model.py runs/exp1/checkpoints/step_00020000 runs/exp1/model
    python launch/export_model.py runs/exp1/model runs/exp1/model --format onnx
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from phoclip.errors import EXPECTED_ERRORS, one_line
from phoclip.log import init_logger


def export(ckpt: Path, out: Path) -> Path:
    """Write the checkpoint's model (and tokenizer, and its card) as a plain model folder."""
    import json

    from phoclip.text import load_tokenizer
    from phoclip_train.export import model_from_checkpoint

    model, tok_name = model_from_checkpoint(ckpt)  # verifies the checkpoint first
    meta = json.loads((ckpt / "meta.json").read_text())
    return model.save_pretrained(out, tokenizer=load_tokenizer(tok_name), training=meta.get("config"),
                                 data=meta.get("data"), evaluation=meta.get("evaluation"))


def export_any(src: Path, out: Path, fmt: str = "safetensors") -> Path:
    """A checkpoint, run folder or model folder → the plain model folder `out`; with
    fmt="onnx" also both towers as ONNX in `out/onnx/`, checked against PyTorch."""
    import shutil

    from phoclip.model import CONFIG_NAME, load_model

    if (src / "meta.json").is_file():
        folder = export(src, out)
    else:
        model_dir = src if (src / CONFIG_NAME).is_file() else src / "model"
        if not (model_dir / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{src}: not a checkpoint, model folder or run folder with a model")
        if out.resolve() != model_dir.resolve():
            shutil.copytree(model_dir, out, dirs_exist_ok=True)
        folder = out
    if fmt == "onnx":
        from phoclip.onnx_backend import export_onnx

        print(f"ONNX towers written to {export_onnx(load_model(folder), folder)} (checked against PyTorch)")
    return folder


def main(argv: Optional[Sequence[str]] = None) -> int:
    init_logger()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint folder (runs/NAME/checkpoints/step_N), a run folder "
                                      "or a model folder")
    p.add_argument("out", help="the model folder to write (may be the model folder itself with --format onnx)")
    p.add_argument("--format", choices=("safetensors", "onnx"), default="safetensors",
                   help="onnx: also both towers as ONNX (dynamic batch and length) in OUT/onnx/")
    args = p.parse_args(argv)
    try:
        print(f"model written to {export_any(Path(args.checkpoint), Path(args.out), args.format)}")
    except EXPECTED_ERRORS as e:
        print(f"export_model: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
