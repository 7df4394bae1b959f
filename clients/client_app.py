"""The ClientApp: which handler serves which message type.

One client per node (the standard path): ``train`` runs local SGD from the
received W^r, ``query.drift`` compares the gradient at the node's kept local
model with the one at the new average. Packed mode (a node simulates a cohort of
virtual clients) has message types of its own (``train.packed``,
``query.packed_drift``, ``query.cohort``, :mod:`clients.packed_app`): the server's
strategy picks the path by the message type it sends, and nothing here branches
on the config.

Handlers only unpack the message, call :mod:`fedavg_relu.core.task` and pack the
reply. The final local model of a round is kept on the node's disk
(:mod:`fedavg_relu.core.spill`), not in ``context.state``, until the drift exchange of
the same round has used it.
"""

from __future__ import annotations

import warnings

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedavg_relu.flower import schema as wire
from fedavg_relu.flower.records import arrays_to_params, arrays_to_views, params_to_arrays
from fedavg_relu.core.task import client_data, measure_drift, node_seed_id, train_client

from .node import ControlVariates, local_store, run_config, settings_from, split_control
from .packed_app import cohort, packed_drift, packed_train

# torch 2.13 warns once per worker that `torch.jit.script` is deprecated when a library it calls uses it
# (seen in every Ray actor's first round): two lines of console noise per actor, nothing to act on here.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=DeprecationWarning)

MEASURED_LOSS_KEY = "measured-loss"  # node state: f_k at the model of the last drift exchange


def train(msg: Message, context: Context) -> Message:
    """Run tau local steps from the received global model and return the local model."""
    cfg = run_config(context)
    config = msg.content[wire.CONFIG]
    server_round = int(config[wire.SERVER_ROUND])
    known = context.state.get(MEASURED_LOSS_KEY)
    loss_before = None
    if known is not None and wire.MEASURED_ROUND in config and int(known["server-round"]) == int(config[wire.MEASURED_ROUND]):
        loss_before = float(known["loss"])  # this very model was measured here last round
    # read-only views of the message's bytes: loaded into the model (one copy), never written
    global_params, server_c = split_control(arrays_to_views(msg.content[wire.ARRAYS]))
    client = int(context.node_config.get("partition-id", context.node_id))
    controls = ControlVariates(config) if server_c is not None else None  # SCAFFOLD: c came along
    scaffold = (server_c, controls.load(client)) if controls is not None else None
    outcome = train_client(
        cfg, client_data(cfg, context.node_config), node_seed_id(context.node_config, context.node_id), server_round,
        global_params, settings_from(config, cfg), loss_before, scaffold, copy=False,  # sent and kept below, at once
    )
    reply_params = dict(outcome.local_params)
    if outcome.control_delta is not None and controls is not None:
        controls.save(client, outcome.client_control)
        reply_params.update({wire.SCAFFOLD_DELTA_PREFIX + k: v for k, v in outcome.control_delta.items()})
    store = local_store(context)
    if bool(config.get(wire.KEEP_LOCAL_MODEL, True)):
        store.save(server_round, outcome.local_params)
    else:
        store.discard()
    metrics = MetricRecord(
        {
            wire.TRAIN_LOSS: outcome.train_loss,
            wire.LOSS_BEFORE: outcome.loss_before,
            wire.NUM_EXAMPLES: outcome.num_examples,
            wire.LOCAL_STEPS: outcome.num_steps,
        }
    )
    content = RecordDict({wire.ARRAYS: params_to_arrays(reply_params), wire.METRICS: metrics})
    return Message(content=content, reply_to=msg)


def drift(msg: Message, context: Context) -> Message:
    """Compare the gradient at this node's local model with the one at the new average.

    ``drift-nonlinear`` in the ConfigRecord adds the nonlinear drift fraction;
    ``client-metrics`` adds this node's ``partition-id`` (when it has one), so the
    server can name the client in its per-client table.
    """
    cfg = run_config(context)
    config = msg.content[wire.CONFIG]
    server_round = int(config[wire.SERVER_ROUND])
    store = local_store(context)
    if not store.has(server_round):
        raise RuntimeError(f"no local model kept for round {server_round} on this node")
    try:
        measured, gradient = measure_drift(
            cfg, client_data(cfg, context.node_config), store.load(server_round), arrays_to_params(msg.content[wire.ARRAYS]),
            nonlinear=bool(config.get(wire.DRIFT_NONLINEAR, False)),
        )
    finally:
        store.discard()  # measured once; keep the disk clean between rounds
    context.state[MEASURED_LOSS_KEY] = MetricRecord({"server-round": server_round, "loss": measured.loss_at_global})
    metrics = MetricRecord(measured.to_metrics())
    if bool(config.get(wire.CLIENT_METRICS, False)) and "partition-id" in context.node_config:
        metrics[wire.PARTITION_ID] = int(context.node_config["partition-id"])
    content = RecordDict({wire.METRICS: metrics})
    if bool(config.get(wire.RETURN_GRADIENT, False)):
        content[wire.GRADIENT] = params_to_arrays(gradient)
    return Message(content=content, reply_to=msg)


def build_client_app(mods: list | None = None) -> ClientApp:
    """A ClientApp with every handler, each registered for its message type (``mods``: Flower client mods)."""
    client_app = ClientApp(mods=mods or [])
    client_app.train()(train)  # "train"
    client_app.query("drift")(drift)  # "query.drift"
    client_app.train("packed")(packed_train)  # "train.packed"
    client_app.query("packed_drift")(packed_drift)  # "query.packed_drift"
    client_app.query("cohort")(cohort)  # "query.cohort"
    return client_app


app = build_client_app()
