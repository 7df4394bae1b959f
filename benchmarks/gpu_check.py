"""One command for a GPU machine: packed mode on the device, how fast, and whether it agrees with the CPU.

1. **The device.** ``--device`` (default ``cuda``) is resolved like the run-config key
   ``device`` (:func:`fedavg_relu.core.device.resolve_device`). A device this machine does
   not have ends the check at once with a message and exit status 2.
2. **Speed.** The workload of ``benchmarks/headline.py``'s packed path
   (:func:`scale.run_config`: 64 -> 4096 -> 10, 100 clients x 32 examples, every client
   every round, full-batch SGD at learning rate 0.1, cross-entropy, drift off) at tau = 1
   and 5, on the CPU and on the device. A round here is packed mode's cohort training
   of every client (:func:`fedavg_relu.core.packed.train_cohort`, what the node's train
   handler computes), outside Flower: no messages, no server, no Ray. Columns as in
   headline: the median round over rounds 2..R, client-updates per second, and the
   share of the matmul peak measured on that device (:func:`scale.matmul_peak`).
3. **Agreement.** One round at the largest tau on both, from W^0, then the drift
   exchange against the new average: the mean model, the train losses, the drift
   metrics with the nonlinear fraction and the gradient sum, one client through the
   standard path (training, and its drift with the nonlinear fraction), and the NTK Gram
   the server tracks. Each check passes when ``max |device - cpu| <= rtol * max |cpu| +
   atol`` for every array or scalar it holds (float32 compute; rtol 1e-4 and atol 1e-6
   by default: a different summation order, not a different result). NaN must match NaN.
4. **Results** go to ``--out`` (JSON, written atomically). Exit status 0 when every
   check passes, 1 when one fails, 2 when the device is missing.

Usage::

    python benchmarks/gpu_check.py                          # on a GPU machine
    python benchmarks/gpu_check.py --device cuda:1 --out /tmp/gpu_check.json
    python benchmarks/gpu_check.py --device cpu --clients 4 --rounds 2 --width 256 --peak-size 256   # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402  (puts the repository on sys.path)

from fedavg_relu.core.config import ConfigError, RunConfig  # noqa: E402
from fedavg_relu.core.data import load_partitions, load_test  # noqa: E402
from fedavg_relu.core.device import CPU, resolve_device, synchronize  # noqa: E402
from fedavg_relu.core.mechanism import ntk_change, ntk_gram, probe_indices  # noqa: E402
from fedavg_relu.core.packed import measure_cohort_drift, summarize_drift_sums, train_cohort  # noqa: E402
from fedavg_relu.core.results import atomic_write_text  # noqa: E402
from fedavg_relu.core.task import initial_params, measure_drift, train_client, working_model  # noqa: E402
from fedavg_relu.core.training import LocalSGDSettings  # noqa: E402

EXAMPLES = 32  # per client, as headline.py


def workload(ns: argparse.Namespace, tau: int, device: torch.device) -> tuple[RunConfig, dict, LocalSGDSettings]:
    """headline.py's packed workload at ``tau`` on ``device``: the run config, scale.py's args, the local SGD settings."""
    args = {"width": ns.width, "input_dim": scale.INPUT_DIM, "examples": EXAMPLES, "local_steps": tau,
            "rounds": ns.rounds, "drift": False, "tmp": tempfile.gettempdir()}
    cfg = RunConfig.from_mapping(dict(scale.run_config(args, ns.clients, ns.clients, "packed"), device=str(device)))
    settings = LocalSGDSettings(tau, cfg.effective_learning_rate(scale.INPUT_DIM), cfg.batch_size, loss=cfg.loss)
    return cfg, args, settings


def time_rounds(cfg: RunConfig, settings: LocalSGDSettings, rounds: int, device: torch.device) -> list[float]:
    """Seconds of each of ``rounds`` FedAvg rounds of cohort training (every client, W^{r+1} = the mean)."""
    ids = list(range(cfg.num_partitions))
    load_partitions(cfg, ids)  # build the data outside the timed rounds
    params, seconds = initial_params(cfg), []
    for server_round in range(1, rounds + 1):
        synchronize(device)
        start = time.perf_counter()
        params = train_cohort(cfg, ids, server_round, params, settings, keep_local=False).mean_params()  # numpy: synced
        seconds.append(time.perf_counter() - start)
    return seconds


def speed_rows(ns, devices, peaks) -> dict[str, list[dict]]:
    """Per tau, one row per device: headline's columns for the packed round."""
    out: dict[str, list[dict]] = {}
    for tau in ns.taus:
        rows = []
        for role, device in devices:
            cfg, args, settings = workload(ns, tau, device)
            torch.set_num_threads(ns.threads)
            seconds = time_rounds(cfg, settings, ns.rounds, device)
            t = statistics.median(seconds[1:] or seconds)  # round 1 holds the start-up (as headline.py)
            rows.append({"role": role, "device": str(device), "round-s": t, "round-s-all": seconds,
                         "client-updates-per-s": ns.clients / t,
                         "flops-fraction-of-peak": scale.train_flops(args) * ns.clients / t / peaks[role],
                         "matmul-peak-gflops": peaks[role] / 1e9})
        out[str(tau)] = rows
    return out


def compare(name: str, cpu: dict, dev: dict, rtol: float, atol: float) -> dict:
    """One check: every value of ``dev`` within ``rtol * max|cpu| + atol`` of ``cpu``'s (NaN must match NaN).

    Reports the value closest to (or furthest past) its bound: its key, ``max |device - cpu|`` and ``max |cpu|``.
    """
    worst = {"check": name, "pass": set(cpu) == set(dev), "key": sorted(set(cpu) ^ set(dev)) or None,
             "max-abs-diff": math.nan, "scale": math.nan, "rtol": rtol, "atol": atol}
    used = -1.0  # the largest share of its bound any value used so far
    for key in sorted(set(cpu) & set(dev)):
        a = np.asarray(cpu[key], np.float64)
        b = np.asarray(dev[key], np.float64)
        if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
            return dict(worst, **{"pass": False, "key": key, "max-abs-diff": math.nan})
        finite = np.isfinite(a) & np.isfinite(b)
        same_inf = np.array_equal(a[~finite], b[~finite], equal_nan=True)  # the same infinities where not finite
        diff = float(np.max(np.abs(a[finite] - b[finite]), initial=0.0))
        size = float(np.max(np.abs(a[finite]), initial=0.0))
        share = diff / (rtol * size + atol) if same_inf else math.inf
        if share > used:
            used = share
            worst.update({"key": key, "max-abs-diff": diff, "scale": size})
        worst["pass"] = worst["pass"] and share <= 1.0
    return worst


def measure_once(cfg: RunConfig, settings: LocalSGDSettings, probe: torch.Tensor) -> dict[str, dict]:
    """Everything the agreement checks compare, computed on ``cfg.device``: name -> {key: array or float}."""
    ids = list(range(cfg.num_partitions))
    w0 = initial_params(cfg)
    trained = train_cohort(cfg, ids, 1, w0, settings, keep_local=True)
    w1 = trained.mean_params()
    sums, grad_sum, _ = measure_cohort_drift(cfg, ids, trained.local_params, trained.loss_before, w1, True, nonlinear=True)
    data = load_partitions(cfg, [0])[0]
    client = train_client(cfg, data, 0, 1, w0, settings)
    drift, _ = measure_drift(cfg, data, client.local_params, w1, nonlinear=True)
    model, device = working_model(cfg), resolve_device(cfg.device)
    theta0, theta1 = ntk_gram(model, w0, probe, device=device), ntk_gram(model, w1, probe, device=device)
    return {
        "cohort round 1: mean model": w1,
        "cohort round 1: losses": {"train-loss": trained.train_loss, "loss-before": trained.loss_before},
        "drift exchange: metrics": summarize_drift_sums(sums, settings.learning_rate),
        "drift exchange: gradient sum": grad_sum,
        "standard path: client 0's model": client.local_params,
        "standard path: client 0's drift (nonlinear)": drift.to_metrics(),
        "NTK Gram at W^1 and ntk-change": {"theta": theta1.numpy(), "ntk-change": ntk_change(theta1, theta0)},
    }


def agreement(ns, device: torch.device) -> list[dict]:
    """The checks: :func:`measure_once` on the CPU and on ``device``, compared."""
    tau = max(ns.taus)
    cfg_cpu, _, settings = workload(ns, tau, CPU)
    cfg_dev, _, _ = workload(ns, tau, device)
    x_test = load_test(cfg_cpu).x
    probe = x_test[probe_indices(len(x_test), 64, cfg_cpu.seed)]
    cpu, dev = measure_once(cfg_cpu, settings, probe), measure_once(cfg_dev, settings, probe)
    return [compare(name, cpu[name], dev[name], ns.rtol, ns.atol) for name in cpu]


def print_report(timings: dict, checks: list[dict]) -> None:
    print("| tau | device | round (s) | client-updates/s | share of matmul peak | matmul peak (GFLOP/s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for tau, rows in timings.items():
        for r in rows:
            print(f"| {tau} | {r['device']} ({r['role']}) | {r['round-s']:.4f} | {r['client-updates-per-s']:.0f} | "
                  f"{r['flops-fraction-of-peak']:.1%} | {r['matmul-peak-gflops']:.0f} |")
    for c in checks:
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['check']}: max |device - cpu| = {c['max-abs-diff']:.3g} "
              f"(at {c['key']}; allowed {c['rtol']:g} x {c['scale']:.3g} + {c['atol']:g})")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help='"cuda", "cuda:N" or "cpu" (a smoke run; default cuda)')
    parser.add_argument("--taus", default="1,5", help="local steps, comma-separated (as headline.py)")
    parser.add_argument("--clients", type=int, default=100, help="clients, every one trained every round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per tau and device (round 1 left out)")
    parser.add_argument("--width", type=int, default=4096, help="hidden width m")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--peak-size", type=int, default=0, help="n of the n x n matmul peak (0: 2048 on cpu, 8192 on a GPU)")
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--atol", type=float, default=1e-6)
    parser.add_argument("--out", default=str(scale.ROOT / "benchmarks" / "results" / "gpu_check.json"))
    ns = parser.parse_args(argv)
    ns.taus = sorted({int(v) for v in ns.taus.split(",") if v})
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    try:
        device = resolve_device(ns.device)
    except ConfigError as err:
        print(f"gpu_check: {err.problems[0]}", file=sys.stderr)
        return 2
    started, t_start = scale.run_stamp(), time.perf_counter()
    devices = [("reference", CPU), ("device", device)]
    peak_of = {str(d): scale.matmul_peak(ns.threads, ns.peak_size or (2048 if d.type == "cpu" else 8192), device=str(d))
               for d in {CPU, device}}
    peaks = {role: peak_of[str(d)] for role, d in devices}
    timings = speed_rows(ns, devices, peaks)
    checks = agreement(ns, device)
    print_report(timings, checks)
    ok = all(c["pass"] for c in checks)
    meta = dict(started, **{
        "device": str(device), "device-name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "cpu-threads": ns.threads,
        "float32-matmul-precision": torch.get_float32_matmul_precision(),
        "workload": f"{scale.INPUT_DIM} -> {ns.width} -> {scale.NUM_CLASSES}, {ns.clients} clients x {EXAMPLES} examples, "
                    "every client every round, full-batch SGD at lr 0.1, cross-entropy; cohort training outside Flower",
        "clients": ns.clients, "rounds": ns.rounds, "seconds": time.perf_counter() - t_start,
    })
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"meta": meta, "timings": timings, "checks": checks, "ok": ok}, indent=2) + "\n")
    print(f"{'all checks pass' if ok else 'a check FAILED'}; wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
