"""Pictures of a run: the training curves PNG drawn from a run folder's metrics.jsonl,
on a real tiny run, on a file still being written (a torn last line), and the refusals."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

import pytest
from conftest import ROOT, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _copy_run(tiny_run, tmp_path):
    """Only the metrics file: the shared run folder is read-only for other tests."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_run / "metrics.jsonl", run / "metrics.jsonl")
    return run


def _image(path):
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def test_curves_of_a_real_tiny_run(tiny_run, tmp_path):
    from phoclip_train.plots import read_metrics as plot_metrics
    from phoclip_train.plots import render_curves

    run = _copy_run(tiny_run, tmp_path)
    m = plot_metrics(run)
    # the parser reads what the trainer wrote, as the tests' own reader does
    assert m.steps("train") == sorted(read_metrics(tiny_run, "train")) == [1, 2, 3, 4]
    assert m.skipped_lines == 0 and m.val_kinds == ["val"]
    assert m.series("train", "loss")[1] == [read_metrics(tiny_run)[s]["loss"] for s in (1, 2, 3, 4)]
    assert m.series("val", "t2i_R@1")[0], "the tiny run validates at its end"

    out = render_curves(run)
    assert out == run / "curves.png"
    assert out.read_bytes()[:8] == PNG_MAGIC
    im = _image(out)
    assert im.size == (1200, 800)
    # a drawn figure, not a blank canvas: many colours (four panels of lines and text)
    assert len(im.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50
    # written atomically: no temporary file left beside it
    assert sorted(p.name for p in run.iterdir()) == ["curves.png", "metrics.jsonl"]


def test_a_run_being_written_is_drawn_without_its_torn_last_line(tiny_run, tmp_path):
    from phoclip_train.plots import read_metrics as plot_metrics
    from phoclip_train.plots import render_curves

    run = _copy_run(tiny_run, tmp_path)
    whole = plot_metrics(run)
    with open(run / "metrics.jsonl", "ab") as f:  # the trainer mid-line: no newline yet
        f.write(b'{"step": 5, "kind": "train", "loss": 1.2')
    m = plot_metrics(run)
    assert m.skipped_lines == 1 and m.steps("train") == [1, 2, 3, 4]
    assert m.series("train", "loss") == whole.series("train", "loss")
    assert render_curves(run, tmp_path / "partial.png").read_bytes()[:8] == PNG_MAGIC

    # a file cut inside a line and then appended to (a crash, then a resumed run): the
    # broken line and garbage are skipped, the resumed run's steps replace the old ones
    lines = (tiny_run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    broken = lines[0] + lines[1][:17] + b"\n" + b"\x00\xff not json\n" + b"[1, 2]\n" \
        + b'{"step": "3", "kind": "train"}\n' + b"".join(lines[1:])
    (run / "metrics.jsonl").write_bytes(broken)
    m = plot_metrics(run)
    assert m.skipped_lines == 4 and m.steps("train") == [1, 2, 3, 4]
    assert render_curves(run).is_file()


def test_a_run_that_has_only_started_is_drawn_with_empty_panels(tmp_path):
    """One training line, no validation yet: every panel still drawn (says what is missing)."""
    from phoclip_train.plots import render_curves

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "loss": 4.1, "lr": 0.0}\n')
    assert _image(render_curves(tmp_path)).size == (1200, 800)


def test_a_folder_without_metrics_is_refused_in_one_line(tmp_path, capsys):
    from phoclip_cli.plot import main
    from phoclip_train.plots import PlotError, render_curves

    with pytest.raises(PlotError, match=r"metrics.jsonl: no metrics file") as e:
        render_curves(tmp_path)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)

    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1, "kind": "tr')  # only a torn line
    with pytest.raises(PlotError, match=r"no usable metrics line \(1 skipped\)"):
        render_curves(tmp_path)

    assert main([str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("phoclip-plot: ") and "nothing-here" in err and "\n" not in err
    assert not list(tmp_path.glob("*.png"))


def test_a_fifo_in_place_of_metrics_is_refused_not_waited_on(tmp_path):
    from phoclip_train.plots import PlotError, render_curves

    os.mkfifo(tmp_path / "metrics.jsonl")
    result = {}

    def call():
        try:
            render_curves(tmp_path)
        except PlotError as e:
            result["err"] = str(e)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "opened the FIFO and blocked"
    assert "not a regular file" in result["err"]


def test_the_command_writes_the_png_and_prints_its_path(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path)
    out = tmp_path / "elsewhere" / "c.png"
    out.parent.mkdir()
    r = subprocess.run([sys.executable, "-m", "phoclip_cli.plot", str(run), "--out", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out) and out.read_bytes()[:8] == PNG_MAGIC
    assert not (run / "curves.png").exists()


def test_the_model_card_shows_the_curves_and_the_python_api(tiny_run, tmp_path):
    """The exported model card embeds the run's picture (copied into the folder, linked
    relatively) and teaches the five-line API plus a batch; a non-PNG is not attached."""
    import ast

    from phoclip.models.card import API_EXAMPLE, BATCH_EXAMPLE, attach_curves, model_card
    from phoclip_train.plots import render_curves

    png = render_curves(_copy_run(tiny_run, tmp_path))
    folder = tmp_path / "model"
    folder.mkdir()
    name = attach_curves(folder, png)
    assert (folder / name).read_bytes() == png.read_bytes()
    assert attach_curves(folder, folder / name) == name  # drawn straight into the folder: kept as is
    assert (folder / name).read_bytes() == png.read_bytes()
    cfg = {"name": "tiny", "embed_dim": 16, "vision": {"timm_model": "test_resnet"}, "text": {}}
    card = model_card(cfg, curves=name)
    assert f"![loss, learning rates, samples/s and validation recall]({name})" in card
    assert "## Training curves" not in model_card(cfg)
    for line in API_EXAMPLE + BATCH_EXAMPLE:
        assert line in card
    assert "phoclip.load(" in card and "batch_size=" in card and "phoclip.load_model" in card
    ast.parse("\n".join(API_EXAMPLE + BATCH_EXAMPLE))  # the card's code is Python as written

    (tmp_path / "fake.png").write_text("not a picture")
    with pytest.raises(ValueError, match=r"fake.png: not a PNG image"):
        attach_curves(folder, tmp_path / "fake.png")
    with pytest.raises(OSError, match="not a regular file"):
        attach_curves(folder, "/dev/zero")


def test_the_end_of_a_run_is_never_failed_by_its_picture(tiny_run, tmp_path, caplog):
    """try_render_curves (the trainer's and export's call): the PNG when there are
    metrics, else a warning and None, never an exception."""
    from phoclip_train.plots import try_render_curves

    run = _copy_run(tiny_run, tmp_path)
    assert try_render_curves(run) == run / "curves.png"
    empty = tmp_path / "empty"
    empty.mkdir()
    with caplog.at_level("WARNING"):
        assert try_render_curves(empty) is None
    assert "training curves not drawn" in caplog.text and "no metrics file" in caplog.text
    assert try_render_curves(run, tmp_path / "no-such-folder" / "c.png") is None  # an unwritable output
