"""A real multi-node Ray cluster on loopback, for tests and for trying the cluster path.

:class:`LocalRayCluster` runs ``ray start --head --block`` and one or more
``ray start --address=... --block`` worker nodes, each as its own process group
(``start_new_session``), on free 127.0.0.1 ports and a short private temp dir.
``--block`` keeps each ``ray start`` in the foreground and makes it take its
raylet, GCS and workers down with it; :meth:`LocalRayCluster.stop` sends SIGTERM
to each group it started, then SIGKILL. It never runs ``ray stop``, which would
stop every Ray process of the user on the machine (other people's runs included).

Ray's Unix socket paths must stay under ~107 characters, so the temp dir is
``/tmp/frc-XXXXXX`` (short); long paths make Ray fail with unhelpful errors.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedavg_relu.runtime.flower_run import free_port


def _ray_bin() -> str:
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


class LocalRayCluster:
    """A head node plus ``num_workers`` worker nodes on 127.0.0.1; use as a context manager.

    ``address`` (``127.0.0.1:PORT``) is what ``ray.init(address=...)``, i.e. Flower's
    backend ``init_args``, needs to join it.
    """

    def __init__(self, head_cpus: int = 1, worker_cpus: int = 1, num_workers: int = 1) -> None:
        self.head_cpus, self.worker_cpus, self.num_workers = head_cpus, worker_cpus, num_workers
        self._taken: set[int] = set()
        self._ranges: list[tuple[int, int]] = []
        self.port = self._port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = Path(tempfile.mkdtemp(prefix="frc-", dir="/tmp"))
        self.processes: list[subprocess.Popen] = []
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
        self.env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

    def _port(self) -> int:
        """A free port that no component of this cluster uses yet and outside every worker-port range."""
        for _ in range(1000):
            port = free_port()
            if port not in self._taken and not any(lo <= port <= hi for lo, hi in self._ranges):
                self._taken.add(port)
                return port
        raise RuntimeError("no free port outside the cluster's worker-port ranges")

    def _node_ports(self) -> list[str]:
        # Ray refuses to start when one component's port falls inside the worker-port range
        # ("... is trying to use a port number ... that is used by other components"): take the
        # range first, then every other port outside all ranges taken so far.
        for _ in range(1000):
            low = free_port()
            clash = any(low <= p <= low + 200 for p in self._taken) or any(
                low <= hi and lo <= low + 200 for lo, hi in self._ranges
            )
            if low + 200 <= 65535 and not clash:
                break
        else:
            raise RuntimeError("no free worker-port range for the Ray cluster")
        self._ranges.append((low, low + 200))
        return [
            f"--node-manager-port={self._port()}", f"--object-manager-port={self._port()}",
            f"--metrics-export-port={self._port()}", f"--runtime-env-agent-port={self._port()}",
            f"--dashboard-agent-listen-port={self._port()}", f"--dashboard-agent-grpc-port={self._port()}",
            f"--min-worker-port={low}", f"--max-worker-port={low + 200}",
        ]

    def _start(self, args: list[str], name: str) -> None:
        log = open(self.temp_dir / f"{name}.out", "wb")  # noqa: SIM115 - closed right after Popen
        proc = subprocess.Popen(
            [_ray_bin(), "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1", *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self.processes.append(proc)

    def start(self, timeout: float = 120.0, attempts: int = 1) -> None:
        """Start the head, wait until it answers, start the workers, wait until every CPU is there.

        ``attempts > 1`` starts the whole cluster again (fresh ports and temp dir) after a failed
        try: Ray gives a node a fixed 30 s to register ("The current node timed out during
        startup"), which a loaded 2-core machine misses now and then.
        """
        for attempt in range(1, attempts + 1):
            try:
                self._start_nodes(timeout)
                return
            except RuntimeError:  # _wait() has already stopped every node and removed the temp dir
                if attempt == attempts:
                    raise
                self.temp_dir = Path(tempfile.mkdtemp(prefix="frc-", dir="/tmp"))
                self.port = self._port()
                self.address = f"127.0.0.1:{self.port}"

    def _start_nodes(self, timeout: float) -> None:
        self._start(
            ["--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}", f"--num-cpus={self.head_cpus}",
             "--include-dashboard=false", f"--ray-client-server-port={self._port()}", *self._node_ports()],
            "head",
        )
        self._wait(lambda: self._cpus() >= self.head_cpus, timeout, "the head node")
        for i in range(self.num_workers):
            self._start([f"--address={self.address}", f"--num-cpus={self.worker_cpus}", *self._node_ports()], f"worker{i}")
        total = self.head_cpus + self.num_workers * self.worker_cpus
        self._wait(lambda: self._cpus() >= total, timeout, f"{total} CPUs")

    def _cpus(self) -> float:
        """CPUs the cluster reports (``ray status``), 0 while it does not answer."""
        try:
            out = subprocess.run(
                [_ray_bin(), "status", f"--address={self.address}"], env=self.env,
                capture_output=True, text=True, timeout=30,
            ).stdout
        except subprocess.TimeoutExpired:
            return 0.0
        for line in out.splitlines():
            parts = line.strip().split()
            if len(parts) >= 2 and parts[1] == "CPU" and "/" in parts[0]:
                return float(parts[0].split("/")[1])
        return 0.0

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.processes:
                if proc.poll() is not None:
                    logs = "".join(p.read_text(errors="replace")[-1500:] for p in sorted(self.temp_dir.glob("*.out")))
                    self.stop()
                    raise RuntimeError(f"`ray start` exited with {proc.returncode} while waiting for {what}:\n{logs}")
            if ready():
                return
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"Ray cluster: {what} not up within {timeout:.0f}s")

    def stop(self) -> None:
        """SIGTERM each ``ray start`` process group we started (workers first), then SIGKILL what is left."""
        for proc in reversed(self.processes):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
        for proc in self.processes:  # stragglers of each group (raylet, workers)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.wait(timeout=10)
        self.processes = []
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def group_members(self, groups: list[int]) -> list[tuple[int, str]]:
        """Live (non-zombie) processes whose process group is one of ``groups``: ``(pid, name)``."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            name = text[text.index("(") + 1 : text.rindex(")")]
            fields = text[text.rindex(")") + 2 :].split()
            if fields[0] != "Z" and int(fields[2]) in groups:
                found.append((int(stat.parent.name), name))
        return found

    def node_groups(self) -> dict[int, str]:
        """Process group id of each node this cluster started: ``{pgid: "head" | "worker0" | ...}``.

        Each ``ray start --block`` runs in a session of its own, and the node's raylet spawns its
        workers (Ray actors included) inside that group, so a process's group tells its node.
        """
        names = ["head", *(f"worker{i}" for i in range(self.num_workers))]
        return {proc.pid: name for proc, name in zip(self.processes, names)}

    def actor_processes(self, class_name: str = "ClientAppActor") -> dict[int, str]:
        """Live processes of Ray actors of ``class_name`` on this cluster's nodes: ``{pid: node name}``.

        Ray titles an actor's worker process ``ray::CLASS`` (``ray::CLASS.method`` while it runs one);
        Flower's simulation runs every ClientApp in a ``ClientAppActor``. Actors of other clusters
        or of a private Ray instance (another process group) are not counted.
        """
        groups = self.node_groups()
        found: dict[int, str] = {}
        for proc_dir in Path("/proc").glob("[0-9]*"):
            try:
                title = (proc_dir / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
                stat = (proc_dir / "stat").read_text()
            except OSError:
                continue
            if title != f"ray::{class_name}" and not title.startswith(f"ray::{class_name}."):
                continue
            pgid = int(stat[stat.rindex(")") + 2 :].split()[2])
            if pgid in groups:
                found[int(proc_dir.name)] = groups[pgid]
        return found

    def __enter__(self) -> LocalRayCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m fedavg_relu.runtime.ray_cluster``: start a loopback cluster, print how to use it, stop it on Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m fedavg_relu.runtime.ray_cluster",
        description="A head + worker Ray cluster on 127.0.0.1 for trying `flwr run` on a cluster; Ctrl-C stops it.",
    )
    parser.add_argument("--head-cpus", type=int, default=1)
    parser.add_argument("--worker-cpus", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="number of worker nodes (default 1)")
    parser.add_argument("--attempts", type=int, default=3,
                        help="start the cluster again this many times in all when a node misses Ray's 30 s start deadline")
    args = parser.parse_args(argv)
    cluster = LocalRayCluster(head_cpus=args.head_cpus, worker_cpus=args.worker_cpus, num_workers=args.workers)

    def _interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt

    # Explicit for SIGINT too: a shell starts background jobs with SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler (`kill -INT` of `python -m ... &` would do nothing).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        cluster.start(attempts=args.attempts)
        groups = ", ".join(f"{name} pgid {pgid}" for pgid, name in cluster.node_groups().items())
        print(f"Ray cluster up: {cluster.address} ({groups}); logs in {cluster.temp_dir}", flush=True)
        print(f"  export RAY_ADDRESS={cluster.address}", flush=True)
        print("Ctrl-C (or SIGTERM to this process) stops every node.", flush=True)
        while all(proc.poll() is None for proc in cluster.processes):
            time.sleep(0.5)
        print("A Ray node exited by itself; stopping the others.", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as err:  # a node did not come up: LocalRayCluster has stopped the others
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not interrupt the cleanup
            signal.signal(sig, signal.SIG_IGN)
        cluster.stop()
        print("Ray cluster stopped.", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
