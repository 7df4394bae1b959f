"""Scale and speed, side by side in one run: stock Flower, our standard path, our packed mode.

Workload (``--width 4096 --clients-per-round 100``): a 2-layer ReLU network
(``standard`` family, depth 1: 64 -> 4096 -> 10, both layers and biases
trained, 307k parameters), cross-entropy, synthetic data with 64 inputs and 10
classes, 32 examples per client, ``--local-steps`` (1) full-batch SGD steps per
round, drift metrics off (stock Flower has none), our per-round checkpoint off
(``checkpoint-every = 0``: stock Flower writes none), all through Flower's Ray
simulation engine (``run_simulation``) on this machine.

Paths (each runs in a child process of its own, so its whole process tree is
measured alone):

``stock-default``
    Flower's ``flwr.serverapp.strategy.FedAvg`` and a plain PyTorch ClientApp
    (quickstart style: the model is built and the data looked up per message)
    with Flower's default backend config (2 CPUs per client: 1 Ray actor here).
``stock-1cpu``
    The same with 1 CPU per client (2 actors).
``standard``
    This project's app, one Flower node per client, 1 CPU per actor (2 actors),
    torch on one thread per actor.
``packed``
    This project's app with ``clients-per-node`` = the number of virtual clients:
    one Flower node trains all 100 clients per message (vectorized,
    :mod:`fedavg_relu.core.cohort`), torch on both cores (``simulate()``'s default for one node).
``packed-2nodes``
    The same split over two nodes of 50 virtual clients, 1 CPU and one torch thread each.
``pfl`` / ``pfl-2proc``
    pfl-research 0.6 (the ``bench`` extra) on the same network, data, tau and learning
    rate (:mod:`pfl_peer`): one process with torch on 2 threads, or 2 ``torchrun``
    worker processes with 1 thread each.

No path evaluates inside its timed rounds: this project's ServerApp evaluates the
global model after each round, and :func:`child_ours` times that evaluation and
takes it out of the round (stock Flower and pfl evaluate nothing there); the NTK
probe is off. ``benchmarks/headline.py`` (``make bench``) runs the headline
subset of these paths at tau = 1 and 5; every results file records its date,
commit and load (:func:`run_stamp`).

Measured (medians over rounds 2..R; round 1 holds the actors' start):
client-updates per second; framework overhead per client-round (round time
minus the same local training in a plain loop with the same parallelism,
divided by clients); achieved training FLOP/s as a share of the matmul peak
measured here with the same total thread count; peak memory of the whole
process tree (sum of PSS, i.e. shared pages split between processes, and sum
of RSS); and, with ``--scan``, round time as the number of virtual clients grows
at fixed clients per round. A profile of one standard-path client-round splits
its time into our client code, serialization and Flower's messaging. Outside
Flower, the same run also times packed mode's cohort training alone and one plain
PyTorch step on all clients' examples stacked (the share of the peak eager PyTorch
reaches on this network here).

Usage::

    python benchmarks/scale.py                  # the full benchmark (~15-25 min on 2 cores)
    python benchmarks/scale.py --quick          # a small smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

INPUT_DIM, NUM_CLASSES, TEST_EXAMPLES = 64, 10, 400


# --- the workload -------------------------------------------------------------------------
def run_config(args: dict, num_partitions: int, per_round: int, path: str) -> dict:
    """Our run config for ``num_partitions`` virtual clients with ``per_round`` training each round."""
    n = args["examples"] * num_partitions + TEST_EXAMPLES
    cfg = {
        "dataset": "synthetic", "synthetic-input-dim": args.get("input_dim", INPUT_DIM), "synthetic-num-classes": NUM_CLASSES,
        "synthetic-num-examples": n, "test-fraction": TEST_EXAMPLES / n, "num-partitions": num_partitions,
        "model-family": "standard", "width": args["width"], "depth": 1, "loss": "cross-entropy",
        "local-steps": args["local_steps"], "batch-size": 0, "learning-rate": 0.1, "lr-scaling": "constant",
        "fraction-train": per_round / num_partitions, "num-server-rounds": args["rounds"],
        "drift-metrics": bool(args.get("drift", False)), "save-model": False, "output-dir": args["tmp"],
        "checkpoint-every": 0,  # stock Flower writes no checkpoint; ours (~14 ms, an fsync) only after the last round
        "ntk-probe-size": 0,  # no NTK probe: neither pfl nor stock Flower measures anything in a round
        "run-name": f"{path}-{num_partitions}-{per_round}",
    }
    if path == "packed":  # one node holding every virtual client, torch on both cores
        cfg["clients-per-node"] = max(2, num_partitions)
    elif path == "packed-2nodes":  # one node per core, one torch thread each
        cfg["clients-per-node"] = max(2, math.ceil(num_partitions / 2))
    return cfg


def train_flops(args: dict) -> float:
    """Training FLOPs of one client-round: forward 2n(dm + mc), weight gradients 2n(dm + mc), input gradient of layer 2: 2nmc."""
    n, d, m, c = args["examples"], args.get("input_dim", INPUT_DIM), args["width"], NUM_CLASSES
    return args["local_steps"] * (4 * n * (d * m + m * c) + 2 * n * m * c)


def plain_model(width: int, input_dim: int = INPUT_DIM):
    import torch

    return torch.nn.Sequential(torch.nn.Linear(input_dim, width), torch.nn.ReLU(), torch.nn.Linear(width, NUM_CLASSES))


def plain_train(model, x, y, steps: int, lr: float = 0.1) -> float:
    """The local training itself: ``steps`` full-batch SGD steps, nothing else."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss = None
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return float(loss)


# --- child: one path, one configuration ------------------------------------------------------
def child_stock(args: dict, num_partitions: int, per_round: int, cpus: int | None) -> list[float]:
    """Stock Flower: FedAvg + a plain PyTorch ClientApp, through run_simulation; returns round seconds."""
    import torch
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from fedavg_relu.core.config import RunConfig
    from fedavg_relu.core.data import load_partition

    cfg = RunConfig.from_mapping(run_config(args, num_partitions, per_round, "stock"))
    width, steps = args["width"], args["local_steps"]
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        data = load_partition(cfg, int(context.node_config["partition-id"]))
        model = plain_model(width, args.get("input_dim", INPUT_DIM))
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        loss = plain_train(model, data.x, data.y, steps)
        metrics = MetricRecord({"train-loss": loss, "num-examples": len(data)})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)

    stamps: list[float] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(0)
        strategy = FedAvg(
            fraction_train=per_round / num_partitions, fraction_evaluate=0.0, min_train_nodes=per_round,
            min_evaluate_nodes=0, min_available_nodes=num_partitions,
        )

        def evaluate_fn(server_round: int, arrays: ArrayRecord):
            stamps.append(time.perf_counter())

        strategy.start(grid=grid, initial_arrays=ArrayRecord(plain_model(width, args.get("input_dim", INPUT_DIM)).state_dict()),
                       num_rounds=args["rounds"], evaluate_fn=evaluate_fn)

    ray_tmp = tempfile.mkdtemp(prefix="frb-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    backend: dict = {"init_args": {"include_dashboard": False, "_temp_dir": ray_tmp}}
    if cpus is not None:
        backend["client_resources"] = {"num_cpus": cpus}
    try:
        run_simulation(server_app=server, client_app=client, num_supernodes=num_partitions, backend_config=backend)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def child_ours(args: dict, num_partitions: int, per_round: int, path: str) -> dict:
    """This project's app (standard or packed) through simulate(); returns round seconds without evaluation.

    The ServerApp evaluates the global model on the test split after every round
    (``fedavg_relu.server_app``'s ``evaluate``); pfl and stock Flower evaluate
    nothing in their timed rounds. Here that call is timed (a wrapper set on the
    ServerApp module in this child process only) and its seconds are taken out of
    each round: ``round_seconds`` holds rounds without evaluation, ``eval_seconds``
    the evaluations. The NTK probe is off (``ntk-probe-size = 0``). In packed mode a
    client mod also times the ClientApp's train handler inside the worker
    (``handler_seconds``, one per round): what the node itself spends.
    """
    import fedavg_relu.server_app as server_app
    from fedavg_relu.core.results import read_metrics
    from fedavg_relu.runtime.simulation import simulate

    evals: list[float] = []
    original = server_app.evaluate

    def timed_evaluate(*a, **k):
        t = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            evals.append(time.perf_counter() - t)

    server_app.evaluate = timed_evaluate
    handler_file = Path(args["tmp"]) / f"handler-{path}-{num_partitions}-{per_round}.txt"
    handler_file.unlink(missing_ok=True)
    mods = [handler_timer(str(handler_file))] if path.startswith("packed") else []
    try:
        run_dir = simulate(run_config(args, num_partitions, per_round, path), num_cpus_per_client=THREADS[path],
                           client_mods=mods)
    finally:
        server_app.evaluate = original
    rows = [r for r in read_metrics(run_dir) if r["round"] >= 1]
    evals = evals[-len(rows):] if rows else []  # call 0 evaluated W^0 (round 0)
    out = {"round_seconds": [float(r["seconds"]) - e for r, e in zip(rows, evals, strict=True)], "eval_seconds": evals}
    if handler_file.exists():
        out["handler_seconds"] = [float(v) for v in handler_file.read_text().split()]
    return out


def handler_timer(path: str):
    """A ClientApp mod that appends the seconds of every ``train.packed`` handler call to ``path``."""

    def mod(message, context, call_next):
        t = time.perf_counter()
        reply = call_next(message, context)
        if message.metadata.message_type == "train.packed":
            with open(path, "a") as fh:
                fh.write(f"{time.perf_counter() - t}\n")
        return reply

    return mod


def child_pfl(args: dict, num_partitions: int, path: str) -> dict:
    """pfl-research on the same workload (:mod:`pfl_peer`): in this process (``pfl``: 2 threads) or as
    ``torchrun`` workers (``pfl-2proc``: 2 processes x 1 thread)."""
    spec = dict(args, clients=num_partitions, threads=THREADS[path])
    out = Path(args["tmp"]) / f"pfl-{path}.json"
    script = str(ROOT / "benchmarks" / "pfl_peer.py")
    if ACTORS[path] == 1:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import pfl_peer

        return pfl_peer.run_spec(spec)
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS[path]))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ACTORS[path]}",
                    script, json.dumps(spec), str(out)], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def child_main(spec: dict) -> None:
    """Run one (path, virtual clients, clients per round) and write its round times."""
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    args, path, num_partitions, per_round = spec["args"], spec["path"], spec["num_partitions"], spec["per_round"]
    t0 = time.perf_counter()
    if path.startswith("stock"):
        result = {"round_seconds": child_stock(args, num_partitions, per_round, None if path == "stock-default" else 1)}
    elif path.startswith("pfl"):
        result = child_pfl(args, num_partitions, path)
    else:
        result = child_ours(args, num_partitions, per_round, path)
    result["total_seconds"] = time.perf_counter() - t0
    Path(spec["out"]).write_text(json.dumps(result))


# --- parent: memory of a process tree ----------------------------------------------------------
def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _memory(pids: list[int]) -> tuple[float, float]:
    """Sum of PSS and of RSS (bytes) over ``pids``."""
    parts = memory_parts(pids)
    return parts["pss"], parts["rss"]


def memory_parts(pids: list[int]) -> dict[str, float]:
    """Sums over ``pids`` (bytes): ``pss``, ``rss``, and PSS split into ``pss-anon`` (process memory),
    ``pss-shmem`` (shared memory, e.g. Ray's object store) and ``pss-file`` (mapped files, e.g. spilled
    models: page cache the kernel can write back and reclaim)."""
    fields = {"Pss:": "pss", "Rss:": "rss", "Pss_Anon:": "pss-anon", "Pss_File:": "pss-file", "Pss_Shmem:": "pss-shmem"}
    out = dict.fromkeys(fields.values(), 0.0)
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                key = fields.get(line.split(maxsplit=1)[0]) if line else None
                if key:
                    out[key] += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            continue
    return out


class PeakSampler:
    """Samples the summed PSS and RSS of ``pid``'s process tree every ``every`` s in a thread; keeps the peaks
    (each of :func:`memory_parts`' sums on its own: the peaks of the parts need not coincide)."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        self.pid, self.every = pid, every
        self.peak = {"pss": 0.0, "rss": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            parts = memory_parts(_tree(self.pid))
            for key, value in parts.items():
                self.peak[key] = max(self.peak.get(key, 0.0), value)
            self._stop.wait(self.every)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_child(spec: dict, timeout: float, attempts: int = 2) -> dict:
    """:func:`run_child_once`, once more if it failed (a Ray start can fail on a busy shared machine)."""
    for _ in range(attempts):
        result = run_child_once(spec, timeout)
        if "error" not in result:
            break
        print(f"  {spec['path']} x {spec['num_partitions']} failed ({result['error'][-200:]!r}); retrying", flush=True)
    return result


def run_child_once(spec: dict, timeout: float) -> dict:
    """Run a child, sampling its process tree's memory every 0.25 s; return its result plus peaks."""
    out = Path(spec["args"]["tmp"]) / f"{spec['path']}-{spec['num_partitions']}-{spec['per_round']}.json"
    spec = dict(spec, out=str(out))
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    sampler = PeakSampler(proc.pid)
    peak = sampler.peak
    try:
        with sampler:
            _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        err = "timeout"
    finally:
        try:
            os.killpg(proc.pid, 9)  # stragglers of the child's session (Ray processes)
        except ProcessLookupError:
            pass
    if proc.returncode != 0 or not out.exists():
        return {"error": (err or "")[-2000:], "peak_pss": peak["pss"], "peak_rss": peak["rss"]}
    result = json.loads(out.read_text())
    steady = result["round_seconds"][1:] or result["round_seconds"]
    result.update(round_s=statistics.median(steady), peak_pss=peak["pss"], peak_rss=peak["rss"])
    return result


# --- parent: references measured in this process ------------------------------------------------------
def matmul_peak(threads: int, n: int = 2048, reps: int = 6, device: str = "cpu") -> float:
    """Best-of-3 FLOP/s of an n x n float32 matmul on ``threads`` threads (on ``device``: a GPU's, timed to its sync)."""
    import torch

    from fedavg_relu.core.device import synchronize

    torch.set_num_threads(threads)
    on = torch.device(device)
    a, b = torch.randn(n, n, device=on), torch.randn(n, n, device=on)
    a @ b
    synchronize(on)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        synchronize(on)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def round_gemms(args: dict, clients: int) -> list[dict]:
    """The matrix products of one packed round (drift off, plain SGD, full batch), as the cohort kernel forms them.

    Mirrors :func:`fedavg_relu.core.cohort.train_cohort_vectorized` for this workload
    (``d -> m -> c``, ``n`` examples per client): the clients are stepped in chunks of
    ``k``; at step 1 the weights are still shared, so the forward products and the
    output layer's input gradient are plain products over the chunk's ``k n`` rows;
    from step 2 on every product is batched over the chunk's clients (``bmm``). The
    weight gradients are batched per client, except at the last step, where only
    their sum over the chunk is needed (one plain product over the stacked examples).
    Each entry: ``name``, ``batch`` (0: a plain product), ``m, k, n`` (an ``m x k``
    times ``k x n`` product), ``count`` (how many per round), ``flops`` (all of them).
    """
    from fedavg_relu.core.stacked import CHUNK_BYTES, chunk_size

    n, d, m, c = args["examples"], args.get("input_dim", INPUT_DIM), args["width"], NUM_CLASSES
    tau = args["local_steps"]
    if tau == 1:  # nothing per client is materialized: chunked by activations
        per_chunk = max(1, CHUNK_BYTES // (4 * (m + c) * n))
    else:
        per_chunk = chunk_size(d * m + m + m * c + c, False)
    sizes = [min(per_chunk, clients - first) for first in range(0, clients, per_chunk)]
    out: dict[tuple, dict] = {}

    def add(name: str, batch: int, mm: int, kk: int, nn: int) -> None:
        key = (name, batch, mm, kk, nn)
        item = out.setdefault(key, {"name": name, "batch": batch, "m": mm, "k": kk, "n": nn, "count": 0})
        item["count"] += 1

    for k in sizes:
        for t in range(1, tau + 1):
            shared, last = t == 1, t == tau
            if shared:
                add("forward, layer 1", 0, k * n, d, m)
                add("forward, layer 2", 0, k * n, m, c)
                add("input gradient, layer 2", 0, k * n, c, m)
            else:
                add("forward, layer 1", k, n, d, m)
                add("forward, layer 2", k, n, m, c)
                add("input gradient, layer 2", k, n, c, m)
            if last:
                add("weight gradient, layer 2 (summed)", 0, c, k * n, m)
                add("weight gradient, layer 1 (summed)", 0, m, k * n, d)
            else:
                add("weight gradient, layer 2", k, c, n, m)
                add("weight gradient, layer 1", k, m, n, d)
    items = list(out.values())
    for item in items:
        item["flops"] = 2.0 * max(item["batch"], 1) * item["m"] * item["k"] * item["n"] * item["count"]
    return items


def gemm_roofline(args: dict, clients: int, threads: int = 2, reps: int = 20) -> dict:
    """This machine's matmul rate at each of the round's GEMM shapes (:func:`round_gemms`) on ``threads`` threads.

    Each product is timed at its own shape (best of ``reps``, after a warm-up), so
    ``roofline-s``, the sum over the round's products, is the time the round's
    matrix products take at the rates this machine reaches at those shapes: a round
    cannot be faster than that (the ReLU, softmax and update passes come on top).
    ``gflops`` is the round's FLOPs over that time.
    """
    import torch

    torch.set_num_threads(threads)
    items = round_gemms(args, clients)
    total_s = flops = 0.0
    for item in items:
        b, mm, kk, nn = item["batch"], item["m"], item["k"], item["n"]
        a = torch.randn(b, mm, kk) if b else torch.randn(mm, kk)
        w = torch.randn(b, kk, nn) if b else torch.randn(kk, nn)
        out = torch.empty(b, mm, nn) if b else torch.empty(mm, nn)
        op = torch.bmm if b else torch.mm
        op(a, w, out=out)
        best = math.inf
        for _ in range(reps):
            t = time.perf_counter()
            op(a, w, out=out)
            best = min(best, time.perf_counter() - t)
        item["seconds"] = best * item["count"]
        item["gflops"] = item["flops"] / item["seconds"] / 1e9
        total_s += item["seconds"]
        flops += item["flops"]
    return {"threads": threads, "products": items, "roofline-s": total_s, "flops": flops, "gflops": flops / total_s / 1e9}


def plain_loop_seconds(args: dict, threads: int, clients: int) -> float:
    """Seconds to train ``clients`` clients in a plain loop (one persistent model, weights reset per client)."""
    import torch

    from fedavg_relu.core.config import RunConfig
    from fedavg_relu.core.data import load_partition

    torch.set_num_threads(threads)
    cfg = RunConfig.from_mapping(run_config(args, clients, clients, "plain"))
    data = [load_partition(cfg, k) for k in range(clients)]
    model = plain_model(args["width"], args.get("input_dim", INPUT_DIM))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        for d in data:
            model.load_state_dict(start)
            plain_train(model, d.x, d.y, args["local_steps"])
        best = min(best, time.perf_counter() - t)
    return best


def compute_ceilings(args: dict, threads: int, clients: int) -> dict:
    """Seconds for the round's training FLOPs outside Flower, on ``threads`` threads.

    ``packed-compute-s``: packed mode's cohort training alone
    (``fedavg_relu.core.packed.train_cohort``, vectorized, no messages, no server);
    ``centralized-step-s``: one plain PyTorch SGD step of one model on all the
    clients' examples stacked (the same FLOPs when every client does one full-batch
    step, with no federated structure at all: what eager PyTorch reaches on this
    network here, the ceiling any framework on top of it works under).
    """
    import torch
    import torch.nn.functional as F

    from fedavg_relu.core.config import RunConfig
    from fedavg_relu.core.packed import train_cohort
    from fedavg_relu.core.task import initial_params
    from fedavg_relu.core.training import LocalSGDSettings

    torch.set_num_threads(threads)
    cfg = RunConfig.from_mapping(run_config(args, clients, clients, "packed"))
    settings = LocalSGDSettings(args["local_steps"], 0.1, 0, loss="cross-entropy")
    w0, ids = initial_params(cfg), list(range(clients))
    best = math.inf
    for _ in range(4):
        t = time.perf_counter()
        train_cohort(cfg, ids, 1, w0, settings, keep_local=False)
        best = min(best, time.perf_counter() - t)
    out = {"packed-compute-s": best}
    from fedavg_relu.core.data import load_partitions

    data = load_partitions(cfg, ids)
    x, y = torch.cat([d.x for d in data]), torch.cat([d.y for d in data])
    model = plain_model(args["width"], args.get("input_dim", INPUT_DIM))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    best = math.inf
    for _ in range(4):
        t = time.perf_counter()
        for _ in range(args["local_steps"]):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        best = min(best, time.perf_counter() - t)
    out["centralized-step-s"] = best
    return out


def profile_standard(args: dict, clients: int = 20) -> dict:
    """Per client-round seconds of the standard path's parts, measured in this process (no Ray).

    ``client-code``: our ClientApp's train handler on a real message (records <-> numpy,
    train_client, reply); ``serialization``: pickling (what Ray does) the train message, the node
    Context, the reply and the Context back; ``plain-training``: the local training alone.
    """
    import pickle

    import torch
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from clients.client_app import build_client_app
    from fedavg_relu.core.config import RunConfig
    from fedavg_relu.core.data import load_partition
    from fedavg_relu.runtime.local_grid import ensure_task_identity
    from fedavg_relu.flower.records import params_to_arrays
    from fedavg_relu.server_app import train_config
    from fedavg_relu.core.task import initial_params

    torch.set_num_threads(1)
    ensure_task_identity()
    mapping = run_config(args, clients, clients, "standard")
    cfg = RunConfig.from_mapping(mapping)
    app = build_client_app()
    arrays = params_to_arrays(initial_params(cfg))
    config = train_config(cfg, cfg.learning_rate)
    config["server-round"] = 1
    contexts = [Context(run_id=1, node_id=k + 1, node_config={"partition-id": k, "num-partitions": clients},
                        state=RecordDict(), run_config=dict(mapping)) for k in range(clients)]
    for k in range(clients):
        load_partition(cfg, k)
    msgs = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(dict(config))}), dst_node_id=k + 1,
                    message_type="train") for k in range(clients)]
    app(msgs[0], contexts[0])  # warm caches (model, data, run config)
    t = time.perf_counter()
    replies = [app(m, c) for m, c in zip(msgs, contexts, strict=True)]
    client_code = (time.perf_counter() - t) / clients
    t = time.perf_counter()
    for m, r, c in zip(msgs, replies, contexts, strict=True):
        for one in (m, r, c, c):  # Ray pickles the message and the node context to the actor, the reply and context back
            pickle.loads(pickle.dumps(one, protocol=5))
    serialization = (time.perf_counter() - t) / clients
    plain = plain_loop_seconds(args, 1, clients) / clients
    return {"client-code-s": client_code, "serialization-s": serialization, "plain-training-s": plain}


# --- parent: the report ----------------------------------------------------------------------------
PATHS = ("stock-default", "stock-1cpu", "standard", "pfl", "pfl-2proc", "packed-2nodes", "packed")
ACTORS = {"stock-default": 1, "stock-1cpu": 2, "standard": 2, "pfl": 1, "pfl-2proc": 2, "packed-2nodes": 2, "packed": 1}
THREADS = {"stock-default": 2, "stock-1cpu": 1, "standard": 1, "pfl": 2, "pfl-2proc": 1, "packed-2nodes": 1, "packed": 2}
#: What the paths are, in words (the results name each one's layout).
PATH_LABELS = {
    "stock-default": "stock Flower FedAvg, default backend (1 actor x 2 threads)",
    "stock-1cpu": "stock Flower FedAvg, 1 CPU per client (2 actors x 1 thread)",
    "standard": "this project, one node per client (2 actors x 1 thread)",
    "pfl": "pfl-research 0.6, torch backend, 1 process x 2 threads",
    "pfl-2proc": "pfl-research 0.6, torch backend, 2 worker processes x 1 thread (torchrun)",
    "packed-2nodes": "this project, packed: 2 nodes x 1 thread",
    "packed": "this project, packed: 1 node x 2 threads",
}

#: The files of the hot path: cohort training, the packed strategy and client, the messaging seam, the records
#: codec, reply screening and sums, and the standard ClientApp.
#: ``tests/test_bench_regression.py`` fails when one of them changed after the commit a results file records.
HOT_PATH_FILES = (
    "fedavg_relu/core/stacked.py",
    "fedavg_relu/core/cohort.py",
    "fedavg_relu/core/packed.py",
    "strategies/recorder.py",
    "strategies/cohorts.py",
    "strategies/exchange.py",
    "strategies/screening.py",
    "clients/packed_app.py",
    "clients/node.py",
    "fedavg_relu/flower/seam.py",
    "fedavg_relu/flower/streaming.py",
    "fedavg_relu/flower/records.py",
    "fedavg_relu/flower/validation.py",
    "fedavg_relu/core/aggregation.py",
    "strategies/replies.py",
    "clients/client_app.py",
)


def git(*argv: str, root: Path = ROOT) -> str | None:
    """``git argv`` in ``root`` (default: this repository); its stripped output, None if git fails or is absent."""
    try:
        out = subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_stamp() -> dict:
    """When and on what code a run ran: UTC date, ``git commit`` (HEAD), whether the hot path had uncommitted
    changes, the last commit that touched the hot path, and the machine's load averages (1, 5, 15 min)."""
    dirty = git("status", "--porcelain", "--", *HOT_PATH_FILES)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "git commit": git("rev-parse", "HEAD"),
        "hot-path-commit": git("log", "-1", "--format=%H", "--", *HOT_PATH_FILES),
        "hot-path-dirty": bool(dirty) if dirty is not None else None,
        "load": [round(v, 2) for v in os.getloadavg()],
    }


def hot_path_changes(recorded: str, files=HOT_PATH_FILES, root: Path = ROOT) -> list[str]:
    """The hot-path files whose last commit is not in ``recorded``'s history and whose content differs from it.

    ``git log -1 --format=%H -- files`` is the last commit that touched the hot
    path; when ``recorded`` (the commit a results file was measured at) contains it,
    nothing changed since: ``[]``. Otherwise the files that differ between the two
    commits (a change made and undone again is no change). Raises ``LookupError``
    when ``root`` is no git checkout or does not hold ``recorded``.
    """
    if git("rev-parse", "--git-dir", root=root) is None:
        raise LookupError(f"{root} is not a git checkout")
    if git("cat-file", "-e", f"{recorded}^{{commit}}", root=root) is None:
        raise LookupError(f"commit {recorded} is not in this clone")
    last = git("log", "-1", "--format=%H", "--", *files, root=root)
    if not last or git("merge-base", "--is-ancestor", last, recorded, root=root) is not None:
        return []
    changed = git("diff", "--name-only", recorded, last, "--", *files, root=root)
    return sorted(changed.split()) if changed else []


def pfl_installed() -> bool:
    """True when pfl-research can be imported (the ``bench`` extra)."""
    import importlib.util

    return importlib.util.find_spec("pfl") is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--clients-per-round", type=int, default=100)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--input-dim", type=int, default=INPUT_DIM, help="inputs of the network (default 64)")
    parser.add_argument("--local-steps", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--drift", action="store_true",
                        help="drift metrics on in this project's paths (stock Flower has none): what they cost at scale")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--scan", default="10,100,1000,10000", help="virtual clients for the scan ('' = none)")
    parser.add_argument("--scan-per-round", type=int, default=10)
    parser.add_argument("--scan-paths", default="packed,standard,stock-1cpu")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--quick", action="store_true", help="width 512, 20 clients per round, scan 10,100")
    parser.add_argument("--merge", action="store_true",
                        help="merge into the existing scale.json of --out (rows of the paths run here replace old ones)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        child_main(json.loads(ns.child))
        return
    if ns.quick:
        ns.width, ns.clients_per_round, ns.rounds = 512, 20, 3
        ns.scan = "10,100" if ns.scan == parser.get_default("scan") else ns.scan
    out_dir = Path(ns.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = {"width": ns.width, "input_dim": ns.input_dim, "examples": ns.examples, "local_steps": ns.local_steps,
            "rounds": ns.rounds,
            "drift": ns.drift, "tmp": tempfile.mkdtemp(prefix="scale-bench-")}
    import torch

    t_start, stamp = time.perf_counter(), run_stamp()
    peaks = {t: matmul_peak(t) for t in (1, 2)}
    plain = {t: plain_loop_seconds(args, t, ns.clients_per_round) for t in (1, 2)}
    flops = train_flops(args) * ns.clients_per_round
    ceilings = compute_ceilings(args, 2, ns.clients_per_round)
    ceilings.update({key[:-2] + "-fraction-of-peak": flops / value / peaks[2] for key, value in list(ceilings.items())})
    print("outside Flower, 2 threads:", json.dumps(ceilings), flush=True)
    print(f"matmul peak: 1 thread {peaks[1] / 1e9:.1f} GFLOP/s, 2 threads {peaks[2] / 1e9:.1f} GFLOP/s; "
          f"plain loop of {ns.clients_per_round} clients: {plain[1]:.3f}s (1 thread), {plain[2]:.3f}s (2 threads)", flush=True)
    rows = []
    for path in [p for p in ns.paths.split(",") if p]:
        res = run_child({"args": args, "path": path, "num_partitions": ns.clients_per_round,
                         "per_round": ns.clients_per_round}, ns.timeout)
        row = {"path": path, "actors": ACTORS[path], "threads-per-actor": THREADS[path],
               "peak-pss-gib": res["peak_pss"] / 2**30, "peak-rss-gib": res["peak_rss"] / 2**30}
        if "error" in res:
            row["error"] = res["error"][-300:]
        else:
            t = res["round_s"]
            plain_same = plain[THREADS[path]] / ACTORS[path]  # the same training, same parallelism
            total_threads = ACTORS[path] * THREADS[path]
            row.update({
                "round-s": t, "client-updates-per-s": ns.clients_per_round / t,
                "overhead-ms-per-client-round": 1e3 * (t - plain_same) / ns.clients_per_round,
                "flops-fraction-of-peak": flops / t / peaks[total_threads],
                "first-round-s": res["round_seconds"][0], "total-s": res["total_seconds"],
            })
        rows.append(row)
        print(json.dumps(row), flush=True)
    stock = next((r for r in rows if r["path"] == "stock-default" and "round-s" in r), None)
    for row in rows:
        if stock and "round-s" in row:
            row["speedup-vs-stock-default"] = row["client-updates-per-s"] / stock["client-updates-per-s"]
    profile = profile_standard(args) if any(r["path"] == "standard" for r in rows) else {}
    std = next((r for r in rows if r["path"] == "standard" and "round-s" in r), None)
    if std:
        per_client_actor_s = std["round-s"] * ACTORS["standard"] / ns.clients_per_round
        profile["actor-seconds-per-client-round"] = per_client_actor_s
        profile["flower-messaging-s"] = per_client_actor_s - profile["client-code-s"] - profile["serialization-s"]
    print("profile (standard path, s per client-round):", json.dumps(profile), flush=True)
    scan = []
    for path in [p for p in ns.scan_paths.split(",") if p] if ns.scan else []:
        for k in [int(v) for v in ns.scan.split(",")]:
            res = run_child({"args": dict(args, rounds=max(ns.rounds, 8)), "path": path, "num_partitions": k,
                             "per_round": min(ns.scan_per_round, k)}, ns.timeout)
            item = {"path": path, "virtual-clients": k, "clients-per-round": min(ns.scan_per_round, k),
                    "peak-pss-gib": res["peak_pss"] / 2**30, "peak-rss-gib": res["peak_rss"] / 2**30}
            item.update({"round-s": res["round_s"], "total-s": res["total_seconds"]} if "error" not in res
                        else {"error": res["error"][-300:]})
            scan.append(item)
            print(json.dumps(item), flush=True)
    rows_here, scan_here = list(rows), list(scan)
    merged_from = None
    if ns.merge and (out_dir / "scale.json").exists():
        old = json.loads((out_dir / "scale.json").read_text())
        merged_from = old["meta"]
        new_paths = {r["path"] for r in rows}
        rows = [r for r in old["paths"] if r["path"] not in new_paths] + rows
        rows.sort(key=lambda r: PATHS.index(r["path"]) if r["path"] in PATHS else 99)
        done = {(s["path"], s["virtual-clients"]) for s in scan}
        scan = [s for s in old["scan"] if (s["path"], s["virtual-clients"]) not in done] + scan
        profile = profile if std else old.get("profile", profile)
    add_growth(scan)
    meta = {
        **stamp, "load-at-end": [round(v, 2) for v in os.getloadavg()],
        "machine": f"{os.cpu_count()} CPUs", "torch": torch.__version__, "width": ns.width,
        "clients-per-round": ns.clients_per_round, "examples-per-client": ns.examples, "local-steps": ns.local_steps,
        "input-dim": ns.input_dim,
        "drift-metrics": ns.drift,
        "rounds": ns.rounds, "matmul-peak-gflops": {str(k): v / 1e9 for k, v in peaks.items()},
        "plain-loop-s": {str(k): v for k, v in plain.items()}, "train-flops-per-client-round": train_flops(args),
        "outside-flower-2-threads": ceilings,
        "seconds": time.perf_counter() - t_start,
    }
    if merged_from is not None:  # the table's header stays the first run's; say what was rerun and when
        rerun = {"at": time.strftime("%Y-%m-%d %H:%M:%S"), "git commit": stamp["git commit"], "paths": sorted({r["path"] for r in rows_here}),
                 "scan": sorted({f"{s['path']} x {s['virtual-clients']}" for s in scan_here}),
                 "matmul-peak-gflops": meta["matmul-peak-gflops"], "seconds": meta["seconds"]}
        meta = dict(merged_from, reruns=[*merged_from.get("reruns", []), rerun])
    (out_dir / "scale.json").write_text(json.dumps({"meta": meta, "paths": rows, "profile": profile, "scan": scan}, indent=2) + "\n")
    write_tables(out_dir, rows, scan, meta)
    plot(out_dir, rows, scan)
    shutil.rmtree(args["tmp"], ignore_errors=True)
    print(f"wrote {out_dir}/scale.json, scale.csv, scale_scan.csv, scale.md, scale.png in {meta['seconds']:.0f}s")


def add_growth(scan: list[dict]) -> None:
    """``round-time-vs-smallest`` of every scan entry: its round time / its path's smallest federation's."""
    for path in {s["path"] for s in scan}:
        items = [s for s in scan if s["path"] == path and "round-s" in s]
        if items:
            base = min(items, key=lambda s: s["virtual-clients"])["round-s"]
            for s in items:
                s["round-time-vs-smallest"] = s["round-s"] / base


def write_tables(out_dir: Path, rows: list[dict], scan: list[dict], meta: dict | None = None) -> None:
    import csv

    for name, items in (("scale.csv", rows), ("scale_scan.csv", scan)):
        keys = sorted({k for r in items for k in r})
        with open(out_dir / name, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(items)
    lines = []
    if meta:
        c = meta.get("outside-flower-2-threads", {})
        drift_text = "on (this project's paths)" if meta.get("drift-metrics") else "off"
        lines += [
            f"Network {meta.get('input-dim', INPUT_DIM)} -> {meta['width']} -> {NUM_CLASSES}, "
            f"{meta['clients-per-round']} clients per round, {meta['examples-per-client']} examples "
            f"and {meta['local-steps']} full-batch step(s) per client; drift metrics {drift_text}; "
            f"{meta['machine']}, torch {meta['torch']}; "
            f"matmul peak {meta['matmul-peak-gflops']['1']:.0f} GFLOP/s (1 thread), {meta['matmul-peak-gflops']['2']:.0f} (2 threads).",
            "",
        ]
        for rerun in meta.get("reruns", []):
            what = ", ".join(rerun["paths"] + rerun["scan"])
            lines += [f"Rerun alone and merged at {rerun['at']}: {what} (matmul peak then "
                      f"{rerun['matmul-peak-gflops']['1']:.0f} / {rerun['matmul-peak-gflops']['2']:.0f} GFLOP/s).", ""]
        if c:
            lines += [
                f"Outside Flower, 2 threads: packed cohort training alone {1e3 * c['packed-compute-s']:.1f} ms per round "
                f"({c['packed-compute-fraction-of-peak']:.2f} of peak); one plain PyTorch step of one model on all "
                f"clients' examples stacked {1e3 * c['centralized-step-s']:.1f} ms ({c['centralized-step-fraction-of-peak']:.2f} of peak).",
                "",
            ]
    lines += ["| path | actors x threads | round s | client-updates/s | x stock default | overhead ms/client-round | FLOP/s / peak | peak PSS GiB (RSS) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "round-s" not in r:
            lines.append(f"| {r['path']} | failed: {r.get('error', '')[:60]} | | | | | | |")
            continue
        lines.append(
            f"| {r['path']} | {r['actors']} x {r['threads-per-actor']} | {r['round-s']:.3f} | {r['client-updates-per-s']:.0f} | "
            f"{r.get('speedup-vs-stock-default', float('nan')):.1f} | {r['overhead-ms-per-client-round']:.2f} | "
            f"{r['flops-fraction-of-peak']:.2f} | {r['peak-pss-gib']:.2f} ({r['peak-rss-gib']:.2f}) |"
        )
    if scan:
        lines += ["", "| path | virtual clients | per round | round s | vs smallest | peak PSS GiB (RSS) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for s in scan:
            if "round-s" in s:
                lines.append(f"| {s['path']} | {s['virtual-clients']} | {s['clients-per-round']} | {s['round-s']:.3f} | "
                             f"{s.get('round-time-vs-smallest', float('nan')):.2f} | {s['peak-pss-gib']:.2f} ({s['peak-rss-gib']:.2f}) |")
            else:
                lines.append(f"| {s['path']} | {s['virtual-clients']} | {s['clients-per-round']} | failed | | {s['peak-pss-gib']:.2f} |")
    (out_dir / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(out_dir: Path, rows: list[dict], scan: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ok = [r for r in rows if "round-s" in r]
    ax1.bar([r["path"] for r in ok], [r["client-updates-per-s"] for r in ok], color="tab:blue")
    ax1.set_yscale("log")
    ax1.set_ylabel("client-updates per second")
    ax1.set_title("throughput (one run, same machine)")
    for path in sorted({s["path"] for s in scan}):
        items = sorted((s for s in scan if s["path"] == path and "round-s" in s), key=lambda s: s["virtual-clients"])
        if items:
            ax2.plot([s["virtual-clients"] for s in items], [s["round-s"] for s in items], marker="o", label=path)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("virtual clients (fixed clients per round)")
    ax2.set_ylabel("round seconds")
    ax2.set_title("round time vs federation size")
    if scan:
        ax2.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "scale.png", dpi=120)


if __name__ == "__main__":
    main()
