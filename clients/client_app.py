"""The ClientApp: local SGD on ``train``, drift measurement on ``query.drift``.

Handlers only unpack the message, call :mod:`fedavg_relu.task` and pack the
reply. The final local model of a round is kept in the node's state
(``context.state``) until the drift exchange of the same round has used it.
"""

from __future__ import annotations

import functools

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedavg_relu.config import RunConfig
from fedavg_relu.records import arrays_to_params, params_to_arrays
from fedavg_relu.task import client_data, measure_drift, node_seed_id, train_client
from fedavg_relu.threads import configure_torch_threads
from fedavg_relu.training import LocalSGDSettings
from strategies.scaffold import CONTROL_PREFIX, DELTA_PREFIX

LOCAL_PARAMS_KEY = "local-params"
LOCAL_ROUND_KEY = "local-round"
MEASURED_LOSS_KEY = "measured-loss"  # f_k at the model of the last drift exchange
CLIENT_CONTROL_KEY = "scaffold-client-control"  # SCAFFOLD's c_k, kept across rounds



@functools.lru_cache(maxsize=4)
def _parse(items: tuple) -> RunConfig:
    return RunConfig.from_mapping(dict(items))


def run_config(context: Context) -> RunConfig:
    """The validated run configuration (parsed once per process)."""
    return _parse(tuple(sorted(context.run_config.items())))


def settings_from(config: ConfigRecord, cfg: RunConfig) -> LocalSGDSettings:
    """Local SGD settings from the round's ConfigRecord (the server's word for this round)."""
    return LocalSGDSettings(
        local_steps=int(config["local-steps"]),
        learning_rate=float(config["learning-rate"]),
        batch_size=int(config["batch-size"]),
        momentum=float(config["momentum"]),
        weight_decay=float(config["weight-decay"]),
        loss=cfg.loss,
        proximal_mu=float(config.get("proximal-mu", 0.0)),  # FedProx sends it
        local_epochs=float(config.get("local-epochs", 0.0)),
    )


def train(msg: Message, context: Context) -> Message:
    """Run tau local steps from the received global model and return the local model."""
    configure_torch_threads()
    cfg = run_config(context)
    if cfg.packed:  # clients-per-node > 1: this node trains a cohort (clients/packed_app.py)
        from clients.packed_app import packed_train

        return packed_train(msg, context)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    known = context.state.get(MEASURED_LOSS_KEY)
    loss_before = None
    if known is not None and "measured-round" in config and int(known["server-round"]) == int(config["measured-round"]):
        loss_before = float(known["loss"])  # this very model was measured here last round
    received = arrays_to_params(msg.content["arrays"])
    global_params = {k: v for k, v in received.items() if not k.startswith(CONTROL_PREFIX)}
    scaffold = None
    if len(global_params) < len(received):  # SCAFFOLD: the server control variate came along
        server_c = {k[len(CONTROL_PREFIX):]: v for k, v in received.items() if k.startswith(CONTROL_PREFIX)}
        kept = context.state.get(CLIENT_CONTROL_KEY)
        scaffold = (server_c, arrays_to_params(kept) if kept is not None else None)
    outcome = train_client(
        cfg, client_data(cfg, context.node_config), node_seed_id(context.node_config, context.node_id), server_round,
        global_params, settings_from(config, cfg), loss_before, scaffold,
    )
    local = params_to_arrays(outcome.local_params)
    reply_arrays = local
    if outcome.control_delta is not None:
        context.state[CLIENT_CONTROL_KEY] = params_to_arrays(outcome.client_control)
        reply_arrays = params_to_arrays(
            {**outcome.local_params, **{DELTA_PREFIX + k: v for k, v in outcome.control_delta.items()}}
        )
    if bool(config.get("keep-local-model", True)):
        context.state[LOCAL_PARAMS_KEY] = local
        context.state[LOCAL_ROUND_KEY] = ConfigRecord({"server-round": server_round})
    metrics = MetricRecord(
        {
            "train-loss": outcome.train_loss,
            "loss-before": outcome.loss_before,
            "num-examples": outcome.num_examples,
            "local-steps": outcome.num_steps,
        }
    )
    return Message(content=RecordDict({"arrays": reply_arrays, "metrics": metrics}), reply_to=msg)


def drift(msg: Message, context: Context) -> Message:
    """Compare the gradient at this node's local model with the one at the new average."""
    configure_torch_threads()
    cfg = run_config(context)
    if cfg.packed:
        from clients.packed_app import packed_drift

        return packed_drift(msg, context)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    kept_round = context.state.get(LOCAL_ROUND_KEY)
    if LOCAL_PARAMS_KEY not in context.state or kept_round is None or int(kept_round["server-round"]) != server_round:
        raise RuntimeError(f"no local model kept for round {server_round} on this node")
    local_params = arrays_to_params(context.state[LOCAL_PARAMS_KEY])
    del context.state[LOCAL_PARAMS_KEY]  # keep node state small between rounds
    measured, gradient = measure_drift(
        cfg, client_data(cfg, context.node_config), local_params, arrays_to_params(msg.content["arrays"])
    )
    context.state[MEASURED_LOSS_KEY] = MetricRecord({"server-round": server_round, "loss": measured.loss_at_global})
    content = RecordDict({"metrics": MetricRecord(measured.to_metrics())})
    if bool(config.get("return-gradient", False)):
        content["gradient"] = params_to_arrays(gradient)
    return Message(content=content, reply_to=msg)


def build_client_app(mods: list | None = None) -> ClientApp:
    """A ClientApp with this module's handlers (``mods``: Flower client mods)."""
    client_app = ClientApp(mods=mods or [])
    client_app.train()(train)
    client_app.query("drift")(drift)
    from clients.packed_app import cohort

    client_app.query("cohort")(cohort)  # packed mode: which virtual clients a node holds
    return client_app


app = build_client_app()
