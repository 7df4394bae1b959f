"""Run a configured experiment in Flower's Ray simulation engine from Python.

``flwr run .`` is the user's path (see the README and :mod:`fedavg_relu.cli`);
this is the in-process path for tests and notebooks: it passes the run config
to both apps itself (``run_simulation`` does not read ``pyproject.toml``) and
gives Ray its own temporary directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedavg_relu.flower import seam
from fedavg_relu.core.config import RunConfig

# The extractor that simulate() and `flwr run` put into Flower's runtime lives in the seam
# (the names below are kept for fedavg_relu.server_app and tests/test_simulation.py).
_add_messages_to_queue = seam.add_messages_to_queue
_FastExtractor = seam.FastExtractor
install_fast_extractor = seam.install_fast_extractor
EXTRACT_INTERVAL_S = seam.EXTRACT_INTERVAL_S


def default_cpus_per_client(num_nodes: int, joining: bool = False) -> int:
    """Ray CPUs per ClientApp actor: every core of this machine for a single node, else 1.

    One actor per core with one torch thread each is fastest for the standard path
    (benchmarks/scale.py); a single packed node would leave all but one core idle with
    1, so it gets them all (torch then runs its batched products on every core).
    On a cluster joined by address the machine's cores say nothing: 1.
    """
    if num_nodes == 1 and not joining:
        return max(1, os.cpu_count() or 1)
    return 1


def simulate(
    cfg: RunConfig | Mapping[str, Any],
    num_supernodes: int | None = None,
    num_cpus_per_client: int | None = None,
    ray_temp_dir: str | os.PathLike | None = None,
    client_mods: list | None = None,
    ray_init_args: Mapping[str, Any] | None = None,
) -> Path:
    """Run the experiment with ``num_supernodes`` (default ``RunConfig.num_nodes``: ``num-partitions``,
    or ``ceil(num-partitions / clients-per-node)`` in packed mode) virtual nodes.

    ``ray_init_args`` go to ``ray.init`` (Flower's backend ``init_args``); with an
    ``address`` (e.g. ``"127.0.0.1:6379"``) the simulation joins that running Ray
    cluster instead of starting a private one, and ``ray_temp_dir`` is not used.
    Returns the run folder.

    ``num_cpus_per_client`` (Ray CPUs, and so torch threads, per ClientApp actor)
    defaults to :func:`default_cpus_per_client`: 1, or every core when a single
    node trains everything (packed mode with ``clients-per-node >= num-partitions``).

    Flower's runtime is used as shipped except for one function: the thread that
    hands instructions to the workers wakes when an instruction is stored instead
    of polling every node every 0.1 s (:func:`fedavg_relu.flower.seam.add_messages_to_queue`).
    """
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from clients.client_app import build_client_app

    from fedavg_relu.server_app import run_experiment

    if not isinstance(cfg, RunConfig):
        cfg = RunConfig.from_mapping(cfg)
    nodes = num_supernodes or cfg.num_nodes
    joining = bool(ray_init_args and "address" in ray_init_args)
    if num_cpus_per_client is None:
        num_cpus_per_client = default_cpus_per_client(nodes, joining)
    mapping = cfg.to_mapping()
    out: dict[str, Path] = {}

    def inject_config(message, context, call_next):
        # Flower forbids editing context.run_config: hand the app a copy that shares
        # the node's state (so the kept local model survives between messages).
        from flwr.app import Context

        ctx = Context(
            run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
            state=context.state, run_config=dict(mapping),
        )
        return call_next(message, ctx)

    server = ServerApp()

    @server.main()
    def _main(grid, context) -> None:
        # Flower's InMemoryGrid polls for replies every 0.1 s: at packed-mode round times
        # (~0.1-0.3 s) that wait is a large share; poll every 5 ms instead.
        seam.lower_pull_interval(grid)
        out["run_dir"] = run_experiment(grid, cfg)

    # Ray's socket paths must stay under ~107 characters: default to a short private dir
    own_tmp = ray_temp_dir is None and not joining
    temp_dir = Path(tempfile.mkdtemp(prefix="fr-ray-", dir="/tmp")) if own_tmp else Path(ray_temp_dir or ".").resolve()
    init_args: dict[str, Any] = {"include_dashboard": False}
    if not joining:
        init_args["_temp_dir"] = str(temp_dir)
    init_args.update(ray_init_args or {})
    try:
        with seam.FastExtractor():
            run_simulation(
                server_app=server,
                client_app=build_client_app(mods=[inject_config, *(client_mods or [])]),
                num_supernodes=nodes,
                backend_config={"client_resources": {"num_cpus": num_cpus_per_client}, "init_args": init_args},
            )
    finally:
        if own_tmp:
            shutil.rmtree(temp_dir, ignore_errors=True)
    if "run_dir" not in out:
        raise RuntimeError("the simulation ended without finishing the run (see the log above)")
    return out["run_dir"]


def run_in_process(cfg: RunConfig | Mapping[str, Any], num_nodes: int | None = None, client_app=None) -> Path:
    """Run the experiment on a :class:`~fedavg_relu.runtime.local_grid.LocalGrid` (no Ray); return the run folder.

    Same ServerApp logic, strategy and ClientApp handlers as :func:`simulate`;
    only the transport differs. ``client_app`` replaces the project's ClientApp.
    """
    from clients.client_app import build_client_app

    from fedavg_relu.runtime.local_grid import LocalGrid
    from fedavg_relu.server_app import run_experiment

    if not isinstance(cfg, RunConfig):
        cfg = RunConfig.from_mapping(cfg)
    grid = LocalGrid(client_app or build_client_app(), num_nodes or cfg.num_nodes, cfg.to_mapping())
    return run_experiment(grid, cfg)
