"""Tests of strategies/ (the drift recorder around Flower's strategies), in process (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from clients.client_app import build_client_app
from fedavg_relu.core.config import RunConfig
from fedavg_relu.core.data import load_central, load_partition
from fedavg_relu.runtime.local_grid import LocalGrid
from fedavg_relu.core.models import build_model, compute_loss, get_trainable, set_trainable
from fedavg_relu.flower.records import arrays_to_params, params_to_arrays
from fedavg_relu.server_app import build_strategy, train_config
from fedavg_relu.core.task import initial_params
from fedavg_relu.flower import schema as wire
from fedavg_relu.flower.validation import UpdateRules
from strategies import DriftRecorder
from strategies.exchange import DriftSettings, PackedDriftExchange, TrainedNode


def _reply(node_id: int, params: dict, n: int, **metrics) -> Message:
    """A train reply from ``node_id`` as a ClientApp would send it."""
    request = Message(content=RecordDict(), dst_node_id=node_id, message_type="train")
    content = RecordDict({"arrays": params_to_arrays(params), "metrics": MetricRecord({"num-examples": n, **metrics})})
    return Message(content=content, reply_to=request)


def _run_rounds(cfg: RunConfig, num_rounds: int, node_configs=None):
    """Run the project's strategy for ``num_rounds`` on a LocalGrid; return (strategy, result, grid)."""
    from fedavg_relu.core.data import dataset_shape

    input_dim, _ = dataset_shape(cfg)
    lr = cfg.effective_learning_rate(input_dim)
    num_nodes = len(node_configs) if node_configs else cfg.num_partitions
    grid = LocalGrid(build_client_app(), num_nodes, cfg.to_mapping(), node_configs)
    strategy = build_strategy(cfg, lr)
    strategy.min_available_nodes = num_nodes
    strategy.min_train_nodes = num_nodes
    result = strategy.start(
        grid=grid, initial_arrays=params_to_arrays(initial_params(cfg)), num_rounds=num_rounds,
        train_config=train_config(cfg, lr),
    )
    return strategy, result, grid


def test_streamed_average_equals_float64_weighted_mean_and_flower_fedavg():
    """Same replies -> DriftFedAvg's streamed average == the float64 weighted mean rounded once to float32.

    The replies are folded into sum_k n_k W_k in float64 as they arrive and divided by
    sum_k n_k = 23 at the end: bit for bit ``np.average(..., weights=sizes)`` in float64 cast
    to float32. Flower's FedAvg sums (n_k/23) W_k in float32, so it agrees to float32
    rounding: three terms of relative error <= 2^-24 each, well inside rtol 1e-6. Summed
    replies are consumed: their ArrayRecords are emptied, so Flower gets fresh ones.
    """
    rng = np.random.default_rng(0)
    params = [{"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)} for _ in range(3)]
    sizes = [5, 11, 7]

    def replies():
        return [
            _reply(i + 1, p, n, **{"train-loss": 0.1 * i, "loss-before": 1.0, "local-steps": 2})
            for i, (p, n) in enumerate(zip(params, sizes, strict=True))
        ]
    init = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}
    ours = DriftRecorder(FedAvg(), drift=DriftSettings(init, 0.1), rules=UpdateRules.for_model(init, wire.TRAIN_METRIC_KEYS),
                         measure_drift=False)
    consumed = replies()
    arrays, metrics = ours.aggregate_train(1, iter(consumed))  # a one-shot iterable, as Flower may pass
    # each summed reply was released (its arrays freed at once, fedavg_relu.flower.records.release)
    assert [len(r.content["arrays"]) for r in consumed] == [0, 0, 0]
    ref_arrays, ref_metrics = FedAvg().aggregate_train(1, replies())
    for key in ("w", "b"):
        exact = np.average([p[key].astype(np.float64) for p in params], axis=0, weights=sizes).astype(np.float32)
        np.testing.assert_array_equal(arrays[key].numpy(), exact)
        np.testing.assert_allclose(arrays[key].numpy(), ref_arrays[key].numpy(), rtol=1e-6, atol=1e-7)
    assert metrics["train-loss"] == pytest.approx(ref_metrics["train-loss"])
    assert metrics["clients-trained"] == 3
    assert metrics["distance-from-init/w"] == pytest.approx(float(np.linalg.norm(arrays["w"].numpy())))


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fednova", "scaffold"])
def test_no_registry_strategy_runs_flowers_evaluate_phase(name):
    """Clients report their loss in the drift exchange, so every strategy the registry builds samples no
    node for Flower's evaluate phase (fraction-evaluate 0): configure_evaluate sends nothing. (A strategy
    built directly runs it; tests/test_validation.py shows its validating aggregate_evaluate at work.)"""
    cfg = RunConfig(dataset="synthetic", synthetic_num_examples=40, num_partitions=2, width=8, model_family="standard",
                    strategy=name)
    grid = LocalGrid(build_client_app(), 2, cfg.to_mapping())
    strategy = build_strategy(cfg, 0.1)
    assert list(strategy.configure_evaluate(1, params_to_arrays(initial_params(cfg)), ConfigRecord(), grid)) == []


def test_configure_train_leaves_callers_config_alone():
    """Flower's FedAvg writes server-round into the ConfigRecord it gets; the mixin hands it a copy."""
    cfg = RunConfig(dataset="synthetic", synthetic_num_examples=40, num_partitions=2, width=8, model_family="standard")
    grid = LocalGrid(build_client_app(), 2, cfg.to_mapping())
    strategy = build_strategy(cfg, 0.1)
    config = ConfigRecord({"learning-rate": 0.1})
    messages = list(strategy.configure_train(3, params_to_arrays(initial_params(cfg)), config, grid))
    assert "server-round" not in config
    assert [m.content["config"]["server-round"] for m in messages] == [3, 3]


def test_one_client_full_batch_round_equals_centralized_gd_step():
    """K=1 holding all data, tau=1, full batch: W^1 = W^0 - eta * grad F(W^0) on the whole training pool."""
    cfg = RunConfig(
        dataset="synthetic", synthetic_num_examples=50, synthetic_input_dim=6, num_partitions=1, width=32, depth=2,
        model_family="standard", loss="cross-entropy", local_steps=1, batch_size=0, learning_rate=0.3,
        lr_scaling="constant", drift_metrics=False,
    )
    _, result, _ = _run_rounds(cfg, 1)
    model = build_model(cfg, 6, cfg.synthetic_num_classes)
    train = load_central(cfg).train
    loss = compute_loss(model(train.x), train.y, cfg.loss)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    got = arrays_to_params(result.arrays)
    for name, g in zip(names, grads, strict=True):
        expected = dict(model.named_parameters())[name].detach().numpy() - 0.3 * g.numpy()
        np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_equal_clients_full_batch_average_equals_centralized_gd_step():
    """K=4 IID clients of 20 examples each, tau=1, full batch: sum_k (1/4)(W0 - eta g_k) = W0 - eta grad F(union)."""
    cfg = RunConfig(
        dataset="synthetic", synthetic_num_examples=100, test_fraction=0.2, synthetic_input_dim=5,
        num_partitions=4, width=16, depth=1, model_family="paper", local_steps=1, batch_size=0,
        learning_rate=0.5, lr_scaling="constant", drift_metrics=False,
    )
    sizes = [len(load_partition(cfg, k)) for k in range(4)]
    assert sizes == [20, 20, 20, 20]
    _, result, _ = _run_rounds(cfg, 1)
    model = build_model(cfg, 5, cfg.synthetic_num_classes)
    train = load_central(cfg).train
    loss = compute_loss(model(train.x), train.y, "squared")
    (g,) = torch.autograd.grad(loss, [model.hidden[0].weight])
    expected = model.hidden[0].weight.detach().numpy() - 0.5 * g.numpy()
    np.testing.assert_allclose(arrays_to_params(result.arrays)["hidden.0.weight"], expected, rtol=1e-5, atol=1e-7)


def test_identical_clients_have_zero_divergence_and_drift():
    """Three nodes with the same partition and seed train identical W_k = W̄ (up to float rounding of the average).

    client-metrics off: three nodes naming one partition id would otherwise be two duplicate-id rejections
    (a partition id is reported once per round; see tests/test_exchanges.py)."""
    cfg = RunConfig(
        dataset="synthetic", synthetic_num_examples=60, num_partitions=3, width=64, model_family="paper",
        local_steps=3, batch_size=8, client_metrics=False,
    )
    same = [{"partition-id": 0, "num-partitions": 3}] * 3
    strategy, _, _ = _run_rounds(cfg, 2, node_configs=same)
    for rnd in (1, 2):
        row = strategy.round_metrics[rnd]
        assert row["clients-measured"] == 3
        assert row["model-divergence"] < 1e-10  # float32 rounding of (w + w + w) / 3 only
        assert row["relative-gradient-drift-max"] < 1e-5
        assert row["activation-flips-local"] == 0.0
        assert row["gradient-dissimilarity"] == pytest.approx(1.0, rel=1e-5)


def test_heterogeneous_round_records_every_metric_and_drift_is_positive():
    """Dirichlet(0.1) clients: every THEORY.md metric present and finite; drift, divergence > 0; loss falls."""
    cfg = RunConfig(
        dataset="synthetic", synthetic_num_examples=200, num_partitions=4, partitioner="dirichlet",
        dirichlet_alpha=0.1, width=128, model_family="paper", local_steps=5, batch_size=0,
    )
    strategy, result, _ = _run_rounds(cfg, 3)
    keys = [
        "global-loss", "loss-ratio", "distance-from-init/hidden.0.weight", "relative-distance-from-init/hidden.0.weight",
        "model-divergence", "model-divergence-max", "gradient-drift-mean", "gradient-drift-max",
        "relative-gradient-drift-mean", "relative-gradient-drift-max", "effective-smoothness-mean",
        "effective-smoothness-lr-mean", "activation-flips-local", "activation-flips-init", "gradient-dissimilarity",
    ]
    for rnd in (1, 2, 3):
        row = strategy.round_metrics[rnd]
        for key in keys:
            assert key in row and math.isfinite(row[key]), (rnd, key)
        assert row["gradient-drift-mean"] > 0 and row["model-divergence"] > 0
        assert row["gradient-dissimilarity"] > 1.0  # heterogeneous gradients
        assert result.train_metrics_clientapp[rnd]["gradient-drift-mean"] == row["gradient-drift-mean"]
    assert strategy.round_metrics[3]["global-loss"] < strategy.round_metrics[1]["loss-before"]


def test_loss_ratio_is_global_loss_over_loss_before():
    """loss-ratio = F(W^{r+1}) / F(W^r) on the measured clients, with F(W^1) checked independently.

    F(W^1) = sum_k p_k f_k(W^1): evaluated here on each partition with the model a 1-round run
    returns; round 2 of a 2-round run (same seeds) reports it as loss-before, reusing the drift
    exchange's measurement (its train messages carry measured-round = 1).
    """
    cfg = RunConfig(dataset="synthetic", synthetic_num_examples=80, num_partitions=2, width=32, local_steps=2, batch_size=0)
    strategy, _, grid = _run_rounds(cfg, 2)
    r1, r2 = strategy.round_metrics[1], strategy.round_metrics[2]
    assert r1["loss-ratio"] == pytest.approx(r1["global-loss"] / r1["loss-before"])
    assert r2["loss-ratio"] == pytest.approx(r2["global-loss"] / r2["loss-before"])
    _, one_round, _ = _run_rounds(cfg, 1)
    model = build_model(cfg, cfg.synthetic_input_dim, cfg.synthetic_num_classes)
    set_trainable(model, arrays_to_params(one_round.arrays))
    parts = [load_partition(cfg, k) for k in range(2)]
    n = np.array([len(p) for p in parts], float)
    f = [float(compute_loss(model(p.x), p.y, "squared")) for p in parts]
    assert r2["loss-before"] == pytest.approx(float(n @ f / n.sum()), rel=1e-5)
    round2 = [m for m in grid.sent if m.metadata.message_type == "train" and m.content["config"]["server-round"] == 2]
    assert [m.content["config"]["measured-round"] for m in round2] == [1, 1]


def test_unreachable_client_in_drift_exchange_is_counted():
    """A node whose drift handler fails is counted as unmeasured; the average still uses its update."""
    cfg = RunConfig(dataset="synthetic", synthetic_num_examples=80, num_partitions=3, width=16, local_steps=1)
    app = build_client_app()

    def flaky(message, context):
        if message.metadata.message_type == "query.drift" and context.node_id == 2:
            raise ConnectionError("node went away")
        return app(message, context)

    grid = LocalGrid(flaky, 3, cfg.to_mapping())
    strategy = build_strategy(cfg, 0.1)
    strategy.start(grid=grid, initial_arrays=params_to_arrays(initial_params(cfg)), num_rounds=1, train_config=train_config(cfg, 0.1))
    row = strategy.round_metrics[1]
    assert (row["clients-trained"], row["clients-measured"], row["clients-unmeasured"]) == (3, 2, 1)


def test_failed_training_client_is_counted_and_round_completes():
    """One of three nodes raises in train: 2 trained, 1 failed, the model still moves."""
    cfg = RunConfig(dataset="synthetic", synthetic_num_examples=80, num_partitions=3, width=16, local_steps=1)
    app = build_client_app()

    def broken(message, context):
        if message.metadata.message_type == "train" and context.node_id == 1:
            raise RuntimeError("boom")
        return app(message, context)

    grid = LocalGrid(broken, 3, cfg.to_mapping())
    strategy = build_strategy(cfg, 0.1)
    result = strategy.start(grid=grid, initial_arrays=params_to_arrays(initial_params(cfg)), num_rounds=1, train_config=train_config(cfg, 0.1))
    row = strategy.round_metrics[1]
    assert (row["clients-trained"], row["clients-failed"], row["clients-measured"]) == (2, 1, 2)
    assert row["distance-from-init"] > 0
    assert len(result.arrays) == 1


def test_drift_off_sends_no_second_exchange():
    """drift-metrics=false: only train messages go out; distance from init is still recorded."""
    cfg = RunConfig(dataset="synthetic", synthetic_num_examples=60, num_partitions=2, width=16, drift_metrics=False)
    strategy, _, grid = _run_rounds(cfg, 1)
    assert {m.metadata.message_type for m in grid.sent} == {"train"}
    assert "gradient-drift-mean" not in strategy.round_metrics[1]
    assert strategy.round_metrics[1]["distance-from-init"] > 0


def test_distance_from_init_shrinks_with_width_paper_family():
    """THEORY prediction 2 at small scale: paper family, eta = eta~ * d / m, same rounds -> ||W - W0|| smaller at m=2048 than m=256."""
    base = dict(
        dataset="synthetic", synthetic_num_examples=100, synthetic_input_dim=10, num_partitions=2,
        model_family="paper", local_steps=2, batch_size=0, learning_rate=1.0, lr_scaling="width", drift_metrics=False,
    )
    dist = {}
    for width in (256, 2048):
        strategy, _, _ = _run_rounds(RunConfig(width=width, **base), 2)
        dist[width] = strategy.round_metrics[2]["distance-from-init"]
    assert dist[2048] < dist[256]
    assert dist[2048] / dist[256] < 0.75  # theory: ~ (256/2048)^(1/2) ~ 0.35


def test_lost_node_does_not_stall_later_rounds():
    """A node that disappears after round 1: round 2 waits at most round-timeout, then trains with the 2 left."""
    cfg = RunConfig(dataset="synthetic", synthetic_num_examples=90, num_partitions=3, width=16, local_steps=1, round_timeout=0.5)
    grid = LocalGrid(build_client_app(), 3, cfg.to_mapping())
    strategy = build_strategy(cfg, 0.1)
    real_start = strategy.configure_train

    def configure_and_lose_node_3(server_round, arrays, config, g):
        if server_round == 2:
            grid.contexts.pop(3, None)  # node 3 goes away before round 2
        return real_start(server_round, arrays, config, g)

    strategy.configure_train = configure_and_lose_node_3
    strategy.start(grid=grid, initial_arrays=params_to_arrays(initial_params(cfg)), num_rounds=2, train_config=train_config(cfg, 0.1))
    assert strategy.round_metrics[1]["clients-trained"] == 3
    assert (strategy.round_metrics[2]["clients-sampled"], strategy.round_metrics[2]["clients-trained"]) == (2, 2)


def test_configure_train_asks_the_grid_for_its_nodes_once():
    """Flower's FedAvg asks get_node_ids twice per configure_train (each an O(nodes) scan in the
    simulation's LinkState); the drift strategy's begin_round asks once and answers Flower from
    that snapshot: 1 call per round, same sampled nodes (Flower samples with the seeded `random`)."""
    import random

    cfg = RunConfig(dataset="synthetic", synthetic_num_examples=120, num_partitions=4, width=16, local_steps=1,
                    fraction_train=0.5, drift_metrics=False)
    grid = LocalGrid(build_client_app(), 4, cfg.to_mapping())
    calls: list[int] = []
    real = grid.get_node_ids
    grid.get_node_ids = lambda: calls.append(1) or real()
    arrays = params_to_arrays(initial_params(cfg))
    sampled = []
    for strategy_round in (1, 2, 3):
        strategy = build_strategy(cfg, 0.1)
        random.seed(7)
        before = len(calls)
        messages = list(strategy.configure_train(strategy_round, arrays, train_config(cfg, 0.1), grid))
        assert len(calls) - before == 1
        sampled.append(sorted(m.metadata.dst_node_id for m in messages))
    plain = FedAvg(fraction_train=0.5, min_available_nodes=4)
    random.seed(7)
    assert sampled[0] == sorted(m.metadata.dst_node_id for m in plain.configure_train(1, arrays, ConfigRecord({}), grid))


def test_node_snapshot_lets_flower_wait_for_nodes_to_connect():
    """A deployment's first round: 1 of 2 SuperNodes connected when the round starts, the second soon after.

    The snapshot (1 node) is below min-available-nodes = 2, so Flower's sampling asks the real
    grid again and waits until both are there: 2 train messages, no endless wait on a stale list.
    """
    cfg = RunConfig(dataset="synthetic", synthetic_num_examples=60, num_partitions=2, width=16, local_steps=1,
                    drift_metrics=False)
    grid = LocalGrid(build_client_app(), 2, cfg.to_mapping())
    real = grid.get_node_ids
    answers = iter([[1]])
    grid.get_node_ids = lambda: next(answers, None) or real()
    strategy = build_strategy(cfg, 0.1)
    messages = list(strategy.configure_train(1, params_to_arrays(initial_params(cfg)), train_config(cfg, 0.1), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2]


# --- issue 14: what the drift exchange also carries --------------------------------------------------
def _drift_reply(metrics: dict) -> Message:
    request = Message(content=RecordDict(), dst_node_id=3, message_type="query.drift")
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=request)


def test_drift_reply_nonlinear_fraction_may_be_absent_or_nan_but_not_infinite():
    """No fraction or a NaN one passes the schema (NaN: not measured / ||Δg|| = 0 alone); +inf is rejected as non-finite."""
    from fedavg_relu.core.metrics import ClientDrift

    base = ClientDrift(5, 1.0, 0.5, 2.0, 1.5, 0.3, 0.2, 0.1, 0.0).to_metrics()
    bounds = {wire.TRAINED_EXAMPLES: 5, wire.NUM_PARTITIONS_BOUND: 9}
    assert "nonlinear-fraction" not in wire.check_metrics(wire.DRIFT_METRICS, base, bounds)
    nan = wire.check_metrics(wire.DRIFT_METRICS, dict(base, **{"nonlinear-fraction": math.nan}), bounds)
    assert math.isnan(ClientDrift.from_metrics(nan).nonlinear_fraction)
    assert wire.check_metrics(wire.DRIFT_METRICS, dict(base, **{"nonlinear-fraction": 0.25}), bounds)["nonlinear-fraction"] == 0.25
    with pytest.raises(wire.Rejected, match="non-finite"):
        wire.check_metrics(wire.DRIFT_METRICS, dict(base, **{"nonlinear-fraction": math.inf}), bounds)


def test_drift_messages_carry_the_switches_and_rows_name_the_partition():
    """drift-nonlinear / client-metrics go out in the drift ConfigRecord; each row names its partition and node.

    2 clients, 1 round, drift-nonlinear on: client_rows[1] has one row per partition (0, 1), with the fraction;
    the round's nonlinear-drift-fraction-mean is their p-weighted mean. client-metrics off: no rows kept.
    """
    cfg = RunConfig(dataset="synthetic", synthetic_num_examples=60, num_partitions=2, width=16, local_steps=2,
                    drift_nonlinear=True)
    from fedavg_relu.core.data import dataset_shape

    lr = cfg.effective_learning_rate(dataset_shape(cfg)[0])
    grid = LocalGrid(build_client_app(), 2, cfg.to_mapping())
    strategy = build_strategy(cfg, lr)
    strategy.start(grid=grid, initial_arrays=params_to_arrays(initial_params(cfg)), num_rounds=1, train_config=train_config(cfg, lr))
    drift_configs = [m.content["config"] for m in grid.sent if m.metadata.message_type == "query.drift"]
    assert drift_configs and all(c["drift-nonlinear"] is True and c["client-metrics"] is True for c in drift_configs)
    rows = strategy.client_rows[1]
    assert [r["client"] for r in rows] == [0, 1] and all(r["round"] == 1 and r["local-steps"] == 2 for r in rows)
    n = np.array([r["num-examples"] for r in rows], float)
    mean = float(n @ np.array([r["nonlinear-drift-fraction"] for r in rows]) / n.sum())
    assert strategy.round_metrics[1]["nonlinear-drift-fraction-mean"] == pytest.approx(mean, rel=1e-12)
    off = build_strategy(cfg.replace(drift_nonlinear=False, client_metrics=False), lr)
    grid = LocalGrid(build_client_app(), 2, cfg.to_mapping())
    off.start(grid=grid, initial_arrays=params_to_arrays(initial_params(cfg)), num_rounds=1, train_config=train_config(cfg, lr))
    assert off.client_rows == {} and "nonlinear-drift-fraction-mean" not in off.round_metrics[1]


def test_packed_drift_sums_without_any_fraction_are_valid_and_bad_rows_are_rejected():
    """nonlinear-max = -inf passes while nonlinear-examples = 0 (nothing measured), not otherwise; rows must name
    exactly the clients the node trained."""
    from fedavg_relu.core.metrics import ClientDrift
    from fedavg_relu.core.packed import DriftSums
    from fedavg_relu.flower.client_table import client_row_lists

    exchange = PackedDriftExchange(DriftSettings(initial_params(RunConfig(width=8)), 0.1, gradient_dissimilarity=False))
    sums = DriftSums()
    drift = ClientDrift(5, 1.0, 0.5, 2.0, 1.5, 0.3, 0.2, 0.1, 0.0)
    sums.add(drift, 1.2)
    values = sums.to_metrics()
    assert values["nonlinear-max"] == -math.inf
    node = TrainedNode(3, 5, 1.2, 2.0, [3])
    acc = exchange._new_accumulator()
    rows = client_row_lists([3], [drift], [1.2], [2], False)
    with pytest.raises(wire.Rejected, match="client-ids"):  # client-metrics on: the rows must come
        exchange._take(acc, _drift_reply(values), node, 1)
    with pytest.raises(wire.Rejected, match="nonlinear-max"):
        exchange._take(acc, _drift_reply(dict(values, **rows, **{"nonlinear-examples": 5.0})), node, 1)
    exchange._take(acc, _drift_reply(dict(values, **rows)), node, 1)  # valid
    assert acc["rows"][-1]["client"] == 3
    with pytest.raises(wire.Rejected, match="client-ids"):
        exchange._take(acc, _drift_reply(dict(values, **rows)), TrainedNode(3, 5, 1.2, 2.0, [4]), 1)
