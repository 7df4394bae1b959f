"""Tests for fedavg_relu.core.data: built-in data sets, partitions, the hub data path and its offline failure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedavg_relu.core.config import RunConfig
from fedavg_relu.core.data import (
    DatasetUnavailableError,
    arrays_from_hf,
    load_central,
    load_partition,
    make_synthetic,
    partition_hf_dataset,
    partition_indices,
    unit_norm,
)

PARTITIONERS = ("iid", "dirichlet", "pathological")


def _row_norms(x) -> np.ndarray:
    return np.linalg.norm(np.asarray(x, dtype=np.float64), axis=1)


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    """Every index in range(n) is in exactly one part (disjoint and covering)."""
    counts = np.bincount(np.concatenate(parts), minlength=n)
    assert len(counts) == n
    assert counts.min() == 1 and counts.max() == 1


def _mean_tv_to_global(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    """Mean over parts of TV(p_part, p_global) = 0.5 * sum_c |p_part(c) - p_global(c)|."""
    glob = np.bincount(labels, minlength=num_classes) / len(labels)
    return float(np.mean([
        0.5 * np.abs(np.bincount(labels[p], minlength=num_classes) / len(p) - glob).sum() for p in parts
    ]))


def _digits_train_labels() -> np.ndarray:
    return load_central(RunConfig()).train.y.numpy()


# --- synthetic -------------------------------------------------------------------------
def test_synthetic_inputs_and_labels():
    """make_synthetic(500, d=10, c=4): x (500, 10) float32 unit rows, y int64 in [0, 4), all 4 classes present."""
    x, y = make_synthetic(500, 10, 4, 0.0, seed=0)
    assert x.shape == (500, 10) and x.dtype == np.float32
    np.testing.assert_allclose(_row_norms(x), 1.0, atol=1e-5)
    assert y.shape == (500,) and y.dtype == np.int64
    assert y.min() >= 0 and y.max() < 4
    assert np.all(np.bincount(y, minlength=4) > 0)


def test_synthetic_is_deterministic_in_seed():
    """Same seed -> identical arrays; seed 1 instead of 0 -> different inputs."""
    x0, y0 = make_synthetic(200, 6, 3, 0.0, seed=0)
    x0b, y0b = make_synthetic(200, 6, 3, 0.0, seed=0)
    x1, _ = make_synthetic(200, 6, 3, 0.0, seed=1)
    assert np.array_equal(x0, x0b) and np.array_equal(y0, y0b)
    assert not np.allclose(x0, x1)


def test_synthetic_noise_changes_some_labels():
    """noise=0.5 on the standardized logits flips some (not most) labels; the inputs stay the same."""
    x0, y0 = make_synthetic(500, 10, 4, 0.0, seed=0)
    x1, y1 = make_synthetic(500, 10, 4, 0.5, seed=0)
    assert np.array_equal(x0, x1)
    changed = float(np.mean(y0 != y1))
    assert 0.02 < changed < 0.6, changed  # measured: 0.27


def test_load_central_synthetic_split_sizes():
    """synthetic n=200, test-fraction 0.2: 160 train / 40 test, d=20 inputs, 4 classes."""
    cfg = RunConfig(dataset="synthetic", synthetic_num_examples=200)
    central = load_central(cfg)
    assert (len(central.train), len(central.test)) == (160, 40)
    assert (central.input_dim, central.num_classes) == (20, 4)
    assert tuple(central.train.x.shape) == (160, 20)


# --- digits ----------------------------------------------------------------------------
def test_load_central_digits_split():
    """digits: 1797 examples, test = ceil(0.2 * 1797) = ceil(359.4) = 360, train 1437; 64 unit-norm features, 10 classes."""
    central = load_central(RunConfig(dataset="digits", test_fraction=0.2))
    assert len(central.test) == math.ceil(0.2 * 1797) == 360
    assert len(central.train) == 1797 - 360 == 1437
    assert (central.input_dim, central.num_classes) == (64, 10)
    assert tuple(central.train.x.shape) == (1437, 64) and tuple(central.test.x.shape) == (360, 64)
    np.testing.assert_allclose(_row_norms(central.train.x), 1.0, atol=1e-5)
    np.testing.assert_allclose(_row_norms(central.test.x), 1.0, atol=1e-5)
    assert set(central.train.y.tolist()) == set(range(10)) == set(central.test.y.tolist())


def test_load_central_digits_is_stratified():
    """Each class's test count is within 1 of 0.2 x its total (class totals 174..183 -> 35..37 in test)."""
    central = load_central(RunConfig())
    test_counts = np.bincount(central.test.y.numpy(), minlength=10)
    totals = test_counts + np.bincount(central.train.y.numpy(), minlength=10)
    assert totals.sum() == 1797
    assert np.all(np.abs(test_counts - 0.2 * totals) <= 1.0), test_counts


# --- partitions -------------------------------------------------------------------------
@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_partition_indices_are_an_exact_cover(partitioner):
    """digits training pool (1437) into 10 parts: disjoint, covering, sorted int64, deterministic, seed-dependent."""
    labels = _digits_train_labels()
    cfg = RunConfig(partitioner=partitioner, num_partitions=10, seed=0)
    parts = partition_indices(labels, cfg)
    assert len(parts) == 10
    assert all(p.dtype == np.int64 and len(p) > 0 and np.all(np.diff(p) > 0) for p in parts)
    _assert_exact_cover(parts, len(labels))
    again = partition_indices(labels, cfg)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(labels, RunConfig(partitioner=partitioner, num_partitions=10, seed=1))
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_small_alpha_is_skewed_and_iid_is_not():
    """Mean TV(partition labels, global labels) over 10 digits clients: Dirichlet(0.1) > 0.4, iid < 0.15.

    Measured with seeds 0..3: Dirichlet(0.1) 0.65-0.72, Dirichlet(0.05) 0.74-0.79, iid 0.089-0.098
    (multinomial noise alone on ~144 examples/10 classes gives about 0.1).
    """
    labels = _digits_train_labels()
    iid = partition_indices(labels, RunConfig(partitioner="iid", seed=0))
    skewed = partition_indices(labels, RunConfig(partitioner="dirichlet", dirichlet_alpha=0.1, seed=0))
    tv_iid, tv_dir = _mean_tv_to_global(labels, iid, 10), _mean_tv_to_global(labels, skewed, 10)
    assert tv_iid < 0.15, tv_iid
    assert tv_dir > 0.4, tv_dir


def test_pathological_two_classes_per_partition():
    """classes-per-partition=2: every digits client holds at most 2 distinct labels."""
    labels = _digits_train_labels()
    parts = partition_indices(labels, RunConfig(partitioner="pathological", classes_per_partition=2, seed=0))
    distinct = [len(np.unique(labels[p])) for p in parts]
    assert max(distinct) <= 2, distinct
    assert min(distinct) >= 1


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_load_partition_returns_central_rows(partitioner):
    """load_partition(cfg, k) = (train.x[idx_k], train.y[idx_k]) with idx_k from partition_indices; 10 parts sum to 1437."""
    cfg = RunConfig(partitioner=partitioner, dirichlet_alpha=0.3, num_partitions=10, seed=2)
    train = load_central(cfg).train
    parts = partition_indices(train.y.numpy(), cfg)
    for k in (0, 4, 9):
        data = load_partition(cfg, k)
        assert np.array_equal(data.x.numpy(), train.x.numpy()[parts[k]])
        assert np.array_equal(data.y.numpy(), train.y.numpy()[parts[k]])
    assert sum(len(load_partition(cfg, k)) for k in range(10)) == 1437


@pytest.mark.parametrize("partition_id", [-1, 10])
@pytest.mark.parametrize("dataset", ["digits", "mnist"])
def test_load_partition_rejects_out_of_range_id(dataset, partition_id):
    """partition-id outside [0, 10) raises ValueError naming partition-id (before any hub access)."""
    with pytest.raises(ValueError, match=rf"partition-id={partition_id}: expected an integer in \[0, num-partitions=10\)"):
        load_partition(RunConfig(dataset=dataset, num_partitions=10), partition_id)


# --- hub data path on a local datasets.Dataset -------------------------------------------
def _fake_image_dataset():
    """60 random 4x4 uint8 images, labels i % 3, and an "id" column to trace rows."""
    import datasets

    images = np.random.default_rng(0).integers(0, 256, size=(60, 4, 4), dtype=np.uint8)
    ds = datasets.Dataset.from_dict({"image": list(images), "label": np.arange(60) % 3, "id": np.arange(60)})
    return ds, images


def test_arrays_from_hf_flattens_to_unit_norm_rows():
    """60 images 4x4 -> x (60, 16) float32 = rows of images/255 scaled to unit norm; y = i % 3 int64."""
    ds, images = _fake_image_dataset()
    data = arrays_from_hf(ds, "image", "label")
    assert tuple(data.x.shape) == (60, 16) and str(data.x.dtype) == "torch.float32"
    assert str(data.y.dtype) == "torch.int64"
    np.testing.assert_allclose(_row_norms(data.x), 1.0, atol=1e-5)
    flat = images.reshape(60, 16).astype(np.float64)
    expected = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    np.testing.assert_allclose(data.x.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert data.y.tolist() == [i % 3 for i in range(60)]


@pytest.mark.parametrize(("partitioner", "extra"), [
    ("iid", {}), ("dirichlet", {"dirichlet_alpha": 0.5}), ("pathological", {"classes_per_partition": 1}),
])
def test_partition_hf_dataset_covers_local_dataset(partitioner, extra):
    """3 partitions of the 60-row dataset: ids cover 0..59 once; each part's arrays are the matching unit-norm rows."""
    ds, _ = _fake_image_dataset()
    whole = arrays_from_hf(ds, "image", "label")
    parts = partition_hf_dataset(ds, RunConfig(partitioner=partitioner, num_partitions=3, seed=0, **extra))
    assert len(parts) == 3
    ids = [np.asarray(p["id"], dtype=np.int64) for p in parts]
    _assert_exact_cover(ids, 60)
    for part, idx in zip(parts, ids, strict=True):
        data = arrays_from_hf(part, "image", "label")
        assert tuple(data.x.shape) == (len(idx), 16)
        np.testing.assert_allclose(data.x.numpy(), whole.x.numpy()[idx], rtol=1e-6, atol=1e-7)
        assert np.array_equal(data.y.numpy(), whole.y.numpy()[idx])
    if partitioner == "pathological":  # one class per client: client k holds exactly one label
        assert sorted(len(set(p["label"])) for p in parts) == [1, 1, 1]


def test_unit_norm_keeps_zero_rows_zero():
    """unit_norm([[3,4],[0,0]]) = [[.6,.8],[0,0]] (no division by zero)."""
    np.testing.assert_allclose(unit_norm(np.array([[3.0, 4.0], [0.0, 0.0]])), [[0.6, 0.8], [0.0, 0.0]])


# --- offline failure ---------------------------------------------------------------------
def test_hub_dataset_offline_raises_dataset_unavailable(monkeypatch, tmp_path):
    """HF offline with an empty cache: load_partition(dataset="mnist") raises DatasetUnavailableError, 'needs a network'.

    The HF libraries read these variables at import time, so the already-imported constants are patched too.
    """
    import datasets.config
    import huggingface_hub.constants

    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(hf_home / "datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_CACHE_HOME", str(hf_home))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_home / "datasets")
    monkeypatch.setattr(datasets.config, "HF_MODULES_CACHE", hf_home / "modules")
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", str(hf_home / "datasets" / "downloads"))

    with pytest.raises(DatasetUnavailableError, match="needs a network") as info:
        load_partition(RunConfig(dataset="mnist", num_partitions=2), 0)
    assert "dataset='mnist'" in str(info.value) and "ylecun/mnist" in str(info.value)
    assert isinstance(info.value, RuntimeError)


def _make_synthetic_one_draw(n, d, num_classes, noise, seed):
    """make_synthetic as first written (one (n, d) draw, one product): the reference for the blocked version."""
    from fedavg_relu.core.data import unit_norm

    rng = np.random.default_rng([seed, 0x5EED])
    x = unit_norm(rng.standard_normal((n, d)))
    a = rng.standard_normal((d, 64)) * np.sqrt(2.0 / d)
    b = rng.standard_normal((64, num_classes)) / np.sqrt(64)
    logits = np.maximum(x @ a, 0.0) @ b
    logits = (logits - logits.mean(axis=0)) / (logits.std(axis=0) + 1e-12)
    if noise > 0:
        logits = logits + noise * rng.standard_normal(logits.shape)
    return x.astype(np.float32), logits.argmax(axis=1).astype(np.int64)


def test_blocked_synthetic_draw_equals_one_draw(monkeypatch):
    """make_synthetic draws its inputs in blocks (7 rows here, so 100 rows = 15 blocks): the same bits as one draw."""
    import fedavg_relu.core.data as data_module

    monkeypatch.setattr(data_module, "SYNTHETIC_BLOCK", 7)
    for noise in (0.0, 0.3):
        x, y = data_module.make_synthetic(100, 6, 4, noise, seed=5)
        x1, y1 = _make_synthetic_one_draw(100, 6, 4, noise, seed=5)
        assert x.dtype == x1.dtype == np.float32
        np.testing.assert_array_equal(x, x1)
        np.testing.assert_array_equal(y, y1)


def test_load_test_is_the_central_held_out_split():
    """The server's load_test (which does not cache the training pool) returns load_central's test split."""
    from fedavg_relu.core.data import load_central, load_test

    cfg = RunConfig.from_mapping({"dataset": "synthetic", "synthetic-num-examples": 250, "test-fraction": 0.2})
    test, central = load_test(cfg), load_central(cfg)
    assert len(test) == 50
    assert torch.equal(test.x, central.test.x) and torch.equal(test.y, central.test.y)


@pytest.mark.slow
def test_synthetic_data_beside_a_fork_does_not_deadlock():
    """make_synthetic in a thread while the main thread forks (as Ray's start does beside the ServerApp thread).

    OpenBLAS's fork handler waits for its worker threads; with a product running in
    another thread that waits for the GIL the forking thread holds, the process hangs
    (seen in a 10,000-client simulation; without the single-threaded BLAS this script
    hung in 2 of 3 five-second runs here). It runs in a child process with a timeout,
    so a regression fails the test instead of hanging the suite.
    """
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import subprocess, threading, time
        from fedavg_relu.core.data import make_synthetic
        stop = []
        def gen():
            while not stop:
                make_synthetic(50000, 64, 10, 0.0, 0)
        threading.Thread(target=gen, daemon=True).start()
        end, forks = time.time() + 4, 0
        while time.time() < end:
            subprocess.run(["true"], preexec_fn=lambda: None)  # preexec_fn: a real fork, as Ray's Popen
            forks += 1
        stop.append(1)
        print("ok", forks)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok") and int(proc.stdout.split()[1]) > 10
