"""Cohort training kernel, before and after a change, in one run: the ratio of their times.

Loads ``fedavg_relu/core/stacked.py`` and ``fedavg_relu/core/cohort.py`` as they
were at ``--before`` (a git revision) into a scratch package, next to the
working tree's, and times ``train_cohort_vectorized`` of both on the workload of
``benchmarks/headline.py`` (64 -> 4096 -> 10, 100 clients x 32 examples, full
batch, learning rate 0.1, the local models not kept: what a packed round with
drift off runs), at each tau, on 2 threads. The two versions alternate
``--reps`` times (a burst of load hits both); each time is the median of its
reps, and the results are compared (float64 sums, rtol 1e-5) before anything is
timed.

Writes ``benchmarks/results/kernel_ab.json`` (date, commit, load).

Usage::

    python benchmarks/kernel_ab.py --before 569fc83
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402


def load_before(revision: str):
    """The ``cohort`` module of ``revision``, importing that revision's ``stacked`` (a scratch package on sys.path)."""
    folder = Path(tempfile.mkdtemp(prefix="kernel-before-"))
    package = folder / "kernel_before"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("stacked", "cohort"):
        text = scale.git("show", f"{revision}:fedavg_relu/core/{name}.py")
        if text is None:
            raise SystemExit(f"--before {revision}: git cannot show fedavg_relu/core/{name}.py there")
        (package / f"{name}.py").write_text(text.replace("fedavg_relu.core.stacked", "kernel_before.stacked") + "\n")
    sys.path.insert(0, str(folder))
    return importlib.import_module("kernel_before.cohort")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision of the kernel to compare with")
    parser.add_argument("--taus", default="1,5")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", default=str(scale.ROOT / "benchmarks" / "results" / "kernel_ab.json"))
    ns = parser.parse_args(argv)
    import numpy as np
    import torch

    from fedavg_relu.core import cohort as after
    from fedavg_relu.core.config import RunConfig
    from fedavg_relu.core.data import load_partitions
    from fedavg_relu.core.task import initial_params, working_model
    from fedavg_relu.core.training import LocalSGDSettings

    before = load_before(ns.before)
    torch.set_num_threads(2)
    stamp, results = scale.run_stamp(), {}
    for tau in [int(v) for v in ns.taus.split(",")]:
        args = {"width": 4096, "input_dim": scale.INPUT_DIM, "examples": 32, "local_steps": tau, "rounds": 1, "tmp": "/tmp"}
        cfg = RunConfig.from_mapping(scale.run_config(args, ns.clients, ns.clients, "packed"))
        ids = list(range(ns.clients))
        datas, model, w0 = load_partitions(cfg, ids), working_model(cfg), initial_params(cfg)
        settings = LocalSGDSettings(tau, 0.1, 0, loss="cross-entropy")
        seeds = list(range(ns.clients))

        def run(module):
            return module.train_cohort_vectorized(model, w0, datas, seeds, settings, keep_local=False)

        a, b = run(before), run(after)
        for name in a.weighted_sum:
            np.testing.assert_allclose(b.weighted_sum[name], a.weighted_sum[name], rtol=1e-5, atol=1e-6, err_msg=name)
        times: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(ns.reps):
            for label, module in (("before", before), ("after", after)):
                t = time.perf_counter()
                run(module)
                times[label].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        results[str(tau)] = {"before-s": med["before"], "after-s": med["after"], "speedup": med["before"] / med["after"],
                             "before-min-s": min(times["before"]), "after-min-s": min(times["after"])}
        print(f"tau={tau}: before {med['before'] * 1e3:.1f} ms, after {med['after'] * 1e3:.1f} ms: "
              f"{med['before'] / med['after']:.2f}x", flush=True)
    meta = dict(stamp, **{"before": scale.git("rev-parse", ns.before), "load-at-end": [round(v, 2) for v in os.getloadavg()],
                          "clients": ns.clients, "reps": ns.reps, "threads": 2})
    from fedavg_relu.core.results import atomic_write_text

    atomic_write_text(Path(ns.out), json.dumps({"meta": meta, "taus": results}, indent=2) + "\n")
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
