"""Tests for fedavg_relu.core.device and run-config key ``device``: validation, resolution, placement.

No test needs a GPU. CUDA's presence is monkeypatched where a branch needs it. That
a path honours its device is shown with torch's ``meta`` device (shapes, no data):
a path that computes there fails where its results are copied back to the CPU, while
one that ignored the device would return numbers.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedavg_relu.core import task
from fedavg_relu.core.cohort import measure_cohort_drift_vectorized, train_cohort_vectorized
from fedavg_relu.core.config import ConfigError, RunConfig
from fedavg_relu.core.data import load_partitions
from fedavg_relu.core.device import CPU, resolve_device
from fedavg_relu.core.mechanism import ntk_gram
from fedavg_relu.core.preflight import check_run
from fedavg_relu.core.training import LocalSGDSettings

ROOT = Path(__file__).resolve().parent.parent
META = torch.device("meta")
NO_DATA = r"meta tensor"  # "Cannot copy out of meta tensor", "Tensor.item() cannot be called on meta tensors"


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def _cfg(**changes) -> RunConfig:
    base = {"dataset": "synthetic", "synthetic-num-examples": 240, "num-partitions": 6, "width": 32,
            "model-family": "standard", "loss": "cross-entropy"}
    return RunConfig.from_mapping(dict(base, **changes))


# --- the key -----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:7"])
def test_device_accepts_auto_cpu_cuda_and_cuda_n(value):
    """The form is checked by RunConfig; whether the GPU is there is not (that is the machine's question)."""
    assert RunConfig.from_mapping({"device": value}).device == value


def test_device_defaults_to_auto():
    assert RunConfig().device == "auto"


@pytest.mark.parametrize("value", ["gpu", "CUDA", "cuda:", "cuda:-1", "cuda:x", "", "mps"])
def test_malformed_device_is_rejected_naming_key_value_and_choices(value):
    with pytest.raises(ConfigError, match=rf"device={value!r}: expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\""):
        RunConfig.from_mapping({"device": value})


def test_device_of_the_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match=r"device=0: expected a string"):
        RunConfig.from_mapping({"device": 0})


# --- resolution on this machine ----------------------------------------------------------------------
def test_auto_is_cpu_without_cuda(no_cuda):
    assert resolve_device("auto") == CPU


def test_auto_is_cuda_when_present(two_gpus):
    assert resolve_device("auto") == torch.device("cuda")


def test_cpu_is_cpu_even_with_cuda(two_gpus):
    assert resolve_device("cpu") == CPU


def test_cuda_n_within_the_devices_resolves(two_gpus):
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("value", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_a_config_error(no_cuda, value):
    with pytest.raises(ConfigError, match=rf"device={value!r}: expected a CUDA GPU on this machine.*"
                                          r"torch\.cuda\.is_available\(\) is False.*\"auto\" or \"cpu\""):
        resolve_device(value)


def test_cuda_index_beyond_the_devices_is_a_config_error(two_gpus):
    with pytest.raises(ConfigError, match=r"device='cuda:2': expected a GPU index below 2 \(this machine has 2"):
        resolve_device("cuda:2")


def test_preflight_stops_a_cuda_run_without_a_gpu_before_any_message(no_cuda):
    """check_run (the server's check before the first message) names the key; the same run on cpu passes."""
    with pytest.raises(ConfigError, match=r"device='cuda': expected a CUDA GPU"):
        check_run(_cfg(device="cuda"))
    check_run(_cfg(device="cpu"))


# --- placement -----------------------------------------------------------------------------------------
def _cohort(cfg):
    ids = list(range(cfg.num_partitions))
    return task.working_model(cfg), task.initial_params(cfg), load_partitions(cfg, ids), [11 * k + 1 for k in ids]


def test_cohort_training_on_an_explicit_cpu_equals_the_default_bit_for_bit():
    """Minibatches (CPU generator, indices moved), momentum and lockstep's per-step view: same bits either way."""
    cfg = _cfg()
    model, w0, datas, seeds = _cohort(cfg)
    settings = LocalSGDSettings(3, 0.1, 4, momentum=0.9, loss=cfg.loss)
    seen = {CPU: [], None: []}
    runs = {device: train_cohort_vectorized(model, w0, datas, seeds, settings, lockstep_steps=(2,), budget=1,
                                            on_step=lambda t, p, device=device: seen[device].append(p), device=device)
            for device in (CPU, None)}
    a, b = runs[CPU], runs[None]
    for name in w0:
        assert np.array_equal(a.local_params[name], b.local_params[name])
        assert np.array_equal(a.weighted_sum[name], b.weighted_sum[name])
        assert torch.equal(seen[CPU][0][name], seen[None][0][name]) and seen[CPU][0][name].device == CPU
    assert np.array_equal(a.train_loss, b.train_loss) and np.array_equal(a.first_loss, b.first_loss)


def test_cohort_drift_on_an_explicit_cpu_equals_the_default_bit_for_bit():
    cfg = _cfg()
    model, w0, datas, seeds = _cohort(cfg)
    trained = train_cohort_vectorized(model, w0, datas, seeds, LocalSGDSettings(2, 0.5, 0, loss=cfg.loss))
    w1 = {k: (v / trained.num_examples.sum()).astype(np.float32) for k, v in trained.weighted_sum.items()}
    runs = [measure_cohort_drift_vectorized(model, trained.local_params, w1, w0, datas, cfg.loss, True, nonlinear=True,
                                            device=device) for device in (CPU, None)]
    (drifts_a, grads_a), (drifts_b, grads_b) = runs
    assert drifts_a == drifts_b and not np.isnan(drifts_a[0].nonlinear_fraction)
    assert all(np.array_equal(grads_a[k], grads_b[k]) for k in w0)


def test_cohort_training_and_drift_compute_on_the_device_they_are_given():
    """On ``meta`` they run (no data) and stop at the copy back: the device was used, not ignored."""
    cfg = _cfg()
    model, w0, datas, seeds = _cohort(cfg)
    with pytest.raises((NotImplementedError, RuntimeError), match=NO_DATA):
        train_cohort_vectorized(model, w0, datas, seeds, LocalSGDSettings(2, 0.1, 4), device=META)
    stacked = {k: np.stack([v] * len(datas)) for k, v in w0.items()}
    with pytest.raises((NotImplementedError, RuntimeError), match=NO_DATA):
        measure_cohort_drift_vectorized(model, stacked, w0, w0, datas, cfg.loss, nonlinear=True, device=META)


def test_ntk_gram_computes_on_its_device_and_returns_to_the_cpu():
    cfg = _cfg()
    model, w0, datas, _ = _cohort(cfg)
    theta = ntk_gram(model, w0, datas[0].x, device=CPU)
    assert theta.device == CPU and torch.equal(theta, ntk_gram(model, w0, datas[0].x))
    with pytest.raises((NotImplementedError, RuntimeError), match=NO_DATA):
        ntk_gram(model, w0, datas[0].x, device=META)


def test_working_model_keeps_one_copy_per_device_and_leaves_the_cpu_one_alone():
    cfg = _cfg()
    cpu_model, meta_model = task.working_model(cfg), task.working_model(cfg, META)
    assert meta_model is not cpu_model and meta_model is task.working_model(cfg, META)
    assert {p.device for p in meta_model.parameters()} == {META}
    assert {p.device for p in cpu_model.parameters()} == {CPU}


def test_standard_path_trains_and_measures_on_the_resolved_device(monkeypatch):
    """train_client and measure_drift put the model and the data on ``resolve_device(cfg.device)``."""
    cfg = _cfg()
    data = load_partitions(cfg, [0])[0]
    w0 = task.initial_params(cfg)
    settings = LocalSGDSettings(2, 0.1, 4, loss=cfg.loss)
    on_cpu = task.train_client(cfg, data, 0, 1, w0, settings)
    assert on_cpu.local_params.keys() == w0.keys()
    monkeypatch.setattr(task, "resolve_device", lambda spec: META)
    with pytest.raises((NotImplementedError, RuntimeError), match=NO_DATA):
        task.train_client(cfg, data, 0, 1, w0, settings)
    with pytest.raises((NotImplementedError, RuntimeError), match=NO_DATA):
        task.measure_drift(cfg, data, on_cpu.local_params, w0, nonlinear=True)


# --- benchmarks/gpu_check.py -----------------------------------------------------------------------
SMOKE = ["--device", "cpu", "--clients", "4", "--rounds", "2", "--width", "128", "--peak-size", "256"]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_compare_fails_outside_the_tolerance_and_on_nan_mismatch():
    """Bound: max|d - c| <= rtol max|c| + atol = 1e-4 * 2 + 1e-6 = 2.01e-4."""
    check = _gpu_check().compare
    assert check("x", {"a": [1.0, 2.0]}, {"a": [1.0, 2.0002]}, 1e-4, 1e-6)["pass"]
    failed = check("x", {"a": [1.0, 2.0], "b": 0.0}, {"a": [1.0, 2.0003], "b": 0.0}, 1e-4, 1e-6)
    assert not failed["pass"] and failed["key"] == "a" and failed["max-abs-diff"] == pytest.approx(3e-4)
    assert not check("x", {"a": [1.0, np.nan]}, {"a": [1.0, 1.0]}, 1e-4, 1e-6)["pass"]
    assert not check("x", {"a": 1.0}, {"b": 1.0}, 1e-4, 1e-6)["pass"]


def test_gpu_check_smoke_on_cpu_passes_every_check_and_writes_json(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert _gpu_check().main([*SMOKE, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["ok"] is True and result["meta"]["device"] == "cpu"
    assert len(result["checks"]) == 7 and all(c["pass"] for c in result["checks"])
    assert sorted(result["timings"]) == ["1", "5"]
    for rows in result["timings"].values():
        assert [r["role"] for r in rows] == ["reference", "device"]
        assert all(r["round-s"] > 0 and r["client-updates-per-s"] == pytest.approx(4 / r["round-s"]) for r in rows)
    printed = capsys.readouterr().out
    assert "| tau | device | round (s) | client-updates/s | share of matmul peak |" in printed
    assert printed.count("PASS ") == 7 and "FAIL" not in printed


def test_gpu_check_exits_1_when_the_device_disagrees(tmp_path, monkeypatch, capsys):
    """A device result moved by 1e-2 on the mean model fails that check (and only that one)."""
    module = _gpu_check()
    measure = module.measure_once

    calls = []

    def skewed(cfg, settings, probe):
        values = measure(cfg, settings, probe)
        calls.append(cfg)
        if len(calls) == 2:  # agreement() measures on the CPU first, then on the device
            key = "cohort round 1: mean model"
            values[key] = {k: v + 1e-2 for k, v in values[key].items()}
        return values

    monkeypatch.setattr(module, "measure_once", skewed)
    out = tmp_path / "gpu_check.json"
    assert module.main([*SMOKE, "--taus", "1", "--out", str(out)]) == 1
    checks = {c["check"]: c["pass"] for c in json.loads(out.read_text())["checks"]}
    assert checks.pop("cohort round 1: mean model") is False and all(checks.values())
    assert "FAIL  cohort round 1: mean model" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_exits_2_naming_the_missing_device(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cuda", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "device='cuda': expected a CUDA GPU on this machine" in done.stderr
    assert not out.exists()
