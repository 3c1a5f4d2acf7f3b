"""Export: a training checkpoint (DDP `state.pt` or a DeepSpeed ZeRO checkpoint), a run
folder or a model folder -> the plain model folder (config + safetensors + tokenizer +
model card) that `phoclip.load` reads; optionally both towers as ONNX too.

    phoclip-export runs/exp1/checkpoints/step_00020000 runs/exp1/export
    python launch/export_model.py runs/exp1 runs/exp1/export --format onnx

Loading a model for inference is the library's (`phoclip.load`, phoclip/models/loading.py: no
training code); export reads checkpoints through the same loader."""
from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

from phoclip.fileio import atomic_open, real_dir
from phoclip.models.loading import NotAModelFolder, model_folder, model_from_checkpoint

logger = logging.getLogger(__name__)

FORMATS = ("safetensors", "onnx")


def export_checkpoint(ckpt: Path, out: Path) -> Path:
    """Write the checkpoint's model (and tokenizer, and its card) as a plain model folder."""
    # phoclip-export imports this module before parsing: its --help answers in 0.1 s, torch takes 1.7 s
    from phoclip.data.text import load_tokenizer  # lazy: torch
    from phoclip.models.checkpoints import read_meta  # lazy: torch

    model, tok_name = model_from_checkpoint(ckpt)  # verifies it first
    meta = read_meta(ckpt)
    return model.save_pretrained(out, tokenizer=load_tokenizer(tok_name), training=meta.get("config"),
                                 data=meta.get("data"), evaluation=meta.get("evaluation"))


def copy_model_folder(src: Path, out: Path) -> None:
    """Copy a model folder's regular files into `out`, each through an exclusive temporary
    name and a rename (a link planted in `out` is replaced, never written through). A
    link or anything but a folder or regular file in `src` is refused in one line before
    anything is written: a link's target (another user's private key) would otherwise
    become a plain file of the exported model."""
    files = []
    for root, dirs, names in os.walk(src):  # os.walk lists a linked folder in dirs and does not enter it
        for name in sorted(dirs + names):
            p = Path(root) / name
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                raise ValueError(f"{p}: a link in the model folder to export; refusing to copy it (a model folder "
                                 "holds its own files: copy the file in, or export the checkpoint)")
            if stat.S_ISREG(mode):
                files.append(p.relative_to(src))
            elif not stat.S_ISDIR(mode):
                raise ValueError(f"{p}: not a regular file (a FIFO, socket or device) in the model folder to export")
    for rel in files:
        dst = real_dir(out)
        for part in rel.parent.parts:
            dst = real_dir(dst / part)
        fd = os.open(src / rel, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fi, atomic_open(dst / rel.name, mode=0o666) as fo:
            if not stat.S_ISREG(os.fstat(fi.fileno()).st_mode):  # swapped since the walk
                raise ValueError(f"{src / rel}: not a regular file; refusing to copy it")
            shutil.copyfileobj(fi, fo, 1 << 20)


def export(src: str | Path, out: str | Path, fmt: str = "safetensors") -> Path:
    """A checkpoint, run folder (its exported model, else its newest checkpoint that
    verifies) or model folder -> the plain model folder `out`; with fmt="onnx" also both
    towers as ONNX in `out/onnx/`, checked against PyTorch. Returns `out`."""
    from phoclip.models.checkpoints import checkpoints_dir, is_checkpoint, newest_verified  # lazy: torch
    from phoclip.models.factory import load_model  # lazy: torch
    from phoclip.models.onnx import export_onnx  # lazy: torch

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    src, out = Path(src), Path(out)
    folder = model_folder(src)
    if folder is not None:
        if out.resolve() != folder.resolve():
            copy_model_folder(folder, out)
    else:
        ckpt = newest_verified(src) if checkpoints_dir(src).is_dir() else src
        if ckpt is None or not is_checkpoint(ckpt):
            raise NotAModelFolder(f"{src}: not a checkpoint, model folder or run folder with a model or checkpoint")
        logger.info("exporting checkpoint %s", ckpt)
        export_checkpoint(ckpt, out)
    if fmt == "onnx":
        logger.info("ONNX towers written to %s (checked against PyTorch)", export_onnx(load_model(out), out))
    return out
