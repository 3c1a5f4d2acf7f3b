"""`phoclip-plot RUN_DIR [--out PNG]` (also `python -m phoclip_cli.plot`): a run's training
curves as one PNG, drawn by `phoclip_train.plots.render_curves` from RUN_DIR/metrics.jsonl,
also while the run is going."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from phoclip_cli.common import refuse
from phoclip_train.plots import PlotError, render_curves


def build_parser() -> argparse.ArgumentParser:
    """The plot command's arguments."""
    p = argparse.ArgumentParser(prog="phoclip-plot", description="Draw a run's training curves (loss, learning "
                                "rates, samples/s, validation recall) from RUN_DIR/metrics.jsonl into a PNG; "
                                "also while the run is going.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="the run folder (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="the PNG to write (default: RUN_DIR/curves.png)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """`phoclip-plot RUN_DIR [--out PNG]`: prints the PNG's path; a refusal is one line
    on stderr and exit status 2, as every command's (`common.refuse`)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = render_curves(args.run_dir, args.out)
    except (PlotError, OSError) as e:
        return refuse("phoclip-plot", e)
    except Exception as e:  # what matplotlib refuses to draw: one line, not its traceback
        return refuse("phoclip-plot", ValueError(
            f"{args.run_dir}: cannot draw these metrics ({type(e).__name__}: {e})"[:500]))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
