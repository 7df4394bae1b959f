"""The one seam through which a strategy's own state goes into a checkpoint and back.

A resumed run must continue with the server optimizer where it stopped (FedAvgM's
momentum, FedAdam's moments, SCAFFOLD's control variate ...). :func:`strategy_state`
reads that state from any strategy, in this order:

1. a strategy that defines ``state_dict()`` and ``load_state_dict(state)`` (the
   project's SCAFFOLD, and any user strategy that wants its state kept) gives its own;
2. Flower's stateful strategies (and subclasses of them) give the attributes
   :data:`fedavg_relu.flower.seam.STRATEGY_STATE` names, read by name: a Flower release
   that renames one fails loudly here (and in ``tests/test_flower_contract.py``);
3. a wrapper (an object with a ``strategy`` attribute that is itself a strategy, e.g.
   Flower's DP wrappers) adds the state of the strategy it wraps, under ``"inner"``.

Everything else is stateless. :func:`load_strategy_state` is the inverse.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedavg_relu.flower.seam import STRATEGY_STATE

INNER = "inner"


def _attrs(strategy: Any) -> tuple[str, ...]:
    """The state attributes the seam names for ``strategy``'s Flower class (a subclass inherits them)."""
    for base, attrs in STRATEGY_STATE.items():
        if isinstance(strategy, base):
            return attrs
    return ()


def strategy_state(strategy: Any) -> dict[str, Any]:
    """The state a resumed run needs of ``strategy`` (deep copies); see the module docstring."""
    if callable(getattr(strategy, "state_dict", None)):
        state = dict(strategy.state_dict())
    else:
        names = _attrs(strategy)
        missing = [name for name in names if not hasattr(strategy, name)]
        if missing:
            raise AttributeError(
                f"{type(strategy).__name__} has no attribute(s) {missing} to checkpoint: the installed Flower's "
                "strategy state is not what this project expects (see tests/test_flower_contract.py)"
            )
        state = {name: copy.deepcopy(getattr(strategy, name)) for name in names}
    inner = getattr(strategy, "strategy", None)
    if isinstance(inner, Strategy):
        state[INNER] = strategy_state(inner)
    return state


def load_strategy_state(strategy: Any, state: Mapping[str, Any]) -> None:
    """Put ``state`` (from :func:`strategy_state`) back into ``strategy``."""
    state = dict(state)
    inner_state = state.pop(INNER, None)
    if callable(getattr(strategy, "load_state_dict", None)):
        strategy.load_state_dict(state)
    else:
        for name, value in state.items():
            setattr(strategy, name, copy.deepcopy(value))
    inner = getattr(strategy, "strategy", None)
    if inner_state is not None and isinstance(inner, Strategy):
        load_strategy_state(inner, inner_state)


__all__ = ["load_strategy_state", "strategy_state"]
