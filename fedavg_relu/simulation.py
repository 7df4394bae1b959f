"""Run a configured experiment in Flower's Ray simulation engine from Python.

``flwr run .`` is the user's path (see the README and :mod:`fedavg_relu.cli`);
this is the in-process path for tests and notebooks: it passes the run config
to both apps itself (``run_simulation`` does not read ``pyproject.toml``) and
gives Ray its own temporary directory.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import RunConfig

#: Longest wait between two looks for new instructions (Flower's own loop: every 0.1 s, always).
EXTRACT_INTERVAL_S = 0.1


def _add_messages_to_queue(state, queue, nodes_mapping, f_stop, interval: float = EXTRACT_INTERVAL_S) -> None:
    """Drop-in for ``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``.

    Flower's simulation runtime moves instructions from its LinkState to the
    workers' queue in a thread that asks every node in turn for its next message
    (``get_message_ins(node_id, limit=1)``, each call scanning every stored
    message) and then sleeps 0.1 s: a message waits 50 ms on average before any
    node sees it, and each sweep costs (nodes x messages) checks, which grows with
    10,000 virtual nodes. This one

    * wakes up when the ServerApp stores an instruction (the LinkState's
      ``store_message_ins`` is wrapped to set an event, on this state object only and
      only while the loop runs), and at the latest every ``interval`` seconds;
    * looks at the stored messages once per sweep and asks only the nodes that have
      an undelivered one, through the same ``get_message_ins``, which marks them
      delivered exactly as before.

    Nothing polls while the workers train (a 2 ms polling loop measurably slowed the
    training on 2 cores). With a LinkState that lacks these attributes it falls back
    to Flower's loop (every node, every ``interval``).
    """
    nodes = set(nodes_mapping.keys())
    store, lock = getattr(state, "message_ins_store", None), getattr(state, "lock", None)
    original = getattr(state, "store_message_ins", None)
    wake = threading.Event()
    event_driven = store is not None and lock is not None and original is not None
    if event_driven:

        def store_and_wake(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            finally:
                wake.set()

        state.store_message_ins = store_and_wake
    try:
        while not f_stop.is_set():
            wake.clear()
            if event_driven:
                with lock:
                    pending = {m.metadata.dst_node_id for m in list(store.values()) if m.metadata.delivered_at == ""}
                pending &= nodes
            else:
                pending = nodes
            for node_id in sorted(pending):
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            if event_driven:
                wake.wait(interval)
            else:
                f_stop.wait(interval)
    finally:
        if event_driven:
            del state.store_message_ins  # the instance attribute: the class's method shows again


class _FastExtractor:
    """Context manager: Flower's simulation runtime uses :func:`_add_messages_to_queue` inside it."""

    def __enter__(self):
        from flwr.server.superlink.fleet.vce import vce_api

        self._module, self._original = vce_api, getattr(vce_api, "add_messages_to_queue", None)
        if self._original is not None:
            vce_api.add_messages_to_queue = _add_messages_to_queue
        return self

    def __exit__(self, *exc) -> None:
        if self._original is not None:
            self._module.add_messages_to_queue = self._original


def install_fast_extractor() -> bool:
    """Use :func:`_add_messages_to_queue` for the rest of this process, if this is Flower's simulation process.

    ``flwr run`` on a simulation SuperLink runs the ServerApp and the simulation
    runtime together in a ``flwr-simulation`` process; the ServerApp's entry point
    calls this first thing, seconds before the runtime (which starts the Ray actors
    first) creates its extractor thread. Anywhere else it does nothing and returns
    False. Idempotent.
    """
    if Path(sys.argv[0]).name != "flwr-simulation":
        return False
    from flwr.server.superlink.fleet.vce import vce_api

    if getattr(vce_api, "add_messages_to_queue", None) is not None:
        vce_api.add_messages_to_queue = _add_messages_to_queue
        return True
    return False


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
    of polling every node every 0.1 s (:func:`_add_messages_to_queue`).
    """
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from clients.client_app import build_client_app

    from .server_app import run_experiment

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
        # Flower's InMemoryGrid polls for replies every 0.1 s (its `pull_interval` parameter): at
        # packed-mode round times (~0.1-0.3 s) that wait is a large share; poll every 5 ms instead.
        if hasattr(grid, "pull_interval"):
            grid.pull_interval = min(grid.pull_interval, 0.005)
        out["run_dir"] = run_experiment(grid, cfg)

    # Ray's socket paths must stay under ~107 characters: default to a short private dir
    own_tmp = ray_temp_dir is None and not joining
    temp_dir = Path(tempfile.mkdtemp(prefix="fr-ray-", dir="/tmp")) if own_tmp else Path(ray_temp_dir or ".").resolve()
    init_args: dict[str, Any] = {"include_dashboard": False}
    if not joining:
        init_args["_temp_dir"] = str(temp_dir)
    init_args.update(ray_init_args or {})
    try:
        with _FastExtractor():
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
    """Run the experiment on a :class:`~fedavg_relu.local_grid.LocalGrid` (no Ray); return the run folder.

    Same ServerApp logic, strategy and ClientApp handlers as :func:`simulate`;
    only the transport differs. ``client_app`` replaces the project's ClientApp.
    """
    from clients.client_app import build_client_app

    from .local_grid import LocalGrid
    from .server_app import run_experiment

    if not isinstance(cfg, RunConfig):
        cfg = RunConfig.from_mapping(cfg)
    grid = LocalGrid(client_app or build_client_app(), num_nodes or cfg.num_nodes, cfg.to_mapping())
    return run_experiment(grid, cfg)
