"""open_clip as the peer: the same towers built through open_clip's own model config (a
timm image tower, an HF RoBERTa text tower with our text config, random init) and
trained by open_clip's own step (its ClipLoss, AdamW, logit-scale clamp, as in its
train_one_epoch), against our Trainer.train_step - same batch, same ids, same machine,
one run. Here on the CPU with the tiny twin (test_resnet + a 2-layer RoBERTa);
bench/gpu_check.py runs the real size (resnet50 + phobert-large) on a GPU.

Both steps do the same work: gradient clipping at 1.0 (our recipe's; open_clip's
--grad-clip-norm), AdamW, the temperature clamp. Ours also normalises the uint8 batch on
the device (open_clip's loader workers ship normalised floats, so its step does not).

Captions: realistic lengths (bench_text_padding.caption_lengths: mean ~24 tokens, tail
to 70), padded to 70 as open_clip's HF tokenizer pads to its context length. Ours is
timed padded (data.trim_padding=0) and trimmed (the default).

    pip install -r bench/requirements.txt   # open_clip_torch, bench-only
    python bench/bench_peer_openclip.py [--batch 32] [--steps 30]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_shards, machine, table  # noqa: E402


def openclip_model(work: Path, text_config: dict, timm_model: str, image_size: int, embed_dim: int):
    """The peer model from an open_clip model config (registered from a JSON file); its
    HF text tower reads `text_config` from a local folder (no hub)."""
    import open_clip
    from transformers import AutoConfig

    hf_dir = work / "oc_text"
    AutoConfig.for_model(**text_config).save_pretrained(hf_dir)
    cfg = {"embed_dim": embed_dim,
           "vision_cfg": {"timm_model_name": timm_model, "timm_model_pretrained": False,
                          "timm_pool": "avg", "timm_proj": "linear", "image_size": image_size},
           "text_cfg": {"hf_model_name": str(hf_dir), "hf_tokenizer_name": str(hf_dir),
                        "hf_model_pretrained": False, "hf_proj_type": "mlp", "hf_pooler_type": "cls_pooler",
                        "context_length": 70}}
    (work / "phoclip_peer.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(work / "phoclip_peer.json")
    return open_clip.create_model("phoclip_peer", pretrained=None, pretrained_image=False, pretrained_text=False,
                                  output_dict=True)


def openclip_step(model, device: torch.device, precision: str = "fp32", grad_clip: float = 1.0):
    """open_clip's training step (train_one_epoch, one accumulation step): autocast
    forward, ClipLoss(**model_out), backward, gradient clipping (its --grad-clip-norm;
    set to our recipe's 1.0 so both do the same work), AdamW step, logit-scale clamp."""
    import open_clip

    model.to(device).train()
    loss_fn = open_clip.ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.},
                             {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad],
                              "weight_decay": 0.2}], lr=1e-4, betas=(0.9, 0.98), eps=1e-6,
                            fused=device.type == "cuda" or None)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step(images: torch.Tensor, ids: torch.Tensor) -> None:
        images, ids = images.to(device, non_blocking=True), ids.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(images, ids)
            losses = loss_fn(**out, output_dict=True)
            total = sum(losses.values())
        total.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, norm_type=2.0)
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    from bench_text_padding import caption_lengths, make_ids

    from phoclip.data.transforms import normalize_images
    from phoclip.models.factory import get_model_config
    from phoclip_train.config import resolve_config
    from phoclip_train.distributed import DistInfo
    from phoclip_train.run import build_run
    from phoclip_train.trainer import Trainer

    d = Path(tempfile.mkdtemp())
    try:
        shards, tok, _ = bench_shards(d, 200, None, 64, ["--max-length", "70", "--shard-size", "50",
                                                         "--val-fraction", "0", "--image-size", "64"])
        trainers = {}
        for trim in (0, 8):
            cfg = resolve_config(str(ROOT / "launch/configs/tiny-debug.yaml"), [
                f"run_dir={d}/run{trim}", f"model.tokenizer={tok}", "train.precision=fp32",
                f"data.train_shards={shards}/train-{{000000..000003}}.tar", f"data.batch_size={args.batch}",
                "data.image_size=64", "train.log_every=100000", "train.sync_every=100000",
                "train.max_steps=1000000", "train.save_every=100000", f"data.trim_padding={trim}"])
            trainers[trim] = Trainer(build_run(cfg, DistInfo()))
        tr = trainers[8]
        vocab = len(tr.tokenizer)
        g = torch.Generator().manual_seed(0)
        it = iter(tr.stream)
        batches = []
        for i in range(args.steps):
            b = next(it)
            b["input_ids"] = make_ids(caption_lengths(args.batch, seed=i), vocab, g)
            batches.append(b)
        text = dict(get_model_config("tiny-debug")["text"]["hf_config"], vocab_size=vocab)
        peer = openclip_model(d, text, "test_resnet", 64, tr.model.config["embed_dim"])
        peer_step = openclip_step(peer, torch.device("cpu"))
        floats = [normalize_images(b["images"]) for b in batches]  # open_clip's loader ships floats

        def ours(trim):
            t = trainers[trim]
            for b in batches:
                t.train_step([b], sync=False)

        def theirs():
            for x, b in zip(floats, batches):
                peer_step(x, b["input_ids"])

        n_ours = sum(p.numel() for p in tr.model.parameters())
        n_peer = sum(p.numel() for p in peer.parameters())
        runs = {"open_clip (its model config, ClipLoss, step)": theirs,
                "ours, padded (data.trim_padding=0)": lambda: ours(0),
                "ours, trimmed (default)": lambda: ours(8)}
        for fn in runs.values():  # warm-up
            fn()
        sps = {}
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            sps[name] = args.steps * args.batch / (time.perf_counter() - t)
        base = sps["open_clip (its model config, ClipLoss, step)"]
        rows = [(k, f"{v:.1f}", f"{v / base:.2f}x") for k, v in sps.items()]
        print(f"\nmachine: {machine()}\ntiny twin on CPU: {n_ours / 1e6:.2f}M params (ours) vs {n_peer / 1e6:.2f}M "
              f"(open_clip: its MLP text projection, timm linear head), batch {args.batch}, {args.steps} steps, fp32")
        print(table(rows, ("step", "samples/s", "vs open_clip")))
        for t in trainers.values():
            t.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
