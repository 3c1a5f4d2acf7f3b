"""Train PhoCLIP under torchrun (DDP; NCCL on GPUs, gloo on CPU).

    torchrun --nproc_per_node 8 launch/train_ddp.py --config launch/configs/phobert-large-rn50.yaml \\
        data.train_shards='shards/train-{000000..000099}.tar' run_dir=runs/exp1 --resume latest

The command lives in phoclip_cli.train (installed as `phoclip-train`); --help lists every
option and config group.
"""
import sys

from phoclip_cli.train import main

if __name__ == "__main__":
    sys.exit(main(doc=__doc__))
