"""A real deployment on loopback: TLS SuperLink, authenticated SuperNodes, `flwr run` (e2e tests marked).

The processes (SuperLink, SuperNodes, long-running ClientApp workers) run with a private
FLWR_HOME and free ports via :class:`fedavg_relu.runtime.deploy.Deployment` and are stopped by PID:
one deployment shared by the first tests (module fixture, started from a PATH without this
virtualenv), a fresh one for each killed-node or signal test. The unmarked tests (the reply
deadline against Flower's own HttpGrid, stop_groups, PATH handling) take seconds.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fedavg_relu.server_app
from fedavg_relu.runtime.clientapp_worker import EXIT_GRACE, ClientAppWorker
from fedavg_relu.core.config import RunConfig
from fedavg_relu.core.data import dataset_shape, load_data_file, make_synthetic
from fedavg_relu.runtime.deploy import Deployment, path_with_venv_first, stop_groups, venv_bin
from fedavg_relu.flower.reply_deadline import PULL_BACKOFF_CAP, ReplyDeadlineGrid, bound_reply_waits
from fedavg_relu.runtime.flower_run import free_port, pid_alive
from fedavg_relu.core.models import set_trainable
from fedavg_relu.core.results import read_metrics
from fedavg_relu.core.task import initial_params, working_model
from fedavg_relu.core.training import evaluate

e2e = pytest.mark.e2e
#: Whether the ServerApp bounds reply uploads by round-timeout (fedavg_relu.server_app.main wraps its grid)
SERVER_APP_BOUNDS_REPLIES = "bound_reply_waits" in inspect.getsource(fedavg_relu.server_app)
#: A PATH without this virtualenv, as in a fresh shell
BARE_PATH = os.pathsep.join(p for p in ("/usr/local/bin", "/usr/bin", "/bin") if os.path.isdir(p))

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
    """One TLS + auth SuperLink with two registered SuperNodes (process isolation + worker),
    started from a PATH that lacks this virtualenv (flower-superlink finds flower-superexec anyway)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", BARE_PATH)
        dep = Deployment(certs, home=tmp_path_factory.mktemp("flwr-home"))
    assert dep.env["PATH"].split(os.pathsep)[0] == str(venv_bin())
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


@e2e
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


@e2e
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


@e2e
def test_a_node_with_wrong_dimension_data_fails_alone_and_the_run_is_degraded(deployment, run_with_intruders, certs, tmp_path):
    """A registered SuperNode whose own data file has 32 features where the model expects 20: its reply carries
    the reason (in the ServerApp's log), it is counted in clients-failed, the other two train and are measured,
    and the run, which Flower reports finished:completed, ends 'degraded' in summary.json naming that node with
    its first error; `fedavg-relu run`'s decision (run_outcome) on it is exit 3."""
    from fedavg_relu.cli import run_outcome
    from fedavg_relu.core.results import read_summary

    deployment.register(certs / "supernode-5.pub", name="device-with-wrong-data")
    wrong = tmp_path / "wrong.npz"
    x, y = make_synthetic(60, 32, 4, 0.0, seed=5)
    np.savez(wrong, x=x, y=y)
    node = deployment.start_supernode(certs / "supernode-5", {"data-path": str(wrong)}, name="wrong-data")
    try:
        deployment.wait_online(3, timeout=60)
        result = deployment.run(
            APP_DIR, {**RUN, "num-server-rounds": 1, "output-dir": str(tmp_path), "run-name": "wrong"}, timeout=300
        )
    finally:
        node.stop()
    assert result.status == "finished:completed", result.output[-3000:]
    assert "32" in result.output and str(wrong) in result.output
    row = read_metrics(tmp_path / "wrong")[1]
    assert row["clients-sampled"] == 3 and row["clients-trained"] == 2 and row["clients-failed"] == 1
    assert row["clients-measured"] == 2 and row["round-skipped"] == 0
    summary = read_summary(tmp_path / "wrong")
    assert summary["status"] == "degraded" and len(summary["failing"]) == 1
    assert summary["failing"][0]["rounds-failed"] == summary["failing"][0]["rounds-sampled"] == 1
    assert "32" in summary["failing"][0]["first-error"]
    assert run_outcome(summary, result.status, result.returncode, result.run_id, tmp_path / "wrong").exit_code == 3


@e2e
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
            APP_DIR, {**RUN, "round-timeout": 30.0, "output-dir": str(tmp_path), "run-name": "killed"}, timeout=400
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


# --- PATH, stopping, the reply deadline (no deployment; seconds) ----------------------------------


def test_path_with_venv_first_puts_this_env_first_once():
    """The virtualenv's bin (where flower-superexec lives) goes first, and an existing copy is dropped."""
    first = str(venv_bin())
    assert (venv_bin() / "flower-superexec").exists()
    assert path_with_venv_first(BARE_PATH).split(os.pathsep) == [first, *BARE_PATH.split(os.pathsep)]
    assert path_with_venv_first(f"/usr/bin{os.pathsep}{first}").split(os.pathsep) == [first, "/usr/bin"]
    assert path_with_venv_first(None) == first


def test_stop_groups_terms_together_and_kills_what_ignores_sigterm():
    """Two process groups get SIGTERM at once: the polite one is gone at once, the one that traps
    SIGTERM is SIGKILLed after term_wait (1 s); together about 1 s, not 1 s per process."""
    polite = subprocess.Popen(["sleep", "60"], start_new_session=True)
    stubborn = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 60 & wait; sleep 60"], start_new_session=True)
    time.sleep(0.3)  # let bash install its trap
    seconds = stop_groups([polite, stubborn, None], term_wait=1.0)
    assert polite.returncode == -signal.SIGTERM
    assert stubborn.returncode == -signal.SIGKILL
    assert 1.0 <= seconds < 3.0


class _UploadRuntime:
    """The SuperLink's Runtime API as Flower's HttpGrid sees it. PushMessages stores the instructions.
    PullMessages returns a reply once it is due (``delay`` s after the push): its message and object
    tree are stored. A complete reply's objects can be pulled. A stalled reply (its SuperNode died
    mid-upload) answers every PullObject with "found, not available yet", until ``expire()``."""

    def __init__(self, replies) -> None:
        self._replies = replies  # list of (instruction Message, stalled, delay), in push order
        self.pushed_at: float | None = None
        self.contents: dict[str, bytes] = {}  # objects of complete replies
        self.pulled: set[str] = set()
        self.object_pulls = 0
        self.expired = threading.Event()

    def PushMessages(self, request):  # noqa: N802 - Flower's method names
        from flwr.proto.runtime_pb2 import PushAppMessagesResponse  # noqa: PLC0415

        self.pushed_at = time.monotonic()
        ids = [m.metadata.message_id for m in request.messages_list]
        return PushAppMessagesResponse(message_ids=ids, objects_to_push=[], session_id="s")

    def PushObject(self, request):  # noqa: N802
        raise AssertionError("nothing to push")

    def PullMessages(self, request):  # noqa: N802
        import numpy as np  # noqa: PLC0415
        from flwr.app import ArrayRecord, Message, RecordDict  # noqa: PLC0415
        from flwr.app.message import remove_content_from_message  # noqa: PLC0415
        from flwr.common.serde import message_to_proto  # noqa: PLC0415
        from flwr.proto.runtime_pb2 import PullAppMessagesResponse  # noqa: PLC0415
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree  # noqa: PLC0415

        protos, trees = [], []
        for ins, stalled, delay in self._replies:
            ins_id = ins.metadata.message_id
            if ins_id not in request.message_ids or ins_id in self.pulled:
                continue
            if time.monotonic() < self.pushed_at + delay:
                continue
            self.pulled.add(ins_id)  # the SuperLink hands a reply out once
            reply = Message(RecordDict({"arrays": ArrayRecord([np.ones((64, 64), np.float32)])}), reply_to=ins)
            reply.metadata.__dict__["_message_id"] = reply.object_id
            if not stalled:
                self.contents.update({k: o.deflate() for k, o in get_all_nested_objects(reply).items()})
            trees.append(get_object_tree(reply))
            protos.append(message_to_proto(remove_content_from_message(reply)))
        return PullAppMessagesResponse(messages_list=protos, message_object_trees=trees)

    def PullObject(self, request):  # noqa: N802
        from flwr.proto.message_pb2 import PullObjectResponse  # noqa: PLC0415

        self.object_pulls += 1
        if request.object_id in self.contents:
            return PullObjectResponse(object_found=True, object_available=True,
                                      object_content=self.contents[request.object_id])
        if self.expired.is_set():  # the SuperLink deleted the session's objects
            return PullObjectResponse(object_found=False, object_available=False)
        return PullObjectResponse(object_found=True, object_available=False)

    def ConfirmMessageReceived(self, request):  # noqa: N802
        from flwr.proto.message_pb2 import ConfirmMessageReceivedResponse  # noqa: PLC0415

        assert request.message_object_id not in {i for i in self.pulled if i not in self.contents}
        return ConfirmMessageReceivedResponse()


def _http_grid(*replies):
    """Flower's real HttpGrid talking to :class:`_UploadRuntime`; the instructions it will send.

    ``replies``: (stalled, delay) per instruction, to nodes 7, 8, ...
    """
    from flwr.app import Message, RecordDict  # noqa: PLC0415
    from flwr.superlink.grid.http_grid import HttpGrid  # noqa: PLC0415
    from flwr.supercore.run import Run  # noqa: PLC0415
    from flwr.supercore.task_identity import TaskIdentity  # noqa: PLC0415

    instructions = [Message(RecordDict(), dst_node_id=7 + k, message_type="train") for k in range(len(replies))]
    runtime = _UploadRuntime([(ins, stalled, delay) for ins, (stalled, delay) in zip(instructions, replies)])
    grid = HttpGrid(token="t")
    grid.set_run(Run.create_empty(TaskIdentity.run_id))
    grid._client = runtime  # noqa: SLF001 - _runtime_client returns it; no network
    return grid, runtime, instructions


def test_flower_pull_stalls_past_send_and_receive_timeout_without_the_bound():
    """The contract our fix relies on, in flwr 1.42's own HttpGrid: a reply whose objects never
    arrive keeps ``pull_messages`` (so ``send_and_receive``) busy past its timeout; it ends only
    when the SuperLink drops the objects, with the "object-push session expired" error reply."""
    from flwr.superlink.grid import http_grid  # noqa: PLC0415

    grid, runtime, (ins,) = _http_grid((True, 0.0))
    out: list = []
    worker = threading.Thread(target=lambda: out.extend(grid.send_and_receive([ins], timeout=0.5)), daemon=True)
    t0 = time.monotonic()
    worker.start()
    worker.join(timeout=3.5)
    assert worker.is_alive(), "Flower's pull gave up by itself: the deadline may no longer be needed"
    runtime.expired.set()  # what the SuperLink does after OBJECT_PUSH_SESSION_TTL_SECONDS (180 s)
    worker.join(timeout=15.0)
    assert not worker.is_alive() and time.monotonic() - t0 > 3.5
    assert len(out) == 1 and out[0].has_error() and "object-push session expired" in out[0].error.reason
    assert "pull_objects(" in inspect.getsource(http_grid.HttpGrid.pull_messages)  # the name we bound


@pytest.mark.parametrize("via", ["send_and_receive", "push_then_pull"])
def test_reply_deadline_ends_a_stalled_upload_at_the_timeout(via):
    """Wrapped in ReplyDeadlineGrid (timeout 2 s), node 7's stalled reply becomes Flower's error reply at
    2 s (+ at most one retry wait of PULL_BACKOFF_CAP = 1 s), through ``send_and_receive`` and through
    push_messages/pull_messages as StreamingGrid calls them. Node 8's reply, complete but arriving at
    0.5 s while the stalled one holds the pull, is taken by the sweep at the deadline, not lost."""
    from flwr.common.constant import ErrorCode  # noqa: PLC0415
    from flwr.superlink.grid import http_grid  # noqa: PLC0415

    grid, runtime, (stalled, fine) = _http_grid((True, 0.0), (False, 0.5))
    bounded = bound_reply_waits(grid, 2.0)
    assert isinstance(bounded, ReplyDeadlineGrid) and bounded.inner is grid
    assert getattr(http_grid.pull_objects, "bounded_by_deadline", False)
    t0 = time.monotonic()
    if via == "send_and_receive":
        replies = bounded.send_and_receive([stalled, fine], timeout=60.0)  # the grid's own timeout is the cap
    else:
        ids = bounded.push_messages([stalled, fine])
        replies = bounded.pull_messages(set(ids))
    seconds = time.monotonic() - t0
    assert 2.0 <= seconds < 2.0 + PULL_BACKOFF_CAP * 1.2 + 1.0, seconds
    by_request = {r.metadata.reply_to_message_id: r for r in replies}
    assert set(by_request) == {stalled.metadata.message_id, fine.metadata.message_id}
    lost = by_request[stalled.metadata.message_id]
    assert lost.has_error() and lost.error.code == ErrorCode.MESSAGE_UNAVAILABLE
    assert not by_request[fine.metadata.message_id].has_error()
    assert runtime.object_pulls >= 3  # the stalled object was tried again while the deadline lasted
    assert bounded.run.run_id == grid.run.run_id  # everything else is the wrapped grid's


def test_bound_reply_waits_leaves_simulation_grids_alone():
    """Only Flower's HttpGrid (a deployment) is wrapped; in-memory grids cannot stall on an upload."""
    from fedavg_relu.runtime.local_grid import LocalGrid  # noqa: PLC0415

    grid = LocalGrid(lambda message, context: message, num_nodes=1, run_config={})
    assert bound_reply_waits(grid, 5.0) is grid
    with pytest.raises(ValueError, match="timeout=0"):
        ReplyDeadlineGrid(grid, 0)


# --- from a fresh shell, signals, a node dying mid-upload (real processes) ------------------------


def _documented_block(needle: str) -> str:
    """The ```bash block of docs/deployment.md that contains ``needle``."""
    text = (APP_DIR / "docs" / "deployment.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    found = [b for b in blocks if needle in b]
    assert found, f"no bash block with {needle!r} in docs/deployment.md"
    return found[0]


@e2e
def test_documented_superlink_command_works_from_a_fresh_shell(certs, tmp_path):
    """docs/deployment.md's SuperLink commands, run as written by `bash` with an empty environment
    (PATH=/usr/bin:/bin, no virtualenv) in the project folder, with only the certificate folder,
    port, database and the virtualenv swapped in (the docs' `.venv` is this interpreter's own
    environment, wherever it lives): the SuperLink answers /health over TLS. The same command as
    `VENV/bin/flower-superlink` without `source VENV/bin/activate` dies: it starts
    flower-superexec by name."""
    import ssl  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    block = _documented_block("flower-superlink")
    assert "source .venv/bin/activate" in block and "--host 127.0.0.1 --port 9091" in block
    env_bin = venv_bin()
    if not (env_bin / "activate").exists():
        pytest.skip(f"{env_bin} has no activate script: this interpreter does not run in a virtualenv")
    port = free_port()
    script = (block.replace("certificates/", f"{certs}/").replace("--port 9091", f"--port {port}")
              .replace("state.db", str(tmp_path / "state.db")).replace(".venv/bin/", f"{env_bin}/"))
    env = {"HOME": str(tmp_path), "PATH": BARE_PATH, "FLWR_HOME": str(tmp_path / "flwr"),
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}

    def start(text: str) -> subprocess.Popen:
        return subprocess.Popen(["bash", "-c", text], cwd=APP_DIR, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)

    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    proc = start(script)
    try:
        deadline, healthy = time.monotonic() + 90, False
        while time.monotonic() < deadline and proc.poll() is None and not healthy:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=2, context=context) as r:
                    healthy = r.status == 200
            except OSError:
                time.sleep(0.5)
    finally:
        stop_groups([proc])
    assert healthy, proc.stdout.read().decode(errors="replace")[-3000:]
    full_path_only = "\n".join(line for line in script.splitlines() if "activate" not in line)
    without_venv = start(full_path_only.replace("flower-superlink \\", f"{env_bin}/flower-superlink \\"))
    try:
        out, _ = without_venv.communicate(timeout=90)
    finally:
        stop_groups([without_venv])
    assert without_venv.returncode != 0 and b"'flower-superexec'" in out


@e2e
def test_sigterm_stops_worker_and_supernode_within_seconds(certs, node_files, tmp_path):
    """SIGTERM to a ClientApp worker 1 s into a long train task (local-steps=10^6): it exits within
    EXIT_GRACE (3 s) with code 143 and the task abandoned; the SuperNode passes its error reply on, so
    the ServerApp logs "stopped by signal 15" and the run ends long before round-timeout (600 s).
    A restarted worker, idle with torch loaded, exits within 1.5 s of SIGTERM; the SuperNode
    (Flower's own handler: it deregisters) within 8 s."""
    with Deployment(certs, home=tmp_path / "flwr-home") as dep:
        dep.register(certs / "supernode-1.pub")
        node = dep.start_supernode(certs / "supernode-1", {"data-path": str(node_files[0])})
        dep.wait_online(1, timeout=60)
        busy: dict = {}

        def terminate_when_training() -> None:
            deadline = time.monotonic() + 240
            while "ClientApp worker: loaded" not in node.worker_log() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
            t0 = time.monotonic()
            busy["signalled"] = t0
            node.worker.send_signal(signal.SIGTERM)
            busy["rc"] = node.worker.wait(timeout=30)
            busy["seconds"] = time.monotonic() - t0

        watcher = threading.Thread(target=terminate_when_training, daemon=True)
        watcher.start()
        result = dep.run(APP_DIR, {**RUN, "num-partitions": 1, "num-server-rounds": 1, "local-steps": 1_000_000,
                                   "round-timeout": 600.0, "output-dir": str(tmp_path), "run-name": "sigterm"},
                         timeout=400)
        ended = time.monotonic()
        watcher.join(timeout=40)
        assert busy.get("rc") == 128 + signal.SIGTERM, (busy, node.worker_log()[-2000:])
        assert busy["seconds"] < EXIT_GRACE + 0.5, busy
        assert "train task abandoned" in node.worker_log()
        assert "ClientApp worker stopped by signal 15" in result.output, result.output[-3000:]
        assert ended - busy["signalled"] < 60, "the ServerApp waited for round-timeout instead of the error reply"

        worker = dep.start_worker(node)  # idle, torch preloaded
        deadline = time.monotonic() + 120
        while "serving the SuperNode Runtime API" not in node.worker_log().split("stopped by signal")[-1]:
            assert time.monotonic() < deadline and worker.poll() is None, node.worker_log()[-2000:]
            time.sleep(0.1)
        t0 = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 128 + signal.SIGTERM
        idle_seconds = time.monotonic() - t0
        assert idle_seconds < 1.5, idle_seconds
        node_seconds = stop_groups([node.process], term_wait=20.0)
        assert node.process.returncode == 0 and node_seconds < 8.0, (node_seconds, node.log()[-2000:])
        assert "SuperNode terminated gracefully" in node.log()


class ThrottledProxy:
    """A TCP proxy on loopback in front of the SuperLink (TLS passes through untouched): what the
    SuperNode sends upstream is counted, and slowed to ``rate`` bytes/s once that is set."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.rate: float | None = None
        self.upstream = 0
        self._count = threading.Lock()
        self._throttle = threading.Lock()  # one upstream budget for all connections
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                if self._server.fileno() == -1:
                    return
                continue
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, is_upstream: bool) -> None:
        try:
            while data := src.recv(16384):
                if is_upstream:
                    with self._count:
                        self.upstream += len(data)
                    if self.rate:
                        with self._throttle:
                            time.sleep(len(data) / self.rate)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._server.close()
        for sock in self._sockets:
            sock.close()


@e2e
@pytest.mark.skipif(not SERVER_APP_BOUNDS_REPLIES,
                    reason="fedavg_relu.server_app.main does not wrap its grid with bound_reply_waits yet")
def test_node_killed_mid_upload_costs_at_most_round_timeout(certs, node_files, tmp_path):
    """A SuperNode SIGKILLed while uploading its round-2 train reply (width 512: a 1 MiB reply; its uplink
    slowed to 200 kB/s by a proxy; killed after 100 kB of it went up): round 2's train exchange ends when
    round-timeout (25 s) is up, plus a few seconds, not after Flower's 180 s object-push session. The node
    counts as failed, its reply's reason is logged, and the run completes with the other node."""
    timeout = 25.0
    with Deployment(certs, home=tmp_path / "flwr-home") as dep:
        proxy = ThrottledProxy(dep.port)
        for i in (1, 2):
            dep.register(certs / f"supernode-{i}.pub")
        survivor = dep.start_supernode(certs / "supernode-1", {"data-path": str(node_files[0])})
        victim = dep.start_supernode(certs / "supernode-2", {"data-path": str(node_files[1])},
                                     superlink_address=f"127.0.0.1:{proxy.port}")
        dep.wait_online(2, timeout=60)
        kill: dict = {}

        def kill_mid_upload() -> None:
            deadline = time.monotonic() + 300
            while victim.log().count("Receiving: train message") < 2:  # round 2 has begun for the victim
                if time.monotonic() > deadline or not victim.alive():
                    return
                time.sleep(0.05)
            proxy.rate = 200_000
            while victim.log().count("Sending: train message") < 2:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.01)
            start = proxy.upstream  # PushMessages (message + object tree) goes first, then the objects
            while proxy.upstream - start < 100_000 and time.monotonic() < deadline:
                time.sleep(0.01)
            kill["uploaded"] = proxy.upstream - start
            victim.kill()
            kill["at"] = time.monotonic()

        watcher = threading.Thread(target=kill_mid_upload, daemon=True)
        watcher.start()
        try:
            result = dep.run(APP_DIR, {**RUN, "width": 512, "round-timeout": timeout, "output-dir": str(tmp_path),
                                       "run-name": "mid-upload"}, timeout=400)
        finally:
            proxy.close()
        watcher.join(timeout=5)
        assert "at" in kill, victim.log()[-2000:]
        assert survivor.alive()
    sent_after_kill = victim.log().split("Sending: train message")[2] if victim.log().count("Sending: train message") > 1 else ""
    assert "Sent successfully" not in sent_after_kill, "the reply was complete before the kill"
    assert 100_000 <= kill["uploaded"] < 512 * 512 * 4
    assert result.status == "finished:completed", result.output[-3000:]
    assert f"at most round-timeout = {timeout:g}s" in result.output
    assert "object-push session expired" in result.output  # the lost reply's reason, from Flower's HttpGrid
    rows = read_metrics(tmp_path / "mid-upload")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["clients-trained"] == 2 and rows[1]["clients-failed"] == 0
    lost = rows[2]
    assert lost["clients-trained"] == 1 and lost["clients-failed"] == 1 and lost["round-skipped"] == 0, lost
    train_seconds = lost["seconds"] - lost["drift-seconds"]
    assert train_seconds < timeout + 10, lost  # Flower alone: ~180 s
