"""Pictures of a run: one PNG of its training curves (loss, learning rates, samples/s,
validation recall) drawn from the run folder's metrics.jsonl, so a run can be seen
without starting TensorBoard. Works on a finished run and on one still being written:
a torn last line (the writer mid-line) or any other unreadable line is skipped and
counted, never an error.

    phoclip-plot runs/NAME                    # writes runs/NAME/curves.png
    python -m phoclip_cli.plot runs/NAME --out curves.png
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from phoclip.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"
# A line longer than this is not one of ours (a metrics line is well under 4 KiB): skipped
MAX_LINE_BYTES = 1 << 20
# Points per curve: a long run has millions of logged steps; the picture cannot show more
MAX_POINTS = 4000
# Curves per panel (learning-rate groups, evaluation sets): more are not drawn, and said
MAX_SERIES = 16
# |values| beyond this are not a loss or a rate (matplotlib cannot lay out their axis)
MAX_ABS_VALUE = 1e30
RECALL_KEYS = ("t2i_R@1", "i2t_R@1", "t2i_R@5", "i2t_R@5", "t2i_R@10", "i2t_R@10")
TRAIN_KEYS = ("loss", "contrastive_loss", "lr", "lrs", "samples_per_s", "data_wait_s")  # what is drawn
# Rows kept per kind while reading: past this the kept steps are thinned to a grid of
# twice the stride, so a file of millions of lines is read in bounded memory
MAX_KEPT = 4 * MAX_POINTS


class PlotError(ValueError):
    """A run folder we cannot draw (no metrics, nothing usable in them); one line."""


@dataclass
class RunMetrics:
    """What is drawn of metrics.jsonl: the last line logged for each step (a resumed run
    logs again the steps after its checkpoint), per kind ("train", "val", "val_NAME"),
    only the numbers drawn (TRAIN_KEYS, RECALL_KEYS) and only the MAX_SERIES evaluation
    sets first by name. At most MAX_KEPT steps a kind: past that the steps kept are
    those on a grid (a multiple of the stride, doubled as needed), the first and the newest."""

    by_kind: dict[str, dict[int, dict]] = field(default_factory=dict)
    skipped_lines: int = 0
    other_lines: int = 0  # lines of kinds not drawn
    _stride: dict[str, int] = field(default_factory=dict)
    _newest: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, step: int, line: dict) -> None:
        """Keep what is drawn of one line."""
        if kind == "train":
            keys = TRAIN_KEYS
        elif kind == "val" or kind.startswith("val_"):
            keys = RECALL_KEYS
            if kind not in self.by_kind:
                sets = [k for k in self.by_kind if k != "train"]
                if len(sets) >= MAX_SERIES:  # keep the MAX_SERIES first by name, as val_kinds draws
                    if kind > max(sets):
                        return
                    for d in (self.by_kind, self._stride, self._newest):
                        d.pop(max(sets), None)
        else:
            self.other_lines += 1
            return
        row = {k: line[k] for k in keys if k in line}
        if isinstance(row.get("lrs"), dict):  # the groups drawn at most (see _lr_groups)
            row["lrs"] = dict(list(row["lrs"].items())[:MAX_SERIES])
        rows = self.by_kind.setdefault(kind, {})
        stride, newest = self._stride.get(kind, 1), self._newest.get(kind)
        if newest is None or step >= newest:
            if newest is not None and newest != step and newest % stride:
                rows.pop(newest, None)  # the newest point only is kept off the grid
            self._newest[kind] = newest = step
        elif step % stride:
            return
        rows[step] = row
        if len(rows) > MAX_KEPT:
            stride *= 2
            self._stride[kind] = stride
            first = min(rows)  # the run's start stays drawn too
            for st in [st for st in rows if st % stride and st not in (newest, first)]:
                del rows[st]

    def steps(self, kind: str) -> list[int]:
        return sorted(self.by_kind.get(kind, {}))

    def series(self, kind: str, key: str, sub: Optional[str] = None) -> tuple[list[int], list[float]]:
        """(steps, values) of one number; `sub` reads a key of a nested dict (lrs)."""
        rows = self.by_kind.get(kind, {})
        xs, ys = [], []
        for s in sorted(rows):
            v = rows[s].get(key)
            if sub is not None:
                v = v.get(sub) if isinstance(v, dict) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
                    and abs(v) <= MAX_ABS_VALUE:
                xs.append(s)
                ys.append(float(v))
        return xs, ys

    @property
    def val_kinds(self) -> list[str]:
        """The evaluation sets, at most MAX_SERIES of them (the first by name)."""
        return sorted(k for k in self.by_kind if k == "val" or k.startswith("val_"))[:MAX_SERIES]


def read_metrics(path: str | os.PathLike) -> RunMetrics:
    """Parse a metrics.jsonl (a run folder or the file itself), streaming: only what is
    drawn is kept (`RunMetrics.add`), in bounded memory. Lines that are not a
    whole JSON object with an integer `step` and a string `kind` (a torn last line while
    the run writes, a truncated file) are skipped and counted. A missing file, or one
    that is not a regular file (a FIFO would block), raises PlotError naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    try:
        # non-blocking open, then fstat: a FIFO planted at the name is refused, not waited on
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise PlotError(f"{path}: no metrics file (not a run folder, or the run has not logged a step yet)") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PlotError(f"{path}: not a regular file")
    out = RunMetrics()
    with os.fdopen(fd, "rb") as f:
        while raw := f.readline(MAX_LINE_BYTES + 1):  # bounded: never a whole huge line in memory
            if len(raw) > MAX_LINE_BYTES:  # not one of ours: skip the rest of it, in bounded reads
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(MAX_LINE_BYTES)
                out.skipped_lines += 1
                continue
            # a line without its newline is the one the trainer is writing now (or was
            # writing when it was killed): never trust it
            if not raw.endswith(b"\n"):
                out.skipped_lines += 1
                continue
            try:
                m = json.loads(raw)
            except (ValueError, RecursionError):
                out.skipped_lines += 1
                continue
            if (not isinstance(m, dict) or not isinstance(m.get("kind"), str)
                    or not isinstance(m.get("step"), int) or isinstance(m.get("step"), bool)):
                out.skipped_lines += 1
                continue
            out.add(m["kind"], m["step"], m)
    return out


def _thin(xs: list[int], ys: list[float]) -> tuple[list[int], list[float]]:
    """At most MAX_POINTS points, evenly strided, the last one kept."""
    if len(xs) <= MAX_POINTS:
        return xs, ys
    stride = math.ceil(len(xs) / MAX_POINTS)
    idx = list(range(0, len(xs), stride))
    if idx[-1] != len(xs) - 1:
        idx.append(len(xs) - 1)
    return [xs[i] for i in idx], [ys[i] for i in idx]


def _lr_groups(m: RunMetrics) -> list[str]:
    """The learning-rate groups to draw: a `_no_decay` twin is drawn only when its curve
    differs from its group's (it shares the rate in every shipped config)."""
    seen: dict[str, None] = {}  # insertion-ordered set
    for row in m.by_kind.get("train", {}).values():
        lrs = row.get("lrs")
        for g in lrs if isinstance(lrs, dict) else ():
            if isinstance(g, str) and len(seen) < MAX_SERIES:
                seen.setdefault(g)
    names = list(seen)
    keep = []
    for g in names:
        base = g[:-len("_no_decay")] if g.endswith("_no_decay") else None
        if base in names and m.series("train", "lrs", g) == m.series("train", "lrs", base):
            continue
        keep.append(g)
    return keep


def _label(text: str) -> str:
    """A legend entry as plain text: matplotlib reads $...$ as math (and fails on bad math)."""
    return text[:80].replace("$", r"\$")


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _draw(m: RunMetrics, title: str):
    """The figure: 2x2 panels. Built on matplotlib's object API with the Agg canvas (no
    pyplot state, no display), so it is safe inside a training process."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    (ax_loss, ax_lr), (ax_speed, ax_val) = fig.subplots(2, 2)
    fig.suptitle(title)

    xs, ys = m.series("train", "loss")
    if xs:
        ax_loss.plot(*_thin(xs, ys), lw=1, label="loss")
        cx, cy = m.series("train", "contrastive_loss")
        if cy and cy != ys:  # a second line only when a regulariser makes them differ
            ax_loss.plot(*_thin(cx, cy), lw=1, label="contrastive")
            ax_loss.legend(loc="upper right")
        ax_loss.set_ylabel("training loss")
    else:
        _empty(ax_loss, "no training step logged yet")
    ax_loss.set_title("loss")

    groups = _lr_groups(m)
    for g in groups:
        ax_lr.plot(*_thin(*m.series("train", "lrs", g)), lw=1, label=_label(g))
    if not groups:
        xs, ys = m.series("train", "lr")
        if xs:
            ax_lr.plot(*_thin(xs, ys), lw=1, label="lr")
            groups = ["lr"]
    if groups:
        peaks = [max(ys) for ys in (m.series("train", "lrs", g)[1] for g in groups) if ys]
        if peaks and min(peaks) > 0 and max(peaks) / min(peaks) >= 10:
            # the groups' rates differ by orders of magnitude (the recipe: 1e-5 text, 1e-3
            # heads); a warmup or decay that reaches 0 is left out of a log axis, not drawn at -inf
            ax_lr.set_yscale("log", nonpositive="mask")
        ax_lr.legend(loc="best", fontsize="small")
        ax_lr.set_ylabel("learning rate")
    else:
        _empty(ax_lr, "no learning rates logged yet")
    ax_lr.set_title("learning rates")

    xs, ys = m.series("train", "samples_per_s")
    if xs:
        ax_speed.plot(*_thin(xs, ys), lw=1, color="tab:green")
        ax_speed.set_ylabel("samples/s (all ranks)")
        ax_speed.set_ylim(bottom=0)
        wx, wy = m.series("train", "data_wait_s")
        if wx:
            ax_wait = ax_speed.twinx()
            ax_wait.plot(*_thin(wx, wy), lw=0.8, color="tab:gray", alpha=0.4)
            ax_wait.set_ylabel("data wait per logged interval (s)", color="tab:gray")
            ax_wait.set_ylim(bottom=0)
            ax_speed.set_zorder(ax_wait.get_zorder() + 1)  # samples/s drawn over the wait
            ax_speed.patch.set_visible(False)
    else:
        _empty(ax_speed, "no throughput logged yet")
    ax_speed.set_title("throughput")

    drawn = 0
    for kind in m.val_kinds:
        name = "" if kind == "val" else kind[len("val_"):] + " "
        for key in RECALL_KEYS[:2] if len(m.val_kinds) > 1 else RECALL_KEYS:
            vx, vy = m.series(kind, key)
            if vx:
                ax_val.plot(vx, vy, marker="o", ms=3, lw=1, label=_label(f"{name}{key}"))
                drawn += 1
    if drawn:
        ax_val.set_ylabel("recall (%)")
        ax_val.set_ylim(0, 100)
        ax_val.legend(loc="best", fontsize="small")
    else:
        _empty(ax_val, "no validation yet")
    ax_val.set_title("validation recall")

    for ax in (ax_loss, ax_lr, ax_speed, ax_val):
        if ax.has_data():
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    return fig


def render_curves(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the run's training curves into a PNG (default `RUN_DIR/curves.png`), written
    atomically, and return its path. Works while the run is still writing. A folder
    without metrics, or whose metrics hold no usable line, raises PlotError."""
    run_dir = Path(run_dir)
    m = read_metrics(run_dir)
    if not m.by_kind and not m.other_lines:
        raise PlotError(f"{run_dir / METRICS_NAME}: no usable metrics line "
                        f"({m.skipped_lines} skipped); nothing to draw")
    if m.skipped_lines:
        log.info("%s: %d unreadable line(s) skipped (a line being written, or a torn file)",
                 run_dir / METRICS_NAME, m.skipped_lines)
    steps = m.steps("train")
    title = f"{run_dir.resolve().name}: step {steps[-1] if steps else 0}"
    fig = _draw(m, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    out = Path(out) if out is not None else run_dir / CURVES_NAME
    atomic_write_bytes(out, buf.getvalue())
    return out


def try_render_curves(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Optional[Path]:
    """`render_curves` for the end of a run and for export: a picture must never fail
    them, so a run without metrics (or any drawing error) is a warning and None."""
    try:
        return render_curves(run_dir, out)
    except Exception as e:  # whatever matplotlib or the disk raises, the run's end goes on
        log.warning("training curves not drawn for %s: %s", run_dir, e)
        return None
