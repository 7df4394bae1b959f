#!/usr/bin/env python3
"""Per-round latency of a SuperNode in a real deployment, and what one client needs on a device.

Parts, each printed as a Markdown table (the README's "Deployment" section quotes them):

``size``     the model's parameter count and wire size at the run config, and the peak
             memory (RSS) of one client's training step and drift measurement, each in a
             fresh Python process so that earlier peaks do not hide it.
``stop``     seconds from SIGTERM to exit of a ClientApp worker (idle with torch loaded, and
             1 s into a long train task) and of a SuperNode, in a 1-node deployment.
``proxy``    the cost of the hardened deployment's nginx (:mod:`fedavg_relu.runtime.proxy`), all on
             loopback: request latency of a Fleet call to the SuperLink directly and through nginx
             (kept-alive connection, and a new TLS connection per request), then the ``latency``
             measurement (process isolation) without and with nginx in front. Date and commit go
             into the results, which docs/deployment.md renders (``render:deploy-proxy``).
``latency``  a TLS + node-auth deployment on loopback (:class:`fedavg_relu.runtime.deploy.Deployment`)
             with 2 SuperNodes, run once with Flower's default isolation (a new
             ``flwr-clientapp`` process per message) and once with ``--isolation process`` and
             a long-running :mod:`fedavg_relu.runtime.clientapp_worker`. Per round: the ServerApp's
             wall time (``seconds`` in metrics.jsonl, the drift exchange included) and each
             node's own time per message, from receiving it to having sent the reply
             (timestamped SuperNode logs).

Usage::

    python benchmarks/deploy_latency.py                    # both parts, default config (width 2048, digits)
    python benchmarks/deploy_latency.py size -c "width=4096"
    python benchmarks/deploy_latency.py latency --rounds 5
    python benchmarks/deploy_latency.py stop
    python benchmarks/deploy_latency.py proxy -c "dataset='synthetic' width=64" --rounds 6 \
        --json benchmarks/results/deploy/proxy.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from fedavg_relu.core.config import RunConfig  # noqa: E402
from fedavg_relu.runtime.flower_run import toml_value  # noqa: E402


def parse_overrides(text: str) -> dict:
    """``key=value ...`` as in ``--run-config`` (TOML values)."""
    import tomllib

    return tomllib.loads("\n".join(text.split())) if text.strip() else {}


# --- size and memory ---------------------------------------------------------------
_PROBE = r"""
import json, resource, sys, numpy as np
from fedavg_relu.core.config import RunConfig
from fedavg_relu.core.task import client_data, initial_params, measure_drift, train_client, working_model
from fedavg_relu.core.training import LocalSGDSettings
from fedavg_relu.core.data import dataset_shape
cfg = RunConfig.from_mapping(json.loads(sys.argv[1]))
stage = sys.argv[2]
def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
data = client_data(cfg, {"partition-id": 0})
model = working_model(cfg)
w0 = initial_params(cfg)
input_dim, _ = dataset_shape(cfg)
settings = LocalSGDSettings(cfg.local_steps, cfg.effective_learning_rate(input_dim), cfg.batch_size,
                            cfg.momentum, cfg.weight_decay, cfg.loss)
out = {"examples": len(data), "ready": peak_mib()}
if stage in ("train", "drift"):
    outcome = train_client(cfg, data, 0, 1, w0, settings)
    out["train"] = peak_mib()
if stage == "drift":
    measure_drift(cfg, data, outcome.local_params, w0)
    out["drift"] = peak_mib()
print(json.dumps(out))
"""


def measure_size(overrides: dict) -> dict:
    """Parameter counts, wire size and peak RSS (MiB) after set-up, one round of training, and drift."""
    import torch

    from fedavg_relu.core.data import dataset_shape
    from fedavg_relu.core.models import build_model, num_trainable

    cfg = RunConfig.from_mapping(overrides)
    input_dim, num_classes = dataset_shape(cfg)
    model = build_model(cfg, input_dim, num_classes)
    total = sum(p.numel() for p in model.parameters())
    trainable = num_trainable(model)
    result = {
        "config": f"{cfg.model_family}, m={cfg.width}, L={cfg.depth}, d={input_dim}, c={num_classes}, "
                  f"tau={cfg.local_steps}, batch={cfg.batch_size}, dataset={cfg.dataset}/{cfg.num_partitions}",
        "parameters": total, "trainable": trainable,
        "wire-mib": trainable * 4 / 2**20,  # float32 ArrayRecord each way (+ the gradient upload for dissimilarity)
        "torch": torch.__version__,
    }
    base = subprocess.run(
        [sys.executable, "-c", "import resource, torch; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"],
        capture_output=True, text=True, check=True,
    )
    result["rss-torch"] = float(base.stdout.strip().splitlines()[-1])
    peaks = {}
    for stage in ("ready", "train", "drift"):
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, json.dumps(overrides), stage],
            capture_output=True, text=True, cwd=ROOT, check=True,
        )
        peaks[stage] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["examples"] = peaks["ready"]["examples"]
    result["rss-ready"] = peaks["ready"]["ready"]
    result["rss-train"] = peaks["train"]["train"]
    result["rss-drift"] = peaks["drift"]["drift"]
    return result


def print_size(r: dict) -> None:
    print(f"\n### Size and memory ({r['config']}; torch {r['torch']}, CPU)\n")
    print("| quantity | value |\n| --- | --- |")
    print(f"| parameters (all / trained) | {r['parameters']:,} / {r['trainable']:,} |")
    print(f"| model on the wire (float32, each way) | {r['wire-mib']:.1f} MiB |")
    print(f"| peak RSS: Python + `import torch` only | {r['rss-torch']:.0f} MiB |")
    print(f"| peak RSS: Python + torch + data + model, before training ({r['examples']} examples) | {r['rss-ready']:.0f} MiB |")
    print(f"| peak RSS: after one round of local SGD | {r['rss-train']:.0f} MiB (+{r['rss-train'] - r['rss-ready']:.0f}) |")
    print(f"| peak RSS: after the drift measurement | {r['rss-drift']:.0f} MiB (+{r['rss-drift'] - r['rss-ready']:.0f}) |")


# --- latency ------------------------------------------------------------------------
_LINE = re.compile(r"^(\d+\.\d+) .*?(Receiving|Sending): (\S+) message")
_SENT = re.compile(r"^(\d+\.\d+) .*Sent successfully")


def node_message_times(log: str) -> list[tuple[str, float]]:
    """(message type, seconds from 'Receiving' to 'Sent successfully') for each message of a node log."""
    out, pending = [], {}
    sending = None
    for line in log.splitlines():
        if m := _LINE.match(line):
            t, what, kind = float(m.group(1)), m.group(2), m.group(3)
            if what == "Receiving":
                pending[kind] = t
            else:
                sending = kind
        elif (m := _SENT.match(line)) and sending is not None:
            if sending in pending:
                out.append((sending, float(m.group(1)) - pending.pop(sending)))
            sending = None
    return out


@contextmanager
def _superlink(certs: Path, home: Path, proxy: bool):
    """(Deployment, the address SuperNodes dial): the SuperLink alone, or behind nginx (both on loopback)."""
    from fedavg_relu.runtime.deploy import Deployment  # noqa: PLC0415
    from fedavg_relu.runtime.flower_run import free_port  # noqa: PLC0415
    from fedavg_relu.runtime.proxy import HardenedSuperLink  # noqa: PLC0415

    if proxy:
        with HardenedSuperLink(certs, home, "127.0.0.1", public_port=free_port(), port=free_port()) as hardened:
            yield hardened.deployment, hardened.public_address
    else:
        with Deployment(certs, home=home) as dep:
            yield dep, dep.address


def measure_latency(overrides: dict, isolation: str, rounds: int, certs: Path, work: Path, proxy: bool = False) -> dict:
    """One deployment run of ``rounds`` rounds with 2 SuperNodes in ``isolation`` mode (through nginx if ``proxy``)."""
    from fedavg_relu.core.results import read_metrics

    name = f"{isolation}-proxy" if proxy else isolation
    run = {**overrides, "num-server-rounds": rounds, "num-partitions": 2,
           "output-dir": str(work / "runs"), "run-name": name, "round-timeout": 600.0}
    t0 = time.perf_counter()
    with _superlink(certs, work / f"home-{name}", proxy) as (dep, address):
        for i in (1, 2):
            dep.register(certs / f"supernode-{i}.pub")
        nodes = [dep.start_supernode(certs / f"supernode-{i}", {"partition-id": i - 1}, isolation=isolation,
                                     timestamps=True, superlink_address=address) for i in (1, 2)]
        dep.wait_online(2, timeout=120)
        ready = time.perf_counter() - t0
        t1 = time.perf_counter()
        result = dep.run(ROOT, run, timeout=3600)
        total = time.perf_counter() - t1
        if result.status != "finished:completed":
            raise RuntimeError(f"{isolation}: run ended {result.status}:\n{result.output[-3000:]}")
        messages = [node_message_times(n.log()) for n in nodes]
        worker_peak = [_peak_rss_mib(n.worker.pid) for n in nodes if n.worker is not None]
    rows = read_metrics(work / "runs" / name)[1:]
    unmeasured = [r["round"] for r in rows if r.get("clients-measured") != 2]
    if unmeasured:  # the drift state must survive between a round's two exchanges in either mode
        raise RuntimeError(f"{isolation}: rounds {unmeasured} lack drift measurements of both nodes")
    return {
        "isolation": isolation, "proxy": proxy, "rounds": rows, "worker-peak-mib": worker_peak, "messages": messages, "run-seconds": total, "setup-seconds": ready,
    }


def _peak_rss_mib(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def summarize_latency(r: dict) -> dict:
    """Medians over rounds 2.. (round 1 includes the first import of torch and the app)."""
    later = r["rounds"][1:] or r["rounds"]
    node_round = []
    for msgs in r["messages"]:  # per node: train + drift time of each round
        trains = [s for k, s in msgs if k == "train"]
        drifts = [s for k, s in msgs if k == "query.drift"]
        node_round += [a + b for a, b in list(zip(trains, drifts))[1:]]
    first = [sum(s for _, s in msgs[:2]) for msgs in r["messages"] if len(msgs) >= 2]
    return {
        "round-1": r["rounds"][0]["seconds"],
        "round": statistics.median(x["seconds"] for x in later),
        "drift": statistics.median(x["drift-seconds"] for x in later),
        "node-round": statistics.median(node_round) if node_round else float("nan"),
        "node-first": statistics.median(first) if first else float("nan"),
        "train-msg": statistics.median(s for msgs in r["messages"] for k, s in msgs[2:] if k == "train"),
        "drift-msg": statistics.median(s for msgs in r["messages"] for k, s in msgs[2:] if k == "query.drift"),
        "run": r["run-seconds"],
    }


def print_latency(results: list[dict], config: str) -> None:
    print(f"\n### Per-round latency, 2 SuperNodes on one 2-core machine ({config})\n")
    print("| isolation | round 1 s | later rounds s (median) | of which drift exchange s | node time per round s "
          "(train + drift msg) | per train / drift msg s | whole `flwr run` s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        s = summarize_latency(r)
        label = ("default (`subprocess`: a new flwr-clientapp per message)" if r["isolation"] == "subprocess"
                 else "`--isolation process` + long-running worker")
        print(f"| {label} | {s['round-1']:.1f} | {s['round']:.1f} | {s['drift']:.1f} | {s['node-round']:.2f} "
              f"(round 1: {s['node-first']:.2f}) | {s['train-msg']:.2f} / {s['drift-msg']:.2f} | {s['run']:.0f} |")
    for r in results:
        if r.get("worker-peak-mib"):
            print(f"\nPeak RSS of the long-running ClientApp workers after the run: "
                  f"{', '.join(f'{m:.0f}' for m in r['worker-peak-mib'])} MiB")


# --- proxy: the cost of nginx in front of the SuperLink -----------------------------------
def _request_ms(host: str, port: int, cafile: Path, count: int, reuse: bool) -> list[float]:
    """Milliseconds of ``count`` POSTs of an unsigned Fleet ``get-run`` (the SuperLink answers 401 after its
    middleware ran), over one kept-alive TLS connection (``reuse``) or a new one each time (TLS handshake included)."""
    import http.client  # noqa: PLC0415
    import ssl  # noqa: PLC0415

    context = ssl.create_default_context(cafile=str(cafile))
    conn, out = None, []
    for _ in range(count):
        t0 = time.perf_counter()
        if conn is None:
            conn = http.client.HTTPSConnection(host, port, context=context, timeout=30)
        conn.request("POST", "/v1/fleet/get-run", body=b"", headers={"Content-Type": "application/protobuf"})
        response = conn.getresponse()
        response.read()
        out.append((time.perf_counter() - t0) * 1000)
        if response.status != 401:
            raise RuntimeError(f"{host}:{port}: get-run without a node signature answered {response.status}, not 401")
        if not reuse:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()
    return out


def measure_requests(certs: Path, home: Path, count: int) -> dict:
    """Request latency to the SuperLink directly and through nginx, interleaved in blocks of 20."""
    from fedavg_relu.runtime.flower_run import free_port  # noqa: PLC0415
    from fedavg_relu.runtime.proxy import HardenedSuperLink  # noqa: PLC0415

    samples: dict = {f"{route}-{mode}": [] for route in ("direct", "proxy") for mode in ("keep-alive", "new-connection")}
    with HardenedSuperLink(certs, home, "127.0.0.1", public_port=free_port(), port=free_port()) as hardened:
        targets = {"direct": hardened.deployment.port, "proxy": hardened.proxy.listen_port}
        for route, port in targets.items():  # warm-up (imports, first handshakes, nginx's upstream keepalive)
            _request_ms("127.0.0.1", port, certs / "ca.crt", 20, reuse=True)
        for _ in range(max(1, count // 20)):
            for route, port in targets.items():
                for mode, reuse in (("keep-alive", True), ("new-connection", False)):
                    samples[f"{route}-{mode}"] += _request_ms("127.0.0.1", port, certs / "ca.crt", 20, reuse)
    return samples


def _git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    return (proc.stdout.strip() or "unknown") + ("+uncommitted" if dirty else "")


def measure_proxy(overrides: dict, rounds: int, requests: int, certs: Path, work: Path) -> dict:
    """Request latency and round latency (2 SuperNodes, process isolation) without and with the proxy."""
    import datetime as dt  # noqa: PLC0415
    import os  # noqa: PLC0415

    from fedavg_relu.runtime.proxy import nginx_binary  # noqa: PLC0415

    nginx = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True).stderr.strip()
    out = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"), "commit": _git_commit(),
        "cpus": os.cpu_count(), "nginx": nginx.split("/", 1)[-1], "rounds": rounds,
        "requests": measure_requests(certs, work / "home-requests", requests),
        "runs": [measure_latency(overrides, "process", rounds, certs, work, proxy=proxy) for proxy in (False, True)],
        "loadavg": list(os.getloadavg()),
    }
    return out


def summarize_proxy(r: dict) -> dict:
    """Medians: request ms per route and mode; per run the summary of :func:`summarize_latency`."""
    requests = {key: {"median": statistics.median(v), "p90": statistics.quantiles(v, n=10)[-1], "n": len(v)}
                for key, v in r["requests"].items()}
    runs = {("proxy" if run["proxy"] else "direct"): summarize_latency(run) for run in r["runs"]}
    return {"requests": requests, "runs": runs}


def print_proxy(r: dict, config: str) -> None:
    s = summarize_proxy(r)
    print(f"\n### The proxy's cost ({config}; {r['date']}, commit {r['commit']}, {r['cpus']} CPUs, nginx {r['nginx']})\n")
    print("| request (unsigned Fleet get-run, answered 401 by the SuperLink) | direct ms (median / p90) "
          "| through nginx ms | ratio |\n| --- | --- | --- | --- |")
    for mode in ("keep-alive", "new-connection"):
        d, p = s["requests"][f"direct-{mode}"], s["requests"][f"proxy-{mode}"]
        print(f"| {mode} | {d['median']:.2f} / {d['p90']:.2f} | {p['median']:.2f} / {p['p90']:.2f} | "
              f"{p['median'] / d['median']:.2f}x |")
    print("\n| SuperLink | round 1 s | later rounds s (median) | node time per round s | per train / drift msg s |"
          "\n| --- | --- | --- | --- | --- |")
    for name, x in s["runs"].items():
        print(f"| {name} | {x['round-1']:.1f} | {x['round']:.2f} | {x['node-round']:.3f} | "
              f"{x['train-msg']:.3f} / {x['drift-msg']:.3f} |")


# --- stop ---------------------------------------------------------------------------
def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout:.0f}s")
        time.sleep(0.05)


def _sigterm_seconds(proc: subprocess.Popen) -> tuple[float, int]:
    """SIGTERM ``proc``; (seconds until it exited, its exit code)."""
    import signal  # noqa: PLC0415

    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    return time.monotonic() - t0, code


def measure_stop(certs: Path, work: Path) -> dict:
    """SIGTERM -> exit of an idle worker, a busy worker (train task) and a SuperNode."""
    import threading  # noqa: PLC0415

    from fedavg_relu.runtime.deploy import Deployment, stop_groups  # noqa: PLC0415

    out: dict = {}
    with Deployment(certs, home=work / "home-stop") as dep:
        dep.register(certs / "supernode-1.pub")
        node = dep.start_supernode(certs / "supernode-1", {"partition-id": 0})
        dep.wait_online(1, timeout=120)
        _wait_for(lambda: "serving the SuperNode Runtime API" in node.worker_log(), 180, "idle worker")
        out["worker-idle"] = _sigterm_seconds(node.worker)
        dep.start_worker(node)
        _wait_for(lambda: node.worker_log().count("serving the SuperNode Runtime API") >= 2, 180, "restarted worker")

        def terminate_mid_task() -> None:
            _wait_for(lambda: "ClientApp worker: loaded" in node.worker_log(), 600, "train task")
            time.sleep(1.0)
            out["worker-busy"] = _sigterm_seconds(node.worker)

        watcher = threading.Thread(target=terminate_mid_task, daemon=True)
        watcher.start()
        t0 = time.monotonic()
        dep.run(ROOT, {"num-server-rounds": 1, "num-partitions": 1, "dataset": "synthetic", "width": 256,
                       "local-steps": 1_000_000, "round-timeout": 600.0, "output-dir": str(work / "runs"),
                       "run-name": "stop"}, timeout=900)
        watcher.join(timeout=60)
        out["run-after-busy-sigterm"] = time.monotonic() - t0
        node_seconds = stop_groups([node.process], term_wait=30.0)
        out["supernode"] = (node_seconds, node.process.returncode)
    return out


def print_stop(r: dict) -> None:
    print("\n### SIGTERM to exit (1-node deployment on loopback)\n")
    print("| process, state | seconds | exit code |\n| --- | --- | --- |")
    labels = {"worker-idle": "ClientApp worker, idle (torch loaded)",
              "worker-busy": "ClientApp worker, 1 s into a train task (abandoned)",
              "supernode": "SuperNode (Flower's handler: deregisters, stops its Runtime API)"}
    for key, label in labels.items():
        if key in r:
            seconds, code = r[key]
            print(f"| {label} | {seconds:.2f} | {code} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", nargs="?", choices=["size", "latency", "stop", "proxy", "all"], default="all")
    parser.add_argument("--requests", type=int, default=400, help="requests per route and mode in `proxy` (default 400)")
    parser.add_argument("-c", "--run-config", default="", help="run-config overrides, e.g. \"width=4096\"")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per latency run (default 4)")
    parser.add_argument("--isolation", choices=["subprocess", "process", "both"], default="both")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.run_config)
    RunConfig.from_mapping(overrides)  # fail early on a bad key
    raw: dict = {"overrides": overrides}
    if args.part in ("size", "all"):
        raw["size"] = measure_size(overrides)
        print_size(raw["size"])
    if args.part in ("latency", "all"):
        from make_certs import make_certificates

        with tempfile.TemporaryDirectory(prefix="fr-deploy-bench-") as tmp:
            work = Path(tmp)
            make_certificates(work / "certs", num_nodes=2)
            modes = ["subprocess", "process"] if args.isolation == "both" else [args.isolation]
            raw["latency"] = [measure_latency(overrides, mode, args.rounds, work / "certs", work) for mode in modes]
        cfg = RunConfig.from_mapping(overrides)
        print_latency(raw["latency"], f"{cfg.model_family}, m={cfg.width}, {cfg.dataset}, tau={cfg.local_steps}, "
                      f"{args.rounds} rounds, overrides: {' '.join(f'{k}={toml_value(v)}' for k, v in overrides.items()) or 'none'}")
    if args.part in ("proxy", "all"):
        from make_certs import make_certificates

        with tempfile.TemporaryDirectory(prefix="fr-deploy-proxy-") as tmp:
            make_certificates(Path(tmp) / "certs", num_nodes=2)
            raw["proxy"] = measure_proxy(overrides, args.rounds, args.requests, Path(tmp) / "certs", Path(tmp))
        cfg = RunConfig.from_mapping(overrides)
        raw["proxy"]["config"] = (f"{cfg.model_family}, m={cfg.width}, {cfg.dataset}, tau={cfg.local_steps}, "
                                  f"2 SuperNodes with process isolation, {args.rounds} rounds")
        raw["proxy"]["summary"] = summarize_proxy(raw["proxy"])
        print_proxy(raw["proxy"], raw["proxy"]["config"])
    if args.part in ("stop", "all"):
        from make_certs import make_certificates

        with tempfile.TemporaryDirectory(prefix="fr-deploy-stop-") as tmp:
            make_certificates(Path(tmp) / "certs", num_nodes=1)
            raw["stop"] = measure_stop(Path(tmp) / "certs", Path(tmp))
        print_stop(raw["stop"])
    if args.json:
        from fedavg_relu.core.results import atomic_write_text  # noqa: PLC0415

        atomic_write_text(Path(args.json), json.dumps(raw, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
