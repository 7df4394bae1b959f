"""What the measurements cost: round time with each of them on, against all of them off.

Runs the project's ServerApp logic, strategy and ClientApp handlers on an
in-process grid (:class:`fedavg_relu.runtime.local_grid.LocalGrid`: no Ray, so Flower's
transport cost does not blur the comparison). Four settings, run in turn
``--repeats`` times so that a change in the machine's load hits them alike:

- ``off``: ``drift-metrics=false``, ``ntk-probe-size=0`` (plain FedAvg);
- ``drift``: the drift exchange (two full-data gradients and one forward pass
  per client after aggregation);
- ``drift+nonlinear``: the drift exchange with ``drift-nonlinear=true`` (one
  jvp and one vjp more per client);
- ``ntk``: the server's NTK change on a probe of ``ntk-probe-size=64``
  held-out examples, drift off.

It reports the median seconds per round (rounds >= 1) of each setting and its
ratio to ``off``, measured in one run. The drift exchange's share falls as the
local work (tau x batch) grows, which is why there are two cases.

**The floor.** The same run times what the drift exchange cannot avoid: the two
full-data gradients of every client (at W_k and at W^{r+1},
:func:`fedavg_relu.core.training.full_gradient` on each client's data, nothing
else: no messages, no checks, no spill), and reports ``(off + floor) / off``, the
ratio the drift setting would have with every other cost of the exchange at zero.

Usage::

    python benchmarks/drift_overhead.py [--width 2048] [--rounds 4] [--repeats 3] [--out FILE]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale  # noqa: E402  (benchmarks/: run_stamp)

from fedavg_relu.core.results import atomic_write_text, read_metrics  # noqa: E402
from fedavg_relu.runtime.simulation import run_in_process  # noqa: E402


def round_seconds(cfg: dict) -> float:
    """Median seconds of rounds >= 1 of one in-process run."""
    run_dir = run_in_process(cfg)
    rows = read_metrics(run_dir)
    return statistics.median(r["seconds"] for r in rows if r["round"] >= 1)


def gradient_floor(cfg: dict, repeats: int = 5) -> float:
    """Median seconds of two full-data gradients per client, over every client of ``cfg`` (the drift's compute)."""
    from fedavg_relu.core.config import RunConfig
    from fedavg_relu.core.data import load_partitions
    from fedavg_relu.core.models import set_trainable
    from fedavg_relu.core.task import initial_params, working_model
    from fedavg_relu.core.training import full_gradient

    run = RunConfig.from_mapping(cfg)
    model = working_model(run)
    set_trainable(model, initial_params(run))
    datas = load_partitions(run, range(run.num_partitions))
    times = []
    for _ in range(repeats + 1):  # the first pass warms up
        t = time.perf_counter()
        for data in datas:
            full_gradient(model, data.x, data.y, run.loss)
            full_gradient(model, data.x, data.y, run.loss)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


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
    settings = {
        "off": {"drift-metrics": False, "ntk-probe-size": 0},
        "drift": {"drift-metrics": True, "ntk-probe-size": 0},
        "drift+nonlinear": {"drift-metrics": True, "drift-nonlinear": True, "ntk-probe-size": 0},
        "ntk": {"drift-metrics": False, "ntk-probe-size": 64},
    }
    table = []
    for name, extra in cases.items():
        times: dict[str, list[float]] = {s: [] for s in settings}
        for rep in range(args.repeats):
            for setting, keys in settings.items():
                cfg = {
                    "dataset": "digits", "num-partitions": 10, "width": args.width, "num-server-rounds": args.rounds,
                    "output-dir": out_root, "run-name": f"{rep}-{setting}-{len(table)}", "save-model": False,
                    **keys, **extra,
                }
                times[setting].append(round_seconds(cfg))
        seconds = {s: statistics.median(v) for s, v in times.items()}
        floor = gradient_floor({"dataset": "digits", "num-partitions": 10, "width": args.width, **extra})
        table.append({"case": name, "round-seconds": seconds,
                      "ratio-to-off": {s: v / seconds["off"] for s, v in seconds.items()},
                      "all-seconds": times, "drift-gradients-s": floor,
                      "floor-ratio": (seconds["off"] + floor) / seconds["off"]})
    print(f"\nmachine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"digits, 10 clients, paper m={args.width}, {args.rounds} rounds x {args.repeats} repeats, in process")
    print(f"{'case':30s} " + " ".join(f"{s:>22s}" for s in settings))
    for row in table:
        print(f"{row['case']:30s} " + " ".join(
            f"{row['round-seconds'][s]:10.3f} s ({row['ratio-to-off'][s]:5.2f}x)" for s in settings)
            + f"   floor: two gradients per client {row['drift-gradients-s']:.3f} s ({row['floor-ratio']:.2f}x)")
    if args.out:
        meta = {**scale.run_stamp(), "width": args.width, "rounds": args.rounds, "repeats": args.repeats, "cpus": os.cpu_count(),
                "torch-threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
                "workload": "digits, 10 clients, paper family, in-process grid", "settings": settings}
        atomic_write_text(Path(args.out), json.dumps({"meta": meta, "rows": table}, indent=2) + "\n")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f}s")
