"""`python sharding/make_shards.py`: the sharding command (see `--help`; the job itself
lives in sharding/phoclip_sharding/)."""
import sys

from phoclip_sharding.cli import main
from phoclip_sharding.writer import without_torch

if __name__ == "__main__":
    without_torch()  # this command never runs a model (in-process callers keep their torch)
    sys.exit(main())
