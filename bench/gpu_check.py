"""One prepared GPU check, for a lent single GPU (a few minutes, no NCCL: one process).

Sections, each timed and guarded, each writing its figures to $OUT/gpu_results.json
(or ./gpu_results.json) as soon as it ends, so a late failure loses nothing:

  env      torch/transformers/timm versions, the GPU, a measured bf16 matmul ceiling
  data     shards of 1200 generated 400x300 JPEGs (make_shards.py, 8 workers)
  loader   our stream's samples/s on one core, and through the DataLoader with N workers
  step     phobert-large + resnet50 (random weights, bf16 autocast) at batch 64/128/256:
           a bare forward/backward/AdamW loop vs our Trainer.train_step on the same model
           and batch (samples/s, MFU from counted FLOPs, peak memory); then, at the
           largest batch, the bare loop with fused AdamW and with channels_last
  throughput  realistic caption lengths at batch 256 and 512: ours padded /
           trimmed / bucketed, the bare loop on padded and trimmed ids, open_clip's own
           model config and step on the same towers, device-busy share; then compiled
  packing  captions packed into rows (data.pack_captions) at batch
           64/256/512: the text tower alone (padded / trimmed / packed / flat: the same
           real tokens with no padding) and Trainer.train_step trimmed vs packed vs flat
           (target: packed >= 0.85x flat's real tokens/s)
  e2e      torchrun launch/train_ddp.py on the real recipe (random weights) fed by the
           loader with workers, then evaluate.py, build_index.py and search.py on the
           exported model: the whole pipeline on CUDA, and whether the loader keeps up

    python bench/gpu_check.py              # on the GPU machine
    python bench/gpu_check.py --sections packing   # the packing section only (~3 min)
    python bench/gpu_check.py --smoke      # tiny model on the CPU: checks this script
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import PHOBERT_LARGE  # noqa: E402
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense, datasheet
RESULTS: dict = {}


def _out() -> Path:
    return Path(os.environ.get("OUT", ".")) / "gpu_results.json"


def section(name: str):
    """Run a section; record its figures or its error and its wall time; save at once."""
    def deco(fn):
        def run(*a, **kw):
            t = time.time()
            print(f"\n=== {name} ===", flush=True)
            try:
                RESULTS[name] = fn(*a, **kw)
            except Exception as e:  # one broken section must not cost the others
                traceback.print_exc()
                RESULTS[name] = {"error": f"{type(e).__name__}: {e}"}
            RESULTS[name + "_wall_s"] = round(time.time() - t, 1)
            _out().write_text(json.dumps(RESULTS, indent=2))
            print(json.dumps({name: RESULTS[name]}), flush=True)
            return RESULTS[name]
        return run
    return deco


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, dev, steps: int, warmup: int = 3) -> float:
    """Seconds per call: warm up, then `steps` calls between two device syncs."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(dev)
    return (time.perf_counter() - t) / steps


@section("env")
def env(dev: torch.device) -> dict:
    import timm
    import transformers

    r = {"torch": torch.__version__, "transformers": transformers.__version__, "timm": timm.__version__,
         "python": sys.version.split()[0], "cpus": os.cpu_count(), "device": str(dev)}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        r.update(gpu=p.name, sms=p.multi_processor_count, mem_gib=round(p.total_memory / 2**30, 1),
                 capability=f"{p.major}.{p.minor}")
        n = 8192
        a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
        dt = _time(lambda: a @ b, dev, 10)
        r["matmul_bf16_tflops"] = round(2 * n**3 / dt / 1e12, 1)
    return r


@section("data")
def data(work: Path, n_images: int, workers: int) -> dict:
    from common import bench_shards

    sh, _, dt = bench_shards(work, n_images, (400, 300), shard_args=[
        "--workers", str(workers), "--shard-size", "100", "--val-fraction", "0.1", "--image-size", "256"])
    m = json.loads((sh / "manifest.json").read_text())
    return {"images": n_images, "workers": workers, "images_per_s": round(n_images / dt, 1),
            "train_shards": len(m["shards"]["train"]), "val_shards": len(m["shards"]["val"])}


def _urls(work: Path, split: str) -> list[str]:
    return sorted(str(p) for p in (work / "sh").glob(f"{split}-*.tar"))


@section("loader")
def loader(work: Path, size: int, worker_counts: list[int]) -> dict:
    from phoclip.data.stream import ShardStream, StreamConfig
    from phoclip_train.build import build_loader as train_loader

    urls, bs = _urls(work, "train"), 64
    cfg = lambda: StreamConfig(urls=urls, weights=[1.0] * len(urls), batch_size=bs, image_size=size,
                               seed=0, rank=0, world_size=1, resampled=True, shuffle_buffer=256)
    torch.set_num_threads(1)
    it = iter(ShardStream(cfg()))
    next(it)
    n = 32
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    r = {"one_core_samples_per_s": round(n * bs / (time.perf_counter() - t), 1)}
    for w in worker_counts:
        it = iter(train_loader(ShardStream(cfg()), w, pin_memory=torch.cuda.is_available()))
        for _ in range(2 * w):  # every worker has started and delivered
            next(it)
        n = 24 * w
        t = time.perf_counter()
        for _ in range(n):
            next(it)
        sps = n * bs / (time.perf_counter() - t)
        r[f"workers_{w}"] = {"samples_per_s": round(sps, 1), "per_worker": round(sps / w, 1)}
        del it
    torch.set_num_threads(os.cpu_count() or 1)
    return r


def _overrides(work: Path, size: int, batch: int, smoke: bool) -> list[str]:
    n_train = len(_urls(work, "train"))
    over = [f"model.tokenizer={work / 'tok'}", f"data.image_size={size}", f"data.batch_size={batch}",
            f"data.train_shards={work}/sh/train-{{000000..{n_train - 1:06d}}}.tar",
            f"data.val_shards={work}/sh/val-{{000000..{len(_urls(work, 'val')) - 1:06d}}}.tar",
            "train.precision=bf16", "optim.warmup_steps=10"]
    if not smoke:  # the real recipe's architecture, random weights (no hub here)
        over.append("model.overrides=" + json.dumps(
            {"vision": {"pretrained": False}, "text": {"hf_model": None, "hf_config": PHOBERT_LARGE}}))
    return over


def _profile(fn, dev: torch.device, name: str, steps: int = 3) -> dict:
    """Wall time vs device-kernel time over a few steps; top ops to $OUT/profile_NAME.txt."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    for _ in range(2):
        fn()
    _sync(dev)
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(dev)
        wall = (time.perf_counter() - t) / steps
    ka = prof.key_averages()
    busy = sum(getattr(e, "self_device_time_total", 0) for e in ka) / 1e3 / steps  # us -> ms
    sort = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    (_out().parent / f"profile_{name}.txt").write_text(ka.table(sort_by=sort, row_limit=30))
    return {"wall_ms": round(wall * 1e3, 1), "device_busy_ms": round(busy, 1),
            "device_busy_share": round(busy / (wall * 1e3), 3) if wall else None}


def bare_step(model, x: torch.Tensor, ids: torch.Tensor, optimizer, dev: torch.device):
    """The bare loop's step: bf16 forward, the CLIP loss written out, backward, AdamW."""
    import torch.nn.functional as F

    def f():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            o = model(x, ids)
            logits = o["logit_scale"] * o["image_features"] @ o["text_features"].T
            lab = torch.arange(len(x), device=dev)
            loss = (F.cross_entropy(logits, lab) + F.cross_entropy(logits.T, lab)) / 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return f


def _fmt(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@section("step")
def step(work: Path, dev: torch.device, batches: list[int], steps: int, smoke: bool) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from phoclip.data.transforms import normalize_images
    from phoclip_train.config import resolve_config
    from phoclip_train.distributed import DistInfo
    from phoclip_train.run import build_run
    from phoclip_train.trainer import Trainer

    size = 64 if smoke else 224
    config = "launch/configs/tiny-debug.yaml" if smoke else "launch/configs/phobert-large-rn50.yaml"
    cfg = resolve_config(str(ROOT / config), [f"run_dir={work / 'step_run'}", "train.max_steps=1000",
                                               *_overrides(work, size, max(batches), smoke)])
    tr = Trainer(build_run(cfg, DistInfo(device=dev)))
    full = next(iter(tr.stream))
    model, opt = tr.model, tr.engine.optimizer
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if dev.type == "cuda" else ""
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    measured = RESULTS.get("env", {}).get("matmul_bf16_tflops")
    res: dict = {"model_params_m": round(n_params / 1e6, 1), "seq_len": int(full["input_ids"].shape[1]),
                 "image_size": size, "peak_bf16_tflops_datasheet": peak and peak / 1e12, "rows": []}

    def bare_fn(x, ids, optimizer):
        return bare_step(model, x, ids, optimizer, dev)

    for b in batches:
        cpu = {"images": full["images"][:b].clone(), "input_ids": full["input_ids"][:b].clone()}
        if dev.type == "cuda":  # as the training loader delivers them
            cpu = {k: v.pin_memory() for k, v in cpu.items()}
        x = _fmt(normalize_images(cpu["images"].to(dev)), tr.channels_last)
        ids = cpu["input_ids"].to(dev)
        bare = bare_fn(x, ids, opt)
        with FlopCounterMode(display=False) as fc:
            bare()
        flops = fc.get_total_flops()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t_bare = _time(bare, dev, steps)
        t_ours = _time(lambda: tr.train_step([cpu]), dev, steps)
        row = {"batch": b, "tflop_per_step": round(flops / 1e12, 2),
               "bare_samples_per_s": round(b / t_bare, 1), "ours_samples_per_s": round(b / t_ours, 1),
               "ours_vs_bare": round(t_bare / t_ours, 3),
               "ours_tflops": round(flops / t_ours / 1e12, 1)}
        if peak:
            row["ours_mfu_datasheet"] = round(flops / t_ours / peak, 3)
        if measured:
            row["ours_mfu_measured_matmul"] = round(flops / t_ours / (measured * 1e12), 3)
        if dev.type == "cuda":
            row["max_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        res["rows"].append(row)
        print(json.dumps(row), flush=True)

    # where ours loses to the bare loop: device-busy share of the wall time, top ops
    b = sorted(batches)[len(batches) // 2]
    cpu = {"images": full["images"][:b].clone(), "input_ids": full["input_ids"][:b].clone()}
    x = _fmt(normalize_images(cpu["images"].to(dev)), tr.channels_last)
    try:
        res["profile"] = {"batch": b, "ours": _profile(lambda: tr.train_step([cpu]), dev, "ours"),
                          "bare": _profile(bare_fn(x, cpu["input_ids"].to(dev), opt), dev, "bare")}
    except Exception as e:  # the profiler is a lead, not a figure: never cost the rest
        res["profile"] = {"error": repr(e)}

    # the bare loop at the largest batch with our defaults (fused AdamW on CUDA, channels_last
    # on CUDA) and with each turned back off: what each default buys
    b = max(batches)
    x = normalize_images(full["images"][:b].to(dev))
    ids = full["input_ids"][:b].to(dev)
    var = {"defaults": {"fused_adamw": bool(opt.defaults.get("fused")), "channels_last": tr.channels_last}}
    res["variants_at_batch"], res["variants"] = b, var
    try:
        var["defaults_samples_per_s"] = round(b / _time(bare_fn(_fmt(x, tr.channels_last), ids, opt),
                                                        dev, steps), 1)
        foreach = torch.optim.AdamW(model.param_groups(1e-4, 1e-5, 1e-3, 0.2), foreach=True)
        var["foreach_adamw_samples_per_s"] = round(b / _time(bare_fn(_fmt(x, tr.channels_last), ids, foreach),
                                                             dev, steps), 1)
        del foreach
        model.visual.to(memory_format=torch.contiguous_format)
        # a fresh optimizer: the fused kernel refuses state kept in the other layout
        nchw = torch.optim.AdamW(model.param_groups(1e-4, 1e-5, 1e-3, 0.2), fused=dev.type == "cuda" or None)
        var["nchw_samples_per_s"] = round(b / _time(bare_fn(x, ids, nchw), dev, steps), 1)
        del nchw
    except Exception as e:  # keep the figures measured so far
        traceback.print_exc()
        var["error"] = repr(e)
    tr.close()
    return res


@section("throughput")
def throughput(work: Path, dev: torch.device, batches: list[int], steps: int, smoke: bool,
               compile_mode: str) -> dict:
    """The text-padding variants on realistic caption lengths (bench_text_padding: mean ~24
    tokens, tail to 70): ours padded / trimmed / bucketed / compiled, the bare loop on
    padded and on trimmed ids, open_clip's own step on the same towers; device-busy
    share of ours trimmed; recompiles of the compiled run."""
    import random

    from bench_peer_openclip import openclip_model, openclip_step
    from bench_text_padding import caption_lengths, make_ids

    from phoclip.data.stream import group_by_length
    from phoclip.data.transforms import normalize_images
    from phoclip.models.packing import trim_padding
    from phoclip_train.config import resolve_config
    from phoclip_train.distributed import DistInfo
    from phoclip_train.build import compile_stats
    from phoclip_train.run import build_run
    from phoclip_train.trainer import Trainer

    size = 64 if smoke else 224
    config = "launch/configs/tiny-debug.yaml" if smoke else "launch/configs/phobert-large-rn50.yaml"
    res: dict = {"rows": []}

    def trainer(b, **over):
        cfg = resolve_config(str(ROOT / config), [
            f"run_dir={work / ('tp_run_' + str(len(res['rows'])) + '_' + str(b))}", "train.max_steps=100000",
            "train.log_every=100000", "train.sync_every=100000", "train.save_every=100000",
            *_overrides(work, size, b, smoke), *[f"{k}={v}" for k, v in over.items()]])
        return Trainer(build_run(cfg, DistInfo(device=dev)))

    for b in batches:
        tr = trainer(b, **{"data.trim_padding": 0, "data.pack_captions": "false"})
        vocab = min(len(tr.tokenizer), tr.model.text.config.vocab_size)
        full = next(iter(tr.stream))
        lengths = caption_lengths(4 * b, seed=b)
        ids = make_ids(lengths, vocab, torch.Generator().manual_seed(b))
        plain = {"images": full["images"][:b].clone(), "input_ids": ids[:b].clone()}
        grouped = group_by_length(lengths.tolist(), b, random.Random(0))
        widths = [int(trim_padding(ids[g], 1, 8).shape[1]) for g in grouped]
        row = {"batch": b, "mean_caption_tokens": round(float(lengths.mean()), 1),
               "width_padded": int(ids.shape[1]), "width_trimmed": int(trim_padding(ids[:b], 1, 8).shape[1]),
               "width_bucketed_mean": round(sum(widths) / len(widths), 1)}
        if dev.type == "cuda":
            plain = {k: v.pin_memory() for k, v in plain.items()}
        row["ours_padded_sps"] = round(b / _time(lambda: tr.train_step([plain], sync=False), dev, steps), 1)
        model, opt = tr.model, tr.engine.optimizer
        x = _fmt(normalize_images(plain["images"].to(dev)), tr.channels_last)

        row["bare_padded_sps"] = round(b / _time(bare_step(model, x, plain["input_ids"].to(dev), opt, dev),
                                                 dev, steps), 1)
        row["bare_trimmed_sps"] = round(b / _time(bare_step(model, x, trim_padding(plain["input_ids"], 1, 8).to(dev),
                                                            opt, dev), dev, steps), 1)
        tr.run.prep.trim_padding = 8  # the same trainer, trimming on (input prep is decided once, in build_run)
        row["ours_trimmed_sps"] = round(b / _time(lambda: tr.train_step([plain], sync=False), dev, steps), 1)
        # the cost the sync-free steps avoid: the host reads the flags and metrics every step
        row["ours_trimmed_read_every_step_sps"] = round(b / _time(lambda: tr.train_step([plain], sync=True),
                                                                  dev, steps), 1)
        tr.run.prep.pack_captions = True  # captions packed into rows (the default)
        row["ours_packed_sps"] = round(b / _time(lambda: tr.train_step([plain], sync=False), dev, steps), 1)
        tr.run.prep.pack_captions = False
        # bucketed: the mean over the block's batches of similar length
        t_b = sum(_time(lambda g=g: tr.train_step([{"images": plain["images"], "input_ids": ids[g]}], sync=False),
                        dev, max(2, steps // 4), warmup=1) for g in grouped) / len(grouped)
        row["ours_bucketed_sps"] = round(b / t_b, 1)
        try:
            row["ours_trimmed_profile"] = _profile(lambda: tr.train_step([plain], sync=False), dev, f"trimmed_{b}")
        except Exception as e:
            row["ours_trimmed_profile"] = {"error": repr(e)}
        row["ours_trimmed_vs_bare_trimmed"] = round(row["ours_trimmed_sps"] / row["bare_trimmed_sps"], 3)
        tr.close()
        tr = model = opt = x = None  # free the GPU memory for the peer
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        try:  # the peer: open_clip's model config and step, same towers, padded ids
            from common import PHOBERT_LARGE as PL
            from phoclip.models.factory import get_model_config

            text = dict(get_model_config("tiny-debug")["text"]["hf_config"], vocab_size=vocab) if smoke else dict(PL)
            peer = openclip_model(work / f"oc_{b}", text, "test_resnet" if smoke else "resnet50", size, 64 if smoke else 512)
            if not smoke:
                peer = peer.to(memory_format=torch.channels_last)
            pstep = openclip_step(peer, dev, "fp32" if smoke else "bf16")
            xi = normalize_images(plain["images"].to(dev))
            if not smoke:
                xi = xi.contiguous(memory_format=torch.channels_last)
            row["openclip_padded_sps"] = round(b / _time(lambda: pstep(xi, plain["input_ids"]), dev, steps), 1)
            row["ours_padded_vs_openclip"] = round(row["ours_padded_sps"] / row["openclip_padded_sps"], 3)
            row["ours_trimmed_vs_openclip"] = round(row["ours_trimmed_sps"] / row["openclip_padded_sps"], 3)
            peer = pstep = None
        except Exception as e:
            traceback.print_exc()
            row["openclip_error"] = repr(e)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        _out().write_text(json.dumps(dict(RESULTS, throughput=res), indent=2))
    if compile_mode != "off":  # last: compile time is the least predictable
        b = batches[0]
        t = time.time()
        tr = trainer(b, **{"train.compile": compile_mode})
        full = next(iter(tr.stream))
        vocab = min(len(tr.tokenizer), tr.model.text.config.vocab_size)
        lengths = caption_lengths(4 * b, seed=7)
        ids = make_ids(lengths, vocab, torch.Generator().manual_seed(7))
        bs = [{"images": full["images"][:b], "input_ids": ids[i * b:(i + 1) * b]} for i in range(4)]
        for bb in bs:  # compile (static, then dynamic length)
            tr.train_step([bb], sync=False)
        _sync(dev)
        res["compile"] = {"batch": b, "mode": compile_mode, "compile_and_warmup_s": round(time.time() - t, 1)}
        k = [0]

        def f():
            tr.train_step([bs[k[0] % 4]], sync=False)
            k[0] += 1
        res["compile"]["ours_packed_compiled_sps"] = round(b / _time(f, dev, steps), 1)  # the defaults
        res["compile"].update(compile_stats())
        tr.close()
    return res


def _tower_step(model, dev: torch.device):
    """The text tower's bf16 forward+backward (encode_text, packed or not)."""
    def f(x, packing):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = model.encode_text(x, packing=packing).float().sum()
        loss.backward()
        model.zero_grad(set_to_none=True)
    return f


@section("packing")
def packing(work: Path, dev: torch.device, batches: list[int], steps: int, smoke: bool) -> dict:
    """Captions packed into rows, on realistic caption lengths
    (bench_text_padding). tower: encode_text forward+backward alone per mode (the same
    captions; flat: the same real tokens, every caption at the batch's mean length, no
    padding at all); step: Trainer.train_step trimmed vs packed vs flat."""
    from bench_text_padding import MODES, caption_lengths, make_ids, text_modes

    from phoclip_train.config import resolve_config
    from phoclip_train.distributed import DistInfo
    from phoclip_train.run import build_run
    from phoclip_train.trainer import Trainer

    size = 64 if smoke else 224
    config = "launch/configs/tiny-debug.yaml" if smoke else "launch/configs/phobert-large-rn50.yaml"
    cfg = resolve_config(str(ROOT / config), [
        f"run_dir={work / 'packing_run'}", "train.max_steps=100000", "train.log_every=100000",
        "train.sync_every=100000", "train.save_every=100000", *_overrides(work, size, max(batches), smoke)])
    tr = Trainer(build_run(cfg, DistInfo(device=dev)))
    model = tr.model
    vocab = min(len(tr.tokenizer), model.text.config.vocab_size)
    full = next(iter(tr.stream))
    res: dict = {"tower": [], "step": []}
    tower = _tower_step(model, dev)
    for b in batches:
        lengths = caption_lengths(b * steps, seed=b)
        modes = text_modes(make_ids(lengths, vocab, torch.Generator().manual_seed(b)), lengths, b, steps, 0, vocab)
        row, flat = {"batch": b, "mean_caption_tokens": round(float(lengths.mean()), 1)}, None
        for name, xs in modes.items():
            dev_xs = [(x.to(dev), p.to(dev) if p else None) for x, p in xs]
            k = [0]

            def f():
                tower(*dev_xs[k[0] % len(dev_xs)])
                k[0] += 1
            t = _time(f, dev, steps)
            real = sum(int((x != 1).sum()) for x, _ in xs) / len(xs)
            computed = sum(p.computed_tokens if p else x.numel() for x, p in xs) / len(xs)
            row[name] = {"samples_per_s": round(b / t, 1), "real_tokens_per_s": round(real / t),
                         "real_over_computed": round(real / computed, 3)}
            if name == MODES["flat"]:
                flat = real / t
        for v in row.values():
            if isinstance(v, dict):
                v["vs_flat"] = round(v["real_tokens_per_s"] / flat, 3)
        res["tower"].append(row)
        print(json.dumps(row), flush=True)

        # the whole step, the same trainer: trimmed (packing off), packed, flat
        imgs = full["images"][:b]
        if imgs.shape[0] < b:
            imgs = imgs.repeat(-(-b // imgs.shape[0]), 1, 1, 1)[:b]
        srow = {"batch": b}
        for name, ids, pack in (("trimmed", modes[MODES["padded"]][0][0], False),
                                ("packed", modes[MODES["padded"]][0][0], True),
                                ("flat", modes[MODES["flat"]][0][0], False)):
            batch = {"images": imgs.clone(), "input_ids": ids.clone()}
            if dev.type == "cuda":
                batch = {k: v.pin_memory() for k, v in batch.items()}
            tr.run.prep.pack_captions = pack
            t = _time(lambda: tr.train_step([batch], sync=False), dev, steps)
            srow[name] = {"samples_per_s": round(b / t, 1), "real_tokens_per_s": round(int((ids != 1).sum()) / t)}
        for v in srow.values():
            if isinstance(v, dict):
                v["vs_flat"] = round(v["real_tokens_per_s"] / srow["flat"]["real_tokens_per_s"], 3)
        res["step"].append(srow)
        print(json.dumps(srow), flush=True)
        _out().write_text(json.dumps(dict(RESULTS, packing=res), indent=2))
    tr.close()
    return res

@section("e2e")
def e2e(work: Path, batch: int, steps: int, workers: int, smoke: bool) -> dict:
    py, run_dir = sys.executable, work / "e2e_run"
    size = 64 if smoke else 224
    config = "launch/configs/tiny-debug.yaml" if smoke else "launch/configs/phobert-large-rn50.yaml"
    envv = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    times = {}

    def run(name, cmd):
        t = time.time()
        p = subprocess.run(cmd, cwd=ROOT, env=envv, capture_output=True, text=True)
        times[name] = round(time.time() - t, 1)
        print(f"$ {' '.join(cmd[:4])} ... rc={p.returncode} in {times[name]}s\n{p.stdout[-3000:]}"
              f"{p.stderr[-3000:]}", flush=True)
        if p.returncode:
            raise RuntimeError(f"{name} failed with rc={p.returncode}: {p.stderr[-500:]}")
        return p.stdout

    log_every = max(1, steps // 5)
    run("train", [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                  "launch/train_ddp.py", "--config", config, f"run_dir={run_dir}",
                  *_overrides(work, size, batch, smoke), f"data.workers={workers}",
                  f"train.max_steps={steps}", f"train.log_every={log_every}", "train.save_every=100000",
                  "train.eval_every=0", "train.keep_last=1"])
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "samples_per_s" in r]
    later = train_rows[1:] or train_rows  # the first window holds start-up and cudnn tuning
    val = _urls(work, "val")
    shards = f"{work}/sh/val-{{000000..{len(val) - 1:06d}}}.tar"
    run("evaluate", [py, "launch/evaluate.py", "--model", str(run_dir), "--shards", shards,
                     "--out", str(work / "eval.json")])
    run("build_index", [py, "launch/build_index.py", "--model", str(run_dir), "--shards", shards,
                        "--out", str(work / "index")])
    out = run("search", [py, "launch/search.py", "--index", str(work / "index"), "--k", "3", "--json",
                         "hai hình tròn màu đỏ"])
    ev = json.loads((work / "eval.json").read_text())
    return {"batch": batch, "steps": steps, "workers": workers, "times_s": times,
            "samples_per_s_after_first_window": round(sum(r["samples_per_s"] for r in later) / len(later), 1),
            "data_wait_s_per_window": [round(r.get("data_wait_s", 0), 3) for r in train_rows],
            "final_loss": train_rows[-1]["loss"], "eval_t2i_R@1": ev.get("t2i_R@1"),
            "eval_n_images": ev.get("n_images"), "search_hits": sum(len(v) for v in json.loads(out)["text_to_image"].values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU: check the script")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--workers", type=int, nargs="+", default=[4, 12])
    ap.add_argument("--e2e-steps", type=int, default=100)
    ap.add_argument("--e2e-batch", type=int, default=256)
    ap.add_argument("--tp-batches", type=int, nargs="+", default=[256, 512],
                    help="batches of the throughput section (padding/trim/bucket/compile, bare, open_clip)")
    ap.add_argument("--compile", default="default", choices=["off", "default", "max-autotune"])
    ap.add_argument("--pack-batches", type=int, nargs="+", default=[64, 256, 512],
                    help="batches of the packing section")
    ap.add_argument("--sections", nargs="+", default=["step", "throughput", "packing", "e2e"],
                    choices=["step", "throughput", "packing", "e2e"], help="after env, data and loader")
    args = ap.parse_args()
    from phoclip.log import init_logger

    init_logger()
    if args.smoke:
        args.batches, args.steps, args.images, args.workers = [8, 16], 2, 240, [2]
        args.tp_batches = [8]
        args.pack_batches = [16, 32]
        args.e2e_steps, args.e2e_batch = 6, 16
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    t0 = time.time()
    env(dev)
    data(work, args.images, 8 if not args.smoke else 2)
    loader(work, 64 if args.smoke else 224, args.workers)
    if "step" in args.sections:
        step(work, dev, args.batches, args.steps, args.smoke)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if "throughput" in args.sections:
        throughput(work, dev, args.tp_batches, args.steps, args.smoke, args.compile)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if "packing" in args.sections:
        packing(work, dev, args.pack_batches, args.steps, args.smoke)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if "e2e" in args.sections:
        e2e(work, args.e2e_batch, args.e2e_steps, max(args.workers), args.smoke)
    RESULTS["total_wall_s"] = round(time.time() - t0, 1)
    _out().write_text(json.dumps(RESULTS, indent=2))
    print("\n" + json.dumps(RESULTS, indent=2))


if __name__ == "__main__":
    main()
