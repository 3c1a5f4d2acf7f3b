"""One logger set-up for every entry point; library modules only call getLogger."""
from __future__ import annotations

import logging
import os
import sys


def init_logger(level: int = logging.INFO, rank: int | None = None) -> None:
    """Console logging. Under a launcher, only rank 0 logs INFO; other ranks log
    warnings and errors (decided here, once, not with rank checks in the code)."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    prefix = f"[rank{rank}] " if "RANK" in os.environ else ""
    h.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
                                     "%H:%M:%S"))
    root.addHandler(h)
    root.setLevel(level if rank == 0 else logging.WARNING)
