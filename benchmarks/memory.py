"""Peak memory and round time at width 8192, by number of clients: standard path and packed mode.

Workload (issue 12's): ``paper`` family, width 8192 (one trained 8192 x 8192 layer,
67M parameters, 268 MB per model), digits, Dirichlet(0.3) label skew, tau = 20
local steps, drift metrics on (with gradient dissimilarity), 2 rounds, through
Flower's Ray simulation engine (:func:`fedavg_relu.runtime.simulation.simulate`):

* ``standard``: one SuperNode per client, 2 ClientApp actors (one per core);
* ``packed``: one SuperNode simulating every client, torch on both cores.

Each (path, clients) runs in a child process; the parent samples the child's
whole process tree (the driver, Ray's daemons and workers) every 2 s and
keeps the peak of the summed PSS (shared pages split between the processes that
map them) and of the summed RSS. The target: a peak that grows with the number
of actors, not with the number of clients.

    python benchmarks/memory.py                      # 10 25 50 100 clients, both paths
    python benchmarks/memory.py --clients 10 50 --paths packed

Writes ``benchmarks/results/memory/memory.json`` and ``memory.md``
(``--out`` to change). Numbers depend on the machine; compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.scale import PeakSampler, run_stamp  # noqa: E402

GIB = 2**30


def run_config(path: str, clients: int, args: argparse.Namespace, out: str) -> dict:
    """The workload's run config for ``clients`` clients on ``path``."""
    cfg = {
        "dataset": "digits", "partitioner": args.partitioner, "dirichlet-alpha": args.alpha, "num-partitions": clients,
        "model-family": "paper", "width": args.width, "depth": 1, "local-steps": args.local_steps,
        "num-server-rounds": args.rounds, "drift-metrics": True, "gradient-dissimilarity": True,
        "save-model": False, "checkpoint-every": 0, "output-dir": out, "run-name": f"{path}-{clients}", "seed": 0,
        # every client must be waited for: with the default 600 s, a slow round counts the clients still
        # training as failed (a packed node trains them all in one message)
        "round-timeout": args.round_timeout,
    }
    if path == "packed":
        cfg["clients-per-node"] = max(2, clients)
    return cfg


def child(spec: dict) -> None:
    """Run one configuration through simulate(); write its metrics rows."""
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    from fedavg_relu.core.results import read_metrics
    from fedavg_relu.runtime.simulation import simulate

    cpus = 2 if spec["path"] == "packed" else 1
    run_dir = simulate(spec["cfg"], num_cpus_per_client=cpus)
    Path(spec["result"]).write_text(json.dumps(read_metrics(run_dir)))


def measure(path: str, clients: int, args: argparse.Namespace, tmp: Path) -> dict:
    """Run (path, clients) in a child process while sampling its process tree's memory."""
    result = tmp / f"{path}-{clients}.json"
    spec = {"path": path, "cfg": run_config(path, clients, args, str(tmp)), "result": str(result)}
    env = dict(os.environ, FEDAVG_RELU_SPILL_DIR=str(tmp / "spill"), RAY_USAGE_STATS_ENABLED="0")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    sampler = PeakSampler(proc.pid, every=args.sample_every)
    peak = sampler.peak
    try:
        with sampler:
            _, err = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        err = "timeout"
    finally:
        try:
            os.killpg(proc.pid, 9)  # stragglers of the child's session (Ray's processes)
        except ProcessLookupError:
            pass
        proc.wait()
    row = {"path": path, "clients": clients, "peak-pss-gib": peak["pss"] / GIB, "peak-rss-gib": peak["rss"] / GIB,
           # PSS by kind: process memory, shared memory (Ray's object store), mapped files (spilled models)
           **{f"peak-{k}-gib": peak.get(k, 0.0) / GIB for k in ("pss-anon", "pss-shmem", "pss-file")},
           "wall-seconds": time.perf_counter() - t0,
           # the machine's load at the end (1, 5, 15 min): above the run's own ~2, something else competed
           "loadavg": [round(x, 2) for x in os.getloadavg()]}
    if proc.returncode != 0 or not result.exists():
        row.update(status="failed", error=(err or "")[-1500:])
        return row
    rows = [r for r in json.loads(result.read_text()) if r["round"] >= 1]
    # completed: every round trained AND measured every client (a round whose drift exchange failed is not the
    # workload the table describes, even though the run itself completed)
    whole = all(r.get("clients-trained") == clients and r.get("clients-measured") == clients for r in rows)
    row.update(
        status="completed" if len(rows) == args.rounds and whole else "incomplete",
        rounds=len(rows),
        **{"round-seconds": [float(r["seconds"]) for r in rows],
           "clients-trained": [r.get("clients-trained") for r in rows],
           "clients-measured": [r.get("clients-measured") for r in rows],
           "clients-unmeasured": [r.get("clients-unmeasured") for r in rows],
           "drift-rejected": [r.get("drift-rejected") for r in rows]},
    )
    if row["status"] != "completed":
        row["error"] = (err or "")[-1500:]  # the ServerApp's warnings and errors (flwr logs at WARNING here)
    return row


def write_tables(out_dir: Path, rows: list[dict], meta: dict) -> None:
    """memory.json (rows + meta) and memory.md (the table)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (out_dir / "memory.md").write_text(render_table(rows) + "\n")


def render_table(rows: list[dict]) -> str:
    """The markdown table of ``rows`` (what the README and docs show)."""
    lines = ["| path | clients | peak PSS GiB | peak RSS GiB | s per round (last round) | rounds done | status |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["clients"], r["path"] != "standard")):
        secs = r.get("round-seconds") or []
        per_round = f"{secs[-1]:.0f}" if secs else "-"  # round 1 also pays Ray's start and the imports
        lines.append(f"| {r['path']} | {r['clients']} | {r['peak-pss-gib']:.2f} | {r['peak-rss-gib']:.2f} | "
                     f"{per_round} | {r.get('rounds', 0)} | {r['status']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--paths", nargs="+", default=["standard", "packed"])
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--partitioner", default="dirichlet")
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds per (path, clients) run")
    parser.add_argument("--round-timeout", type=float, default=7200.0, help="the runs' round-timeout")
    # reading smaps_rollup of multi-GB processes is kernel work: every 0.25 s it took 80% of a core
    # from the measured run; the peaks at this width last seconds (a 268 MB model is being moved)
    parser.add_argument("--sample-every", type=float, default=2.0, help="seconds between memory samples")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory"))
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    tmp = Path(tempfile.mkdtemp(prefix="fr-mem-"))
    rows: list[dict] = []
    meta = {**run_stamp(), "width": args.width, "local-steps": args.local_steps, "rounds": args.rounds, "round-timeout": args.round_timeout,
            "partitioner": args.partitioner,
            "dirichlet-alpha": args.alpha, "dataset": "digits", "model-family": "paper", "cpus": os.cpu_count(),
            "memory-gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB}
    try:
        for clients in args.clients:
            for path in args.paths:
                row = measure(path, clients, args, tmp)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
                if row["status"] == "failed":
                    print(row.get("error", "")[-800:], flush=True)
                write_tables(Path(args.out), rows, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(render_table(rows))


if __name__ == "__main__":
    main()
