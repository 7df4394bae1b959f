"""Tests of fedavg_relu/flower/checkpoint.py: per-round checkpoints, resume after a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fedavg_relu.core.config import ConfigError, RunConfig
from fedavg_relu.core.results import read_metrics
from fedavg_relu.runtime.simulation import run_in_process

TIMING_KEYS = {"seconds", "elapsed", "drift-seconds"}
BASE = {
    "dataset": "synthetic", "synthetic-num-examples": 400, "num-partitions": 4, "partitioner": "dirichlet",
    "dirichlet-alpha": 0.5, "width": 512, "local-steps": 3, "num-server-rounds": 4, "fraction-train": 0.75,
}


def _history(run_dir):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in read_metrics(run_dir)]


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    """SIGKILL the process running the server after round 2 of 4, resume: the history equals an uninterrupted run's.

    fraction-train = 0.75 makes Flower sample 3 of 4 clients with Python's `random`, so the
    checkpointed random state matters, not only the model.
    """
    reference = run_in_process(dict(BASE, **{"output-dir": str(tmp_path), "run-name": "reference"}))
    killed_cfg = dict(BASE, **{"output-dir": str(tmp_path), "run-name": "killed"})
    script = (
        "import logging; logging.getLogger('flwr').setLevel(logging.ERROR)\n"
        "from fedavg_relu.runtime.simulation import run_in_process\n"
        f"run_in_process({killed_cfg!r})\n"
    )
    metrics = tmp_path / "killed" / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:  # rounds 0, 1, 2 written
                os.killpg(proc.pid, signal.SIGKILL)
                break
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    rows_at_kill = len(read_metrics(tmp_path / "killed"))
    assert 3 <= rows_at_kill < 5
    resumed = run_in_process(dict(killed_cfg, resume=True))
    assert _history(resumed) == _history(reference)
    assert [r["round"] for r in read_metrics(resumed)] == [0, 1, 2, 3, 4]


def test_resume_refuses_a_changed_config(tmp_path):
    """A checkpoint made with width=32 cannot be resumed with width=64: ConfigError names the key and both values."""
    cfg = {"dataset": "synthetic", "synthetic-num-examples": 60, "num-partitions": 2, "width": 32,
           "num-server-rounds": 1, "output-dir": str(tmp_path), "run-name": "r"}
    run_in_process(cfg)
    with pytest.raises(ConfigError, match=r"width=64: expected 32"):
        run_in_process(dict(cfg, width=64, resume=True))


def test_resume_extends_a_finished_run(tmp_path):
    """num-server-rounds may grow on resume: 1 round, then resume to 2 -> rounds 0, 1, 2, the first two kept as written."""
    cfg = {"dataset": "synthetic", "synthetic-num-examples": 60, "num-partitions": 2, "width": 32,
           "num-server-rounds": 1, "output-dir": str(tmp_path), "run-name": "r"}
    first = read_metrics(run_in_process(cfg))
    rows = read_metrics(run_in_process(dict(cfg, **{"num-server-rounds": 2, "resume": True})))
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[:2] == first
    assert json.loads((tmp_path / "r" / "config.json").read_text())["config"]["num-server-rounds"] == 2


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    """resume=true on an empty folder is a normal run."""
    cfg = RunConfig(dataset="synthetic", synthetic_num_examples=60, num_partitions=2, width=16,
                    num_server_rounds=1, output_dir=str(tmp_path), run_name="new", resume=True)
    assert [r["round"] for r in read_metrics(run_in_process(cfg))] == [0, 1]


@pytest.mark.parametrize("every,expected", [(1, [0, 1, 2, 3, 4, 5]), (2, [0, 2, 4, 5]), (0, [5])])
def test_checkpoint_every(tmp_path, monkeypatch, every, expected):
    """checkpoint-every = N writes after rounds 0, N, 2N, ... and after the last; 0 after the last only.

    5 rounds (round 0 = the initial evaluation): N=1 -> 0..5; N=2 -> 0, 2, 4 and 5; N=0 -> 5.
    """
    import fedavg_relu.server_app as server_app
    from fedavg_relu.flower.checkpoint import load_checkpoint

    written: list[int] = []
    real = server_app.save_checkpoint

    def spy(run_dir, server_round, *args):
        written.append(server_round)
        return real(run_dir, server_round, *args)

    monkeypatch.setattr(server_app, "save_checkpoint", spy)
    cfg = {"dataset": "synthetic", "synthetic-num-examples": 60, "num-partitions": 2, "width": 16,
           "num-server-rounds": 5, "output-dir": str(tmp_path), "run-name": "ck", "checkpoint-every": every}
    run_dir = run_in_process(cfg)
    assert written == expected
    assert load_checkpoint(run_dir, RunConfig.from_mapping(cfg)).round == 5


def test_checkpoint_every_is_validated():
    with pytest.raises(ConfigError, match="checkpoint-every=-1"):
        RunConfig.from_mapping({"checkpoint-every": -1})


def test_resume_of_a_checkpoint_from_before_a_new_key(tmp_path):
    """A checkpoint written before a config key existed (here: max-update-ratio, dropped from its saved
    config) resumes when the run uses that key's default, and is refused with any other value."""
    import torch

    cfg = {"dataset": "synthetic", "synthetic-num-examples": 60, "num-partitions": 2, "width": 32,
           "num-server-rounds": 1, "output-dir": str(tmp_path), "run-name": "old"}
    run_in_process(cfg)
    path = tmp_path / "old" / "checkpoint.pt"
    payload = torch.load(path, weights_only=False)
    del payload["config"]["max-update-ratio"]
    torch.save(payload, path)
    rows = read_metrics(run_in_process(dict(cfg, **{"num-server-rounds": 2, "resume": True})))
    assert [r["round"] for r in rows] == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"max-update-ratio=5.0: expected 100.0"):
        run_in_process(dict(cfg, **{"num-server-rounds": 3, "resume": True, "max-update-ratio": 5.0}))


@pytest.mark.parametrize("strategy", [
    "fedavgm", "fedadam", "fedyogi", "fedadagrad",
    "scaffold",
])
def test_resume_equals_uninterrupted_for_every_stateful_strategy(tmp_path, strategy):
    """2 rounds, then resume to 4 == 4 rounds straight, every metric (timings aside), for each strategy
    whose server keeps state between rounds (momentum, Adam/Yogi/Adagrad moments, SCAFFOLD's c and c_k).

    A resume that lost that state would restart the optimizer: rounds 3-4 would differ.
    """
    cfg = {"dataset": "synthetic", "synthetic-num-examples": 120, "num-partitions": 3, "width": 32,
           "local-steps": 2, "strategy": strategy, "output-dir": str(tmp_path)}
    straight = _history(run_in_process(dict(cfg, **{"num-server-rounds": 4, "run-name": "straight"})))
    run_in_process(dict(cfg, **{"num-server-rounds": 2, "run-name": "resumed"}))
    resumed = _history(run_in_process(dict(cfg, **{"num-server-rounds": 4, "run-name": "resumed", "resume": True})))
    assert len(resumed) == 5
    for a, b in zip(straight, resumed, strict=True):
        assert set(a) == set(b)
        for key, value in a.items():
            assert b[key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), (strategy, a["round"], key)
