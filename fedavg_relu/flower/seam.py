"""Uses of Flower's internals, in one place (each item says what it relies on).

Everything else in the project uses Flower's public API (``flwr.app``,
``flwr.serverapp``, ``flwr.serverapp.strategy``, ``flwr.clientapp``,
``flwr.simulation``, ``flwr.common``'s ``log``). What cannot be had through it lives
here; ``tests/test_flower_contract.py`` checks each item against the installed flwr,
so a Flower release that changes one fails a fast test instead of a run. Every item
was checked against flwr 1.42.0 (``CHECKED_WITH``).

Items, in the order below:

1. :func:`is_simulation_grid`: the simulation runtime hands the ServerApp an ``InMemoryGrid``.
2. :func:`add_messages_to_queue`, :class:`FastExtractor`, :func:`install_fast_extractor`:
   the simulation runtime's message extractor, replaced (``vce_api.add_messages_to_queue``
   and the in-memory LinkState's ``message_ins_store``, ``lock``, ``store_message_ins``,
   ``get_message_ins``, ``Metadata.delivered_at``).
3. :func:`lower_pull_interval`, :func:`pull_interval`: ``InMemoryGrid.pull_interval``.
4. :func:`ensure_task_identity`: ``flwr.supercore.task_identity.TaskIdentity``.
5. :data:`STRATEGY_STATE`, :func:`strategy_state_attrs`: the attributes in which Flower's
   stateful strategies keep their server optimizer (saved in checkpoints).
6. :func:`uses_flower_metric_average`: FedAvg's default metric average
   (``strategy_utils.aggregate_metricrecords`` in ``train_metrics_aggr_fn``).
7. :data:`WORKER_LOST_MARKERS`, :func:`is_worker_lost`: Ray's exception names in the
   error text of a reply whose worker died.
8. :func:`parse_config_args`: ``flwr.common.config.parse_config_args`` (how ``flwr run
   --run-config`` parses ``key=value``).
9. :data:`CLIENT_APP_EXCEPTION`: the error code of a reply whose ClientApp raised.
10. :func:`install_bounded_object_pulls`, :func:`is_http_grid`: a deployment's grid
    (``flwr.superlink.grid.http_grid.HttpGrid``) and the module-level ``pull_objects``
    its ``pull_messages`` calls (:mod:`fedavg_relu.flower.reply_deadline`).
11. :func:`superlink_http_app`: the SuperLink's HTTP app (``flwr.superlink.main.create_app``),
    whose routes the hardened deployment's proxy allows or refuses (:mod:`fedavg_relu.runtime.proxy`).
12. :data:`NUMPY_STYPE`: ``flwr.common.constant.SType.NUMPY``, the stype of an ``Array`` whose
    ``data`` is the bytes ``np.save`` wrote (read in place by :func:`fedavg_relu.flower.records.array_view`).

Contracts the project relies on without code here (``tests/test_flower_contract.py``
checks them too):

* ``Strategy.start`` passes ``grid.send_and_receive``'s return value to
  ``aggregate_train`` / ``aggregate_evaluate`` unconsumed
  (:mod:`fedavg_relu.flower.streaming` hands it a generator);
* ``Grid.push_messages(messages) -> ids`` gives each message its ``message_id`` and
  ``Grid.pull_messages(ids) -> replies`` answers with ``reply_to_message_id`` set
  (:mod:`fedavg_relu.flower.streaming`, :mod:`fedavg_relu.runtime.deploy`); pass the ids positionally:
  flwr 1.43 renames that parameter from ``message_ids`` to ``reply_to_message_ids``;
* ``flwr.superlink.grid.http_grid.pull_objects``, the module-level name
  ``HttpGrid.pull_messages`` calls, wrapped by item 10;
* :mod:`fedavg_relu.runtime.clientapp_worker`: ``flwr.proto.runtime_pb2``, ``flwr.supercore``
  (``constant.TaskType``, ``heartbeat``, ``interceptors``, ``object_ref.load_app``,
  ``retry``, ``runtime.RuntimeHttpClient``), ``flwr.supernode.runtime.run_clientapp``
  (``pull_task_input``, ``push_message``, ``push_task_output``), ``flwr.cli.install``,
  ``flwr.clientapp.client_app``, ``flwr.common.constant``, ``flwr.common.config``:
  it does what ``flwr-clientapp`` does, in a long-lived process.

:data:`fast_path_counts` counts, in this process, how often each fast path ran, so a
test of a real simulation can tell that none of them silently fell back.

Why this module is longer than most: every use of a Flower internal is here on purpose:
one module to read when Flower changes.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.common import log
from flwr.common.constant import SType
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

#: The flwr release every item here was last checked against.
CHECKED_WITH = "1.42.0"

#: Fast path -> times it ran in this process (keys: see :func:`_count`'s callers).
fast_path_counts: Counter[str] = Counter()

#: Item 12: the stype of an ``Array`` holding ``np.save``'s bytes (Flower's ``Array.from_numpy_ndarray``).
NUMPY_STYPE: str = SType.NUMPY
_counts_lock = threading.Lock()


def _count(key: str, n: int = 1) -> None:
    with _counts_lock:
        fast_path_counts[key] += n


# --- 1. the grid of the simulation runtime --------------------------------------------
def is_simulation_grid(grid) -> bool:
    """True when ``grid`` drives simulated nodes in this process's machine.

    Relies on: Flower's simulation runtime (``flwr.simulation.run_simulation``'s main
    loop, used by ``flwr run`` on a simulation SuperLink too) handing the ServerApp a
    ``flwr.superlink.grid.inmemory_grid.InMemoryGrid``; deployments get an HTTP grid.
    The project's :class:`fedavg_relu.runtime.local_grid.LocalGrid` says so itself
    (``simulated = True``). Checked with flwr 1.42.0.
    """
    grid = getattr(grid, "inner", grid)
    if getattr(grid, "simulated", False):
        return True
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


# --- 2. the simulation runtime's message extractor ------------------------------------
#: Longest wait between two looks for new instructions (Flower's own loop: every 0.1 s, always).
EXTRACT_INTERVAL_S = 0.1

_fallback_logged = False


def add_messages_to_queue(state, queue, nodes_mapping, f_stop, interval: float = EXTRACT_INTERVAL_S) -> None:
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
    to Flower's loop (every node, every ``interval``) and logs a warning once.

    Relies on (flwr 1.42.0): ``run_api`` starting the extractor thread with the
    module-level name ``add_messages_to_queue`` and this signature;
    ``InMemoryLinkState.message_ins_store`` (message id -> Message), ``.lock`` (a
    lock guarding it), ``.store_message_ins(message)`` (what ``InMemoryGrid.push_messages``
    calls for each instruction), ``.get_message_ins(node_id, limit)`` (returns the
    node's undelivered messages and sets their ``metadata.delivered_at``, ``""``
    before).

    Counts ``extractor-event-driven`` or ``extractor-polling`` (once per run),
    ``extractor-woken-by-store`` and ``extractor-delivered`` in :data:`fast_path_counts`.
    """
    global _fallback_logged
    nodes = set(nodes_mapping.keys())
    store, lock = getattr(state, "message_ins_store", None), getattr(state, "lock", None)
    original = getattr(state, "store_message_ins", None)
    wake = threading.Event()
    event_driven = store is not None and lock is not None and original is not None
    _count("extractor-event-driven" if event_driven else "extractor-polling")
    if event_driven:

        def store_and_wake(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            finally:
                _count("extractor-woken-by-store")
                wake.set()

        state.store_message_ins = store_and_wake
    elif not _fallback_logged:
        _fallback_logged = True
        log(WARNING, "fedavg-relu: %s lacks message_ins_store/lock/store_message_ins: polling every %.2f s "
            "(see tests/test_flower_contract.py)", type(state).__name__, interval)
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
                    _count("extractor-delivered")
            if event_driven:
                wake.wait(interval)
            else:
                f_stop.wait(interval)
    finally:
        if event_driven:
            del state.store_message_ins  # the instance attribute: the class's method shows again


def _vce_api():
    from flwr.server.superlink.fleet.vce import vce_api

    return vce_api


class FastExtractor:
    """Context manager: Flower's simulation runtime uses :func:`add_messages_to_queue` inside it.

    Relies on: the module attribute ``vce_api.add_messages_to_queue`` (flwr 1.42.0). When
    it is gone nothing is replaced, a warning is logged and ``installed`` is False.
    """

    installed = False

    def __enter__(self):
        self._module = _vce_api()
        self._original = getattr(self._module, "add_messages_to_queue", None)
        if self._original is not None:
            self._module.add_messages_to_queue = add_messages_to_queue
            self.installed = True
        else:
            log(WARNING, "fedavg-relu: Flower's vce_api has no add_messages_to_queue: its own extractor runs")
        return self

    def __exit__(self, *exc) -> None:
        if self._original is not None:
            self._module.add_messages_to_queue = self._original


def install_fast_extractor() -> bool:
    """Use :func:`add_messages_to_queue` for the rest of this process, if this is Flower's simulation process.

    ``flwr run`` on a simulation SuperLink runs the ServerApp and the simulation
    runtime together in a ``flwr-simulation`` process; the ServerApp's entry point
    calls this first thing, seconds before the runtime (which starts the Ray actors
    first) creates its extractor thread. Anywhere else it does nothing and returns
    False. Idempotent.

    Relies on (flwr 1.42.0): the process's executable being named ``flwr-simulation``
    (the console script of ``flwr.simulation.app.flwr_simulation``) and
    ``vce_api.add_messages_to_queue``.
    """
    if Path(sys.argv[0]).name != "flwr-simulation":
        return False
    vce_api = _vce_api()
    if getattr(vce_api, "add_messages_to_queue", None) is not None:
        vce_api.add_messages_to_queue = add_messages_to_queue
        return True
    log(WARNING, "fedavg-relu: Flower's vce_api has no add_messages_to_queue: its own extractor runs")
    return False


# --- 3. how often the in-memory grid looks for replies --------------------------------
#: Seconds between two looks for replies on the simulation's in-memory grid (Flower's default: 0.1).
REPLY_PULL_INTERVAL_S = 0.005


def lower_pull_interval(grid, seconds: float = REPLY_PULL_INTERVAL_S) -> bool:
    """Make ``grid`` look for replies every ``seconds`` at most; False (and a warning) when it cannot.

    Flower's ``InMemoryGrid`` sleeps ``pull_interval`` (0.1 s) between two pulls; at
    packed-mode round times (0.1-0.3 s) that wait is a large share.
    :class:`fedavg_relu.flower.streaming.StreamingGrid` reads the same attribute.

    Relies on: ``InMemoryGrid.pull_interval``, an instance attribute set from its
    constructor parameter and read by its ``send_and_receive`` (flwr 1.42.0).
    Counts ``pull-interval-lowered``.
    """
    if not hasattr(grid, "pull_interval"):
        log(WARNING, "fedavg-relu: %s has no pull_interval: replies are looked for at its own pace",
            type(grid).__name__)
        return False
    grid.pull_interval = min(float(grid.pull_interval), seconds)
    _count("pull-interval-lowered")
    return True


def pull_interval(grid, default: float) -> float:
    """Seconds ``grid`` waits between two pulls (``pull_interval``), else ``default``.

    Relies on: ``InMemoryGrid.pull_interval`` (flwr 1.42.0); the project's own grids
    (:class:`fedavg_relu.flower.reply_deadline.ReplyDeadlineGrid`) have one too.
    """
    return float(getattr(grid, "pull_interval", default))


# --- 4. the task identity Flower needs to build a Message -----------------------------
def ensure_task_identity(run_id: int = 1) -> None:
    """Give this process a task identity, which Flower needs to build messages outside an app.

    The node is the SuperLink's (``SUPERLINK_NODE_ID``), as in a ServerApp process:
    messages built here have the source a real grid expects (flwr 1.43's ``HttpGrid``
    refuses any other). Fields already set are kept.

    Relies on: ``flwr.supercore.task_identity.TaskIdentity``, whose class properties
    ``run_id``, ``task_id`` and ``node_id`` raise ``RuntimeError`` until set and which
    ``Message(...)`` reads; ``flwr.common.constant.SUPERLINK_NODE_ID`` (flwr 1.42.0;
    ``run_simulation`` sets them the same way).
    """
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for field, value in (("run_id", run_id), ("task_id", 1), ("node_id", SUPERLINK_NODE_ID)):
        try:
            getattr(TaskIdentity, field)
        except RuntimeError:
            setattr(TaskIdentity, field, value)


# --- 5. the state of Flower's stateful strategies ------------------------------------
#: Flower strategy -> the attributes that hold its server optimizer state across rounds.
#: Relies on (flwr 1.42.0): ``FedAvgM.momentum_vector`` and ``FedOpt.m_t`` / ``v_t``
#: (FedAdam, FedYogi, FedAdagrad), set to None in ``__init__`` and replaced by
#: ``aggregate_train``. Their ``current_arrays`` is not state: ``configure_train``
#: rebuilds it from the global model each round.
STRATEGY_STATE: dict[type, tuple[str, ...]] = {
    FedAvgM: ("momentum_vector",),
    FedAdam: ("m_t", "v_t"),
    FedYogi: ("m_t", "v_t"),
    FedAdagrad: ("m_t", "v_t"),
}


def strategy_state_attrs(base: type) -> tuple[str, ...]:
    """The state attributes of Flower strategy ``base`` (empty for a stateless one)."""
    return STRATEGY_STATE.get(base, ())


# --- 6. FedAvg's default metric average -----------------------------------------------
def uses_flower_metric_average(strategy: Any) -> bool:
    """True when ``strategy`` averages train metrics with FedAvg's default (every key, weighted by examples).

    Relies on: FedAvg keeping its metric aggregation in ``train_metrics_aggr_fn``,
    defaulting to ``flwr.serverapp.strategy.strategy_utils.aggregate_metricrecords``
    (flwr 1.42.0).
    """
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    return getattr(strategy, "train_metrics_aggr_fn", None) is aggregate_metricrecords


# --- 7. a reply whose Ray worker died ------------------------------------------------
#: Error texts by which Ray says that it killed or lost a worker (Flower 1.42 replaces no dead actor).
#: Relies on: ``ray.exceptions`` class names (ray 2.55) and the simulation runtime's worker
#: writing ``str(type(ex))`` into the error reply's reason (``vce_api.worker``, flwr 1.42.0).
WORKER_LOST_MARKERS = ("ActorDiedError", "RayActorError", "OutOfMemoryError", "WorkerCrashedError")


def is_worker_lost(reason: str) -> bool:
    """True when an error reply's ``reason`` says that Ray lost the worker serving the node."""
    return any(marker in reason for marker in WORKER_LOST_MARKERS)


# --- 8. run-config overrides parsed as flwr run parses them ----------------------------
def parse_config_args(args: list[str] | None) -> dict[str, Any]:
    """``["key=value ...", ...]`` parsed exactly as ``flwr run --run-config`` parses them.

    Relies on: ``flwr.common.config.parse_config_args(config, flatten=True)`` (flwr 1.42.0;
    not exported by ``flwr.common``).
    """
    from flwr.common.config import parse_config_args as flower_parse

    return dict(flower_parse(args or None))


# --- 9. the error code of a reply whose ClientApp raised --------------------------------
def _client_app_exception_code() -> int:
    from flwr.common.constant import ErrorCode

    return int(ErrorCode.CLIENT_APP_RAISED_EXCEPTION)


#: The error code Flower's engines put in a reply whose ClientApp raised (2 in flwr 1.42.0).
#: Relies on: ``flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION`` (not exported by ``flwr.common``).
CLIENT_APP_EXCEPTION = _client_app_exception_code()


# --- 10. a deployment's grid and its object pulls -------------------------------------------
def is_http_grid(grid) -> bool:
    """True when ``grid`` is Flower's ``HttpGrid`` (a deployment's ServerApp); False on another layout.

    Relies on: ``flwr.superlink.grid.http_grid.HttpGrid`` (flwr 1.42.0).
    """
    try:
        from flwr.superlink.grid.http_grid import HttpGrid  # noqa: PLC0415 - a deployment-only import
    except ImportError:
        return False
    return isinstance(grid, HttpGrid)


def install_bounded_object_pulls(deadline, backoff_cap: float) -> None:
    """Make HttpGrid's ``pull_objects`` honour the deadline of the pull in progress (idempotent).

    ``deadline``: a ContextVar holding the monotonic deadline of the pull in progress (None:
    no deadline); a waiting try is retried at most ``backoff_cap`` s apart while one holds.
    Outside a deadline the call is Flower's, unchanged.

    Relies on: ``flwr.superlink.grid.http_grid.pull_objects``, the module-level name
    ``HttpGrid.pull_messages`` calls, and its ``max_time``, ``backoff_cap`` and
    ``initial_backoff`` keywords (flwr 1.42.0; ``tests/test_deployment.py`` checks it).
    """
    from flwr.superlink.grid import http_grid  # noqa: PLC0415 - a deployment-only import

    flower_pull_objects = http_grid.pull_objects
    if getattr(flower_pull_objects, "bounded_by_deadline", False):
        return

    def pull_objects(object_ids, pull_object_fn, **kwargs):
        due = deadline.get()
        if due is not None:
            remaining = max(0.0, due - time.monotonic())
            limit = kwargs.get("max_time")
            kwargs["max_time"] = remaining if limit is None else min(limit, remaining)
            kwargs["backoff_cap"] = min(kwargs.get("backoff_cap", backoff_cap), backoff_cap)
            kwargs["initial_backoff"] = min(kwargs.get("initial_backoff", 0.2), 0.2)
        return flower_pull_objects(object_ids, pull_object_fn, **kwargs)

    pull_objects.bounded_by_deadline = True  # type: ignore[attr-defined]
    pull_objects.__wrapped__ = flower_pull_objects  # type: ignore[attr-defined]
    http_grid.pull_objects = pull_objects


# --- 11. the SuperLink's HTTP app (its routes) ---------------------------------------------
def superlink_http_app():
    """The installed Flower's SuperLink HTTP app, built as ``flower-superlink`` builds it, nothing started.

    Relies on: ``flwr.superlink.main.create_app()`` (flwr 1.42.0) taking no required arguments and
    returning a FastAPI app with in-memory state; the hardened deployment reads its routes
    (``tests/test_proxy_routes.py`` fails when they change).
    """
    from flwr.superlink.main import create_app  # noqa: PLC0415 - a deployment-only import

    return create_app()
