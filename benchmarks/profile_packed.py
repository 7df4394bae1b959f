"""Where a packed round's time goes: a profile split at tau = 1 and tau = 5.

The workload of ``benchmarks/headline.py`` (64 -> 4096 -> 10, 100 clients x 32
examples, one node holding every client, torch on 2 threads). Three measurements
per tau, in one run:

1. **In process, profiled.** The same ServerApp, strategy and ClientApp handlers
   on :class:`~fedavg_relu.runtime.local_grid.LocalGrid` (no Ray), under
   pyinstrument (sampling every ``--interval`` s) from the end of round 1's
   evaluation to the end of the last round's. Every sample is charged to the
   innermost frame that names a part (:data:`PARTS`): e.g. a conversion of an
   ArrayRecord inside the validation counts as serialization; what no part names
   (the strategy's own Python, Flower's Message and Record objects, logging) is
   ``python overhead``.
2. **In process, unprofiled.** The round times without the profiler's own cost;
   the split of (1) is scaled to them.
3. **Through Flower's simulation engine** (:func:`scale.run_child`, as the
   benchmark runs it): each round's time, its test evaluation, and the ClientApp's
   train handler timed inside the Ray worker.

The split of a simulated round (evaluation out) adds up to it: the train handler
inside the worker, cut into the profile's client-side parts (``client: ...``, the
samples under ``packed_train``) in their profiled proportions; the server's parts,
scaled to the unprofiled in-process round outside its handler; and ``flower
simulation messaging``, the rest: the Ray actor round trip, the message store and
the polling of Flower's runtime.

Jitter: the spread (min, median, max) of the simulated rounds, of the handler
inside the worker, and of the rest (round - handler).

Writes ``benchmarks/results/profile.json`` (with the date, commit and load:
:func:`scale.run_stamp`); ``docs/scale.md`` renders it. Needs ``pyinstrument``
(the ``bench`` extra).

Usage::

    python benchmarks/profile_packed.py             # tau 1 and 5, 12 rounds each
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402

#: Parts of a round, matched on a frame's file (suffix) and, where given, function; the innermost match wins.
PARTS: tuple[tuple[str, str, str | None], ...] = (
    ("training (cohort kernel)", "fedavg_relu/core/cohort.py", None),
    ("training (cohort kernel)", "fedavg_relu/core/stacked.py", None),
    ("client data", "fedavg_relu/core/data.py", None),
    ("serialization (records <-> numpy)", "fedavg_relu/flower/records.py", None),
    ("serialization (records <-> numpy)", "flwr/common/record/array.py", None),
    ("serialization (records <-> numpy)", "flwr/common/record/arrayrecord.py", None),
    ("serialization (records <-> numpy)", "flwr/common/inflatable.py", None),
    ("validation", "fedavg_relu/flower/validation.py", None),
    ("spill (local model store)", "fedavg_relu/core/spill.py", None),
    ("aggregation", "fedavg_relu/core/aggregation.py", None),
    ("aggregation", "fedavg_relu/flower/streaming.py", None),
    ("metrics and outputs", "fedavg_relu/core/results.py", None),
    ("evaluation (test split; outside the timed round)", "fedavg_relu/core/training.py", "evaluate"),
)
OVERHEAD = "python overhead (strategy, Flower Message/Record objects, logging, the rest)"
MESSAGING = "flower simulation messaging (Ray actor, message store, polling)"
EVALUATION = PARTS[-1][0]


def part_of(file_path: str, function: str) -> str | None:
    """The part a frame belongs to (:data:`PARTS`), None if none names it."""
    path = file_path.replace("\\", "/")
    for name, suffix, func in PARTS:
        if path.endswith(suffix) and (func is None or func == function):
            return name
    return None


#: The ClientApp's train handler: a frame of it on the stack puts a sample on the client side.
HANDLER = ("clients/packed_app.py", "packed_train")
CLIENT = "client: "


def split_frames(root) -> dict[str, float]:
    """Seconds per part of a pyinstrument frame tree, each sample charged to the innermost part on its stack;
    parts inside the ClientApp's train handler are prefixed ``client: ``."""
    out: dict[str, float] = {}
    todo = [(root, None, False)]
    while todo:
        frame, part, client = todo.pop()
        path, function = (frame.file_path or "").replace("\\", "/"), frame.function or ""
        part = part_of(path, function) or part
        client = client or (path.endswith(HANDLER[0]) and function == HANDLER[1])
        own = frame.time - sum(c.time for c in frame.children)
        if own > 0:
            key = (CLIENT if client else "") + (part or OVERHEAD)
            out[key] = out.get(key, 0.0) + own
        todo.extend((c, part, client) for c in frame.children)
    return out


def in_process(args: dict, clients: int, profile: bool, interval: float) -> dict:
    """Run ``args['rounds']`` packed rounds on a LocalGrid; round seconds without evaluation, and the profile split."""
    import torch

    import fedavg_relu.server_app as server_app
    from fedavg_relu.core.results import read_metrics
    from fedavg_relu.runtime.simulation import run_in_process

    torch.set_num_threads(scale.THREADS["packed"])
    evals: list[float] = []
    profiler = None
    original = server_app.evaluate
    rounds = args["rounds"]
    window: dict[str, float] = {}

    def timed_evaluate(*a, **k):
        nonlocal profiler
        t = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            evals.append(time.perf_counter() - t)
            call = len(evals) - 1  # call 0 evaluates W^0, call r the model after round r
            if profile and call == 1:
                from pyinstrument import Profiler

                profiler = Profiler(interval=interval)
                window["start"] = time.perf_counter()
                profiler.start()
            elif profile and call == rounds and profiler is not None:
                profiler.stop()
                window["seconds"] = time.perf_counter() - window["start"]

    from clients.client_app import build_client_app

    handler_file = Path(args["tmp"]) / f"handler-in-process-{args['local_steps']}-{int(profile)}.txt"
    handler_file.unlink(missing_ok=True)
    server_app.evaluate = timed_evaluate
    try:
        run_dir = run_in_process(scale.run_config(args, clients, clients, "packed"),
                                 client_app=build_client_app(mods=[scale.handler_timer(str(handler_file))]))
    finally:
        server_app.evaluate = original
    rows = [r for r in read_metrics(run_dir) if r["round"] >= 1]
    out = {"round-s": [float(r["seconds"]) - e for r, e in zip(rows, evals[-len(rows):], strict=True)],
           "eval-s": evals[-len(rows):], "handler-s": [float(v) for v in handler_file.read_text().split()]}
    if profiler is not None:
        session = profiler.last_session
        parts = split_frames(session.root_frame())
        timed = rounds - 1  # rounds 2..R
        out["profile"] = {k: v / timed for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}
        out["profiled-round-s"] = window["seconds"] / timed
        out["sampled-s"] = sum(parts.values()) / timed
    return out


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--taus", default="1,5")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.0005, help="pyinstrument's sampling interval, s")
    parser.add_argument("--out", default=str(scale.ROOT / "benchmarks" / "results" / "profile.json"))
    ns = parser.parse_args(argv)
    stamp, t0 = scale.run_stamp(), time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="profile-packed-")
    taus = {}
    for tau in [int(v) for v in ns.taus.split(",")]:
        args = {"width": 4096, "input_dim": scale.INPUT_DIM, "examples": 32, "local_steps": tau, "rounds": ns.rounds,
                "drift": False, "tmp": tmp}
        plain = in_process(args, ns.clients, profile=False, interval=ns.interval)
        prof = in_process(args, ns.clients, profile=True, interval=ns.interval)
        sim = scale.run_child({"args": args, "path": "packed", "num_partitions": ns.clients, "per_round": ns.clients},
                              600.0)
        if "error" in sim:
            raise RuntimeError(f"the simulated packed run failed: {sim['error'][-500:]}")
        steady = slice(1, None)  # round 1 holds the start-up
        local_round = statistics.median(plain["round-s"][steady])
        sim_round = statistics.median(sim["round_seconds"][steady])
        handler = sim.get("handler_seconds", [])[steady]
        rest = [r - h for r, h in zip(sim["round_seconds"][steady], handler, strict=True)]
        # the round = the train handler inside the Ray worker (its parts in the profile's proportions)
        #           + the server's parts (the profile's, scaled to the unprofiled in-process round outside its handler)
        #           + messaging (the rest of the simulated round)
        parts = dict(prof["profile"])
        evaluation = parts.pop(EVALUATION, 0.0)
        local_handler = statistics.median(plain["handler-s"][steady])
        sim_handler = statistics.median(handler)
        client = {k: v for k, v in parts.items() if k.startswith(CLIENT)}
        server = {k: v for k, v in parts.items() if not k.startswith(CLIENT)}
        split = {k: v * sim_handler / max(sum(client.values()), 1e-12) for k, v in client.items()}
        server_s = local_round - local_handler
        split.update({k: v * server_s / max(sum(server.values()), 1e-12) for k, v in server.items()})
        split[MESSAGING] = sim_round - sim_handler - server_s
        taus[str(tau)] = {
            "split-s": split, "evaluation-s": statistics.median(sim["eval_seconds"][steady]),
            "evaluation-profiled-s": evaluation,
            "simulated-round-s": sim_round, "in-process-round-s": local_round,
            "simulated-handler-s": sim_handler, "in-process-handler-s": local_handler,
            "profiled-round-s": prof["profiled-round-s"], "profile-raw-s": prof["profile"],
            "jitter": {"simulated-round-s": spread(sim["round_seconds"][steady]), "handler-s": spread(handler),
                       "round-minus-handler-s": spread(rest), "in-process-round-s": spread(plain["round-s"][steady])},
            "rounds": {"simulated": sim["round_seconds"], "handler": sim.get("handler_seconds", []),
                       "in-process": plain["round-s"]},
            "cohort-training-alone-s": scale.compute_ceilings(args, scale.THREADS["packed"], ns.clients)["packed-compute-s"],
        }
        print(json.dumps({"tau": tau, "split": {k: round(v * 1e3, 1) for k, v in split.items()},
                          "sim": round(sim_round, 3), "local": round(local_round, 3)}), flush=True)
    meta = dict(stamp, **{"load-at-end": [round(v, 2) for v in os.getloadavg()], "clients-per-round": ns.clients,
                          "rounds": ns.rounds, "interval-s": ns.interval, "seconds": time.perf_counter() - t0})
    from fedavg_relu.core.results import atomic_write_text

    atomic_write_text(Path(ns.out), json.dumps({"meta": meta, "taus": taus}, indent=2) + "\n")
    print(f"wrote {ns.out} in {meta['seconds']:.0f} s (load {meta['load']} -> {meta['load-at-end']})")


if __name__ == "__main__":
    main()
