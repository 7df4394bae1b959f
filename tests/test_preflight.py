"""Tests for fedavg_relu.core.preflight: what check_run finds before the first message."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from fedavg_relu.core import data, preflight
from fedavg_relu.core.config import ConfigError, RunConfig
from fedavg_relu.core.preflight import check_run, run_problems

# digits: 1,797 examples, test-fraction 0.2 -> ceil(0.2 * 1797) = 360 held out, 1,437 to split
DIGITS_TRAIN = 1797 - 360


def _works(message: str, key: str) -> str:
    """The value of the ``(e.g. key=value works)`` suggestion in ``message``."""
    found = re.search(rf"e\.g\. {key}=(\S+) works", message)
    assert found, f"no working {key} suggested in: {message}"
    return found.group(1)


# --- the clients' split ------------------------------------------------------------------------
def test_issue_example_dirichlet_raises_naming_alpha_and_partitions():
    """digits, Dirichlet(0.05), 50 clients: no split gives each client >= 1437 // (4 * 50) = 7 examples.

    The message names dirichlet-alpha and num-partitions, and the two values it suggests pass check_run.
    """
    cfg = RunConfig(dataset="digits", partitioner="dirichlet", dirichlet_alpha=0.05, num_partitions=50)
    with pytest.raises(ConfigError, match=r"dirichlet-alpha=0\.05: with num-partitions=50 on the 1437 training "
                                          r"examples of dataset='digits'.*>= 7 examples") as info:
        check_run(cfg)
    assert len(info.value.problems) == 1
    message = info.value.problems[0]
    assert "expected a larger dirichlet-alpha" in message and "or fewer num-partitions" in message
    alpha, k = float(_works(message, "dirichlet-alpha")), int(_works(message, "num-partitions").rstrip(")"))
    assert alpha > 0.05 and k < 50
    check_run(cfg.replace(dirichlet_alpha=alpha))
    check_run(cfg.replace(num_partitions=k))


def test_default_config_passes_and_warms_the_clients_cache():
    """RunConfig() (digits, iid, 10 clients) passes; the cached split covers the 1437 training rows once."""
    cfg = RunConfig()
    assert check_run(cfg) is None
    parts = data.load_partition_indices(cfg)
    assert len(parts) == 10
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(DIGITS_TRAIN))
    assert [len(p) for p in parts] == [144] * 7 + [143] * 3  # np.array_split(1437, 10)


def test_feasible_dirichlet_passes():
    """digits, Dirichlet(0.3), 50 clients passes; every client then holds >= 1437 // 200 = 7 examples."""
    cfg = RunConfig(dataset="digits", partitioner="dirichlet", dirichlet_alpha=0.3, num_partitions=50)
    check_run(cfg)
    assert min(len(p) for p in data.load_partition_indices(cfg)) >= 7


def test_more_partitions_than_training_examples_raises():
    """synthetic n=40: ceil(0.2 * 40) = 8 held out, 32 to split; 33 iid clients would leave one empty."""
    cfg = RunConfig(dataset="synthetic", synthetic_num_examples=40, num_partitions=33)
    with pytest.raises(ConfigError, match=r"num-partitions=33: the 32 training examples .* expected num-partitions <= 32"):
        check_run(cfg)
    check_run(cfg.replace(num_partitions=32))


def test_empty_partition_raises_naming_num_partitions(monkeypatch):
    """A split that leaves clients 1 and 3 of 4 empty raises, naming num-partitions and those ids."""
    cfg = RunConfig(dataset="synthetic", synthetic_num_examples=40, num_partitions=4)
    split = [np.arange(0, 16), np.array([], dtype=np.int64), np.arange(16, 32), np.array([], dtype=np.int64)]
    monkeypatch.setattr(data, "load_partition_indices", lambda _cfg: tuple(split))
    with pytest.raises(ConfigError, match=r"num-partitions=4: partitioner='iid' leaves 2 of the 4 clients .*"
                                          r"partition ids 1, 3\); expected fewer num-partitions"):
        check_run(cfg)


def test_pathological_more_classes_per_client_than_labels_present_raises():
    """synthetic n=20 with 30 classes: 16 training examples hold <= 16 distinct labels < classes-per-partition=20.

    RunConfig accepts it (20 <= synthetic-num-classes=30); the split cannot.
    """
    cfg = RunConfig(dataset="synthetic", synthetic_num_examples=20, synthetic_num_classes=30, partitioner="pathological",
                    classes_per_partition=20, num_partitions=2)
    present = len(np.unique(data.load_central(cfg).train.y.numpy()))
    assert present <= 16
    with pytest.raises(ConfigError, match=rf"classes-per-partition=20: .* hold {present} distinct labels; "
                                          rf"expected classes-per-partition <= {present}"):
        check_run(cfg)


def test_pathological_label_on_more_clients_than_examples_raises():
    """digits, 400 clients x 5 classes = 2000 label slots, ~200 per label > the ~144 examples of each label.

    The message names num-partitions and classes-per-partition; the suggested num-partitions passes.
    """
    cfg = RunConfig(dataset="digits", partitioner="pathological", classes_per_partition=5, num_partitions=400)
    with pytest.raises(ConfigError, match=r"num-partitions=400: with classes-per-partition=5 .* would go to \d+ clients "
                                          r"but has only \d+ examples.*a smaller classes-per-partition") as info:
        check_run(cfg)
    k = int(_works(info.value.problems[0], "num-partitions"))
    assert k < 400
    check_run(cfg.replace(num_partitions=k))


# --- dimensions --------------------------------------------------------------------------------
def test_held_out_split_impossible_raises_naming_test_fraction():
    """synthetic n=4, test-fraction 0.9: ceil(3.6) = 4 held out leaves no training example (scikit-learn refuses)."""
    cfg = RunConfig(dataset="synthetic", synthetic_num_examples=4, test_fraction=0.9, num_partitions=1)
    with pytest.raises(ConfigError, match=r"test-fraction=0\.9: the held-out split of dataset='synthetic' "
                                          r"\(synthetic-num-examples=4\) cannot be drawn .*expected a larger"):
        check_run(cfg)


@pytest.mark.parametrize(("dataset", "shape", "pattern"), [
    ("digits", (65, 10), r"dataset='digits': the training data has 64 features per example; expected 65, the model's input"),
    ("synthetic", (21, 4), r"synthetic-input-dim=20: the training data has 20 features per example; expected 21"),
    ("synthetic", (20, 1), r"synthetic-num-classes=4: the training data has label [1-3]; expected labels < 1"),
])
def test_model_shape_that_does_not_fit_the_data_raises(monkeypatch, dataset, shape, pattern):
    """A model built for other shapes than the data's (dataset_shape patched) raises, naming the key."""
    monkeypatch.setattr(data, "dataset_shape", lambda _cfg: shape)
    with pytest.raises(ConfigError, match=pattern):
        check_run(RunConfig(dataset=dataset, synthetic_num_examples=40, num_partitions=2))


def _write_npz(path, n: int, d: int, top_label: int):
    rng = np.random.default_rng(0)
    y = np.arange(n) % (top_label + 1)
    np.savez(path, x=rng.standard_normal((n, d)), y=y)
    return path


def test_data_file_with_other_feature_count_raises_naming_data_path(tmp_path):
    """A node file of 3 features against digits' 64-input model: data-path named, 64 expected."""
    path = _write_npz(tmp_path / "node.npz", 12, 3, 9)
    with pytest.raises(ConfigError, match=r"data-path='.*node\.npz': 3 features per example; expected 64, the model's "
                                          r"input for dataset='digits' \(or set dataset=synthetic with synthetic-input-dim=3\)"):
        check_run(RunConfig(), data_paths=[path])


def test_data_file_labels_beyond_the_outputs_raise_naming_synthetic_num_classes(tmp_path):
    """Labels 0..5 against synthetic's 4 outputs: label 5 out of range; synthetic-num-classes=6 suggested."""
    path = _write_npz(tmp_path / "node.npz", 12, 20, 5)
    cfg = RunConfig(dataset="synthetic", synthetic_num_examples=40, num_partitions=2)
    with pytest.raises(ConfigError, match=r"label 5 out of range; expected labels < 4, .*synthetic-num-classes=6"):
        check_run(cfg, data_paths=[path])
    check_run(cfg.replace(synthetic_num_classes=6), data_paths=[path])


def test_data_files_skip_the_partition_check_and_report_unreadable_files(tmp_path):
    """With data files the (infeasible) split is not checked; a missing file is one problem naming data-path."""
    cfg = RunConfig(dataset="digits", partitioner="dirichlet", dirichlet_alpha=0.05, num_partitions=50)
    good = _write_npz(tmp_path / "good.npz", 12, 64, 9)
    assert run_problems(cfg, [good]) == []
    problems = run_problems(cfg, [good, tmp_path / "missing.npz"])
    assert len(problems) == 1 and re.match(r"data-path='.*missing\.npz': no such file", problems[0])


# --- hub data sets -----------------------------------------------------------------------------
def test_unreachable_uncached_hub_dataset_raises_naming_dataset(monkeypatch):
    """Not cached and no route to the Hub: one problem naming dataset='mnist' and the shipped data sets."""
    monkeypatch.setattr(preflight, "probe_hub_cache", lambda cfg: {"status": "unavailable", "error": "not cached"})
    monkeypatch.setattr(preflight, "hub_reachable", lambda: (False, "huggingface.co:443: gaierror"))
    with pytest.raises(ConfigError, match=r"dataset='mnist': ylecun/mnist is not in this machine's Hugging Face cache "
                                          r"and the Hub cannot be reached \(huggingface\.co:443: gaierror\); "
                                          r"expected dataset=digits or dataset=synthetic"):
        check_run(RunConfig(dataset="mnist"))


def test_uncached_hub_dataset_with_a_reachable_hub_passes(monkeypatch):
    """Not cached but the Hub answers: the clients can download it, so no problem (the split is unchecked)."""
    monkeypatch.setattr(preflight, "probe_hub_cache", lambda cfg: {"status": "unavailable", "error": "not cached"})
    monkeypatch.setattr(preflight, "hub_reachable", lambda: (True, "huggingface.co:443"))
    assert run_problems(RunConfig(dataset="cifar10")) == []


def test_uncached_hub_dataset_fails_without_starting_the_cache_probe(monkeypatch, tmp_path):
    """HF_HOME with an empty hub/: no child process; then entries named like the data set make the cache a candidate.

    hub/datasets--uoft-cs--cifar10 (hub layout) and datasets/parquet/uoft-cs--cifar10-1a2b (old layout) both
    hold "cifar10"; datasets/other___digits does not.
    """
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("HF_DATASETS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "hf" / "hub").mkdir(parents=True)
    assert preflight.hf_cache_dirs() == []

    def no_probe(cfg):
        raise AssertionError("the cache probe should not start on an empty cache")

    monkeypatch.setattr(preflight, "probe_hub_cache", no_probe)
    monkeypatch.setattr(preflight, "hub_reachable", lambda: (False, "no route"))
    with pytest.raises(ConfigError, match=r"dataset='cifar10': uoft-cs/cifar10 is not in this machine's Hugging Face cache"):
        check_run(RunConfig(dataset="cifar10"))
    (tmp_path / "hf" / "datasets" / "other___digits").mkdir(parents=True)
    assert preflight.hf_cache_dirs() == [tmp_path / "hf" / "datasets"]
    assert not preflight.hf_cache_may_hold("uoft-cs/cifar10")
    (tmp_path / "hf" / "datasets" / "parquet" / "uoft-cs--cifar10-1a2b").mkdir(parents=True)
    assert preflight.hf_cache_may_hold("uoft-cs/cifar10") and not preflight.hf_cache_may_hold("ylecun/mnist")
    (tmp_path / "hf" / "hub" / "datasets--ylecun--mnist").mkdir()
    assert preflight.hf_cache_dirs() == [tmp_path / "hf" / "datasets", tmp_path / "hf" / "hub"]
    assert preflight.hf_cache_may_hold("ylecun/mnist")


@pytest.mark.slow
def test_hub_cache_probe_offline_with_an_empty_cache_is_unavailable(monkeypatch, tmp_path):
    """The real child process, offline, with an empty HF_HOME: status 'unavailable' and no network wait."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    report = preflight.probe_hub_cache(RunConfig(dataset="fashion-mnist", num_partitions=2))
    assert report["status"] == "unavailable"
    assert "zalando-datasets/fashion_mnist" in report["error"] or "offline" in report["error"].lower()


def _fake_hub(monkeypatch, tmp_path, n_train: int, d: int, num_labels: int = 10):
    """A parquet 'hub' data set (n_train + 20 rows of d features) behind data._federated_dataset, probed in-process."""
    import datasets
    from flwr_datasets import FederatedDataset

    rng = np.random.default_rng(0)
    files = {}
    for split, n in (("train", n_train), ("test", 20)):
        rows = datasets.Dataset.from_dict({"image": rng.integers(0, 256, (n, d)).tolist(), "label": np.arange(n) % num_labels})
        files[split] = str(tmp_path / f"{split}.parquet")
        rows.to_parquet(files[split])
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")

    def federated(cfg):
        partitioner = data.make_partitioner(cfg, None, "label")
        return FederatedDataset(
            dataset="parquet", data_files=files, partitioners={"train": partitioner}, seed=cfg.seed,
            cache_dir=str(tmp_path / "hf-cache"),
        )

    monkeypatch.setattr(data, "_federated_dataset", federated)
    monkeypatch.setattr(preflight, "hf_cache_may_hold", lambda hub_id: True)
    monkeypatch.setattr(preflight, "probe_hub_cache", preflight.hub_cache_report)


def test_cached_hub_dataset_of_the_expected_shape_passes(monkeypatch, tmp_path):
    """200 'mnist' rows of 784 features, 4 iid clients: sizes np.array_split(200, 4) = 50 each, no problem."""
    _fake_hub(monkeypatch, tmp_path, 200, 784)
    cfg = RunConfig(dataset="mnist", num_partitions=4)
    report = preflight.hub_cache_report(cfg)
    assert report["status"] == "ok" and report["sizes"] == [50, 50, 50, 50] and report["num_train"] == 200
    assert (report["train_input_dim"], report["test_input_dim"], report["train_max_label"]) == (784, 784, 9)
    check_run(cfg)


def test_cached_hub_dataset_of_another_shape_raises_naming_dataset(monkeypatch, tmp_path):
    """Rows of 16 features under 'mnist' (model input 784): both splits named, dataset='mnist' the key."""
    _fake_hub(monkeypatch, tmp_path, 200, 16)
    with pytest.raises(ConfigError, match=r"dataset='mnist': the train split has 16 features per example; expected 784") as info:
        check_run(RunConfig(dataset="mnist", num_partitions=4))
    assert any(p.startswith("dataset='mnist': the test split has 16 features") for p in info.value.problems)


def test_cached_hub_dataset_split_failure_raises_naming_alpha(monkeypatch, tmp_path):
    """200 rows, Dirichlet(0.01) over 20 clients, each needing >= 10 rows (the hub path's minimum): no split."""
    _fake_hub(monkeypatch, tmp_path, 200, 784)
    with pytest.raises(ConfigError, match=r"dirichlet-alpha=0\.01: partitioner='dirichlet' with num-partitions=20 "
                                          r"cannot split the 200 training examples.*expected a larger dirichlet-alpha"):
        check_run(RunConfig(dataset="mnist", partitioner="dirichlet", dirichlet_alpha=0.01, num_partitions=20))


def test_hub_reachable_tells_an_open_port_from_a_closed_one(monkeypatch):
    """HF_ENDPOINT at a listening local socket: reachable; the same port once closed: not, with the reason."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    try:
        assert preflight.hub_reachable(timeout=2.0) == (True, f"127.0.0.1:{port}")
    finally:
        server.close()
    ok, reason = preflight.hub_reachable(timeout=2.0)
    assert not ok and reason.startswith(f"127.0.0.1:{port}: ConnectionRefusedError")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert preflight.hub_reachable() == (False, "HF_HUB_OFFLINE is set")


def test_preflight_does_not_import_flwr():
    """Importing fedavg_relu.core.preflight in a fresh interpreter leaves flwr unimported."""
    code = "import sys, fedavg_relu.core.preflight; print('flwr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
