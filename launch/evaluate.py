"""Retrieval evaluation: recall@1/5/10 both ways, mean and median rank.

    python launch/evaluate.py --model runs/exp1 --shards 'shards/val-{000000..000004}.tar'
    python launch/evaluate.py --model runs/exp1 --benchmark ktvic:KTVIC/test_data.json:KTVIC/public-test-images
    torchrun --nproc_per_node 2 launch/evaluate.py ...    (each rank embeds its part)

The command lives in phoclip_cli.evaluate (installed as `phoclip-eval`); --help lists every option.
"""
import sys

from phoclip_cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
