"""An index in parts handed to us by someone else: a faiss data file whose ids lie
outside the index, a version folder that is a link elsewhere, two --add jobs at once.
Each is refused in one line or skipped and counted; nothing outside the index folder is
written or removed, and nothing published is overwritten."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_serve_hostile import _tiny_model_folder

N, DIM = 3000, 64


def _index(args) -> int:
    from phoclip_cli import build_index

    return build_index.main([str(a) for a in args])


def _clip_folder(src: Path, x: np.ndarray, first: int = 0) -> Path:
    """`x` as one part of another tool's folder (clip-retrieval's layout)."""
    for sub in ("img_emb", "metadata"):
        (src / sub).mkdir(parents=True, exist_ok=True)
    np.save(src / "img_emb" / "img_emb_0.npy", x.astype(np.float16))
    pq.write_table(pa.table({"image_path": [f"{i}.jpg" for i in range(first, first + len(x))]}),
                   src / "metadata" / "metadata_0.parquet")
    return src


@pytest.fixture(scope="module")
def env(tiny_tokenizer_dir, tmp_path_factory):
    """A tiny 64-wide model and a faiss index (IVF) of N random unit vectors."""
    d = tmp_path_factory.mktemp("hostile_parts")
    _tiny_model_folder(tiny_tokenizer_dir, d / "model")
    x = np.random.default_rng(0).standard_normal((N, DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    _clip_folder(d / "src", x)
    assert _index(["--model", d / "model", "--embeddings", d / "src", "--out", d / "idx", "--exact-max-rows", "100"]) == 0
    return d, x


def test_faiss_ids_outside_the_index_are_dropped_not_looked_up(env, tmp_path, caplog):
    """The data file is checked for its size only: ids shifted past the index (a damaged
    or crafted file) are dropped with a warning, never an IndexError for the whole request."""
    import faiss

    from phoclip.search.index import EmbeddingIndex

    d, x = env
    out = tmp_path / "idx"
    shutil.copytree(d / "idx", out)
    meta = json.loads((out / "index.json").read_text())
    assert meta["search"]["images"]["type"] == "faiss"
    v = out / "versions" / meta["version"]
    index = faiss.read_index(str(v / "images.index"), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    il = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    data = np.fromfile(v / "images.ivfdata", dtype=np.uint8)
    for j in range(il.nlist):
        lst = il.lists.at(j)
        o = lst.offset + lst.capacity * il.code_size
        data[o:o + lst.size * 8].view(np.int64)[:] += 10 ** 12
    data.tofile(v / "images.ivfdata")
    del index
    ix = EmbeddingIndex(out)
    for rerank in (False, True):
        s, i = ix.topk(x[[5]], 3, rerank=rerank)
        assert i.numel() == 0 and s.numel() == 0
        assert ix.search(x[[5]], 3, rerank=rerank) == [[]]
    assert "ids outside the index's 3000 rows: dropped" in caplog.text


def test_a_versions_folder_that_is_a_link_is_refused_and_nothing_outside_is_touched(env, tmp_path, capsys):
    """--add into an index whose versions/ is a link to another index's versions: refused
    in one line; the other folder keeps its version and gets no new one."""
    import os

    from phoclip.search.index import EmbeddingIndex

    d, x = env
    out = tmp_path / "idx"
    shutil.copytree(d / "idx", out)
    version = json.loads((out / "index.json").read_text())["version"]
    other = tmp_path / "other_versions"
    (other / "0001-deadbeef").mkdir(parents=True)
    (other / "0001-deadbeef" / "images.index").write_text("another index's")
    shutil.rmtree(out / "versions")
    os.symlink(other, out / "versions")
    new = _clip_folder(tmp_path / "new", x[:10], first=N)
    assert _index(["--model", d / "model", "--embeddings", new, "--out", out, "--add"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"{out / 'versions'}: a link; refusing to write into it (remove it, or use another output folder)")
    assert sorted(p.name for p in other.iterdir()) == ["0001-deadbeef"]
    assert (other / "0001-deadbeef" / "images.index").read_text() == "another index's"
    os.unlink(out / "versions")
    shutil.copytree(d / "idx" / "versions", out / "versions")
    ix = EmbeddingIndex(out)  # the published index is as it was
    assert ix.version == version and ix.count("images") == N


def test_two_adds_at_once_never_replace_each_others_part(env, tmp_path, monkeypatch, capsys):
    """Job B chose its part number before job A published the same one: B's adoption is
    refused in one line and A's published part keeps A's pictures."""
    from phoclip.search import indexing as ix
    from phoclip.search.index import EmbeddingIndex

    d, x = env
    out = tmp_path / "idx"
    shutil.copytree(d / "idx", out)
    y = np.random.default_rng(1).standard_normal((20, DIM))
    y = (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)
    a = _clip_folder(tmp_path / "a", y[:10], first=N)
    b = _clip_folder(tmp_path / "b", y[10:], first=2 * N)
    real_check, ran = ix.check_part, []

    def a_publishes_first(*args, **kw):  # job A's whole --add runs while B is adopting
        if not ran:
            ran.append(1)
            assert _index(["--model", d / "model", "--embeddings", a, "--out", out, "--add"]) == 0
        return real_check(*args, **kw)

    monkeypatch.setattr(ix, "check_part", a_publishes_first)
    assert _index(["--model", d / "model", "--embeddings", b, "--out", out, "--add"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "metadata_0001.parquet: part 0001 was written by another job while this one ran" in err
    monkeypatch.undo()
    ix_ = EmbeddingIndex(out)
    assert ix_.count("images") == N + 10
    m = ix_.search(y[[3]], 1)[0][0]
    assert m.id == N + 3 and ix_.recorded("images", N + 3)["path"] == f"{N + 3}.jpg"


def test_a_part_written_by_another_job_meanwhile_is_not_replaced(tmp_path):
    from phoclip.search.parts import PartWriter, files_of

    row = {"image_path": "x.jpg"}
    one = np.eye(4, dtype=np.float16)[:1]
    slow = PartWriter(tmp_path, "0001", 4, captions=False)
    slow.add(one, [row])
    with PartWriter(tmp_path, "0001", 4, captions=False) as fast:
        fast.add(one, [dict(row, image_path="fast.jpg")])
        fast.close({"source": "fast"})
    with pytest.raises(ValueError, match="part 0001 was written by another job while this one ran") as e:
        with slow:
            slow.close({"source": "slow"})
    assert "\n" not in str(e.value)
    assert pq.read_table(files_of(tmp_path, "0001")["metadata"]).column("image_path").to_pylist() == ["fast.jpg"]
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_adopted_files_that_are_links_become_files_of_the_index(env, tmp_path):
    """A part of another tool's folder that is a (relative) link is taken as the file it
    names: the index holds that file, never a link that would name another file from
    inside the index folder."""
    import os

    from phoclip.search.index import EmbeddingIndex

    d, x = env
    src = _clip_folder(tmp_path / "tool" / "src", x[:20])
    f = src / "img_emb" / "img_emb_0.npy"
    os.replace(f, tmp_path / "tool" / "kept.npy")
    os.symlink("../../kept.npy", f)
    out = tmp_path / "idx"
    assert _index(["--model", d / "model", "--embeddings", src, "--out", out]) == 0
    got = out / "img_emb" / "img_emb_0000.npy"
    assert not got.is_symlink() and got.is_file()
    assert EmbeddingIndex(out).search(x[[7]], 1)[0][0].id == 7
