"""Robust at the edges: federation size, failed runs, reply screening, streamed replies (issue 12).

Everything here runs in process (LocalGrid or hand-made replies); the Flower
start paths (`flwr run .` with 2 or 3 SuperNodes) are in tests/test_start_paths.py.
"""

from __future__ import annotations

import gc
import json
import logging
import weakref

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from clients.client_app import build_client_app
from fedavg_relu.core.config import ConfigError
from fedavg_relu.runtime.local_grid import LocalGrid
from fedavg_relu.core.results import read_metrics, read_summary
from fedavg_relu.server_app import RunFailed, run_experiment
from fedavg_relu.runtime.simulation import run_in_process
from fedavg_relu.flower.streaming import StreamingGrid
from fedavg_relu.flower.validation import OutlierGate, OutlierRules, Rejected, check_record_layout, outlier_reason
from fedavg_relu.flower import schema as wire
from fedavg_relu.flower.validation import UpdateRules
from strategies import DriftRecorder
from strategies.exchange import DriftSettings
from strategies.registry import build_inner
from fedavg_relu.core.config import RunConfig

SMALL = {
    "dataset": "synthetic", "synthetic-num-examples": 300, "num-partitions": 6, "width": 32,
    "num-server-rounds": 2, "local-steps": 2, "batch-size": 8,
}
TIMING = {"seconds", "elapsed", "drift-seconds"}
GLOBAL = {"w": np.zeros((2, 3), np.float32)}


def _reply(node: int, params, metrics, names=("arrays", "metrics")) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict({
        names[0]: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in params.items()}),
        names[1]: MetricRecord(metrics),
    })
    return Message(content=content, reply_to=request)


def _metrics(n=10, **extra):
    return dict({"num-examples": n, "train-loss": 0.5, "loss-before": 0.6, "local-steps": 2}, **extra)


def _strategy(name="fedavg", outliers=OutlierRules(0.0, 0.0)):
    cfg = RunConfig(dataset="synthetic", num_partitions=4, width=8, strategy=name, drift_metrics=False)
    strategy = DriftRecorder(build_inner(cfg, 0.1), drift=DriftSettings(GLOBAL, 0.1), measure_drift=False,
                             rules=UpdateRules.for_model(GLOBAL, wire.TRAIN_METRIC_KEYS), outliers=outliers)
    strategy._global[1] = GLOBAL
    return strategy


# --- federation size -------------------------------------------------------------------------
@pytest.mark.slow
def test_fewer_nodes_than_clients_packs_them_with_the_same_result(tmp_path):
    """6 clients on 4 nodes: FedAvg packs 2 per node (ceil(6/4)); every round trains and measures all 6,
    and every metric equals the one-node-per-client run (relative 1e-6; float32 sums in another order)."""
    base = dict(SMALL, **{"output-dir": str(tmp_path)})
    full = read_metrics(run_in_process(dict(base, **{"run-name": "six"}), num_nodes=6))
    packed_dir = run_in_process(dict(base, **{"run-name": "four"}), num_nodes=4)
    packed = read_metrics(packed_dir)
    assert json.loads((packed_dir / "config.json").read_text())["config"]["clients-per-node"] == 2
    for a, b in zip(full, packed, strict=True):
        for key, value in a.items():
            if key not in TIMING and isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert [r.get("clients-trained") for r in packed[1:]] == [6, 6]


def test_strategy_needing_one_node_per_client_stops_at_once_with_the_fix(tmp_path):
    """FedMedian (it needs every client's model) with 6 clients on 3 nodes: ConfigError naming num-supernodes=6
    before any message is sent."""
    cfg = RunConfig.from_mapping(dict(SMALL, **{"output-dir": str(tmp_path), "strategy": "fedmedian"}))
    grid = LocalGrid(build_client_app(), 3, cfg.to_mapping())
    with pytest.raises(ConfigError, match='num-supernodes=6.*strategy=fedmedian|strategy=fedmedian.*num-supernodes=6'):
        run_experiment(grid, cfg)
    assert grid.sent == []


def test_more_nodes_than_clients_stops_with_the_fix(tmp_path):
    """6 clients on 8 nodes: nodes 7 and 8 would train partitions that do not exist; stop before any message."""
    cfg = RunConfig.from_mapping(dict(SMALL, **{"output-dir": str(tmp_path)}))
    grid = LocalGrid(build_client_app(), 8, cfg.to_mapping())
    with pytest.raises(ConfigError, match="num-supernodes=6"):
        run_experiment(grid, cfg)
    assert grid.sent == []


# --- a run that failed says so -------------------------------------------------------------------
def test_round_that_lost_every_client_fails_the_run(tmp_path, caplog):
    """Every node raises the same error: the run raises RunFailed naming it, summary.json says failed,
    the error is logged once in full and then counted ("the same error on 5 more clients")."""
    def broken(message, context):
        raise RuntimeError("disk on fire")

    cfg = dict(SMALL, **{"output-dir": str(tmp_path), "run-name": "broken"})
    caplog.set_level(logging.INFO, logger="flwr")
    with pytest.raises(RunFailed, match="round 1 lost every client .*6 failed.*disk on fire"):
        run_in_process(cfg, client_app=broken)
    summary = read_summary(tmp_path / "broken")
    assert summary["status"] == "failed" and "disk on fire" in summary["reason"]
    assert summary["clients-failed"] == 6
    full = [r for r in caplog.records if "disk on fire" in r.getMessage() and "node" in r.getMessage()]
    assert len(full) == 1
    assert any("the same error on 5 more clients" in r.getMessage() for r in caplog.records)


def test_completed_run_writes_a_completed_summary(tmp_path):
    """A clean run: summary.json status completed, rounds-completed = num-server-rounds, no failures."""
    run = run_in_process(dict(SMALL, **{"output-dir": str(tmp_path), "run-name": "ok", "num-server-rounds": 1}))
    summary = read_summary(run)
    assert (summary["status"], summary["rounds-completed"], summary["clients-failed"]) == ("completed", 1, 0)


# --- the validator closes what Flower would choke on -------------------------------------------------
@pytest.mark.parametrize("name", ["fedavg", "fedmedian", "fedtrimmedavg"])
def test_other_record_names_are_rejected_not_fatal(name):
    """A reply whose records are named "weights"/"stats" (Flower raises InconsistentMessageReplies on it)
    is rejected as record-layout; the good reply alone is averaged, for streamed and list strategies."""
    strategy = _strategy(name)
    good = _reply(1, {"w": np.ones((2, 3), np.float32)}, _metrics())
    odd = _reply(2, {"w": np.ones((2, 3), np.float32)}, _metrics(), names=("weights", "stats"))
    arrays, metrics = strategy.aggregate_train(1, [good, odd])
    assert metrics["rejected-record-layout"] == 1 and metrics["clients-trained"] == 1
    assert arrays is not None


def test_list_metric_value_is_rejected_not_a_type_error():
    """MetricRecord allows list values; a list where a scalar is read is rejected as metric-type."""
    strategy = _strategy()
    good = _reply(1, {"w": np.ones((2, 3), np.float32)}, _metrics())
    listy = _reply(2, {"w": np.ones((2, 3), np.float32)}, _metrics(**{"train-loss": [0.1, 0.2]}))
    arrays, metrics = strategy.aggregate_train(1, [good, listy])
    assert metrics["rejected-metric-type"] == 1 and metrics["clients-trained"] == 1
    np.testing.assert_array_equal(arrays["w"].numpy(), np.ones((2, 3), np.float32))


def test_record_layout_check_names_what_differs():
    """check_record_layout lists the missing and the unexpected records."""
    with pytest.raises(Rejected, match=r"record-layout: missing \['arrays \(ArrayRecord\)'\], unexpected \['weights \(ArrayRecord\)'\]"):
        check_record_layout({"weights": "ArrayRecord", "metrics": "MetricRecord"},
                            {"arrays": "ArrayRecord", "metrics": "MetricRecord"})


def test_outlier_reason_by_hand():
    """Peers (10, 12, 14) have median 12, update norms (1, 2, 3) median 2; ratio 100:
    n = 1,201 > 1,200 is an examples-outlier, n = 1,200 is not; ||u|| = 201 > 200 is an update-outlier.
    With one peer (min_peers 2) nothing is judged; ratio 0 switches a rule off."""
    peers = [(10, 1.0), (12, 2.0), (14, 3.0)]
    rules = OutlierRules(100.0, 100.0)
    assert outlier_reason(1201, 1.0, peers, rules) == "examples-outlier"
    assert outlier_reason(1200, 1.0, peers, rules) is None
    assert outlier_reason(12, 201.0, peers, rules) == "update-outlier"
    assert outlier_reason(12, 200.0, peers, rules) is None
    assert outlier_reason(10**9, 1e40, peers[:1], rules) is None
    assert outlier_reason(10**9, 1e40, peers, OutlierRules(0.0, 0.0)) is None


def test_extreme_but_finite_update_and_count_are_rejected_by_default_rules(tmp_path):
    """Four honest replies (entries 1, n = 10) and two attackers: entries 3e38 (finite in float32) and
    n = 10^9. Default rules (ratio 100): both rejected, the average is exactly 1. Rules off: wrecked."""
    honest = [_reply(i, {"w": np.ones((2, 3), np.float32)}, _metrics()) for i in (1, 2, 3, 4)]
    huge = _reply(5, {"w": np.full((2, 3), 3e38, np.float32)}, _metrics())
    heavy = _reply(6, {"w": np.full((2, 3), 5.0, np.float32)}, _metrics(n=10**9))
    strategy = _strategy(outliers=OutlierRules())
    arrays, metrics = strategy.aggregate_train(1, [huge, *honest[:2], heavy, *honest[2:]])
    assert metrics["rejected-update-outlier"] == 1 and metrics["rejected-examples-outlier"] == 1
    np.testing.assert_array_equal(arrays["w"].numpy(), np.ones((2, 3), np.float32))
    loose = _strategy(outliers=OutlierRules(0.0, 0.0))
    arrays, _ = loose.aggregate_train(1, [huge, *honest, heavy])
    assert np.abs(arrays["w"].numpy()).max() > 1e30 or not np.isfinite(arrays["w"].numpy()).all()


def test_outlier_gate_holds_only_suspects():
    """Replies 1 and 2 have no two peers yet (held); 3 and 4 are within bounds (summed at once);
    5 is 1000x the median norm (held), and final() then rejects it against every other reply."""
    gate = OutlierGate(OutlierRules(100.0, 100.0))
    offers = [gate.offer(i, 10, norm) for i, norm in enumerate([1.0, 1.2, 0.9, 1.1, 1000.0])]
    assert offers == [False, False, True, True, False]
    assert [gate.final(i) for i in (0, 1, 4)] == [None, None, "update-outlier"]


# --- replies are streamed, not held ------------------------------------------------------------------
@pytest.mark.slow
def test_fedavg_holds_one_reply_at_a_time():
    """A stream of 12 replies: when reply i arrives, at most 3 earlier ones are still alive (the first
    two, held by the outlier gate until they have peers, and reply i-1, still bound to the loop that
    just summed it); every other one was summed and dropped. The average is still exactly 1."""
    strategy = _strategy(outliers=OutlierRules())
    alive: list[weakref.ref] = []
    seen_alive: list[int] = []

    def stream():
        for i in range(12):
            gc.collect()
            seen_alive.append(sum(ref() is not None for ref in alive))
            reply = _reply(i + 1, {"w": np.ones((2, 3), np.float32)}, _metrics())
            alive.append(weakref.ref(reply))
            yield reply
            del reply

    arrays, metrics = strategy.aggregate_train(1, stream())
    assert max(seen_alive) <= 3 and seen_alive[-1] <= 3 and metrics["clients-trained"] == 12
    np.testing.assert_array_equal(arrays["w"].numpy(), np.ones((2, 3), np.float32))


class _FakeFlowerGrid:
    """push_messages / pull_messages like Flower's grids: replies arrive one per pull; node 3's error
    reply is made by "Flower" with src_node_id 1 (as Flower does for a lost node)."""

    pull_interval = 0.0

    def __init__(self):
        self.queue = []

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            ids.append(f"m{i}")
            self.queue.append(msg)
        return ids

    def pull_messages(self, ids):
        if not self.queue:
            return []
        msg = self.queue.pop(0)
        if msg.metadata.dst_node_id == 3:
            from flwr.app import Error

            reply = Message(Error(0, "node unavailable"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = 1
            return [reply]
        return [Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=msg)]


def test_streaming_grid_yields_as_pulled_and_names_the_real_node():
    """Three messages: each reply is yielded after exactly one more pull; Flower's error reply for node 3
    says src 1, node_of says 3 (the node the message went to)."""
    fake = _FakeFlowerGrid()
    grid = StreamingGrid(fake)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query.drift") for n in (2, 3, 4)]
    stream = grid.send_and_receive(messages, timeout=5)
    first = next(stream)
    assert len(fake.queue) == 2  # the other two are not pulled yet
    rest = list(stream)
    replies = [first, *rest]
    assert [grid.node_of(r) for r in replies] == [2, 3, 4]
    assert replies[1].has_error() and replies[1].metadata.src_node_id == 1


# --- a degraded run says so ----------------------------------------------------------------------
def test_a_node_with_wrong_dimension_data_makes_the_run_degraded_and_its_drift_null(tmp_path):
    """2 nodes, as in a deployment: node 1 trains partition 0; node 2's own data file has 32 features where the
    model expects 20. Node 2 fails every round, so the run ends 'degraded' (not 'completed'): summary.json
    names node 2 with 2 of 2 rounds failed and its first error (the file's dimension), the rounds that
    measured one client are listed, and the drift metrics that compare clients are null, never 0."""
    bad = tmp_path / "bad.npz"
    rng = np.random.default_rng(0)
    np.savez(bad, x=rng.standard_normal((30, 32)).astype(np.float32), y=rng.integers(0, 4, 30))
    cfg = RunConfig.from_mapping(dict(SMALL, **{"num-partitions": 2, "output-dir": str(tmp_path), "run-name": "deg"}))
    nodes = [{"partition-id": 0, "num-partitions": 2}, {"data-path": str(bad)}]
    run_dir = run_experiment(LocalGrid(build_client_app(), 2, cfg.to_mapping(), nodes), cfg)
    summary = read_summary(run_dir)
    assert summary["status"] == "degraded" and "failed in every round" in summary["reason"]
    assert [(f["node"], f["rounds-sampled"], f["rounds-failed"]) for f in summary["failing"]] == [(2, 2, 2)]
    assert "32" in summary["failing"][0]["first-error"]
    assert summary["rounds-measuring-fewer-than-two"] == [1, 2] and summary["clients-failed"] == 2
    rows = read_metrics(run_dir)
    for row in rows[1:]:
        assert row["clients-measured"] == 1 and row["gradient-drift-mean"] is None and row["model-divergence"] is None
        assert row["global-loss"] > 0  # the one client's own loss stays a number


def test_a_run_where_every_client_answered_is_completed_not_degraded(tmp_path):
    """The same federation with both nodes on partitions: completed, nothing failing, drift a number."""
    cfg = RunConfig.from_mapping(dict(SMALL, **{"num-partitions": 2, "output-dir": str(tmp_path), "run-name": "ok"}))
    run_dir = run_experiment(LocalGrid(build_client_app(), 2, cfg.to_mapping()), cfg)
    summary = read_summary(run_dir)
    assert (summary["status"], summary["failing"], summary["rounds-measuring-fewer-than-two"]) == ("completed", [], [])
    assert all(row["gradient-drift-mean"] > 0 for row in read_metrics(run_dir)[1:])
