"""The in-process grid gives what Flower's Ray simulation engine gives (issue 13).

Sweeps, comparisons and many tests run through :class:`fedavg_relu.runtime.local_grid.LocalGrid`
(``run_in_process``); users run Flower's Ray engine (``simulate`` / ``flwr run``).
The strategy, the ClientApp handlers and the seeds are the same; only the transport
differs, and with it the order in which replies arrive. Averages are float64 sums
rounded once to float32, and the drift summaries are sums over clients, so the order
changes at most the last float32 bit of the model and the float64 sums' last digits:
every metric agrees to relative 1e-6 (timing columns aside).
"""

from __future__ import annotations

import math

import pytest

from fedavg_relu.core.results import read_metrics
from fedavg_relu.runtime.simulation import run_in_process, simulate

pytestmark = pytest.mark.e2e

TIMING = {"seconds", "elapsed", "drift-seconds"}
BASE = {
    "dataset": "synthetic", "synthetic-num-examples": 240, "num-partitions": 4, "width": 64,
    "num-server-rounds": 2, "local-steps": 3, "batch-size": 8, "save-model": False,
}


@pytest.mark.parametrize(
    "extra",
    [
        {"partitioner": "iid"},  # standard path: one node per client
        {"partitioner": "dirichlet", "dirichlet-alpha": 0.5, "clients-per-node": 2},  # packed: 2 nodes x 2 clients
    ],
    ids=["standard-iid", "packed-dirichlet"],
)
def test_local_grid_equals_ray_engine(tmp_path, extra):
    """Same config through run_in_process (LocalGrid) and simulate (Flower's Ray engine): same metrics.jsonl."""
    cfg = dict(BASE, **extra, **{"output-dir": str(tmp_path)})
    local = read_metrics(run_in_process(dict(cfg, **{"run-name": "local"})))
    ray = read_metrics(simulate(dict(cfg, **{"run-name": "ray"}), num_cpus_per_client=1))
    assert [r["round"] for r in local] == [r["round"] for r in ray] == [0, 1, 2]
    for a, b in zip(local, ray, strict=True):
        assert set(a) == set(b)
        for key, value in a.items():
            if key in TIMING:
                continue
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(b[key]), key
            else:
                assert b[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (a["round"], key)
    assert local[-1]["clients-trained"] == 4 and local[-1]["clients-measured"] == 4
