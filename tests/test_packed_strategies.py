"""Packed mode beyond FedAvg: every strategy whose server step needs only the weighted mean of the client
models runs packed and equals the one-client-per-node path; the others are refused before any message.

Why they are equal: node j replies with its cohort's weighted mean S_j / N_j and num-examples N_j, so
any rule that first forms ``sum_j N_j (S_j/N_j) / sum_j N_j = sum_k n_k W_k / sum_k n_k`` (FedAvg,
FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad: the adaptive ones apply their optimizer to
``W^r - that mean``) sees the same mean as with one reply per client, up to float32 rounding of sums
taken in another order. FedProx's proximal term is applied per client on the node. SCAFFOLD with its
example weighting also needs ``sum_k (n_k/n) dc_k``: a node replies with its cohort's weighted mean dc
beside the mean model, and keeps each virtual client's c_k on its disk.
"""

from __future__ import annotations

import json

import pytest

from clients.client_app import build_client_app
from fedavg_relu.core.config import PACKED_STRATEGIES, ConfigError, RunConfig
from fedavg_relu.core.results import read_metrics
from fedavg_relu.runtime.local_grid import LocalGrid
from fedavg_relu.runtime.simulation import run_in_process
from fedavg_relu.server_app import run_experiment

SMALL = {
    "dataset": "synthetic", "synthetic-num-examples": 160, "num-partitions": 4, "partitioner": "dirichlet",
    "dirichlet-alpha": 0.5, "width": 16, "model-family": "standard", "num-server-rounds": 2, "local-steps": 2,
    "batch-size": 0, "learning-rate": 0.3, "lr-scaling": "constant", "proximal-mu": 0.5, "server-eta": 0.05,
}
TIMING = {"seconds", "elapsed", "drift-seconds"}


@pytest.mark.slow
@pytest.mark.parametrize("name", PACKED_STRATEGIES)
def test_packed_equals_one_client_per_node(name, tmp_path):
    """4 non-IID clients, 2 rounds: on 2 nodes (2 clients each, packed) every recorded metric equals the run
    on 4 nodes (rtol 1e-5), the drift metrics included; the packed run's layout is in its config."""
    base = dict(SMALL, strategy=name, **{"output-dir": str(tmp_path)})
    standard = read_metrics(run_in_process(dict(base, **{"run-name": "standard"}), num_nodes=4))
    packed_dir = run_in_process(dict(base, **{"run-name": "packed"}), num_nodes=2)
    assert json.loads((packed_dir / "config.json").read_text())["config"]["clients-per-node"] == 2
    packed = read_metrics(packed_dir)
    assert [r.get("clients-trained") for r in packed[1:]] == [4, 4]
    for a, b in zip(standard, packed, strict=True):
        for key, value in a.items():
            if key not in TIMING and isinstance(value, float) and key in b:
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-8, nan_ok=True), (name, a["round"], key)
        assert {k for k in a if "drift" in k and k not in TIMING} <= set(b), name


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum"])
def test_strategies_needing_every_model_are_refused_before_any_message(name, tmp_path):
    """On fewer nodes than clients these stop at once, naming num-supernodes=4; nothing was sent."""
    cfg = RunConfig.from_mapping(dict(SMALL, strategy=name, **{"output-dir": str(tmp_path), "num-malicious-nodes": 0}))
    grid = LocalGrid(build_client_app(), 2, cfg.to_mapping())
    with pytest.raises(ConfigError, match="num-supernodes=4"):
        run_experiment(grid, cfg)
    assert grid.sent == []


def test_a_user_strategy_in_packed_mode_must_declare_itself_mean_only(tmp_path):
    """A Flower subclass may change the rule: packed mode refuses it unless its class sets packed_mean_only."""
    module = tmp_path / "my_rules.py"
    module.write_text(
        "from flwr.serverapp.strategy import FedAvg\n"
        "class Plain(FedAvg):\n    pass\n"
        "class Declared(FedAvg):\n    packed_mean_only = True\n"
    )
    base = dict(SMALL, **{"output-dir": str(tmp_path), "clients-per-node": 2})
    with pytest.raises(ConfigError, match="clients-per-node=2: packed mode .* Plain needs every client's model"):
        run_in_process(dict(base, strategy=f"{module}:Plain", **{"run-name": "plain"}), num_nodes=2)
    rows = read_metrics(run_in_process(dict(base, strategy=f"{module}:Declared", **{"run-name": "declared"}), num_nodes=2))
    assert rows[-1]["clients-measured"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_packed_fednova_with_unequal_local_steps_equals_one_client_per_node(momentum, tmp_path):
    """local-epochs = 1 with batch 8 gives each client its own tau_k = ceil(n_k / 8); FedNova normalises each
    update by a_k. A cohort replies as one client: y_j = W^r - A_j sum_k (n_k/N_j)(W^r - W_k)/a_k with a tau_j
    whose a(tau_j) = A_j = sum_k (n_k/N_j) a_k, so the server's normalised average is the clients' (rtol 1e-5),
    with heavy-ball momentum too (a_k then nonlinear in tau_k, tau_j found by bisection)."""
    base = dict(SMALL, strategy="fednova", momentum=momentum, **{
        "batch-size": 8, "local-epochs": 1.0, "output-dir": str(tmp_path)})
    standard = read_metrics(run_in_process(dict(base, **{"run-name": "standard"}), num_nodes=4))
    packed = read_metrics(run_in_process(dict(base, **{"run-name": "packed"}), num_nodes=2))
    assert len({r["local-steps"] for r in read_client_rows(tmp_path / "standard")}) > 1  # tau_k differ
    for a, b in zip(standard, packed, strict=True):
        for key in ("global-loss", "distance-from-init", "gradient-drift-mean", "model-divergence", "test-loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (momentum, a["round"], key)


def read_client_rows(run_dir):
    """The run's per-client rows (clients.jsonl)."""
    return [json.loads(line) for line in (run_dir / "clients.jsonl").read_text().splitlines()]
