"""Shared fixtures: isolated output folders and Flower's task identity for in-process messages."""

from __future__ import annotations

import os

# The suite computes on the CPU on every machine: run-config `device` defaults to "auto", which on a
# GPU machine would move the bit-for-bit equality tests onto cuda. Set before torch is imported;
# benchmarks/gpu_check.py is the device's own check.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

from fedavg_relu.runtime.local_grid import ensure_task_identity  # noqa: E402


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower needs a task identity to build Messages outside a running app."""
    ensure_task_identity()


@pytest.fixture
def out_dir(tmp_path, monkeypatch):
    """A private output folder; relative output-dirs resolve under it."""
    monkeypatch.setenv("FEDAVG_RELU_HOME", str(tmp_path))
    return tmp_path
