"""End to end: the simulation on a real two-node Ray cluster (head + worker on loopback)."""

from __future__ import annotations

import pytest

from fedavg_relu.ray_cluster import LocalRayCluster
from fedavg_relu.results import read_metrics
from fedavg_relu.simulation import simulate

pytestmark = pytest.mark.e2e


def test_simulation_runs_on_an_existing_ray_cluster(tmp_path):
    """`ray start --head` (1 CPU) + a worker node (1 CPU); simulate() joins it by address: 2 rounds, 4 clients, all trained.

    Packed mode (2 nodes x 2 virtual clients) so both paths' messages cross the cluster; afterwards
    every process the cluster started is gone (stopped by PID / process group, never `ray stop`).
    """
    cluster = LocalRayCluster(head_cpus=1, worker_cpus=1, num_workers=1)
    try:
        cluster.start()
        assert cluster._cpus() == 2
        cfg = {
            "dataset": "synthetic", "synthetic-num-examples": 200, "num-partitions": 4, "clients-per-node": 2,
            "width": 32, "num-server-rounds": 2, "local-steps": 2, "output-dir": str(tmp_path), "run-name": "cluster",
        }
        run_dir = simulate(cfg, ray_init_args={"address": cluster.address})
        rows = read_metrics(run_dir)
        assert [r["round"] for r in rows] == [0, 1, 2]
        assert all(r["clients-trained"] == 4 and r["clients-measured"] == 4 for r in rows[1:])
        pids = [p.pid for p in cluster.processes]
    finally:
        cluster.stop()
    assert cluster.group_members(pids) == []  # every process of every group is gone (zombies aside)
    assert not cluster.temp_dir.exists()


def test_cluster_ports_never_fall_in_a_worker_port_range():
    """Ray refuses to start a node when a component's port lies in its worker-port range (seen in CI):
    the ports a LocalRayCluster hands out (head + 3 workers) are distinct and outside every range."""
    import itertools
    import shutil

    cluster = LocalRayCluster(num_workers=3)
    try:
        args = [a for _ in range(4) for a in cluster._node_ports()]
        singles = [int(a.split("=")[1]) for a in args if "worker-port" not in a] + [cluster.port]
        assert len(set(singles)) == len(singles)
        assert len(cluster._ranges) == 4
        for lo, hi in cluster._ranges:
            assert hi - lo == 200 and not any(lo <= p <= hi for p in singles)
        for (a, b), (c, d) in itertools.combinations(cluster._ranges, 2):
            assert b < c or d < a
    finally:
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
