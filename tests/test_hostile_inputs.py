"""Every file someone could hand us, crafted here, and what it must get: refused with one
line naming the file and the problem, or skipped and counted, or the run completes;
never code execution, a hang, a crash of a whole run on one sample, or silent loss.

Sharding inputs, annotations and config overrides are here; shards, checkpoints,
indexes, run folders and processes are in test_hostile_runs.py."""
import io
import json
import os
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_image, read_all, refusal

ARGS = ["--segmenter", "none", "--workers", "1", "--max-length", "16", "--image-size", "32"]


def _shard(make_shards, tok, out, *sources, extra=()):
    args = []
    for s in sources:
        args += ["--source", s]
    return make_shards([*args, "--out", out, "--tokenizer", tok, *ARGS, *map(str, extra)])


def _samples(out: Path) -> list[dict]:
    return [dict(v, meta=json.loads(v["json"])) for v in read_all(out).values()]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- images

def test_exif_orientation_is_applied_and_16bit_images_are_not_white(tmp_path, tiny_tokenizer_dir, make_shards):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    # a phone photo stored landscape (40x20) with EXIF "rotate 90": upright it is 20x40
    im = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(imgs / "phone.jpg", exif=exif.tobytes())
    # a 16-bit greyscale scan, a gradient of mean ~50% grey
    a = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(a).save(imgs / "scan16.png")
    ann = _jsonl(tmp_path / "a.jsonl", [{"image": "phone.jpg", "caption": "ảnh điện thoại"},
                                         {"image": "scan16.png", "caption": "bản quét"}])
    out = tmp_path / "out"
    _shard(make_shards, tiny_tokenizer_dir, out, f"coco-jsonl:{ann}:{imgs}", extra=["--val-fraction", "0"])
    got = {s["meta"]["path"][0]: Image.open(io.BytesIO(s["jpg"])) for s in _samples(out)}
    w, h = got["phone.jpg"].size
    assert h > w, (w, h)  # upright: taller than wide
    mean = np.asarray(got["scan16.png"]).mean()
    assert 100 < mean < 155, mean  # a bare convert clips 16-bit to white (~255)


def test_images_that_are_not_regular_files_never_hang_and_are_counted(tmp_path, tiny_tokenizer_dir, make_shards):
    imgs = tmp_path / "imgs"
    make_image(imgs / "ok.jpg", 1)
    os.symlink("/dev/zero", imgs / "zero.jpg")
    os.mkfifo(imgs / "fifo.jpg")
    make_image(imgs / "big.jpg", 2, size=(400, 300))  # over --max-image-bytes below
    ann = _jsonl(tmp_path / "a.jsonl", [{"image": n, "caption": "một bức ảnh"}
                                         for n in ("ok.jpg", "zero.jpg", "fifo.jpg", "big.jpg")])
    out = tmp_path / "out"
    big = (imgs / "big.jpg").stat().st_size
    _shard(make_shards, tiny_tokenizer_dir, out, f"coco-jsonl:{ann}:{imgs}",
           extra=["--val-fraction", "0", "--max-image-bytes", big - 1])
    man = json.loads((out / "manifest.json").read_text())
    assert man["counts"]["train"] == 1
    assert man["skipped"]["not_a_file"] == 2 and man["skipped"]["too_large_file"] == 1
    assert man["image"]["max_bytes"] == big - 1


def test_max_pixels_applies_in_both_phases_and_is_recorded(tmp_path, tiny_tokenizer_dir, make_shards):
    from phoclip_sharding.writer import ShardTask, write_shard

    imgs = tmp_path / "imgs"
    make_image(imgs / "small.jpg", 1, size=(40, 30))
    make_image(imgs / "large.jpg", 2, size=(100, 80))
    ann = _jsonl(tmp_path / "a.jsonl", [{"image": "small.jpg", "caption": "nhỏ"}, {"image": "large.jpg", "caption": "lớn"}])
    out = tmp_path / "out"
    _shard(make_shards, tiny_tokenizer_dir, out, f"coco-jsonl:{ann}:{imgs}", extra=["--val-fraction", "0", "--max-pixels", 5000])
    man = json.loads((out / "manifest.json").read_text())
    assert man["skipped"]["too_large"] == 1 and man["counts"]["train"] == 1
    assert man["image"]["max_pixels"] == 5000
    # phase 2 (writing) checks too: an image that grew after phase 1 is refused there
    ids = np.ones((1, 16), np.int32)
    (tmp_path / "o2").mkdir()
    rec = write_shard(ShardTask("train", 0, str(tmp_path / "o2"), 32, 90,
                                [("k", str(imgs / "large.jpg"), {}, ids)], max_pixels=5000))
    assert rec["count"] == 0 and rec["skipped"] == {"too_large": 1}


# ----------------------------------------------------------------------------- annotations

def test_annotations_not_in_utf8_are_refused_with_the_byte_offset_or_read_with_encoding(
        tmp_path, tiny_tokenizer_dir, make_shards):
    imgs = tmp_path / "imgs"
    make_image(imgs / "a.jpg", 1)
    ann = tmp_path / "cp.jsonl"
    # Windows-1258 (Vietnamese Windows): tones as combining marks
    ann.write_bytes(json.dumps({"image": "a.jpg", "caption": unicodedata.normalize("NFD", "con chó đen")},
                               ensure_ascii=False).encode("cp1258"))
    line = refusal(_shard, make_shards, tiny_tokenizer_dir, tmp_path / "o", f"coco-jsonl:{ann}:{imgs}")
    assert re.search(r"cp.jsonl: not utf-8 text at byte \d+", line), line
    out = tmp_path / "ok"
    _shard(make_shards, tiny_tokenizer_dir, out, f"coco-jsonl:{ann}:{imgs}",
           extra=["--encoding", "cp1258", "--val-fraction", "0"])
    assert _samples(out)[0]["meta"]["captions"] == ["con chó đen"]  # decoded, then NFC


def test_csv_captions_over_the_csv_module_field_limit(tmp_path, tiny_tokenizer_dir, make_shards):
    imgs = tmp_path / "imgs"
    make_image(imgs / "a.jpg", 1)
    long = "con chó " * 30000  # 240 kB, over csv's default 128 kB field limit
    (tmp_path / "a.csv").write_text(f'image,caption\na.jpg,"{long}"\n', encoding="utf-8")
    out = tmp_path / "out"
    _shard(make_shards, tiny_tokenizer_dir, out, f"csv:{tmp_path / 'a.csv'}:{imgs}", extra=["--val-fraction", "0"])
    assert _samples(out)[0]["meta"]["captions"][0].startswith("con chó con chó")


def test_malformed_annotations_are_counted_not_reinterpreted(tmp_path, tiny_tokenizer_dir, make_shards):
    imgs = tmp_path / "imgs"
    for i in range(4):
        make_image(imgs / f"{i}.jpg", i)
    # OpenViIC with one caption given as a string: one caption, not one per character
    (tmp_path / "open.json").write_text(json.dumps({"0.jpg": {"captions": "một con mèo"},
                                                    "1.jpg": {"captions": ["hai con chó", 7]}},
                                                   ensure_ascii=False), encoding="utf-8")
    # KTVIC with a duplicate image id and a non-string file name
    (tmp_path / "kt.json").write_text(json.dumps({
        "images": [{"id": 1, "filename": "2.jpg"}, {"id": 1, "filename": "3.jpg"}, {"id": 2, "filename": 42}],
        "annotations": [{"image_id": 1, "caption": "ba con gà"}, {"image_id": 2, "caption": "x"},
                        {"image_id": 9, "caption": "không có ảnh"}]}, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out"
    _shard(make_shards, tiny_tokenizer_dir, out, f"openviic:{tmp_path / 'open.json'}:{imgs}",
           f"ktvic:{tmp_path / 'kt.json'}:{imgs}", extra=["--val-fraction", "0"])
    caps = {s["meta"]["path"][0]: s["meta"]["captions"] for s in _samples(out)}
    assert caps == {"0.jpg": ["một con mèo"], "1.jpg": ["hai con chó"], "2.jpg": ["ba con gà"]}
    sk = json.loads((out / "manifest.json").read_text())["skipped"]
    assert sk["duplicate_image_id"] == 1 and sk["bad_file_name"] == 1
    assert sk["non_string_caption"] == 1 and sk["caption_of_unknown_image"] == 1


def test_image_paths_outside_the_image_folder_are_refused_unless_allowed(tmp_path, tiny_tokenizer_dir, make_shards):
    imgs = tmp_path / "data" / "imgs"
    make_image(imgs / "in.jpg", 1)
    make_image(tmp_path / "secret.jpg", 2)
    rows = [{"image": "in.jpg", "caption": "bên trong"}, {"image": "../../secret.jpg", "caption": "bên ngoài"},
            {"image": str(tmp_path / "secret.jpg"), "caption": "tuyệt đối"}]
    ann = _jsonl(tmp_path / "a.jsonl", rows)
    out = tmp_path / "out"
    _shard(make_shards, tiny_tokenizer_dir, out, f"coco-jsonl:{ann}:{imgs},name=mine", extra=["--val-fraction", "0"])
    man = json.loads((out / "manifest.json").read_text())
    assert man["counts"]["train"] == 1 and man["skipped"]["outside_image_folder"] == 2
    meta = _samples(out)[0]["meta"]
    assert meta["path"] == ["in.jpg"] and meta["source"] == ["mine"]  # relative + source, no machine path
    out2 = tmp_path / "out2"
    _shard(make_shards, tiny_tokenizer_dir, out2, f"coco-jsonl:{ann}:{imgs}",
           extra=["--val-fraction", "0", "--allow-outside-paths"])
    assert json.loads((out2 / "manifest.json").read_text())["counts"]["train"] == 2  # the two secrets are one image


def test_terminal_control_characters_are_cleaned_at_sharding(tmp_path, tiny_tokenizer_dir, make_shards):
    imgs = tmp_path / "imgs"
    make_image(imgs / "a.jpg", 1)
    evil = "con chó\x1b[2J\x1b]0;owned\x07 chạy\x1b[31m đỏ\x1b[0m\x07\x00"
    ann = _jsonl(tmp_path / "a.jsonl", [{"image": "a.jpg", "caption": evil}])
    out = tmp_path / "out"
    _shard(make_shards, tiny_tokenizer_dir, out, f"coco-jsonl:{ann}:{imgs}", extra=["--val-fraction", "0"])
    meta = _samples(out)[0]["meta"]
    assert meta["captions"] == ["con chó chạy đỏ"]
    assert not any(ord(ch) < 32 and ch not in "\t\n" for c in meta["captions_raw"] for ch in c)


def test_an_unreadable_done_record_means_not_done(tmp_path, tiny_tokenizer_dir, make_shards):
    imgs = tmp_path / "imgs"
    rows = []
    for i in range(6):
        make_image(imgs / f"{i}.jpg", i)
        rows.append({"image": f"{i}.jpg", "caption": f"ảnh số {i}"})
    ann = _jsonl(tmp_path / "a.jsonl", rows)
    out = tmp_path / "out"
    extra = ["--val-fraction", "0", "--shard-size", "3"]
    _shard(make_shards, tiny_tokenizer_dir, out, f"coco-jsonl:{ann}:{imgs}", extra=extra)
    first = (out / "train-000001.tar").read_bytes()
    done = out / ".done" / "train-000001.tar.json"
    done.write_text('{"name": "train-000001.tar", "cou')  # torn by a crash
    (out / "train-000001.tar").write_bytes(b"half a shard")
    _shard(make_shards, tiny_tokenizer_dir, out, f"coco-jsonl:{ann}:{imgs}", extra=extra)
    assert (out / "train-000001.tar").read_bytes() == first  # rewritten, not trusted
    assert json.loads((out / "sizes.json").read_text()) == {"train-000000.tar": 3, "train-000001.tar": 3}
    assert not list(out.glob(".*.tmp*")) and not list(out.glob("*.tmp*"))


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("override, message", [
    ("optim.betas=0.9", "optim.betas must be a list"),
    ("optim.betas=[0.9, 1.5]", "optim.betas must be two numbers"),
    ("data.val_shards=5", "data.val_shards must be text"),
    ("data.val_shards=[a, b]", "data.val_shards must be text"),
    ("model=1", "model is a section"),
    ("model.overrides=3", "model.overrides must be a mapping"),
    ("train.eval_queries=một câu", "train.eval_queries must be a list"),
    ("train.eval_queries=[1, 2]", "train.eval_queries must be a list of Vietnamese queries"),
    ("train.grad_clip=-1", "train.grad_clip must be >= 0"),
    ("data.shuffle_buffer=-5", "data.shuffle_buffer must be >= 0"),
    ("optim.lr_head=.nan", "optim.lr_head must be a finite number"),
    ("optim.lr_text=.inf", "optim.lr_text must be a finite number"),
    ("optim.eps=0", "optim.eps must be a finite number > 0"),
    ("data.global_batch_size=10", "not a multiple of data.batch_size"),
])
def test_config_overrides_of_every_kind_are_type_checked(override, message):
    from phoclip_train.config import ConfigError, resolve_config

    with pytest.raises(ConfigError, match=message):
        cfg = resolve_config(None, ["data.train_shards=x", "data.batch_size=4", override])
        cfg.validate(world_size=1)


def test_config_accepts_well_typed_values_of_every_kind():
    from phoclip_train.config import resolve_config

    cfg = resolve_config(None, ["data.train_shards=x", "optim.betas=[0.9, 0.95]", "data.val_shards=v-{0..1}.tar",
                                "model.overrides={vision: {pretrained: false}}", "train.eval_queries=[con chó]",
                                "model.tokenizer=null", "train.channels_last=true"])
    cfg.validate(world_size=1)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.data.val_shards == "v-{0..1}.tar"
    assert cfg.model.overrides == {"vision": {"pretrained": False}} and cfg.model.tokenizer is None
    assert cfg.train.eval_queries == ["con chó"] and cfg.train.channels_last == "true"


def test_a_huge_tar_member_is_skipped_unread(tmp_path):
    """A shard member over the cap (a hostile tar claiming gigabytes) is passed over
    without being read into memory and counted; the samples around it still come."""
    import io
    import tarfile
    import tracemalloc
    from collections import Counter

    import phoclip.data.tar as tar_mod

    def add(tf, name, data):
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))

    path = tmp_path / "hostile.tar"
    with tarfile.open(path, "w") as tf:
        add(tf, "a.json", b"{}")
        add(tf, "a.txt", b"first")
        add(tf, "b.json", b"{}")
        add(tf, "b.jpg", bytes(48 << 20))  # 48 MiB of member
        add(tf, "c.json", b"{}")
        add(tf, "c.txt", b"last")
    skips = Counter()
    tracemalloc.start()
    got = list(tar_mod.read_shards([{"url": str(path)}], skips, max_member_bytes=4 << 20))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [s["__key__"] for s in got] == ["a", "b", "c"]
    assert "jpg" not in got[1] and got[2]["txt"] == b"last"
    assert skips == Counter({"oversized_member": 1})
    assert peak < 8 << 20  # never held the 48 MiB


def test_decode_counts_bytes_per_pixel_not_only_pixels():
    """A pixel cap alone lets a 16-bit or RGBA image under it cost several times more: the
    shared decoder (sharding, training, search) refuses from the header what would take
    more than MAX_DECODE_BYTES, and scales 16-bit images without float64 copies."""
    import io

    import numpy as np
    from PIL import Image

    from phoclip.data.images import BadImage, decode_cost, decode_rgb

    buf = io.BytesIO()
    Image.new("I;16", (3000, 3000)).save(buf, format="PNG")
    cost = decode_cost("I;16", 3000, 3000)
    with pytest.raises(BadImage) as e:
        decode_rgb(buf.getvalue(), max_decode_bytes=cost - 1)
    assert e.value.reason == "too_large" and "I;16 needs" in str(e.value)
    assert decode_rgb(buf.getvalue(), max_decode_bytes=cost).size == (3000, 3000)
    a = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    im = Image.fromarray(a, "I;16")
    b = io.BytesIO()
    im.save(b, format="PNG")
    got = np.asarray(decode_rgb(b.getvalue()))[..., 0]
    assert got.max() == round(a.max() / 257) and got.min() == 0  # scaled, not clipped white
