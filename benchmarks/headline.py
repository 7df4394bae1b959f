"""The headline comparison, re-run by ``make bench`` (at most 10 minutes on 2 cores).

Packed mode against pfl-research's two layouts and stock Flower's default, on the
workload of ``benchmarks/scale.py`` (64 -> 4096 -> 10, 100 clients x 32 examples,
every client every round, full-batch local SGD at learning rate 0.1), at tau = 1
and tau = 5 local steps. The paths run one after another, interleaved
``--repeats`` times (a burst of load on the shared machine then hits every path,
not one), each in a child process of its own (:func:`scale.run_child`). A path's
round time is the median over the steady rounds of all its repeats (round 1 of
each run holds the start-up and is left out).

No path evaluates inside its timed rounds: packed mode's per-round test
evaluation is timed and taken out (:func:`scale.child_ours`), pfl evaluates in its
first iteration only (left out with the first round), stock Flower evaluates
nothing.

Also measured in the same run: the 2048^2 matmul peak on 1 and 2 threads, and
the round's GEMMs timed at their own shapes on 2 threads (:func:`scale.gemm_roofline`),
from which each path's share of the peak and of that roofline follows.

Writes ``benchmarks/results/headline.json`` and ``headline.md``, with the date, the
commit and the machine's load (:func:`scale.run_stamp`); ``tests/test_bench_regression.py``
fails once a hot-path file changes after the recorded commit.

Usage::

    python benchmarks/headline.py                 # what `make bench` runs
    python benchmarks/headline.py --repeats 1 --rounds 3 --out /tmp/x   # a quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402

PATHS = ("stock-default", "pfl", "pfl-2proc", "packed-2nodes", "packed")
PFL_PATHS = ("pfl", "pfl-2proc")


def wait_quiet(load: float, at_most: float) -> None:
    """Sleep until the machine's 1-minute load average is below ``load`` (or ``at_most`` seconds have passed)."""
    deadline = time.monotonic() + at_most
    while os.getloadavg()[0] >= load and time.monotonic() < deadline:
        time.sleep(5.0)


def summarize(path: str, runs: list[dict], clients: int, flops: float, peak2: float, roofline_s: float) -> dict:
    """One row: the median steady round of ``runs`` (each :func:`scale.run_child`'s result) and what follows."""
    row = {"path": path, "layout": scale.PATH_LABELS[path], "actors": scale.ACTORS[path],
           "threads-per-actor": scale.THREADS[path], "runs": len(runs)}
    ok = [r for r in runs if "error" not in r]
    if not ok:
        row["error"] = runs[-1].get("error", "")[-300:] if runs else "not run"
        return row
    steady = [s for r in ok for s in (r["round_seconds"][1:] or r["round_seconds"])]
    t = statistics.median(steady)
    row.update({
        "round-s": t, "round-s-min": min(steady), "round-s-max": max(steady), "rounds-timed": len(steady),
        "client-updates-per-s": clients / t,
        "flops-fraction-of-peak": flops / t / peak2,
        "fraction-of-gemm-roofline": roofline_s / t,
        "peak-pss-gib": max(r["peak_pss"] for r in ok) / 2**30,
        "run-medians-s": [r["round_s"] for r in ok], "run-loads": [r["load"] for r in ok if "load" in r],
    })
    for key in ("eval_seconds", "handler_seconds"):
        values = [s for r in ok for s in r.get(key, [])[1:]]
        if values:
            row[key.replace("_", "-").replace("seconds", "s")] = statistics.median(values)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--taus", default="1,5", help="local steps, comma-separated")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of every path")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per child run")
    parser.add_argument("--out", default=str(scale.ROOT / "benchmarks" / "results"))
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="LOAD",
                        help="before each child run, wait (up to --wait-max s) until the 1-min load is below LOAD")
    parser.add_argument("--wait-max", type=float, default=600.0)
    ns = parser.parse_args(argv)
    paths = [p for p in ns.paths.split(",") if p]
    if not scale.pfl_installed():
        skipped = [p for p in paths if p in PFL_PATHS]
        paths = [p for p in paths if p not in PFL_PATHS]
        print(f"pfl is not installed (pip install -e '.[bench]'): without {skipped}", flush=True)
    import torch

    started, t_start = scale.run_stamp(), time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="headline-")
    if ns.wait_quiet > 0:
        wait_quiet(ns.wait_quiet, ns.wait_max)
    peaks = {str(t): scale.matmul_peak(t) / 1e9 for t in (1, 2)}
    print(f"{started['date']} commit {started['git commit']} load {started['load']}; matmul peak {peaks} GFLOP/s", flush=True)
    taus = {}
    for tau in [int(v) for v in ns.taus.split(",")]:
        args = {"width": 4096, "input_dim": scale.INPUT_DIM, "examples": 32, "local_steps": tau, "rounds": ns.rounds,
                "drift": False, "tmp": tmp}
        if ns.wait_quiet > 0:
            wait_quiet(ns.wait_quiet, ns.wait_max)
        for t in (1, 2):  # the peak is what the machine can do: the best of the measurements of this run
            peaks[str(t)] = max(peaks[str(t)], scale.matmul_peak(t) / 1e9)
        roof = scale.gemm_roofline(args, ns.clients)
        flops = scale.train_flops(args) * ns.clients
        runs: dict[str, list[dict]] = {p: [] for p in paths}
        for rep in range(ns.repeats):
            for path in paths:
                if ns.wait_quiet > 0:
                    wait_quiet(ns.wait_quiet, ns.wait_max)
                load_before = os.getloadavg()[0]
                res = scale.run_child({"args": args, "path": path, "num_partitions": ns.clients, "per_round": ns.clients},
                                      ns.timeout)
                res["load"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
                runs[path].append(res)
                print(f"tau={tau} repeat {rep + 1} {path}: " + (f"median {res['round_s']:.3f}s" if "error" not in res
                      else f"failed {res['error'][-200:]!r}"), flush=True)
        rows = [summarize(p, runs[p], ns.clients, flops, peaks["2"] * 1e9, roof["roofline-s"]) for p in paths]
        ok = {r["path"]: r for r in rows if "round-s" in r}
        stock = ok.get("stock-default")
        pfl = [ok[p] for p in PFL_PATHS if p in ok]
        best_pfl = max(pfl, key=lambda r: r["client-updates-per-s"]) if pfl else None
        for r in ok.values():
            if stock:
                r["x-stock-default"] = r["client-updates-per-s"] / stock["client-updates-per-s"]
            if best_pfl:
                r["x-pfl-best"] = r["client-updates-per-s"] / best_pfl["client-updates-per-s"]
        taus[str(tau)] = {"paths": rows, "pfl-best": best_pfl["path"] if best_pfl else None,
                          "flops-per-round": flops, "gemm-roofline": roof}
    for t in (1, 2):
        peaks[str(t)] = max(peaks[str(t)], scale.matmul_peak(t) / 1e9)
    for block in taus.values():  # against the best peak of the whole run
        for row in block["paths"]:
            if "round-s" in row:
                row["flops-fraction-of-peak"] = block["flops-per-round"] / row["round-s"] / (peaks["2"] * 1e9)
    meta = dict(started, **{
        "load-at-end": [round(v, 2) for v in os.getloadavg()],
        "machine": f"{os.cpu_count()} CPUs", "torch": torch.__version__, "pfl": _version("pfl"), "flwr": _version("flwr"),
        "workload": f"{scale.INPUT_DIM} -> 4096 -> {scale.NUM_CLASSES}, {ns.clients} clients x 32 examples, "
                    "every client every round, full-batch SGD at lr 0.1, cross-entropy",
        "clients-per-round": ns.clients, "rounds": ns.rounds, "repeats": ns.repeats, "wait-quiet": ns.wait_quiet,
        "matmul-peak-gflops": peaks, "seconds": time.perf_counter() - t_start,
    })
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    from fedavg_relu.core.results import atomic_write_text

    atomic_write_text(out / "headline.json", json.dumps({"meta": meta, "taus": taus}, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({t: {r["path"]: round(r.get("client-updates-per-s", float("nan"))) for r in v["paths"]}
                      for t, v in taus.items()}), flush=True)
    print(f"wrote {out / 'headline.json'} in {meta['seconds']:.0f} s (load {meta['load']} -> {meta['load-at-end']})")


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
