"""Turn a checkpoint (DDP `state.pt` or a DeepSpeed ZeRO checkpoint) into the plain model
folder (config + safetensors + tokenizer) that evaluation and search load.

    python launch/export_model.py runs/exp1/checkpoints/step_00020000 runs/exp1/model
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from phoclip.errors import EXPECTED_ERRORS, one_line
from phoclip.log import init_logger


def export(ckpt: Path, out: Path) -> Path:
    """Write the checkpoint's model (and tokenizer) as a plain model folder."""
    from phoclip.text import load_tokenizer
    from train.export import model_from_checkpoint

    model, tok_name = model_from_checkpoint(ckpt)
    return model.save_pretrained(out, tokenizer=load_tokenizer(tok_name))


def main(argv: Optional[Sequence[str]] = None) -> int:
    init_logger()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint folder (runs/NAME/checkpoints/step_N)")
    p.add_argument("out", help="the model folder to write")
    args = p.parse_args(argv)
    try:
        print(f"model written to {export(Path(args.checkpoint), Path(args.out))}")
    except EXPECTED_ERRORS as e:
        print(f"export_model: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
