"""Issue 14's mechanism metrics as a run records them: nonlinear drift fraction, per-client table, ntk-change.

Every recorded value is recomputed here from the run's own inputs with
:mod:`fedavg_relu.core.mechanism`'s functions: the in-process engine
(:func:`fedavg_relu.runtime.simulation.run_in_process`) trains each client with
:func:`fedavg_relu.core.task.train_client` from the seeded W^0, so the test replays the
rounds client by client, forms W^{r+1} = sum_k n_k W_k / sum_k n_k (float64, cast to
float32, as the strategy does) and checks the replay against the saved model.pt.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from clients.node import settings_from
from fedavg_relu.core.config import ConfigError, RunConfig
from fedavg_relu.core.data import dataset_shape, load_partition, load_test
from fedavg_relu.core.mechanism import (
    measure_cohort_nonlinear_drift_vectorized, nonlinear_drift, ntk_change, ntk_gram, ntk_gram_autodiff, probe_indices,
)
from fedavg_relu.core.metrics import CLIENT_COLUMNS, ClientDrift, client_row, measure_client_drift
from fedavg_relu.core.models import build_model
from fedavg_relu.core.results import RunWriter, read_clients, read_metrics
from fedavg_relu.server_app import train_config
from fedavg_relu.runtime.simulation import run_in_process
from fedavg_relu.core.task import initial_params, train_client

logging.getLogger("flwr").setLevel(logging.WARNING)

BASE = {
    "dataset": "synthetic", "synthetic-num-examples": 160, "synthetic-input-dim": 8, "num-partitions": 4,
    "partitioner": "dirichlet", "dirichlet-alpha": 1.0, "width": 32, "num-server-rounds": 2, "local-steps": 3,
    "batch-size": 8, "drift-nonlinear": True, "ntk-probe-size": 16, "save-model": True,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 2-round federation on the standard path (4 nodes) and packed (2 nodes x 2 clients)."""
    out = tmp_path_factory.mktemp("wiring")
    base = dict(BASE, **{"output-dir": str(out)})
    return {
        "standard": run_in_process(dict(base, **{"run-name": "std"})),
        "packed": run_in_process(dict(base, **{"run-name": "packed", "clients-per-node": 2})),
    }


def _replay(cfg: RunConfig):
    """Per round r: {client: (data, W_k)}, W^r and W^{r+1}, by running each client's train_client again."""
    input_dim, _ = dataset_shape(cfg)
    settings = settings_from(train_config(cfg, cfg.effective_learning_rate(input_dim)), cfg)
    current = initial_params(cfg)
    rounds = {}
    for r in range(1, cfg.num_server_rounds + 1):
        clients = {}
        total = 0
        acc = {name: np.zeros(v.shape, np.float64) for name, v in current.items()}
        for k in range(cfg.num_partitions):
            data = load_partition(cfg, k)
            local = train_client(cfg, data, k, r, current, settings).local_params
            clients[k] = (data, local)
            total += len(data)
            for name in acc:
                acc[name] += len(data) * local[name].astype(np.float64)
        new = {name: (v / total).astype(np.float32) for name, v in acc.items()}
        rounds[r] = (clients, current, new)
        current = new
    return rounds


def test_recorded_rows_equal_the_replayed_rounds(runs):
    """Each clients.jsonl row is client_row(measure_client_drift(model, W_k, W^{r+1}, ...)) of the replay.

    The replayed W^2 equals model.pt (atol 1e-7: same float32 updates, float64 average in another
    order at most). Every per-client value then agrees to rel 1e-6; the nonlinear fraction also
    against mechanism.nonlinear_drift computing both gradients itself through torch.func (rel 1e-4:
    float32 gradients formed by another code path, then differenced). Round 2's loss-before is
    round 1's loss-after exactly (the node reuses the f_k(W^1) it measured in the drift exchange).
    """
    cfg = RunConfig.from_mapping(dict(BASE, **{"output-dir": "unused"}))
    input_dim, num_classes = dataset_shape(cfg)
    model = build_model(cfg, input_dim, num_classes)
    rounds = _replay(cfg)
    saved = torch.load(runs["standard"] / "model.pt")["state_dict"]
    for name, value in rounds[2][2].items():
        np.testing.assert_allclose(saved[name].numpy(), value, rtol=0, atol=1e-7)
    rows = read_clients(runs["standard"])
    assert [(r["round"], r["client"]) for r in rows] == [(r, k) for r in (1, 2) for k in range(4)]
    by_key = {(r["round"], r["client"]): r for r in rows}
    for r, (clients, _, new) in rounds.items():
        for k, (data, local) in clients.items():
            got = by_key[(r, k)]
            drift, _ = measure_client_drift(model, local, new, data.x, data.y, cfg.loss, nonlinear=True)
            want = client_row(drift, math.nan, got["local-steps"], True)
            assert set(got) == {"round", "client", "node", *CLIENT_COLUMNS}
            assert got["local-steps"] == 3 and got["num-examples"] == len(data)
            for column in CLIENT_COLUMNS:
                if column not in ("loss-before", "local-steps"):
                    assert got[column] == pytest.approx(want[column], rel=1e-6, abs=1e-9), (r, k, column)
            independent = nonlinear_drift(model, local, new, data.x, data.y, cfg.loss).fraction
            assert got["nonlinear-drift-fraction"] == pytest.approx(independent, rel=1e-4)
            assert 0 < got["nonlinear-drift-fraction"] < 1.5
    for k in range(4):
        assert by_key[(2, k)]["loss-before"] == by_key[(1, k)]["loss-after"]


def test_round_means_are_p_weighted_means_of_the_client_rows(runs):
    """metrics.jsonl's means from clients.jsonl: p_k = n_k / sum n, e.g. mean = sum_k p_k fraction_k.

    nonlinear-drift-fraction-mean = sum p_k f_k, -max = max_k f_k; gradient-drift-mean likewise;
    model-divergence = sum p_k dist_k^2; global-loss = sum p_k loss-after_k; loss-before = sum p_k loss-before_k.
    """
    for path in runs.values():
        rows, clients = read_metrics(path), read_clients(path)
        for row in rows[1:]:
            mine = [c for c in clients if c["round"] == row["round"]]
            assert len(mine) == row["clients-measured"] == 4
            n = np.array([c["num-examples"] for c in mine], np.float64)
            p = n / n.sum()

            def col(name, mine=mine):
                return np.array([c[name] for c in mine])

            assert row["nonlinear-drift-fraction-mean"] == pytest.approx(float(p @ col("nonlinear-drift-fraction")), rel=1e-9)
            assert row["nonlinear-drift-fraction-max"] == pytest.approx(float(col("nonlinear-drift-fraction").max()), rel=1e-12)
            assert row["gradient-drift-mean"] == pytest.approx(float(p @ col("gradient-drift")), rel=1e-9)
            assert row["relative-gradient-drift-max"] == pytest.approx(float(col("relative-gradient-drift").max()), rel=1e-12)
            assert row["model-divergence"] == pytest.approx(float(p @ col("param-distance") ** 2), rel=1e-6)
            assert row["global-loss"] == pytest.approx(float(p @ col("loss-after")), rel=1e-9)
            assert row["loss-before"] == pytest.approx(float(p @ col("loss-before")), rel=1e-9)
            assert row["activation-flips-local"] == pytest.approx(float(p @ col("activation-flips-local")), rel=1e-9)


def test_ntk_change_is_zero_at_round_0_and_the_closed_form_after(runs):
    """ntk-change(0) = 0.0 exactly (W^0 against itself); round r: ntk_change(ntk_gram(W^r), ntk_gram(W^0)).

    The probe set: probe_indices(len(held-out split), 16, seed) of load_test(cfg). The closed form is
    also checked against ntk_gram_autodiff (torch.func Jacobian rows) at W^1: rel 1e-5.
    """
    cfg = RunConfig.from_mapping(dict(BASE, **{"output-dir": "unused"}))
    input_dim, num_classes = dataset_shape(cfg)
    model = build_model(cfg, input_dim, num_classes)
    test = load_test(cfg)
    x_probe = test.x[probe_indices(len(test), 16, cfg.seed)]
    assert x_probe.shape[0] == 16
    theta0 = ntk_gram(model, initial_params(cfg), x_probe)
    rounds = _replay(cfg)
    rows = read_metrics(runs["standard"])
    assert rows[0]["ntk-change"] == 0.0
    for r in (1, 2):
        want = ntk_change(ntk_gram(model, rounds[r][2], x_probe), theta0)
        assert rows[r]["ntk-change"] == pytest.approx(want, rel=1e-6)
        assert rows[r]["ntk-change"] > 0
    slow = ntk_change(ntk_gram_autodiff(model, rounds[1][2], x_probe), ntk_gram_autodiff(model, initial_params(cfg), x_probe))
    assert rows[1]["ntk-change"] == pytest.approx(slow, rel=1e-5)


def test_packed_equals_standard_for_the_new_metrics_and_rows(runs):
    """Packed (2 nodes x 2 virtual clients) = standard: the new round metrics and every per-client row.

    Same W_k to float32 rounding (vectorized cohort), so rel 1e-5 on values that are differences of
    gradients (see tests/test_cohort.py); the client and round keys are identical, the node ids differ.
    """
    std, packed = read_metrics(runs["standard"]), read_metrics(runs["packed"])
    for a, b in zip(std, packed, strict=True):
        for key in ("ntk-change", "nonlinear-drift-fraction-mean", "nonlinear-drift-fraction-max"):
            if key in a or key in b:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), (a["round"], key)
    assert "nonlinear-drift-fraction-mean" in std[1] and "nonlinear-drift-fraction-mean" not in std[0]
    rows_a, rows_b = read_clients(runs["standard"]), read_clients(runs["packed"])
    key = lambda r: (r["round"], r["client"])  # noqa: E731
    assert sorted(map(key, rows_a)) == sorted(map(key, rows_b))
    b_by = {key(r): r for r in rows_b}
    for a in rows_a:
        b = b_by[key(a)]
        assert set(b) == set(a)
        for column in CLIENT_COLUMNS:
            assert b[column] == pytest.approx(a[column], rel=1e-5, abs=1e-8), (key(a), column)
    assert {r["node"] for r in rows_b} == {1, 2} and len({r["node"] for r in rows_a}) == 4


def test_clients_csv_is_the_jsonl_table(runs):
    """clients.csv has a header row + one line per clients.jsonl row, columns round, client, node, then the metrics."""
    for path in runs.values():
        lines = (path / "clients.csv").read_text().splitlines()
        assert lines[0].split(",") == ["round", "client", "node", *CLIENT_COLUMNS]
        assert len(lines) == 1 + len(read_clients(path)) == 1 + 8


def test_client_metrics_false_writes_and_sends_no_rows(tmp_path):
    """client-metrics=false: no clients.jsonl/.csv, no client/* lists in packed drift replies; round metrics stay."""
    from clients.client_app import build_client_app

    app = build_client_app()
    drift_keys: list[set[str]] = []

    def spy(msg, context):
        reply = app(msg, context)
        if msg.metadata.message_type == "query.packed_drift":
            drift_keys.append(set(reply.content["metrics"].keys()))
        return reply

    cfg = dict(BASE, **{"output-dir": str(tmp_path), "run-name": "off", "client-metrics": False, "num-server-rounds": 1,
                        "clients-per-node": 2, "ntk-probe-size": 0})
    run_dir = run_in_process(cfg, client_app=spy)
    assert not (run_dir / "clients.jsonl").exists() and not (run_dir / "clients.csv").exists()
    assert read_clients(run_dir) == []
    assert drift_keys and not any(k.startswith("client/") for keys in drift_keys for k in keys)
    rows = read_metrics(run_dir)
    assert "nonlinear-drift-fraction-mean" in rows[1] and "ntk-change" not in rows[1]  # ntk-probe-size=0: off


def test_cohort_drift_nonlinear_equals_mechanism_per_client():
    """measure_cohort_drift_vectorized(nonlinear=True)'s fraction = mechanism's cohort and one-client functions.

    4 clients of sizes (7, 5, 7, 5), each W_k = W̄ + 0.05 * noise: rel 1e-5 (float32, three code paths).
    Without nonlinear the fraction is NaN (not measured).
    """
    from fedavg_relu.core.cohort import measure_cohort_drift_vectorized
    from fedavg_relu.core.data import TensorData

    cfg = RunConfig(dataset="synthetic", synthetic_input_dim=5, synthetic_num_classes=3, width=24, depth=2,
                    model_family="standard")
    model = build_model(cfg, 5, 3)
    glob = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    datas = [TensorData(torch.randn(s, 5, generator=g), torch.randint(0, 3, (s,), generator=g)) for s in (7, 5, 7, 5)]
    stacked = {n: np.stack([v + 0.05 * torch.randn(v.shape, generator=g).numpy() for _ in datas]).astype(np.float32)
               for n, v in glob.items()}
    drifts, _ = measure_cohort_drift_vectorized(model, stacked, glob, None, datas, "cross-entropy", nonlinear=True)
    cohort = measure_cohort_nonlinear_drift_vectorized(model, stacked, glob, datas, "cross-entropy")
    for i, data in enumerate(datas):
        local = {n: s[i] for n, s in stacked.items()}
        one = nonlinear_drift(model, local, glob, data.x, data.y, "cross-entropy").fraction
        assert drifts[i].nonlinear_fraction == pytest.approx(cohort[i].fraction, rel=1e-5)
        assert drifts[i].nonlinear_fraction == pytest.approx(one, rel=1e-5)
    plain, _ = measure_cohort_drift_vectorized(model, stacked, glob, None, datas, "cross-entropy")
    assert all(math.isnan(d.nonlinear_fraction) for d in plain)


def test_writer_appends_client_rows_and_resume_keeps_checkpointed_rounds(tmp_path):
    """append_clients twice: 3 jsonl lines (NaN -> null), csv = header + 3; resume_clients(1) keeps round 1's 2 rows,
    drops round 2's and a cut-off last line; resume_clients(0) removes both files."""
    writer = RunWriter(tmp_path)
    writer.append_clients([{"round": 1, "client": 0, "node": 5, "gradient-drift": 0.5},
                           {"round": 1, "client": 1, "node": 6, "gradient-drift": math.nan}])
    writer.append_clients([{"round": 2, "client": 0, "node": 5, "gradient-drift": 0.25}])
    rows = read_clients(tmp_path)
    assert [r["round"] for r in rows] == [1, 1, 2] and rows[1]["gradient-drift"] is None
    assert (tmp_path / "clients.csv").read_text().splitlines() == [
        "round,client,node,gradient-drift", "1,0,5,0.5", "1,1,6,", "2,0,5,0.25",
    ]
    with open(tmp_path / "clients.jsonl", "a") as fh:
        fh.write('{"round": 3, "cli')  # the interrupted run's half line
    resumed = RunWriter(tmp_path)
    assert resumed.resume_clients(1) == 2
    assert [r["round"] for r in read_clients(tmp_path)] == [1, 1]
    assert len((tmp_path / "clients.csv").read_text().splitlines()) == 3
    assert RunWriter(tmp_path).resume_clients(0) == 0
    assert not (tmp_path / "clients.jsonl").exists() and not (tmp_path / "clients.csv").exists()


def test_tensorboard_gets_the_new_round_metrics(tmp_path):
    """tensorboard=true: ntk-change and nonlinear-drift-fraction-mean/-max are scalars at rounds 0..1 / 1."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = dict(BASE, **{"output-dir": str(tmp_path), "run-name": "tb", "tensorboard": True, "num-server-rounds": 1,
                        "num-partitions": 2, "client-metrics": False})
    run_dir = run_in_process(cfg)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"ntk-change", "nonlinear-drift-fraction-mean", "nonlinear-drift-fraction-max"} <= tags
    rows = read_metrics(run_dir)
    assert [e.step for e in events.Scalars("ntk-change")] == [0, 1]
    assert events.Scalars("nonlinear-drift-fraction-mean")[0].value == pytest.approx(rows[1]["nonlinear-drift-fraction-mean"], rel=1e-6)


def test_config_rules_of_the_new_keys():
    """Defaults drift-nonlinear=false, client-metrics=true, ntk-probe-size=64; the fraction needs drift-metrics."""
    cfg = RunConfig()
    assert (cfg.drift_nonlinear, cfg.client_metrics, cfg.ntk_probe_size) == (False, True, 64)
    with pytest.raises(ConfigError, match="drift-nonlinear=True: expected drift-metrics=true"):
        RunConfig.from_mapping({"drift-nonlinear": True, "drift-metrics": False})
    with pytest.raises(ConfigError, match="ntk-probe-size=-1: expected an integer >= 0"):
        RunConfig.from_mapping({"ntk-probe-size": -1})


def test_config_json_records_the_switches(runs):
    """config.json of a run carries the three keys as given."""
    payload = json.loads((runs["standard"] / "config.json").read_text())["config"]
    assert payload["drift-nonlinear"] is True and payload["client-metrics"] is True and payload["ntk-probe-size"] == 16


def test_client_drift_without_the_fraction_round_trips():
    """A reply without nonlinear-fraction parses with NaN; to_metrics leaves a NaN fraction out, keeps a number."""
    d = ClientDrift(4, 1.0, 0.5, 2.0, 1.5, 0.3, 0.2, 0.1, 0.0)
    assert "nonlinear-fraction" not in d.to_metrics() and math.isnan(ClientDrift.from_metrics(d.to_metrics()).nonlinear_fraction)
    e = ClientDrift(4, 1.0, 0.5, 2.0, 1.5, 0.3, 0.2, 0.1, 0.0, 0.25)
    assert e.to_metrics()["nonlinear-fraction"] == 0.25 and ClientDrift.from_metrics(e.to_metrics()) == e


# --- predictions 4 (with the nonlinear fraction) and 7, and their figures ---------------------------
def _mechanism_tables(nonlinear_exponent: float = -0.25):
    """_theory_tables' laws plus nonlinear-drift-fraction-mean = 0.3 m^a and ntk-change = 0.5 m^-1/2 (rounds >= 1)."""
    from _theory_tables import theory_tables

    metrics, cells = theory_tables()
    trained = (metrics["group"] == "width") & (metrics["round"] >= 1)
    metrics.loc[trained, "nonlinear-drift-fraction-mean"] = 0.3 * metrics.loc[trained, "width"] ** nonlinear_exponent
    metrics.loc[trained, "nonlinear-drift-fraction-max"] = 0.6 * metrics.loc[trained, "width"] ** nonlinear_exponent
    metrics.loc[trained, "ntk-change"] = 0.5 * metrics.loc[trained, "width"] ** -0.5
    return metrics, cells


def test_prediction_4_uses_the_nonlinear_fraction_and_7_the_ntk_change():
    """Fraction 0.3 m^-1/4: slope -0.25 < -0.1, prediction 4 agrees (its other slopes are _theory_tables' 0, 1, 0);
    a constant fraction (slope 0) makes it disagree. ntk-change 0.5 m^-1/2: prediction 7's slope -0.5, agrees."""
    from fedavg_relu.experiments.predictions import check_all, check_drift_smoothness, check_ntk_change, checks_markdown

    metrics, cells = _mechanism_tables()
    four = check_drift_smoothness(metrics)
    assert four.measured["slope-nonlinear-fraction"] == pytest.approx(-0.25)
    assert four.agrees is True and "nonlinear drift fraction -0.250" in four.summary
    assert check_drift_smoothness(_mechanism_tables(0.0)[0]).agrees is False
    seven = check_ntk_change(metrics)
    assert seven.measured["slope"] == pytest.approx(-0.5) and seven.agrees is True
    checks = check_all(metrics, cells)
    assert [c.number for c in checks] == [1, 2, 3, 4, 5, 6, 7]
    assert checks_markdown(checks).strip().splitlines()[-1].startswith("| 7 |")
    from _theory_tables import theory_tables

    plain, plain_cells = theory_tables()  # without the new columns: the six checks as before, 7 left out
    assert len(check_all(plain, plain_cells)) == 6 and "slope-nonlinear-fraction" not in check_drift_smoothness(plain).measured


@pytest.mark.slow
def test_mechanism_figures_are_drawn_when_recorded(tmp_path):
    """With both columns recorded, theory_figures adds fig4b (nonlinear fraction) and fig7 (ntk-change) as non-empty PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    from fedavg_relu.experiments.plots import theory_figures

    metrics, cells = _mechanism_tables()
    names = {p.name for p in theory_figures(metrics, cells, tmp_path, formats=("png",))}
    assert {"fig4b_nonlinear_drift_vs_width.png", "fig7_ntk_change_vs_width.png"} <= names
    assert all((tmp_path / n).stat().st_size > 1000 for n in names)
