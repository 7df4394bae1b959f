"""What every ClientApp handler needs first: the run config and the round's settings.

Shared by :mod:`clients.client_app` (one client per node) and
:mod:`clients.packed_app` (a cohort per node); imports nothing from either.
"""

from __future__ import annotations

import functools

from flwr.app import ConfigRecord, Context

from fedavg_relu.flower import schema as wire
from fedavg_relu.core.config import RunConfig
from fedavg_relu.core.spill import ClientStateStore, LocalModelStore
from fedavg_relu.core.threads import configure_torch_threads
from fedavg_relu.core.training import LocalSGDSettings


@functools.lru_cache(maxsize=4)
def _parse(items: tuple) -> RunConfig:
    return RunConfig.from_mapping(dict(items))


def run_config(context: Context) -> RunConfig:
    """The validated run configuration (parsed once per process); sets torch's thread count."""
    configure_torch_threads()
    return _parse(tuple(sorted(context.run_config.items())))


def settings_from(config: ConfigRecord, cfg: RunConfig) -> LocalSGDSettings:
    """Local SGD settings from the round's ConfigRecord (the server's word for this round)."""
    return LocalSGDSettings(
        local_steps=int(config[wire.LOCAL_STEPS]),
        learning_rate=float(config[wire.LEARNING_RATE]),
        batch_size=int(config[wire.BATCH_SIZE]),
        momentum=float(config[wire.MOMENTUM]),
        weight_decay=float(config[wire.WEIGHT_DECAY]),
        loss=cfg.loss,
        proximal_mu=float(config.get(wire.PROXIMAL_MU, 0.0)),
        local_epochs=float(config.get(wire.LOCAL_EPOCHS, 0.0)),
    )


SCAFFOLD_SLOT = "scaffold-control"  # on-disk slot of SCAFFOLD's c_k, kept across rounds and resumes


class ControlVariates:
    """SCAFFOLD's c_k of the clients this node trains, on its disk (:class:`fedavg_relu.core.spill.ClientStateStore`).

    Keyed by the run's ``state-key`` and the client's partition id, not by Flower's run or node
    ids (a resumed run has new ones); versioned by round, as the round's ConfigRecord says.
    """

    def __init__(self, config: ConfigRecord) -> None:
        self.key = str(config[wire.STATE_KEY])
        self.round = int(config[wire.SERVER_ROUND])
        self.attempt = str(config[wire.STATE_ATTEMPT])
        self.resumed_after = int(config[wire.RESUMED_AFTER])
        self.checkpointed = int(config[wire.CHECKPOINTED_ROUND])

    def load(self, client: int):
        """c_k before this round (None: zeros)."""
        return ClientStateStore(self.key, client, SCAFFOLD_SLOT).load(self.round, self.attempt, self.resumed_after)

    def save(self, client: int, control) -> None:
        """Keep c_k+ as this round's version."""
        ClientStateStore(self.key, client, SCAFFOLD_SLOT).save(self.round, self.attempt, self.resumed_after, self.checkpointed, control)


def split_control(received: dict) -> tuple[dict, dict | None]:
    """The received arrays as (W^r, SCAFFOLD's server c or None)."""
    prefix = wire.SCAFFOLD_CONTROL_PREFIX
    global_params = {k: v for k, v in received.items() if not k.startswith(prefix)}
    if len(global_params) == len(received):
        return global_params, None
    return global_params, {k[len(prefix):]: v for k, v in received.items() if k.startswith(prefix)}


def local_store(context: Context, slot: str = "local") -> LocalModelStore:
    """This node's on-disk store of kept local models (:mod:`fedavg_relu.core.spill`)."""
    return LocalModelStore(context.run_id, context.node_id, slot)
