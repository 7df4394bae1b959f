"""Shared fixtures: isolated output folders and Flower's task identity for in-process messages."""

from __future__ import annotations

import pytest

from fedavg_relu.runtime.local_grid import ensure_task_identity


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower needs a task identity to build Messages outside a running app."""
    ensure_task_identity()


@pytest.fixture
def out_dir(tmp_path, monkeypatch):
    """A private output folder; relative output-dirs resolve under it."""
    monkeypatch.setenv("FEDAVG_RELU_HOME", str(tmp_path))
    return tmp_path
