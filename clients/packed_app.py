"""Packed-mode handlers: one Flower node trains and measures a cohort of virtual clients.

Message types (:mod:`fedavg_relu.flower.schema`): ``train.packed``,
``query.packed_drift`` and ``query.cohort`` (which virtual clients a node holds).
The work is :mod:`fedavg_relu.core.packed`; these handlers only unpack, call it and
pack sums.

The layout is the *server's* word (:mod:`strategies.cohorts`): the cohort query asks
a node only for its ``partition-id``; the server decides which virtual clients each
node simulates and names them in every train message (``virtual-clients``), with
``num-partitions``. A node never derives its cohort from its own copy of the run
config (the ServerApp may pack a federation with fewer SuperNodes than clients, e.g.
plain ``flwr run .`` with Flower's 2 default SuperNodes).

Between a round's two exchanges the drift measurement needs the cohort's local
models W_k (``K x`` the model). They are written, chunk by chunk as training
produces them, to disk-backed arrays in the node's local model store
(:mod:`fedavg_relu.core.spill`) and read back chunk by chunk by the drift handler:
neither the node's Context (which Flower's Ray engine ships with every message)
nor any worker's memory ever holds the whole cohort. Between rounds a node keeps
only a few scalars per virtual client.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedavg_relu.flower import schema as wire
from fedavg_relu.core.config import RunConfig
from fedavg_relu.core.packed import measure_cohort_drift, train_cohort
from fedavg_relu.flower.client_table import client_row_lists
from fedavg_relu.flower.records import arrays_to_params, config_records, params_to_arrays

from .node import ControlVariates, local_store, run_config, settings_from, split_control

COHORT_KEY = "packed-cohort"  # node state: server-round, clients, loss-before
LOCKSTEP_KEY = "packed-lockstep"  # node state: lockstep sums of the round
MEASURED_KEY = "packed-measured"  # node state: f_k at the model of the last drift exchange, per client


def packed_config(msg: Message, context: Context) -> RunConfig:
    """The run config with the server's ``num-partitions`` for this run (it decides how the data is split)."""
    cfg = run_config(context)
    config = msg.content[wire.CONFIG] if wire.CONFIG in config_records(msg.content) else {}
    if wire.NUM_PARTITIONS in config and int(config[wire.NUM_PARTITIONS]) != cfg.num_partitions:
        return cfg.replace(num_partitions=int(config[wire.NUM_PARTITIONS]))
    return cfg


def model_params(msg: Message) -> dict:
    """The received model in the model's float32 (Flower's adaptive strategies send float64 averages)."""
    return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in arrays_to_params(msg.content[wire.ARRAYS]).items()}


def named_clients(config, cfg: RunConfig) -> list[int]:
    """The virtual clients the server named for this node (``virtual-clients``), checked."""
    ids = [int(k) for k in config.get(wire.VIRTUAL_CLIENTS, [])]
    if not ids or len(set(ids)) != len(ids) or not all(0 <= k < cfg.num_partitions for k in ids):
        raise ValueError(f"virtual-clients={ids}: expected distinct partition ids in [0, {cfg.num_partitions})")
    return ids


def packed_train(msg: Message, context: Context) -> Message:
    """Train the sampled part of this node's cohort; reply with its weighted mean model and sum of weights."""
    cfg = packed_config(msg, context)
    config = msg.content[wire.CONFIG]
    server_round = int(config[wire.SERVER_ROUND])
    ids = named_clients(config, cfg)
    known: dict[int, float] = {}
    measured = context.state.get(MEASURED_KEY)
    if measured is not None and wire.MEASURED_ROUND in config and int(measured["server-round"]) == int(config[wire.MEASURED_ROUND]):
        known = dict(zip((int(k) for k in measured["clients"]), (float(v) for v in measured["loss"]), strict=True))
    keep = bool(config.get(wire.KEEP_LOCAL_MODEL, True))
    store = local_store(context)
    store.discard()
    global_params, server_c = split_control(model_params(msg))
    controls = ControlVariates(config) if server_c is not None else None  # SCAFFOLD: c came along
    cohort_round = train_cohort(
        cfg, ids, server_round, global_params, settings_from(config, cfg),
        known, cfg.lockstep_steps(), keep_local=keep,
        allocate=(lambda shapes: store.allocate(server_round, shapes)) if keep else None,
        scaffold=(lambda k: (server_c, controls.load(k))) if controls is not None else None,
        keep_control=controls.save if controls is not None else None,
        fednova_momentum=float(config[wire.FEDNOVA_MOMENTUM]) if wire.FEDNOVA_MOMENTUM in config else None,
    )
    if keep:
        store.commit(server_round, cohort_round.local_params)
        cohort_round.local_params = None  # on disk now
        context.state[COHORT_KEY] = ConfigRecord(
            {
                "server-round": server_round, "clients": ids, "loss-before": [float(v) for v in cohort_round.loss_before],
                "local-steps": [int(v) for v in cohort_round.num_steps],
            }
        )
        if cohort_round.lockstep:
            lockstep: dict = {"steps": [float(t) for t in sorted(cohort_round.lockstep)]}
            for step, sums in cohort_round.lockstep.items():
                lockstep.update(sums.to_metrics(prefix=f"step-{step}/"))
            context.state[LOCKSTEP_KEY] = MetricRecord(lockstep)
    metrics = MetricRecord(
        {
            wire.TRAIN_LOSS: cohort_round.weighted_mean(cohort_round.train_loss),
            wire.LOSS_BEFORE: cohort_round.weighted_mean(cohort_round.loss_before),
            wire.NUM_EXAMPLES: int(cohort_round.num_examples.sum()),
            wire.LOCAL_STEPS: cohort_round.weighted_mean(cohort_round.num_steps),
        }
    )
    reply = cohort_round.mean_params()
    if wire.FEDNOVA_MOMENTUM in config:  # FedNova: the cohort as one client with its normalised update
        reply, steps = cohort_round.fednova_reply(global_params, float(config[wire.FEDNOVA_MOMENTUM]))
        metrics[wire.LOCAL_STEPS] = steps
    if controls is not None:  # SCAFFOLD: the cohort's example-weighted mean dc_k beside its mean model
        reply.update({wire.SCAFFOLD_DELTA_PREFIX + k: v for k, v in cohort_round.mean_control_delta().items()})
    content = RecordDict({wire.ARRAYS: params_to_arrays(reply), wire.METRICS: metrics})
    return Message(content=content, reply_to=msg)


def packed_drift(msg: Message, context: Context) -> Message:
    """Measure every cohort client's drift against W^{r+1}; reply with :class:`DriftSums` (and lockstep sums).

    With ``client-metrics`` in the ConfigRecord the reply's MetricRecord also carries
    the per-client rows as one list per column (``client/ids``, ``client/<column>``);
    with ``drift-nonlinear`` the nonlinear drift fraction is measured too.
    """
    cfg = packed_config(msg, context)
    config = msg.content[wire.CONFIG]
    server_round = int(config[wire.SERVER_ROUND])
    kept = context.state.get(COHORT_KEY)
    store = local_store(context)
    if kept is None or int(kept["server-round"]) != server_round or not store.has(server_round):
        raise RuntimeError(f"no cohort models kept for round {server_round} on this node")
    ids = [int(k) for k in kept["clients"]]
    try:
        nonlinear = bool(config.get(wire.DRIFT_NONLINEAR, False))
        sums, grad_sum, drifts = measure_cohort_drift(
            cfg, ids, store.load(server_round, writable=False), list(kept["loss-before"]), model_params(msg),
            bool(config.get(wire.RETURN_GRADIENT, False)), nonlinear=nonlinear,
        )
    finally:
        store.discard()
    measured = [d.loss_at_global for d in drifts]
    context.state[MEASURED_KEY] = ConfigRecord({"server-round": server_round, "clients": ids, "loss": measured})
    values: dict = dict(sums.to_metrics())
    if bool(config.get(wire.CLIENT_METRICS, False)):
        steps = list(kept["local-steps"]) if "local-steps" in kept else [float("nan")] * len(ids)
        values.update(client_row_lists(ids, drifts, list(kept["loss-before"]), steps, nonlinear))
    lockstep = context.state.get(LOCKSTEP_KEY)
    if lockstep is not None:
        values.update({f"lockstep-{k}": v for k, v in lockstep.items()})
        del context.state[LOCKSTEP_KEY]
    content = RecordDict({wire.METRICS: MetricRecord(values)})
    if grad_sum is not None:
        content[wire.GRADIENT_SUM] = params_to_arrays(grad_sum)
    return Message(content=content, reply_to=msg)


def cohort(msg: Message, context: Context) -> Message:
    """Tell the server this node's ``partition-id`` (the server decides which virtual clients go with it)."""
    if "partition-id" not in context.node_config:
        raise ValueError("packed mode needs 'partition-id' in the node config")
    metrics = MetricRecord({wire.PARTITION_ID: int(context.node_config["partition-id"])})
    return Message(content=RecordDict({wire.METRICS: metrics}), reply_to=msg)
