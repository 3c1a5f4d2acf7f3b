"""The checkpoint layout, and reading a training checkpoint's model for inference
without the training package. This module names every file of a checkpoint (the
trainer writes through these names, export and inference read through them):

    RUN_DIR/checkpoints/step_NNNNNNNN/      one complete checkpoint (STEP_DIR)
        meta.json                           step, world_size, samples seen, configs (META_FILE)
        rankNNNNN.pt                        each rank's data position and RNG (rank_file)
        state.pt                            DDP: model, optimizer, schedule, scaler (STATE_FILE)
        deepspeed/                          DeepSpeed's own files (DS_TAG)
        deepspeed_state.json                a fingerprint of the DeepSpeed state (DS_STATE_FILE)
        tokenizer/                          the run's tokenizer (TOKENIZER_DIR)

Is a folder complete and safe (every .pt loads with weights_only=True before anything
that unpickles freely - DeepSpeed's zero_to_fp32 - touches it), which is the newest one
that verifies, and the model's weights out of it. Writing checkpoints, and the rest of
their state (optimizer, data position, RNG), is the trainer's (`phoclip_train.checkpointer`)."""
from __future__ import annotations

import importlib
import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import Optional, Sequence

import torch

from phoclip.errors import CheckpointError, SetupError
from phoclip.fileio import read_regular

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"  # inside a run folder
STEP_DIR = re.compile(r"^step_(\d{8})$")
META_FILE = "meta.json"
STATE_FILE = "state.pt"  # the DDP engine's model, optimizer, schedule and scaler
DS_TAG = "deepspeed"  # the folder inside a checkpoint that holds DeepSpeed's own files
DS_STATE_FILE = "deepspeed_state.json"  # beside DS_TAG: layout + fingerprint of the saved state
DS_MODULE_STATES = "mp_rank_00_model_states.pt"  # in DS_TAG under ZeRO-1/2: the whole module
DS_ZERO3_MODULE_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # ZeRO-3: rank 0's (one per rank)
DS_ANY_MODULE_STATES = "*model_states.pt"  # either of the two
TOKENIZER_DIR = "tokenizer"
MAX_META_BYTES = 64 << 20
MAX_WORLD_SIZE = 65536  # a meta.json saying more is refused: verification lists a file per rank

def step_dir(step: int) -> str:
    """The folder name of step `step`'s checkpoint."""
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    """The file name of a rank's own state (data position, RNG)."""
    return f"rank{rank:05d}.pt"


def ds_optim_file(rank: int) -> str:
    """The file name of a rank's optimizer partition in DeepSpeed's folder."""
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    """Where a run folder keeps its checkpoints."""
    return Path(run_dir) / CHECKPOINTS_DIR


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a checkpoint folder (it has a meta.json; complete or not is
    `verify_checkpoint`'s question)."""
    return (Path(path) / META_FILE).is_file()


def checkpoint_tokenizer(ckpt: str | os.PathLike) -> Optional[str]:
    """The tokenizer folder a checkpoint carries, else None."""
    d = Path(ckpt) / TOKENIZER_DIR
    return str(d) if d.is_dir() else None


# The only classes a DeepSpeed (0.19) checkpoint pickles besides tensors and containers
# (found by torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-1/2/3 bf16, fp32
# and fp16 checkpoints). Each is plain data; nothing else may be unpickled.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def deepspeed_globals() -> list:
    """The classes of DEEPSPEED_SAFE_GLOBALS this DeepSpeed has (none without DeepSpeed)."""
    out = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        mod, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(mod), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version, or none: not allowed then
            pass
    return out


def verify_torch_file(f: Path, allow: Sequence = ()) -> None:
    """Refuse a .pt file that does not load with weights_only=True (plus the `allow`ed
    classes): one crafted file must not run code when DeepSpeed or zero_to_fp32, which
    load with weights_only=False, read it. Only a regular file is read: it is opened
    non-blocking without following a link and checked with fstat first, so a FIFO (which
    would block forever), a device or a link out of the checkpoint is refused unread.
    Tensors are memory-mapped, not read."""
    f = Path(f)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(f, flags)
    except OSError as e:
        kind = "a link, not a file" if os.path.islink(f) else (e.strerror or type(e).__name__)
        raise CheckpointError(f"{f}: refused, {kind}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
            raise CheckpointError(f"{f}: refused, {kind}")
        # load the file we checked, not whatever the name points at by now
        src = f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else f
        _load_weights_only(src, f, allow)
    finally:
        os.close(fd)


def _load_weights_only(src, f: Path, allow: Sequence) -> None:
    try:
        with torch.serialization.safe_globals(list(allow)):
            try:
                torch.load(src, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                torch.load(src, map_location="cpu", weights_only=True)  # a legacy (non-zip) file
    except Exception as e:  # every failure is a refusal, whatever the unpickler raised
        why = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "global" in line),
                   str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise CheckpointError(f"{f}: refused, not loadable with weights_only=True: {why}") from None


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json, with its integer `step` (>= 0) and `world_size` (1 to
    MAX_WORLD_SIZE; verification lists a file per rank); CheckpointError naming the file
    otherwise."""
    f = Path(path) / META_FILE
    try:
        meta = json.loads(read_regular(f, MAX_META_BYTES))
    except RecursionError:
        raise CheckpointError(f"{f}: unreadable (JSON nested too deeply)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable ({e})") from None
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) and not isinstance(meta.get(k), bool)
                                              for k in ("step", "world_size")):
        raise CheckpointError(f"{f}: no integer 'step' and 'world_size'")
    if meta["step"] < 0:
        raise CheckpointError(f"{f}: 'step' must be >= 0, not {meta['step']}")
    if not 1 <= meta["world_size"] <= MAX_WORLD_SIZE:
        raise CheckpointError(f"{f}: 'world_size' must be 1 to {MAX_WORLD_SIZE}, not {meta['world_size']}")
    return meta


def verify_checkpoint(path: Path) -> dict:
    """A checkpoint folder that is complete and safe to load: meta.json readable, every
    rank's state and the engine's files present, every .pt file loadable with
    weights_only=True. Returns its meta; raises CheckpointError naming the problem."""
    path = Path(path)
    meta = read_meta(path)
    missing = [rank_file(r) for r in range(meta["world_size"]) if not (path / rank_file(r)).is_file()]
    ds = path / DS_TAG
    if ds.is_dir():  # ZeRO-1/2: mp_rank_00_model_states.pt; ZeRO-3: one model_states per rank
        if not list(ds.glob(DS_ANY_MODULE_STATES)):
            missing.append(f"{DS_TAG}/{DS_ANY_MODULE_STATES}")
        missing += [f"{DS_TAG}/{ds_optim_file(r)}" for r in range(meta["world_size"])
                    if not (ds / ds_optim_file(r)).is_file()]
    elif not (path / STATE_FILE).is_file():
        missing.append(STATE_FILE)
    if missing:
        raise CheckpointError(f"{path}: incomplete, missing {', '.join(missing)}")
    allow = deepspeed_globals() if ds.is_dir() else []
    for f in checkpoint_files(path):
        verify_torch_file(f, allow)
    return meta


def checkpoint_files(path: Path) -> list[Path]:
    """Every .pt file a load of this checkpoint may open, named as the loaders name them.
    The folders the loaders read (the checkpoint and its DeepSpeed folder) are listed
    through a link, so a `deepspeed/` that links elsewhere has its files verified where
    they really are (DeepSpeed and zero_to_fp32 unpickle them with weights_only=False);
    a linked folder no loader enters is not walked (rglob does not descend into links,
    nor into a link loop). A linked .pt file is refused by verify_torch_file."""
    path = Path(path)
    found = set(path.rglob("*.pt"))
    for folder in (path, path / DS_TAG):
        if folder.is_dir():
            found.update(folder.glob("*.pt"))
    return sorted(found)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """A run folder's checkpoints (step_N/ with a meta.json: renamed into place whole,
    so complete as written; whether each verifies is `verify_checkpoint`'s), oldest first."""
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    out = [p for p in d.iterdir() if STEP_DIR.match(p.name) and is_checkpoint(p)]
    return sorted(out, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def newest_verified(run_dir: str | os.PathLike, passing: str = "passing over checkpoint") -> Optional[Path]:
    """The newest checkpoint of a run that verifies, logging why newer ones were passed
    over (`passing`: the start of that line); None when there is none; CheckpointError
    when there are some and none verifies (never fall back silently to nothing)."""
    why = []
    for p in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(p)
            return p
        except CheckpointError as e:
            logger.warning("%s %s: %s", passing, p.name, e)
            why.append(str(e))
    if why:
        raise CheckpointError(f"none of the {len(why)} checkpoints in {checkpoints_dir(run_dir)} "
                              f"verifies (newest: {why[0]})")
    return None


def load_checkpoint_weights(model: torch.nn.Module, ckpt: Path) -> torch.nn.Module:
    """Load a verified checkpoint's model weights into `model`: a DDP STATE_FILE's
    "model" (weights_only=True), or a DeepSpeed ZeRO checkpoint's partitions gathered to
    fp32 (its BatchNorm statistics from the module state saved beside them). Only the
    model is read; every key must fit."""
    ckpt = Path(ckpt)
    if (ckpt / STATE_FILE).is_file():
        sd = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(sd, dict) or not isinstance(sd.get("model"), dict):
            raise CheckpointError(f"{ckpt / STATE_FILE}: holds no 'model' state")
        sd = sd["model"]
    else:
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError:
            raise SetupError(f"{ckpt}: a DeepSpeed checkpoint; reading it needs deepspeed installed "
                             "(pip install 'phoclip[deepspeed]'), or export it where training ran") from None
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (config: {tuple(own[k].shape)})" for k, v in sd.items()
             if k in own and hasattr(v, "shape") and v.shape != own[k].shape]
    if wrong:  # load_state_dict would raise a many-line RuntimeError
        raise CheckpointError(f"{ckpt}: weights do not fit its model config: {len(wrong)} of another shape, "
                              f"e.g. {wrong[0]}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing:
        # buffers (BatchNorm statistics) are not in ZeRO's fp32 partitions: take them
        # from the module state DeepSpeed saved beside them
        mp = ckpt / DS_TAG / DS_MODULE_STATES
        if mp.is_file():
            with torch.serialization.safe_globals(deepspeed_globals()):
                mod = torch.load(mp, map_location="cpu", weights_only=True)
            if not isinstance(mod, dict) or not isinstance(mod.get("module"), dict):
                raise CheckpointError(f"{mp}: holds no 'module' state")
            mod = mod["module"]
            model.load_state_dict({k: mod[k] for k in missing if k in mod}, strict=False)
            missing = [k for k in missing if k not in mod]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not fit its model config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model
