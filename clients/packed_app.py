"""Packed-mode handlers: one Flower node trains and measures a cohort of virtual clients.

``clients.client_app`` hands ``train`` and ``query.drift`` messages here when
``clients-per-node > 1``; ``query.cohort`` tells the server which virtual
clients this node holds. The work is :mod:`fedavg_relu.packed`; these handlers
only unpack, call it and pack sums.

Between a round's two exchanges the drift measurement needs the cohort's local
models W_k (``K x`` the model: 120 MB for 100 clients at width 4096). They are
*not* put in the node's ``context.state``: Flower's Ray engine pickles a node's
Context to the actor and back with every message. They stay in this worker
process (:data:`_LOCAL_MODELS`, one entry per node, dropped when the drift
exchange has used them). The node state holds what is needed to rebuild them
when the drift message lands in another worker process (several actors): the
round's W^r (one model), its train config, the client ids and f_k(W^r);
retraining from W^r with the same seeds gives the same W_k. Between rounds a node
keeps only a few scalars per virtual client.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedavg_relu.packed import measure_cohort_drift, node_clients, train_cohort
from fedavg_relu.records import arrays_to_params, params_to_arrays

COHORT_START_KEY = "packed-start"  # W^r of the round (to rebuild the W_k in another process)
COHORT_CONFIG_KEY = "packed-train-config"  # the round's train ConfigRecord (same purpose)
COHORT_KEY = "packed-cohort"  # server-round, clients, loss-before
LOCKSTEP_KEY = "packed-lockstep"  # lockstep sums of the round
MEASURED_KEY = "packed-measured"  # f_k at the model of the last drift exchange, per client
VIRTUAL_CLIENTS_KEY = "virtual-clients"  # ConfigRecord key: which of this node's clients train this round
GRADIENT_SUM_KEY = "gradient-sum"  # drift reply: sum_k n_k grad f_k(W^{r+1}), float64


#: (run id, node id) -> (server round, stacked W_k): this process's kept cohort models.
_LOCAL_MODELS: dict[tuple[int, int], tuple[int, dict]] = {}


def held_clients(context: Context, cfg) -> list[int]:
    """The virtual clients this node simulates (from its ``partition-id``)."""
    if "partition-id" not in context.node_config:
        raise ValueError("packed mode (clients-per-node > 1) needs 'partition-id' in the node config")
    return node_clients(int(context.node_config["partition-id"]), cfg.clients_per_node, cfg.num_partitions)


def packed_train(msg: Message, context: Context) -> Message:
    """Train the sampled part of this node's cohort; reply with its weighted mean model and sum of weights."""
    from clients.client_app import run_config, settings_from

    cfg = run_config(context)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    held = held_clients(context, cfg)
    ids = [int(k) for k in config[VIRTUAL_CLIENTS_KEY]] if VIRTUAL_CLIENTS_KEY in config else held
    if not ids or not set(ids) <= set(held):
        raise ValueError(f"virtual-clients={ids}: expected a non-empty subset of this node's clients {held[0]}..{held[-1]}")
    known: dict[int, float] = {}
    measured = context.state.get(MEASURED_KEY)
    if measured is not None and "measured-round" in config and int(measured["server-round"]) == int(config["measured-round"]):
        known = dict(zip((int(k) for k in measured["clients"]), (float(v) for v in measured["loss"]), strict=True))
    keep = bool(config.get("keep-local-model", True))
    cohort = train_cohort(
        cfg, ids, server_round, arrays_to_params(msg.content["arrays"]), settings_from(config, cfg),
        known, cfg.lockstep_steps(), keep_local=keep,
    )
    _LOCAL_MODELS.pop((context.run_id, context.node_id), None)
    if keep:
        _LOCAL_MODELS[(context.run_id, context.node_id)] = (server_round, cohort.local_params)
        context.state[COHORT_START_KEY] = msg.content["arrays"]
        context.state[COHORT_CONFIG_KEY] = ConfigRecord(dict(config))
        context.state[COHORT_KEY] = ConfigRecord(
            {"server-round": server_round, "clients": ids, "loss-before": [float(v) for v in cohort.loss_before]}
        )
        if cohort.lockstep:
            lockstep: dict = {"steps": [float(t) for t in sorted(cohort.lockstep)]}
            for step, sums in cohort.lockstep.items():
                lockstep.update(sums.to_metrics(prefix=f"step-{step}/"))
            context.state[LOCKSTEP_KEY] = MetricRecord(lockstep)
    metrics = MetricRecord(
        {
            "train-loss": cohort.weighted_mean(cohort.train_loss),
            "loss-before": cohort.weighted_mean(cohort.loss_before),
            "num-examples": int(cohort.num_examples.sum()),
            "local-steps": cohort.weighted_mean(cohort.num_steps),
        }
    )
    content = RecordDict({"arrays": params_to_arrays(cohort.mean_params()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def packed_drift(msg: Message, context: Context) -> Message:
    """Measure every cohort client's drift against W^{r+1}; reply with :class:`DriftSums` (and lockstep sums)."""
    from clients.client_app import run_config

    cfg = run_config(context)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    kept = context.state.get(COHORT_KEY)
    if COHORT_START_KEY not in context.state or kept is None or int(kept["server-round"]) != server_round:
        raise RuntimeError(f"no cohort models kept for round {server_round} on this node")
    ids = [int(k) for k in kept["clients"]]
    local = _kept_local_models(context, cfg, ids, server_round)
    for key in (COHORT_START_KEY, COHORT_CONFIG_KEY):  # keep node state small between rounds
        del context.state[key]
    sums, grad_sum, measured = measure_cohort_drift(
        cfg, ids, local, list(kept["loss-before"]), arrays_to_params(msg.content["arrays"]),
        bool(config.get("return-gradient", False)),
    )
    context.state[MEASURED_KEY] = ConfigRecord({"server-round": server_round, "clients": ids, "loss": measured})
    values = sums.to_metrics()
    lockstep = context.state.get(LOCKSTEP_KEY)
    if lockstep is not None:
        values.update({f"lockstep-{k}": v for k, v in lockstep.items()})
        del context.state[LOCKSTEP_KEY]
    content = RecordDict({"metrics": MetricRecord(values)})
    if grad_sum is not None:
        content[GRADIENT_SUM_KEY] = params_to_arrays(grad_sum)
    return Message(content=content, reply_to=msg)


def _kept_local_models(context: Context, cfg, ids: list[int], server_round: int) -> dict:
    """The round's stacked W_k: from this process, or rebuilt from W^r (another worker trained them)."""
    from clients.client_app import settings_from

    cached = _LOCAL_MODELS.pop((context.run_id, context.node_id), None)
    if cached is not None and cached[0] == server_round:
        return cached[1]
    config = context.state[COHORT_CONFIG_KEY]
    rebuilt = train_cohort(
        cfg, ids, server_round, arrays_to_params(context.state[COHORT_START_KEY]), settings_from(config, cfg),
        None, cfg.lockstep_steps(), keep_local=True,
    )
    return rebuilt.local_params


def cohort(msg: Message, context: Context) -> Message:
    """Tell the server which virtual clients this node holds (``first-client``, ``num-clients``)."""
    from clients.client_app import run_config

    cfg = run_config(context)
    held = held_clients(context, cfg)
    metrics = MetricRecord({"first-client": held[0], "num-clients": len(held)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

