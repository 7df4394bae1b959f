"""Tests of fedavg_relu/core/tracking.py and its users: runs, sweeps and comparisons in MLflow and W&B.

Every test logs with the real package and reads the result back as a user would: MLflow with
``MlflowClient`` in another process, W&B from its offline run files (tests/_tracker_readers.py).
"""

from __future__ import annotations

import json

import pytest

from fedavg_relu.core.config import ConfigError, RunConfig
from fedavg_relu.core.results import RunWriter, write_summary
from fedavg_relu.core.tracking import TRACKING_FILE, check_available, default_mlflow_uri, scalar_metrics

from _tracker_readers import mlflow_runs, wandb_offline_runs

pytest.importorskip("mlflow", reason="the mlflow extra (in .[dev]) is not installed")
pytest.importorskip("wandb", reason="the wandb extra (in .[dev]) is not installed")

TINY = {
    "dataset": "synthetic", "synthetic-num-examples": 40, "synthetic-input-dim": 6, "synthetic-num-classes": 3,
    "num-partitions": 2, "batch-size": "full", "local-steps": 2, "num-server-rounds": 2, "width": 16,
}


@pytest.fixture(autouse=True)
def _no_wandb_env(monkeypatch):
    """W&B offline and anonymous, whatever the machine's environment says."""
    for name in ("WANDB_API_KEY", "WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_scalar_metrics_keep_finite_numbers_but_the_round():
    """round is the step; None, booleans, strings and inf are no metrics; ints become floats."""
    row = {"round": 3, "test-loss": 0.5, "clients-trained": 2, "flag": True, "x": None, "s": "a", "inf": float("inf")}
    assert scalar_metrics(row) == {"test-loss": 0.5, "clients-trained": 2.0}


def test_unknown_or_missing_tracker_is_a_config_error(monkeypatch):
    """tracker='mlfow' is refused with the closest name; a tracker whose package is missing names the extra."""
    with pytest.raises(ConfigError, match=r"tracker='mlfow': expected one of none, mlflow, wandb \(did you mean 'mlflow'\?\)"):
        RunConfig.from_mapping({"tracker": "mlfow"})
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r'tracker=.wandb.: expected the wandb package to be installed: pip install -e "\.\[wandb\]"'):
        check_available("wandb")
    check_available("none")  # needs nothing


def _log_run(run_dir, cfg, rounds, status, first=0):
    """What the ServerApp does: config, one row per round, the summary, then close."""
    writer = RunWriter(run_dir)
    writer.write_config(cfg, {"input-dim": 6})
    for r in range(first, first + rounds):
        writer.append_round({"round": r, "test-loss": 1.0 / (r + 1), "clients-trained": 2 if r else None})
    writer.append_clients([{"round": first + rounds - 1, "client": 0, "drift": 0.1}])
    write_summary(run_dir, status, "" if status == "completed" else "stopped by the test")
    writer.close()


@pytest.mark.slow
def test_run_writer_logs_to_mlflow_and_a_resumed_run_continues_the_same_run(tmp_path):
    """Rounds 0-1, interrupted (KILLED), then resumed for round 2 (FINISHED): one MLflow run with the config as
    params, test-loss 1/(r+1) at steps 0, 1, 2, the summary and the per-client table as artifacts, status tagged."""
    run_dir = tmp_path / "runs" / "r1"
    cfg = RunConfig.from_mapping({"tracker": "mlflow", "width": 16, "num-server-rounds": 3})
    _log_run(run_dir, cfg, 2, "interrupted")
    first = json.loads((run_dir / TRACKING_FILE).read_text())
    _log_run(run_dir, cfg.replace(resume=True), 1, "completed", first=2)
    assert json.loads((run_dir / TRACKING_FILE).read_text())["run-id"] == first["run-id"]
    experiments = mlflow_runs(default_mlflow_uri(tmp_path / "runs"))
    (run,) = experiments["fedavg-relu"]
    assert run["name"] == "r1" and run["status"] == "FINISHED" and run["tags"]["status"] == "completed"
    assert run["params"]["width"] == "16" and run["params"]["tracker"] == "mlflow" and run["params"]["input-dim"] == "6"
    assert run["params"]["resume"] == "False"  # a param keeps its first value
    assert run["history"]["test-loss"] == [[0, 1.0], [1, 0.5], [2, pytest.approx(1 / 3)]]
    assert run["history"]["clients-trained"] == [[1, 2.0], [2, 2.0]]  # round 0's None is no metric
    assert {"summary.json", "clients.csv", "metrics.csv", "config.json"} <= set(run["artifacts"])


@pytest.mark.slow
def test_serverapp_run_is_tracked_live_in_mlflow(out_dir):
    """A real 2-round run (in-process grid) with tracker=mlflow: its run holds every round of metrics.jsonl at
    step = round, the status of its summary.json, and the artifacts."""
    from fedavg_relu.core.results import read_metrics, read_summary
    from fedavg_relu.runtime.simulation import run_in_process

    run_dir = run_in_process({**TINY, "tracker": "mlflow", "run-name": "live"})
    rows = read_metrics(run_dir)
    (run,) = mlflow_runs(default_mlflow_uri(run_dir.parent))["fedavg-relu"]
    assert run["tags"]["status"] == read_summary(run_dir)["status"] == "completed" and run["status"] == "FINISHED"
    assert run["history"]["test-loss"] == [[r["round"], pytest.approx(r["test-loss"])] for r in rows]
    assert [s for s, _ in run["history"]["global-loss"]] == [r["round"] for r in rows if "global-loss" in r]
    assert {"summary.json", "clients.csv"} <= set(run["artifacts"])
    assert run["params"]["num-partitions"] == "2"


@pytest.mark.slow
def test_sweep_cells_are_one_mlflow_experiment_with_a_run_per_cell(tmp_path):
    """Two cells (seeds 0, 1) of sweep 'tiny': experiment 'tiny' holds two finished runs tagged with the cell ids,
    each with the cell's seed as a param and its rounds; a rerun (nothing to run) adds no run."""
    from fedavg_relu.experiments.sweep import parse_sweep, run_sweep

    spec = parse_sweep({"sweep": {"name": "tiny", "output-dir": str(tmp_path / "sweep")},
                        "base": {**TINY, "tracker": "mlflow"}, "grid": {"seed": [0, 1]}})
    assert spec.tracker == "mlflow" and all(c.config.tracker == "none" for c in spec.cells())  # the sweep logs
    result = run_sweep(spec, progress=False)
    assert sorted(result.ran) == sorted(c.cell_id for c in spec.cells()) and not result.failed
    columns = result.metrics_path.read_text().splitlines()[0].split(",")
    assert "seed" in columns and "tracker" not in columns and "mlflow-tracking-uri" not in columns  # not cell config
    run_sweep(spec, progress=False)
    runs = mlflow_runs(default_mlflow_uri(tmp_path / "sweep"))["tiny"]
    by_cell = {r["tags"]["cell-id"]: r for r in runs}
    assert len(runs) == 2 and set(by_cell) == {c.cell_id for c in spec.cells()}
    for cell in spec.cells():
        run = by_cell[cell.cell_id]
        assert run["params"]["seed"] == str(cell.config.seed) and run["tags"]["sweep"] == "tiny"
        assert run["status"] == "FINISHED" and run["tags"]["status"] == "completed"
        assert [s for s, _ in run["history"]["test-loss"]] == [0, 1, 2]


@pytest.mark.slow
def test_comparison_cells_are_one_mlflow_experiment_with_a_run_per_cell(tmp_path):
    """fedavg vs fednova, 1 seed, --tracker mlflow: experiment 'cmp' holds one run per strategy, grouped by partition."""
    from fedavg_relu.experiments.compare import override_comparison, parse_comparison, run_comparison

    data = {"compare": {"name": "cmp", "strategies": ["fedavg", "fedprox"], "seeds": [0]},
            "base": dict(TINY), "partitions": {"iid": {"partitioner": "iid"}}}
    spec, target = parse_comparison(override_comparison(data, tracker="mlflow"), output_dir=tmp_path / "cmp")
    run_comparison(spec, target, progress=False)
    runs = mlflow_runs(default_mlflow_uri(tmp_path / "cmp"))["cmp"]
    assert sorted(r["params"]["strategy"] for r in runs) == ["fedavg", "fedprox"]
    assert all(r["tags"]["group"] == "iid" and r["tags"]["status"] == "completed" for r in runs)


def test_run_writer_logs_to_wandb_offline(tmp_path):
    """tracker=wandb: an offline run named after the folder with the config, test-loss at steps 0-2, status
    'completed' in its summary and tags, and one run-folder artifact with the summary and per-client table."""
    run_dir = tmp_path / "runs" / "w1"
    _log_run(run_dir, RunConfig.from_mapping({"tracker": "wandb", "width": 16}), 3, "completed")
    (run,) = wandb_offline_runs(tmp_path / "runs")
    assert run["name"] == "w1" and run["config"]["width"] == 16 and run["config"]["input-dim"] == 6
    assert {step: row["test-loss"] for step, row in run["history"].items()} == {0: 1.0, 1: 0.5, 2: pytest.approx(1 / 3)}
    assert run["summary"]["status"] == "completed" and "status=completed" in run["tags"] and run["exit"] == 0
    (artifact,) = run["artifacts"]
    assert artifact["type"] == "run-folder" and {"summary.json", "clients.csv"} <= set(artifact["files"])


def test_sweep_cells_are_one_wandb_group(tmp_path):
    """A sweep with tracker=wandb: one offline run per cell, all in the group named after the sweep."""
    from fedavg_relu.experiments.sweep import parse_sweep, run_sweep

    spec = parse_sweep({"sweep": {"name": "tiny-wb", "output-dir": str(tmp_path / "sweep")},
                        "base": {**TINY, "tracker": "wandb"}, "grid": {"seed": [0, 1]}})
    run_sweep(spec, progress=False)
    runs = wandb_offline_runs(tmp_path / "sweep")
    assert len(runs) == 2 and {r["group"] for r in runs} == {"tiny-wb"}
    assert sorted(r["config"]["seed"] for r in runs) == [0, 1]
    assert all(sorted(r["history"]) == [0, 1, 2] for r in runs)


def test_tracker_keys_are_the_sweeps_not_part_of_a_cell(tmp_path):
    """tracker in [base] changes no cell id; in a grid it is refused (one tracker per sweep)."""
    from fedavg_relu.experiments.sweep import parse_sweep

    plain = parse_sweep({"base": dict(TINY), "grid": {"seed": [0]}}, output_dir=tmp_path)
    tracked = parse_sweep({"base": {**TINY, "tracker": "mlflow"}, "grid": {"seed": [0]}}, output_dir=tmp_path)
    assert [c.cell_id for c in plain.cells()] == [c.cell_id for c in tracked.cells()]
    with pytest.raises(ConfigError, match=r"grid\[main\]\.tracker: one tracker for the whole sweep"):
        parse_sweep({"base": dict(TINY), "grid": {"tracker": ["mlflow", "wandb"]}}, output_dir=tmp_path)


class _Recorder:
    """A tracker that records its calls; ``fail_at`` makes that method raise."""

    kind = "recorder"
    run_id = "r"

    def __init__(self, fail_at: str = "") -> None:
        self.calls, self.fail_at = [], fail_at

    def __getattr__(self, name):
        def call(*args):
            if name == self.fail_at:
                raise ConnectionError("tracking server went away")
            self.calls.append((name, *args))
        return call


def test_a_failing_tracker_warns_once_and_the_run_goes_on(tmp_path):
    """log_metrics raises at round 0: one warning naming the error, no later tracker call, every file still written."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("fedavg_relu.core.results")
    logger.addHandler(handler)
    tracker = _Recorder(fail_at="log_metrics")
    try:
        writer = RunWriter(tmp_path / "r", tracker=tracker)
        writer.write_config(RunConfig())
        for r in range(3):
            writer.append_round({"round": r, "test-loss": 1.0})
        writer.close()
    finally:
        logger.removeHandler(handler)
    assert [c[0] for c in tracker.calls] == ["log_params"]
    warnings = [r.getMessage() for r in records if "tracker failed" in r.getMessage()]
    assert len(warnings) == 1 and "ConnectionError: tracking server went away" in warnings[0]
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 3


def test_close_tags_the_fresh_summarys_status_or_unknown(tmp_path):
    """close() after write_summary gives the tracker its status; a summary.json older than the writer (a previous
    attempt's) counts for nothing: status 'unknown'."""
    import time

    fresh = _Recorder()
    writer = RunWriter(tmp_path / "a", tracker=fresh)
    write_summary(tmp_path / "a", "failed", "boom")
    writer.close()
    assert fresh.calls[-1] == ("finish", "failed")
    assert [p.name for p in fresh.calls[-2][1]] == ["summary.json"]
    write_summary(tmp_path / "b", "completed", "")
    old = time.time() - 60
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    summary["written-at"] = old
    (tmp_path / "b" / "summary.json").write_text(json.dumps(summary))
    stale = _Recorder()
    RunWriter(tmp_path / "b", tracker=stale).close()
    assert stale.calls[-1] == ("finish", "unknown")
