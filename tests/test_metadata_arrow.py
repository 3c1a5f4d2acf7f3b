"""An index's metadata read memory-mapped: each part's parquet has an uncompressed Arrow
copy beside it (written with the part and by every merge), a row is a zero-copy slice,
threads read at once and get their own rows; a copy that is missing, stale, not a
regular file or damaged costs speed (rows from the parquet), never a hang, a crash or a
wrong row; a damaged or oversized row is refused in one line naming the file."""
from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from test_hostile_index import _deadline
from test_index_parts import _clip_retrieval_folder, _index
from test_serve_hostile import _tiny_model_folder

N = 20_000  # rows over several Arrow record batches


def _part(folder: Path, n: int = N, captions: bool = True) -> Path:
    from phoclip.search import parts as P

    with P.PartWriter(folder, "0000", 8, captions) as w:
        for s in range(0, n, 5000):
            e = min(n, s + 5000)
            w.add(np.ones((e - s, 8), np.float16),
                  [{"image_path": f"{i}.jpg", "caption": f"ảnh số {i}", "url": f"https://e.com/{i}"} for i in range(s, e)],
                  np.ones((e - s, 8), np.float16) if captions else None,
                  [{"caption": f"chú thích {i}", "image_row": i, "image_key": f"k{i}"} for i in range(s, e)])
        w.close({"source": "test"})
    return P.files_of(folder, "0000")[P.META]


def test_a_part_is_written_with_its_arrow_copy_and_read_memory_mapped(tmp_path):
    from phoclip.search import metadata as M
    from phoclip.search import parts as P

    meta = _part(tmp_path)
    assert M.arrow_of(meta).is_file() and M.arrow_of(P.files_of(tmp_path, "0000")[P.TEXT_META]).is_file()
    rd = M.MetadataReader(meta)
    assert rd.memory_mapped
    want = pq.read_table(meta).to_pylist()
    for r in (0, 1, 8191, 8192, 12345, N - 1):
        assert rd.row(r) == want[r]
    assert rd.column("url") == [w["url"] for w in want] and rd.column("nope") == [None] * N
    with pytest.raises(IndexError):
        rd.row(N)
    assert M.ensure_arrow(meta) is False  # current: not written again
    tm = M.MetadataReader(P.files_of(tmp_path, "0000")[P.TEXT_META])
    assert tm.memory_mapped and tm.row(77) == {"caption": "chú thích 77", "image_row": 77, "image_key": "k77"}


@pytest.fixture(scope="module")
def served(tiny_tokenizer_dir, tmp_path_factory):
    """An index adopted from clip-retrieval's layout (two parts, no Arrow copies there):
    the merge writes them."""
    d = tmp_path_factory.mktemp("arrow_index")
    _tiny_model_folder(tiny_tokenizer_dir, d / "model")
    _clip_retrieval_folder(d / "clip_out", n=N, dim=64)
    assert not list((d / "clip_out" / "metadata").glob("*.arrow"))
    assert _index(["--model", d / "model", "--embeddings", d / "clip_out", "--out", d / "idx"]) == 0
    return d / "idx"


def _read_concurrently(folder: Path, threads: int = 4, per_thread: int = 400) -> list[str]:
    """Items read by `threads` threads at once, each its own random ids in batches of 10
    (as a search's results are); the mismatches found."""
    from phoclip.search.index import EmbeddingIndex

    ix = EmbeddingIndex(folder)
    wrong: list[str] = []
    start = threading.Barrier(threads)

    def read(seed: int) -> None:
        rng = random.Random(seed)
        start.wait()
        for _ in range(per_thread // 10):
            ids = [rng.randrange(N) for _ in range(10)]
            for i, it in zip(ids, ix.items_for("images", ids)):
                if it["url"] != f"https://example.com/{i}.jpg" or it["caption"] != f"ảnh số {i}":
                    wrong.append(f"{i}: {it}")
            for i, it in zip(ids, ix.items_for("captions", ids)):
                if it["caption"] != f"ảnh số {i}" or it["image"] != i:
                    wrong.append(f"caption {i}: {it}")

    ts = [threading.Thread(target=read, args=(s,), daemon=True) for s in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts), "a reader is still blocked after 60 s"
    return wrong


def test_the_merge_writes_arrow_copies_and_four_threads_get_the_right_rows(served):
    from phoclip.search import metadata as M

    metas = sorted((served / "metadata").glob("metadata_*.parquet"))
    assert len(metas) == 2 and all(M.MetadataReader(m).memory_mapped for m in metas)
    assert _read_concurrently(served) == []


def test_four_threads_get_the_right_rows_from_the_parquet_without_a_copy(served, tmp_path, caplog):
    import shutil

    from phoclip.search import metadata as M

    ix = tmp_path / "idx"
    shutil.copytree(served, ix)
    for f in (ix / "metadata").glob("*.arrow"):
        f.unlink()
    assert _read_concurrently(ix) == []
    # a merge writes them again (an add with no new part changes nothing else)
    from phoclip.search.indexing import arrow_copies

    assert arrow_copies(ix, json.loads((ix / "index.json").read_text())["parts"]) == 2
    assert all(M.MetadataReader(m).memory_mapped for m in (ix / "metadata").glob("*.parquet"))


@pytest.mark.parametrize("damage", ["fifo", "dev_zero", "garbage", "truncated", "stale", "directory", "other_rows"])
def test_a_bad_arrow_copy_falls_back_to_the_parquet_without_hanging(served, tmp_path, caplog, damage):
    import shutil

    from phoclip.search import metadata as M

    ix = tmp_path / "idx"
    shutil.copytree(served, ix)
    meta = sorted((ix / "metadata").glob("metadata_*.parquet"))[0]
    arrow = M.arrow_of(meta)
    good = arrow.read_bytes()
    arrow.unlink()
    if damage == "fifo":
        os.mkfifo(arrow)
    elif damage == "dev_zero":
        os.symlink("/dev/zero", arrow)
    elif damage == "garbage":
        arrow.write_bytes(b"ARROW1" + os.urandom(5000))
    elif damage == "truncated":
        arrow.write_bytes(good[: len(good) // 2])
    elif damage == "stale":  # the parquet rewritten since (another writer, other settings): same rows
        arrow.write_bytes(good)
        pq.write_table(pq.read_table(meta), meta, compression="gzip")
    elif damage == "directory":
        arrow.mkdir()
    elif damage == "other_rows":  # the parquet's own stamp on a file of other rows
        t = pq.read_table(meta)
        stamp = json.dumps({"parquet": M.parquet_stamp(meta), "rows": t.num_rows})
        t = t.slice(0, 100).replace_schema_metadata({M.ARROW_SOURCE: stamp})
        with ipc.new_file(str(arrow), t.schema) as w:
            w.write_table(t)
    with _deadline(20):
        rd = M.MetadataReader(meta)
        assert not rd.memory_mapped
        assert rd.row(4321)["url"] == "https://example.com/4321.jpg"
        assert _read_concurrently(ix, per_thread=100) == []
    if damage != "fifo" or os.path.lexists(arrow):
        assert arrow.name in caplog.text


def _crafted(tmp_path: Path, column: pa.Array) -> Path:
    """A parquet of one `url` column and an Arrow copy holding `column` instead, with the
    parquet's stamp (what a crafted copy would claim)."""
    from phoclip.search import metadata as M

    tmp_path.mkdir()
    meta = tmp_path / "metadata_0000.parquet"
    pq.write_table(pa.table({"url": ["x"] * len(column)}), meta)
    stamp = json.dumps({"parquet": M.parquet_stamp(meta), "rows": len(column)})
    schema = pa.schema([("url", column.type)], metadata={M.ARROW_SOURCE: stamp})
    with ipc.new_file(str(M.arrow_of(meta)), schema) as w:
        w.write_batch(pa.RecordBatch.from_arrays([column], schema=schema))
    return meta


def test_a_row_past_its_end_or_over_the_cap_is_refused_in_one_line(tmp_path):
    from phoclip.search import metadata as M

    # an offset in the middle pointing past the data buffer (the first and last, checked
    # at open, are right): its rows are refused, never read past the file's end
    meta = _crafted(tmp_path / "a", pa.array(["abc", "defghijk", "xy"]))
    arrow = M.arrow_of(meta)
    good = np.array([0, 3, 11, 13], dtype=np.int32).tobytes()
    data = arrow.read_bytes()
    assert data.count(good) == 1
    arrow.write_bytes(data.replace(good, np.array([0, 1 << 30, 11, 13], dtype=np.int32).tobytes()))
    rd = M.MetadataReader(meta)
    assert rd.memory_mapped and rd.row(2) == {"url": "xy"}
    for r in (0, 1):
        with pytest.raises(ValueError, match=rf"metadata_0000\.arrow: row {r} is damaged") as e:
            rd.row(r)
        assert "\n" not in str(e.value)
    # one cell of 10 kB under a 4 kB cap: refused before it becomes a Python string
    rd = M.MetadataReader(_crafted(tmp_path / "b", pa.array(["a" * 10_000, "b"])), max_group_bytes=4096)
    assert rd.row(1) == {"url": "b"}
    with pytest.raises(ValueError, match=r"metadata_0000\.arrow: row 0 is \d+ bytes, over the 4096-byte cap"):
        rd.row(0)


def test_record_batches_past_the_cap_are_refused_unread(tmp_path):
    from phoclip.search import metadata as M

    meta = tmp_path / "metadata_0000.parquet"
    pq.write_table(pa.table({"url": [str(i) for i in range(100)]}), meta)
    stamp = json.dumps({"parquet": M.parquet_stamp(meta), "rows": 100})
    schema = pa.schema([("url", pa.string())], metadata={M.ARROW_SOURCE: stamp})
    with ipc.new_file(str(M.arrow_of(meta)), schema) as w:
        for i in range(100):  # one row a batch: a crafted copy's batch list would fill memory at scale
            w.write_batch(pa.record_batch([pa.array([str(i)])], schema=schema))
    rd = M.MetadataReader(meta)
    assert not rd.memory_mapped and rd.row(42) == {"url": "42"}
