"""An index handed to us is data: its files are refused in one line naming them, never a
hang or a memory blow-up (images.jsonl a FIFO or /dev/zero, index.json over its cap, a
count that is not a count); the model it names is resolved to a model folder and the
one used is logged; a tar shard it names costs a bounded read (never decompressed, a
capped header walk, a failure remembered); its pictures are served only from allowed
folders, and its paths are shown as recorded, not as the server's absolute paths."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import tarfile
import time

import pytest
import torch

from conftest import make_image
from test_serve_hostile import _tiny_model_folder


@contextlib.contextmanager
def _deadline(seconds: int):
    """A TimeoutError in this thread after `seconds` (a blocking open of a FIFO is
    interrupted): a hang fails the test instead of hanging the suite."""
    def fire(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def built(tiny_tokenizer_dir, tmp_path_factory):
    """A tiny model and an index of 3 photos beside it (d/model, d/photos, d/index)."""
    from phoclip.search.index import write_index

    d = tmp_path_factory.mktemp("hostile_index")
    model = _tiny_model_folder(tiny_tokenizer_dir, d / "model")
    items = [{"key": f"p{i}", "path": str(make_image(d / "photos" / f"p{i}.jpg", i)), "caption": f"ảnh {i}",
              "shard": ""} for i in range(3)]
    emb = torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)
    write_index(d / "index", model, str(d / "model"), emb, items, source=str(d / "photos"))
    return d


META = "metadata/metadata_0000.parquet"


def _copy(built, tmp_path, name="index"):
    dst = tmp_path / name
    shutil.copytree(built / "index", dst)
    return dst


def _edit_meta(folder, **kw):
    m = json.loads((folder / "index.json").read_text())
    m.update(kw)
    (folder / "index.json").write_text(json.dumps(m))


# ---------------------------------------------------------------- H3: the index's files


def test_items_file_a_fifo_is_refused_without_blocking(built, tmp_path):
    from phoclip.search.index import EmbeddingIndex

    ix = _copy(built, tmp_path)
    (ix / META).unlink()
    os.mkfifo(ix / META)
    with _deadline(10), pytest.raises(ValueError, match="metadata_0000.parquet.*not a regular file"):
        EmbeddingIndex(ix).items("images")


def test_an_embeddings_part_a_fifo_is_refused_without_blocking(built, tmp_path):
    from phoclip.search.index import EmbeddingIndex

    ix = _copy(built, tmp_path)
    emb = ix / "img_emb" / "img_emb_0000.npy"
    emb.unlink()
    os.mkfifo(emb)
    with _deadline(10), pytest.raises(ValueError, match="img_emb_0000.npy: not a regular file"):
        EmbeddingIndex(ix).vectors("images", [1])


def test_items_file_linked_to_dev_zero_is_refused_at_once(built, tmp_path):
    from phoclip.search.index import EmbeddingIndex

    ix = _copy(built, tmp_path)
    (ix / META).unlink()
    os.symlink("/dev/zero", ix / META)
    t0 = time.monotonic()
    with _deadline(10), pytest.raises(ValueError, match="metadata_0000.parquet.*not a regular file"):
        EmbeddingIndex(ix).items("images")
    assert time.monotonic() - t0 < 2


def test_an_over_large_row_group_or_too_many_rows_is_refused_naming_the_file(built, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import phoclip.search.index as index_mod

    ix = _copy(built, tmp_path)
    good = pq.read_table(ix / META)
    # one cell of 10 kB: its row group is refused unread past the cap, not decoded
    monkeypatch.setattr(index_mod, "MAX_ROW_GROUP_BYTES", 4096)
    big = good.set_column(good.schema.get_field_index("key"), "key", pa.array(["a" * 10_000] * good.num_rows))
    pq.write_table(big, ix / META)
    with pytest.raises(ValueError, match=r"metadata_0000\.parquet: row group 0 is \d+ bytes decoded, over the 4096") as e:
        index_mod.EmbeddingIndex(ix).items("images")
    assert "\n" not in str(e.value)
    # more rows than index.json counts: refused from the footer, before any row is read
    pq.write_table(pa.concat_tables([good] * 334), ix / META)
    with pytest.raises(ValueError, match=r"metadata_0000\.parquet: 1002 rows, but index\.json says part 0000 has 3"):
        index_mod.EmbeddingIndex(ix)


def test_index_json_a_fifo_or_over_its_cap_is_refused(built, tmp_path, monkeypatch):
    import phoclip.search.index as index_mod
    import phoclip.search.meta as meta_mod

    ix = _copy(built, tmp_path)
    monkeypatch.setattr(meta_mod, "MAX_META_BYTES", 100)
    with pytest.raises(ValueError, match=r"index\.json: unreadable.*over the 100-byte cap"):
        index_mod.EmbeddingIndex(ix)
    monkeypatch.undo()
    # is_file() is false for a FIFO: the existing check names it; a link to one too
    os.unlink(ix / "index.json")
    os.mkfifo(tmp_path / "meta.fifo")
    os.symlink(tmp_path / "meta.fifo", ix / "index.json")
    with _deadline(10), pytest.raises((ValueError, FileNotFoundError), match="index"):
        index_mod.EmbeddingIndex(ix)


# ---------------------------------------------------------------- L1: counts


@pytest.mark.parametrize("bad", ["x", None, True, -1, 2.0])
def test_a_count_that_is_not_a_count_is_refused_in_one_line(built, tmp_path, bad):
    from phoclip.search.index import EmbeddingIndex

    ix = _copy(built, tmp_path)
    _edit_meta(ix, count={"images": 3, "captions": bad})
    with pytest.raises(ValueError, match=r"index\.json: count\.captions must be a non-negative integer"):
        EmbeddingIndex(ix)
    _edit_meta(ix, count={"images": bad, "captions": 0})
    with pytest.raises(ValueError, match=r"index\.json: count\.images must be a non-negative integer"):
        EmbeddingIndex(ix)


def test_serve_and_search_refuse_a_bad_count_with_one_line(built, tmp_path, capsys):
    from phoclip_cli import search, serve

    ix = _copy(built, tmp_path)
    _edit_meta(ix, count={"images": 3, "captions": "x"})
    assert serve.main(["--index", str(ix), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("serve: ") and "count.captions" in err[-1] and "Traceback" not in "\n".join(err)
    assert search.main(["--index", str(ix), "ảnh"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("search: ") and "count.captions" in err[-1]


# ---------------------------------------------------------------- L2: which model


def test_the_model_is_a_model_folder_and_where_it_was_found_is_said(built, tmp_path, caplog):
    from phoclip.search.index import EmbeddingIndex

    # a copied index whose ../model is an unrelated folder: not taken for the model
    ix = _copy(built, tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("not a model")
    index = EmbeddingIndex(ix)
    assert index.model_found_via == "built_in"
    assert index.meta["model"] == str(built / "model")
    line = index.model_line()
    assert str(built / "model") in line and "'../model'" in line and "built_in" in line
    # a model beside the copy: found via the index folder
    shutil.rmtree(tmp_path / "model")
    shutil.copytree(built / "model", tmp_path / "model")
    index = EmbeddingIndex(ix)
    assert index.model_found_via == "the index folder" and index.meta["model"] == str(tmp_path / "model")
    # nowhere: None (search and serve refuse it with a line naming where they looked)
    shutil.rmtree(tmp_path / "model")
    _edit_meta(ix, built_in=str(tmp_path / "elsewhere"))
    assert EmbeddingIndex(ix).model_found_via is None
    assert "given" in EmbeddingIndex(ix).model_line("some/model")


def test_serve_and_search_log_the_model_they_use(built, tmp_path, capsys, caplog):
    from phoclip.serve import Service
    from phoclip_cli import search

    with caplog.at_level(logging.INFO, logger="phoclip.serve.service"):
        Service(str(built / "index"), device="cpu")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model: ")]
    assert lines and str(built / "model") in lines[0] and "the index folder" in lines[0]
    assert search.main(["--index", str(built / "index"), "--json", "ảnh"]) == 0
    err = capsys.readouterr().err
    assert f"model: {built / 'model'} (recorded as '../model'" in err


# ---------------------------------------------------------------- M1: tar shards


def _tar(path, n_before, payload=b"\xff\xd8jpeg", mode="w"):
    with tarfile.open(path, mode) as tf:
        for i in range(n_before):
            tf.addfile(tarfile.TarInfo(f"m{i:06d}.txt"), io.BytesIO(b""))
        ti = tarfile.TarInfo("target.jpg")
        ti.size = len(payload)
        tf.addfile(ti, io.BytesIO(payload))
    return path


def test_a_compressed_shard_is_refused_not_inflated(tmp_path):
    from phoclip.search.gallery import load_item_bytes

    for mode, ext in (("w:xz", "tar.xz"), ("w:gz", "tar.gz"), ("w:bz2", "tar.bz2")):
        p = _tar(tmp_path / f"s.{ext}", 2000, mode=mode)
        t0 = time.monotonic()
        with pytest.raises(tarfile.ReadError):
            load_item_bytes({"key": "target", "shard": str(p), "path": ""}, max_bytes=64 << 10)
        assert time.monotonic() - t0 < 1


def test_the_header_walk_is_capped_and_keeps_no_member_list(tmp_path, monkeypatch):
    import phoclip.data.tar as tar
    import phoclip.search.gallery as gallery
    from phoclip.data.images import BadImage

    p = _tar(tmp_path / "s.tar", 300)
    item = {"key": "target", "shard": str(p), "path": ""}
    assert gallery.load_item_bytes(item, max_bytes=1024) == b"\xff\xd8jpeg"
    monkeypatch.setattr(tar, "MAX_SHARD_HEADERS", 100)
    with pytest.raises(BadImage, match="too_many_members"):
        gallery.load_item_bytes(item, max_bytes=1024)
    with pytest.raises(KeyError):
        gallery.load_item_bytes({"key": "absent", "shard": str(_tar(tmp_path / "t.tar", 5)), "path": ""}, 1024)
    os.mkfifo(tmp_path / "fifo.tar")
    with _deadline(10), pytest.raises(OSError, match="not a regular file"):
        gallery.load_item_bytes({"key": "target", "shard": str(tmp_path / "fifo.tar"), "path": ""}, 1024)


# ---------------------------------------------------------------- L3 + M1: what the service serves


@pytest.fixture(scope="module")
def service_env(built, tmp_path_factory):
    """An index in `built`'s folder with items inside its images folder, one outside it
    (a 'secret' file), one a link inside the index folder to the secret, one in a
    compressed shard."""
    from phoclip.search.index import write_index
    from phoclip.models.factory import load_model
    from phoclip.serve import Service

    d = tmp_path_factory.mktemp("served")
    secret = make_image(d / "secret" / "private.jpg", 7)
    photos = d / "photos"
    inside = make_image(photos / "a.jpg", 1)
    idx = d / "index"
    _tar(d / "photos" / "s.tar.xz", 50, payload=(photos / "a.jpg").read_bytes(), mode="w:xz")
    items = [{"key": "a", "path": str(inside), "caption": "a", "shard": ""},
             {"key": "secret", "path": str(secret), "caption": "s", "shard": ""},
             {"key": "link", "path": str(idx / "link.jpg"), "caption": "l", "shard": ""},
             {"key": "target", "path": "x.jpg", "caption": "t", "shard": str(photos / "s.tar.xz")}]
    emb = torch.nn.functional.normalize(torch.randn(len(items), 64), dim=-1)
    write_index(idx, load_model(built / "model"), str(built / "model"), emb, items, source=str(photos))
    os.symlink(secret, idx / "link.jpg")
    # the images folder lies outside the index folder: served only when named (serve --images-root)
    return d, Service(str(idx), device="cpu", images_roots=[str(idx), str(photos)])


def test_pictures_outside_the_allowed_folders_are_not_served(service_env, caplog):
    from phoclip.serve.picture_cache import PictureUnavailable

    d, service = service_env
    pictures = service.indices.get().pictures
    assert pictures.roots == [str(d / "index"), str(d / "photos")]
    assert pictures.picture(0, 1 << 20, 1 << 28)[:2] == b"\xff\xd8"
    with caplog.at_level(logging.WARNING, logger="phoclip.serve.picture_cache"):
        for i in (1, 2):  # a file elsewhere; a link inside the index folder to it
            for _ in range(3):
                with pytest.raises(PictureUnavailable, match="outside"):
                    pictures.photo(i, 1 << 20, 1 << 28)
    assert pictures.failures["outside_roots"] == 2  # counted once per item
    logged = [r.getMessage() for r in caplog.records if "outside" in r.getMessage()]
    assert len(logged) == 2, logged  # logged once per item, not per request


def test_paths_are_shown_as_recorded_not_as_server_paths(service_env):
    d, service = service_env
    served = service.indices.get()
    assert service.item(served, 1)["path"] == os.path.relpath(d / "secret" / "private.jpg", d / "index")
    assert service.item(served, 0)["path"] == "../photos/a.jpg"
    hits = service._image_hits(served, torch.from_numpy(served.vectors("images", [0])), 4)
    assert [h["path"] for h in hits if h["id"] == 0] == ["../photos/a.jpg"]
    assert service.item(served, 3)["path"] == "" and service.item(served, 3)["shard"] == "s.tar.xz"


def test_a_failed_picture_is_not_read_again_on_every_request(service_env, monkeypatch):
    import phoclip.serve.picture_cache as cache_mod

    d, service = service_env
    pictures = service.indices.get().pictures
    calls = []
    real = cache_mod.load_item_bytes
    monkeypatch.setattr(cache_mod, "load_item_bytes", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(5):
        with pytest.raises(cache_mod.PictureUnavailable):
            pictures.picture(3, 1 << 20, 1 << 28)
    assert len(calls) == 1
    # remembered for FAILED_TTL only: a file put back is served again
    monkeypatch.setattr(cache_mod, "FAILED_TTL", 0.0)
    with pytest.raises(cache_mod.PictureUnavailable):
        pictures.picture(3, 1 << 20, 1 << 28)
    assert len(calls) == 2


def test_images_roots_names_the_folders_served(built, service_env):
    from phoclip.serve import Service, Settings
    from phoclip.serve.picture_cache import PictureUnavailable

    d, _ = service_env
    s = Service.from_settings(Settings(index=str(d / "index"), device="cpu", images_roots=(str(d / "secret"),)))
    pictures = s.indices.get().pictures
    assert pictures.roots == [str(d / "secret")]
    assert pictures.photo(1, 1 << 20, 1 << 28)[:2] == b"\xff\xd8"
    with pytest.raises(PictureUnavailable, match="outside"):
        pictures.photo(0, 1 << 20, 1 << 28)
    with pytest.raises(NotADirectoryError, match="images root .*nowhere: not a folder"):
        Service(str(d / "index"), device="cpu", images_roots=(str(d / "nowhere"),))


def test_a_broad_images_folder_is_no_default_root(built, tmp_path):
    from phoclip.search.index import EmbeddingIndex

    ix = _copy(built, tmp_path)
    _edit_meta(ix, images_root="/")
    assert EmbeddingIndex(ix).image_roots() == [str(ix)]
    _edit_meta(ix, images_root="../../../../../../../../../../../../../../home")
    assert EmbeddingIndex(ix).image_roots() == [str(ix)]
