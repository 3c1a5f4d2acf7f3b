"""An index in parts (clip-retrieval's layout): one part per rank or per job with nothing
gathered, resume after a kill, --merge, --add (a new version, a failed add leaves the old
one), --embeddings from another tool's folder, bad parts refused in one line, and the
approximate index's recall against exact search."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_image, run_torchrun
from test_serve_hostile import _tiny_model_folder


@pytest.fixture(scope="module")
def env(tiny_tokenizer_dir, tmp_path_factory):
    """A tiny model (64-wide) and a folder of 12 photos; the one-process index of them."""
    d = tmp_path_factory.mktemp("parts")
    _tiny_model_folder(tiny_tokenizer_dir, d / "model")
    for i in range(12):
        make_image(d / "photos" / ("a" if i % 2 else "b") / f"p{i:02d}.jpg", i)
    assert _index(["--model", d / "model", "--images", d / "photos", "--out", d / "one"]) == 0
    return d


def _index(args) -> int:
    from phoclip_cli import build_index

    return build_index.main([str(a) for a in args])


def _top(folder, k=5):
    from phoclip.search.index import EmbeddingIndex

    ix = EmbeddingIndex(folder)
    q = torch.from_numpy(ix.vectors("images", [0, 3, 7]))
    return [[(m.item["path"], round(m.score, 4)) for m in r] for r in ix.search(q, k)]


def _paths_topk(folder, q, k=5):
    from phoclip.search.index import EmbeddingIndex

    ix = EmbeddingIndex(folder)
    return [[(m.item["path"], round(m.score, 3)) for m in r] for r in ix.search(q, k)]


def test_one_process_writes_clip_retrieval_layout(env):
    from phoclip.search.index import EmbeddingIndex

    one = env / "one"
    assert (one / "img_emb" / "img_emb_0000.npy").is_file() and (one / "metadata" / "metadata_0000.parquet").is_file()
    a = np.load(one / "img_emb" / "img_emb_0000.npy", mmap_mode="r")
    assert a.dtype == np.float16 and a.shape == (12, 64)
    np.testing.assert_allclose(np.linalg.norm(a.astype(np.float32), axis=1), 1, atol=2e-3)
    import pyarrow.parquet as pq

    t = pq.read_table(one / "metadata" / "metadata_0000.parquet").to_pylist()
    assert len(t) == 12 and {"image_path", "caption", "url"} <= set(t[0]) and t[0]["image_path"].startswith("../photos/")
    ix = EmbeddingIndex(one)
    assert ix.count("images") == 12 and ix.version and ix.search_info()["type"] == "exact"
    res = ix.search(torch.from_numpy(ix.vectors("images", [5])), 3)[0]
    assert res[0].id == 5 and Path(res[0].item["path"]).is_file()


def test_parts_as_jobs_resume_and_merge_answer_as_one_process(env, tmp_path, capsys):
    out = tmp_path / "jobs"
    base = ["--model", env / "model", "--images", env / "photos", "--out", out]
    assert _index([*base, "--part", "1", "--of", "3"]) == 0
    f1 = out / "img_emb" / "img_emb_0001.npy"
    t1 = f1.stat().st_mtime_ns
    assert _index([*base, "--part", "0", "--of", "3"]) == 0
    # a merge before every part is written is refused, naming the missing part
    assert _index(["--model", env / "model", "--out", out, "--merge"]) == 2
    assert "part 0002" in capsys.readouterr().err
    # a killed job leaves temporary files only: the part is not complete, and is written again
    (out / "metadata" / "metadata_0002.parquet").parent.mkdir(exist_ok=True)
    (out / "img_emb" / ".img_emb_0002.npy.deadbeef.tmp").write_bytes(b"half")
    assert _index([*base, "--part", "2", "--of", "3"]) == 0
    # resumed: part 1 is complete and not computed again
    capsys.readouterr()
    assert _index([*base, "--part", "1", "--of", "3"]) == 0
    assert "complete: skipped" in capsys.readouterr().out and f1.stat().st_mtime_ns == t1
    assert _index(["--model", env / "model", "--out", out, "--merge"]) == 0
    assert "indexed 12 images" in capsys.readouterr().out
    q = torch.from_numpy(np.load(env / "one" / "img_emb" / "img_emb_0000.npy").astype(np.float32)[[0, 3, 7]])
    assert _paths_topk(out, q) == _paths_topk(env / "one", q)


def test_two_ranks_write_two_parts_with_nothing_gathered(env, tmp_path):
    out = tmp_path / "ranks"
    r = run_torchrun(2, "launch/build_index.py", ["--model", env / "model", "--images", env / "photos", "--out", out,
                                                  "--device", "cpu"], timeout=400)
    assert "indexed 12 images" in r.stdout, r.stdout + r.stderr[-3000:]
    meta = json.loads((out / "index.json").read_text())
    assert [p["name"] for p in meta["parts"]] == ["0000", "0001"] and [p["rows"] for p in meta["parts"]] == [6, 6]
    q = torch.from_numpy(np.load(env / "one" / "img_emb" / "img_emb_0000.npy").astype(np.float32)[[0, 3, 7]])
    assert _paths_topk(out, q) == _paths_topk(env / "one", q)


def test_no_collective_carries_embeddings():
    src = Path("launch/phoclip_cli/build_index.py").read_text() + Path("phoclip/search/indexing.py").read_text()
    assert "all_gather" not in src and "gather_embeddings" not in src and "broadcast" not in src


def test_add_appends_a_version_and_a_reader_switches(env, tmp_path, capsys):
    from phoclip.search.index import EmbeddingIndex

    out = tmp_path / "idx"
    shutil.copytree(env / "one", out)
    reader = EmbeddingIndex(out)
    v1 = reader.version
    for i in range(5):
        make_image(tmp_path / "more" / f"n{i}.jpg", 100 + i)
    assert _index(["--model", env / "model", "--images", tmp_path / "more", "--out", out, "--add"]) == 0
    meta = json.loads((out / "index.json").read_text())
    assert [p["name"] for p in meta["parts"]] == ["0000", "0001"] and meta["count"]["images"] == 17
    assert reader.count("images") == 12 and reader.reload_if_changed() and reader.count("images") == 17
    assert reader.version != v1 and not reader.reload_if_changed()
    hit = reader.search(torch.from_numpy(reader.vectors("images", [14])), 1)[0][0]
    assert hit.id == 14 and hit.item["path"].endswith("n2.jpg")
    # a failed add (a part of another width) leaves the index as it was
    before = (out / "index.json").read_bytes()
    bad = tmp_path / "bad"
    _clip_retrieval_folder(bad, n=4, dim=32)
    assert _index(["--model", env / "model", "--embeddings", bad, "--out", out, "--add"]) == 2
    assert "32-wide" in capsys.readouterr().err
    assert (out / "index.json").read_bytes() == before and EmbeddingIndex(out).count("images") == 17


def _clip_retrieval_folder(d: Path, n: int, dim: int, parts: int = 2, seed: int = 0) -> np.ndarray:
    """What clip_inference writes: img_emb/text_emb float16 and metadata parquet per part."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    bounds = np.linspace(0, n, parts + 1).astype(int)
    for j in range(parts):
        s, e = bounds[j], bounds[j + 1]
        for sub in ("img_emb", "text_emb", "metadata"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        np.save(d / "img_emb" / f"img_emb_{j}.npy", x[s:e].astype(np.float16))
        np.save(d / "text_emb" / f"text_emb_{j}.npy", x[s:e].astype(np.float16))
        pq.write_table(pa.table({"image_path": [f"/data/img{i}.jpg" for i in range(s, e)],
                                 "caption": [f"ảnh số {i}" for i in range(s, e)],
                                 "url": [f"https://example.com/{i}.jpg" for i in range(s, e)]}),
                       d / "metadata" / f"metadata_{j}.parquet")
    return x


def test_an_add_of_images_alone_keeps_the_captions_index(env, tmp_path):
    """Images added without captions: the captions' approximate index is carried into the
    new version (linked), so it outlives the version it was built in and text search stays
    approximate, not exact over every caption."""
    from phoclip.search.index import EmbeddingIndex

    src = tmp_path / "clip_out"
    x = _clip_retrieval_folder(src, n=3000, dim=64)
    out = tmp_path / "idx"
    assert _index(["--model", env / "model", "--embeddings", src, "--out", out, "--exact-max-rows", "500"]) == 0
    first = json.loads((out / "index.json").read_text())
    assert first["search"]["captions"]["type"] == "faiss"
    for n in range(2):  # two adds: the version the captions' index was built in is removed
        more = tmp_path / f"more{n}"
        _clip_retrieval_folder(more, n=100, dim=64, parts=1, seed=n + 1)
        shutil.rmtree(more / "text_emb")
        assert _index(["--model", env / "model", "--embeddings", more, "--out", out, "--add",
                       "--exact-max-rows", "500"]) == 0
    meta = json.loads((out / "index.json").read_text())
    assert not (out / "versions" / first["version"]).exists()
    assert meta["count"] == {"images": 3200, "captions": 3000}
    assert meta["search"]["captions"] == first["search"]["captions"]
    ix = EmbeddingIndex(out)
    assert ix.search_info("captions")["type"] == "faiss"
    hit = ix.search(x[[2345]], 1, kind="captions", backend="ann")[0][0]
    assert hit.id == 2345 and hit.item["caption"] == "ảnh số 2345"


def test_embeddings_from_clip_retrieval_layout(env, tmp_path, capsys):
    from phoclip.search.index import EmbeddingIndex

    src = tmp_path / "clip_out"
    x = _clip_retrieval_folder(src, n=30, dim=64)
    out = tmp_path / "idx"
    assert _index(["--model", env / "model", "--embeddings", src, "--out", out]) == 0
    ix = EmbeddingIndex(out)
    assert ix.count("images") == 30 and ix.count("captions") == 30
    m = ix.search(x[[17]], 1)[0][0]
    assert m.id == 17 and m.item["url"] == "https://example.com/17.jpg" and m.item["caption"] == "ảnh số 17"
    c = ix.search(x[[4]], 1, kind="captions")[0][0]
    assert c.item == {"caption": "ảnh số 4", "image_key": "/data/img4.jpg", "image": 4}
    # the model is 64-wide: a 32-wide folder is refused in one line naming the part
    bad = tmp_path / "narrow"
    _clip_retrieval_folder(bad, n=4, dim=32)
    assert _index(["--model", env / "model", "--embeddings", bad, "--out", tmp_path / "idx2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "img_emb_0.npy: 32-wide embeddings, the index is 64-wide" in err[-1]


@pytest.mark.parametrize("damage", ["dtype", "width", "rows", "missing", "meta_count", "meta_parts", "header"])
def test_bad_parts_are_refused_in_one_line_naming_the_part(env, tmp_path, damage):
    from phoclip.search.index import EmbeddingIndex

    out = tmp_path / "idx"
    shutil.copytree(env / "one", out)
    f = out / "img_emb" / "img_emb_0000.npy"
    a = np.load(f)
    meta = json.loads((out / "index.json").read_text())
    want = "img_emb_0000.npy"
    if damage == "dtype":
        np.save(f, a.astype(np.float32))
        want += r".*float32"
    elif damage == "width":
        np.save(f, a[:, :32])
        want += ": 32-wide"
    elif damage == "rows":
        np.save(f, a[:10])
        want += ": 10 rows, but metadata metadata_0000.parquet has 12"
    elif damage == "missing":
        f.unlink()
        want = "img_emb_0000.npy"
    elif damage == "meta_count":
        meta["count"]["images"] = 13
        want = r"index\.json: the parts hold 12 images, count\.images says 13"
    elif damage == "meta_parts":
        meta["parts"][0]["name"] = "../../etc"
        want = r"index\.json: a part is not"
    elif damage == "header":
        f.write_bytes(b"\x93NUMPY\x01\x00\x20\x00{'descr': '<f2', 'shape': (((" + b" " * 20)
        want += r".*(header|shape)"
    (out / "index.json").write_text(json.dumps(meta))
    with pytest.raises((ValueError, FileNotFoundError), match=want) as e:
        EmbeddingIndex(out)
    assert "\n" not in str(e.value)


def test_nan_rows_are_skipped_and_counted(env, tmp_path):
    from phoclip.search.index import EmbeddingIndex

    out = tmp_path / "idx"
    shutil.copytree(env / "one", out)
    f = out / "img_emb" / "img_emb_0000.npy"
    a = np.load(f)
    q = a[[4]].astype(np.float32)
    a[4] = np.nan
    np.save(f, a)
    ix = EmbeddingIndex(out)
    assert ix.bad_ids("images").tolist() == [4]
    res = ix.search(q, 12)[0]
    assert len(res) == 11 and 4 not in [m.id for m in res] and all(np.isfinite(m.score) for m in res)


def _synthetic(n, d, seed=0):
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(d)
    centres = rng.standard_normal((64, d)) + 2 * shared
    x = centres[rng.integers(0, 64, n)] + 0.8 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def ann_index(env, tmp_path_factory):
    """20k x 64 synthetic vectors in two unequal parts, merged into a faiss index."""
    src = tmp_path_factory.mktemp("ann") / "src"
    x = _synthetic(20_200, 64)[:20_000]  # the last 200: held-out queries
    import pyarrow as pa
    import pyarrow.parquet as pq

    for j, (s, e) in enumerate([(0, 7000), (7000, 20000)]):
        for sub in ("img_emb", "metadata"):
            (src / sub).mkdir(parents=True, exist_ok=True)
        np.save(src / "img_emb" / f"img_emb_{j}.npy", x[s:e].astype(np.float16))
        pq.write_table(pa.table({"image_path": [f"{i}.jpg" for i in range(s, e)]}), src / "metadata" / f"metadata_{j}.parquet")
    out = src.parent / "idx"
    assert _index(["--model", env / "model", "--embeddings", src, "--out", out, "--exact-max-rows", "1000"]) == 0
    return out, x


def test_ann_recall_against_exact(ann_index):
    from phoclip.search.index import EmbeddingIndex

    out, x = ann_index
    ix = EmbeddingIndex(out)
    info = ix.search_info()
    assert info["type"] == "faiss" and info["recall_at_10"] >= 0.95
    q = _synthetic(20_200, 64)[20_000:]
    s_a, i_a = ix.topk(q, 10)
    s_e, i_e = ix.topk(q, 10, backend="exact")
    rec = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(i_a, i_e)])
    assert rec >= 0.95, rec
    # global ids across unequal parts: a vector of the second part finds itself
    m = ix.search(x[[12345]], 1)[0][0]
    assert m.id == 12345 and ix.recorded("images", 12345)["path"] == "12345.jpg"


def test_a_crafted_faiss_file_or_index_json_is_refused(ann_index, tmp_path):
    from phoclip.search.index import EmbeddingIndex

    out = tmp_path / "idx"
    shutil.copytree(ann_index[0], out)
    meta = json.loads((out / "index.json").read_text())
    vdir = out / "versions" / meta["version"]
    f = vdir / meta["search"]["images"]["file"]
    data = bytearray(f.read_bytes())
    data[-200:] = b"\xff" * 200
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="images.index: not the file index.json records"):
        EmbeddingIndex(out).topk(np.ones((1, 64), np.float32) / 8, 3)
    meta["search"]["images"]["file"] = "../../../etc/passwd"
    (out / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="names no faiss files of its own"):
        EmbeddingIndex(out).topk(np.ones((1, 64), np.float32) / 8, 3)


def test_the_choice_follows_the_latency_target_and_the_memory_budget():
    """Exact search while one query's scan of the matrix fits the latency target (the
    measured rate) and the matrix fits the budget; faiss above; --exact at any size."""
    from phoclip.search import ann

    rows = ann.exact_max_rows_for(512, 4 << 30)
    assert rows == int(ann.LATENCY_TARGET_MS * ann.EXACT_ROW_DIMS_PER_MS / 512)
    assert ann.choose(rows - 1, 512, 4 << 30) == {"type": "exact"}
    assert ann.choose(rows, 512, 4 << 30)["type"] == "faiss"
    assert ann.choose(rows, 512, 4 << 30, max_query_ms=2 * ann.LATENCY_TARGET_MS) == {"type": "exact"}  # a looser target
    assert ann.choose(rows, 64, 4 << 30) == {"type": "exact"}  # narrower rows: more of them in the same time
    assert ann.exact_max_rows_for(512, 1 << 20) == (1 << 20) // (4 * 512)  # the float32 matrix within the budget
    assert ann.choose(10 * rows, 512, 4 << 30, exact=True) == {"type": "exact"}
    assert ann.choose(rows, 512, 4 << 30, exact_max_rows=rows + 1) == {"type": "exact"}


def test_one_publisher_at_a_time(env, tmp_path, capsys):
    """A merge, add or adoption while another is publishing into the same index (its
    OUT/.lock held by a live process) is refused in one line naming the holder, and the
    index it would have changed is untouched; the lock is released after a publish."""
    import json
    import os
    import subprocess
    import sys

    src = tmp_path / "clip_out"
    _clip_retrieval_folder(src, n=10, dim=64)
    out = tmp_path / "idx"
    assert _index(["--model", env / "model", "--embeddings", src, "--out", out]) == 0
    assert not (out / ".lock").exists()
    before = (out / "index.json").read_text()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid, "t": 0}))
        capsys.readouterr()
        assert _index(["--model", env / "model", "--embeddings", src, "--out", out, "--add"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert str(holder.pid) in err[-1] and len(err[-1]) < 400, err
        assert (out / "index.json").read_text() == before
    finally:
        holder.kill()
        holder.wait()
    assert _index(["--model", env / "model", "--embeddings", src, "--out", out, "--add"]) == 0  # a dead holder's lock
    assert (out / "index.json").read_text() != before and not (out / ".lock").exists()


def _parts_on_disk(folder: Path, blocks: list[np.ndarray]):
    """Float16 parts saved and memory-mapped as the merge opens them: [(global start, memmap)]."""
    from phoclip.search.parts import open_embeddings

    folder.mkdir(parents=True, exist_ok=True)
    arrays, start = [], 0
    for j, b in enumerate(blocks):
        np.save(folder / f"p{j}.npy", b.astype(np.float16))
        arrays.append((start, open_embeddings(folder / f"p{j}.npy", b.shape[1], len(b), f"part {j}")))
        start += len(b)
    return arrays


def test_ground_truth_is_exact_and_an_add_extends_it_from_the_new_rows(tmp_path, caplog):
    from phoclip.search import ann

    x = _synthetic(7000, 32)
    x[123] = np.nan  # a bad row: never an answer
    arrays = _parts_on_disk(tmp_path / "emb", [x[:2500], x[2500:5000], x[5000:]])
    q = _synthetic(7050, 32)[7000:]
    s, i = ann.exact_topk(arrays, q, 11, chunk=1000)
    x16 = np.nan_to_num(x.astype(np.float16).astype(np.float32), nan=-10.0)
    sc = q @ x16.T
    sc[:, 123] = -np.inf
    want = np.argsort(-sc, axis=1, kind="stable")[:, :11]
    assert (i == want).all() and np.allclose(s, np.take_along_axis(sc, want, 1), atol=1e-5)

    choice = {"type": "faiss", "key": "IVF64,SQ8", "nlist": 64, "code_bytes": 32, "rerank": False}
    v1 = tmp_path / "v1"
    first = ann.build(arrays[:2], choice, v1, "images")
    assert first["ntotal"] == 4999 and first["skipped"] == 1 and first["recall_at_10"] >= 0.95
    v2 = tmp_path / "v2"
    added = ann.build(arrays[2:], choice, v2, "images", trained=v1 / first["trained"], old_index=v1 / first["file"],
                      all_arrays=arrays, held_out=v1 / first["held_out"])
    assert added["ntotal"] == 6999
    # the add's held-out answers: the build's queries, answered exactly over all 7000 rows (the new ones scanned only)
    q1, qid1, _, _ = ann.read_held_out(v1 / first["held_out"], 32, 5000)
    q2, qid2, ids2, s2 = ann.read_held_out(v2 / added["held_out"], 32, 7000)
    assert (q1 == q2).all() and (qid1 == qid2).all()
    s_all, i_all = ann.exact_topk(arrays, q2, 11)
    assert (ids2 == i_all).all() and np.allclose(s2, s_all)
    assert (ids2 >= 5000).any()  # new rows do answer some of the old queries

    # a damaged held-out file: logged, and the add measures from scratch (never a crash or a wrong truth)
    (v1 / first["held_out"]).write_bytes(b"PK\x03\x04 not a zip")
    v3 = tmp_path / "v3"
    with caplog.at_level("WARNING"):
        again = ann.build(arrays[2:], choice, v3, "images", trained=v1 / first["trained"],
                          old_index=v1 / first["file"], all_arrays=arrays, held_out=v1 / first["held_out"])
    assert "recall measured from scratch" in caplog.text and again["recall_at_10"] >= 0.95


def test_rows_are_read_from_the_file_mapped_and_a_part_cut_short_is_refused(tmp_path):
    """A re-rank's scattered rows come by pread from the very file the part is mapped from
    (no pages mapped around them; a file replaced since is not read), equal to the mapped
    rows; a part truncated under a running service is a one-line ValueError, not a SIGBUS."""
    import os

    from phoclip.search.parts import open_embeddings, read_rows

    x = _synthetic(3000, 32).astype(np.float16)
    f = tmp_path / "p.npy"
    np.save(f, x)
    fh = open(f, "rb")
    a = open_embeddings(f, 32, 3000, "part p", fh)
    rows = [2999, 0, 1234, 1234]
    assert (read_rows(fh, a, rows) == x[rows].astype(np.float32)).all()
    np.save(tmp_path / "q.npy", x[::-1].copy())
    os.replace(tmp_path / "q.npy", f)  # replaced under the reader: it still reads what it mapped
    assert (read_rows(fh, a, [0]) == x[[0]].astype(np.float32)).all()
    fh2 = open(f, "rb")
    b = open_embeddings(f, 32, 3000, "part p", fh2)
    os.truncate(f, 128 + 1000 * 64)
    with pytest.raises(ValueError, match="p.npy: shorter than its header says"):
        read_rows(fh2, b, [2000], str(f))


def test_codes_too_coarse_for_the_recall_target_are_said_plainly(env, tmp_path, caplog, capsys):
    """Where no nprobe reaches recall 0.95 (a budget that leaves 4-byte codes for 64-d noise),
    the search for nprobe stops once doubling it no longer helps, and the build says so, in
    its log, its last line and index.json, with what to change."""
    src = tmp_path / "noise"
    _clip_retrieval_folder(src, n=2000, dim=64)
    shutil.rmtree(src / "text_emb")
    out = tmp_path / "idx"
    assert _index(["--model", env / "model", "--embeddings", src, "--out", out, "--exact-max-rows", "500",
                   "--max-index-memory", str(128 * 64 * 4 + 2000 * 12)]) == 0
    info = json.loads((out / "index.json").read_text())["search"]["images"]
    assert info["key"] == "IVF128,PQ4x8" and not info["recall_target_met"] and info["recall_at_10"] < 0.95
    said = capsys.readouterr()
    assert "too coarse for these vectors; raise --max-index-memory (SQ4 needs 0.1 MiB here)" in said.err + caplog.text
    assert "below the 0.95 target: raise --max-index-memory" in said.out


def test_nprobe_stops_growing_when_the_codes_limit_the_recall(tmp_path):
    from phoclip.search import ann

    arrays = _parts_on_disk(tmp_path / "emb", [_synthetic(6000, 32)])
    choice = {"type": "faiss", "key": "IVF64,PQ2x8", "nlist": 64, "code_bytes": 2, "rerank": False}
    info = ann.build(arrays, choice, tmp_path / "v", "images")
    assert not info["recall_target_met"] and info["nprobe"] < 64
