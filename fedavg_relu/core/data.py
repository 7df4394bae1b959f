"""Data sets and their federated partitions.

Built in and offline:

``synthetic``
    ``n`` inputs uniform on the unit sphere in R^d; labels are the argmax of a
    random one-hidden-layer ReLU teacher's ``c`` logits (each logit
    standardised over the data set so the classes are balanced), plus Gaussian
    noise of std ``synthetic-noise`` on the logits before the argmax.
``digits``
    scikit-learn's bundled 8x8 handwritten digits (1,797 examples, 10 classes).

From the Hugging Face Hub through ``flwr_datasets.FederatedDataset`` (need a
network): ``mnist``, ``fashion-mnist``, ``cifar10``.

Every input is flattened and scaled to unit Euclidean norm (THEORY.md's
`paper` setting), the same for every model family. A held-out share
(``test-fraction``, stratified by label) is kept for central evaluation; the
rest is split into ``num-partitions`` clients with flwr-datasets partitioners
(IID, Dirichlet(alpha) by label, a fixed number of classes per client).

This module does not import flwr (only flwr-datasets).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedavg_relu.core.config import RunConfig

HUB_DATASETS: dict[str, tuple[str, str, str]] = {
    # name: (hub id, feature column, label column)
    "mnist": ("ylecun/mnist", "image", "label"),
    "fashion-mnist": ("zalando-datasets/fashion_mnist", "image", "label"),
    "cifar10": ("uoft-cs/cifar10", "img", "label"),
}
HUB_NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10}
HUB_INPUT_DIM = {"mnist": 784, "fashion-mnist": 784, "cifar10": 3072}


class DatasetUnavailableError(RuntimeError):
    """A data set could not be loaded (e.g. a hub data set without a network)."""


@dataclass(frozen=True)
class TensorData:
    """Inputs ``x`` (n, d) float32 and labels ``y`` (n,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class CentralData:
    """A built-in data set split into a training pool and a held-out test set."""

    train: TensorData
    test: TensorData
    num_classes: int
    input_dim: int


def unit_norm(x: np.ndarray) -> np.ndarray:
    """Scale every row to unit Euclidean norm (all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def single_threaded_blas():
    """Context: numpy's BLAS on the calling thread only (threadpoolctl), for code that may run beside a fork.

    The ServerApp builds its data in a thread while Flower's runtime starts Ray in
    the main thread (``subprocess.Popen``). OpenBLAS's fork handler waits for its
    worker threads; if those are in the middle of a product whose calling thread is
    waiting for the GIL the forking thread holds, the process deadlocks (seen here:
    ``blas_thread_shutdown_`` under ``Popen`` against a ``matmul``). Without worker
    threads in use there is nothing to wait for. GEMM splits rows and columns, not
    the sums, across threads, so the results are the same bits.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


#: Rows of synthetic inputs drawn and normalized at a time (bounds the float64 temporaries).
SYNTHETIC_BLOCK = 16384


def make_synthetic(n: int, d: int, num_classes: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs on the unit sphere in R^d and labels from a random ReLU teacher.

    The inputs are drawn and normalized :data:`SYNTHETIC_BLOCK` rows at a time:
    numpy's generator yields the same numbers for consecutive blocks as for one
    ``(n, d)`` draw, so the data are those of a single draw (tests/test_data.py
    checks it) while the float64 temporaries stay a block long.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    x = np.empty((n, d), np.float32)
    for start in range(0, n, SYNTHETIC_BLOCK):
        stop = min(n, start + SYNTHETIC_BLOCK)
        x[start:stop] = unit_norm(rng.standard_normal((stop - start, d)))
    hidden = 64
    a = rng.standard_normal((d, hidden)) * np.sqrt(2.0 / d)
    b = rng.standard_normal((hidden, num_classes)) / np.sqrt(hidden)
    logits = np.empty((n, num_classes))
    with single_threaded_blas():
        for start in range(0, n, SYNTHETIC_BLOCK):
            stop = min(n, start + SYNTHETIC_BLOCK)
            logits[start:stop] = np.maximum(x[start:stop] @ a, 0.0) @ b
    logits = (logits - logits.mean(axis=0)) / (logits.std(axis=0) + 1e-12)
    if noise > 0:
        logits = logits + noise * rng.standard_normal(logits.shape)
    return x, logits.argmax(axis=1).astype(np.int64)


def load_builtin(name: str, cfg: RunConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """Inputs (unit norm), labels and class count of a built-in data set."""
    if name == "synthetic":
        x, y = make_synthetic(
            cfg.synthetic_num_examples, cfg.synthetic_input_dim, cfg.synthetic_num_classes, cfg.synthetic_noise, cfg.seed
        )
        return x, y, cfg.synthetic_num_classes
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return unit_norm(digits.data / 16.0), digits.target.astype(np.int64), 10
    raise ValueError(f"dataset={name!r}: not a built-in data set (synthetic, digits)")


def _to_tensors(x: np.ndarray, y: np.ndarray) -> TensorData:
    return TensorData(torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)), torch.as_tensor(y, dtype=torch.int64))


_DATA_FIELDS = (
    "dataset", "seed", "test_fraction", "synthetic_num_examples", "synthetic_input_dim",
    "synthetic_num_classes", "synthetic_noise",
)
_PARTITION_FIELDS = _DATA_FIELDS + ("num_partitions", "partitioner", "dirichlet_alpha", "classes_per_partition")


def load_central(cfg: RunConfig) -> CentralData:
    """Training pool and held-out split of a built-in data set (cached per process)."""
    return _load_central_cached(cfg.only(*_DATA_FIELDS))


@functools.lru_cache(maxsize=4)
def _load_central_cached(cfg: RunConfig) -> CentralData:
    return _build_central(cfg)


def _build_central(cfg: RunConfig) -> CentralData:
    from sklearn.model_selection import train_test_split

    x, y, num_classes = load_builtin(cfg.dataset, cfg)
    counts = np.bincount(y, minlength=num_classes)
    stratify = y if counts[counts > 0].min() >= 2 else None
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=cfg.test_fraction, random_state=cfg.seed, stratify=stratify, shuffle=True
    )
    return CentralData(_to_tensors(x_tr, y_tr), _to_tensors(x_te, y_te), num_classes, x.shape[1])


def make_partitioner(cfg: RunConfig, num_examples: int | None = None, label_key: str = "label"):
    """The flwr-datasets partitioner the config names (not yet given a data set)."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    k = cfg.num_partitions
    if cfg.partitioner == "iid":
        return IidPartitioner(num_partitions=k)
    if cfg.partitioner == "dirichlet":
        min_size = 10 if num_examples is None else max(1, min(10, num_examples // (4 * k)))
        return DirichletPartitioner(
            num_partitions=k, partition_by=label_key, alpha=cfg.dirichlet_alpha,
            min_partition_size=min_size, self_balancing=False, shuffle=True, seed=cfg.seed,
        )
    if cfg.partitioner == "pathological":
        return PathologicalPartitioner(
            num_partitions=k, partition_by=label_key, num_classes_per_partition=cfg.classes_per_partition,
            class_assignment_mode="first-deterministic", shuffle=True, seed=cfg.seed,
        )
    raise ValueError(f"partitioner={cfg.partitioner!r}: expected one of iid, dirichlet, pathological")


def partition_hf_dataset(dataset, cfg: RunConfig, label_key: str = "label") -> list:
    """Split a ``datasets.Dataset`` into ``num-partitions`` datasets with the configured partitioner."""
    partitioner = make_partitioner(cfg, len(dataset), label_key)
    partitioner.dataset = dataset
    try:
        with warnings.catch_warnings():  # Dirichlet re-sampling chatter; failures still raise
            warnings.simplefilter("ignore", UserWarning)
            return [partitioner.load_partition(pid) for pid in range(cfg.num_partitions)]
    except ValueError as err:
        raise ValueError(
            f"partitioner={cfg.partitioner!r} could not split {len(dataset)} examples into "
            f"num-partitions={cfg.num_partitions} (dirichlet-alpha={cfg.dirichlet_alpha}, "
            f"classes-per-partition={cfg.classes_per_partition}): {err}"
        ) from err


def partition_indices(labels: np.ndarray, cfg: RunConfig) -> list[np.ndarray]:
    """Indices into ``labels`` of each partition, by the configured flwr-datasets partitioner."""
    labels = np.asarray(labels, dtype=np.int64)
    if cfg.partitioner == "iid":  # IidPartitioner shards contiguously: shuffle first
        order = np.random.default_rng([cfg.seed, 1]).permutation(len(labels))
        # IidPartitioner's partitions are contiguous `Dataset.shard`s, i.e. exactly np.array_split of
        # `order` (tests/test_packed.py checks it): computed directly, as 10^4 shards cost minutes there
        return [np.sort(part) for part in np.array_split(order, cfg.num_partitions)]
    else:
        order = np.arange(len(labels))
    import datasets  # only the flwr-datasets partitioners need it (a slow import)

    ds = datasets.Dataset.from_dict({"index": order, "label": labels[order]})
    parts = partition_hf_dataset(ds, cfg, "label")
    return [np.sort(np.asarray(p["index"], dtype=np.int64)) for p in parts]


@functools.lru_cache(maxsize=4)
def _partitions_cached(cfg: RunConfig) -> tuple[np.ndarray, ...]:
    central = load_central(cfg)
    return tuple(partition_indices(central.train.y.numpy(), cfg))


def build_central(cfg: RunConfig) -> CentralData:
    """The training pool and held-out split :func:`load_central` caches, built afresh and not kept."""
    return _build_central(cfg.only(*_DATA_FIELDS))


def load_partition_indices(cfg: RunConfig) -> tuple[np.ndarray, ...]:
    """Every client's indices into ``load_central(cfg).train``: the cached split :func:`load_partition` uses."""
    return _partitions_cached(cfg.only(*_PARTITION_FIELDS))


def load_partition(cfg: RunConfig, partition_id: int) -> TensorData:
    """Training data of client ``partition_id`` (built-in or hub data set)."""
    if not 0 <= partition_id < cfg.num_partitions:
        raise ValueError(f"partition-id={partition_id}: expected an integer in [0, num-partitions={cfg.num_partitions})")
    if cfg.dataset in HUB_DATASETS:
        return load_hub_partition(cfg, partition_id)
    idx = _partitions_cached(cfg.only(*_PARTITION_FIELDS))[partition_id]
    train = load_central(cfg).train
    return TensorData(train.x[idx], train.y[idx])


def load_partitions(cfg: RunConfig, partition_ids: Sequence[int]) -> list[TensorData]:
    """:func:`load_partition` for many clients (one cache lookup for the built-in data sets)."""
    if cfg.dataset in HUB_DATASETS:
        return [load_partition(cfg, k) for k in partition_ids]
    bad = [k for k in partition_ids if not 0 <= k < cfg.num_partitions]
    if bad:
        raise ValueError(f"partition-id={bad[0]}: expected an integer in [0, num-partitions={cfg.num_partitions})")
    parts = _partitions_cached(cfg.only(*_PARTITION_FIELDS))
    train = load_central(cfg).train
    return [TensorData(train.x[parts[k]], train.y[parts[k]]) for k in partition_ids]


def dataset_shape(cfg: RunConfig) -> tuple[int, int]:
    """``(input_dim, num_classes)`` of the configured data set, without a download."""
    if cfg.dataset in HUB_DATASETS:
        return HUB_INPUT_DIM[cfg.dataset], HUB_NUM_CLASSES[cfg.dataset]
    if cfg.dataset == "synthetic":
        return cfg.synthetic_input_dim, cfg.synthetic_num_classes
    central = load_central(cfg)
    return central.input_dim, central.num_classes


# --- hub data sets ------------------------------------------------------------
def arrays_from_hf(dataset, feature_key: str, label_key: str) -> TensorData:
    """Flatten a ``datasets.Dataset``'s images/arrays to unit-norm rows and int labels."""
    feats = np.stack([np.asarray(v, dtype=np.float32) for v in dataset[feature_key]])
    labels = np.asarray(dataset[label_key], dtype=np.int64)
    return _to_tensors(unit_norm(feats / 255.0 if feats.max(initial=0) > 1.0 else feats), labels)


def _federated_dataset(cfg: RunConfig):
    from flwr_datasets import FederatedDataset

    hub_id, _, label_key = HUB_DATASETS[cfg.dataset]
    return FederatedDataset(
        dataset=hub_id, partitioners={"train": make_partitioner(cfg, None, label_key)}, seed=cfg.seed
    )


def _hub_error(cfg: RunConfig, err: Exception) -> DatasetUnavailableError:
    hub_id = HUB_DATASETS[cfg.dataset][0]
    return DatasetUnavailableError(
        f"dataset={cfg.dataset!r} ({hub_id} on the Hugging Face Hub) could not be loaded: this data set "
        f"needs a network connection to the Hub (or a warm Hugging Face cache). Offline, use "
        f"dataset=digits or dataset=synthetic. Cause: {type(err).__name__}: {err}"
    )


def load_hub_partition(cfg: RunConfig, partition_id: int) -> TensorData:
    """One client's partition of a hub data set, through ``FederatedDataset``."""
    _, feature_key, label_key = HUB_DATASETS[cfg.dataset]
    try:
        part = _federated_dataset(cfg).load_partition(partition_id, "train")
    except Exception as err:  # datasets raises many connection error types
        raise _hub_error(cfg, err) from err
    return arrays_from_hf(part, feature_key, label_key)


def load_hub_test(cfg: RunConfig) -> TensorData:
    """The hub data set's test split, for central evaluation."""
    _, feature_key, label_key = HUB_DATASETS[cfg.dataset]
    try:
        split = _federated_dataset(cfg).load_split("test")
    except Exception as err:
        raise _hub_error(cfg, err) from err
    return arrays_from_hf(split, feature_key, label_key)


def load_test(cfg: RunConfig) -> TensorData:
    """Held-out data for central evaluation of the configured data set."""
    if cfg.dataset in HUB_DATASETS:
        return load_hub_test(cfg)
    return _load_test_cached(cfg.only(*_DATA_FIELDS))


@functools.lru_cache(maxsize=4)
def _load_test_cached(cfg: RunConfig) -> TensorData:
    # the server needs only the held-out split: do not keep the training pool in its process
    return _build_central(cfg).test


# --- a device's own data file ---------------------------------------------------
def load_data_file(path: str | os.PathLike, input_dim: int | None = None, num_classes: int | None = None) -> TensorData:
    """A node's own training data from ``.npz`` (arrays ``x`` (n, d) and ``y`` (n,)) or ``.csv``.

    A CSV has one example per row: ``d`` feature columns then the integer label; a header
    row is skipped when it is not numeric. Inputs are scaled to unit norm like every
    built-in data set. Raises ``ValueError`` naming the file and what is wrong.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"data-path={str(path)!r}: no such file")
    return _load_data_file_cached(str(p.resolve()), p.stat().st_mtime_ns, input_dim, num_classes)


@functools.lru_cache(maxsize=4)
def _load_data_file_cached(path: str, _mtime: int, input_dim: int | None, num_classes: int | None) -> TensorData:
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                if "x" not in npz or "y" not in npz:
                    raise ValueError(f"expected arrays 'x' and 'y', found {sorted(npz.files)}")
                x, y = np.asarray(npz["x"]), np.asarray(npz["y"])
        elif suffix == ".csv":
            try:
                table = np.loadtxt(path, delimiter=",", ndmin=2)
            except ValueError:
                table = np.loadtxt(path, delimiter=",", ndmin=2, skiprows=1)
            x, y = table[:, :-1], table[:, -1]
        else:
            raise ValueError("expected a .npz or .csv file")
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"data-path={path!r}: cannot read: {err}") from err
    x = x.reshape(len(x), -1)
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"data-path={path!r}: expected n >= 1 rows with one label each, got x {x.shape}, y {y.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"data-path={path!r}: inputs contain NaN or inf")
    if not np.all(np.equal(np.mod(y, 1), 0)) or y.min() < 0:
        raise ValueError(f"data-path={path!r}: labels must be non-negative integers")
    if input_dim is not None and x.shape[1] != input_dim:
        raise ValueError(f"data-path={path!r}: {x.shape[1]} features per example, expected {input_dim} (the model's input)")
    if num_classes is not None and y.max() >= num_classes:
        raise ValueError(f"data-path={path!r}: label {int(y.max())} out of range, expected < {num_classes}")
    return _to_tensors(unit_norm(x), y.astype(np.int64))
