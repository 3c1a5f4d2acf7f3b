"""Experiment trackers: where a run's scalars go besides metrics.jsonl, chosen by
`train.report_to` as Hugging Face's `report_to` chooses its integrations. One small
interface (`Tracker`: the config once, scalars at a step, the exported model folder at
the end, close) behind TensorBoard (RUN_DIR/tensorboard/), Weights & Biases and MLflow.
Built on rank 0 only (`metrics.RunLogger`); every tracker gets the same scalars under the
same names (`scalars`), MLflow with the characters its names refuse replaced.

wandb and MLflow are read from their own environment variables, as their Hugging Face
callbacks read them: WANDB_MODE (offline: a local run folder, no network), WANDB_PROJECT,
WANDB_ENTITY, WANDB_NAME, WANDB_DIR; MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME,
MLFLOW_RUN_ID. A resumed run continues the tracker runs it started (their ids are kept
in RUN_DIR/trackers.json).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from torch.utils.tensorboard import SummaryWriter

from phoclip.errors import SetupError
from phoclip.fileio import atomic_write_json, read_regular

logger = logging.getLogger(__name__)

INSTALL = "pip install 'phoclip[trackers]'"
IDS_NAME = "trackers.json"
"""The tracker runs' ids, so that a resumed run logs into the runs it started."""
MAX_IDS_BYTES = 1 << 16
# the module each tracker imports, and the package that brings it
_MODULES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow-skinny")}


def scalars(metrics: dict, prefix: str) -> dict[str, float]:
    """One metrics line's numbers under their tracker names: PREFIX/KEY, and PREFIX/KEY/SUB
    for one level of nesting (per-group learning rates, skipped samples by reason)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)):
            out[f"{prefix}/{k}"] = v
        elif isinstance(v, dict):
            for kk, vv in v.items():
                if isinstance(vv, (int, float)):
                    out[f"{prefix}/{k}/{kk}"] = vv
    return out


class Tracker:
    """What a run tells a tracker; a tracker without a use for a call ignores it."""

    name = ""

    def log_config(self, config: dict) -> None:
        """The resolved run config (nested, as config.yaml holds it), once at the start."""

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        """Scalars (`scalars`' names) at an optimizer step."""

    def log_images(self, step: int, tag: str, images: Any, caption: str = "") -> None:
        """A row of uint8 NCHW images (TensorBoard only)."""

    def log_artifact(self, folder: Path, name: str) -> None:
        """A folder (the exported model) as the run's artifact `name`."""

    def close(self) -> None:
        """Flush and end the tracker's run."""


class TensorBoardTracker(Tracker):
    """RUN_DIR/tensorboard/: scalars under `scalars`' tags, retrieval grids as images; the
    config and the model are the run folder's own files beside it."""

    name = "tensorboard"

    def __init__(self, run_dir: Path) -> None:
        self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self.tb.add_scalar(tag, v, step)

    def log_images(self, step: int, tag: str, images: Any, caption: str = "") -> None:
        self.tb.add_images(tag, images, step, dataformats="NCHW")
        if caption:
            self.tb.add_text(tag + "/query", caption, step)

    def close(self) -> None:
        self.tb.close()


class WandbTracker(Tracker):
    """A Weights & Biases run: project WANDB_PROJECT (default phoclip), named after the run
    folder, files under WANDB_DIR (default the run folder); WANDB_MODE=offline writes
    RUN_DIR/wandb/offline-run-*/ for `wandb sync` later, with no network call."""

    name = "wandb"

    def __init__(self, run_dir: Path, run_id: Optional[str]) -> None:
        import wandb  # the optional extra: only runs that report to wandb import it

        self.wandb = wandb
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "phoclip",
                                  name=os.environ.get("WANDB_NAME") or run_dir.resolve().name,
                                  dir=os.environ.get("WANDB_DIR") or str(run_dir), id=run_id,
                                  resume="allow" if run_id else None, job_type="train", reinit="create_new")
        except Exception as e:  # not logged in, no network, a bad setting: say so before any step
            raise SetupError(f"train.report_to=wandb: wandb could not start a run ({_line(e)}); log in with "
                             "`wandb login`, or log locally with WANDB_MODE=offline") from None
        self.id = self.run.id
        self.where = f"wandb ({self.run.settings.mode}: {Path(self.run.dir).parent})"

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)  # a resumed run may change its config

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def log_artifact(self, folder: Path, name: str) -> None:
        art = self.wandb.Artifact(f"{name}-{self.id}", type="model")  # one per run, as Hugging Face names it
        art.add_dir(str(folder), policy="immutable")  # the export is final: no staging copy of it
        self.run.log_artifact(art)

    def close(self) -> None:
        self.run.finish()


_MLFLOW_BAD = re.compile(r"[^0-9A-Za-z_\-. :/]")


def mlflow_name(name: str) -> str:
    """A metric or param name as MLflow accepts it (alphanumerics and `_-. :/`): R@1 → R_1."""
    return _MLFLOW_BAD.sub("_", name)


class MLflowTracker(Tracker):
    """An MLflow run in experiment MLFLOW_EXPERIMENT_NAME (default phoclip) at
    MLFLOW_TRACKING_URI, or, unset, in a file store in RUN_DIR/mlruns (mlflow-skinny writes
    it; MLflow's own default, a SQLite database, needs the full mlflow); the config as
    flattened params (a.b.c), metrics per step, the model under the artifact path `model`.
    Through a client of its own: no process-wide active run or tracking URI is set."""

    name = "mlflow"

    def __init__(self, run_dir: Path, run_id: Optional[str]) -> None:
        from mlflow.entities import RunStatus  # the optional extra: only runs that report to mlflow import it
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (run_dir / "mlruns").resolve().as_uri()
            # MLflow 3 refuses its file store unless asked for: it is the store that needs
            # no database package and keeps the run's records in its folder
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri, self.where = uri, f"mlflow ({uri})"
        run_id = os.environ.get("MLFLOW_RUN_ID") or run_id
        try:
            self.client = MlflowClient(tracking_uri=uri)
            self.id = self._resumed(run_id) if run_id else None
            if self.id is None:
                exp = self._experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or "phoclip")
                self.id = self.client.create_run(exp, run_name=run_dir.resolve().name,
                                                 tags={"mlflow.source.name": "phoclip-train"}).info.run_id
            else:
                self.client.update_run(self.id, status=RunStatus.to_string(RunStatus.RUNNING))
        except Exception as e:  # a server that does not answer, a store we may not write
            raise SetupError(f"train.report_to=mlflow: MLflow at {uri} could not start a run ({_line(e)}); "
                             "check MLFLOW_TRACKING_URI") from None

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another run created it meanwhile
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def _resumed(self, run_id: str) -> Optional[str]:
        try:
            return self.client.get_run(run_id).info.run_id
        except Exception:
            logger.warning("MLflow run %s is not in %s: starting a new one", run_id, self.uri)
            return None

    def log_config(self, config: dict) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        have = self.client.get_run(self.id).data.params  # a resumed run: params cannot change
        params, changed = [], []
        for k, v in _flat(config).items():
            k = mlflow_name(k)
            if len(v) > MAX_PARAM_VAL_LENGTH:
                logger.warning("mlflow: param %s is %d characters (MLflow keeps %d): not logged", k, len(v),
                               MAX_PARAM_VAL_LENGTH)
            elif k not in have:
                params.append(Param(k, v))
            elif have[k] != v:
                changed.append(k)
        if changed:
            logger.warning("mlflow: the resumed run's params keep their first values (MLflow params "
                           "cannot change); changed since: %s", ", ".join(changed))
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_name(k), float(v), now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's metrics per batch
            self.client.log_batch(self.id, metrics=metrics[i:i + 1000])

    def log_artifact(self, folder: Path, name: str) -> None:
        self.client.log_artifacts(self.id, str(folder), artifact_path="model")

    def close(self) -> None:
        self.client.set_terminated(self.id)


def _flat(tree: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys and text values (YAML/JSON spelling: true, null, [a, b])."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    return out


def _line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 300 else msg[:300] + "..."


def selected(report_to: Iterable[str]) -> list[str]:
    """The trackers named, in order, once each ('none' and [] name none)."""
    return [n for n in dict.fromkeys(report_to) if n != "none"]


def check_trackers(report_to: Sequence[str]) -> None:
    """Refuse, before any work, a tracker whose package is not installed."""
    for name in selected(report_to):
        module, package = _MODULES.get(name, (None, None))
        if module and importlib.util.find_spec(module) is None:
            raise SetupError(f"train.report_to={name} needs the {package} package: {INSTALL}")


def _read_ids(run_dir: Path) -> dict:
    try:
        ids = json.loads(read_regular(run_dir / IDS_NAME, MAX_IDS_BYTES))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("%s unreadable (%s): the trackers start new runs", run_dir / IDS_NAME, _line(e))
        return {}
    return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}


def build_trackers(report_to: Sequence[str], run_dir: Path, config: dict, resume: bool) -> list[Tracker]:
    """The trackers of `report_to`, each told the config; with `resume`, wandb and MLflow
    continue the runs recorded in RUN_DIR/trackers.json. On rank 0 only."""
    names = selected(report_to)
    check_trackers(names)
    saved = _read_ids(run_dir) if resume else {}
    trackers: list[Tracker] = []
    try:
        for name in names:
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(run_dir))
            elif name == "wandb":
                trackers.append(WandbTracker(run_dir, saved.get("wandb")))
            elif name == "mlflow":
                trackers.append(MLflowTracker(run_dir, saved.get("mlflow")))
        ids = {t.name: t.id for t in trackers if getattr(t, "id", None)}
        if ids:
            atomic_write_json(run_dir / IDS_NAME, ids)
        for t in trackers:
            t.log_config(config)
    except BaseException:
        for t in trackers:
            t.close()
        raise
    if trackers:
        logger.info("reporting to %s", ", ".join(getattr(t, "where", t.name) for t in trackers))
    return trackers
