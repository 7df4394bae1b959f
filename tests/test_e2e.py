"""End-to-end runs through Flower's engines (marked e2e; ~1 min in all)."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest

from fedavg_relu.runtime.flower_run import IsolatedFlower, pid_alive
from fedavg_relu.core.results import read_metrics

pytestmark = pytest.mark.e2e

APP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THEORY_KEYS = [
    "global-loss", "loss-ratio", "distance-from-init", "relative-distance-from-init",
    "distance-from-init/hidden.0.weight", "model-divergence", "model-divergence-max",
    "gradient-drift-mean", "gradient-drift-max", "relative-gradient-drift-mean", "relative-gradient-drift-max",
    "effective-smoothness-mean", "effective-smoothness-lr-mean", "activation-flips-local",
    "activation-flips-init", "gradient-dissimilarity",
]


USER_STRATEGY = """
from flwr.serverapp.strategy import FedAvgM


class MomentumWithMarker(FedAvgM):
    \"\"\"A user's own strategy, in a file outside the package: FedAvgM that tags its metrics.\"\"\"

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        metrics["user-strategy-round"] = server_round
        return arrays, metrics
"""


def test_flwr_run_writes_outputs_and_learns(tmp_path):
    """`flwr run .` (own FLWR_HOME, ports, Ray temp dir): 3 rounds x 4 clients, Dirichlet(0.3), with a user's
    strategy defined in a file outside the package (strategy = "/tmp/.../user_strategy.py:MomentumWithMarker",
    strategy-args for its momentum).

    The run completes, writes config.json / metrics.jsonl / metrics.csv / model.pt, the user's strategy ran
    (its marker is in every round's metrics) and was measured: every THEORY.md metric is finite with
    drift > 0; the global loss after round 2 is below the initial loss F(W^0); the SuperLink it started is
    gone afterwards.
    """
    user_file = tmp_path / "user_strategy.py"
    user_file.write_text(USER_STRATEGY)
    overrides = {
        "num-server-rounds": 3, "num-partitions": 4, "dataset": "synthetic", "synthetic-num-examples": 400,
        "partitioner": "dirichlet", "dirichlet-alpha": 0.3, "width": 256, "local-steps": 3,
        "output-dir": str(tmp_path / "runs"), "run-name": "e2e",
        "strategy": f"{user_file}:MomentumWithMarker", "strategy-args": '{"server_momentum": 0.5}',
    }
    flower = IsolatedFlower(home=tmp_path / "flwr-home")
    with flower:
        pid = flower.process.pid
        result = flower.run(APP_DIR, overrides, num_supernodes=4, timeout=400)
    assert not pid_alive(pid)
    assert result.returncode == 0, result.output[-3000:]
    assert result.status == "finished:completed", result.output[-3000:]
    run_dir = tmp_path / "runs" / "e2e"
    assert {p.name for p in run_dir.iterdir()} >= {"config.json", "metrics.jsonl", "metrics.csv", "model.pt"}
    assert json.loads((run_dir / "config.json").read_text())["config"]["width"] == 256
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[2]["global-loss"] < rows[1]["loss-before"]  # F(W^2) < F(W^0)
    for row in rows[1:]:
        assert row["clients-trained"] == 4 and row["clients-measured"] == 4
        assert row["user-strategy-round"] == row["round"]
        for key in THEORY_KEYS:
            assert row[key] is not None and math.isfinite(row[key]), key
        assert row["gradient-drift-mean"] > 0
    with open(run_dir / "metrics.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 4
    assert float(table[3]["gradient-drift-mean"]) == pytest.approx(rows[3]["gradient-drift-mean"])


def test_simulation_api_run(tmp_path):
    """Flower's simulation API (Ray, own temp dir): 2 rounds x 4 clients finish and the loss falls."""
    from fedavg_relu.runtime.simulation import simulate

    run_dir = simulate(
        {
            "num-server-rounds": 2, "num-partitions": 4, "dataset": "digits", "width": 256,
            "output-dir": str(tmp_path), "run-name": "sim",
        },
    )
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["global-loss"] < rows[1]["loss-before"]
    assert rows[2]["test-loss"] < rows[0]["test-loss"]


def _faulty_client_mods():
    """Client mods (closures, so Ray pickles them by value): partition 0 raises in train, partition 1 returns NaN."""

    def raise_on_partition_0(message, context, call_next):
        if message.metadata.message_type == "train" and context.node_config.get("partition-id") == 0:
            raise RuntimeError("injected client failure")
        return call_next(message, context)

    def nan_on_partition_1(message, context, call_next):
        reply = call_next(message, context)
        if message.metadata.message_type == "train" and context.node_config.get("partition-id") == 1 and not reply.has_error():
            import numpy as np
            from flwr.app import Array

            arrays = reply.content["arrays"]
            name = next(iter(arrays.keys()))
            bad = arrays[name].numpy().copy()
            bad.flat[0] = np.nan
            arrays[name] = Array(bad)
        return reply

    return [raise_on_partition_0, nan_on_partition_1]


def test_faulty_clients_never_take_the_run_down(tmp_path):
    """Ray simulation, 4 clients, 3 rounds: one raises every round, one sends NaN every round.

    Every round completes with the 2 healthy clients: clients-failed = 1, rejected-non-finite = 1,
    clients-measured = 2, and the final model is finite.
    """
    import torch

    from fedavg_relu.runtime.simulation import simulate

    run_dir = simulate(
        {
            "num-server-rounds": 3, "num-partitions": 4, "dataset": "synthetic", "synthetic-num-examples": 200,
            "width": 64, "output-dir": str(tmp_path), "run-name": "faulty",
        },
        client_mods=_faulty_client_mods(),
    )
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for row in rows[1:]:
        assert (row["clients-trained"], row["clients-failed"], row["rejected-non-finite"], row["clients-measured"]) == (2, 1, 1, 2)
        assert math.isfinite(row["test-loss"])
    state = torch.load(run_dir / "model.pt")["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values())
    assert rows[3]["global-loss"] < rows[1]["loss-before"]


def test_dead_ray_actor_stops_the_run_with_a_clear_message(tmp_path):
    """An actor process that dies in round 2 (os._exit) stops the run with a message naming it; round 1 is checkpointed."""
    from fedavg_relu.runtime.simulation import simulate
    from strategies.replies import RunAborted

    def die_in_round_2(message, context, call_next):
        if message.metadata.message_type == "train" and message.content["config"]["server-round"] == 2:
            if context.node_config.get("partition-id") == 0:
                import os as _os

                _os._exit(1)
        return call_next(message, context)

    with pytest.raises(RunAborted, match="lost the worker serving node .* resume=true"):
        simulate(
            {
                "num-server-rounds": 3, "num-partitions": 2, "dataset": "synthetic", "synthetic-num-examples": 100,
                "width": 32, "output-dir": str(tmp_path), "run-name": "dead",
            },
            client_mods=[die_in_round_2],
        )
    assert [r["round"] for r in read_metrics(tmp_path / "dead")] == [0, 1]
    assert (tmp_path / "dead" / "checkpoint.pt").exists()
