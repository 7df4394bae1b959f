"""Tests for packed mode: fedavg_relu.core.packed, clients/packed_app.py and the recorder's cohorts (strategies/cohorts.py).

Tolerances: a packed node sends its cohort's weighted mean model in float32
(accumulated in float64), and Flower then averages the node means in float32,
so the averaged model differs from the standard path's float32 average by a
few float32 ulps: we allow 1e-6 absolute on parameters of size ~0.1-1. Metrics
are sums divided by sums instead of p-weighted dot products: relative 1e-6.
"""

from __future__ import annotations

import json

import logging
import math

import numpy as np
import pytest
import torch

from fedavg_relu.core.config import ConfigError, RunConfig
from fedavg_relu.core.data import load_partition
from fedavg_relu.core.metrics import ClientDrift, summarize_drift
from fedavg_relu.core.packed import (
    DriftSums, node_clients, summarize_drift_sums, train_cohort, weighted_mean_params,
)
from fedavg_relu.core.results import read_metrics
from fedavg_relu.runtime.simulation import run_in_process
from fedavg_relu.core.task import initial_params, train_client
from fedavg_relu.core.training import LocalSGDSettings

logging.getLogger("flwr").setLevel(logging.WARNING)

TIMING = {"seconds", "elapsed", "drift-seconds"}
SMALL = {
    "dataset": "synthetic", "synthetic-num-examples": 300, "num-partitions": 6, "width": 64,
    "num-server-rounds": 2, "local-steps": 3, "batch-size": 8, "save-model": True,
}


def _drift(n, drift, dist, gnorm, flips=0.1):
    return ClientDrift(n, 0.5 + drift, 0.4, gnorm, gnorm + 0.1, drift, dist, flips, 0.2)


def _merged_halves(drifts) -> DriftSums:
    """DriftSums of the first two and the last two clients, merged after a round trip through metrics."""
    left, right = DriftSums(), DriftSums()
    for d in drifts[:2]:
        left.add(d)
    for d in drifts[2:]:
        right.add(d)
    return DriftSums.from_metrics(left.merge(right).to_metrics())


def _assert_rows_match(rows_a, rows_b, rel=1e-6):
    """Every key of the standard rows is in the packed rows with the same value (timings aside)."""
    assert len(rows_a) == len(rows_b)
    for a, b in zip(rows_a, rows_b, strict=True):
        for key, value in a.items():
            if key in TIMING:
                continue
            assert key in b, key
            if value is None or b[key] is None:
                assert value is None and b[key] is None, key
            else:
                assert b[key] == pytest.approx(value, rel=rel, abs=1e-9), key


# --- sums ---------------------------------------------------------------------------------
def test_summarize_drift_sums_equals_summarize_drift():
    """Sums of 4 clients (one that did not move), merged from two halves, give summarize_drift's dict.

    n = [10, 30, 20, 40]: p = [.1, .3, .2, .4]; e.g. gradient-drift-mean = .1*1 + .3*2 + .2*.5 + .4*3 = 2.0.
    """
    drifts = [_drift(10, 1.0, 0.5, 2.0), _drift(30, 2.0, 1.0, 4.0), _drift(20, 0.5, 0.0, 1.0), _drift(40, 3.0, 2.0, 3.0)]
    merged = _merged_halves(drifts)
    expected = summarize_drift(drifts, 0.1, 2.5)
    got = summarize_drift_sums(merged, 0.1, 2.5)
    assert set(got) == set(expected)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-12), key
    assert got["gradient-drift-mean"] == pytest.approx(2.0)
    assert got["effective-smoothness-max"] == pytest.approx(2.0)  # client 1: 2.0 / 1.0; client 3 (dist 0) left out


def test_nonlinear_sums_equal_summarize_drift_and_leave_out_nan():
    """Fractions (0.2, NaN, 0.6, 0.4) at n = (10, 30, 20, 40), merged from two halves = summarize_drift's keys.

    The NaN client (not measured) is left out: p over n = (10, 20, 40) = (1/7, 2/7, 4/7),
    mean = (0.2 + 1.2 + 1.6) / 7 = 3/7, max = 0.6. Sums without any fraction: max stays -inf, no key.
    """
    import dataclasses

    fractions = [0.2, math.nan, 0.6, 0.4]
    base = [_drift(10, 1.0, 0.5, 2.0), _drift(30, 2.0, 1.0, 4.0), _drift(20, 0.5, 0.0, 1.0), _drift(40, 3.0, 2.0, 3.0)]
    drifts = [dataclasses.replace(d, nonlinear_fraction=f) for d, f in zip(base, fractions, strict=True)]
    merged = _merged_halves(drifts)
    expected = summarize_drift(drifts, 0.1, 2.5)
    got = summarize_drift_sums(merged, 0.1, 2.5)
    assert set(got) == set(expected)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-12), key
    assert got["nonlinear-drift-fraction-mean"] == pytest.approx(3 / 7)
    assert got["nonlinear-drift-fraction-max"] == 0.6
    plain = DriftSums()
    for d in base:
        plain.add(d)
    assert plain.nonlinear_max == -math.inf and "nonlinear-drift-fraction-mean" not in summarize_drift_sums(plain, 0.1)


def test_client_row_lists_round_trip():
    """client_row_lists -> client_rows_from_lists gives the same rows; a list of the wrong length is refused."""
    from fedavg_relu.core.metrics import client_row
    from fedavg_relu.flower.client_table import client_row_lists, client_rows_from_lists

    drifts = [_drift(10, 1.0, 0.5, 2.0), _drift(30, 2.0, 1.0, 4.0)]
    values = client_row_lists([7, 9], drifts, [1.5, 2.5], [3, 4], False)
    assert values["client/ids"] == [7, 9] and "client/nonlinear-drift-fraction" not in values
    rows = client_rows_from_lists(values)
    assert rows == [dict(client=k, **client_row(d, b, t, False)) for k, d, b, t in zip([7, 9], drifts, [1.5, 2.5], [3, 4])]
    values["client/gradient-drift"] = [1.0]
    with pytest.raises(ValueError, match="client/gradient-drift: 1 values for 2 clients"):
        client_rows_from_lists(values)
    assert client_rows_from_lists({}) == []


def test_empty_sums_summarize_to_nothing():
    """No client measured: an empty dict, like summarize_drift([])."""
    assert summarize_drift_sums(DriftSums(), 0.1) == {} == summarize_drift([], 0.1)


def test_weighted_mean_params():
    """Weights [1, 3] of rows [0, 4] give 3.0, kept in float32."""
    out = weighted_mean_params({"w": np.array([[0.0], [4.0]], np.float32)}, np.array([1, 3]))
    assert out["w"].dtype == np.float32 and out["w"][0] == 3.0


# --- who holds, who trains ---------------------------------------------------------------------
def test_node_clients_and_bad_partition():
    """K=4, P=10: node 0 holds 0..3, node 2 holds 8, 9; node 3 would start at 12 and is refused."""
    assert node_clients(0, 4, 10) == [0, 1, 2, 3]
    assert node_clients(2, 4, 10) == [8, 9]
    with pytest.raises(ValueError, match="partition-id=3"):
        node_clients(3, 4, 10)


def test_config_rules_of_packed_mode():
    """Packed mode refuses the strategies that need every client model (naming the fix); lockstep needs packed
    mode; RunConfig.num_nodes = ceil(P / K)."""
    assert RunConfig(num_partitions=10, clients_per_node=4).num_nodes == 3
    assert RunConfig(num_partitions=10, clients_per_node=1).num_nodes == 10
    for name in ("fedmedian", "fedtrimmedavg", "krum"):
        with pytest.raises(ConfigError, match=f"strategy='{name}': packed mode runs fedavg, fedprox.*num-supernodes=10"):
            RunConfig.from_mapping({"clients-per-node": 4, "strategy": name})
    for name in ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold", "fednova"):
        assert RunConfig.from_mapping({"clients-per-node": 4, "strategy": name}).packed
    with pytest.raises(ConfigError, match="lockstep-drift-steps='2'"):
        RunConfig.from_mapping({"lockstep-drift-steps": "2"})
    with pytest.raises(ConfigError, match="lockstep-drift-steps='0,9'"):
        RunConfig.from_mapping({"clients-per-node": 4, "lockstep-drift-steps": "0,9"})
    assert RunConfig.from_mapping({"clients-per-node": 4, "local-steps": 3, "lockstep-drift-steps": "all"}).lockstep_steps() == (1, 2, 3)


# --- a cohort equals its clients one by one ------------------------------------------------------
@pytest.mark.parametrize("mode", ["sequential", "lockstep", "vectorized"])
def test_train_cohort_equals_train_client_per_client(mode):
    """Sequential and lockstep cohorts give every client exactly train_client's W_k, loss and steps;
    the vectorized cohort (the default) the same to float32 rounding (rtol 1e-5, see tests/test_cohort.py)."""
    cfg = RunConfig.from_mapping(dict(SMALL, **{"clients-per-node": 6}))
    settings = LocalSGDSettings(local_steps=3, learning_rate=0.5, batch_size=8, momentum=0.5)
    w0 = initial_params(cfg)
    lockstep = (1, 3) if mode == "lockstep" else ()
    cohort = train_cohort(cfg, [1, 4], 2, w0, settings, lockstep_steps=lockstep, vectorized=mode == "vectorized")
    for i, k in enumerate([1, 4]):
        one = train_client(cfg, load_partition(cfg, k), k, 2, w0, settings)
        if mode == "vectorized":
            for name, value in one.local_params.items():
                np.testing.assert_allclose(cohort.local(i)[name], value, rtol=1e-5, atol=1e-6)
            assert cohort.train_loss[i] == pytest.approx(one.train_loss, rel=1e-5)
            assert cohort.loss_before[i] == pytest.approx(one.loss_before, rel=1e-5)
        else:
            for name, value in one.local_params.items():
                np.testing.assert_array_equal(cohort.local(i)[name], value)
            assert cohort.train_loss[i] == one.train_loss and cohort.loss_before[i] == one.loss_before
        assert cohort.num_steps[i] == 3 and cohort.num_examples[i] == one.num_examples
    assert sorted(cohort.lockstep) == list(lockstep)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_vectorized_lockstep_equals_per_client_lockstep(momentum):
    """Lockstep on 5 clients (sizes differ: two size groups, budget forcing chunks of one) at steps 1 and 3.

    The vectorized cohort steps every chunk in lockstep and measures each client at step t
    against W-bar^t = sum_k p_k W_k^t with stacked products; the per-client path uses autograd
    models. Same W_k (rtol 1e-5) and the same lockstep sums (rtol 1e-5: float32 rounding of
    the two paths, amplified a little by the differences of gradients).
    """
    import fedavg_relu.core.cohort as cohort_module

    cfg = RunConfig.from_mapping(dict(SMALL, **{"clients-per-node": 6, "partitioner": "dirichlet", "dirichlet-alpha": 1.0}))
    settings = LocalSGDSettings(local_steps=3, learning_rate=0.5, batch_size=0, momentum=momentum)
    w0 = initial_params(cfg)
    ids = [0, 1, 2, 3, 5]
    assert len({len(load_partition(cfg, k)) for k in ids}) > 1  # unequal sizes: several groups
    slow = train_cohort(cfg, ids, 2, w0, settings, lockstep_steps=(1, 3), vectorized=False)
    fast = train_cohort(cfg, ids, 2, w0, settings, lockstep_steps=(1, 3))
    one_chunk_each = cohort_module.CHUNK_BYTES
    try:
        cohort_module.CHUNK_BYTES = 1
        tiny = train_cohort(cfg, ids, 2, w0, settings, lockstep_steps=(1, 3))
    finally:
        cohort_module.CHUNK_BYTES = one_chunk_each
    for other in (fast, tiny):
        for name in slow.local_params:
            np.testing.assert_allclose(other.local_params[name], slow.local_params[name], rtol=1e-5, atol=1e-6)
        assert sorted(other.lockstep) == [1, 3]
        for step in (1, 3):
            a, b = slow.lockstep[step], other.lockstep[step]
            assert b.num_clients == a.num_clients == 5
            for key in ("loss_global", "loss_local", "divergence", "drift", "relative", "flips_local", "grad_norm_sq"):
                assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-5, abs=1e-8), (step, key)
            assert b.drift_max == pytest.approx(a.drift_max, rel=1e-5)
        assert slow.lockstep[1].divergence < slow.lockstep[3].divergence


# --- the whole app: packed == standard -----------------------------------------------------------
@pytest.mark.parametrize("clients_per_node", [3, 6])
def test_packed_and_standard_give_same_model_and_metrics(tmp_path, clients_per_node):
    """6 clients, 2 rounds: packed with 2 nodes x 3 or 1 node x 6 = standard path (6 nodes), model and every metric.

    Tolerance: parameters 1e-6 absolute, metrics 1e-6 relative (see the module docstring).
    """
    base = dict(SMALL, **{"output-dir": str(tmp_path)})
    std = run_in_process(dict(base, **{"run-name": "std"}))
    packed = run_in_process(dict(base, **{"run-name": "packed", "clients-per-node": clients_per_node}))
    model_a = torch.load(std / "model.pt")["state_dict"]
    model_b = torch.load(packed / "model.pt")["state_dict"]
    for name in model_a:
        torch.testing.assert_close(model_b[name], model_a[name], rtol=0, atol=1e-6)
    rows_a, rows_b = read_metrics(std), read_metrics(packed)
    _assert_rows_match(rows_a, rows_b)
    assert rows_b[-1]["clients-trained"] == 6 and rows_b[-1]["clients-measured"] == 6
    assert rows_a[-1]["gradient-drift-mean"] > 0


def test_packed_and_standard_nonlinear_fraction_and_client_rows(tmp_path):
    """drift-nonlinear=true, 1 round: packed (2 nodes x 3) = standard for every metric, the nonlinear ones included,
    and the same clients.jsonl rows per client (rel 1e-5: the vectorized cohort's float32 rounding, see
    tests/test_cohort.py; the fraction is a difference of gradients over a difference of gradients)."""
    from fedavg_relu.core.results import read_clients

    base = dict(SMALL, **{"output-dir": str(tmp_path), "drift-nonlinear": True, "num-server-rounds": 1})
    std = run_in_process(dict(base, **{"run-name": "std"}))
    packed = run_in_process(dict(base, **{"run-name": "packed", "clients-per-node": 3}))
    rows_a, rows_b = read_metrics(std), read_metrics(packed)
    _assert_rows_match(rows_a, rows_b, rel=1e-5)
    assert 0 < rows_a[-1]["nonlinear-drift-fraction-mean"] <= rows_a[-1]["nonlinear-drift-fraction-max"]
    clients_a = {c["client"]: c for c in read_clients(std)}
    clients_b = {c["client"]: c for c in read_clients(packed)}
    assert sorted(clients_a) == sorted(clients_b) == list(range(6))
    for k, a in clients_a.items():
        for column, value in a.items():
            if column != "node":
                assert clients_b[k][column] == pytest.approx(value, rel=1e-5, abs=1e-8), (k, column)


@pytest.mark.parametrize("lockstep", ["", "1,3"])
def test_cohort_models_go_to_disk_not_into_the_context(tmp_path, monkeypatch, lockstep):
    """The cohort's W_k are written to the node's local model store, never into its Context.

    Flower's Ray engine ships a node's Context with every message, so the Context must
    carry no model at all (it carries scalars only); the drift handler reads the stacked
    W_k back from disk (any worker process on the node can) and removes them, so no
    round's models are left behind.
    """
    spill = tmp_path / "spill"
    monkeypatch.setenv("FEDAVG_RELU_SPILL_DIR", str(spill))
    from clients.client_app import build_client_app

    app = build_client_app()
    biggest: list[int] = []
    stacked_on_disk: list[tuple[int, ...]] = []

    def spy(msg, context):
        reply = app(msg, context)
        biggest.append(max((int(np.prod(a.shape)) for rec in context.state.array_records.values() for a in rec.values()), default=0))
        if msg.metadata.message_type == "train.packed":
            files = list(spill.glob(f"run-*/node-{context.node_id}/local/round-*/*.npy"))
            stacked_on_disk.extend(tuple(np.load(f, mmap_mode="r").shape) for f in files)
        return reply

    base = dict(SMALL, **{"output-dir": str(tmp_path), "clients-per-node": 3, "lockstep-drift-steps": lockstep})
    rows = read_metrics(run_in_process(dict(base, **{"run-name": "disk"}), client_app=spy))
    assert rows[-1]["clients-measured"] == 6
    assert max(biggest) == 0  # no array in any node's Context
    cfg = RunConfig.from_mapping(base)
    shapes = {v.shape for v in initial_params(cfg).values()}
    assert stacked_on_disk and all(s[0] == 3 and s[1:] in shapes for s in stacked_on_disk)  # (K, *shape)
    assert not list(spill.glob("run-*/node-*/local/round-*"))  # measured, then removed


def test_lockstep_drift_at_tau_equals_end_of_round_drift(tmp_path):
    """One node holds all 6 clients, all train (fraction 1), FedAvg: W-bar^tau = sum_k p_k W_k^tau = W^{r+1}.

    Hence at t = tau = 3 the lockstep drift ||grad f_k(W_k^tau) - grad f_k(W-bar^tau)|| is the recorded
    gradient drift ||grad f_k(W_k) - grad f_k(W^{r+1})||, client by client, so every lockstep metric
    at step 3 equals its end-of-round metric (W-bar^tau is formed in float64 on the node, W^{r+1} in
    float32 by Flower: relative 1e-5). At t=1 the clients have moved less: smaller divergence.
    """
    cfg = dict(SMALL, **{"output-dir": str(tmp_path), "run-name": "ls", "clients-per-node": 6, "lockstep-drift-steps": "1,3"})
    rows = read_metrics(run_in_process(cfg))
    for row in rows[1:]:
        assert row["lockstep-nodes"] == 1
        for key in ("gradient-drift-mean", "gradient-drift-max", "relative-gradient-drift-mean",
                    "model-divergence", "model-divergence-max", "activation-flips-local", "global-loss"):
            assert row[f"lockstep-{key}/step-3"] == pytest.approx(row[key], rel=1e-5), key
        assert row["lockstep-model-divergence/step-1"] < row["lockstep-model-divergence/step-3"]


def test_lockstep_with_several_nodes_reports_per_node_average(tmp_path):
    """Two nodes of 3: lockstep-nodes = 2 (per-node virtual averages), and the drift is still recorded."""
    cfg = dict(SMALL, **{"output-dir": str(tmp_path), "run-name": "ls2", "clients-per-node": 3,
                         "lockstep-drift-steps": "all", "num-server-rounds": 1})
    row = read_metrics(run_in_process(cfg))[-1]
    assert row["lockstep-nodes"] == 2
    assert {f"lockstep-gradient-drift-mean/step-{t}" for t in (1, 2, 3)} <= set(row)


def test_packed_sampling_sends_only_to_holders(tmp_path):
    """P=8, K=2 (4 nodes), fraction 0.25: 2 virtual clients per round, messages only to the nodes holding them."""
    from clients.client_app import build_client_app

    app = build_client_app()
    seen: list[tuple[str, int]] = []

    def spy(msg, context):
        seen.append((msg.metadata.message_type, context.node_id))
        return app(msg, context)

    cfg = dict(SMALL, **{"output-dir": str(tmp_path), "run-name": "frac", "num-partitions": 8, "clients-per-node": 2,
                         "fraction-train": 0.25, "num-server-rounds": 3})
    rows = read_metrics(run_in_process(cfg, client_app=spy))
    for row in rows[1:]:
        assert row["clients-sampled"] == 2 and row["clients-trained"] == 2 and row["clients-measured"] == 2
    trains = [n for t, n in seen if t == "train.packed"]
    cohorts = [n for t, n in seen if t == "query.cohort"]
    assert sorted(cohorts) == [1, 2, 3, 4]  # asked once
    assert 3 <= len(trains) <= 6  # 3 rounds x (1 or 2 nodes)
    rows = [json.loads(line) for line in (tmp_path / "frac" / "clients.jsonl").read_text().splitlines()]
    chosen = [[r["client"] for r in rows if r["round"] == rnd] for rnd in (1, 2, 3)]  # the clients FedAvg sampled
    assert all(len(c) == 2 for c in chosen)
    assert len(trains) == sum(len({k // 2 for k in c}) for c in chosen)  # one message per node holding one


def test_invalid_packed_reply_is_rejected_and_counted_in_virtual_clients(tmp_path):
    """A node whose mean model carries NaN is rejected (reason non-finite); its 3 clients count as rejected."""
    from clients.client_app import build_client_app

    app = build_client_app()

    def corrupt(msg, context):
        reply = app(msg, context)
        if msg.metadata.message_type == "train.packed" and context.node_id == 1:
            arrays = reply.content["arrays"]
            name = next(iter(arrays))
            bad = arrays[name].numpy().copy()
            bad.flat[0] = math.nan
            from flwr.app import Array

            arrays[name] = Array(bad)
        return reply

    cfg = dict(SMALL, **{"output-dir": str(tmp_path), "run-name": "bad", "clients-per-node": 3, "num-server-rounds": 1})
    row = read_metrics(run_in_process(cfg, client_app=corrupt))[-1]
    assert row["rejected-non-finite"] == 1
    assert row["clients-sampled"] == 6 and row["clients-trained"] == 3 and row["clients-rejected"] == 3
    assert row["clients-measured"] == 3 and math.isfinite(row["global-loss"])


@pytest.mark.parametrize(("n", "k"), [(100, 7), (50, 50), (1437, 10)])
def test_fast_iid_partitions_equal_flwr_datasets(n, k):
    """partition_indices' direct IID split equals flwr-datasets' IidPartitioner on the same shuffled order."""
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    from fedavg_relu.core.data import partition_indices

    cfg = RunConfig(num_partitions=k, seed=3)
    labels = np.arange(n) % 10
    order = np.random.default_rng([3, 1]).permutation(n)
    partitioner = IidPartitioner(num_partitions=k)
    partitioner.dataset = datasets.Dataset.from_dict({"index": order, "label": labels[order]})
    expected = [np.sort(np.asarray(partitioner.load_partition(i)["index"])) for i in range(k)]
    got = partition_indices(labels, cfg)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_full_batch_loss_before_is_the_first_steps_loss_bit_for_bit():
    """Full batch: train_client's f_k(W^r) comes from step 1's forward pass and equals evaluate() exactly."""
    from fedavg_relu.core.task import working_model
    from fedavg_relu.core.training import evaluate
    from fedavg_relu.core.models import set_trainable

    cfg = RunConfig.from_mapping(dict(SMALL, **{"batch-size": 0}))
    w0, data = initial_params(cfg), load_partition(cfg, 2)
    out = train_client(cfg, data, 2, 1, w0, LocalSGDSettings(local_steps=2, learning_rate=0.5, batch_size=0))
    model = working_model(cfg)
    set_trainable(model, w0)
    assert out.loss_before == evaluate(model, data.x, data.y, "squared")[0]
