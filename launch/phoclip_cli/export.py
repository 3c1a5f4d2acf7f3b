"""Export: a training checkpoint (DDP `state.pt` or a DeepSpeed ZeRO checkpoint), a run
folder or a model folder -> the plain model folder (config + safetensors + tokenizer +
model card) that `phoclip.load` reads; optionally both towers as ONNX too.

    phoclip-export runs/exp1/checkpoints/step_00020000 runs/exp1/export
    python launch/export_model.py runs/exp1 runs/exp1/export --format onnx

Loading a model for inference is the library's (`phoclip.load`, phoclip/models/loading.py: no
training code). Export may use the training package: a checkpoint without a recorded
model config (meta.json `model_config`) is rebuilt here from its run config."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from phoclip.errors import EXPECTED_ERRORS
from phoclip.log import init_logger
from phoclip_cli.common import refuse
from phoclip_train.export import FORMATS, export


def build_parser() -> argparse.ArgumentParser:
    """The export command's arguments (no heavy imports: --help answers at once)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint folder (runs/NAME/checkpoints/step_N), a run folder (its "
                                      "exported model, else its newest checkpoint that verifies) or a model folder")
    p.add_argument("out", help="the model folder to write (may be the model folder itself with --format onnx)")
    p.add_argument("--format", choices=FORMATS, default="safetensors",
                   help="onnx: also both towers as ONNX (dynamic batch and length) in OUT/onnx/, "
                        "checked against PyTorch")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`phoclip-export` / `python launch/export_model.py`: 0 on success, 2 with a one-line
    message for a refused input."""
    args = build_parser().parse_args(argv)
    init_logger()
    try:
        out = export(args.checkpoint, args.out, args.format)
    except EXPECTED_ERRORS as e:
        return refuse("export", e)
    if args.format == "onnx":
        print(f"ONNX towers written to {out / 'onnx'} (checked against PyTorch)")
    print(f"model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
