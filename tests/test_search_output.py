"""What launch/search.py prints (#26), in process over an untrained tiny model's index:
image → text lists each caption once and names the image it describes; a photo index
(no captions) prints no empty "()"; tag scores are labelled; a skipped file's reason
names no Python object."""
import sys

import pytest
import torch

from conftest import ROOT, make_image


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_tokenizer_dir):
    import phoclip
    from phoclip.index import write_index
    from phoclip.text import load_tokenizer

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
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import search
    finally:
        sys.path.remove(str(ROOT / "launch"))
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
