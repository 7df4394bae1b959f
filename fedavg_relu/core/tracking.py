"""Experiment trackers: a run's params, per-round metrics, outputs and status in MLflow or Weights & Biases.

``tracker = "mlflow"`` or ``"wandb"`` (run-config keys, :class:`~fedavg_relu.core.config.RunConfig`)
sends a run to a tracker as well as to its run folder. :class:`~fedavg_relu.core.results.RunWriter`
does the calls, so every engine gets the same: the run config as params, every round's
metrics with ``step = round``, then the output files as artifacts and the ending status
(``summary.json``'s) as the tag ``status``. Sweeps and comparisons
(:mod:`fedavg_relu.experiments.sweep`) log each finished cell's run folder here, one run per
cell, all under one experiment named after the sweep.

MLflow
    ``mlflow-tracking-uri = ""`` keeps a sqlite store in the output folder
    (``<folder>/mlflow.db``, artifacts in ``<folder>/mlartifacts``): browse it with
    ``mlflow ui --backend-store-uri sqlite:///<folder>/mlflow.db``. Any other URI
    (``http://host:5000``, ``sqlite:///...``, ``file:///...``) is used as given. The
    experiment is the sweep's name, else ``$MLFLOW_EXPERIMENT_NAME``, else ``fedavg-relu``.
    The run ends ``FINISHED`` (completed, and any status but these two), ``FAILED`` (failed)
    or ``KILLED`` (interrupted).
Weights & Biases
    Offline unless ``WANDB_MODE`` says otherwise (``wandb sync <folder>/wandb/offline-run-*``
    uploads later). Project ``$WANDB_PROJECT`` or ``fedavg-relu``; a sweep's cells share the
    run group named after the sweep. The outputs go up as one artifact of type ``run-folder``.

The packages are optional extras (``pip install -e ".[mlflow]"`` / ``".[wandb]"``); this module
imports them only when a tracker starts. It does not import flwr.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedavg_relu.core.config import TRACKERS, ConfigError

#: The run folder's record of its tracker run (so that a resumed run continues the same one).
TRACKING_FILE = "tracking.json"
DEFAULT_EXPERIMENT = "fedavg-relu"
#: ``summary.json`` status -> MLflow's run status (anything else: FINISHED).
MLFLOW_STATUS = {"failed": "FAILED", "interrupted": "KILLED"}


def check_available(tracker: str) -> None:
    """Raise :class:`ConfigError` when ``tracker``'s package is not installed (``none`` needs nothing)."""
    if tracker not in TRACKERS:
        raise ConfigError([f"tracker={tracker!r}: expected one of {', '.join(TRACKERS)}"])
    if tracker != "none" and importlib.util.find_spec(tracker) is None:
        raise ConfigError([
            f"tracker={tracker!r}: expected the {tracker} package to be installed: "
            f'pip install -e ".[{tracker}]" (or pip install {tracker})'
        ])


def default_mlflow_uri(folder: str | os.PathLike) -> str:
    """The local store inside ``folder``: ``sqlite:///<folder>/mlflow.db`` (absolute path)."""
    return f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}"


def scalar_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row, ``round`` left out (it is the step); booleans and ``None`` dropped."""
    return {
        key: float(value) for key, value in row.items()
        if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


class Tracker:
    """A tracker run. This base class tracks nothing (``tracker = "none"``); subclasses send to a service.

    The order of calls: :meth:`log_params` once, :meth:`log_metrics` per round,
    :meth:`log_artifacts` and :meth:`finish` at the end.
    """

    kind = "none"
    run_id = ""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """The run's configuration (flat key -> value)."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """One round's metrics (:func:`scalar_metrics` of the row) at ``step = round``."""

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        """Files of the run folder that exist (figures, ``summary.json``, tables)."""

    def finish(self, status: str) -> None:
        """Tag the run with ``status`` (``summary.json``'s, or ``unknown``) and end it."""

    def record(self) -> dict[str, Any]:
        """What :data:`TRACKING_FILE` keeps to find this run again."""
        return {"tracker": self.kind, "run-id": self.run_id}


class MlflowTracker(Tracker):
    """One MLflow run through :class:`mlflow.MlflowClient` (no global active run, so runs can be logged one
    after another from one process)."""

    kind = "mlflow"

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, tags: Mapping[str, str] | None = None,
                 artifact_folder: str | os.PathLike | None = None, run_id: str | None = None) -> None:
        import logging
        import warnings

        from mlflow import MlflowClient

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables"
        self.tracking_uri = tracking_uri
        with warnings.catch_warnings():  # SQLAlchemy's deprecation notice about MLflow's own store, once per process
            warnings.simplefilter("ignore", DeprecationWarning)
            self.client = MlflowClient(tracking_uri=tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            location = Path(artifact_folder).resolve().as_uri() if artifact_folder is not None else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        self._known_params: dict[str, str] = {}
        if run_id:  # a resumed run continues its tracker run
            run = self.client.get_run(run_id)
            self._known_params = dict(run.data.params)
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        else:
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags or {})).info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        new = [Param(k, str(v)) for k, v in params.items() if k not in self._known_params]  # a param cannot change
        for start in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=new[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, int(step)) for k, v in scalar_metrics(metrics).items()]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), artifact_path=_artifact_dir(path))

    def finish(self, status: str) -> None:
        self.client.set_tag(self.run_id, "status", status)
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FINISHED"))

    def record(self) -> dict[str, Any]:
        return {**super().record(), "tracking-uri": self.tracking_uri, "experiment-id": self.experiment_id}

    def delete_runs_tagged(self, key: str, value: str) -> int:
        """Delete (to MLflow's trash) the experiment's runs whose tag ``key`` is ``value``; return how many."""
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{key}` = '{value}'")
        for run in runs:
            if run.info.run_id != self.run_id:
                self.client.delete_run(run.info.run_id)
        return sum(run.info.run_id != self.run_id for run in runs)


class WandbTracker(Tracker):
    """One Weights & Biases run, offline unless ``WANDB_MODE`` says otherwise; files under ``<folder>/wandb``."""

    kind = "wandb"

    def __init__(self, folder: str | os.PathLike, run_name: str, group: str | None = None,
                 tags: Mapping[str, str] | None = None, run_id: str | None = None) -> None:
        import wandb

        Path(folder).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            mode=os.environ.get("WANDB_MODE", "offline"), dir=str(folder),
            project=os.environ.get("WANDB_PROJECT", DEFAULT_EXPERIMENT), name=run_name, group=group,
            tags=[t for t in (f"{k}={v}" for k, v in (tags or {}).items()) if len(t) <= 64],  # W&B's limit
            config={f"tag.{k}": v for k, v in (tags or {}).items()}, id=run_id, resume="allow" if run_id else None,
            reinit="create_new", settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )
        self.run_id = self.run.id

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.run.config.update(dict(params), allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        self.run.log(scalar_metrics(metrics), step=int(step))

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        import wandb

        if not paths:
            return
        artifact = wandb.Artifact(f"run-folder-{self.run_id}", type="run-folder")
        for path in paths:
            artifact.add_file(str(path), name=f"{_artifact_dir(path) + '/' if _artifact_dir(path) else ''}{path.name}")
        self.run.log_artifact(artifact)

    def finish(self, status: str) -> None:
        self.run.summary["status"] = status
        self.run.tags = tuple(self.run.tags or ()) + (f"status={status}",)
        self.run.finish(exit_code=0 if status not in MLFLOW_STATUS else 1)


def _artifact_dir(path: Path) -> str | None:
    """Figures go under ``figures/`` in the tracker; the run folder's files at the top."""
    return "figures" if path.parent.name == "figures" else None


def open_tracker(tracker: str, folder: str | os.PathLike, run_name: str, experiment: str | None = None,
                 tracking_uri: str = "", tags: Mapping[str, str] | None = None, run_id: str | None = None) -> Tracker:
    """Start (or, with ``run_id``, continue) a run of ``tracker`` whose local files live in ``folder``.

    Parameters
    ----------
    tracker
        ``none``, ``mlflow`` or ``wandb``.
    folder
        The output folder: the default MLflow store and W&B's offline files go there.
    run_name
        The run's name in the tracker (the run folder's name, or a sweep cell's description).
    experiment
        MLflow experiment / W&B group; ``None``: ``$MLFLOW_EXPERIMENT_NAME`` or ``fedavg-relu`` (W&B: no group).
    tracking_uri
        MLflow only; ``""``: :func:`default_mlflow_uri` of ``folder``.
    tags
        Tags of the run (``cell-id``, ``sweep``, ...).
    run_id
        A run started earlier (a resumed run's :data:`TRACKING_FILE`).
    """
    check_available(tracker)
    if tracker == "none":
        return Tracker()
    if tracker == "mlflow":
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        uri = tracking_uri or default_mlflow_uri(folder)
        artifacts = Path(folder) / "mlartifacts" if not tracking_uri else None
        return MlflowTracker(uri, name, run_name, tags, artifact_folder=artifacts, run_id=run_id)
    return WandbTracker(folder, run_name, group=experiment, tags=tags, run_id=run_id)


def read_tracking_record(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run folder's :data:`TRACKING_FILE` (``{}`` when there is none or it is unreadable)."""
    try:
        data = json.loads((Path(run_dir) / TRACKING_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
