"""Per-round checkpoints and resume.

After every complete round the ServerApp writes ``checkpoint.pt`` in the run
folder, atomically: the round, the global model's trained parameters, the
strategy's own state (server momentum and moments, control variates, ...:
whatever its ``state_dict()`` returns: the drift recorder's is the wrapped strategy's,
through the one seam :mod:`strategies.state`), the metrics history and the
random states (Python's ``random`` drives Flower's client sampling). With
``resume = true`` a run continues from there; clients seed their minibatches
by (seed, partition, round), so a resumed deterministic run repeats the
uninterrupted one.

This module does not import flwr.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedavg_relu.core.config import ConfigError, RunConfig
from fedavg_relu.core.results import atomic_write_bytes

CHECKPOINT_NAME = "checkpoint.pt"
# keys that may differ between the interrupted run and its resumption
RESUMABLE_CHANGES = frozenset({
    "resume", "num-server-rounds", "round-timeout", "tensorboard", "checkpoint-every", "verbose", "tracker",
    "mlflow-tracking-uri", "device",
})


@dataclass
class Checkpoint:
    """What a run needs to continue after round ``round``."""

    round: int
    params: dict[str, np.ndarray]
    strategy_state: dict[str, Any]
    rows: list[dict[str, Any]]
    random_state: dict[str, Any]
    config: dict[str, Any]

    def restore(self, strategy: Any) -> None:
        """Put the strategy's state and the random states back."""
        if hasattr(strategy, "load_state_dict"):
            strategy.load_state_dict(self.strategy_state)
        random.setstate(self.random_state["python"])
        np.random.set_state(self.random_state["numpy"])
        torch.set_rng_state(self.random_state["torch"])


def save_checkpoint(run_dir: Path, server_round: int, params, strategy: Any, rows, cfg: RunConfig) -> Path:
    """Write ``checkpoint.pt`` for the round just completed (atomically)."""
    state = strategy.state_dict() if hasattr(strategy, "state_dict") else {}
    payload = {
        "round": int(server_round),
        "params": {k: np.asarray(v) for k, v in params.items()},
        "strategy_state": state,
        "rows": list(rows),
        "random_state": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "config": cfg.to_mapping(),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path = Path(run_dir) / CHECKPOINT_NAME
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_checkpoint(run_dir: Path, cfg: RunConfig) -> Checkpoint | None:
    """The run folder's checkpoint, or ``None`` when there is none.

    Raises :class:`ConfigError` when the checkpoint was made with a different
    configuration (other than the keys in :data:`RESUMABLE_CHANGES`) or is past
    ``num-server-rounds``.
    """
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.exists():
        return None
    payload = torch.load(path, weights_only=False)  # our own file, written by save_checkpoint
    # a key the checkpointed run did not know yet (added in a later version) had its default then
    saved = dict(RunConfig().to_mapping(), **payload["config"])
    current = cfg.to_mapping()
    problems = [
        f"{key}={current.get(key)!r}: expected {saved.get(key)!r}, the value of the checkpointed run in {run_dir}"
        for key in sorted(set(saved) | set(current))
        if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key)
    ]
    if payload["round"] > cfg.num_server_rounds:
        problems.append(
            f"num-server-rounds={cfg.num_server_rounds}: expected at least {payload['round']}, the rounds already done"
        )
    if problems:
        raise ConfigError(problems)
    return Checkpoint(
        payload["round"], payload["params"], payload["strategy_state"], payload["rows"], payload["random_state"], saved
    )
