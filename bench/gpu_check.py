"""One prepared GPU check (for a lent single GPU, a few minutes): samples/s and MFU of the
seed's model (phobert-large + resnet50, random weights, bf16 autocast, AdamW, the real
global loss) at batch sizes 64-256, and the loader's samples/s per CPU core. Writes its
figures to $OUT/gpu_results.json (or ./gpu_results.json).

    python bench/gpu_check.py [--batches 64 128 256] [--steps 10]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# phobert-large's shape, so no hub access is needed (random weights)
PHOBERT_LARGE = dict(model_type="roberta", vocab_size=64001, hidden_size=1024, num_hidden_layers=24,
                     num_attention_heads=16, intermediate_size=4096, max_position_embeddings=258,
                     pad_token_id=1, type_vocab_size=1)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def train_figures(batches, steps, seq=70) -> list[dict]:
    import phoclip
    from phoclip.loss import ClipLoss
    from torch.utils.flop_counter import FlopCounterMode

    dev = torch.device("cuda")
    model = phoclip.create_model("phobert-large-rn50", vision={"pretrained": False},
                                 text={"hf_model": None, "hf_config": PHOBERT_LARGE}).to(dev)
    opt = torch.optim.AdamW(model.param_groups(), fused=True)
    loss_fn = ClipLoss()
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    out = []
    for b in batches:
        x = torch.randn(b, 3, 224, 224, device=dev)
        ids = torch.randint(4, 64000, (b, seq), device=dev)
        ids[:, 0], ids[:, -10:] = 0, 1

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                o = model(x, ids)
                loss = loss_fn(o["image_features"], o["text_features"], o["logit_scale"])["contrastive_loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        with FlopCounterMode(display=False) as fc:
            step()
        flops = fc.get_total_flops()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / steps
        r = {"batch": b, "step_s": dt, "samples_per_s": b / dt, "tflops_per_step": flops / 1e12,
             "achieved_tflops": flops / dt / 1e12, "mfu": (flops / dt / peak) if peak else None,
             "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
        print(json.dumps(r), flush=True)
        out.append(r)
    return out


def loader_figures(n=2048) -> dict:
    import tempfile

    from PIL import Image

    from phoclip.data import ShardStream, StreamConfig
    from phoclip.synthetic import make_dataset
    from phoclip.text import build_phobert_tokenizer
    from sharding.make_shards import main as make_shards

    d = Path(tempfile.mkdtemp())
    caps = make_dataset(d / "data", n_images=1000, size=96)
    for f in (d / "data" / "images").iterdir():
        Image.open(f).resize((400, 300)).save(f, quality=92)
    tok = build_phobert_tokenizer([l.split("\t", 1)[1] for l in caps.read_text(encoding="utf-8").splitlines()], d / "tok")
    make_shards(["--source", f"flickr8k-vi:{caps}:{d / 'data' / 'images'}", "--out", str(d / "sh"),
                 "--tokenizer", str(tok), "--segmenter", "none", "--workers", "8", "--shard-size", "100",
                 "--val-fraction", "0"])
    urls = sorted(str(p) for p in (d / "sh").glob("train-*.tar"))
    torch.set_num_threads(1)
    s = ShardStream(StreamConfig(urls, [1.0] * len(urls), 64, 224, 0, 0, 1, True, 256, True))
    it = iter(s)
    next(it)
    t = time.perf_counter()
    for _ in range(n // 64):
        next(it)
    return {"loader_samples_per_s_per_core": n / (time.perf_counter() - t)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "torch": torch.__version__}
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        res["train"] = train_figures(args.batches, args.steps)
    res.update(loader_figures())
    out = Path(os.environ.get("OUT", ".")) / "gpu_results.json"
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
