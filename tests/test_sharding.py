"""Sharding: every reader on its published format, bad inputs, text, splits, determinism."""
import hashlib
import os
import io
import json
import random
import re
import subprocess
import sys
import tarfile
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, make_image, random_caption, read_all, refusal, static_server

ARGS = ["--segmenter", "underthesea", "--workers", "1", "--max-length", "16", "--image-size", "32"]


def shards_of(out: Path, split: str):
    return sorted(out.glob(f"{split}-*.tar"))


def run(make_shards, tok, out, *sources, extra=()):
    args = []
    for s in sources:
        args += ["--source", s]
    return make_shards(args + ["--out", out, "--tokenizer", tok, *ARGS, *extra])


# ----------------------------------------------------------------------------- readers

def test_every_reader_on_its_published_format(tmp_path, tiny_tokenizer_dir, make_shards):
    imgs = tmp_path / "img"
    for i in range(12):
        make_image(imgs / f"{i}.jpg", i)
    # coco-jsonl
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"image": f"{i}.jpg", "caption": f"hình_tròn {i}"})
                                                for i in (0, 1)), encoding="utf-8")
    # flickr8k-vi with Flickr's #N suffixes
    (tmp_path / "captions_vi.txt").write_text("2.jpg#0\tmột con chó\n2.jpg#1\tcon chó chạy\n3.jpg#0\txe hơi đỏ\n",
                                              encoding="utf-8")
    # KTVIC
    (tmp_path / "train_data.json").write_text(json.dumps({
        "images": [{"id": 7, "filename": "4.jpg"}, {"id": 8, "filename": "5.jpg"}],
        "annotations": [{"image_id": 7, "caption": "người đàn ông"}, {"image_id": 7, "caption": "làm việc"},
                        {"image_id": 8, "caption": "Hà Nội"}]}, ensure_ascii=False), encoding="utf-8")
    # UIT-OpenViIC
    (tmp_path / "uit-openviic-annotation-train.json").write_text(json.dumps(
        {"6.jpg": {"captions": ["bãi cỏ", "con chó trên bãi cỏ"]}, "7.jpg": {"captions": ["ngôi nhà"]}},
        ensure_ascii=False), encoding="utf-8")
    # UIT-ViIC (COCO)
    (tmp_path / "uitviic_captions_train2017.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "8.jpg"}], "annotations": [{"id": 1, "image_id": 1, "caption": "quả bóng"}]},
        ensure_ascii=False), encoding="utf-8")
    # generic jsonl / csv with their own field names
    (tmp_path / "g.jsonl").write_text(json.dumps({"file": "9.jpg", "text": ["màu đỏ", "màu vàng"]}) + "\n",
                                      encoding="utf-8")
    (tmp_path / "g.csv").write_text("img,cap\n10.jpg,màu xanh\n11.jpg,\"hai, ba\"\n", encoding="utf-8")
    out = tmp_path / "out"
    run(make_shards, tiny_tokenizer_dir, out,
        f"coco-jsonl:{tmp_path}/c.jsonl:{imgs}", f"flickr8k-vi:{tmp_path}/captions_vi.txt:{imgs}",
        f"ktvic:{tmp_path}/train_data.json:{imgs}", f"openviic:{tmp_path}/uit-openviic-annotation-train.json:{imgs}",
        f"uitviic:{tmp_path}/uitviic_captions_train2017.json:{imgs}",
        f"jsonl:{tmp_path}/g.jsonl:{imgs},image_field=file,caption_field=text",
        f"csv:{tmp_path}/g.csv:{imgs},image_field=img,caption_field=cap", extra=["--val-fraction", "0"])
    man = json.loads((out / "manifest.json").read_text())
    assert man["counts"] == {"train": 12, "val": 0}
    got = {json.loads(s["json"])["path"][0].split("/")[-1]: json.loads(s["json"]) for s in read_all(out).values()}
    assert set(got) == {f"{i}.jpg" for i in range(12)}
    assert got["2.jpg"]["captions"] == ["một con chó", "con chó chạy"]
    assert got["4.jpg"]["captions_segmented"] == ["người đàn_ông", "làm_việc"]
    assert got["4.jpg"]["source"] == ["ktvic"] and got["4.jpg"]["image_id"] == ["7"]
    assert got["6.jpg"]["captions"] == ["bãi cỏ", "con chó trên bãi cỏ"]
    assert got["8.jpg"]["captions"] == ["quả bóng"]
    assert got["9.jpg"]["captions"] == ["màu đỏ", "màu vàng"]
    assert got["11.jpg"]["captions"] == ["hai, ba"]
    assert man["sources"]["ktvic"] == {"train": 2, "val": 0}


# ----------------------------------------------------------------------------- bad input

def test_bad_images_and_captions_skipped_by_reason(tmp_path, tiny_tokenizer_dir, make_shards):
    imgs = tmp_path / "img"
    [make_image(imgs / f"g{i}.jpg", i) for i in range(4)]
    make_image(imgs / "gray.png", 10, mode="L", fmt="PNG")
    make_image(imgs / "pal.png", 11, mode="P", fmt="PNG")
    make_image(imgs / "cmyk.jpg", 12, mode="CMYK", fmt="JPEG")
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent red
    rgba.save(imgs / "alpha.png")
    (imgs / "empty.jpg").write_bytes(b"")
    (imgs / "text.jpg").write_text("not an image")
    data = (imgs / "g0.jpg").read_bytes()
    (imgs / "trunc.jpg").write_bytes(data[: len(data) // 2])
    Image.new("L", (10000, 10000)).save(imgs / "bomb.png")  # 100 Mpx: over the pixel cap
    rows = [("g0.jpg", "một con chó"), ("g1.jpg", "   "), ("g1.jpg", "xe hơi"), ("g2.jpg", ""),
            ("g3.jpg", "ngôi nhà"), ("gray.png", "màu xám"), ("pal.png", "bảng màu"), ("cmyk.jpg", "in ấn"),
            ("alpha.png", "trong suốt"), ("empty.jpg", "rỗng"), ("text.jpg", "chữ"), ("trunc.jpg", "cụt"),
            ("bomb.png", "bom"), ("missing.jpg", "mất")]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"image": i, "caption": c}, ensure_ascii=False)
                                                for i, c in rows), encoding="utf-8")
    out = tmp_path / "out"
    run(make_shards, tiny_tokenizer_dir, out, f"coco-jsonl:{tmp_path}/a.jsonl:{imgs}", extra=["--val-fraction", "0"])
    man = json.loads((out / "manifest.json").read_text())
    sk = man["skipped"]
    assert sk["empty_caption"] == 2 and sk["no_caption"] == 1      # g2 has only an empty caption
    assert sk["empty"] == 1 and sk["not_an_image"] == 1 and sk["missing_file"] == 1
    assert sk["too_large"] == 1 and sk["corrupt"] == 1
    # counts are of what was written: the truncated image (lost while writing) is not in them
    assert man["counts"]["train"] == 7 and man["sources"]["coco-jsonl"]["train"] == 7
    assert json.loads((out / "sizes.json").read_text()) == {"train-000000.tar": 7}
    samples = {json.loads(s["json"])["path"][0].split("/")[-1]: s for s in read_all(out).values()}
    assert set(samples) == {"g0.jpg", "g1.jpg", "g3.jpg", "gray.png", "pal.png", "cmyk.jpg", "alpha.png"}
    for s in samples.values():
        assert Image.open(io.BytesIO(s["jpg"])).mode == "RGB"
    # alpha is composed over white, not black
    px = np.asarray(Image.open(io.BytesIO(samples["alpha.png"]["jpg"])))
    assert px.mean() > 240
    assert json.loads(samples["g1.jpg"]["json"])["captions"] == ["xe hơi"]


def test_bad_source_spec_errors(tmp_path, tiny_tokenizer_dir, make_shards):
    # one line naming the problem, not a traceback
    assert "unknown format" in refusal(run, make_shards, tiny_tokenizer_dir, tmp_path / "o", f"nope:{tmp_path}")
    assert "does not exist" in refusal(run, make_shards, tiny_tokenizer_dir, tmp_path / "o",
                                       f"ktvic:{tmp_path}/missing.json")


# ----------------------------------------------------------------------------- text

def test_nfc_and_nfd_give_identical_ids(tiny_tokenizer_dir):
    from phoclip.data.text import TextProcessor, UndertheseaSegmenter, load_tokenizer

    proc = TextProcessor(load_tokenizer(str(tiny_tokenizer_dir)), UndertheseaSegmenter(), 16)
    text = "Một người đàn ông đang làm việc ở Hà Nội"
    nfd = unicodedata.normalize("NFD", text)
    assert nfd != text
    seg_a, ids_a = proc([text])
    seg_b, ids_b = proc(["  " + nfd.replace(" ", " \t ") + "\n"])
    assert seg_a == seg_b
    assert np.array_equal(ids_a, ids_b)
    assert "làm_việc" in seg_a[0] and "Hà_Nội" in seg_a[0]
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    assert tok.unk_token_id not in ids_a[0][: ids_a[0].tolist().index(2)]


def test_pyvi_and_none_segmenters():
    from phoclip.data.text import create_segmenter

    assert create_segmenter("pyvi").segment(["làm việc ở Hà Nội"])[0].count("_") >= 1
    assert create_segmenter("none").segment(["  làm_việc  ở "]) == ["làm_việc ở"]
    with pytest.raises(ValueError, match="unknown segmenter"):
        create_segmenter("nope")


def test_vncorenlp_missing_model_error(tmp_path):
    from phoclip.data.text import create_segmenter

    with pytest.raises(RuntimeError, match="download_model") as e:
        create_segmenter("vncorenlp", str(tmp_path / "vncorenlp"))
    assert "VnCoreNLP" in str(e.value)
    with pytest.raises(RuntimeError, match="--vncorenlp-dir|Java"):
        create_segmenter("vncorenlp", None)


def test_vncorenlp_missing_java_error(tmp_path, monkeypatch):
    from phoclip.data.text import create_segmenter

    monkeypatch.setenv("PATH", str(tmp_path))  # no java on PATH
    with pytest.raises(RuntimeError, match="Java"):
        create_segmenter("vncorenlp", str(tmp_path))


# ----------------------------------------------------------------------------- split, merge, determinism

def _dataset(tmp_path, n=40, dup=()):
    imgs = tmp_path / "img"
    rng = random.Random(1)
    lines = []
    for i in range(n):
        make_image(imgs / f"{i}.jpg", i)
        lines += [json.dumps({"image": f"{i}.jpg", "caption": random_caption(rng)}, ensure_ascii=False)
                  for _ in range(3)]
    for a, b in dup:  # byte-identical copy under another name
        (imgs / b).write_bytes((imgs / a).read_bytes())
        lines.append(json.dumps({"image": b, "caption": "bản sao"}, ensure_ascii=False))
    (tmp_path / "a.jsonl").write_text("\n".join(lines), encoding="utf-8")
    return tmp_path / "a.jsonl", imgs


def test_split_by_image_no_leak_and_duplicates_merged(tmp_path, tiny_tokenizer_dir, make_shards):
    ann, imgs = _dataset(tmp_path, 40, dup=[("3.jpg", "copy3.jpg"), ("5.jpg", "copy5.jpg")])
    # a second source pins a copy of image 7 to val: every copy of it must go to val
    (imgs / "pinned7.jpg").write_bytes((imgs / "7.jpg").read_bytes())
    (tmp_path / "b.jsonl").write_text(json.dumps({"image": "pinned7.jpg", "caption": "kiểm tra"}), encoding="utf-8")
    out = tmp_path / "out"
    run(make_shards, tiny_tokenizer_dir, out, f"coco-jsonl:{ann}:{imgs}",
        f"coco-jsonl:{tmp_path}/b.jsonl:{imgs},split=val,name=pinned", extra=["--val-fraction", "0.3", "--shard-size", "7"])
    man = json.loads((out / "manifest.json").read_text())
    assert man["merged_duplicate_images"] == 3
    assert man["counts"]["train"] + man["counts"]["val"] == 40
    assert 4 <= man["counts"]["val"] <= 24
    by_split = {"train": set(), "val": set()}
    for t in out.glob("*.tar"):
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".jpg"):
                    by_split[t.name.split("-")[0]].add(hashlib.sha256(tf.extractfile(m).read()).hexdigest())
    assert not by_split["train"] & by_split["val"]
    metas = [json.loads(s["json"]) for s in read_all(out).values()]
    # paths relative to the source's image folder (shards travel; machine paths do not)
    assert all(not p.startswith("/") for m in metas for p in m["path"])
    m3 = [m for m in metas if "3.jpg" in m["path"]][0]
    assert sorted(p.split("/")[-1] for p in m3["path"]) == ["3.jpg", "copy3.jpg"]
    assert "bản sao" in m3["captions"] and len(m3["captions"]) == 4
    m7 = [m for m in metas if "7.jpg" in m["path"]][0]
    assert m7["split"] == "val" and "pinned" in m7["source"]
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == 40 and max(sizes.values()) <= 7


def test_byte_identical_rerun_and_resume(tmp_path, tiny_tokenizer_dir, make_shards):
    ann, imgs = _dataset(tmp_path, 30)
    a, b = tmp_path / "a", tmp_path / "b"
    extra = ["--shard-size", "8", "--val-fraction", "0.2"]
    run(make_shards, tiny_tokenizer_dir, a, f"coco-jsonl:{ann}:{imgs}", extra=extra)
    run(make_shards, tiny_tokenizer_dir, b, f"coco-jsonl:{ann}:{imgs}", extra=extra + ["--workers", "2"])
    names = sorted(p.name for p in a.glob("*.tar"))
    assert names == sorted(p.name for p in b.glob("*.tar")) and len(names) >= 4
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    # interrupted job: one shard missing, another left as a half-written temp file
    victim = a / names[1]
    victim.unlink()
    (a / (names[2] + ".tmp123")).write_bytes(b"partial")
    mtimes = {n: (a / n).stat().st_mtime_ns for n in names if n != names[1]}
    run(make_shards, tiny_tokenizer_dir, a, f"coco-jsonl:{ann}:{imgs}", extra=extra)
    assert (a / names[1]).read_bytes() == (b / names[1]).read_bytes()
    for n, t in mtimes.items():  # complete shards were skipped, not rewritten
        assert (a / n).stat().st_mtime_ns == t
    # a different job into the same folder is refused
    assert "different job" in refusal(lambda: run(make_shards, tiny_tokenizer_dir, a, f"coco-jsonl:{ann}:{imgs}",
                                                   extra=["--shard-size", "5"]))


def test_shards_read_back_with_plain_webdataset(tmp_path, tiny_tokenizer_dir, make_shards):
    import webdataset as wds
    from phoclip.data.text import load_tokenizer

    ann, imgs = _dataset(tmp_path, 10)
    out = tmp_path / "o"
    run(make_shards, tiny_tokenizer_dir, out, f"coco-jsonl:{ann}:{imgs}", extra=["--val-fraction", "0"])
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    man = json.loads((out / "manifest.json").read_text())
    assert man["tokenizer"]["pad_id"] == tok.pad_token_id == 1 and man["tokenizer"]["max_length"] == 16
    n = 0
    for s in wds.WebDataset([str(p) for p in shards_of(out, "train")], shardshuffle=False):
        meta = json.loads(s["json"])
        ids = np.load(io.BytesIO(s["ids.npy"]), allow_pickle=False)
        assert ids.dtype == np.int32 and ids.shape == (len(meta["captions"]), 16)
        expect = tok(meta["captions_segmented"], max_length=16, truncation=True, padding="max_length")["input_ids"]
        assert ids.tolist() == expect
        im = Image.open(io.BytesIO(s["jpg"]))
        assert im.format == "JPEG" and min(im.size) == 32
        src = Image.open(imgs / meta["path"][0])  # relative to the source's image folder
        assert abs(im.size[0] / im.size[1] - src.size[0] / src.size[1]) < 0.05
        n += 1
    assert n == 10
    # the CLI really runs as a script
    r = subprocess.run([sys.executable, str(ROOT / "sharding/make_shards.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--source" in r.stdout


def test_parts_then_merge_equal_one_job(tmp_path, tiny_tokenizer_dir, make_shards):
    """--num-parts 2 --part 0/1 then --merge == one job: the same samples (keys, split,
    token ids, captions, merged sources), with duplicates placed in both parts' inputs
    still merged (identical images go to one part by content hash) and a broken image
    counted once."""
    ann, imgs = _dataset(tmp_path, 40, dup=[("3.jpg", "copy3.jpg"), ("5.jpg", "copy5.jpg")])
    (imgs / "pinned7.jpg").write_bytes((imgs / "7.jpg").read_bytes())
    (imgs / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "b.jsonl").write_text("\n".join([
        json.dumps({"image": "pinned7.jpg", "caption": "kiểm tra"}),
        json.dumps({"image": "copy3.jpg", "caption": "một bản sao khác"}, ensure_ascii=False),
        json.dumps({"image": "broken.jpg", "caption": "hỏng"}, ensure_ascii=False)]), encoding="utf-8")
    sources = [f"coco-jsonl:{ann}:{imgs}", f"coco-jsonl:{tmp_path}/b.jsonl:{imgs},split=val,name=pinned"]
    extra = ["--val-fraction", "0.3", "--shard-size", "6"]
    one, parted = tmp_path / "one", tmp_path / "parted"
    run(make_shards, tiny_tokenizer_dir, one, *sources, extra=extra)
    for i in (1, 0):  # any order, any machine
        run(make_shards, tiny_tokenizer_dir, parted, *sources, extra=extra + ["--num-parts", "2", "--part", str(i)])
    assert not (parted / "manifest.json").exists()
    assert make_shards(["--merge", parted]) == 0

    def content(out):
        got = {}
        for t in sorted(out.glob("*.tar")):
            with tarfile.open(t) as tf:
                files = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
            for name, data in files.items():
                if name.endswith(".json"):
                    key = name[:-5]
                    meta = json.loads(data)
                    got[key] = (t.name.split("-")[0], files[key + ".ids.npy"], sorted(meta["source"]),
                                sorted(meta["captions"]), hashlib.sha256(files[key + ".jpg"]).hexdigest())
        return got

    a, b = content(one), content(parted)
    assert len(a) == 40 and a == b
    per_part = [json.loads((parted / f"part-{i:04d}" / "manifest.json").read_text())["counts"] for i in (0, 1)]
    assert all(c["train"] + c["val"] > 0 for c in per_part)  # both parts did work
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, parted))
    for key in ("counts", "captions", "sources", "skipped", "merged_duplicate_images", "tokenizer", "segmenter"):
        assert m1[key] == m2[key], key
    assert m1["skipped"].get("not_an_image", 0) + m1["skipped"].get("corrupt", 0) == 1
    from phoclip.data.manifest import Manifest

    merged = Manifest.read(parted / "manifest.json")  # the merge writes a manifest every reader takes
    assert merged.part is None and merged.merged_from == {"parts": 2} and merged.shards == m2["shards"]
    assert Manifest.read(one / "manifest.json").part.of == 1
    sizes = json.loads((parted / "sizes.json").read_text())
    assert sorted(sizes) == sorted(p.name for p in parted.glob("*.tar"))
    assert sum(sizes.values()) == 40
    # a missing part is refused, not merged into a short dataset
    import shutil

    shutil.rmtree(parted / "part-0001")
    assert "expected parts 0..1" in refusal(make_shards, ["--merge", parted])


# ----------------------------------------------------------------------------- web-scale sources

def _img_bytes(seed, size, fmt="JPEG"):
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").save(buf, format=fmt)
    return buf.getvalue()


def _img2dataset_tars(d: Path):
    """Two tars as img2dataset writes them (KEY.jpg + KEY.txt + KEY.json with url, key,
    caption, status), with a failed download, a PNG, a byte-identical duplicate across
    the tars and an image larger than the shard size."""
    d.mkdir(parents=True)
    rng = random.Random(5)
    small = [_img_bytes(i, (30, 24)) for i in range(7)]
    samples = [[], []]
    for i in range(7):
        key = f"{i:09d}"
        cap = random_caption(rng)
        samples[0].append({"__key__": key, "jpg": small[i], "txt": cap.encode(),
                           "json": json.dumps({"url": f"https://example.vn/{i}.jpg", "key": key, "caption": cap,
                                               "status": "success"}, ensure_ascii=False).encode()})
    samples[0].append({"__key__": "000000007", "json": json.dumps({"url": "https://example.vn/gone.jpg",
                       "key": "000000007", "status": "failed_to_download"}).encode()})
    samples[1].append({"__key__": "000010000", "png": _img_bytes(50, (40, 30), "PNG"),
                       "json": json.dumps({"url": "https://example.vn/p.png", "caption": "một hình vuông màu đỏ",
                                           "status": "success"}, ensure_ascii=False).encode()})
    samples[1].append({"__key__": "000010001", "jpg": small[2], "txt": "bản sao của ảnh hai".encode()})
    samples[1].append({"__key__": "000010002", "jpg": _img_bytes(51, (120, 90)), "txt": "ảnh lớn".encode()})
    for i, ss in enumerate(samples):
        with tarfile.open(d / f"{i:05d}.tar", "w") as tf:
            for smp in ss:
                for ext, data in smp.items():
                    if ext == "__key__":
                        continue
                    ti = tarfile.TarInfo(f"{smp['__key__']}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
    return small


@pytest.mark.parametrize("remote", [False, True])
def test_img2dataset_tars_resharded(tmp_path, tiny_tokenizer_dir, make_shards, remote):
    """--source wds:PATTERN re-shards img2dataset output (local, or through a pipe:
    command as for object storage): captions from .txt/.json, the original key and URL
    recorded, failed downloads counted, duplicates merged, small JPEGs kept byte for
    byte (no second encode), larger images resized."""
    small = _img2dataset_tars(tmp_path / "i2d")
    pattern = (f"pipe:cat {tmp_path}/i2d/{{00000..00001}}.tar" if remote else f"{tmp_path}/i2d/{{00000..00001}}.tar")
    out = tmp_path / "out"
    assert run(make_shards, tiny_tokenizer_dir, out, f"wds:{pattern},name=laion-vi",
               extra=["--val-fraction", "0", "--image-size", "64"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["counts"]["train"] == 9  # 7 + png + large; the duplicate merged
    assert man["merged_duplicate_images"] == 1
    assert man["skipped"]["failed_download"] == 1
    got = read_all(out)
    metas = {json.loads(v["json"])["origin"][0]["key"]: (json.loads(v["json"]), v) for v in got.values()}
    m2, v2 = metas["000000002"]
    assert sorted(o["key"] for o in m2["origin"]) == ["000000002", "000010001"]
    assert "https://example.vn/2.jpg" in [o.get("url") for o in m2["origin"]]
    assert len(m2["captions"]) == 2 and "bản sao của ảnh hai" in m2["captions"]
    assert v2["jpg"] == small[2]  # kept as it came
    big = next(v for m, v in metas.values() if "ảnh lớn" in m["captions"])
    assert Image.open(io.BytesIO(big["jpg"])).size == (85, 64)  # shorter side 64
    png = next(m for m, v in metas.values() if "một hình vuông màu đỏ" in m["captions"])
    assert png["origin"][0]["url"] == "https://example.vn/p.png"


def test_parts_cache_only_their_own_inline_images(tmp_path, tiny_tokenizer_dir, make_shards):
    """With --num-parts, an image held inside a wds tar is hashed as it is read and only
    the part that owns it caches it (each image cached once over all parts, not once per
    part); the merged parts hold the single job's samples, counts and skips."""
    _img2dataset_tars(tmp_path / "i2d")
    src = f"wds:{tmp_path}/i2d/{{00000..00001}}.tar,name=laion-vi"
    extra = ["--val-fraction", "0.3", "--image-size", "64"]
    one, parted = tmp_path / "one", tmp_path / "parted"
    run(make_shards, tiny_tokenizer_dir, one, src, extra=extra)
    for i in (0, 1):
        run(make_shards, tiny_tokenizer_dir, parted, src, extra=extra + ["--num-parts", "2", "--part", str(i)])
    make_shards(["--merge", parted])

    def cached(d):
        return len([p for p in (d / ".sources").rglob("*") if p.is_file()])

    per_part = [cached(parted / f"part-{i:04d}") for i in (0, 1)]
    assert cached(one) == 10 and sum(per_part) == 10 and all(per_part)  # 10 images inside the tars
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, parted))
    for key in ("counts", "captions", "sources", "skipped", "merged_duplicate_images"):
        assert m1[key] == m2[key], key
    assert sorted(read_all(one)) == sorted(read_all(parted))


@pytest.mark.slow
def test_real_img2dataset_output_resharded(tmp_path, tiny_tokenizer_dir, make_shards):
    """img2dataset itself downloads a URL list from `python -m http.server` on 127.0.0.1
    (images of several sizes, a broken file, a 404) into WebDataset tars, and
    `--source wds:` re-shards them: one sample per downloaded image, its caption, key and
    URL recorded, img2dataset's resized JPEG kept byte for byte."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    www = tmp_path / "www"
    rng = random.Random(5)
    rows = []
    for i in range(6):
        make_image(www / f"{i}.jpg", i, size=(90 + 20 * i, 70 + 7 * i))
        rows.append((f"{i}.jpg", random_caption(rng) + f" số {i}"))
    (www / "broken.jpg").write_bytes(b"not an image at all")
    rows += [("broken.jpg", "ảnh hỏng"), ("missing.jpg", "ảnh không có")]
    with static_server(www) as base:
        urls = [f"{base}/{name}" for name, _ in rows]
        pq.write_table(pa.table({"url": urls, "caption": [c for _, c in rows]}), tmp_path / "urls.parquet")
        i2d = Path(sys.executable).with_name("img2dataset")
        subprocess.run([str(i2d), "--url_list", str(tmp_path / "urls.parquet"), "--input_format", "parquet",
                        "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
                        "--output_folder", str(tmp_path / "i2d"), "--image_size", "64", "--resize_mode", "keep_ratio",
                        "--processes_count", "1", "--thread_count", "4", "--enable_wandb", "False"],
                       check=True, timeout=300, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tars = sorted((tmp_path / "i2d").glob("*.tar"))
    assert len(tars) == 1
    out = tmp_path / "out"
    run(make_shards, tiny_tokenizer_dir, out, f"wds:{tars[0]},name=web",
        extra=["--val-fraction", "0", "--image-size", "64"])
    man = json.loads((out / "manifest.json").read_text())
    assert man["counts"]["train"] == 6 and man["sources"] == {"web": {"train": 6, "val": 0}}
    with tarfile.open(tars[0]) as tf:
        i2d_jpgs = {m.name.split(".")[0]: tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")}
    by_url = {}
    for v in read_all(out).values():
        meta = json.loads(v["json"])
        (origin,) = meta["origin"]
        by_url[origin["url"]] = meta
        assert v["jpg"] == i2d_jpgs[origin["key"]]  # img2dataset's JPEG, not encoded again
        assert min(meta["width"], meta["height"]) == 64
    assert sorted(by_url) == sorted(urls[:6])
    for (name, cap), url in zip(rows[:6], urls):
        assert by_url[url]["captions"] == [unicodedata.normalize("NFC", cap)]


def test_parquet_with_image_bytes_or_paths(tmp_path, tiny_tokenizer_dir, make_shards):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(2)
    caps = [random_caption(rng) for _ in range(6)]
    # Hugging Face datasets' image struct, and plain binary with a list of captions
    pq.write_table(pa.table({"image": [{"bytes": _img_bytes(i, (30, 24)), "path": None} for i in range(3)],
                             "text": caps[:3]}), tmp_path / "bytes.parquet")
    pq.write_table(pa.table({"image": [_img_bytes(9, (30, 24))], "text": [[caps[3], caps[4]]]}),
                   tmp_path / "raw.parquet")
    for i in range(2):
        make_image(tmp_path / "imgs" / f"{i}.jpg", 100 + i)
    pq.write_table(pa.table({"file": ["0.jpg", "1.jpg", "../escape.jpg"], "caption": caps[3:6]}),
                   tmp_path / "paths.parquet")
    out = tmp_path / "out"
    assert run(make_shards, tiny_tokenizer_dir, out, f"parquet:{tmp_path}/bytes.parquet,caption_field=text",
               f"parquet:{tmp_path}/raw.parquet,caption_field=text",
               f"parquet:{tmp_path}/paths.parquet:{tmp_path}/imgs,image_field=file",
               extra=["--val-fraction", "0"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["counts"]["train"] == 6 and man["captions"]["train"] == 7
    assert man["skipped"]["outside_image_folder"] == 1
    assert "no column 'caption'" in refusal(run, make_shards, tiny_tokenizer_dir, tmp_path / "out2",
                                            f"parquet:{tmp_path}/bytes.parquet")


def test_resume_does_only_the_remaining_work(tmp_path, tiny_tokenizer_dir, make_shards, monkeypatch):
    """A resumed job re-hashes no unchanged image (the hash journal) and segments only
    the captions of the shards it still writes (text runs in the shard workers); a
    changed image is hashed again."""
    import phoclip_sharding.writer as writer

    ann, imgs = _dataset(tmp_path, 24)
    out = tmp_path / "out"
    extra = ["--shard-size", "6", "--val-fraction", "0"]
    run(make_shards, tiny_tokenizer_dir, out, f"coco-jsonl:{ann}:{imgs}", extra=extra)
    names = sorted(p.name for p in out.glob("*.tar"))
    ref = (out / names[1]).read_bytes()
    (out / names[1]).unlink()
    hashed, segmented = [], []
    real_check, real_prep = writer.check_image, writer._prepare_text
    monkeypatch.setattr(writer, "check_image", lambda p, **k: hashed.append(p) or real_check(p, **k))
    monkeypatch.setattr(writer, "_prepare_text", lambda t: segmented.append(t.name) or real_prep(t))
    run(make_shards, tiny_tokenizer_dir, out, f"coco-jsonl:{ann}:{imgs}", extra=extra)
    assert hashed == [] and segmented == [names[1]]
    assert (out / names[1]).read_bytes() == ref
    img = imgs / "3.jpg"
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    run(make_shards, tiny_tokenizer_dir, out, f"coco-jsonl:{ann}:{imgs}", extra=extra)  # same bytes: same job
    assert hashed == [str(img)]
    # a damaged job store is only a cache: a warning, every image hashed again, same shards
    (out / ".job.sqlite").write_bytes(b"not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (out / (".job.sqlite" + suffix)).unlink(missing_ok=True)
    hashed.clear()
    run(make_shards, tiny_tokenizer_dir, out, f"coco-jsonl:{ann}:{imgs}", extra=extra)
    assert len(hashed) == 24 and (out / names[1]).read_bytes() == ref


def test_web_source_and_merge_refuse_damaged_input_in_one_line(tmp_path, tiny_tokenizer_dir, make_shards):
    assert "option 'junk' is not key=value" in refusal(run, make_shards, tiny_tokenizer_dir, tmp_path / "o",
                                                       f"wds:{tmp_path}/x.tar,name=a,junk")
    part = tmp_path / "m" / "part-0000"
    part.mkdir(parents=True)
    (part / "manifest.json").write_text("[1, 2]")
    assert "not a part manifest" in refusal(make_shards, ["--merge", tmp_path / "m"])


# ----------------------------------------------------------------------------- --out URL

@pytest.fixture
def s3(monkeypatch):
    """A real S3 endpoint on 127.0.0.1 (moto's server) with bucket `bkt`, configured for
    every process the test starts through the standard AWS variables."""
    import s3fs
    from moto.server import ThreadedMotoServer

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    for k, v in dict(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                     AWS_ENDPOINT_URL_S3=f"http://{host}:{port}", NO_PROXY="127.0.0.1").items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would talk to an earlier port
    fs = s3fs.S3FileSystem()
    fs.mkdir("bkt")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    srv.stop()


def test_out_url_uploads_shards_to_s3_and_resumes_from_the_bucket(tmp_path, tiny_tokenizer_dir, make_shards,
                                                                   s3, monkeypatch):
    """make_shards --out s3://...: the bucket gets the same shards, manifest and sizes as a
    local run; the library reads them back from there; a resumed job asks the bucket what
    is done (a shard lost, a shard whose .done record never arrived: both written again,
    nothing else), from any staging folder; a different job at the URL is refused."""
    import phoclip_sharding.writer as writer
    from phoclip.data.catalog import count_samples, manifest_for
    from phoclip.data.tar import read_shards

    ann, imgs = _dataset(tmp_path, 24)
    src = f"coco-jsonl:{ann}:{imgs}"
    extra = ["--shard-size", "6", "--val-fraction", "0.2"]
    local = tmp_path / "local"
    run(make_shards, tiny_tokenizer_dir, local, src, extra=extra)
    run(make_shards, tiny_tokenizer_dir, "s3://bkt/vi", src,
        extra=extra + ["--workers", "2", "--staging", str(tmp_path / "stage")])
    names = sorted(p.name for p in local.glob("*.tar"))
    assert sorted(p.rsplit("/", 1)[-1] for p in s3.glob("bkt/vi/*.tar")) == names and len(names) >= 4
    for n in names:
        assert s3.cat_file(f"bkt/vi/{n}") == (local / n).read_bytes(), n
    assert json.loads(s3.cat_file("bkt/vi/sizes.json")) == json.loads((local / "sizes.json").read_text())
    man = json.loads(s3.cat_file("bkt/vi/manifest.json"))
    assert man["counts"] == json.loads((local / "manifest.json").read_text())["counts"]
    assert not list((tmp_path / "stage").glob("*.tar"))  # uploaded shards leave the staging folder
    assert not s3.glob("bkt/vi/*.tmp*")

    # the bucket reads back as training and evaluation read it
    urls = [f"s3://bkt/vi/{n}" for n in names]
    assert manifest_for(urls[0]).counts == man["counts"]
    assert count_samples(urls) == sum(man["counts"].values())
    skips = Counter()
    keys = sorted(s["__key__"] for s in read_shards(({"url": u} for u in urls), skips))
    assert keys == sorted(read_all(local)) and not skips

    # resume: one shard lost, one without its .done record (died between the uploads)
    s3.rm(f"bkt/vi/{names[1]}")
    s3.rm(f"bkt/vi/.done/{names[2]}.json")
    segmented = []
    real_prep = writer._prepare_text
    monkeypatch.setattr(writer, "_prepare_text", lambda t: segmented.append(t.name) or real_prep(t))
    run(make_shards, tiny_tokenizer_dir, "s3://bkt/vi", src, extra=extra + ["--staging", str(tmp_path / "stage")])
    assert sorted(segmented) == [names[1], names[2]]
    for n in names:
        assert s3.cat_file(f"bkt/vi/{n}") == (local / n).read_bytes(), n
    # another machine (another staging folder) finds everything done in the bucket
    segmented.clear()
    run(make_shards, tiny_tokenizer_dir, "s3://bkt/vi/", src, extra=extra + ["--staging", str(tmp_path / "other")])
    assert segmented == []
    assert "different job" in refusal(lambda: run(make_shards, tiny_tokenizer_dir, "s3://bkt/vi", src,
                                                   extra=["--shard-size", "5", "--staging", str(tmp_path / "stage")]))

    # parts on two machines straight into the bucket, merged there: the local job's samples
    for i in (0, 1):
        run(make_shards, tiny_tokenizer_dir, "s3://bkt/parts", src,
            extra=extra + ["--num-parts", "2", "--part", str(i), "--staging", str(tmp_path / f"p{i}")])
    make_shards(["--merge", "s3://bkt/parts"])
    merged = json.loads(s3.cat_file("bkt/parts/manifest.json"))
    assert merged["counts"] == man["counts"] and merged["captions"] == man["captions"]
    sizes = json.loads(s3.cat_file("bkt/parts/sizes.json"))
    assert sorted(sizes) == sorted(p.rsplit("/", 1)[-1] for p in s3.glob("bkt/parts/*.tar"))
    keys = sorted(s["__key__"] for s in read_shards(({"url": f"s3://bkt/parts/{n}"} for n in sizes), skips))
    assert keys == sorted(read_all(local))


def test_out_file_url_renames_into_place(tmp_path, tiny_tokenizer_dir, make_shards):
    """A URL with a rename (file://): each shard is uploaded under a temporary name and
    renamed; the result is the local run's, and no temporary name is left."""
    ann, imgs = _dataset(tmp_path, 12)
    src = f"coco-jsonl:{ann}:{imgs}"
    run(make_shards, tiny_tokenizer_dir, tmp_path / "local", src, extra=["--shard-size", "5"])
    run(make_shards, tiny_tokenizer_dir, f"file://{tmp_path}/remote", src,
        extra=["--shard-size", "5", "--staging", str(tmp_path / "stage")])
    names = sorted(p.name for p in (tmp_path / "local").glob("*.tar"))
    assert names == sorted(p.name for p in (tmp_path / "remote").glob("*.tar"))
    for n in names:
        assert (tmp_path / "remote" / n).read_bytes() == (tmp_path / "local" / n).read_bytes()
    assert not [p for p in (tmp_path / "remote").rglob("*") if ".tmp" in p.name]
    assert sorted(p.name for p in (tmp_path / "remote" / ".done").iterdir()) == [n + ".json" for n in names]


def test_a_second_job_on_the_same_folder_is_refused(tmp_path, tiny_tokenizer_dir, make_shards):
    """Two jobs writing one output folder would interleave shards: the second is refused
    in one line while the first holds the folder's lock."""
    from phoclip_sharding.store import lock_folder

    ann, imgs = _dataset(tmp_path, 4)
    out = tmp_path / "out"
    out.mkdir()
    held = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                             "from phoclip_sharding.store import lock_folder; f = lock_folder(sys.argv[2]); "
                             "print('locked', flush=True); time.sleep(60)", str(ROOT), str(out)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline().strip() == "locked"
        line = refusal(run, make_shards, tiny_tokenizer_dir, out, f"coco-jsonl:{ann}:{imgs}")
        assert re.search("another job is writing to .*pid", line), line
    finally:
        held.kill()
        held.wait()
    lock_folder(out).release()  # a dead holder's lock is taken over
    run(make_shards, tiny_tokenizer_dir, out, f"coco-jsonl:{ann}:{imgs}")
    assert (out / "manifest.json").is_file()


def test_small_store_batches_and_pages_give_the_same_shards(tmp_path, tiny_tokenizer_dir, make_shards, monkeypatch):
    """The job streams through its store in batches (records, samples) and pages (image
    paths to hash): cutting them tiny changes nothing in the output, duplicates included."""
    import phoclip_sharding.collect as ms

    ann, imgs = _dataset(tmp_path, 30, dup=[("3.jpg", "copy3.jpg"), ("8.jpg", "copy8.jpg")])
    extra = ["--shard-size", "7", "--val-fraction", "0.2"]
    run(make_shards, tiny_tokenizer_dir, tmp_path / "a", f"coco-jsonl:{ann}:{imgs}", extra=extra)
    monkeypatch.setattr(ms, "RECORD_BATCH", 4)
    monkeypatch.setattr(ms, "HASH_PAGE", 5)
    run(make_shards, tiny_tokenizer_dir, tmp_path / "b", f"coco-jsonl:{ann}:{imgs}", extra=extra)
    names = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert names == sorted(p.name for p in (tmp_path / "b").glob("*.tar")) and len(names) >= 4
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    for f in ("manifest.json", "sizes.json"):
        assert (tmp_path / "a" / f).read_text() == (tmp_path / "b" / f).read_text()
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["merged_duplicate_images"] == 2
