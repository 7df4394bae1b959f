"""Every way a user starts a run works, or stops at once with the fix (issue 12), end to end.

``flwr run .`` exactly as a new user types it: a fresh FLWR_HOME with no federation
configured (Flower >= 1.32 then simulates 2 SuperNodes), Flower's own managed local
SuperLink. Each test gives that SuperLink private ports, home and Ray temp dir
(FLOWER_NOTES: the default ports are machine-wide) and stops every process that
carries its FLWR_HOME, by PID.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedavg_relu.runtime.flower_run import free_port, kill_pids, processes_marked_by, run_config_arg
from fedavg_relu.core.results import read_metrics, read_summary

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.e2e


@pytest.fixture
def plain_flower(tmp_path):
    """Environment of a fresh user shell: new FLWR_HOME, no federation config, private ports."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="fr-ray-", dir="/tmp"))
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # offline: run in this virtualenv
        "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": os.pathsep.join([str(BIN), env.get("PATH", "")]),  # an activated virtualenv
    })
    yield env
    pids = processes_marked_by([f"FLWR_HOME={home}", f"RAY_TMPDIR={ray_tmp}"])
    kill_pids({pid: None for pid in pids}, grace=5.0)
    subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)


def _flwr_run(env, overrides: dict, federation: str | None = None, timeout: float = 900) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [str(BIN / "flwr"), "run", ".", "--stream", "--run-config", run_config_arg(overrides)]
    if federation:
        cmd += ["--federation-config", federation]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if "Failed to start local SuperLink" in proc.stdout + proc.stderr:
        # Flower's CLI waits 15 s for the SuperLink it launched; on a loaded machine it starts later.
        # A user would simply run the command again, which finds that SuperLink answering.
        _wait_for_port(int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]), 120)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def _wait_for_port(port: int, timeout: float) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)


def _status(env, output: str) -> str:
    import re

    run_id = re.search(r"Successfully started run (\d+)", output).group(1)
    ls = subprocess.run([str(BIN / "flwr"), "ls", "--run-id", run_id, "--format", "json"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=60)
    return json.loads(ls.stdout)["runs"][0]["status"]


def test_plain_flwr_run_completes_the_default_run(plain_flower, tmp_path):
    """`flwr run .` with Flower's 2 default SuperNodes and the app's defaults (10 clients, width 2048, ...),
    3 rounds as in the issue's command (`--run-config "num-server-rounds=3"`; the default 10 only adds
    identical rounds): the 10 clients are packed 5 per node, every round trains and measures all 10,
    the run ends finished:completed with summary.json completed, and the console has one line per round."""
    out = tmp_path / "runs"
    proc, _ = _flwr_run(plain_flower, {"output-dir": str(out), "run-name": "default", "num-server-rounds": 3})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert _status(plain_flower, output) == "finished:completed", output[-3000:]
    rows = read_metrics(out / "default")
    assert [r["round"] for r in rows] == list(range(4))
    assert all(r["clients-trained"] == 10 and r["clients-measured"] == 10 for r in rows[1:])
    assert read_summary(out / "default")["status"] == "completed"
    config = json.loads((out / "default" / "config.json").read_text())
    assert config["config"]["clients-per-node"] == 5
    round_lines = [line for line in output.splitlines() if "round " in line and "test-acc" in line]
    assert len(round_lines) == 4  # rounds 0 (W^0) to 3
    assert "Aggregated MetricRecord" not in output  # Flower's per-round dump stays out of the console


def test_flwr_run_with_three_supernodes_for_ten_clients(plain_flower, tmp_path):
    """3 SuperNodes for 10 clients with SCAFFOLD (packed mode beyond FedAvg): ceil(10/3) = 4 per node (4, 4, 2);
    both rounds train and measure all 10, each virtual client's c_k kept on its node's disk."""
    out = tmp_path / "runs"
    proc, _ = _flwr_run(plain_flower, {"output-dir": str(out), "run-name": "three", "num-server-rounds": 2,
                                       "width": 256, "strategy": "scaffold"}, federation="num-supernodes=3")
    output = proc.stdout + proc.stderr
    assert _status(plain_flower, output) == "finished:completed", output[-3000:]
    rows = read_metrics(out / "three")
    assert [(r.get("clients-trained"), r.get("clients-measured")) for r in rows[1:]] == [(10, 10), (10, 10)]
    assert json.loads((out / "three" / "config.json").read_text())["config"]["clients-per-node"] == 4


def test_unrealizable_config_fails_before_any_message(plain_flower, tmp_path):
    """digits, Dirichlet(0.05), 50 clients: the run is marked failed within seconds of starting, its last
    lines name dirichlet-alpha and a value that works, no client ever ran (no client traceback), and
    `fedavg-relu run` refuses it before starting Flower, exit 2."""
    bad = {"partitioner": "dirichlet", "dirichlet-alpha": 0.05, "num-partitions": 50,
           "output-dir": str(tmp_path / "runs"), "run-name": "bad"}
    proc, _ = _flwr_run(plain_flower, bad, federation="num-supernodes=2")
    output = proc.stdout + proc.stderr
    assert _status(plain_flower, output) == "finished:failed"
    tail = "\n".join(output.strip().splitlines()[-15:])
    assert "dirichlet-alpha=0.05" in tail and "works" in tail, tail
    assert "could not split" not in output.lower() and "ClientApp" not in output
    assert not (tmp_path / "runs" / "bad" / "metrics.jsonl").exists()
    cli = subprocess.run(
        [str(BIN / "fedavg-relu"), "run", "--run-config", run_config_arg({k: v for k, v in bad.items()})],
        cwd=ROOT, env=plain_flower, capture_output=True, text=True, timeout=300,
    )
    assert cli.returncode == 2 and "dirichlet-alpha=0.05" in cli.stderr
