"""evaluate against hostile inputs: every input (the references file, the published
split's annotations, the results folder) is read and checked before the model loads,
and a bad one is one line, exit 2, at once: never a traceback after the whole
evaluation with no results file."""
from __future__ import annotations

import pytest
from conftest import launch_main, make_image, refusal

import phoclip_cli.evaluate as evaluate


@pytest.fixture()
def benchmark(tmp_path):
    """A flickr8k-vi test split of two images."""
    (tmp_path / "images").mkdir()
    for i in range(2):
        make_image(tmp_path / "images" / f"{i}.jpg", i)
    caps = tmp_path / "captions.txt"
    caps.write_text("0.jpg#0\tmột hình tròn\n1.jpg#0\thai hình vuông\n", encoding="utf-8")
    return f"flickr8k-vi:{caps}:{tmp_path / 'images'}"


@pytest.fixture()
def no_model(monkeypatch):
    """Fails the test if the model is loaded: the refusal must come before."""
    def load(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(evaluate, "load_encoder", load)


def _eval(*args) -> str:
    return refusal(lambda *argv: launch_main("evaluate", argv), *args)


@pytest.mark.parametrize("text, needle", [
    ("[" * 20000 + "]" * 20000, "nested deeper than 8 levels"),
    ("- {dataset: ktvic, metric: t2i_R@1, value: .nan, source: x}", "entry 1: value must be a finite number"),
    ("- {dataset: ktvic, metric: t2i_R@1, value: 1.0}", "entry 1: expected a mapping with"),
    ("- &a {dataset: k, metric: m, value: 1, source: s}\n- *a", "an alias is not accepted"),
    ("a: [", "not a valid references YAML"),
])
def test_a_bad_references_file_is_refused_before_the_evaluation(tmp_path, benchmark, no_model, text, needle):
    refs = tmp_path / "refs.yaml"
    refs.write_text(text)
    line = _eval("--model", tmp_path, "--benchmark", benchmark, "--references", refs, "--out", tmp_path / "r.json")
    assert line.startswith(f"evaluate: {refs}: ") and needle in line, line
    assert not (tmp_path / "r.json").exists()


def test_a_references_fifo_is_refused_unread(tmp_path, benchmark, no_model):
    import os

    refs = tmp_path / "refs.yaml"
    os.mkfifo(refs)
    line = _eval("--model", tmp_path, "--benchmark", benchmark, "--references", refs, "--out", tmp_path / "r.json")
    assert str(refs) in line and "not a regular file" in line, line


def test_a_missing_annotation_file_or_results_folder_is_refused_first(tmp_path, benchmark, no_model):
    line = _eval("--model", tmp_path, "--benchmark", f"ktvic:{tmp_path / 'gone.json'}:{tmp_path}",
                 "--out", tmp_path / "r.json")
    assert "annotation file" in line and "does not exist" in line, line
    line = _eval("--model", tmp_path, "--benchmark", benchmark, "--out", tmp_path / "no" / "r.json")
    assert f"{tmp_path / 'no'}: no such folder for the results file r.json (--out)" in line, line
