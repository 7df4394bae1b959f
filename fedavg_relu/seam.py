"""Uses of Flower's internals, in one place (each item says what it relies on).

Everything else in the project uses Flower's public API (``flwr.app``,
``flwr.serverapp``, ``flwr.clientapp``, ``flwr.simulation``). What cannot be had
through it lives here; ``tests/test_flower_contract.py`` checks each item against
the installed flwr, so a Flower release that changes one fails a fast test
instead of a run.
"""

from __future__ import annotations


def is_simulation_grid(grid) -> bool:
    """True when ``grid`` drives simulated nodes in this process's machine.

    Relies on: Flower's simulation runtime (``flwr.simulation.run_simulation``'s main
    loop, used by ``flwr run`` on a simulation SuperLink too) handing the ServerApp a
    ``flwr.superlink.grid.inmemory_grid.InMemoryGrid``; deployments get an HTTP grid.
    The project's :class:`fedavg_relu.local_grid.LocalGrid` says so itself
    (``simulated = True``).
    """
    grid = getattr(grid, "inner", grid)
    if getattr(grid, "simulated", False):
        return True
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)
