"""Throughput features must not change results: trimmed padding = padded batch, SDPA =
eager attention, compiled = eager, device-side resize = worker resize within a pixel
tolerance; the loop reads the host only on its sync steps. The step's own math (sync-free
skips, trimming, channels_last) is tested on tensors in tests/test_step.py."""
import logging
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import padded_ids, train_overrides
from phoclip.models.loss import ClipLoss
from phoclip.models.factory import create_model
from phoclip.models.packing import trim_padding
from phoclip_train.config import resolve_config
from phoclip_train.distributed import DistInfo
from phoclip_train.run import build_run
from phoclip_train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _trainer(shapes_shards, tmp_path, **kw):
    shards, tok, n = shapes_shards
    over = train_overrides(shards, tok, n, tmp_path / "run", **kw)
    return Trainer(build_run(resolve_config("launch/configs/tiny-debug.yaml", over), DistInfo()))


CAPTION_LENGTHS = (5, 9, 3, 12, 7, 4)


def test_trim_padding_cuts_after_longest_caption():
    ids = padded_ids(CAPTION_LENGTHS)
    assert trim_padding(ids, 1).shape[1] == 12
    assert trim_padding(ids, 1, 8).shape[1] == 16
    assert trim_padding(ids, 1, 64).shape[1] == 40  # never wider than the original
    assert torch.equal(trim_padding(ids, 1, 8), ids[:, :16])
    full = torch.randint(4, 100, (3, 10))
    assert trim_padding(full, 1, 8) is full


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_trimmed_batch_gives_padded_loss_and_gradients(pooling):
    """The same loss and the same gradient on every parameter, padded to 40 or trimmed
    to the longest caption (12): pads are masked in attention and pooling."""
    torch.manual_seed(0)
    model = create_model("tiny-debug", text={"pooling": pooling, "hf_config": {"vocab_size": 100}})
    model.train()
    ids = padded_ids(CAPTION_LENGTHS)
    images = torch.randn(ids.shape[0], 3, 64, 64)
    results = []
    for x in (ids, trim_padding(ids, model.pad_id)):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = model(images, x)
        loss = ClipLoss()(**out)["contrastive_loss"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                        if p.grad is not None}))
    (l_pad, g_pad), (l_trim, g_trim) = results
    assert trim_padding(ids, model.pad_id).shape[1] < ids.shape[1]
    torch.testing.assert_close(l_trim, l_pad, rtol=1e-5, atol=1e-6)
    assert set(g_pad) == set(g_trim) and len(g_pad) > 30
    for n in g_pad:
        torch.testing.assert_close(g_trim[n], g_pad[n], rtol=1e-4, atol=1e-5, msg=n)


def test_text_tower_runs_sdpa_and_matches_eager(caplog):
    torch.manual_seed(0)
    sdpa = create_model("tiny-debug", text={"hf_config": {"vocab_size": 100}})
    assert sdpa.text.config._attn_implementation == "sdpa"
    eager = create_model("tiny-debug", text={"attn_implementation": "eager", "hf_config": {"vocab_size": 100}})
    assert eager.text.config._attn_implementation == "eager"
    eager.load_state_dict(sdpa.state_dict())
    ids = padded_ids(CAPTION_LENGTHS)
    with torch.no_grad():
        torch.testing.assert_close(sdpa.eval().encode_text(ids), eager.eval().encode_text(ids),
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="attn_implementation"):
        create_model("tiny-debug", text={"attn_implementation": "flash", "hf_config": {"vocab_size": 100}})


def test_architecture_without_sdpa_falls_back_loudly(monkeypatch, caplog):
    """transformers refuses sdpa for an architecture without it: the tower is built with
    eager attention and the fallback is logged as a warning (not silent)."""
    import phoclip.models.clip as pm

    real = pm._load_text_tower

    def no_sdpa(cfg, attn):  # stand-in for an architecture lacking SDPA
        if attn == "sdpa":
            raise ValueError("RobertaModel does not support an attention implementation through "
                             "torch.nn.functional.scaled_dot_product_attention yet")
        return real(cfg, attn)

    monkeypatch.setattr(pm, "_load_text_tower", no_sdpa)
    with caplog.at_level(logging.WARNING, logger="phoclip.models.clip"):
        m = create_model("tiny-debug", text={"hf_config": {"vocab_size": 100}})
    assert m.text.config._attn_implementation == "eager"
    assert any("FALLING BACK to eager" in r.message for r in caplog.records)


class _SyncCounter(torch.overrides.TorchFunctionMode):
    """Records every device→host read (item, tolist, bool, float, int) made in our code
    (not in tests or third-party packages). On this CPU-only machine every tensor is a
    host tensor, so the reads of tensors that stay on the host in a GPU run are listed
    by function: `trim_padding` and `pack_captions` read the CPU batch's ids before
    their copy."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__"}
    HOST_SIDE = {"trim_padding", "pack_captions", "resize_on_device"}  # the ids; the crop boxes

    def __init__(self):
        super().__init__()
        self.ours: list[str] = []
        self.third_party: list[str] = []  # e.g. transformers' SDPA mask check (eager mode)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            f = sys._getframe(1)
            while f is not None and "/torch/" in f.f_code.co_filename:  # torch's own frames
                f = f.f_back
            fn = f.f_code.co_filename if f is not None else ""
            where = f"{name} at {fn.split(str(ROOT) + '/', 1)[-1]}:{f.f_lineno if f else 0}"
            if fn.startswith(str(ROOT)) and "-packages/" not in fn and "/tests/" not in fn:
                if f.f_code.co_name not in self.HOST_SIDE:
                    self.ours.append(where)
            elif "-packages/" in fn:
                self.third_party.append(where)
        return func(*args, **(kwargs or {}))


def test_the_host_reads_on_log_save_eval_and_sync_steps_only(shapes_shards, tmp_path):
    """The loop's cadence: the step's figures are read on every sync_every-th step and on
    the steps that log, save or evaluate, and on the last; a step between reads returns
    nothing (and reads nothing: tests/test_step.py)."""
    tr = _trainer(shapes_shards, tmp_path, **{"train.log_every": 5, "train.sync_every": 5,
                                              "train.save_every": 10, "train.max_steps": 23,
                                              "train.eval_every": 0})
    try:
        assert [tr.is_sync_step(s) for s in range(1, 11)] == [False] * 4 + [True] + [False] * 4 + [True]
        assert tr.is_sync_step(23) and not tr.is_sync_step(22)  # the last step
        it = iter(tr.stream)
        assert tr.train_step([next(it)], sync=False) == {}
        assert tr.step == 0  # the loop counts steps, not train_step
        m = tr.train_step([next(it)], sync=True)
        assert m["loss"] == m["loss"] and not tr.stop_requested
    finally:
        tr.close()


def test_the_run_decides_its_settings_once_on_a_copy_of_the_config(shapes_shards, tmp_path, caplog):
    """build_run resolves the derived settings (precision auto, accumulation from
    data.global_batch_size) in the run's config and logs them in one line; the config
    it was given is left as it was. Each part answers for its own cadence."""

    shards, tok, n = shapes_shards
    cfg = resolve_config("launch/configs/tiny-debug.yaml", train_overrides(
        shards, tok, n, tmp_path / "run", **{"train.precision": "auto", "data.global_batch_size": 16,
                                             "train.log_every": 4, "train.save_every": 6, "train.eval_every": 5,
                                             "train.max_steps": 12}))
    with caplog.at_level(logging.INFO, logger="phoclip_train"):
        run = build_run(cfg, DistInfo())
    try:
        assert cfg.train.precision == "auto" and cfg.train.accum_steps == 1  # the caller's config, untouched
        assert run.cfg.train.precision in ("fp32", "bf16") and run.cfg.train.accum_steps == 2
        assert run.settings.precision == run.cfg.train.precision and run.settings.accum_steps == 2
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("settings: ")]
        assert len(said) == 1 and "accum_steps 2" in said[0], said
        assert [s for s in range(1, 13) if run.metrics.due(s)] == [4, 8, 12]
        assert [s for s in range(1, 13) if run.checkpointer.due(s)] == [6, 12]
        assert [s for s in range(1, 13) if run.evaluator.due(s)] == [5, 10, 12]
    finally:
        run.close()


@pytest.mark.slow
def test_compiled_towers_train_like_eager(shapes_shards, tmp_path):
    """train.compile=default: the same losses as eager over steps with captions of
    varying (trimmed) length, the state-dict keys unchanged (checkpoints, export), and
    a bounded number of recompiles (static, then one dynamic length)."""
    from phoclip_train.build import compile_stats

    torch._dynamo.reset()
    losses, widths, keys = {}, {}, {}
    for mode in ("off", "default"):
        tr = _trainer(shapes_shards, tmp_path / mode, **{"train.compile": mode, "train.max_steps": 6,
                                                                  "data.trim_padding": 1})
        it = iter(tr.stream)
        batches = [next(it) for _ in range(6)]
        widths[mode] = {tr.device_inputs([b])[0][1].shape[1] for b in batches}
        t0 = time.time()
        losses[mode] = [tr.train_step([b])["loss"] for b in batches]
        keys[mode] = sorted(tr.model.state_dict())
        if mode == "default":
            stats = compile_stats()
            logging.getLogger(__name__).info("compile: %s in %.0f s", stats, time.time() - t0)
        tr.close()
    assert len(widths["off"]) > 1, "the test needs batches of different caption lengths"
    assert keys["off"] == keys["default"]
    torch.testing.assert_close(torch.tensor(losses["default"]), torch.tensor(losses["off"]),
                               rtol=1e-3, atol=1e-4)
    assert 2 <= stats["graphs"] <= 12, stats


def _stream(shards, n, **kw):
    from phoclip.data.stream import ShardStream, StreamConfig
    from phoclip.data.catalog import expand_urls

    urls = expand_urls(f"{shards}/train-{{000000..{n - 1:06d}}}.tar")[0]
    return ShardStream(StreamConfig(urls=urls, weights=[1.0] * len(urls), batch_size=4, image_size=32,
                                    seed=0, rank=0, world_size=1, resampled=False, shuffle_buffer=8, **kw))


def test_length_buckets_group_similar_captions_and_resume_exactly(shapes_shards):
    """data.length_buckets=4: each block of 4 batches holds the same samples as the plain
    stream's 4 batches, regrouped so each batch's captions have similar lengths (less
    padding after trimming); a resume inside a block continues with the same batches."""
    import itertools

    from phoclip.data.stream import StreamTracker

    shards, _, n = shapes_shards
    plain = list(itertools.islice(iter(_stream(shards, n)), 12))
    bucketed = list(itertools.islice(iter(_stream(shards, n, length_buckets=4)), 12))
    for blk in range(3):
        a = sorted(k for b in plain[4 * blk:4 * blk + 4] for k in b["keys"])
        b = sorted(k for b in bucketed[4 * blk:4 * blk + 4] for k in b["keys"])
        assert a == b  # the same samples, in other batches
    width = lambda bs: sum(int((b["input_ids"] != 1).sum(1).max()) for b in bs)
    assert width(bucketed) < width(plain)  # what trimming then cuts
    spread = lambda bs: sum(int(l.max() - l.min()) for l in ((b["input_ids"] != 1).sum(1) for b in bs))
    assert spread(bucketed) < spread(plain)
    for cut in (5, 6, 8):  # inside a block (5, 6) and on a block boundary (8)
        tr = StreamTracker()
        for b in bucketed[:cut]:
            tr.update(b)
        resumed = _stream(shards, n, length_buckets=4)
        resumed.load_state_dict(tr.state_dict())
        rest = list(itertools.islice(iter(resumed), 12 - cut))
        for a, b in zip(rest, bucketed[cut:]):
            assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])
            assert a["skipped"] == b["skipped"]


def test_device_resize_matches_worker_resize():
    """The crop resized on the device (antialiased bilinear on the padded uint8 batch)
    is the workers' PIL crop within one grey level (rounding), for downscales and
    upscales, and its boxes are the same random draws."""
    import random

    import numpy as np
    from PIL import Image

    from phoclip.data.transforms import image_to_tensor, pad_images, random_crop_box, resize_on_device

    g = np.random.default_rng(0)
    imgs, want, boxes = [], [], []
    for i, (w, h) in enumerate([(320, 256), (256, 341), (90, 70), (224, 224), (500, 180)]):
        arr = (g.random((h, w, 3)) * 60 + np.linspace(0, 190, w)[None, :, None]).astype(np.uint8)
        im = Image.fromarray(arr)
        want.append(image_to_tensor(im, 224, True, random.Random(i), normalize=False))
        boxes.append(random_crop_box(im.size, random.Random(i)))
        imgs.append(torch.from_numpy(arr).permute(2, 0, 1))
    batch = pad_images(imgs)
    got = resize_on_device(batch["images"], torch.tensor(boxes, dtype=torch.int32), 224)
    diff = (got.int() - torch.stack(want).int()).abs()
    assert got.dtype == torch.uint8 and got.shape == (5, 3, 224, 224)
    assert diff.float().mean() < 0.3 and diff.max() <= 1, (diff.float().mean(), diff.max())


def test_stream_ships_decoded_images_for_device_resize(shapes_shards):
    """data.resize_on=device: the same samples, captions and crops as the worker path;
    the images arrive at shard size with their boxes, and the trainer's resize gives
    the workers' pixels within rounding."""
    import itertools

    from phoclip.data.transforms import resize_on_device

    shards, _, n = shapes_shards
    worker = list(itertools.islice(iter(_stream(shards, n)), 3))
    device = list(itertools.islice(iter(_stream(shards, n, resize_on="device")), 3))
    for a, b in zip(worker, device):
        assert a["keys"] == b["keys"] and torch.equal(a["input_ids"], b["input_ids"])
        assert b["images"].shape[-1] == 64 and b["boxes"].shape == (4, 4)  # shards hold 64 px images
        diff = (resize_on_device(b["images"], b["boxes"], 32).int() - a["images"].int()).abs()
        assert diff.float().mean() < 0.3 and diff.max() <= 1


def test_each_checkpoint_is_saved_and_logged_once_and_the_end_is_evaluated_before_its_save(
        shapes_shards, tmp_path, caplog):
    """A run whose last step is a save step saves (and logs) it once, the final
    evaluation in it, not again after it. Its log lines say step N/total and ETA."""
    import json
    import logging

    tr = _trainer(shapes_shards, tmp_path, **{"train.max_steps": 4, "train.save_every": 2, "data.workers": 0,
                                              "train.eval_every": 0})
    try:
        with caplog.at_level(logging.INFO, logger="phoclip_train"):
            tr.train()
    finally:
        tr.close()
    said = [r.getMessage() for r in caplog.records]
    # says where it is: step N/total with samples/s and an ETA on every log line
    assert any(m.startswith("step 4/4 ") and "samples/s ETA 0:00" in m for m in said), said
    saves = [r.getMessage() for r in caplog.records if r.getMessage().startswith("saved checkpoint")]
    assert [s.rsplit("/", 1)[1] for s in saves] == ["step_00000002", "step_00000004"], saves
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["evaluation"] and "t2i_R@1" in meta["evaluation"]  # the end's evaluation is in it
