"""Both towers as ONNX, and an encoder that runs them with onnxruntime.

`export_onnx(model, folder)` writes `folder/onnx/{image,text}.onnx` (dynamic batch; the
text tower also a dynamic sequence length) and checks them against PyTorch on the same
inputs. `OnnxModel(folder)` then embeds with onnxruntime behind the same small interface
as `PhoCLIP` (`encode_image`, `encode_text`, `config`), so search and serving run on
machines without PyTorch's GPU build. Image preprocessing stays the library's own."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from phoclip.fileio import atomic_write_json, create_temp, fsync_dir, read_regular, real_dir
from phoclip.models.pretrained import MAX_CONFIG_BYTES, check_model_config, model_fingerprint

ONNX_DIR = "onnx"
TOLERANCE = 1e-3  # max abs difference on normalised embeddings, checked at export


class _Tower(torch.nn.Module):
    def __init__(self, model, kind: str) -> None:
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x):
        return self.model.encode_image(x) if self.kind == "image" else self.model.encode_text(x)


def _probe_inputs(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = int(model.config["vision"].get("image_size", 224))
    images = torch.randn(3, 3, size, size, generator=g)
    vocab = int(model.text.config.vocab_size)
    ids = torch.randint(4, max(5, vocab), (4, 11), generator=g)
    ids[:, 0] = 0
    ids[1, 7:] = model.pad_id  # padded rows: the mask must travel too
    ids[3, 4:] = model.pad_id
    return images, ids


def export_onnx(model, folder: str | os.PathLike, opset: int = 17) -> Path:
    """Export both towers into `folder/onnx/` and verify them against PyTorch
    (max |difference| of normalised embeddings <= 1e-3 on images and on padded captions
    of another batch size and length than the export's). Returns the onnx folder."""
    import onnxruntime as ort

    model = model.float().eval()
    out = real_dir(Path(folder) / ONNX_DIR)  # a planted link there is refused, not written through
    images, ids = _probe_inputs(model)
    with torch.no_grad():
        for kind, x, name, axes in (("image", images[:2], "images", {0: "batch"}),
                                    ("text", ids[:2, :9], "input_ids", {0: "batch", 1: "sequence"})):
            # a random name created exclusively: a link planted at a fixed name would be
            # written through by the exporter
            fd, tmp = create_temp(out / f"{kind}.onnx")
            os.close(fd)
            # eval wrappers: the exporter restores the wrapper's mode afterwards, and a
            # wrapper left in train mode would put BatchNorm back on batch statistics
            torch.onnx.export(_Tower(model, kind).eval(), (x,), str(tmp), input_names=[name], output_names=["embedding"],
                              dynamic_axes={name: axes, "embedding": {0: "batch"}}, opset_version=opset,
                              dynamo=False)
            os.replace(tmp, out / f"{kind}.onnx")
            fsync_dir(out)
    diffs = {}
    with torch.no_grad():
        for kind, x, name in (("image", images, "images"), ("text", ids, "input_ids")):
            sess = ort.InferenceSession(str(out / f"{kind}.onnx"), providers=["CPUExecutionProvider"])
            got = sess.run(None, {name: x.numpy()})[0]
            want = _Tower(model, kind).eval()(x).numpy()
            diffs[kind] = float(np.abs(got - want).max())
    bad = {k: v for k, v in diffs.items() if not v <= TOLERANCE}
    if bad:
        raise RuntimeError(f"ONNX export of {folder} differs from PyTorch by {bad} (> {TOLERANCE})")
    atomic_write_json(out / "meta.json", {"fingerprint": model_fingerprint(model), "opset": opset,
                                          "max_abs_diff": diffs, "config": model.config}, indent=2)
    return out


class OnnxModel:
    """The model's two towers on onnxruntime, with `PhoCLIP`'s encoding interface.
    Checked at load: a file onnxruntime refuses, or a tower that does not turn one probe
    input into one finite `embed_dim`-wide row, is refused with a ValueError naming it."""

    def __init__(self, folder: str | os.PathLike, providers: Optional[list] = None) -> None:
        import onnxruntime as ort

        d = Path(folder) / ONNX_DIR
        if not (d / "meta.json").is_file():
            raise FileNotFoundError(f"{folder} has no ONNX export ({ONNX_DIR}/meta.json): run "
                                    f"python launch/export_model.py {folder} {folder} --format onnx")
        try:  # capped, regular files only
            meta = json.loads(read_regular(d / "meta.json", MAX_CONFIG_BYTES).decode("utf-8"))
            config, self.fingerprint = meta["config"], str(meta["fingerprint"])
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            raise ValueError(f"{d / 'meta.json'}: not an ONNX export description "
                             f"({type(e).__name__}: {e})") from None
        # the caps a model folder's config gets: sizes too large to embed with are refused
        self.config = check_model_config(config, f"{d / 'meta.json'}")
        self.pad_id = int(self.config["text"].get("pad_id", 1))
        dim, size = int(self.config["embed_dim"]), int(self.config["vision"].get("image_size", 224))
        providers = providers or ort.get_available_providers()
        self._image = _session(ort, d / "image.onnx", providers)
        self._text = _session(ort, d / "text.onnx", providers)
        self.providers: list[str] = self._text.get_providers()  # what onnxruntime runs on (said by the commands)
        # one probe per tower: a wrong graph answers 500 to every query otherwise
        ids = torch.tensor([[0, 4, 2, self.pad_id]])
        _probe(d / "image.onnx", lambda: self.encode_image(torch.zeros(1, 3, size, size)), dim)
        _probe(d / "text.onnx", lambda: self.encode_text(ids), dim)

    def eval(self) -> "OnnxModel":
        return self

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().float().cpu().numpy()
        return torch.from_numpy(self._image.run(None, {"images": x})[0])

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = input_ids.detach().long().cpu().numpy()
        return torch.from_numpy(self._text.run(None, {"input_ids": x})[0])


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def _session(ort, f: Path, providers: list):
    """An onnxruntime session for `f`; any refusal (missing, not ONNX, bad graph) is one
    ValueError naming the file."""
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing from the ONNX export; re-export the model")
    try:
        return ort.InferenceSession(str(f), providers=providers)
    except Exception as e:  # onnxruntime's own classes (InvalidProtobuf, Fail, ...), not a bug here
        raise ValueError(f"{f}: onnxruntime refuses it ({type(e).__name__}: {_first_line(e)}); "
                         "re-export the model") from None


def _probe(f: Path, run, dim: int) -> None:
    try:
        out = run()
    except Exception as e:  # a graph with other inputs, or one that fails at run time
        raise ValueError(f"{f}: fails on a probe input ({type(e).__name__}: {_first_line(e)}); "
                         "re-export the model") from None
    if out.ndim != 2 or tuple(out.shape) != (1, dim) or not bool(torch.isfinite(out).all()):
        raise ValueError(f"{f}: gives {tuple(out.shape)} {'finite' if torch.isfinite(out).all() else 'non-finite'} "
                         f"embeddings for one probe input, the model's embed_dim is {dim}: re-export the model")
