"""Local models kept on the node's disk between a round's two exchanges.

The drift exchange of round r needs each client's final local model W_k, which
the train exchange produced a moment earlier. Keeping W_k in the node's
``context.state`` made Flower's Ray engine pickle it with every message and keep
one per node in the simulation process (50 clients x 268 MB at width 8192); keeping
it in the worker's memory makes a worker hold one per node it served. Here it goes
to a file on the node's local disk instead: memory then holds only the models
being trained or measured right now, so the peak grows with the number of workers,
not with the number of clients.

Layout: ``ROOT/run-<run id>/node-<node id>/<slot>/round-<r>/<name>.npy`` (one
``.npy`` per parameter, or per stacked parameter for a packed cohort: (K, *shape)).
A slot keeps at most one round: saving round r removes what it kept before, and
the drift handler removes the round once measured. Slots: ``local`` (W_k until
the drift exchange), ``scaffold-control`` (SCAFFOLD's c_k, across rounds). ``ROOT`` is ``$FEDAVG_RELU_SPILL_DIR``
or ``<tempdir>/fedavg-relu-spill-<uid>``. Files are written under a temporary name
and renamed, so a reader never sees half a model.

This module does not import flwr.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np


def spill_root() -> Path:
    """Where kept local models go (``$FEDAVG_RELU_SPILL_DIR``, else a per-user folder in the temp dir)."""
    env = os.environ.get("FEDAVG_RELU_SPILL_DIR")
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"fedavg-relu-spill-{os.getuid()}"


def _safe(name: str) -> str:
    """A parameter name as a file name ("hidden.0.weight" stays; "/" would not)."""
    return name.replace("/", "%2F")


class LocalModelStore:
    """The kept arrays of one node of one run, in one slot (``local`` or ``scaffold-control``)."""

    def __init__(self, run_id: int, node_id: int, slot: str = "local", root: Path | None = None) -> None:
        self.node_dir = (root or spill_root()) / f"run-{int(run_id)}" / f"node-{int(node_id)}" / slot

    def _round_dir(self, server_round: int) -> Path:
        return self.node_dir / f"round-{int(server_round)}"

    def discard(self) -> None:
        """Remove everything this slot kept."""
        shutil.rmtree(self.node_dir, ignore_errors=True)

    def save(self, server_round: int, params: Mapping[str, np.ndarray]) -> None:
        """Keep ``params`` (name -> array) as round ``server_round``'s model, replacing any older round."""
        self.discard()
        tmp = self.node_dir / f".round-{int(server_round)}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        for name, value in params.items():
            np.save(tmp / f"{_safe(name)}.npy", np.asarray(value), allow_pickle=False)
        tmp.rename(self._round_dir(server_round))

    def allocate(self, server_round: int, shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, np.ndarray]:
        """Disk-backed arrays (``np.memmap``) to be filled in place, e.g. a cohort's stacked W_k.

        Call :meth:`commit` when they are filled; until then :meth:`load` does not see them.
        """
        self.discard()
        tmp = self.node_dir / f".round-{int(server_round)}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return {
            name: np.lib.format.open_memmap(tmp / f"{_safe(name)}.npy", mode="w+", dtype=dtype, shape=shape)
            for name, (shape, dtype) in shapes.items()
        }

    def commit(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Flush arrays from :meth:`allocate` and make them round ``server_round``'s model."""
        for value in arrays.values():
            if isinstance(value, np.memmap):
                value.flush()
        self.node_dir.joinpath(f".round-{int(server_round)}.tmp").rename(self._round_dir(server_round))

    def has(self, server_round: int) -> bool:
        """True when round ``server_round``'s model is kept."""
        return self._round_dir(server_round).is_dir()

    def load(self, server_round: int, names: list[str] | None = None, writable: bool = True) -> dict[str, np.ndarray]:
        """Round ``server_round``'s model, memory-mapped: pages are read as they are used.

        ``writable=True`` maps copy-on-write (writes stay in memory), which torch needs to
        wrap an array without a copy. A private writable mapping counts in full against the
        kernel's commit limit, though: a packed cohort's stack larger than the machine's
        memory (100 clients x 268 MB at width 8192 on a 24 GB machine) failed to map with
        ENOMEM. ``writable=False`` maps it read-only, which costs only the pages read; the
        cohort code copies each chunk it reads.

        Raises ``FileNotFoundError`` when this node kept nothing for that round.
        """
        folder = self._round_dir(server_round)
        if not folder.is_dir():
            raise FileNotFoundError(f"no local model kept for round {server_round} in {self.node_dir}")
        files = {p.stem.replace("%2F", "/"): p for p in folder.glob("*.npy")}
        wanted = names if names is not None else sorted(files)
        mode = "c" if writable else "r"
        return {name: np.load(files[name], mmap_mode=mode, allow_pickle=False) for name in wanted}


def remove_run(run_id: int, root: Path | None = None) -> None:
    """Remove every node's kept models of run ``run_id`` on this machine (the end of a simulation)."""
    shutil.rmtree((root or spill_root()) / f"run-{int(run_id)}", ignore_errors=True)
