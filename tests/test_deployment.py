"""A real deployment on loopback: TLS SuperLink, authenticated SuperNodes, `flwr run` (marked e2e).

The processes (SuperLink, SuperNodes, long-running ClientApp workers) run with a private
FLWR_HOME and free ports via :class:`fedavg_relu.deploy.Deployment` and are stopped by PID:
one deployment shared by the first tests (module fixture), a fresh one for the killed-node
test. About 3.5 minutes on 2 cores.
"""

from __future__ import annotations

import math
import os
import stat
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedavg_relu.clientapp_worker import ClientAppWorker
from fedavg_relu.config import RunConfig
from fedavg_relu.data import dataset_shape, load_data_file, make_synthetic
from fedavg_relu.deploy import Deployment
from fedavg_relu.flower_run import pid_alive
from fedavg_relu.models import set_trainable
from fedavg_relu.results import read_metrics
from fedavg_relu.task import initial_params, working_model
from fedavg_relu.training import evaluate

pytestmark = pytest.mark.e2e

APP_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(APP_DIR / "scripts"))
from make_certs import make_certificates  # noqa: E402

DRIFT_KEYS = [
    "global-loss", "loss-before", "model-divergence", "gradient-drift-mean", "gradient-drift-max",
    "relative-gradient-drift-mean", "effective-smoothness-mean", "activation-flips-local",
    "gradient-dissimilarity", "distance-from-init",
]
# small and fast: synthetic inputs (d=20, 4 classes), width 64, 2 rounds
RUN = {"num-server-rounds": 2, "num-partitions": 2, "dataset": "synthetic", "width": 64, "local-steps": 3}


def _write_node_data(folder: Path) -> tuple[Path, Path]:
    """Two device files unlike any built-in partition: 150 examples as .npz, 250 as .csv."""
    x, y = make_synthetic(400, 20, 4, 0.0, seed=123)
    npz, csv = folder / "node1.npz", folder / "node2.csv"
    np.savez(npz, x=x[:150], y=y[:150])
    np.savetxt(csv, np.column_stack([x[150:], y[150:]]), delimiter=",", header=",".join(["f"] * 20 + ["label"]))
    return npz, csv


def _start_two_nodes(dep: Deployment, certs: Path, files: tuple[Path, Path]) -> list:
    for i in (1, 2):
        dep.register(certs / f"supernode-{i}.pub", name=f"device-{i}")
    nodes = [dep.start_supernode(certs / f"supernode-{i}", {"data-path": str(files[i - 1])}) for i in (1, 2)]
    dep.wait_online(2, timeout=60)
    return nodes


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """CA, server certificate for 127.0.0.1/localhost, 5 SuperNode key pairs; plus a foreign CA."""
    root = tmp_path_factory.mktemp("pki")
    make_certificates(root / "certs", num_nodes=5)
    make_certificates(root / "foreign", num_nodes=0)
    return root / "certs"


@pytest.fixture(scope="module")
def node_files(tmp_path_factory) -> tuple[Path, Path]:
    return _write_node_data(tmp_path_factory.mktemp("device-data"))


@pytest.fixture(scope="module")
def deployment(certs, node_files, tmp_path_factory):
    """One TLS + auth SuperLink with two registered SuperNodes (process isolation + worker)."""
    dep = Deployment(certs, home=tmp_path_factory.mktemp("flwr-home"))
    try:
        dep.start()
        _start_two_nodes(dep, certs, node_files)
        yield dep
    finally:
        dep.stop()


@pytest.fixture(scope="module")
def run_with_intruders(deployment, certs, tmp_path_factory):
    """2 rounds on the two registered nodes, started while three unauthorised SuperNodes try to join.

    Returns (run result, metrics rows, the intruding SuperNodes, their exit codes).
    """
    deployment.register(certs / "supernode-3.pub", name="registered-but-wrong-ca")
    bounded = {"isolation": "subprocess", "max_retries": 2, "max_wait_time": 20}
    rogues = {
        "unregistered": deployment.start_supernode(
            certs / "supernode-4", {"partition-id": 0}, name="rogue-unregistered", **bounded),
        "wrong-ca": deployment.start_supernode(
            certs / "supernode-3", {"partition-id": 0}, name="rogue-wrong-ca",
            root_certificates=certs.parent / "foreign" / "ca.crt", **bounded),
        "no-key": deployment.start_supernode(None, {"partition-id": 0}, name="rogue-no-key", **bounded),
    }
    out = tmp_path_factory.mktemp("runs")
    result = deployment.run(APP_DIR, {**RUN, "output-dir": str(out), "run-name": "ref"}, timeout=300)
    codes = {name: node.wait(timeout=60) for name, node in rogues.items()}
    rows = read_metrics(out / "ref") if (out / "ref" / "metrics.jsonl").exists() else []
    return result, rows, rogues, codes


def test_make_certs_keys_private_and_idempotent(tmp_path):
    """Private keys are 0600; a rerun keeps every file and adds only missing node keys."""
    first = make_certificates(tmp_path / "c", num_nodes=1)
    assert {p.name for p in first["created"]} == {
        "ca.crt", "ca.key", "server.pem", "server.key", "supernode-1", "supernode-1.pub"}
    for name in ("ca.key", "server.key", "supernode-1"):
        assert stat.S_IMODE((tmp_path / "c" / name).stat().st_mode) == 0o600
    before = (tmp_path / "c" / "ca.crt").read_bytes()
    second = make_certificates(tmp_path / "c", num_nodes=2)
    assert {p.name for p in second["created"]} == {"supernode-2", "supernode-2.pub"}
    assert (tmp_path / "c" / "ca.crt").read_bytes() == before
    assert (tmp_path / "c" / "supernode-2.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    (tmp_path / "c" / "server.key").unlink()
    with pytest.raises(FileExistsError, match="--force"):
        make_certificates(tmp_path / "c", num_nodes=2)


def test_tls_auth_run_with_device_files(deployment, run_with_intruders, node_files):
    """TLS SuperLink + node auth, 2 registered SuperNodes reading their own files, `flwr run` 2 rounds.

    The run finishes, every round's drift metrics come from both nodes, and round 1's
    loss-before equals the loss of W^0 on the two files together
    (sum_k p_k f_k(W^0) = mean loss over the union, p_k = n_k / N), so each node trained on its file.
    """
    result, rows, _, _ = run_with_intruders
    assert result.returncode == 0, result.output[-3000:]
    assert result.status == "finished:completed", result.output[-3000:]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["clients-trained"] == 2 and row["clients-failed"] == 0
        assert row["clients-measured"] == 2 and row["clients-unmeasured"] == 0
        for key in DRIFT_KEYS:
            assert row[key] is not None and math.isfinite(row[key]), key
        assert row["gradient-drift-mean"] > 0
    cfg = RunConfig.from_mapping(RUN)
    input_dim, num_classes = dataset_shape(cfg)
    data = [load_data_file(p, input_dim, num_classes) for p in node_files]
    model = working_model(cfg)
    set_trainable(model, initial_params(cfg))
    loss_w0, _ = evaluate(model, torch.cat([d.x for d in data]), torch.cat([d.y for d in data]), cfg.loss)
    assert rows[1]["loss-before"] == pytest.approx(loss_w0, rel=1e-5)
    assert rows[2]["global-loss"] < rows[1]["loss-before"]
    for node in deployment.supernodes[:2]:  # the drift state survived between the two exchanges
        assert "query.drift task done" in node.worker_log()


def test_unregistered_key_and_wrong_ca_are_refused(deployment, run_with_intruders):
    """During the run above: an unregistered key gets Flower's `[code: 2004] Failed to activate
    SuperNode`, a registered key trusting another CA `CERTIFICATE_VERIFY_FAILED`, a SuperNode
    without a key `[code: 2001]`; all exit and none is ever online, so every round sampled exactly
    the two registered nodes (whose data the previous test identifies). A local process without
    a SuperNode's Runtime API secret is refused its tasks (401)."""
    result, rows, rogues, codes = run_with_intruders
    assert all(code != 0 for code in codes.values()), codes
    assert "[code: 2004] Failed to activate SuperNode" in rogues["unregistered"].log()
    assert "CERTIFICATE_VERIFY_FAILED" in rogues["wrong-ca"].log()
    assert "[code: 2001] SuperNode authentication is enabled" in rogues["no-key"].log()
    for node in rogues.values():
        assert "Exit Code: 305" in node.log()
    statuses = deployment.nodes()
    assert len([n for n in statuses if n["status"] == "online"]) == 2
    wrong_ca = [n for n in statuses if n["status"] == "registered"]
    assert len(wrong_ca) == 1 and wrong_ca[0]["online-at"] == "N/A"  # registered, never connected
    assert result.status == "finished:completed", result.output[-3000:]
    assert len(rows) == 3
    for row in rows[1:]:
        assert row["clients-sampled"] == 2 and row["clients-trained"] == 2 and row["clients-failed"] == 0
    # on the device: a local process without the SuperNode's secret cannot take its tasks
    intruder = ClientAppWorker(f"127.0.0.1:{deployment.supernodes[0].runtime_port}")
    with pytest.raises(RuntimeError, match="refused AcquireTask \\(401\\)"):
        intruder.serve(max_tasks=1)


def test_missing_data_file_fails_only_that_node(deployment, run_with_intruders, certs, tmp_path):
    """A registered SuperNode whose data-path does not exist: its reply carries the reason (in the
    ServerApp's log), it is counted in clients-failed, and the run completes with the other two."""
    deployment.register(certs / "supernode-5.pub", name="device-without-data")
    missing = tmp_path / "missing.npz"
    node = deployment.start_supernode(certs / "supernode-5", {"data-path": str(missing)}, name="no-data")
    try:
        deployment.wait_online(3, timeout=60)
        result = deployment.run(
            APP_DIR, {**RUN, "num-server-rounds": 1, "output-dir": str(tmp_path), "run-name": "no-data"}, timeout=300
        )
    finally:
        node.stop()
    assert result.status == "finished:completed", result.output[-3000:]
    assert f"data-path={str(missing)!r}: no such file" in result.output
    row = read_metrics(tmp_path / "no-data")[1]
    assert row["clients-sampled"] == 3 and row["clients-trained"] == 2 and row["clients-failed"] == 1
    assert row["clients-measured"] == 2 and row["round-skipped"] == 0


def test_supernode_killed_mid_run(certs, node_files, tmp_path):
    """A SuperNode (and its ClientApp worker) SIGKILLed when its round-2 train message arrives:
    the run completes with the other node, and round 2 counts the loss (clients-failed or
    clients-unmeasured >= 1) while round 1 is complete."""
    with Deployment(certs, home=tmp_path / "flwr-home") as dep:
        survivor, victim = _start_two_nodes(dep, certs, node_files)
        killed = threading.Event()

        def watch() -> None:  # kill as soon as the victim logs receiving its second train message
            while not killed.is_set():
                if victim.log().count("Receiving: train message") >= 2:
                    victim.kill()
                    killed.set()
                    return
                if not victim.alive():
                    return
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        pids = [dep.superlink.pid, survivor.process.pid, survivor.worker.pid]
        result = dep.run(
            APP_DIR, {**RUN, "round-timeout": 15.0, "output-dir": str(tmp_path), "run-name": "killed"}, timeout=300
        )
        killed.set()
        watcher.join(timeout=5)
        assert not victim.alive() and victim.process.returncode == -9, victim.log()[-2000:]
        assert survivor.alive()
    assert not any(pid_alive(pid) for pid in pids)
    assert result.returncode == 0, result.output[-3000:]
    assert result.status == "finished:completed", result.output[-3000:]
    rows = read_metrics(tmp_path / "killed")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["clients-trained"] == 2 and rows[1]["clients-failed"] == 0 and rows[1]["clients-measured"] == 2
    lost = rows[2]
    assert lost["clients-sampled"] == 2
    assert lost["clients-failed"] + lost["clients-unmeasured"] >= 1, lost
    assert lost["clients-measured"] == 1
    assert lost["round-skipped"] == 0 and math.isfinite(lost["global-loss"])
