"""Checks before the first message: can the clients realize this run?

:func:`RunConfig.from_mapping` checks each key on its own. Some configurations
pass it and still cannot run: a Dirichlet split with no client left empty may
not exist for a small alpha and many partitions, a data set may have fewer
examples than clients, a hub data set may be neither cached nor reachable.
Without this module the clients find out, each one, in every round.

:func:`check_run` runs what the clients will run, with the server's knowledge:

1. **the split**: the training pool is built and partitioned by the very code
   :func:`fedavg_relu.core.data.load_partition` uses (same seed, same partitioner);
   every client must get at least one example (local SGD needs one; a batch
   size above a client's count is fine, that client takes full-batch steps).
   When the partitioner fails it says which parameter to change and, when a
   short search finds one, a value that works;
2. **dimensions**: the data's features and labels fit the model built from
   :func:`fedavg_relu.core.data.dataset_shape`, and so do the nodes' own data files
   when the caller knows them (``data_paths``);
3. **hub data sets** (mnist, fashion-mnist, cifar10): loaded from the local
   Hugging Face cache (when it holds anything) in a child process with the HF
   libraries offline (no network wait, killed after :data:`HUB_PROBE_TIMEOUT`
   seconds), then split as the clients will. Not cached: the Hub is probed
   with one TCP connection (:data:`HUB_CONNECT_TIMEOUT` seconds); unreachable
   is a problem that names ``dataset`` and the two data sets shipped with the
   project. (Online, ``datasets`` itself retries for ~35 s before it fails.)
4. **the device**: ``device = "cuda"`` (or ``"cuda:N"``) needs that GPU on this machine
   (:func:`fedavg_relu.core.device.device_problem`). In a deployment whose server has no
   GPU but whose SuperNodes do, ``"auto"`` lets each node decide.

Every problem is one ``key=value: ... expected ...`` line of one
:class:`~fedavg_relu.core.config.ConfigError`.

This module does not import flwr.

Why this module is longer than most: each check is short, but there is one per thing the
server can know before a run (the partitioner replayed, shapes, data files, the hub),
and they share the error wording.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from fedavg_relu.core import data
from fedavg_relu.core.config import ConfigError, RunConfig
from fedavg_relu.core.device import device_problem

#: Training pools up to this many bytes stay in data.py's per-process caches after the check,
#: for clients in the same process (LocalGrid, packed nodes, the centralized baseline); larger
#: ones are built, checked and dropped (the server keeps only the held-out split).
CACHE_LIMIT_BYTES = 64 * 2**20
#: Seconds the search for a working dirichlet-alpha / num-partitions / classes-per-partition may take.
SUGGESTION_BUDGET_S = 3.0
#: Seconds the child process that loads a hub data set from the local cache may take.
HUB_PROBE_TIMEOUT = 120.0
#: Seconds to wait for a TCP connection to the Hub (or the HTTPS proxy) when the data set is not cached.
HUB_CONNECT_TIMEOUT = 3.0

_ALPHA_LADDER = (0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 100.0)
_PARTITION_FRACTIONS = (0.8, 0.6, 0.4, 0.2, 0.1, 0.05)
_REPORT_PREFIX = "fedavg-relu-hub-report "


def check_run(cfg: RunConfig, data_paths: Sequence[str | os.PathLike] = ()) -> None:
    """Raise :class:`ConfigError` listing every reason the clients could not realize ``cfg``.

    Parameters
    ----------
    cfg
        The validated run configuration.
    data_paths
        The nodes' own data files (``--node-config data-path=...``), when the caller
        knows them. With files, the built-in partitions are not checked (the nodes
        train on their files), only the held-out split the server evaluates on.

    Raises
    ------
    ConfigError
        One ``key=value: ... expected ...`` line per problem.
    """
    problems = run_problems(cfg, data_paths)
    if problems:
        raise ConfigError(problems)


def run_problems(cfg: RunConfig, data_paths: Sequence[str | os.PathLike] = ()) -> list[str]:
    """The problems :func:`check_run` raises, as a list (empty: the run can start)."""
    problems = [p for p in [device_problem(cfg.device)] if p is not None]
    if cfg.dataset in data.HUB_DATASETS:
        problems += hub_problems(cfg, check_partitions=not data_paths)
    else:
        problems += builtin_problems(cfg, check_partitions=not data_paths)
    for path in data_paths:
        problems.extend(data_file_problems(cfg, path))
    return problems


# --- built-in data sets ---------------------------------------------------------------------
def builtin_problems(cfg: RunConfig, check_partitions: bool = True) -> list[str]:
    """Problems of ``synthetic`` / ``digits``: held-out split, dimensions, the clients' split."""
    keep = _training_pool_bytes(cfg) <= CACHE_LIMIT_BYTES
    try:
        central = data.load_central(cfg) if keep else data.build_central(cfg)
    except ValueError as err:  # scikit-learn's train_test_split: too few examples for the classes
        return [_held_out_problem(cfg, err)]
    labels = central.train.y.numpy()
    problems = _dims_problems(cfg, central.input_dim, int(labels.max()), what="training data")
    if check_partitions:
        problems.extend(partition_problems(cfg, labels, keep))
    return problems


def _training_pool_bytes(cfg: RunConfig) -> int:
    if cfg.dataset == "synthetic":
        return cfg.synthetic_num_examples * (4 * cfg.synthetic_input_dim + 8)
    return 0  # digits: 1,797 x 64 floats


def _held_out_problem(cfg: RunConfig, err: Exception) -> str:
    size = (
        f"synthetic-num-examples={cfg.synthetic_num_examples}" if cfg.dataset == "synthetic" else f"dataset={cfg.dataset!r}"
    )
    fix = "a larger test-fraction or synthetic-num-examples" if cfg.dataset == "synthetic" else "another test-fraction"
    return (
        f"test-fraction={cfg.test_fraction!r}: the held-out split of dataset={cfg.dataset!r} ({size}) "
        f"cannot be drawn ({err}); expected {fix}"
    )


def _dims_problems(cfg: RunConfig, input_dim: int, max_label: int, what: str) -> list[str]:
    """The model is built for ``dataset_shape(cfg)``: the data's features and labels must fit it."""
    model_in, model_out = data.dataset_shape(cfg)
    synthetic = cfg.dataset == "synthetic"
    problems = []
    if input_dim != model_in:
        key = f"synthetic-input-dim={cfg.synthetic_input_dim}" if synthetic else f"dataset={cfg.dataset!r}"
        problems.append(
            f"{key}: the {what} has {input_dim} features per example; expected {model_in}, the model's input"
        )
    if max_label >= model_out:
        key = f"synthetic-num-classes={cfg.synthetic_num_classes}" if synthetic else f"dataset={cfg.dataset!r}"
        problems.append(
            f"{key}: the {what} has label {max_label}; expected labels < {model_out}, the model's outputs"
        )
    return problems


# --- the clients' split -----------------------------------------------------------------------
def partition_problems(cfg: RunConfig, labels: np.ndarray, keep: bool = True) -> list[str]:
    """Split ``labels`` (the training pool's) with the clients' code; problems naming what to change.

    ``keep``: split through :func:`fedavg_relu.core.data.load_partition_indices` (its per-process cache,
    which ``labels`` must be the training pool of) instead of :func:`fedavg_relu.core.data.partition_indices`.
    """
    n, k = len(labels), cfg.num_partitions
    pool = _pool_words(cfg, n)
    if k > n:
        return [f"num-partitions={k}: {pool} cannot give {k} clients one example each; expected num-partitions <= {n}"]
    try:
        parts = data.load_partition_indices(cfg) if keep else data.partition_indices(labels, cfg)
    except ValueError as err:
        return [_split_failure(cfg, labels, err)]
    sizes = np.array([len(p) for p in parts])
    empty = np.flatnonzero(sizes == 0)
    if len(empty):
        ids = ", ".join(str(i) for i in empty[:5]) + (", ..." if len(empty) > 5 else "")
        return [
            f"num-partitions={k}: partitioner={cfg.partitioner!r} leaves {len(empty)} of the {k} clients "
            f"of {pool} without examples (partition ids {ids}); expected fewer num-partitions"
        ]
    return []


def _pool_words(cfg: RunConfig, n: int) -> str:
    return f"the {n} training examples of dataset={cfg.dataset!r}"


def _split_failure(cfg: RunConfig, labels: np.ndarray, err: Exception) -> str:
    """What failed, which parameter to change, and (found within the budget) a value that works."""
    n, k = len(labels), cfg.num_partitions
    pool = _pool_words(cfg, n)
    present = np.unique(labels)
    deadline = time.monotonic() + SUGGESTION_BUDGET_S
    smaller_k = [c for c in sorted({max(1, int(k * f)) for f in _PARTITION_FRACTIONS}, reverse=True) if c < k]
    if cfg.partitioner == "dirichlet":
        min_size = getattr(data.make_partitioner(cfg, n), "_min_partition_size", "the minimum")
        alpha = _first_working(cfg, labels, [{"dirichlet_alpha": a} for a in _ALPHA_LADDER if a > cfg.dirichlet_alpha], deadline)
        fewer = _first_working(cfg, labels, [{"num_partitions": c} for c in smaller_k], deadline)
        return (
            f"dirichlet-alpha={cfg.dirichlet_alpha!r}: with num-partitions={k} on {pool} the Dirichlet "
            f"partitioner (seed={cfg.seed}) found no split that gives every client >= {min_size} examples; "
            f"expected a larger dirichlet-alpha{_works('dirichlet-alpha', alpha)} "
            f"or fewer num-partitions{_works('num-partitions', fewer)}"
        )
    if cfg.partitioner == "pathological":
        if cfg.classes_per_partition > len(present):
            return (
                f"classes-per-partition={cfg.classes_per_partition}: {pool} hold {len(present)} distinct labels; "
                f"expected classes-per-partition <= {len(present)}"
            )
        match = re.search(r"Label: (\S+) is needed to be assigned to more partitions \((\d+)\).*?\((\d+)\)", str(err))
        detail = (
            f"label {match.group(1)} would go to {match.group(2)} clients but has only {match.group(3)} examples"
            if match else str(err)
        )
        fewer = _first_working(cfg, labels, [{"num_partitions": c} for c in smaller_k], deadline)
        classes = _first_working(
            cfg, labels, [{"classes_per_partition": c} for c in range(cfg.classes_per_partition - 1, 0, -1)], deadline
        )
        return (
            f"num-partitions={k}: with classes-per-partition={cfg.classes_per_partition} on {pool} the "
            f"pathological partitioner cannot split ({detail}); expected fewer num-partitions"
            f"{_works('num-partitions', fewer)} or a smaller classes-per-partition{_works('classes-per-partition', classes)}"
        )
    return f"num-partitions={k}: partitioner={cfg.partitioner!r} cannot split {pool} ({err}); expected fewer num-partitions"


def _first_working(cfg: RunConfig, labels: np.ndarray, changes: Iterable[dict], deadline: float) -> dict | None:
    """The first change (snake_case fields) under which the clients' split succeeds with no empty client."""
    for change in changes:
        if time.monotonic() > deadline:
            return None
        trial = dataclasses.replace(cfg, **change)
        if trial.num_partitions > len(labels):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                parts = data.partition_indices(labels, trial)
        except ValueError:
            continue
        if min(len(p) for p in parts) >= 1:
            return change
    return None


def _works(key: str, change: dict | None) -> str:
    if not change:
        return ""
    value = next(iter(change.values()))
    return f" (e.g. {key}={value} works)"


# --- a node's own data file ---------------------------------------------------------------------
def data_file_problems(cfg: RunConfig, path: str | os.PathLike) -> list[str]:
    """A node's ``data-path`` file read as the clients read it, against the model's input and outputs."""
    try:
        own = data.load_data_file(path)
    except ValueError as err:
        return [f"{err}; expected a readable .npz (x, y) or .csv file"]
    input_dim, num_classes = data.dataset_shape(cfg)
    d, top = int(own.x.shape[1]), int(own.y.max())
    problems = []
    synthetic = cfg.dataset == "synthetic"
    if d != input_dim:
        fix = f"synthetic-input-dim={d}" if synthetic else f"dataset=synthetic with synthetic-input-dim={d}"
        problems.append(
            f"data-path={str(path)!r}: {d} features per example; expected {input_dim}, the model's input for "
            f"dataset={cfg.dataset!r} (or set {fix})"
        )
    if top >= num_classes:
        fix = f"synthetic-num-classes={top + 1}" if synthetic else f"dataset=synthetic with synthetic-num-classes={top + 1}"
        problems.append(
            f"data-path={str(path)!r}: label {top} out of range; expected labels < {num_classes}, the model's "
            f"outputs for dataset={cfg.dataset!r} (or set {fix})"
        )
    return problems


# --- hub data sets -----------------------------------------------------------------------------
def hub_problems(cfg: RunConfig, check_partitions: bool = True) -> list[str]:
    """A hub data set: split and dimensions from the local cache, else whether the Hub answers."""
    hub_id = data.HUB_DATASETS[cfg.dataset][0]
    if hf_cache_may_hold(hub_id):
        report = probe_hub_cache(cfg)
    else:  # nothing of that name cached: no need to start the child process
        report = {"status": "unavailable", "error": "not in the Hugging Face cache"}
    if report["status"] == "unavailable":
        reachable, reason = hub_reachable()
        if reachable:
            return []  # not cached but the Hub answers: the clients download it (the split is not checked)
        return [
            f"dataset={cfg.dataset!r}: {hub_id} is not in this machine's Hugging Face cache and the Hub cannot "
            f"be reached ({reason}); expected dataset=digits or dataset=synthetic (they ship with the project), "
            f"or a network connection to the Hub, or a warm cache (HF_HOME)"
        ]
    problems = []
    _, _, label_key = data.HUB_DATASETS[cfg.dataset]
    for split in ("train", "test"):
        problems.extend(_dims_problems(cfg, report[f"{split}_input_dim"], report[f"{split}_max_label"], f"{split} split"))
    if not check_partitions:
        return problems
    n, k = report["num_train"], cfg.num_partitions
    pool = _pool_words(cfg, n)
    if k > n:
        problems.append(f"num-partitions={k}: {pool} cannot give {k} clients one example each; expected num-partitions <= {n}")
    elif report["status"] == "partition-error":
        param = {"dirichlet": "a larger dirichlet-alpha or fewer num-partitions",
                 "pathological": "fewer num-partitions or a smaller classes-per-partition"}.get(cfg.partitioner, "fewer num-partitions")
        key = f"dirichlet-alpha={cfg.dirichlet_alpha!r}" if cfg.partitioner == "dirichlet" else f"num-partitions={k}"
        problems.append(
            f"{key}: partitioner={cfg.partitioner!r} with num-partitions={k} cannot split {pool} "
            f"({report['error']}); expected {param}"
        )
    elif min(report["sizes"]) == 0:
        empty = sum(1 for s in report["sizes"] if s == 0)
        problems.append(
            f"num-partitions={k}: partitioner={cfg.partitioner!r} leaves {empty} of the {k} clients of {pool} "
            f"without examples; expected fewer num-partitions"
        )
    return problems


def hf_cache_dirs() -> list[Path]:
    """The Hugging Face cache folders (``datasets`` and hub downloads) that exist and hold anything.

    Read from the variables the HF libraries read (``HF_DATASETS_CACHE``, ``HF_HUB_CACHE``,
    ``HF_HOME``, ``XDG_CACHE_HOME``) without importing them. Empty: nothing can be cached.
    """
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = Path(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")).expanduser()
    candidates = (
        os.environ.get("HF_DATASETS_CACHE") or home / "datasets",
        os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or home / "hub",
    )
    return [Path(c).expanduser() for c in candidates if Path(c).expanduser().is_dir() and any(Path(c).expanduser().iterdir())]


def hf_cache_may_hold(hub_id: str) -> bool:
    """False only when no entry of the HF cache folders (two levels deep) has the data set's name in it.

    ``datasets`` keeps ``ylecun___mnist/``, the hub cache ``datasets--ylecun--mnist/``, older
    releases ``parquet/ylecun--mnist-<hash>/``: matching the bare name (``mnist``) covers them
    all; a false match only costs the child process of :func:`probe_hub_cache`.
    """
    name = hub_id.rsplit("/", 1)[-1].lower()
    for root in hf_cache_dirs():
        for entry in root.iterdir():
            if name in entry.name.lower():
                return True
            if entry.is_dir() and any(name in sub.name.lower() for sub in entry.iterdir()):
                return True
    return False


def probe_hub_cache(cfg: RunConfig, timeout: float = HUB_PROBE_TIMEOUT) -> dict:
    """Load the hub data set from the local cache only, in a child process; its :func:`hub_cache_report`.

    The HF libraries read their offline switches at import, so a child process (with
    ``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1``) is the one way to ask the cache without
    touching this process's settings. Online, ``datasets`` retries for ~35 s before giving up.
    """
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    code = "from fedavg_relu.core.preflight import _hub_report_main; _hub_report_main()"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], input=json.dumps(cfg.to_mapping()), capture_output=True, text=True,
            timeout=timeout, env=env, cwd=package_root,
        )
    except subprocess.TimeoutExpired:  # subprocess.run kills the child it started
        return {"status": "unavailable", "error": f"loading from the cache took over {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_REPORT_PREFIX):
            return json.loads(line[len(_REPORT_PREFIX):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "unavailable", "error": f"the cache probe exited {proc.returncode}: {tail}"}


def _hub_report_main() -> None:
    """Child process: read a run-config mapping on stdin, print one report line."""
    cfg = RunConfig.from_mapping(json.loads(sys.stdin.read()))
    print(_REPORT_PREFIX + json.dumps(hub_cache_report(cfg)), flush=True)


def hub_cache_report(cfg: RunConfig) -> dict:
    """Load and split a hub data set as the clients do (``data._federated_dataset``); a JSON-able report.

    ``status`` is ``"unavailable"`` (with ``error``), ``"partition-error"`` (with ``error``) or ``"ok"``
    (with ``sizes``, every client's example count). Both also give ``num_train`` and each split's
    ``*_input_dim`` and ``*_max_label``.
    """
    _, feature_key, label_key = data.HUB_DATASETS[cfg.dataset]
    try:
        fds = data._federated_dataset(cfg)
        test = fds.load_split("test")  # loads every split (FederatedDataset prepares them together)
    except Exception as err:  # datasets raises many connection / cache error types
        return {"status": "unavailable", "error": f"{type(err).__name__}: {err}"}
    partitioner = fds.partitioners["train"]
    report: dict = {"status": "ok"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            first = fds.load_partition(0, "train")
    except ValueError as err:
        report.update(status="partition-error", error=str(err))
        first = None
    train = fds.load_split("train")  # the shuffled split the partitioner was given
    report["num_train"] = len(train)
    for split, ds in (("train", train), ("test", test)):
        head = data.arrays_from_hf(ds.select(range(min(4, len(ds)))), feature_key, label_key)
        report[f"{split}_input_dim"] = int(head.x.shape[1])
        report[f"{split}_max_label"] = int(np.max(ds[label_key]))
    if first is not None:
        report["sizes"] = _hub_partition_sizes(fds, partitioner, cfg, len(train))
    return report


def _hub_partition_sizes(fds, partitioner, cfg: RunConfig, n: int) -> list[int]:
    if cfg.partitioner == "iid":  # IidPartitioner's contiguous shards are np.array_split's parts
        return [len(part) for part in np.array_split(np.arange(n), cfg.num_partitions)]
    assigned = getattr(partitioner, "_partition_id_to_indices", None)  # filled by the first load_partition
    if isinstance(assigned, dict) and len(assigned) == cfg.num_partitions:
        return [len(assigned[k]) for k in range(cfg.num_partitions)]
    return [len(fds.load_partition(k, "train")) for k in range(cfg.num_partitions)]


def hub_reachable(timeout: float = HUB_CONNECT_TIMEOUT) -> tuple[bool, str]:
    """Whether one TCP connection to the Hub (``HF_ENDPOINT``, or the HTTPS proxy) opens within ``timeout``.

    Name resolution can hang longer than a socket timeout, so the attempt runs in a daemon
    thread that is abandoned after ``timeout`` seconds.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False, "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    outcome: dict[str, object] = {}

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["ok"] = True
        except OSError as err:
            outcome["error"] = f"{type(err).__name__}: {err}"

    thread = threading.Thread(target=connect, name="fedavg-relu-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    where = f"{host}:{port}" + (" (HTTPS proxy)" if proxy else "")
    if outcome.get("ok"):
        return True, where
    return False, f"{where}: {outcome.get('error', f'no answer within {timeout:.0f} s')}"
