"""The typed manifest: what make_shards writes reads back the same, malformed or foreign
manifests are refused in one line naming the file and the key, and "do these shards fit
this model" is one check."""
import json

import pytest

from phoclip.data.catalog import check_shards_fit
from phoclip.data.manifest import FORMAT_VERSION, Manifest, ManifestError, text_pad_id, text_positions


def _man(shapes_shards) -> dict:
    return json.loads((shapes_shards[0] / "manifest.json").read_text())


def test_what_make_shards_wrote_reads_typed_and_writes_back_unchanged(shapes_shards, tmp_path):
    shards = shapes_shards[0]
    raw = _man(shapes_shards)
    m = Manifest.read(shards / "manifest.json")
    assert m.tokenizer.max_length == raw["tokenizer"]["max_length"] == 24
    assert m.segmenter.name == "underthesea" and m.format_version == FORMAT_VERSION
    assert m.shards["train"] == raw["shards"]["train"] and m.counts == raw["counts"]
    assert m.to_dict() == raw
    m.write(tmp_path / "manifest.json")
    assert json.loads((tmp_path / "manifest.json").read_text()) == raw
    assert Manifest.read(f"file://{tmp_path / 'manifest.json'}") == m


def test_an_old_minimal_manifest_still_loads_and_a_newer_version_is_refused(shapes_shards, tmp_path):
    raw = _man(shapes_shards)
    minimal = {"tokenizer": {k: raw["tokenizer"][k] for k in ("name", "fingerprint", "pad_id", "max_length")},
               "segmenter": {"name": "none"}, "counts": {"train": 3}, "future_key": [1]}
    m = Manifest.from_dict(minimal, "old/manifest.json")
    assert m.segmenter.version is None and m.captions is None and m.extra == {"future_key": [1]}
    assert m.to_dict()["future_key"] == [1] and "captions" not in m.to_dict()
    with pytest.raises(ManifestError, match=r"^x/manifest.json: manifest format_version 99 is not one"):
        Manifest.from_dict(dict(raw, format_version=99), "x/manifest.json")


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m["tokenizer"].pop("pad_id"), "key tokenizer.pad_id is missing or not a int"),
    (lambda m: m["tokenizer"].update(max_length="24"), "key tokenizer.max_length is missing"),
    (lambda m: m["tokenizer"].update(pad_id=True), "key tokenizer.pad_id"),
    (lambda m: m.update(counts={"train": -1}), "key counts"),
    (lambda m: m.update(skipped={"x": "3"}), "key skipped"),
    (lambda m: m.update(part={"index": 2, "of": 2}), "key part"),
])
def test_a_malformed_manifest_is_refused_naming_the_file_and_key(shapes_shards, tmp_path, edit, needle):
    raw = _man(shapes_shards)
    edit(raw)
    p = tmp_path / "manifest.json"
    p.write_text(json.dumps(raw))
    with pytest.raises(ManifestError) as e:
        Manifest.read(p)
    assert str(e.value).startswith(f"{p}: ") and needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content", [b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe", b"[1, 2]", b"{"])
def test_unreadable_manifests_are_one_line_refusals(tmp_path, content):
    p = tmp_path / "manifest.json"
    p.write_bytes(content)
    with pytest.raises(ManifestError, match=rf"^{p}: "):
        Manifest.read(p)


def test_a_manifest_over_the_size_cap_is_refused_unparsed(tmp_path, monkeypatch):
    import phoclip.data.manifest as manifest

    monkeypatch.setattr(manifest, "MAX_BYTES", 100)
    p = tmp_path / "manifest.json"
    p.write_text(json.dumps({"pad": "x" * 200}))
    with pytest.raises(ManifestError, match=rf"^{p}: .*larger than 100 bytes"):
        Manifest.read(p)


def test_text_positions_is_one_rule_for_models_configs_and_hub_names():
    from transformers import RobertaConfig

    from phoclip.models.factory import create_model, get_model_config

    tiny = get_model_config("tiny-debug")
    assert text_positions(tiny) == 128 and text_pad_id(tiny) == 1
    assert text_positions(get_model_config("phobert-large-rn50")) == 256  # hub model: PhoBERT's 258 - 2
    assert text_positions(RobertaConfig(max_position_embeddings=42)) == 40
    model = create_model("tiny-debug")
    assert text_positions(model) == text_positions(tiny) and text_pad_id(model) == model.pad_id


def test_check_fits_refuses_another_tokenizer_pad_or_a_too_short_text_tower(shapes_shards, tmp_path):
    from phoclip.models.factory import get_model_config
    from phoclip.data.text import load_tokenizer, tokenizer_fingerprint

    shards, tok_dir, n = shapes_shards
    tok = load_tokenizer(str(tok_dir))
    m = Manifest.read(shards / "manifest.json")
    tiny = get_model_config("tiny-debug")
    m.check_fits(tok, tiny, "tok")  # fits
    m.check_fits(tokenizer_fingerprint(tok), tiny)
    with pytest.raises(ManifestError, match="do not fit the model's tokenizer: tokenizer fingerprint"):
        m.check_fits("0" * 16, tiny, "other")
    with pytest.raises(ManifestError, match="pad id 1 != model's 0"):
        m.check_fits(tok, {"text": dict(tiny["text"], pad_id=0)})
    short = {"text": {"pad_id": 1, "hf_config": {"max_position_embeddings": 20}}}
    with pytest.raises(ManifestError, match="max length 24 > the text encoder's 18 positions"):
        m.check_fits(tok, short)
    urls = [str(shards / "train-000000.tar"), str(shards / "val-000000.tar")]
    assert check_shards_fit(urls, tok, tiny, "tok") == m


def test_shards_read_together_must_share_one_id_width(shapes_shards, tmp_path):
    import shutil

    shards = shapes_shards[0]
    other = tmp_path / "other"
    shutil.copytree(shards, other)
    raw = _man(shapes_shards)
    raw["tokenizer"]["max_length"] = 30
    (other / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="max length 30 != 24"):
        check_shards_fit([str(shards / "train-000000.tar"), str(other / "train-000000.tar")],
                         raw["tokenizer"]["fingerprint"], {"text": {"pad_id": 1}})
    with pytest.raises(FileNotFoundError, match="no manifest.json beside"):
        check_shards_fit([str(tmp_path / "nowhere" / "train-000000.tar")], "x", {"text": {}})


def test_a_part_manifest_is_checked_against_its_sizes(shapes_shards):
    raw = _man(shapes_shards)
    sizes = json.loads((shapes_shards[0] / "sizes.json").read_text())
    m = Manifest.from_dict(raw, "p/manifest.json")
    m.validate_part(sizes, "p/sizes.json")
    with pytest.raises(ManifestError, match="counts.train is"):
        m.validate_part(dict(sizes, **{raw["shards"]["train"][0]: 0}), "p/sizes.json")
    bad = Manifest.from_dict(dict(raw, shards={"train": ["../x.tar"], "val": []}), "p/manifest.json")
    with pytest.raises(ManifestError, match="is not a plain train-NNNNNN.tar name"):
        bad.validate_part(sizes, "p/sizes.json")
    with pytest.raises(ManifestError, match="not a list of shard file names"):
        bad.split_shards("train")
