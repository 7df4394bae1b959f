"""One torch thread pool per worker process, sized to the CPUs the worker was given.

A Ray actor that asks for ``num_cpus = c`` should run torch on ``c`` threads: more
threads than the actor's share oversubscribe the cores that other actors use (two
actors x two threads on two cores thrash), fewer leave cores idle. Ray exports
``OMP_NUM_THREADS`` for its workers, but torch may have been imported (and its pool
sized) before; :func:`configure_torch_threads` sets the pool explicitly, once per
process. ``FEDAVG_RELU_THREADS`` overrides everything. The pool is the CPU's: with
``device = "cuda"`` (:mod:`fedavg_relu.core.device`) it runs only the host-side work.

This module does not import flwr.
"""

from __future__ import annotations

import os
import sys

import torch

_configured: list[int] = []


def worker_cpus() -> int | None:
    """CPUs this process should use: ``FEDAVG_RELU_THREADS``, the Ray actor's CPUs, or ``OMP_NUM_THREADS``."""
    override = os.environ.get("FEDAVG_RELU_THREADS", "")
    if override.isdigit() and int(override) > 0:
        return int(override)
    if "ray" in sys.modules:  # only ask Ray when it is already there (never import it here)
        try:
            ray = sys.modules["ray"]
            if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
                cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
                if cpus:
                    return max(1, int(cpus))
        except Exception:  # noqa: BLE001 - any Ray hiccup: fall back to the environment
            pass
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return None


def configure_torch_threads() -> int:
    """Size torch's intra-op pool to :func:`worker_cpus` (once per process); return the thread count."""
    if not _configured:
        cpus = worker_cpus()
        if cpus is not None and cpus != torch.get_num_threads():
            torch.set_num_threads(cpus)
        _configured.append(torch.get_num_threads())
    return _configured[0]
