"""What the drift measurement costs: round time with ``drift-metrics`` on vs off.

Runs the project's ServerApp logic, strategy and ClientApp handlers on an
in-process grid (:class:`fedavg_relu.runtime.local_grid.LocalGrid`: no Ray, so Flower's
transport cost does not blur the comparison), alternating the two settings
``--repeats`` times, and reports the median seconds per round (rounds >= 1)
and their ratio, measured in one run. The drift exchange costs two full-data
gradients and one forward pass per client, which is why its share falls as the
local work (tau x batch) grows: the script also runs the full-batch case.

Usage::

    python benchmarks/drift_overhead.py [--width 2048] [--rounds 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedavg_relu.core.results import read_metrics  # noqa: E402
from fedavg_relu.runtime.simulation import run_in_process  # noqa: E402


def round_seconds(cfg: dict) -> float:
    """Median seconds of rounds >= 1 of one in-process run."""
    run_dir = run_in_process(cfg)
    rows = read_metrics(run_dir)
    return statistics.median(r["seconds"] for r in rows if r["round"] >= 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="", help="write the table as JSON here")
    args = parser.parse_args()
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    import torch

    out_root = tempfile.mkdtemp(prefix="drift-bench-")
    cases = {
        "minibatch (tau=5, batch=32)": {"local-steps": 5, "batch-size": 32},
        "full batch (tau=5)": {"local-steps": 5, "batch-size": 0},
    }
    table = []
    for name, extra in cases.items():
        times = {True: [], False: []}
        for rep in range(args.repeats):
            for drift in (False, True):
                cfg = {
                    "dataset": "digits", "num-partitions": 10, "width": args.width, "num-server-rounds": args.rounds,
                    "drift-metrics": drift, "output-dir": out_root, "run-name": f"{rep}-{drift}-{len(table)}",
                    "save-model": False, **extra,
                }
                times[drift].append(round_seconds(cfg))
        off, on = statistics.median(times[False]), statistics.median(times[True])
        table.append({"case": name, "round-s-drift-off": off, "round-s-drift-on": on, "ratio": on / off})
    print(f"\nmachine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"digits, 10 clients, paper m={args.width}, {args.rounds} rounds x {args.repeats} repeats, in process")
    print(f"{'case':32s} {'drift off s/round':>18s} {'drift on s/round':>17s} {'on/off':>7s}")
    for row in table:
        print(f"{row['case']:32s} {row['round-s-drift-off']:18.3f} {row['round-s-drift-on']:17.3f} {row['ratio']:7.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f}s")
