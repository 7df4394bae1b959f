"""Tests of clients/client_app.py: handlers, node state, a device's own data file."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients.client_app import build_client_app
from fedavg_relu.core.config import RunConfig
from fedavg_relu.core.data import load_data_file, load_partition
from fedavg_relu.runtime.local_grid import LocalGrid
from fedavg_relu.flower.records import params_to_arrays
from fedavg_relu.server_app import build_strategy, train_config
from fedavg_relu.core.task import initial_params

CFG = RunConfig(dataset="synthetic", synthetic_num_examples=80, synthetic_input_dim=6, num_partitions=2, width=16, local_steps=2)


def _context(node_config) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=CFG.to_mapping())


def _train_message(server_round: int = 1) -> Message:
    config = train_config(CFG, 0.1)
    config["server-round"] = server_round
    return Message(
        content=RecordDict({"arrays": params_to_arrays(initial_params(CFG)), "config": config}),
        dst_node_id=7, message_type="train",
    )


def test_train_reply_and_kept_local_model(tmp_path, monkeypatch):
    """train replies with arrays + metrics (num-examples = partition size) and keeps W_k on the node's disk.

    The node's Context (which Flower's Ray engine ships with every message) holds no array;
    the drift exchange of the same round reads W_k back and removes it.
    """
    monkeypatch.setenv("FEDAVG_RELU_SPILL_DIR", str(tmp_path))
    app, ctx = build_client_app(), _context({"partition-id": 1})
    reply = app(_train_message(), ctx)
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == len(load_partition(CFG, 1))
    assert set(reply.content["arrays"].keys()) == {"hidden.0.weight"}
    assert len(ctx.state.array_records) == 0
    kept = np.load(tmp_path / "run-1" / "node-7" / "local" / "round-1" / "hidden.0.weight.npy")
    np.testing.assert_array_equal(kept, reply.content["arrays"]["hidden.0.weight"].numpy())
    query = Message(
        content=RecordDict({"arrays": reply.content["arrays"], "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=7, message_type="query.drift",
    )
    drift = app(query, ctx)
    assert drift.content["metrics"]["param-distance"] == 0.0  # measured at W_k itself
    assert not (tmp_path / "run-1" / "node-7" / "local").exists()


def test_drift_without_kept_model_raises_clear_error():
    """A drift query for a round this node did not train in is refused with the round named."""
    app, ctx = build_client_app(), _context({"partition-id": 0})
    query = Message(
        content=RecordDict({"arrays": params_to_arrays(initial_params(CFG)), "config": ConfigRecord({"server-round": 4})}),
        dst_node_id=7, message_type="query.drift",
    )
    with pytest.raises(RuntimeError, match="no local model kept for round 4"):
        app(query, ctx)


def test_device_data_file_npz_and_csv(tmp_path):
    """data-path .npz and .csv load as unit-norm rows with integer labels; shape mismatches are named."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((12, 6)), np.arange(12) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    np.savetxt(tmp_path / "d.csv", np.column_stack([x, y]), delimiter=",", header="f1,f2,f3,f4,f5,f6,label")
    for name in ("d.npz", "d.csv"):
        data = load_data_file(tmp_path / name, input_dim=6, num_classes=4)
        assert data.x.shape == (12, 6) and data.y.tolist() == y.tolist()
        np.testing.assert_allclose(data.x.norm(dim=1).numpy(), np.ones(12), rtol=1e-6)
    with pytest.raises(ValueError, match="6 features per example, expected 5"):
        load_data_file(tmp_path / "d.npz", input_dim=5)
    with pytest.raises(ValueError, match="label 3 out of range, expected < 3"):
        load_data_file(tmp_path / "d.npz", input_dim=6, num_classes=3)
    with pytest.raises(ValueError, match="no such file"):
        load_data_file(tmp_path / "missing.npz")


def test_bad_data_file_is_an_error_reply_not_a_crash(tmp_path):
    """Node 1 reads a good file, node 2 a missing one: the round completes with node 1, node 2 counted as failed."""
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "good.npz", x=rng.standard_normal((20, 6)), y=np.arange(20) % 4)
    nodes = [{"data-path": str(tmp_path / "good.npz")}, {"data-path": str(tmp_path / "nope.npz")}]
    grid = LocalGrid(build_client_app(), 2, CFG.to_mapping(), node_configs=nodes)
    strategy = build_strategy(CFG, 0.1)
    strategy.start(grid=grid, initial_arrays=params_to_arrays(initial_params(CFG)), num_rounds=1, train_config=train_config(CFG, 0.1))
    row = strategy.round_metrics[1]
    assert (row["clients-trained"], row["clients-failed"], row["clients-measured"]) == (1, 1, 1)


def test_drift_handler_measures_the_fraction_and_names_its_partition(tmp_path, monkeypatch):
    """drift-nonlinear and client-metrics in the drift ConfigRecord: the reply carries nonlinear-fraction (W_k = W^r
    vs the initial W^0 here: a positive number) and partition-id 1; without them, neither key."""
    monkeypatch.setenv("FEDAVG_RELU_SPILL_DIR", str(tmp_path))
    app, ctx = build_client_app(), _context({"partition-id": 1})
    replies = []
    for switches in ({"drift-nonlinear": True, "client-metrics": True}, {}):
        trained = app(_train_message(), ctx)
        query = Message(
            content=RecordDict({"arrays": params_to_arrays(initial_params(CFG)),
                                "config": ConfigRecord({"server-round": 1, **switches})}),
            dst_node_id=7, message_type="query.drift",
        )
        assert trained.content["metrics"]["local-steps"] == 2
        replies.append(app(query, ctx).content["metrics"])
    on, off = replies
    assert on["partition-id"] == 1 and 0 < on["nonlinear-fraction"] < 2
    assert "partition-id" not in off and "nonlinear-fraction" not in off
