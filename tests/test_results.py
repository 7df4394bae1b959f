"""Tests of fedavg_relu/core/results.py: atomic, complete outputs."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from fedavg_relu.core.config import RunConfig
from fedavg_relu.core.results import RunWriter, atomic_write_text, read_metrics, resolve_run_dir, rows_to_csv


def test_rows_written_as_jsonl_and_csv(tmp_path):
    """Two rounds -> two JSON lines; NaN/inf become null; the CSV has the union of the keys."""
    writer = RunWriter(tmp_path / "run")
    writer.append_round({"round": 1, "a": 1.5, "b": math.nan})
    writer.append_round({"round": 2, "a": 2.5, "c": math.inf})
    rows = read_metrics(tmp_path / "run")
    assert rows == [{"round": 1, "a": 1.5, "b": None}, {"round": 2, "a": 2.5, "c": None}]
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert lines == ["round,a,b,c", "1,1.5,,", "2,2.5,,"]


def test_config_json_reads_back(tmp_path):
    """config.json holds the kebab-case run config that RunConfig reads back unchanged."""
    cfg = RunConfig(width=64, depth=2)
    writer = RunWriter(tmp_path)
    writer.write_config(cfg, {"input-dim": 64})
    payload = json.loads((tmp_path / "config.json").read_text())
    assert RunConfig.from_mapping(payload["config"]) == cfg
    assert payload["derived"] == {"input-dim": 64}


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    """A failure during the rename keeps the old content and leaves no temporary file."""
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_model_saved_and_loadable(tmp_path):
    """model.pt round-trips a state dict and the config."""
    writer = RunWriter(tmp_path)
    writer.save_model({"state_dict": {"w": torch.ones(2)}, "config": {"width": 3}})
    loaded = torch.load(tmp_path / "model.pt")
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2)) and loaded["config"] == {"width": 3}


def test_run_dir_resolution(tmp_path, monkeypatch):
    """Relative output-dir resolves under $FEDAVG_RELU_HOME; run-name is used as given."""
    monkeypatch.setenv("FEDAVG_RELU_HOME", str(tmp_path))
    assert resolve_run_dir(RunConfig(output_dir="runs", run_name="x")) == tmp_path.resolve() / "runs" / "x"
    auto = resolve_run_dir(RunConfig(output_dir=str(tmp_path), width=64))
    assert auto.parent == tmp_path.resolve() and "paper-m64" in auto.name


def test_rows_to_csv_empty_header_only():
    """No rows -> an empty header line."""
    assert rows_to_csv([]) == "\n"


def test_tensorboard_event_files_hold_the_metrics(tmp_path):
    """tensorboard=true writes one scalar per metric and round, readable by TensorBoard's own reader."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = RunWriter(tmp_path, tensorboard=True)
    writer.append_round({"round": 1, "global-loss": 0.5, "gradient-drift-mean": 2.0})
    writer.append_round({"round": 2, "global-loss": 0.25, "gradient-drift-mean": math.nan})
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("global-loss")] == [(1, 0.5), (2, 0.25)]
    assert [(e.step, e.value) for e in acc.Scalars("gradient-drift-mean")] == [(1, 2.0)]  # NaN rounds left out


def test_metrics_doc_lists_exactly_the_keys_of_round_0(out_dir):
    """docs/metrics.md's sentence on round 0 names the keys a real run's round 0 holds (a tiny in-process run),
    and says ntk-change is absent with ntk-probe-size = 0 (a second run without the probe)."""
    import re
    from pathlib import Path

    from fedavg_relu.runtime.simulation import run_in_process

    doc = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    sentence = re.search(r"Round 0 holds only (.*?)\.\n", doc, re.S).group(1)
    documented = re.findall(r"`([a-z-]+)`", sentence.split("(")[0])
    tiny = {"dataset": "synthetic", "synthetic-num-examples": 40, "synthetic-input-dim": 6, "synthetic-num-classes": 3,
            "num-partitions": 2, "batch-size": "full", "local-steps": 2, "num-server-rounds": 1, "width": 16}
    round0 = read_metrics(run_in_process({**tiny, "run-name": "probe"}))[0]
    assert sorted(round0) == sorted(documented)
    assert round0["ntk-change"] == 0.0 and "absent with `ntk-probe-size = 0`" in sentence
    without = read_metrics(run_in_process({**tiny, "run-name": "no-probe", "ntk-probe-size": 0}))[0]
    assert sorted(without) == sorted(k for k in documented if k != "ntk-change")
