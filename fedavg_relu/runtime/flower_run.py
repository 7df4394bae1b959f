"""``flwr run .`` in isolation: its own FLWR_HOME, ports, Ray temp dir and SuperLink.

Flower's managed local SuperLink binds fixed, machine-wide ports and keeps
running after ``flwr run`` exits (see the README's "Flower on a shared
machine"). :class:`IsolatedFlower` instead starts ``flower-superlink
--simulation`` itself on free loopback ports, with a fresh ``FLWR_HOME`` and
runtime dependency installation off, points ``flwr`` at it through
``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``, and stops it (its whole process
group, by PID) when done.

Not everything a run starts stays in that process group: ``flower-superexec``
starts a session of its own, and the ``flwr-simulation`` process it spawns
starts Ray's daemons (``gcs_server``, ``raylet``, dashboard, log monitor) and
the ClientApp actors, which re-parent to init when their parents die. Every
one of them inherits the private ``RAY_TMPDIR``, so :meth:`IsolatedFlower.stop`
also finds them through ``/proc`` (that variable in their environment, or the
folder in their command line, plus the descendants seen while the run was
going) and stops them by PID. :func:`raise_on_signals` turns SIGINT/SIGTERM
into :class:`RunInterrupted`, so that a caller can stop all of it and exit
128 + signal number without a traceback.

Why this module is longer than most: it is one lifecycle, a `flwr run` in an isolated
FLWR_HOME: ports, process groups, streaming the log, signals, the final status.
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
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
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
    if "\n" in text or ('"' in text and "'" in text):
        raise ValueError(f"run-config string values cannot contain newlines, or both kinds of quotes: {text!r}")
    return f"'{text}'" if '"' in text else f'"{text}"'


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


# --- processes by PID, through /proc --------------------------------------------
def _start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/PID/stat`` (start time in clock ticks): with the PID, a process's identity."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read()
    except OSError:
        return None
    return int(text[text.rindex(b")") + 2 :].split()[19])


def _parent_map() -> dict[int, int]:
    """PID -> parent PID of every process visible in ``/proc``."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    text = fh.read()
            except OSError:
                continue
            parents[int(entry)] = int(text[text.rindex(b")") + 2 :].split()[1])
    return parents


def descendants(pid: int, parents: Mapping[int, int] | None = None) -> set[int]:
    """Every live process below ``pid`` in the process tree (not ``pid`` itself)."""
    parents = _parent_map() if parents is None else parents
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _ancestors(pid: int, parents: Mapping[int, int]) -> set[int]:
    found = set()
    while pid > 1 and pid not in found:
        found.add(pid)
        pid = parents.get(pid, 0)
    return found


def processes_marked_by(markers: list[str]) -> set[int]:
    """PIDs whose environment holds one of the ``NAME=VALUE`` ``markers`` exactly, or whose command line names
    a marker's value; never this process or its ancestors."""
    parents = _parent_map()
    spared = _ancestors(os.getpid(), parents)
    env_entries = {m.encode() for m in markers}
    values = [m.split("=", 1)[1].encode() for m in markers if "=" in m and m.split("=", 1)[1]]
    found = set()
    for pid in parents:
        if pid in spared:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                environ = set(fh.read().split(b"\0"))
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:  # gone, or not ours
            continue
        if environ & env_entries or any(v in cmdline for v in values):
            found.add(pid)
    return found


def kill_pids(pids: dict[int, int | None], grace: float) -> None:
    """SIGTERM each PID (whose start time still matches, when known), wait up to ``grace`` s, then SIGKILL the rest."""

    def alive() -> list[int]:
        return [p for p, t in pids.items() if pid_alive(p) and (t is None or _start_time(p) == t)]

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        targets = alive()
        for pid in targets:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not alive():
            return


class RunInterrupted(BaseException):
    """SIGINT or SIGTERM arrived while a run was going (a ``BaseException``, like ``KeyboardInterrupt``)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.at = time.time()  # when the signal arrived (Unix time): what the run's processes wrote later is its echo
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        """The shell convention: 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


@contextmanager
def raise_on_signals(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Inside the block, the first of ``signums`` raises :class:`RunInterrupted`; later ones are ignored
    (the caller is stopping the run). Main thread only; the previous handlers come back afterwards."""
    state = {"raised": False}

    def handler(signum: int, _frame: object) -> None:
        if not state["raised"]:
            state["raised"] = True
            raise RunInterrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in signums}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


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
        self.seen: dict[int, int | None] = {}  # PID -> start time of every process seen below the SuperLink or flwr
        self.stragglers: set[int] = set()  # PIDs still alive after stop() (should stay empty)
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None
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

    def markers(self) -> list[str]:
        """Environment entries that only this instance's processes carry (the private Ray temp dir)."""
        return [f"RAY_TMPDIR={self.ray_tmp}"]

    def run_processes(self) -> set[int]:
        """Live PIDs this instance started: marked ones (:meth:`markers`), tracked descendants, the SuperLink."""
        pids = processes_marked_by(self.markers())
        pids.update(p for p, t in self.seen.items() if pid_alive(p) and _start_time(p) == t)
        if self.process is not None and self.process.poll() is None:
            pids.add(self.process.pid)
        return pids

    def _remember_descendants(self, *roots: int) -> None:
        parents = _parent_map()
        for root in roots:
            for pid in descendants(root, parents):
                if pid not in self.seen:
                    self.seen[pid] = _start_time(pid)

    def _watch(self, extra_root: int | None, every: float = 1.0) -> None:
        """Background: remember every descendant of the SuperLink (and of ``extra_root``) while they live."""
        while not self._watch_stop.wait(every):
            roots = [p.pid for p in (self.process,) if p is not None]
            try:
                self._remember_descendants(*roots, *([extra_root] if extra_root else []))
            except (OSError, ValueError, IndexError):  # a process vanished mid-read
                continue

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process of this instance by PID, then remove its temporary folders.

        Every process it started (the SuperLink's group and what left it, see the
        module docstring) gets SIGTERM at once, then SIGKILL after ``grace``
        seconds; the search is repeated until none is left (at most about
        ``grace + 15`` s). What still lives afterwards is in :attr:`stragglers`.
        """
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        proc, self.process = self.process, None
        if proc is not None:
            self._remember_descendants(proc.pid)
        pids = self.run_processes() | ({proc.pid} if proc is not None and proc.poll() is None else set())
        kill_pids({p: _start_time(p) for p in pids}, grace)
        stop_process_group(proc, term_wait=grace)  # reaps it; SIGKILLs what is left of its group
        deadline = time.monotonic() + grace + 10.0
        while time.monotonic() < deadline:
            left = self.run_processes()
            if not left:
                break
            kill_pids({p: _start_time(p) for p in left}, min(grace, 3.0))
        self.stragglers = self.run_processes()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        if self._own_home and not self.keep_home:
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> IsolatedFlower:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        interrupted = exc_type is not None and issubclass(exc_type, (RunInterrupted, KeyboardInterrupt))
        self.stop(grace=3.0 if interrupted else 10.0)

    # --- commands -----------------------------------------------------------
    def run(
        self,
        app_dir: str | os.PathLike,
        overrides: Mapping[str, Any],
        num_supernodes: int,
        cpus_per_client: int = 1,
        echo: bool = False,
        timeout: float | None = None,
        hide: Callable[[str], bool] | None = None,
    ) -> FlwrRunResult:
        """``flwr run APP --stream`` with these overrides; then ask for the run's status.

        With ``echo``, the stream is copied to stdout as it comes, except the
        lines for which ``hide(line)`` is true. The ``flwr`` process gets a
        session of its own: a terminal's Ctrl-C reaches only the caller, which
        stops everything (:meth:`stop`).
        """
        cmd = [
            _bin("flwr"), "run", str(app_dir),
            "--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}",
            "--stream",
        ]
        if overrides:
            cmd[3:3] = ["--run-config", run_config_arg(overrides)]
        proc = subprocess.Popen(
            cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self._watch_stop.clear()
        self._watcher = threading.Thread(target=self._watch, args=(proc.pid,), daemon=True, name="flwr-process-watch")
        self._watcher.start()
        lines: list[str] = []
        assert proc.stdout is not None
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            for line in proc.stdout:
                lines.append(line)
                if echo and not (hide is not None and hide(line)):
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"flwr run took longer than {timeout}s")
            proc.wait()
        finally:
            if proc.poll() is None:
                self._remember_descendants(proc.pid)
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
