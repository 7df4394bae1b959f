"""``flwr run .`` in isolation: its own FLWR_HOME, ports, Ray temp dir and SuperLink.

Flower's managed local SuperLink binds fixed, machine-wide ports and keeps
running after ``flwr run`` exits (see the README's "Flower on a shared
machine"). :class:`IsolatedFlower` instead starts ``flower-superlink
--simulation`` itself on free loopback ports, with a fresh ``FLWR_HOME`` and
runtime dependency installation off, points ``flwr`` at it through
``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``, and stops it (its whole process
group, by PID) when done.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal for ``--run-config``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if '"' in text or "\n" in text:
        raise ValueError(f"run-config string values cannot contain double quotes or newlines: {text!r}")
    return f'"{text}"'


def run_config_arg(overrides: Mapping[str, Any]) -> str:
    """The ``--run-config`` string of ``overrides``."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())


def stop_process_group(proc: subprocess.Popen | None, term_wait: float = 10.0) -> None:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session``), then SIGKILL what is left."""
    if proc is None:
        return
    if proc.poll() is None:
        for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    try:  # stragglers of the group (superexec, the simulation or ClientApp processes)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def wait_for_health(proc: subprocess.Popen, url: str, timeout: float, explain, context=None) -> bool:
    """Poll ``url`` until it answers 200 (True) or ``timeout`` passes (False).

    Raises ``RuntimeError`` (with ``explain()``) as soon as ``proc`` exits.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}; {explain()}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


@dataclass
class FlwrRunResult:
    """What ``flwr run --stream`` left behind."""

    returncode: int
    run_id: int | None
    status: str  # e.g. "finished:completed", "finished:failed", or "unknown"
    output: str


class IsolatedFlower:
    """A private simulation SuperLink; use as a context manager."""

    def __init__(self, home: str | os.PathLike | None = None, keep_home: bool = False) -> None:
        self._own_home = home is None
        self.home = Path(home or tempfile.mkdtemp(prefix="fedavg-relu-flwr-")).resolve()
        self.keep_home = keep_home
        self.port = free_port()
        self.control_port = free_port()
        self.process: subprocess.Popen | None = None
        self.home.mkdir(parents=True, exist_ok=True)
        # Ray's socket paths must stay under ~107 characters: a short temp dir of its own
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="fr-ray-", dir="/tmp" if os.path.isdir("/tmp") else None))
        self.env = dict(os.environ)
        self.env.update(
            {
                "FLWR_HOME": str(self.home),
                "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(self.port),
                "FLWR_LOCAL_CONTROL_API_PORT": str(self.control_port),
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "RAY_TMPDIR": str(self.ray_tmp),
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
                "PYTHONUNBUFFERED": "1",
                # Flower's processes start `flower-superexec` etc. by name: this venv first
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            }
        )

    # --- lifecycle ----------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        """Start ``flower-superlink --simulation`` and wait until it answers."""
        log = open(self.home / "superlink.out", "wb")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [
                _bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--database", str(self.home / "state.db"),
                "--log-file", str(self.home / "superlink.log"),
                "--disable-runtime-dependency-installation",
            ],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        if not wait_for_health(self.process, f"http://127.0.0.1:{self.port}/health", timeout, lambda: f"see {self.home / 'superlink.out'}"):
            self.stop()
            raise RuntimeError(f"flower-superlink did not answer within {timeout:.0f}s on port {self.port}")

    def stop(self) -> None:
        """Stop the SuperLink and everything in its process group, by PID."""
        proc, self.process = self.process, None
        stop_process_group(proc)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        if self._own_home and not self.keep_home:
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> IsolatedFlower:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- commands -----------------------------------------------------------
    def run(
        self,
        app_dir: str | os.PathLike,
        overrides: Mapping[str, Any],
        num_supernodes: int,
        cpus_per_client: int = 1,
        echo: bool = False,
        timeout: float | None = None,
    ) -> FlwrRunResult:
        """``flwr run APP --stream`` with these overrides; then ask for the run's status."""
        cmd = [
            _bin("flwr"), "run", str(app_dir),
            "--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}",
            "--stream",
        ]
        if overrides:
            cmd[3:3] = ["--run-config", run_config_arg(overrides)]
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        assert proc.stdout is not None
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            for line in proc.stdout:
                lines.append(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"flwr run took longer than {timeout}s")
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        output = "".join(lines)
        match = re.search(r"Successfully started run (\d+)", output)
        run_id = int(match.group(1)) if match else None
        status = self.status(run_id) if run_id is not None else "unknown"
        return FlwrRunResult(proc.returncode, run_id, status, output)

    def status(self, run_id: int) -> str:
        """``status:sub-status`` of a run, from ``flwr ls --run-id ID --format json``."""
        proc = subprocess.run(
            [_bin("flwr"), "ls", "--run-id", str(run_id), "--format", "json"],
            env=self.env, capture_output=True, text=True, timeout=60,
        )
        try:
            payload = json.loads(proc.stdout)
        except json.JSONDecodeError:
            return "unknown"
        runs = payload.get("runs", [])
        if not runs:
            return "unknown"
        return str(runs[0].get("status", "unknown"))
