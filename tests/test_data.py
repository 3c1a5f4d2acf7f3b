"""The shard stream: rank/worker splits, seeded order, exact resume, bad samples."""
import itertools
import json
import shutil
import tarfile

import pytest
import torch

from phoclip.data.stream import ShardStream, StreamConfig, StreamTracker
from phoclip.data.catalog import expand_urls


def _urls(shards, n):
    return expand_urls(f"{shards}/train-{{000000..{n - 1:06d}}}.tar")[0]


def _stream(urls, rank=0, world=1, resampled=True, seed=0, bs=4):
    return ShardStream(StreamConfig(urls=urls, weights=[1.0] * len(urls), batch_size=bs, image_size=32,
                                    seed=seed, rank=rank, world_size=world, resampled=resampled, shuffle_buffer=8))


def test_non_resampled_ranks_and_workers_read_distinct_shards(shapes_shards):
    shards, _, n = shapes_shards
    urls = _urls(shards, n)
    seen = {}
    for rank in (0, 1):
        s = _stream(urls, rank, 2, resampled=False)
        loader = torch.utils.data.DataLoader(s, batch_size=None, num_workers=2)
        keys = set()
        for b in itertools.islice(loader, 6):
            keys.update(b["keys"])
        seen[rank] = keys
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    # each rank's shards: the epoch's shuffled list split rank::world
    shard_keys = {}
    for u in urls:
        with tarfile.open(u) as tf:
            shard_keys[u] = {m.name.split(".")[0] for m in tf.getmembers()}
    for rank in (0, 1):
        owners = {u for u, ks in shard_keys.items() if ks & seen[rank]}
        other = {u for u, ks in shard_keys.items() if ks & seen[1 - rank]}
        assert not owners & other


def test_seeded_order_and_exact_resume_without_decoding(shapes_shards, monkeypatch):
    shards, _, n = shapes_shards
    urls = _urls(shards, n)
    for resampled in (True, False):
        ref = list(itertools.islice(iter(_stream(urls, resampled=resampled)), 8))
        again = list(itertools.islice(iter(_stream(urls, resampled=resampled)), 8))
        assert [b["keys"] for b in ref] == [b["keys"] for b in again]
        assert all(torch.equal(a["images"], b["images"]) for a, b in zip(ref, again))
        other_seed = list(itertools.islice(iter(_stream(urls, resampled=resampled, seed=1)), 8))
        assert [b["keys"] for b in ref] != [b["keys"] for b in other_seed]
        tr = StreamTracker()
        for b in ref[:5]:
            tr.update(b)
        resumed = _stream(urls, resampled=resampled)
        resumed.load_state_dict(tr.state_dict())
        import phoclip.data.samples as samples_mod  # the stream's one decode-and-count calls it
        calls = []
        real = samples_mod.decode_sample
        monkeypatch.setattr(samples_mod, "decode_sample", lambda s, *a, **k: calls.append(1) or real(s, *a, **k))
        rest = list(itertools.islice(iter(resumed), 3))
        monkeypatch.setattr(samples_mod, "decode_sample", real)
        assert len(calls) == 3 * 4  # only the samples it yields are decoded
        for a, b in zip(rest, ref[5:]):
            assert a["keys"] == b["keys"]
            assert torch.equal(a["images"], b["images"]) and torch.equal(a["input_ids"], b["input_ids"])


def _bad_shard_dir(shards, n, tmp_path):
    """Copies of the good shards plus: a truncated shard, and one with a sample missing
    its ids, an undecodable image and a garbage .npy."""
    import webdataset as wds

    d = tmp_path / "bad"
    d.mkdir()
    for u in _urls(shards, n):
        shutil.copy(u, d)
    shutil.copy(shards / "manifest.json", d)
    sizes = json.loads((shards / "sizes.json").read_text())
    good = d / "train-000000.tar"
    data = good.read_bytes()
    (d / f"train-{n:06d}.tar").write_bytes(data[: len(data) // 2 + 100])  # truncated
    with tarfile.open(good) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    keys = sorted({k.split(".")[0] for k in members})
    with open(d / f"train-{n + 1:06d}.tar", "wb") as f, wds.TarWriter(f, encoder=False) as tw:
        tw.write({"__key__": "nomissing", "jpg": members[keys[0] + ".jpg"], "json": b"{}"})
        tw.write({"__key__": "badjpg", "jpg": b"\xff\xd8garbage", "ids.npy": members[keys[0] + ".ids.npy"]})
        tw.write({"__key__": "badnpy", "jpg": members[keys[0] + ".jpg"], "ids.npy": b"not npy"})
        for k in keys[1:]:
            tw.write({"__key__": k + "x", "jpg": members[k + ".jpg"], "ids.npy": members[k + ".ids.npy"]})
    sizes[f"train-{n:06d}.tar"] = sizes["train-000000.tar"]
    sizes[f"train-{n + 1:06d}.tar"] = len(keys) + 2
    (d / "sizes.json").write_text(json.dumps(sizes))
    return d, n + 2


def test_bad_samples_and_shards_skipped_and_counted(shapes_shards, tmp_path):
    shards, _, n = shapes_shards
    d, m = _bad_shard_dir(shards, n, tmp_path)
    urls = expand_urls(f"{d}/train-{{{n:06d}..{m - 1:06d}}}.tar")[0]  # only the two bad shards
    s = _stream(urls, resampled=False)
    skipped, got = {}, 0
    for b in itertools.islice(iter(s), 30):  # several epochs: every bad spot is hit
        got += len(b["keys"])
        skipped = b["skipped"]
    assert got == 120
    assert skipped.get("missing_ids_npy", 0) >= 1
    assert skipped.get("image_corrupt", 0) + skipped.get("image_not_an_image", 0) >= 1
    assert skipped.get("bad_ids", 0) >= 1  # the garbage .npy, by its own reason
    assert skipped.get("truncated_shard", 0) >= 1


def test_stream_ships_uint8_pixels_normalised_like_evaluation(shapes_shards):
    """Training batches carry raw uint8 pixels (normalised on the device by the trainer);
    normalising them must give exactly what the evaluation path feeds the model."""
    import random

    import numpy as np
    import torchvision.transforms.functional as TF
    from PIL import Image

    from phoclip.data.transforms import IMAGENET_MEAN, IMAGENET_STD, image_to_tensor, normalize_images

    shards, _, n = shapes_shards
    b = next(iter(_stream(_urls(shards, n))))
    assert b["images"].dtype == torch.uint8 and b["images"].shape[1:] == (3, 32, 32)
    assert b["images"].float().std() > 0  # real pixels, not a blank
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    ref = TF.normalize(TF.pil_to_tensor(TF.center_crop(TF.resize(img, 32), [32, 32])).float() / 255,
                       IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(image_to_tensor(img, 32, train=False), ref, atol=1e-5)
    raw = image_to_tensor(img, 32, train=True, rng=random.Random(3), normalize=False)
    same = image_to_tensor(img, 32, train=True, rng=random.Random(3))
    assert raw.dtype == torch.uint8 and torch.equal(normalize_images(raw), same)
    bf = normalize_images(raw[None], torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and torch.allclose(bf.float(), same[None], atol=3e-2)
    with pytest.raises(TypeError, match="uint8"):  # floats would be normalised twice
        normalize_images(same)


def _shard_keys(urls):
    out = {}
    for i, u in enumerate(urls):
        with tarfile.open(u) as tf:
            out[i] = {m.name.split(".")[0] for m in tf.getmembers()}
    return out


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 2), (2, 3)])
def test_another_rank_count_continues_the_epoch(shapes_shards, old_world, new_world):
    """Resumed on another number of ranks, the streams share out the rest of the epoch:
    no shard the old streams opened is read again, every other shard is read by exactly
    one new stream, and what is lost is only what was in flight (the unread rest of the
    opened shards and the shuffle buffers)."""
    from phoclip.data.stream import StreamLayout, epoch_shards, relayout

    shards, _, n = shapes_shards
    urls = _urls(shards, n)
    keys_of = _shard_keys(urls)
    consumed, states = [], {}
    for r in range(old_world):
        tr = StreamTracker()
        for b in itertools.islice(iter(_stream(urls, r, old_world, resampled=False)), 3 + r):
            tr.update(b)
            consumed += b["keys"]
        states[r] = tr.state_dict()
    assert len(consumed) == len(set(consumed))
    lay = relayout(urls, 0, False, StreamLayout(), old_world, 1, states, salt=7)
    assert lay.start_epoch == 0 and lay.salt == 7
    done = set(lay.done[0])
    assert {i for i, ks in keys_of.items() if ks & set(consumed)} <= done  # no consumed sample repeats
    assert len(done) == sum(s["opened"][0] for s in states.values())
    # the new streams' epoch-0 shards: the rest, each exactly once
    new_lists = []
    for r in range(new_world):
        it = epoch_shards(urls, 0, lay, r, new_world, 0, 1)
        new_lists.append([sh["index"] for sh in itertools.takewhile(lambda sh: sh["epoch"] == 0, it)])
    flat = [i for lst in new_lists for i in lst]
    assert len(flat) == len(set(flat)) and set(flat) | done == set(range(len(urls))) and not set(flat) & done
    # in flight, and so skipped this epoch: at most a shuffle buffer + the opened shards' rest
    in_flight = sum(len(keys_of[i]) for i in done) - len(consumed)
    assert 0 <= in_flight <= sum(len(keys_of[i]) for i in done)
    # the new streams really serve those shards (decoded, batched), and nothing consumed
    new_keys = []
    for r in range(new_world):
        s = ShardStream(StreamConfig(urls=urls, weights=[1.0] * len(urls), batch_size=4, image_size=32,
                                     seed=0, rank=r, world_size=new_world, resampled=False, shuffle_buffer=8, layout=lay))
        for b in itertools.islice(iter(s), 2):
            new_keys += b["keys"]
    assert new_keys and not set(new_keys) & set(consumed)
    assert all(any(k in keys_of[i] for i in flat) for k in new_keys)
    # the next epoch is whole again, under the new layout
    nxt = [sh for sh in itertools.islice(epoch_shards(urls, 0, lay, 0, 1, 0, 1), len(urls) + len(flat))
           if sh["epoch"] == 1]
    assert sorted(sh["index"] for sh in nxt) == list(range(len(urls)))


def test_another_rank_count_in_resampled_mode_draws_afresh(shapes_shards):
    from phoclip.data.stream import StreamLayout, relayout

    shards, _, n = shapes_shards
    urls = _urls(shards, n)
    lay = relayout(urls, 0, True, StreamLayout(), 2, 1, {}, salt=9)
    first = next(iter(_stream(urls)))["keys"]
    s = ShardStream(StreamConfig(urls=urls, weights=[1.0] * len(urls), batch_size=4, image_size=32,
                                 seed=0, rank=0, world_size=1, resampled=True, shuffle_buffer=8, layout=lay))
    assert next(iter(s))["keys"] != first  # not a replay of the run's first samples



def _small_shards(shards, n, tmp_path, per_shard=5, count=4):
    """`count` shards of `per_shard` samples each, re-cut from the fixture's shards."""
    import webdataset as wds

    samples = []
    for u in _urls(shards, n):
        with tarfile.open(u) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for k in sorted({m.split(".")[0] for m in members}):
            samples.append({"__key__": k, **{e: members[f"{k}.{e}"] for e in ("jpg", "ids.npy", "json")
                                              if f"{k}.{e}" in members}})
    d = tmp_path / "small"
    d.mkdir()
    shutil.copy(shards / "manifest.json", d)
    sizes = {}
    for i in range(count):
        name = f"train-{i:06d}.tar"
        with open(d / name, "wb") as f, wds.TarWriter(f, encoder=False) as tw:
            for s in samples[i * per_shard:(i + 1) * per_shard]:
                tw.write(s)
        sizes[name] = per_shard
    (d / "sizes.json").write_text(json.dumps(sizes))
    return d, expand_urls(f"{d}/train-{{000000..{count - 1:06d}}}.tar")[0]


def test_a_truncated_shard_does_not_stop_a_stream_whose_buffer_spans_many_shards(shapes_shards, tmp_path):
    """Regression: filling a 32-sample shuffle buffer opens ~7 shards of 5 before any
    sample is decoded; those opens were counted as 'no sample read' and a healthy rank
    stopped with NoReadableSamples. Only shards settled unreadable count."""
    shards, _, n = shapes_shards
    d, urls = _small_shards(shards, n, tmp_path)
    t = d / "train-000002.tar"
    t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])
    for rank, buf in itertools.product((0, 1), (32, 64)):
        s = ShardStream(StreamConfig(urls=urls, weights=[1.0] * 4, batch_size=4, image_size=32,
                                     seed=0, rank=rank, world_size=2, resampled=True, shuffle_buffer=buf))
        batches = list(itertools.islice(iter(s), 12))
        assert len(batches) == 12 and all(len(b["keys"]) == 4 for b in batches)
        assert batches[-1]["skipped"].get("truncated_shard", 0) >= 1


def test_stream_gives_up_on_shards_that_are_all_unreadable(shapes_shards, tmp_path):
    """The rule still ends a stream that can never read a sample: missing files (no
    sample at all), and shards whose every sample fails to decode, whatever the buffer."""
    from phoclip.data.health import NoReadableSamples

    shards, _, n = shapes_shards
    d, urls = _small_shards(shards, n, tmp_path)
    missing = [str(d / f"gone-{i}.tar") for i in range(4)]
    with pytest.raises(NoReadableSamples, match="no sample could be read from the last 8 shards"):
        next(iter(ShardStream(StreamConfig(urls=missing, weights=[1.0] * 4, batch_size=4, image_size=32,
                                           seed=0, rank=0, world_size=1, resampled=True, shuffle_buffer=32))))
    import webdataset as wds

    for u in urls:  # every sample's ids garbage: shards are read whole, nothing decodes
        with tarfile.open(u) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        with open(u, "wb") as f, wds.TarWriter(f, encoder=False) as tw:
            for k in sorted({m.split(".")[0] for m in members}):
                tw.write({"__key__": k, "jpg": members[f"{k}.jpg"], "ids.npy": b"\x93NUMPY garbage"})
    for buf in (1, 32, 200):
        with pytest.raises(NoReadableSamples) as e:
            next(iter(ShardStream(StreamConfig(urls=urls, weights=[1.0] * 4, batch_size=4, image_size=32,
                                               seed=0, rank=0, world_size=1, resampled=True, shuffle_buffer=buf))))
        assert "bad_ids" in str(e.value)


@pytest.mark.parametrize("header_edit", [(b"(", b"(("), (b")", b""), (b"'shape'", b"'shape"),
                                         (b"{", b"{" * 3000)])
def test_a_malformed_ids_header_is_one_skipped_sample(shapes_shards, tmp_path, header_edit):
    """numpy's header parser raises tokenize.TokenError for an unclosed bracket (not a
    ValueError); whatever it raises, the sample is skipped and counted, the stream goes on."""
    import io

    import numpy as np
    import webdataset as wds

    from phoclip.data.samples import BadSample, decode_ids

    buf = io.BytesIO()
    np.save(buf, np.ones((2, 8), np.int64))
    bad = buf.getvalue().replace(*header_edit, 1)
    with pytest.raises(BadSample, match="bad_ids"):
        decode_ids(bad)
    shards, _, n = shapes_shards
    d, urls = _small_shards(shards, n, tmp_path)
    with tarfile.open(urls[0]) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    k = sorted({m.split(".")[0] for m in members})[0]
    with open(urls[0], "wb") as f, wds.TarWriter(f, encoder=False) as tw:
        tw.write({"__key__": "bad", "jpg": members[f"{k}.jpg"], "ids.npy": bad})
        for key in sorted({m.split(".")[0] for m in members}):
            tw.write({"__key__": key, **{e: members[f"{key}.{e}"] for e in ("jpg", "ids.npy")}})
    s = ShardStream(StreamConfig(urls=urls, weights=[1.0] * 4, batch_size=4, image_size=32,
                                 seed=0, rank=0, world_size=1, resampled=False, shuffle_buffer=1))
    batches = list(itertools.islice(iter(s), 5))  # one epoch: 20 good samples
    assert sum(len(b["keys"]) for b in batches) == 20 and "bad" not in sum((b["keys"] for b in batches), [])
    assert batches[-1]["skipped"] == {"bad_ids": 1}


def test_stream_stages_resume_skip_and_one_decode_and_count(shapes_shards):
    """The stages on their own: skip_to drops the consumed positions undecoded (their
    shard counts them as read well); decode_counted_stage drops a bad sample, counts its
    reason once and tells its shard; fixed_blocks yields a block as soon as it is full."""
    from collections import Counter

    from phoclip.data.health import ShardHealth
    from phoclip.data.stream import decode_counted_stage, fixed_blocks, skip_to

    shards, _, n = shapes_shards
    with tarfile.open(_urls(shards, n)[0]) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    k = sorted({m.split(".")[0] for m in members})[0]
    good = {"__key__": k, "jpg": members[f"{k}.jpg"], "ids.npy": members[f"{k}.ids.npy"]}
    bad = {"__key__": "bad", "jpg": members[f"{k}.jpg"], "ids.npy": b"not npy"}
    skips: Counter = Counter()
    health = ShardHealth(2, skips)
    shard_samples = [dict(good), dict(bad), dict(good), dict(good)]
    tagged = list(health.track_samples(s for sh in health.track_shards([{"url": "a"}]) for s in shard_samples))
    kept = list(skip_to(enumerate(tagged, 1), 1, health))
    assert [p for p, _ in kept] == [2, 3, 4]
    out = list(decode_counted_stage(kept, skips, health, None, None))
    assert [p for p, *_ in out] == [3, 4] and skips == {"bad_ids": 1}
    assert out[0][3].ndim == 2 and out[0][2].size[0] > 0  # ids [n, L], a PIL image
    pulled = []
    blocks = fixed_blocks((pulled.append(i) or i for i in range(7)), 3)
    assert next(blocks) == [0, 1, 2] and pulled == [0, 1, 2]  # nothing read ahead of the block
    assert list(blocks) == [[3, 4, 5]]  # the partial last block is dropped
