"""Train PhoCLIP: DDP under torchrun (NCCL on GPUs, gloo on CPU), or DeepSpeed ZeRO with
--deepspeed_config (under torchrun or the deepspeed launcher).

    torchrun --nproc_per_node 8 launch/train_ddp.py --config launch/configs/phobert-large-rn50.yaml \\
        data.train_shards=shards/ run_dir=runs/exp1 --resume latest
    torchrun --nproc_per_node 8 --no-python phoclip-train --config ... (the installed command)
    deepspeed --num_gpus 8 --no_python phoclip-train --config ... --deepspeed_config launch/deepspeed/zero2.json
    phoclip-train --config launch/configs/tiny-debug.yaml data.train_shards=shards/ --print-config

Settings come from the defaults, then the --config YAML file, then key=value overrides
(GROUP.FIELD=VALUE, values read as YAML); --print-config shows the result, field by
field, with its documentation, default and source.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from phoclip.errors import EXPECTED_ERRORS, one_line
from phoclip.log import init_logger
from phoclip_cli.common import HelpFormatter, record_refusal
from phoclip_train.config import ConfigError, config_groups, describe_config, resolve_config

# torch and the trainer (5 s to import) come after the arguments are parsed: --help answers at once

logger = logging.getLogger("phoclip_train.launch")


def _groups_epilog() -> str:
    rows = [f"  {name:8} {doc}" for name, doc in config_groups()]
    return ("config groups (set a field as GROUP.FIELD=VALUE or under GROUP: in the --config file; "
            "--print-config lists every field):\n" + "\n".join(rows))


def build_parser(engine: str = "ddp", doc: Optional[str] = None) -> argparse.ArgumentParser:
    """The training command's arguments (`engine`: the engine this entry point selects
    without --deepspeed_config; `doc`: the description shown by --help)."""
    p = argparse.ArgumentParser(description=doc or __doc__, epilog=_groups_epilog(), formatter_class=HelpFormatter)
    p.add_argument("--config", help="YAML run config (launch/configs/); its values replace the defaults")
    p.add_argument("--resume", help="'latest' or a checkpoint folder (the same as the override resume=...)")
    p.add_argument("--deepspeed_config", "--deepspeed-config",
                   help="DeepSpeed JSON (launch/deepspeed/); selects the DeepSpeed engine (the same as "
                        "train.engine=deepspeed train.deepspeed_config=...)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (each field's value, source, default and meaning) and exit")
    # the deepspeed launcher passes --local_rank=N (unless --no_local_rank); the rank is read from the environment
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. train.max_steps=20 data.batch_size=32")
    p.set_defaults(engine=engine)
    return p


def parse_args(argv: Optional[Sequence[str]] = None, engine: str = "ddp",
               doc: Optional[str] = None) -> argparse.Namespace:
    """Options and key=value overrides in any order (`run_dir=x --resume latest k=v`)."""
    return build_parser(engine, doc).parse_intermixed_args(argv)


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides the run resolves: the command line's key=value, then the flags that
    are shorthands for config fields (one path: the flags never shadow the config)."""
    over = list(args.overrides)
    if args.resume:
        over.append(f"resume={args.resume}")
    if args.deepspeed_config:
        over += ["train.engine=deepspeed", f"train.deepspeed_config={args.deepspeed_config}"]
    elif args.engine == "deepspeed":
        over.append("train.engine=deepspeed")
    return over


def _refuse(message: str, code: int = 2) -> int:
    logger.error("%s", message)
    record_refusal(message, code)  # torchrun's root cause: our line, not its traceback hint
    return code


def main(argv: Optional[Sequence[str]] = None, engine: str = "ddp", doc: Optional[str] = None) -> int:
    """Parse, resolve the config, then build, train and close the run; the exit code: 0 done
    (or stopped waiting for data), 2 refused (one line), 3 too many non-finite steps."""
    args = parse_args(argv, engine, doc)
    rank = os.environ.get("RANK")  # as phoclip_cli.distributed.launcher_rank, without importing torch yet
    init_logger(rank=int(rank) if rank is not None and rank.strip().isdigit() else None)
    sources: dict = {}
    try:
        cfg = resolve_config(args.config, config_overrides(args), sources)
        if args.print_config:
            print(describe_config(cfg, sources))
            return 0
    except ConfigError as e:
        return _refuse(f"bad configuration: {one_line(e)}")
    run = run_training
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        # under torchrun an unexpected error's traceback becomes the root cause it reports
        # (refusals write their one line themselves, and return)
        from torch.distributed.elastic.multiprocessing.errors import record

        run = record(run_training)
    return run(cfg)


def run_training(cfg) -> int:
    """Build the run of a resolved config, train it and close it; the exit code (see `main`)."""
    from phoclip_cli.distributed import cleanup, init_distributed  # lazy: torch; --help answers without it
    from phoclip_train.run import build_run  # lazy: torch; --help answers without it
    from phoclip_train.trainer import NonFiniteError, StoppedWaitingForData, Trainer  # lazy: torch, as above

    info = init_distributed(cfg.train.device)
    trainer = None
    stuck = False
    try:
        trainer = Trainer(build_run(cfg, info))
        trainer.train()
        return 0
    except StoppedWaitingForData as e:
        logger.warning("%s", e)
        stuck = True
        return 0
    except EXPECTED_ERRORS as e:
        return _refuse(f"refused: {one_line(e)}")
    except NonFiniteError as e:
        return _refuse(str(e), 3)
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
