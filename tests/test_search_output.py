"""What launch/search.py prints, in process over an untrained tiny model's index:
image → text lists each caption once and names the image it describes; a photo index
(no captions) prints no empty "()"; tag scores are labelled; a skipped file's reason
names no Python object."""

from pathlib import Path

import pytest
import torch

from conftest import make_image


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_tokenizer_dir):
    import phoclip
    from phoclip.search.index import write_index
    from phoclip.data.text import load_tokenizer

    d = tmp_path_factory.mktemp("search_output")
    torch.manual_seed(0)
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    model = phoclip.create_model("tiny-debug", embed_dim=32, text={"hf_config": {"vocab_size": len(tok)}})
    model.config["text"].update(segmenter="none", max_length=32)
    model.save_pretrained(d / "model", tokenizer=tok)
    photos = [make_image(d / "photos" / f"p{i}.jpg", i) for i in range(4)]
    img = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)
    # the same caption text under three images (as published datasets have), and one more
    caps = ["một con chó", "một con chó", "một  con chó", "hai con mèo"]
    cap_emb = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)
    write_index(d / "shards_index", model.eval(), str(d / "model"), img,
                [{"key": f"k{i}", "path": str(p), "caption": caps[i]} for i, p in enumerate(photos)],
                cap_emb, [{"caption": c, "image": i} for i, c in enumerate(caps)])
    write_index(d / "photo_index", model.eval(), str(d / "model"), img,
                [{"key": f"k{i}", "path": str(p), "caption": ""} for i, p in enumerate(photos)])
    return d, photos


def _search(argv, capsys):
    from phoclip_cli import search

    code = search.main([str(a) for a in argv])
    return code, capsys.readouterr()


def test_image_to_text_lists_each_caption_once_with_its_image(index, capsys):
    d, photos = index
    code, out = _search(["--index", d / "shards_index", "--image", photos[0], "--k", "3"], capsys)
    assert code == 0, out.err
    rows = [ln for ln in out.out.splitlines() if ln[:4].strip().isdigit()]
    assert len(rows) == 2, out.out  # "một con chó" (three times in the index) once, and the other
    assert sum("con chó" in r for r in rows) == 1 and any("hai con mèo" in r for r in rows)
    assert all("[" in r and "p" in r.rsplit("[", 1)[1] for r in rows)  # which image it describes


def test_a_photo_index_prints_no_empty_captions_and_tags_are_labelled(index, capsys, tmp_path):
    d, photos = index
    code, out = _search(["--index", d / "photo_index", "một con chó", "--k", "2"], capsys)
    assert code == 0 and "()" not in out.out and "its first caption" not in out.out, out.out
    tags = tmp_path / "tags.txt"
    tags.write_text("chó\nmèo\nxe\n", encoding="utf-8")
    code, out = _search(["--index", d / "photo_index", "--tags", tags, "--k", "2"], capsys)
    assert code == 0 and "cosine similarity" in out.out and "(cos " in out.out, out.out
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(SystemExit) as e:
        _search(["--index", d / "photo_index", "--image", bad], capsys)
    assert str(e.value).endswith("notes.jpg: not_an_image: not in an image format Pillow reads")
    assert "BytesIO" not in str(e.value)


def test_an_index_works_from_any_directory_and_moved_with_its_photos(tmp_path, tiny_tokenizer_dir, monkeypatch,
                                                                      capsys):
    """An index records its model and photos relative to the index folder (not the
    builder's working directory): it is searched from elsewhere and after moving
    together with its photos; a model that moved away is named, with the override."""
    import json
    import shutil

    import phoclip
    from phoclip.search.index import write_index
    from phoclip.data.text import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    model = phoclip.create_model("tiny-debug", embed_dim=32, text={"hf_config": {"vocab_size": len(tok)}})
    model.config["text"].update(segmenter="none", max_length=32)
    work = tmp_path / "work"
    model.save_pretrained(work / "model", tokenizer=tok)
    [make_image(work / "album" / "photos" / f"p{i}.jpg", i) for i in range(3)]
    monkeypatch.chdir(work)  # the builder's paths are relative to its working directory, as the CLI's are
    img = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    write_index("album/index", model.eval(), "model", img,
                [{"key": f"k{i}", "path": f"album/photos/p{i}.jpg", "caption": ""} for i in range(3)])

    def paths_found(index_dir):
        code, out = _search(["--index", index_dir, "một con chó", "--k", "3", "--json"], capsys)
        assert code == 0, out.err
        found = [m["item"]["path"] for m in json.loads(out.out)["text_to_image"]["một con chó"]]
        assert len(found) == 3 and all(Path(p).is_file() for p in found), found
        return found

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert all(p.startswith(str(work / "album" / "photos")) for p in paths_found(work / "album" / "index"))
    shutil.move(str(work / "album"), str(tmp_path / "moved"))  # the index with its photos
    assert all(p.startswith(str(tmp_path / "moved" / "photos")) for p in paths_found(tmp_path / "moved" / "index"))
    shutil.move(str(work / "model"), str(tmp_path / "model_elsewhere"))
    code, out = _search(["--index", tmp_path / "moved" / "index", "một con chó"], capsys)
    err = out.err.strip()
    assert code == 2 and "\n" not in err and "index.json" in err and "--model" in err, err
    assert str(work / "model") in err, err  # the path the index led to, named
    code, out = _search(["--index", tmp_path / "moved" / "index", "một con chó", "--model",
                         tmp_path / "model_elsewhere"], capsys)
    assert code == 0, out.err
