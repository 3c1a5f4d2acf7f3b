"""Experiment trackers (train.report_to): TensorBoard, wandb and MLflow get the scalars of
metrics.jsonl under the same names, wandb and MLflow the config and the exported model,
all offline (wandb's offline mode, MLflow's file store in the run folder; no network)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from conftest import read_metrics, train_args, train_main
from phoclip.errors import SetupError
from phoclip_train import trackers
from phoclip_train.metrics import RunLogger

ALL = "[tensorboard,wandb,mlflow]"


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    """wandb offline with its own folders in tmp_path, a dead endpoint should it try the
    network anyway; MLflow with no tracking URI of the machine's (its default: the run folder)."""
    for var in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME",
                "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "wandb-home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # the test swaps sys.stderr under the run
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(home / sub))


def expected_scalars(run: Path) -> dict[tuple[int, str], float]:
    """Every scalar of metrics.jsonl, by (step, tracker name)."""
    out = {}
    for kind in ("train", "val"):
        for step, line in read_metrics(run, kind).items():
            line = {k: v for k, v in line.items() if k not in ("step", "kind")}
            out.update({(step, name): v for name, v in trackers.scalars(line, kind).items()})
    return out


def wandb_records(run_file: Path):
    """The records of an offline run's .wandb file, read as wandb writes it (a LevelDB-style
    log: a 7-byte header, 32 KiB blocks, each record a 7-byte header (CRC, length, type:
    1 whole, 2 first, 3 middle, 4 last) and its bytes; a block's tail under 7 bytes is
    padding). wandb 0.31 ships no Python reader for it."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def read_wandb(run: Path) -> tuple[dict, dict, list]:
    """(scalars by (step, name), config, artifacts as (type, sorted file paths)) of the
    run folder's one offline wandb run."""
    runs = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    scalars, config, artifacts = {}, {}, []
    for rec in wandb_records(runs[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            scalars.update({(rec.history.step.num, k): v for k, v in items.items() if not k.startswith("_")})
        elif kind in ("config", "run"):
            ups = rec.config.update if kind == "config" else rec.run.config.update
            config.update({u.key: json.loads(u.value_json) for u in ups if u.key != "_wandb"})
        elif kind == "artifact":
            artifacts.append((rec.artifact.type, sorted(e.path for e in rec.artifact.manifest.contents)))
    return scalars, config, artifacts


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_one_run_reports_the_same_scalars_config_and_model_to_every_tracker(shapes_shards, tmp_path, offline):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    rc, log = train_main(train_args(shapes_shards, run, **{"train.max_steps": 3, "train.save_every": 3,
                                                           "train.report_to": ALL}))
    assert rc == 0, log[-4000:]
    assert "reporting to tensorboard, wandb (offline" in log and "mlflow (file://" in log, log[-3000:]
    want = expected_scalars(run)
    assert {s for s, _ in want} == {1, 2, 3} and (3, "val/t2i_R@1") in want and (1, "train/lrs/head") in want

    ev = EventAccumulator(str(run / "tensorboard"))
    ev.Reload()
    tb = {(e.step, tag): e.value for tag in ev.Tags()["scalars"] for e in ev.Scalars(tag)}
    assert tb.keys() == want.keys()
    assert all(tb[k] == pytest.approx(v, rel=1e-6, abs=1e-6) for k, v in want.items())

    got, config, artifacts = read_wandb(run)
    assert got == pytest.approx(want, rel=1e-12)
    assert config["train"]["max_steps"] == 3 and config["train"]["report_to"] == ["tensorboard", "wandb", "mlflow"]
    assert config["run_dir"] == str(run)
    assert artifacts == [("model", files_under(run / "model"))]

    ids = json.loads((run / "trackers.json").read_text())
    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    mr = client.get_run(ids["mlflow"])
    assert mr.info.status == "FINISHED" and mr.info.run_name == "run"
    history = {}
    for name in {n for _, n in want}:
        history.update({(m.step, name): m.value for m in client.get_metric_history(ids["mlflow"],
                                                                                    trackers.mlflow_name(name))})
    assert history == pytest.approx(want, rel=1e-12)
    assert trackers.mlflow_name("val/t2i_R@1") == "val/t2i_R_1"
    params = mr.data.params
    assert params["train.max_steps"] == "3" and params["data.batch_size"] == "8" and params["run_dir"] == str(run)
    assert params["train.report_to"] == '["tensorboard", "wandb", "mlflow"]'

    def listed(path: str) -> list[str]:
        out = []
        for a in client.list_artifacts(ids["mlflow"], path):
            out += listed(a.path) if a.is_dir else [a.path[len("model/"):]]
        return out

    assert sorted(listed("model")) == files_under(run / "model")


def test_a_resumed_run_continues_its_tracker_runs(shapes_shards, tmp_path, offline):
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    args = train_args(shapes_shards, run, **{"train.max_steps": 2, "train.save_every": 2, "train.report_to": ALL,
                                             "data.val_shards": "null"})
    rc, log = train_main([*args, "train.report_model=false"])  # the metrics and config only
    assert rc == 0, log[-4000:]
    first = json.loads((run / "trackers.json").read_text())
    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    assert (run / "model").is_dir() and client.list_artifacts(first["mlflow"], "model") == []
    rc, log = train_main([a if not a.startswith("train.max_steps") else "train.max_steps=4" for a in args]
                         + ["--resume", "latest"])
    assert rc == 0, log[-4000:]
    assert json.loads((run / "trackers.json").read_text()) == first
    assert client.list_artifacts(first["mlflow"], "model") != []
    assert [m.step for m in client.get_metric_history(first["mlflow"], "train/loss")] == [1, 2, 3, 4]
    assert client.get_run(first["mlflow"]).data.params["train.max_steps"] == "2"  # MLflow params keep their first value
    assert "params keep their first values" in log and "train.max_steps" in log
    wandb_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert wandb_runs and all(p.name.endswith("-" + first["wandb"]) for p in wandb_runs), wandb_runs


def test_report_to_none_writes_metrics_jsonl_and_no_tensorboard(tmp_path):
    for report_to in (["none"], []):
        run = tmp_path / f"run{len(report_to)}"
        out = RunLogger(run, True, report_to, {"train": {}})
        out.log(1, {"loss": 1.0, "lrs": {"head": 0.1}})
        out.images(1, "grid", None)
        out.artifact(run)
        out.close()
        assert read_metrics(run)[1]["loss"] == 1.0
        assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
    # the default keeps TensorBoard's tags
    out = RunLogger(tmp_path / "tb", True)
    out.log(1, {"loss": 1.0, "lrs": {"head": 0.1}, "note": "x"})
    out.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    ev.Reload()
    assert sorted(ev.Tags()["scalars"]) == ["train/loss", "train/lrs/head"]


def test_a_tracker_that_fails_is_dropped_and_the_run_goes_on(tmp_path, caplog):
    class Broken(trackers.Tracker):
        name = "broken"
        closed = False

        def log_scalars(self, step, values):
            raise ConnectionError("server went away")

        def close(self):
            Broken.closed = True

    out = RunLogger(tmp_path, True, ["none"])
    out.trackers.append(Broken())
    out.log(1, {"loss": 1.0})
    out.log(2, {"loss": 0.5})
    out.close()
    assert sorted(read_metrics(tmp_path)) == [1, 2] and Broken.closed
    assert [r.getMessage() for r in caplog.records if "broken failed" in r.getMessage()] == [
        "broken failed (ConnectionError: server went away): it gets nothing more from this run; "
        "metrics.jsonl has every line"]


def test_unknown_or_mixed_tracker_names_are_one_line_refusals(tmp_path):
    run = tmp_path / "run"
    for value, msg in (("[tensorboard,wandbb]", "train.report_to: 'wandbb' is unknown; choose from tensorboard, "
                                                "wandb, mlflow and none"),
                       ("[none,wandb]", "train.report_to=['none', 'wandb']: 'none' means no tracker; drop it or the others")):
        rc, log = train_main(["--config", "launch/configs/tiny-debug.yaml", "data.train_shards=/nonexistent/x.tar",
                              f"run_dir={run}", f"train.report_to={value}"])
        assert rc == 2 and msg in log and "Traceback" not in log, log[-3000:]
        assert not run.exists()
    from phoclip_train.config import resolve_config

    assert resolve_config(None, ["train.report_to=mlflow"]).train.report_to == ["mlflow"]
    assert resolve_config(None, []).train.report_to == ["tensorboard"]


def test_a_tracker_not_installed_names_the_extra(tmp_path, monkeypatch):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(SetupError, match=r"^train.report_to=mlflow needs the mlflow-skinny package: "
                                         r"pip install 'phoclip\[trackers\]'$"):
        trackers.check_trackers(["tensorboard", "mlflow"])
    trackers.check_trackers(["tensorboard", "none"])
    run = tmp_path / "run"
    rc, log = train_main(["--config", "launch/configs/tiny-debug.yaml", "data.train_shards=/nonexistent/x.tar",
                          f"run_dir={run}", "train.report_to=[mlflow]"])
    assert rc != 0 and "pip install 'phoclip[trackers]'" in log and "Traceback" not in log, log[-3000:]
    assert not run.exists()
