"""Train PhoCLIP with DeepSpeed ZeRO (same loop, data, loss and run folder as train_ddp.py).

    deepspeed --num_gpus 8 launch/train_deepspeed.py --config launch/configs/phobert-large-rn50.yaml \\
        --deepspeed_config launch/deepspeed/zero2.json run_dir=runs/exp1 --resume latest
    torchrun --nproc_per_node 8 launch/train_deepspeed.py ... (DeepSpeed reads torchrun's environment)

--resume on another number of GPUs works as under DDP (the data order continues; set
data.global_batch_size to keep the global batch): the ZeRO checkpoint is converted to
DeepSpeed's universal checkpoint at resume time, in the run's checkpoints folder, and the
loaded state is checked against the one saved. The ZeRO stage must stay the same.
"""
import sys

from phoclip_cli.train import main  # one entry point, one loop: this one selects the DeepSpeed engine

if __name__ == "__main__":
    sys.exit(main(engine="deepspeed", doc=__doc__))
