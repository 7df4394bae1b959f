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


class ClientStateStore:
    """A client's state that must outlive one attempt of a run (SCAFFOLD's c_k), versioned.

    A resumed run is a new Flower run (new run id, new node ids), so this store is keyed by
    the run's ``state_key`` (the same for every attempt of one run folder) and the client's
    partition id: ``ROOT/state-<key>/client-<partition>/<slot>/round-<r>-<attempt>/``. Each
    save is one version: the state after training in round ``r`` of attempt ``attempt``.

    Which versions count: an attempt that resumed after round ``R`` sees its own versions and
    the versions of earlier attempts up to round R (what the checkpoint it resumed from
    assumed), never an earlier attempt's versions past R (rounds that were redone). On
    :meth:`save` only what a later resume could still need is kept: the new version and the
    newest counted version at or before the server's last checkpointed round.
    """

    def __init__(self, state_key: str, partition_id: int, slot: str, root: Path | None = None) -> None:
        if not state_key or "/" in state_key or state_key.startswith("."):
            raise ValueError(f"state_key={state_key!r}: expected a non-empty name without '/'")
        self.dir = (root or spill_root()) / f"state-{state_key}" / f"client-{int(partition_id)}" / slot

    def _versions(self, attempt: str, resumed_after: int) -> list[tuple[int, Path]]:
        """(round, folder) of every version this attempt counts, oldest first."""
        out = []
        for folder in self.dir.glob("round-*-*"):
            _, r, owner = folder.name.split("-", 2)
            if owner == attempt or int(r) <= resumed_after:
                out.append((int(r), folder))
        return sorted(out, key=lambda item: item[0])

    def load(self, server_round: int, attempt: str, resumed_after: int) -> dict[str, np.ndarray] | None:
        """The newest counted version from before round ``server_round`` (None: the client starts from 0)."""
        earlier = [(r, f) for r, f in self._versions(attempt, resumed_after) if r < server_round]
        if not earlier:
            return None
        folder = earlier[-1][1]
        return {p.stem.replace("%2F", "/"): np.load(p, allow_pickle=False) for p in folder.glob("*.npy")}

    def save(self, server_round: int, attempt: str, resumed_after: int, checkpointed_round: int,
             params: Mapping[str, np.ndarray]) -> None:
        """Keep ``params`` as the state after round ``server_round``; prune what no resume can need."""
        tmp = self.dir / f".round-{int(server_round)}-{attempt}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
        for name, value in params.items():
            np.save(tmp / f"{_safe(name)}.npy", np.asarray(value), allow_pickle=False)
        final = self.dir / f"round-{int(server_round)}-{attempt}"
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        counted = self._versions(attempt, resumed_after)
        at_checkpoint = [f for r, f in counted if r <= checkpointed_round and f != final]
        keep = {final, *at_checkpoint[-1:]}
        for folder in self.dir.glob("round-*-*"):
            if folder not in keep:
                shutil.rmtree(folder, ignore_errors=True)


def remove_state(state_key: str, root: Path | None = None) -> None:
    """Remove every client's kept state of run ``state_key`` on this machine (a completed simulation)."""
    if state_key:
        shutil.rmtree((root or spill_root()) / f"state-{state_key}", ignore_errors=True)
