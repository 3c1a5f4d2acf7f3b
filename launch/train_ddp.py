"""Train PhoCLIP under torchrun (DDP; NCCL on GPUs, gloo on CPU).

    torchrun --nproc_per_node 8 launch/train_ddp.py --config launch/configs/phobert-large-rn50.yaml \\
        data.train_shards='shards/train-{000000..000099}.tar' run_dir=runs/exp1 --resume latest
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

# heavy imports (torch, the trainer) come after the arguments are parsed: --help is instant

logger = logging.getLogger("phoclip_train.launch")


def parse_args(argv: Optional[Sequence[str]] = None, doc: Optional[str] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (launch/configs/)")
    p.add_argument("--resume", help="'latest' or a checkpoint folder")
    p.add_argument("--deepspeed_config", help="DeepSpeed JSON (selects the DeepSpeed engine)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value, e.g. train.max_steps=20")
    # overrides may come before and after options (`run_dir=x --resume latest k=v`)
    return p.parse_intermixed_args(argv)


def main(argv: Optional[Sequence[str]] = None, engine: str = "ddp", doc: Optional[str] = None) -> int:
    args = parse_args(argv, doc)
    from phoclip.errors import EXPECTED_ERRORS, one_line
    from phoclip.log import init_logger
    from phoclip_train.config import ConfigError, resolve_config
    from phoclip_train.distributed import cleanup, init_distributed, launcher_rank
    from phoclip_train.trainer import NonFiniteError, StoppedWaitingForData, Trainer

    init_logger(rank=launcher_rank())
    try:
        cfg = resolve_config(args.config, args.overrides)
        if args.resume:
            cfg.resume = args.resume
        if args.deepspeed_config:
            cfg.train.engine, cfg.train.deepspeed_config = "deepspeed", args.deepspeed_config
        elif engine == "deepspeed":
            cfg.train.engine = "deepspeed"
        if cfg.train.engine == "deepspeed" and cfg.train.deepspeed_config:
            from phoclip_train.ds_engine import check_ds_precision

            check_ds_precision(cfg.train.deepspeed_config, cfg)  # before anything is built
    except ConfigError as e:
        logger.error("bad configuration: %s", e)
        return 2
    info = init_distributed(cfg.train.device)
    trainer = None
    stuck = False
    try:
        trainer = Trainer(cfg, info)
        trainer.train()
        return 0
    except StoppedWaitingForData as e:
        logger.warning("%s", e)
        stuck = True
        return 0
    except EXPECTED_ERRORS as e:
        logger.error("refused: %s", one_line(e))
        return 2
    except NonFiniteError as e:
        logger.error("%s", e)
        return 3
    finally:
        if trainer is not None:
            trainer.close()
        cleanup()
        if stuck:
            # a loader worker may be blocked in a read that never returns: leave without
            # joining it (it dies with us, by its parent-death signal)
            logging.shutdown()
            os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
