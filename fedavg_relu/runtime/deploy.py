"""A real Flower deployment on one machine: TLS SuperLink, authenticated SuperNodes, ``flwr run``.

:class:`Deployment` does, with processes it owns, what the README's "Deployment"
section tells an operator to do by hand:

1. ``flower-superlink`` with TLS (``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``
   from ``scripts/make_certs.py``) and ``--enable-supernode-auth``, on a free
   loopback port, with its own database, log and ``FLWR_HOME``; runtime
   dependency installation off so the ServerApp runs in this virtualenv.
2. A ``config.toml`` connection (``[superlink.deploy]``: ``address`` and
   ``root-certificates``) so that ``flwr`` verifies the SuperLink's certificate.
3. ``flwr supernode register KEY.pub deploy`` for each SuperNode public key.
4. ``flower-supernode`` processes, each with its private key, its own ``FLWR_HOME``
   (as on a device of its own), its own Runtime API port and a ``--node-config``
   (``data-path=...``). With ``isolation="process"``
   (the default here, the fast path) each also gets a long-running
   :mod:`fedavg_relu.runtime.clientapp_worker`; with ``"subprocess"`` Flower starts one
   ``flwr-clientapp`` process per message.
5. ``flwr run APP deploy --stream`` and the run's final status from ``flwr ls``.

Every process is started in its own session and stopped by PID (its process
group), SuperNodes before the SuperLink. Every process gets a ``PATH`` that starts
with this virtualenv's ``bin``: ``flower-superlink`` (and a SuperNode with
subprocess isolation) starts ``flower-superexec`` *by name*, and dies with
``FileNotFoundError: 'flower-superexec'`` when the virtualenv is not on ``PATH``.

The ServerApp side of a deployment is :mod:`fedavg_relu.flower.reply_deadline`: a reply
whose upload never finishes (its SuperNode died mid-upload) costs at most
``round-timeout`` instead of Flower's 180 s object-push session (see
``docs/deployment.md``).

Why this module is longer than most: it is one deployment's lifecycle (SuperLink, keys,
SuperNodes, the run, the teardown by PID), in the order the README gives an operator.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedavg_relu.runtime.flower_run import FlwrRunResult, free_port, run_config_arg
from fedavg_relu.runtime.flower_run import stop_process_group as _stop_group
from fedavg_relu.runtime.flower_run import wait_for_health

CONNECTION = "deploy"  # the name of the SuperLink connection in config.toml


def venv_bin() -> Path:
    """The ``bin`` folder of the running interpreter's environment (where ``flower-superexec`` lives)."""
    scripts = Path(sysconfig.get_path("scripts"))
    return scripts if (scripts / "flower-superexec").exists() else Path(sys.executable).parent


def _tool(name: str) -> str:
    """Full path of a console script of this environment (``flower-superlink``, ``flwr``, ...)."""
    here = venv_bin() / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def path_with_venv_first(path: str | None) -> str:
    """``path`` (a ``PATH`` value) with :func:`venv_bin` first and no second copy of it."""
    first = str(venv_bin())
    rest = [p for p in (path or "").split(os.pathsep) if p and os.path.abspath(p) != os.path.abspath(first)]
    return os.pathsep.join([first, *rest])


@dataclass
class SuperNode:
    """A ``flower-supernode`` (and, with process isolation, its ClientApp worker)."""

    name: str
    process: subprocess.Popen
    runtime_port: int
    log_path: Path
    worker: subprocess.Popen | None = None
    worker_log_path: Path | None = None
    args: list[str] = field(default_factory=list)
    worker_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # its own FLWR_HOME, as on a device of its own

    def alive(self) -> bool:
        """Whether the SuperNode process is still running."""
        return self.process.poll() is None

    def log(self) -> str:
        """The SuperNode's output so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def worker_log(self) -> str:
        """The ClientApp worker's output so far."""
        if self.worker_log_path is None or not self.worker_log_path.exists():
            return ""
        return self.worker_log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        """Wait for the SuperNode to exit; its return code."""
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the SuperNode and its worker at once, as if the device lost power."""
        for proc in (self.process, self.worker):
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in (self.process, self.worker):
            if proc is not None:
                proc.wait(timeout=10)

    def stop(self, term_wait: float = 10.0) -> float:
        """SIGTERM the SuperNode and its worker together; SIGKILL what is left after ``term_wait`` s.

        The SuperNode deregisters itself on SIGTERM; the worker abandons its task and exits.
        Returns the seconds until both were gone.
        """
        return stop_groups([self.process, self.worker], term_wait=term_wait)


class Deployment:
    """A TLS + SuperNode-auth SuperLink and its SuperNodes on loopback; a context manager.

    Parameters
    ----------
    certs_dir
        Output of ``scripts/make_certs.py``: ``ca.crt``, ``server.pem``, ``server.key``
        (with a SAN for 127.0.0.1) and ``supernode-K``/``supernode-K.pub``.
    home
        The ``FLWR_HOME`` of every process started here (a temporary folder if None;
        removed on stop unless ``keep_home``).
    address
        ``HOST:PORT`` of the SuperLink (default: 127.0.0.1 and a free port). :meth:`start`
        binds it; without :meth:`start` the object drives a SuperLink started elsewhere
        (``fedavg-relu deploy superlink``): ``flwr`` commands, SuperNodes, runs.
    netns
        A network namespace (``ip netns``) in which :meth:`flwr` and :meth:`run` execute,
        i.e. the host the operator's commands come from (tests across hosts).
    """

    def __init__(
        self, certs_dir: str | os.PathLike, home: str | os.PathLike | None = None, keep_home: bool = False,
        address: str | None = None, netns: str | None = None,
    ) -> None:
        self.certs = Path(certs_dir).resolve()
        for name in ("ca.crt", "server.pem", "server.key"):
            if not (self.certs / name).is_file():
                raise FileNotFoundError(f"{self.certs / name} missing: run scripts/make_certs.py {self.certs}")
        self._own_home = home is None
        self.home = Path(home or tempfile.mkdtemp(prefix="fedavg-relu-deploy-")).resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        self.keep_home = keep_home
        self.host, self.port = split_address(address) if address else ("127.0.0.1", free_port())
        self.address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        self.netns = netns
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[SuperNode] = []
        self.env = dict(os.environ)
        self.env.update(
            {
                "FLWR_HOME": str(self.home),
                "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "PYTHONUNBUFFERED": "1",
                # Flower starts `flower-superexec`, `flwr-serverapp`, ... by name: this venv first
                "PATH": path_with_venv_first(os.environ.get("PATH")),
                "VIRTUAL_ENV": str(venv_bin().parent),
            }
        )
        self.write_connection()

    # --- configuration ------------------------------------------------------
    def write_connection(self) -> Path:
        """``$FLWR_HOME/config.toml`` with the ``deploy`` connection (TLS, verified by our CA)."""
        path = self.home / "config.toml"
        path.write_text(
            "[superlink]\n"
            f'default = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f'address = "{self.address}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n'
        )
        return path

    # --- SuperLink ----------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        """Start ``flower-superlink`` with TLS and SuperNode authentication; wait for /health."""
        if self.netns is not None:
            raise ValueError(f"netns={self.netns!r}: start the SuperLink inside the namespace "
                             "(`ip netns exec NS fedavg-relu deploy superlink ...`), not from here")
        out = open(self.home / "superlink.out", "wb")  # noqa: SIM115 - the child keeps it
        self.superlink = subprocess.Popen(
            [
                _tool("flower-superlink"),
                "--ssl-ca-certfile", str(self.certs / "ca.crt"),
                "--ssl-certfile", str(self.certs / "server.pem"),
                "--ssl-keyfile", str(self.certs / "server.key"),
                "--enable-supernode-auth",
                "--host", self.host, "--port", str(self.port),
                "--database", str(self.home / "state.db"),
                "--log-file", str(self.home / "superlink.log"),
                "--disable-runtime-dependency-installation",
            ],
            env=self.env, cwd=self.home, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        out.close()
        context = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        if not wait_for_health(self.superlink, f"https://{self.address}/health", timeout, lambda: self.superlink_log()[-2000:], context):
            self.stop()
            raise RuntimeError(f"flower-superlink did not answer within {timeout:.0f}s on {self.address}")

    def superlink_log(self) -> str:
        """The SuperLink's console output so far."""
        path = self.home / "superlink.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Stop every SuperNode (and worker) at once, then the SuperLink, by PID."""
        stop_groups([p for node in self.supernodes for p in (node.process, node.worker)])
        self.supernodes = []
        proc, self.superlink = self.superlink, None
        _stop_group(proc)
        if self._own_home and not self.keep_home:
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> Deployment:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- flwr CLI -----------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """``flwr ARGS`` against this deployment (its FLWR_HOME, so its config.toml)."""
        return subprocess.run(
            [*in_netns(self.netns), _tool("flwr"), *args], env=self.env, capture_output=True, text=True,
            timeout=timeout, cwd=self.home,
        )

    def register(self, public_key: str | os.PathLike, name: str | None = None) -> int:
        """``flwr supernode register KEY.pub deploy``: the new node id (raises if refused)."""
        args = ["supernode", "register", str(public_key), CONNECTION, "--format", "json"]
        if name:
            args += ["--name", name]
        proc = self.flwr(*args)
        payload = _json_tail(proc.stdout)
        if proc.returncode != 0 or not payload.get("success"):
            raise RuntimeError(f"flwr supernode register {public_key} failed: {proc.stdout}{proc.stderr}")
        return int(payload["node-id"])

    def nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode ls --format json``: one dict per node (``node-id``, ``status``, ...)."""
        proc = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        payload = _json_tail(proc.stdout)
        if proc.returncode != 0 or "nodes" not in payload:
            raise RuntimeError(f"flwr supernode ls failed: {proc.stdout}{proc.stderr}")
        return list(payload["nodes"])

    def wait_online(self, count: int, timeout: float = 60.0) -> list[int]:
        """Wait until ``count`` nodes are online; their ids."""
        deadline = time.monotonic() + timeout
        online: list[int] = []
        while time.monotonic() < deadline:
            online = [int(n["node-id"]) for n in self.nodes() if n.get("status") == "online"]
            if len(online) >= count:
                return online
            time.sleep(1.0)
        raise TimeoutError(f"{len(online)} of {count} SuperNodes online after {timeout:.0f}s")

    # --- SuperNodes ---------------------------------------------------------
    def start_supernode(
        self,
        private_key: str | os.PathLike | None,
        node_config: Mapping[str, Any],
        isolation: str = "process",
        root_certificates: str | os.PathLike | None = None,
        name: str | None = None,
        max_retries: int | None = None,
        max_wait_time: float | None = None,
        timestamps: bool = False,
        runtime_secret: bool = True,
        superlink_address: str | None = None,
        netns: str | None = None,
    ) -> SuperNode:
        """Start a ``flower-supernode`` (plus a ClientApp worker with ``isolation="process"``).

        ``private_key`` is the SuperNode's auth key (None: none given, which an auth-enabled
        SuperLink refuses); ``root_certificates`` defaults to this deployment's CA. With
        ``timestamps`` every line of its log starts with the time it arrived
        (``time.time()``), for latency measurements. With process isolation and
        ``runtime_secret`` the SuperNode and its worker share a random
        ``--superexec-auth-secret-file`` (0600), so that no other local process can acquire
        the node's tasks from its Runtime API. ``superlink_address`` replaces this deployment's
        address (e.g. a proxy in front of the SuperLink; its certificate must name the host).
        ``netns`` runs the SuperNode and its worker in that network namespace (another host).
        """
        if isolation not in ("process", "subprocess"):
            raise ValueError(f"isolation={isolation!r}: expected 'process' or 'subprocess'")
        name = name or f"supernode-{len(self.supernodes) + 1}"
        runtime_port = free_port()
        args = [
            *in_netns(netns),
            _tool("flower-supernode"),
            "--superlink", superlink_address or self.address,
            "--root-certificates", str(root_certificates or self.certs / "ca.crt"),
            "--isolation", isolation,
            "--host", "127.0.0.1", "--port", str(runtime_port),
            "--node-config", run_config_arg(node_config),
        ]
        if private_key is not None:
            args += ["--auth-supernode-private-key", str(private_key)]
        if max_retries is not None:
            args += ["--max-retries", str(max_retries)]
        if max_wait_time is not None:
            args += ["--max-wait-time", str(max_wait_time)]
        secret_args: list[str] = []
        if isolation == "process" and runtime_secret:
            secret = self.home / f"{name}.superexec-secret"
            fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
            secret_args = ["--superexec-auth-secret-file", str(secret)]
            args += secret_args
        # Each SuperNode and its worker get a FLWR_HOME of their own, as devices have: in a shared one,
        # two workers unpacking the same FAB into $FLWR_HOME/apps raced (one found the folder without
        # its pyproject.toml and failed its train task).
        node_env = {**self.env, "FLWR_HOME": str(self.home / "nodes" / name)}
        Path(node_env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
        log_path = self.home / f"{name}.out"
        if timestamps:
            process = subprocess.Popen(
                args, env=node_env, cwd=self.home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            threading.Thread(target=_timestamp_lines, args=(process.stdout, log_path), daemon=True).start()
        else:
            with open(log_path, "wb") as out:
                process = subprocess.Popen(
                    args, env=node_env, cwd=self.home, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
        node = SuperNode(name, process, runtime_port, log_path, args=args, env=node_env)
        if isolation == "process":
            node.worker_args = [
                *in_netns(netns), sys.executable, "-m", "fedavg_relu.runtime.clientapp_worker",
                "--runtime-api-address", f"127.0.0.1:{runtime_port}", "--insecure", *secret_args, "--preload", "torch",
            ]
            self.start_worker(node)
        self.supernodes.append(node)
        return node

    def start_worker(self, node: SuperNode) -> subprocess.Popen:
        """(Re)start ``node``'s ClientApp worker (process isolation); its output is appended to its log."""
        if not node.worker_args:
            raise ValueError(f"{node.name} runs Flower's own ClientApp processes (isolation='subprocess'): no worker")
        if node.worker is not None and node.worker.poll() is None:
            raise RuntimeError(f"{node.name}'s worker (pid {node.worker.pid}) is still running")
        node.worker_log_path = self.home / f"{node.name}-worker.out"
        with open(node.worker_log_path, "ab") as out:
            node.worker = subprocess.Popen(
                node.worker_args, env=node.env or self.env, cwd=self.home, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return node.worker

    # --- runs ---------------------------------------------------------------
    def run(
        self,
        app_dir: str | os.PathLike,
        overrides: Mapping[str, Any],
        echo: bool = False,
        timeout: float | None = None,
        on_line=None,
    ) -> FlwrRunResult:
        """``flwr run APP deploy --stream``; then the run's final status from ``flwr ls``.

        ``on_line(line)`` sees every line of the stream as it arrives (tests use it to act
        in the middle of a run).
        """
        cmd = [*in_netns(self.netns), _tool("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
        if overrides:
            cmd += ["--run-config", run_config_arg(overrides)]
        proc = subprocess.Popen(
            cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        lines: list[str] = []
        assert proc.stdout is not None
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            for line in proc.stdout:
                lines.append(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if on_line is not None:
                    on_line(line)
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"flwr run took longer than {timeout}s")
            proc.wait()
        finally:
            if proc.poll() is None:
                _stop_group(proc, term_wait=5.0)
        output = "".join(lines)
        match = re.search(r"Successfully started run (\d+)", output)
        run_id = int(match.group(1)) if match else None
        status = self.status(run_id) if run_id is not None else "unknown"
        return FlwrRunResult(proc.returncode, run_id, status, output)

    def status(self, run_id: int) -> str:
        """``status:sub-status`` of a run, from ``flwr ls --run-id ID --format json``."""
        proc = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=60)
        runs = _json_tail(proc.stdout).get("runs", [])
        return str(runs[0].get("status", "unknown")) if runs else "unknown"


def split_address(address: str) -> tuple[str, int]:
    """``("HOST", PORT)`` of ``"HOST:PORT"`` (``"[::1]:9091"`` for IPv6); a clear error otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address={address!r}: expected HOST:PORT with a port in 1..65535")
    return host.strip("[]"), int(port)


def in_netns(netns: str | None) -> list[str]:
    """The command prefix that runs a program in network namespace ``netns`` (none for None)."""
    return [] if netns is None else ["ip", "netns", "exec", netns]


def stop_groups(procs: Iterable[subprocess.Popen | None], term_wait: float = 10.0) -> float:
    """SIGTERM the process groups of ``procs`` at once, SIGKILL those left after ``term_wait`` s; seconds taken."""
    procs = [p for p in procs if p is not None and p.poll() is None]
    t0 = time.monotonic()
    for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, 5.0)):
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        procs = [p for p in procs if p.poll() is None]
        if not procs:
            break
    return time.monotonic() - t0


def _timestamp_lines(stream, path: Path) -> None:
    """Copy ``stream`` to ``path`` line by line, each prefixed with its arrival time."""
    with open(path, "ab", buffering=0) as out:
        for line in iter(stream.readline, b""):
            out.write(f"{time.time():.3f} ".encode() + line)
    stream.close()


def _json_tail(text: str) -> dict[str, Any]:
    """The JSON object at the end of a ``flwr ... --format json`` output (status lines may precede it)."""
    start = text.find("{")
    while start != -1:
        try:
            value = json.loads(text[start:])
            return value if isinstance(value, dict) else {}
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return {}
