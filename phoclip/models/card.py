"""The model card (README.md) written into every exported model folder: what the model
is, how its text is prepared, what it was trained on and how, how well it does, and how
to load it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from phoclip.fileio import atomic_write_bytes, read_regular

CURVES_NAME = "curves.png"

# The five lines of the Python API (phoclip.load), as README.md shows them, and a batch
API_EXAMPLE = [
    "import phoclip",
    "model = phoclip.load(\"THIS_FOLDER\")                       # or backend=\"onnx\" for an ONNX export",
    "img = model.embed_images([\"photo.jpg\"])                   # paths or PIL images -> L2-normalised [n, d]",
    "txt = model.embed_texts([\"Một con chó chạy trên bãi cỏ\"]) # raw Vietnamese: normalisation, segmentation, "
    "tokenisation handled",
    "print(model.similarity(img, txt))                         # cosine matrix [n_images, n_texts]",
]
BATCH_EXAMPLE = [
    "from pathlib import Path",
    "photos = sorted(Path(\"~/Pictures\").expanduser().rglob(\"*.jpg\"))",
    "img = model.embed_images(photos, batch_size=64)            # batched; progress is logged for long lists",
    "txt = model.embed_texts([\"con mèo\", \"xe đạp\", \"bãi biển\"], batch_size=256)",
    "best = model.similarity(txt, img).argmax(dim=1)            # the best photo for each text",
]


def _table(rows: list[tuple[str, object]]) -> str:
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v not in (None, "", {})])


def attach_curves(folder: str | os.PathLike, curves_png: str | os.PathLike) -> str:
    """Copy a run's training-curves PNG (phoclip_train.plots) into a model folder,
    atomically, as `curves.png`; returns the name for `model_card(curves=...)`. A file
    that is not a regular PNG is refused (ValueError naming it), so a card never links a
    picture that is not there."""
    data = read_regular(curves_png, max_bytes=64 << 20)
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"{curves_png}: not a PNG image; not attached to the model card")
    atomic_write_bytes(Path(folder) / CURVES_NAME, data)
    return CURVES_NAME


def model_card(config: dict, training: Optional[dict] = None, data: Optional[dict] = None,
               evaluation: Optional[dict] = None, fingerprint: str = "", curves: Optional[str] = None) -> str:
    """Markdown for a model folder. `training`: the run config (RunConfig.to_dict());
    `data`: the shards' manifest summary; `evaluation`: the last validation metrics;
    `curves`: the training-curves picture's name inside the folder (`attach_curves`)."""
    v, t = config.get("vision", {}), config.get("text", {})
    hc = t.get("hf_config") or {}
    arch = [("image tower", f"timm `{v.get('timm_model')}` at {v.get('image_size', 224)} px"),
            ("text tower", f"{hc.get('model_type', '?')} ({t.get('hf_model') or 'inline config'}), "
                           f"{hc.get('num_hidden_layers', '?')} layers, hidden {hc.get('hidden_size', '?')}, "
                           f"{t.get('pooling', 'cls')} pooling"),
            ("embedding", f"{config.get('embed_dim')}-d, L2-normalised; projection heads Linear-GELU-Linear-"
                          "dropout-residual-LayerNorm"),
            ("tokenizer", "`tokenizer/` in this folder (PhoBERT format)"),
            ("text preparation", f"Unicode NFC, word segmentation with {t.get('segmenter') or 'unrecorded'} "
                                 f"{t.get('segmenter_version') or ''}, max {t.get('max_length', '?')} tokens"),
            ("weights fingerprint", f"`{fingerprint}`" if fingerprint else None)]
    parts = [f"# PhoCLIP model: {config.get('name', 'phoclip')}", "",
             "A Vietnamese CLIP: image and text embeddings in one space, for text → image search, "
             "image → text search and image-text similarity. Queries must be prepared as the "
             "training captions were (same segmenter, same tokenizer): `phoclip.models.embed."
             "query_processor` does it from this folder's config.", "", "## Architecture", "", _table(arch)]
    if training:
        tr, d, o = training.get("train", {}), training.get("data", {}), training.get("optim", {})
        parts += ["", "## Training", "", _table([
            ("steps", tr.get("max_steps")), ("engine", tr.get("engine")), ("precision", tr.get("precision")),
            ("loss", tr.get("loss")), ("batch per rank", d.get("batch_size")),
            ("accumulation", tr.get("accum_steps")),
            ("learning rates (image / text / heads)", f"{o.get('lr_image')} / {o.get('lr_text')} / {o.get('lr_head')}"),
            ("schedule", f"{o.get('warmup_steps')} warmup steps, then {o.get('schedule')}"),
            ("training shards", f"`{d.get('train_shards')}`")])]
    if data:
        src = data.get("sources") or {}
        parts += ["", "## Data", "", _table([
            ("images (train / val)", f"{data.get('counts', {}).get('train')} / {data.get('counts', {}).get('val')}"),
            ("captions (train / val)", f"{data.get('captions', {}).get('train')} / {data.get('captions', {}).get('val')}"),
            ("sources", ", ".join(f"{k} ({v.get('train', 0)} train, {v.get('val', 0)} val)" for k, v in src.items())),
            ("tokenizer", (data.get("tokenizer") or {}).get("name"))])]
    if evaluation:
        keys = [k for k in ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10") if k in evaluation]
        parts += ["", "## Evaluation (held-out validation shards)", "",
                  "| " + " | ".join(keys) + " | images |", "|" + "---|" * (len(keys) + 1),
                  "| " + " | ".join(f"{evaluation[k]:.1f}" for k in keys)
                  + f" | {int(evaluation.get('n_images', 0))} |"]
    if curves:
        parts += ["", "## Training curves", "", f"![loss, learning rates, samples/s and validation recall]({curves})"]
    parts += ["", "## Use", "", "```python", *API_EXAMPLE, "```", "", "Many photos and texts at once:", "",
              "```python", *BATCH_EXAMPLE, "```", "",
              "The bare PyTorch module (for fine-tuning): `phoclip.load_model(\"THIS_FOLDER\")` "
              "(= `phoclip.PhoCLIP.from_pretrained`).",
              "Search service: `phoclip-index --model THIS_FOLDER --images PHOTOS --out INDEX`, then "
              "`phoclip-serve --index INDEX --model THIS_FOLDER`; ONNX: "
              "`phoclip-export THIS_FOLDER OUT --format onnx`.", ""]
    return "\n".join(parts)
