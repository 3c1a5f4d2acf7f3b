"""Index and search on a tiny model trained for a few seconds on the shapes shards."""
import json
from pathlib import Path

import pytest
import torch

from conftest import train_main, train_overrides
from dist_utils import run_distributed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(shapes_shards, tmp_path_factory):
    """150 steps of the global batch of 32 (in this process: train_ddp.main as one process;
    the same global batch as 2 ranks of 16, without a launcher)."""
    shards, tok, n = shapes_shards
    run = tmp_path_factory.mktemp("trained") / "run"
    rc, log = train_main(["--config", "launch/configs/tiny-debug.yaml",
                          *train_overrides(shards, tok, n, run, **{"train.max_steps": 150, "train.log_every": 50,
                                                                   "train.save_every": 1000, "data.batch_size": 32,
                                                                   "optim.lr_text": 2e-3, "optim.lr_image": 2e-3})])
    assert rc == 0, log[-4000:]
    return run


def _main(module, args):
    import importlib

    return importlib.import_module(f"phoclip_cli.{module}").main([str(a) for a in args])


def test_index_search_gallery_map_and_refusal(trained, shapes_shards, tmp_path, capsys):
    from phoclip.search.gallery import write_embedding_map
    from phoclip.search.index import EmbeddingIndex
    from phoclip.search.query import find_captions, find_matches, zero_shot_tags
    from phoclip.data.text import TextProcessor, UndertheseaSegmenter, load_tokenizer
    from phoclip.models.loading import load_encoder

    shards, tok, _ = shapes_shards
    idx_dir = tmp_path / "index"
    assert _main("build_index", ["--model", trained, "--shards", f"{shards}/val-000000.tar", "--out", idx_dir,
                                 "--map", tmp_path / "cli_map.png", "--tensorboard", tmp_path / "tb"]) == 0
    assert (tmp_path / "cli_map.png").read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "tb").rglob("projector_config.pbtxt")) and list((tmp_path / "tb").rglob("sprite.png"))
    index = EmbeddingIndex(idx_dir)
    model, tok_name = load_encoder(str(trained))
    proc = TextProcessor(load_tokenizer(tok_name), UndertheseaSegmenter(), 24)
    items = index.items("images")
    assert index.embeddings("images").shape[0] == len(items) >= 20
    # each image comes back, near the top, for one of its own captions
    caps = index.items("captions")
    own_ranks = []
    for i, it in enumerate(items):
        my_caps = [c["caption"] for c in caps if c["image"] == i]
        res = find_matches(model, index, my_caps, proc, k=len(items))
        own_ranks.append(min([m.id for m in r].index(i) for r in res))
    top5 = sum(r < 5 for r in own_ranks) / len(own_ranks)
    assert top5 >= 0.5, own_ranks  # chance would be 5 / len(items)

    # the CLI: table, JSON and a self-contained HTML gallery with the right images
    html = tmp_path / "g.html"
    q = "hai hình tròn màu đỏ ở góc trên bên trái"
    assert _main("search", ["--index", idx_dir, q, "--k", "3", "--html", html, "--json"]) == 0
    printed = capsys.readouterr().out
    res = json.loads(printed[printed.index("{"):])
    assert len(res["text_to_image"][q]) == 3
    page = html.read_text(encoding="utf-8")
    assert page.count("data:image/jpeg;base64,") == 3
    api = find_matches(model, index, [q], proc, k=3)[0]
    for m in api:
        assert f"data-src='{m.item['path']}'" in page
    # image -> text on the caption index
    first = shards.parent / "data" / "images" / items[0]["path"]  # shards keep paths relative to the source
    assert _main("search", ["--index", idx_dir, "--image", first, "--k", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("\n") >= 4 and str(first) in printed
    # image -> text through the API: an image's own captions come back near the top
    from PIL import Image

    hits = 0
    for i, it in enumerate(items):
        res = find_captions(model, index, [Image.open(shards.parent / "data" / "images" / it["path"])], k=5)[0]
        hits += any(m.item["image"] == i for m in res)
    assert hits / len(items) >= 0.5, hits
    # zero-shot tags with prompt templates
    tags = zero_shot_tags(model, index, ["hình tròn", "hình vuông", "hình tam giác"], proc, k=1)
    assert len(tags) == len(items) and all(len(t) == 1 for t in tags)
    # the 2-D map
    png = write_embedding_map(tmp_path / "map.png", index.embeddings("images"),
                              [it["source"] for it in items])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # another model is refused
    torch.nn.Module()
    import phoclip
    m2 = phoclip.create_model("tiny-debug", text={"hf_config": {"vocab_size": model.text.config.vocab_size}})
    with pytest.raises(ValueError, match="rebuild the index"):
        index.check_model(m2)


def _extract(rank, world, model_dir, shards, out):
    from phoclip.evaluation.retrieval import eval_samples
    from phoclip.evaluation.retrieval import embed_samples, gather_embeddings
    from phoclip.models.loading import load_encoder

    model, _ = load_encoder(model_dir)
    urls = [str(p) for p in sorted(Path(shards).glob("train-*.tar"))]
    parts = embed_samples(model, eval_samples(urls, 32, rank, world), torch.device("cpu"), 7)
    img, txt, t2i, keys, _ = gather_embeddings(*parts, world)
    if rank == 0:
        torch.save({"img": img, "txt": txt, "t2i": t2i, "keys": keys}, out)


def test_distributed_extraction_equals_single_process(trained, shapes_shards, tmp_path):
    shards, _, _ = shapes_shards
    _extract(0, 1, str(trained), str(shards), str(tmp_path / "one.pt"))  # one process: this one
    run_distributed(_extract, 2, (str(trained), str(shards), str(tmp_path / "two.pt")))
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    order = [b["keys"].index(k) for k in a["keys"]]
    assert sorted(a["keys"]) == sorted(b["keys"])
    torch.testing.assert_close(b["img"][order], a["img"], rtol=1e-5, atol=1e-6)
    # captions follow their image
    for i, j in enumerate(order):
        torch.testing.assert_close(b["txt"][b["t2i"] == j], a["txt"][a["t2i"] == i], rtol=1e-5, atol=1e-6)


def test_index_a_photo_folder_with_broken_files_then_search_it(trained, shapes_shards, tmp_path, capsys):
    """The seed's main use: index a folder of photos (recursively), skip and count what
    cannot be read (never hang on a FIFO or /dev/zero), then search it in Vietnamese."""
    import io
    import os
    import tarfile

    from PIL import Image

    shards, _, _ = shapes_shards
    photos = tmp_path / "photos"
    caps = {}
    with tarfile.open(shards / "val-000000.tar") as tf:
        members = {m.name: m for m in tf.getmembers()}
        for i, name in enumerate(sorted(n for n in members if n.endswith(".jpg"))):
            key = name[:-4]
            sub = photos / ("2024" if i % 2 else "2025/tết")
            sub.mkdir(parents=True, exist_ok=True)
            data = tf.extractfile(members[name]).read()
            ext = ".JPG" if i % 3 == 0 else ".jpg"
            (sub / f"ảnh_{i:03d}{ext}").write_bytes(data)
            caps[str(sub / f"ảnh_{i:03d}{ext}")] = json.loads(tf.extractfile(members[key + ".json"]).read())["captions"]
    n_good = len(caps)
    good = next(iter(caps))
    Image.open(good).save(photos / "2024" / "screenshot.png")
    n_good += 1
    bad = photos / "broken"
    bad.mkdir()
    (bad / "truncated.jpg").write_bytes(Path(good).read_bytes()[:200])
    (bad / "notes.jpg").write_text("không phải ảnh")
    (bad / "big.jpg").write_bytes(Path(good).read_bytes() + b"\0" * 300_000)
    buf = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buf, format="PNG")  # a decompression bomb (900M pixels)
    (bad / "bomb.png").write_bytes(buf.getvalue())
    os.symlink("/dev/zero", bad / "zero.jpg")
    os.mkfifo(bad / "pipe.jpg")
    (photos / "readme.txt").write_text("ignored")

    idx = tmp_path / "index"
    assert _main("build_index", ["--model", trained, "--images", photos, "--out", idx,
                                 "--max-image-bytes", 250_000]) == 0
    out = capsys.readouterr().out
    assert f"indexed {n_good} images" in out, out
    assert "skipped 6 unreadable" in out and "not_a_file 2" in out, out
    assert "too_large 1" in out and "too_large_file 1" in out, out
    assert "corrupt 1" in out and "not_an_image 1" in out and "ignored 1 files" in out, out
    from phoclip.search.index import EmbeddingIndex

    items = EmbeddingIndex(idx).items("images")
    assert len(items) == n_good and not any("broken" in it["path"] for it in items)
    # text -> image over the folder through the CLI: an image comes back near the top
    # for one of its own captions more often than chance
    hits = 0
    for path, cs in list(caps.items())[:8]:
        assert _main("search", ["--index", idx, cs[0], "--k", "5", "--json"]) == 0
        res = json.loads(capsys.readouterr().out)["text_to_image"][cs[0]]
        assert len(res) == 5 and all(Path(m["item"]["path"]).is_file() for m in res)
        hits += any(m["item"]["path"] == path for m in res)
    assert hits >= 4, hits  # chance: 8 x 5 / len(items)
