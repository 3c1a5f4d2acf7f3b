"""One logger set-up for every entry point; library modules only call getLogger."""
from __future__ import annotations

import logging
import sys
from typing import Optional


def init_logger(level: int = logging.INFO, rank: Optional[int] = None) -> None:
    """Console logging. `rank` (the launch layer reads it from the launcher, e.g.
    `phoclip_cli.distributed.launcher_rank()`): None for a single process; under a
    launcher only rank 0 logs INFO, other ranks warnings and errors, each line prefixed
    with its rank (decided here, once, not with rank checks in the code)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    prefix = f"[rank{rank}] " if rank is not None else ""
    h.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
                                     "%H:%M:%S"))
    root.addHandler(h)
    root.setLevel(level if not rank else logging.WARNING)
