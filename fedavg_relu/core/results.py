"""Writing a run's outputs: never half-written (write to a temporary file, then rename).

One folder per run holds ``config.json``, ``metrics.jsonl`` (one JSON object per
round, flat kebab-case keys, non-finite values as ``null``), ``metrics.csv`` (the
same table), ``model.pt`` (the final global model's full state dict and the
config), ``summary.json`` (how the run ended: :func:`write_summary`) and, on
request, TensorBoard event files under ``tensorboard/``. With ``client-metrics``
it also holds the per-client table: ``clients.jsonl`` (one JSON object per
(round, client), appended each round) and ``clients.csv`` (the same table).
With ``tracker = "mlflow"`` or ``"wandb"`` the same goes to an experiment tracker
(:mod:`fedavg_relu.core.tracking`), and ``tracking.json`` names the tracker run.

This module does not import flwr.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedavg_relu.core.config import RunConfig
from fedavg_relu.core.tracking import TRACKING_FILE, Tracker, default_mlflow_uri, open_tracker, read_tracking_record

_log = logging.getLogger(__name__)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def resolve_run_dir(cfg: RunConfig, now: _dt.datetime | None = None) -> Path:
    """``output-dir/run-name``; a relative ``output-dir`` is taken from $FEDAVG_RELU_HOME or the cwd."""
    base = Path(cfg.output_dir).expanduser()
    if not base.is_absolute():
        base = Path(os.environ.get("FEDAVG_RELU_HOME", os.getcwd())) / base
    name = cfg.run_name
    if not name:
        stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
        name = f"{stamp}-{cfg.model_family}-m{cfg.width}-L{cfg.depth}-tau{cfg.local_steps}-{cfg.partitioner}-s{cfg.seed}"
    return base.resolve() / name


class RunWriter:
    """Owns one run folder; every write replaces a whole file atomically.

    Side jobs hang off the writes: TensorBoard (``tensorboard``) and an experiment tracker.
    The tracker is ``tracker`` when given, else the one the run config names, started by
    :meth:`write_config` (which logs the config as params). Every :meth:`append_round` logs
    the round's metrics at ``step = round``; :meth:`close` logs the outputs and the status
    of the ``summary.json`` written since the writer was made, so call it after
    :func:`write_summary`.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = False, rows: list[dict[str, Any]] | None = None,
                 tracker: Tracker | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = list(rows or [])  # earlier rounds, when resuming
        self._client_rows: list[dict[str, Any]] = []  # clients.jsonl's rows (see resume_clients)
        self._started = time.time()
        self.tracker = tracker
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # tensorboard is optional
                raise RuntimeError("tensorboard=true needs the `tensorboard` package: pip install tensorboard") from err
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def write_config(self, cfg: RunConfig, extra: Mapping[str, Any] | None = None) -> None:
        """``config.json``: the run config (kebab-case keys) and derived facts under ``derived``."""
        payload = {"config": cfg.to_mapping(), "derived": dict(extra or {})}
        atomic_write_text(self.run_dir / "config.json", json.dumps(payload, indent=2, sort_keys=True) + "\n")
        if self.tracker is None and cfg.tracker != "none":
            self.tracker = self._start_tracker(cfg)
        self._track("log_params", {**payload["config"], **payload["derived"]})

    def _start_tracker(self, cfg: RunConfig) -> Tracker:
        """The run config's tracker: a new run, or the recorded one when ``resume`` continues this folder."""
        record = read_tracking_record(self.run_dir) if cfg.resume else {}
        uri = cfg.mlflow_tracking_uri or default_mlflow_uri(self.run_dir.parent)
        same = record.get("tracker") == cfg.tracker and (cfg.tracker != "mlflow" or record.get("tracking-uri") == uri)
        tracker = open_tracker(cfg.tracker, self.run_dir.parent, self.run_dir.name, tracking_uri=cfg.mlflow_tracking_uri,
                               tags={"run-dir": str(self.run_dir)}, run_id=record.get("run-id") if same else None)
        atomic_write_text(self.run_dir / TRACKING_FILE, json.dumps(tracker.record(), indent=1) + "\n")
        return tracker

    def _track(self, method: str, *args: Any) -> None:
        """Call the tracker; a tracker that fails warns once and is dropped: the run and its files go on."""
        if self.tracker is None:
            return
        try:
            getattr(self.tracker, method)(*args)
        except Exception as err:  # noqa: BLE001 - a tracking server's hiccup must not end a long run
            _log.warning("fedavg-relu: the %s tracker failed (%s: %s); the run goes on without it",
                         self.tracker.kind, type(err).__name__, err)
            self.tracker = None

    def append_round(self, row: Mapping[str, Any]) -> None:
        """Add one round's row and rewrite ``metrics.jsonl`` and ``metrics.csv``."""
        clean = {k: _clean(v) for k, v in row.items()}
        self.rows.append(clean)
        lines = "".join(json.dumps(r, sort_keys=False, allow_nan=False) + "\n" for r in self.rows)
        atomic_write_text(self.run_dir / "metrics.jsonl", lines)
        atomic_write_text(self.run_dir / "metrics.csv", rows_to_csv(self.rows))
        step = int(row.get("round", len(self.rows) - 1))
        self._track("log_metrics", clean, step)
        if self._tb is not None:
            for key, value in clean.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "round":
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    # --- the per-client table ----------------------------------------------------
    CLIENTS_JSONL = "clients.jsonl"
    CLIENTS_CSV = "clients.csv"

    def resume_clients(self, through_round: int) -> int:
        """Keep the per-client rows of rounds ``<= through_round`` (0: a fresh run keeps none); return how many.

        A resumed run continues after its checkpoint's round: rows the interrupted run
        wrote for later rounds (and a line cut short by the interruption) are dropped,
        so ``clients.jsonl`` holds each (round, client) once. Without any row left both
        files are removed.
        """
        self._client_rows = []
        path = self.run_dir / self.CLIENTS_JSONL
        if through_round > 0 and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("round"), int) and row["round"] <= through_round:
                    self._client_rows.append(row)
        if self._client_rows:
            self._write_clients()
        else:
            for name in (self.CLIENTS_JSONL, self.CLIENTS_CSV):
                (self.run_dir / name).unlink(missing_ok=True)
        return len(self._client_rows)

    def append_clients(self, rows: list[Mapping[str, Any]]) -> None:
        """Add one round's per-client rows: append them to ``clients.jsonl``, rewrite ``clients.csv`` atomically.

        Non-finite values are written as ``null`` (empty in the csv), as in ``metrics.jsonl``.
        """
        clean = [{k: _clean(v) for k, v in row.items()} for row in rows]
        if not clean:
            return
        self._client_rows.extend(clean)
        with open(self.run_dir / self.CLIENTS_JSONL, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r, allow_nan=False) + "\n" for r in clean))
            fh.flush()
            os.fsync(fh.fileno())
        atomic_write_text(self.run_dir / self.CLIENTS_CSV, rows_to_csv(self._client_rows))

    def _write_clients(self) -> None:
        lines = "".join(json.dumps(r, allow_nan=False) + "\n" for r in self._client_rows)
        atomic_write_text(self.run_dir / self.CLIENTS_JSONL, lines)
        atomic_write_text(self.run_dir / self.CLIENTS_CSV, rows_to_csv(self._client_rows))

    def save_model(self, state: Mapping[str, Any]) -> Path:
        """``model.pt`` via ``torch.save`` of ``state``, atomically."""
        import torch

        buffer = io.BytesIO()
        torch.save(dict(state), buffer)
        path = self.run_dir / "model.pt"
        atomic_write_bytes(path, buffer.getvalue())
        return path

    def close(self) -> None:
        """Close the TensorBoard writer; give the tracker the outputs and the status of a ``summary.json``
        written since this writer was made (``unknown`` without one), and end its run."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.tracker is not None:
            summary = read_summary(self.run_dir) or {}
            fresh = float(summary.get("written-at") or 0.0) >= self._started
            self._track("log_artifacts", run_artifacts(self.run_dir))
            self._track("finish", str(summary.get("status", "unknown")) if fresh else "unknown")
            self.tracker = None


def run_artifacts(run_dir: Path | str) -> list[Path]:
    """The files of a run folder a tracker keeps: ``summary.json``, ``config.json``, ``metrics.csv``,
    the per-client ``clients.csv``, and the figures under ``figures/`` (those that exist)."""
    run_dir = Path(run_dir)
    names = ("summary.json", "config.json", "metrics.csv", RunWriter.CLIENTS_CSV)
    paths = [run_dir / name for name in names if (run_dir / name).is_file()]
    figures = run_dir / "figures"
    if figures.is_dir():
        paths += sorted(p for p in figures.iterdir() if p.suffix in (".png", ".pdf", ".svg"))
    return paths


def track_run_folder(run_dir: Path | str, tracker: Tracker) -> str:
    """Log a finished run folder to ``tracker``, as a live run would have: config, rounds, outputs, status.

    For runs that did not track themselves (a sweep's cells). Returns the status logged
    (``summary.json``'s; ``unknown`` without one).
    """
    run_dir = Path(run_dir)
    with open(run_dir / "config.json", encoding="utf-8") as fh:
        saved = json.load(fh)
    tracker.log_params({**saved.get("config", {}), **saved.get("derived", {})})
    for i, row in enumerate(read_metrics(run_dir)):
        tracker.log_metrics(row, int(row.get("round", i)))
    status = str((read_summary(run_dir) or {}).get("status", "unknown"))
    tracker.log_artifacts(run_artifacts(run_dir))
    tracker.finish(status)
    return status


def rows_to_csv(rows: list[Mapping[str, Any]]) -> str:
    """CSV of ``rows`` with the union of their keys as columns (first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return out.getvalue()


def read_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``."""
    with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_clients(run_dir: Path | str) -> list[dict[str, Any]]:
    """The rows of a run's ``clients.jsonl`` (one per (round, client)); ``[]`` when the run wrote none."""
    path = Path(run_dir) / RunWriter.CLIENTS_JSONL
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


SUMMARY_NAME = "summary.json"
SUMMARY_STATUSES = ("completed", "degraded", "failed", "interrupted")


def _count_from_metrics(run_dir: Path) -> dict[str, int]:
    """``rounds-completed`` and the summed client counters of the run folder's ``metrics.jsonl`` (0 when absent)."""
    try:
        rows = read_metrics(run_dir)
    except (OSError, json.JSONDecodeError):
        rows = []
    rounds = [int(r["round"]) for r in rows if isinstance(r.get("round"), (int, float))]
    return {
        "rounds-completed": max(rounds, default=0),
        "clients-failed": int(sum(r.get("clients-failed") or 0 for r in rows)),
        "clients-rejected": int(sum(r.get("clients-rejected") or 0 for r in rows)),
        "clients-unmeasured": int(sum(r.get("clients-unmeasured") or 0 for r in rows)),
    }


def write_summary(run_dir: Path | str, status: str, reason: str, **fields: Any) -> Path:
    """Write ``run_dir/summary.json`` atomically: how the run ended; return its path.

    ``status`` is one of :data:`SUMMARY_STATUSES`; ``reason`` says why (``""``
    when completed). Keyword fields are stored under kebab-case keys
    (``rounds_completed=3`` -> ``"rounds-completed": 3``). ``rounds-completed``
    (the last round in ``metrics.jsonl``), ``clients-failed`` and
    ``clients-rejected`` (summed over its rows) default to what the metrics file
    says; ``run-dir`` is the absolute folder and ``written-at`` the Unix time.
    """
    if status not in SUMMARY_STATUSES:
        raise ValueError(f"status={status!r}: expected one of {SUMMARY_STATUSES}")
    run_dir = Path(run_dir).resolve()
    extra = {key.replace("_", "-"): value for key, value in fields.items()}
    payload: dict[str, Any] = {"status": status, "reason": str(reason)}
    payload.update(_count_from_metrics(run_dir))
    payload.update({"run-dir": str(run_dir), "written-at": time.time()})
    payload.update(extra)
    path = run_dir / SUMMARY_NAME
    atomic_write_text(path, json.dumps({k: _clean(v) for k, v in payload.items()}, indent=2, default=str) + "\n")
    return path


def read_summary(run_dir: Path | str) -> dict[str, Any] | None:
    """The run folder's ``summary.json``; ``None`` when it is missing or not a JSON object."""
    try:
        payload = json.loads((Path(run_dir) / SUMMARY_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return payload if isinstance(payload, dict) else None
