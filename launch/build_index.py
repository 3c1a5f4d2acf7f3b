"""Embed a folder of images, or our shards (images and their captions), into an index.

    python launch/build_index.py --model runs/exp1 --shards 'shards/val-{000000..000004}.tar' --out index/
    torchrun --nproc_per_node 4 launch/build_index.py --model runs/exp1 --images photos/ --out index/

The command lives in phoclip_cli.build_index (installed as `phoclip-index`); --help lists every option.
"""
import sys

from phoclip_cli.build_index import main

if __name__ == "__main__":
    sys.exit(main())
