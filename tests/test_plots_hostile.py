"""phoclip-plot on metrics.jsonl files nobody should write (the attacker review's M2/L4):
bounded reading, bounded curves, text that is not math, values no axis can hold."""
import json
import time

from phoclip_train.plots import MAX_SERIES, read_metrics, render_curves


def _line(step, **kw):
    return json.dumps({"kind": "train", "step": step, **kw}) + "\n"


def test_a_huge_line_is_skipped_in_bounded_reads_and_the_rest_is_read(tmp_path):
    f = tmp_path / "metrics.jsonl"
    with open(f, "w") as out:
        out.write(_line(1, loss=3.0))
        out.write("x" * (5 << 20) + "\n")  # 5 MiB: not one of ours
        out.write(_line(2, loss=2.5))
    m = read_metrics(tmp_path)
    assert sorted(m.by_kind["train"]) == [1, 2] and m.skipped_lines == 1


def test_thousands_of_groups_and_sets_are_capped_and_drawn_quickly(tmp_path):
    lrs = {f"g{i}": 1e-3 for i in range(20000)}
    with open(tmp_path / "metrics.jsonl", "w") as out:
        for s in range(1, 4):
            out.write(_line(s, loss=3.0 - s / 10, lrs=lrs))
        for i in range(2000):
            out.write(json.dumps({"kind": f"val_{i}", "step": 3, "t2i_R@1": 5.0, "i2t_R@1": 4.0}) + "\n")
    t0 = time.perf_counter()
    png = render_curves(tmp_path)
    took = time.perf_counter() - t0
    assert png.read_bytes().startswith(b"\x89PNG") and took < 30, took  # was 109 s for the groups alone
    m = read_metrics(tmp_path)
    assert len(m.val_kinds) == MAX_SERIES


def test_names_that_look_like_math_and_values_no_axis_can_hold_still_draw(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as out:
        out.write(_line(1, loss=1.7e308, lrs={"$\\undefinedx$": 1e-3}))
        out.write(_line(2, loss=-1.7e308, lrs={"$\\undefinedx$": 2e-3}))
        out.write(_line(3, loss=2.0, lrs={"$\\undefinedx$": 3e-3}))
    png = render_curves(tmp_path)
    assert png.read_bytes().startswith(b"\x89PNG")
    xs, ys = read_metrics(tmp_path).series("train", "loss")
    assert xs == [3] and ys == [2.0]  # the absurd values are left out of the curve
