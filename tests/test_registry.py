"""Tests of strategies/registry.py, strategies/scaffold.py and strategies/fednova.py through the real app code."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedavg_relu.core.config import STRATEGIES, ConfigError, RunConfig
from fedavg_relu.core.data import load_partition
from fedavg_relu.core.models import build_model, compute_loss, get_trainable, set_trainable
from fedavg_relu.flower.records import arrays_to_params
from fedavg_relu.core.results import read_metrics
from fedavg_relu.runtime.simulation import run_in_process
from strategies.recorder import DriftRecorder
from strategies.registry import STRATEGY_CLASSES, build_strategy

SMALL = {
    "dataset": "synthetic", "synthetic-num-examples": 120, "synthetic-input-dim": 5, "num-partitions": 3,
    "partitioner": "dirichlet", "dirichlet-alpha": 0.5, "width": 16, "model-family": "standard",
    "local-steps": 2, "batch-size": 0, "learning-rate": 0.2, "lr-scaling": "constant", "num-server-rounds": 2,
}


def _final_params(run_dir) -> dict[str, np.ndarray]:
    state = torch.load(run_dir / "model.pt")["state_dict"]
    return {k: v.numpy() for k, v in state.items()}


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_runs_two_rounds_with_drift_metrics(name, tmp_path):
    """Each of the 11 strategies runs 2 rounds through the app and records finite drift metrics."""
    rows = read_metrics(run_in_process(dict(SMALL, strategy=name, **{"output-dir": str(tmp_path), "run-name": name})))
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["clients-trained"] == 3 and row["clients-measured"] == 3, name
        for key in ("gradient-drift-mean", "model-divergence", "activation-flips-local", "distance-from-init"):
            assert math.isfinite(row[key]), (name, key)
    wrapped = build_strategy(RunConfig.from_mapping(dict(SMALL, strategy=name)), 0.2)
    assert isinstance(wrapped, DriftRecorder) and type(wrapped.strategy) is STRATEGY_CLASSES[name]  # a wrapper


def test_bad_strategy_name_lists_the_choices():
    """An unknown strategy is refused with the valid names listed."""
    with pytest.raises(ConfigError, match=r"strategy='fedsgd': expected one of fedavg, fedprox, .*scaffold, fednova"):
        RunConfig.from_mapping({"strategy": "fedsgd"})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("proximal-mu", -0.1, "a finite float >= 0"),
        ("server-momentum", 1.0, r"a float in \[0, 1\)"),
        ("trim-fraction", 0.5, r"a float in \[0, 0.5\)"),
        ("beta-1", 1.5, r"a float in \[0, 1\)"),
        ("server-eta", 0.0, "a finite float > 0"),
    ],
)
def test_bad_strategy_hyper_parameter_is_named(key, value, expected):
    """Each strategy hyper-parameter is validated like every other key."""
    with pytest.raises(ConfigError, match=f"{key}={value!r}: expected {expected}"):
        RunConfig.from_mapping({key: value})


def test_krum_bound_is_checked():
    """Krum needs num-partitions >= 2 f + 3: f = 1 with 4 clients is refused."""
    with pytest.raises(ConfigError, match="num-malicious-nodes=1: expected Krum's bound"):
        RunConfig.from_mapping({"strategy": "krum", "num-partitions": 4, "num-malicious-nodes": 1})


def test_fednova_equal_steps_equals_fedavg(tmp_path):
    """Same local steps everywhere: FedNova's model equals FedAvg's (float tolerance: FedNova averages in float64)."""
    fedavg = _final_params(run_in_process(dict(SMALL, **{"output-dir": str(tmp_path), "run-name": "a"})))
    fednova = _final_params(run_in_process(dict(SMALL, strategy="fednova", **{"output-dir": str(tmp_path), "run-name": "b"})))
    for k in fedavg:
        np.testing.assert_allclose(fednova[k], fedavg[k], rtol=1e-5, atol=1e-6)


def test_fednova_unequal_steps_differs_from_fedavg(tmp_path):
    """local-epochs=1 with batch 8 gives tau_k = ceil(n_k / 8), different per client; FedNova then differs from FedAvg."""
    cfg = dict(SMALL, **{"batch-size": 8, "local-epochs": 1.0, "output-dir": str(tmp_path)})
    fedavg = run_in_process(dict(cfg, **{"run-name": "a"}))
    fednova = run_in_process(dict(cfg, strategy="fednova", **{"run-name": "b"}))
    steps = {math.ceil(len(load_partition(RunConfig.from_mapping(dict(SMALL)), k)) / 8) for k in range(3)}
    assert len(steps) > 1
    a, b = _final_params(fedavg), _final_params(fednova)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) > 1e-4


def _reference_scaffold(cfg: RunConfig, rounds: int) -> dict[str, np.ndarray]:
    """SCAFFOLD written out here, independently: full-batch local GD with correction c - c_k (option II).

    x_k <- x_k - eta (grad f_k(x_k) + c - c_k) for tau steps; c_k+ = c_k - c + (x - y_k) / (tau eta);
    x <- sum_k p_k y_k; c <- c + (|S|/N) sum_k p_k (c_k+ - c_k), with |S| = N = 3 here.
    """
    model = build_model(cfg, cfg.synthetic_input_dim, cfg.synthetic_num_classes)
    x = {k: v.astype(np.float64) for k, v in get_trainable(model).items()}
    c = {k: np.zeros_like(v) for k, v in x.items()}
    ck = [{k: np.zeros_like(v) for k, v in x.items()} for _ in range(3)]
    parts = [load_partition(cfg, i) for i in range(3)]
    n = np.array([len(p) for p in parts], float)
    p = n / n.sum()
    eta, tau = cfg.learning_rate, cfg.local_steps
    for _ in range(rounds):
        ys, dcs = [], []
        for i, data in enumerate(parts):
            y = {k: v.copy() for k, v in x.items()}
            for _ in range(tau):
                set_trainable(model, {k: v.astype(np.float32) for k, v in y.items()})
                loss = compute_loss(model(data.x), data.y, cfg.loss)
                names = [nm for nm, prm in model.named_parameters() if prm.requires_grad]
                grads = torch.autograd.grad(loss, [prm for prm in model.parameters() if prm.requires_grad])
                for nm, g in zip(names, grads, strict=True):
                    y[nm] = y[nm] - eta * (g.double().numpy() + c[nm] - ck[i][nm])
            new_ck = {k: ck[i][k] - c[k] + (x[k] - y[k]) / (tau * eta) for k in x}
            dcs.append({k: new_ck[k] - ck[i][k] for k in x})
            ck[i] = new_ck
            ys.append(y)
        x = {k: sum(p[i] * ys[i][k] for i in range(3)) for k in x}
        c = {k: c[k] + sum(p[i] * dcs[i][k] for i in range(3)) for k in c}
    return x


def test_scaffold_two_rounds_match_reference_loop(tmp_path):
    """Two rounds of the app's SCAFFOLD (3 non-IID clients, full-batch, tau=2) equal the reference loop above."""
    cfg = RunConfig.from_mapping(dict(SMALL, strategy="scaffold", **{"output-dir": str(tmp_path), "run-name": "s"}))
    got = _final_params(run_in_process(cfg))
    expected = _reference_scaffold(cfg, 2)
    for k, v in expected.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-4, atol=1e-6, err_msg=k)


def test_scaffold_with_identical_clients_is_fedavg(tmp_path):
    """Every node holds partition 0 with the same seed: c_k = c, the correction vanishes, SCAFFOLD = FedAvg.

    scaffold-weighting = uniform: with three copies of partition 0 the clients' examples do not add up to
    the data set's (the ``examples`` rule's n), while c = mean_k c_k = c_k holds for any copies."""
    from clients.client_app import build_client_app
    from fedavg_relu.runtime.local_grid import LocalGrid
    from fedavg_relu.server_app import run_experiment

    finals = {}
    for name in ("fedavg", "scaffold"):
        cfg = RunConfig.from_mapping(dict(SMALL, strategy=name, **{"output-dir": str(tmp_path), "run-name": name,
                                                                  "scaffold-weighting": "uniform"}))
        nodes = [{"partition-id": 0}] * 3
        finals[name] = _final_params(run_experiment(LocalGrid(build_client_app(), 3, cfg.to_mapping(), nodes), cfg))
    for k in finals["fedavg"]:
        np.testing.assert_allclose(finals["scaffold"][k], finals["fedavg"][k], rtol=1e-5, atol=1e-6)


def test_fedprox_mu_changes_the_local_update(tmp_path):
    """FedProx's proximal-mu reaches the clients: a large mu keeps W closer to W^0 than FedAvg after 2 rounds."""
    base = dict(SMALL, **{"local-steps": 10, "output-dir": str(tmp_path)})
    avg = read_metrics(run_in_process(dict(base, **{"run-name": "a"})))[-1]["distance-from-init"]
    prox = read_metrics(run_in_process(dict(base, strategy="fedprox", **{"proximal-mu": 5.0, "run-name": "p"})))[-1][
        "distance-from-init"
    ]
    assert prox < 0.8 * avg


def test_strategy_state_checkpointed_for_resume(tmp_path):
    """FedAdam's moments and SCAFFOLD's control variate are saved in checkpoint.pt."""
    for name, attrs in (("fedadam", {"m_t", "v_t"}), ("scaffold", {"control", "round", "state_key"})):
        run_dir = run_in_process(dict(SMALL, strategy=name, **{"output-dir": str(tmp_path), "run-name": name}))
        state = torch.load(run_dir / "checkpoint.pt", weights_only=False)["strategy_state"]
        assert set(state) == attrs
        assert all(v is not None for v in state.values())


# --- bring your own strategy ---------------------------------------------------------------------
def test_a_strategy_from_a_file_outside_the_package_is_measured(tmp_path):
    """strategy = "/path/file.py:HalfStep" (a FedAvg subclass moving half way to the average) with strategy-args:
    the run is measured like any other, and its model is W^0 + 0.5 (FedAvg's W^1 - W^0) after one round."""
    module = tmp_path / "my_strategy.py"
    module.write_text(
        "from flwr.serverapp.strategy import FedAvg\n"
        "from fedavg_relu.flower.records import arrays_to_params, params_to_arrays\n"
        "class HalfStep(FedAvg):\n"
        "    def __init__(self, step=1.0, **kwargs):\n"
        "        super().__init__(**kwargs)\n"
        "        self.step = step\n"
        "    def configure_train(self, server_round, arrays, config, grid):\n"
        "        self.current = arrays_to_params(arrays)\n"
        "        return super().configure_train(server_round, arrays, config, grid)\n"
        "    def aggregate_train(self, server_round, replies):\n"
        "        arrays, metrics = super().aggregate_train(server_round, replies)\n"
        "        avg = arrays_to_params(arrays)\n"
        "        metrics['half-step'] = self.step\n"
        "        return params_to_arrays({k: self.current[k] + self.step * (v - self.current[k]) for k, v in avg.items()}), metrics\n"
    )
    one = dict(SMALL, **{"num-server-rounds": 1, "output-dir": str(tmp_path)})
    plain = _final_params(run_in_process(dict(one, **{"run-name": "plain"})))
    run = run_in_process(dict(one, strategy=f"{module}:HalfStep", **{"strategy-args": '{"step": 0.5}', "run-name": "mine"}))
    rows = read_metrics(run)
    assert rows[1]["half-step"] == 0.5 and rows[1]["clients-measured"] == 3 and rows[1]["gradient-drift-mean"] > 0
    init = RunConfig.from_mapping(SMALL)
    w0 = get_trainable(build_model(init, 5, 4))
    mine = _final_params(run)
    for k in w0:
        np.testing.assert_allclose(mine[k], w0[k] + 0.5 * (plain[k] - w0[k]), rtol=1e-5, atol=1e-6)


def test_bad_user_strategies_are_refused_naming_the_key(tmp_path):
    """A missing module, a name that is no Strategy, or arguments it does not take: ConfigError before any message."""
    module = tmp_path / "not_a_strategy.py"
    module.write_text("def nothing(**kwargs):\n    return 42\n")
    base = dict(SMALL, **{"output-dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"strategy='no_such_module:Mine': expected one of fedavg.*ModuleNotFoundError"):
        run_in_process(dict(base, strategy="no_such_module:Mine"))
    with pytest.raises(ConfigError, match="expected a flwr.serverapp.strategy.Strategy, got int"):
        run_in_process(dict(base, strategy=f"{module}:nothing"))
    with pytest.raises(ConfigError, match=r"strategy-args='\{\"bogus\": 1\}': .*does not take them"):
        run_in_process(dict(base, strategy="flwr.serverapp.strategy:FedAvg", **{"strategy-args": '{"bogus": 1}'}))
    with pytest.raises(ConfigError, match="strategy-args='\\[1\\]': expected a JSON object"):
        RunConfig.from_mapping({"strategy-args": "[1]"})


def test_flowers_dp_wrapper_composes_with_the_recorder(tmp_path):
    """examples/dp_fedavg.py: Flower's server-side fixed clipping around FedAvg, inside the recorder.

    With noise 0 and a clipping norm no update reaches, the model equals plain FedAvg's (clipping
    and noise are the identity); with noise 0.5 it differs, and the drift is still measured against
    the noised average, every round, from every client.
    """
    example = Path(__file__).resolve().parents[1] / "examples" / "dp_fedavg.py"
    base = dict(SMALL, strategy=f"{example}:dp_fedavg", **{"output-dir": str(tmp_path)})
    plain = _final_params(run_in_process(dict(SMALL, **{"output-dir": str(tmp_path), "run-name": "plain"})))
    identity = run_in_process(dict(base, **{"run-name": "id", "strategy-args": '{"noise_multiplier": 0.0, "clipping_norm": 1e6}'}))
    for k, v in _final_params(identity).items():
        np.testing.assert_allclose(v, plain[k], rtol=1e-5, atol=1e-6)
    noisy = run_in_process(dict(base, **{"run-name": "dp", "strategy-args": '{"noise_multiplier": 0.5, "clipping_norm": 1.0}'}))
    assert max(float(np.abs(v - plain[k]).max()) for k, v in _final_params(noisy).items()) > 1e-3
    rows = read_metrics(noisy)
    for row in rows[1:]:
        assert row["clients-measured"] == 3 and math.isfinite(row["gradient-drift-mean"]) and row["gradient-drift-mean"] > 0


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_scaffold_server_control_is_the_average_of_the_clients_under_partial_participation(weighting, tmp_path, monkeypatch):
    """3 non-IID clients, fraction-train = 0.5 (2 of 3 sampled a round), 4 rounds, through the app: the server's c
    in the checkpoint equals sum_k w_k c_k over the c_k the nodes kept on disk, w_k = n_k / n (examples) or
    1/3 (uniform), to float32 rounding. A client never sampled has c_k = 0 and still counts in the sum."""
    monkeypatch.setenv("FEDAVG_RELU_SPILL_DIR", str(tmp_path / "spill"))
    cfg = RunConfig.from_mapping(dict(SMALL, strategy="scaffold", **{
        "fraction-train": 0.5, "num-server-rounds": 4, "scaffold-weighting": weighting, "output-dir": str(tmp_path),
        "run-name": "s",
    }))
    run_dir = run_in_process(cfg)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)["strategy_state"]
    rows = read_metrics(run_dir)
    assert [r["clients-sampled"] for r in rows[1:]] == [2, 2, 2, 2]
    n = np.array([len(load_partition(cfg, k)) for k in range(3)], float)
    w = n / n.sum() if weighting == "examples" else np.full(3, 1 / 3)
    store = tmp_path / "spill" / f"state-{state['state_key']}"
    for name, c in state["control"].items():
        total = np.zeros_like(c, dtype=np.float64)
        for k in range(3):
            versions = sorted(store.glob(f"client-{k}/scaffold-control/round-*"), key=lambda p: int(p.name.split("-")[1]))
            if versions:
                total += w[k] * np.load(versions[-1] / f"{name}.npy").astype(np.float64)
        np.testing.assert_allclose(c, total, rtol=1e-5, atol=1e-7, err_msg=name)
