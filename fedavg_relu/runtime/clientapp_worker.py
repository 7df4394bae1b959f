"""A long-running ClientApp process for a SuperNode started with ``--isolation process``.

With its default isolation (``subprocess``) a SuperNode starts ``flower-superexec``,
which starts a new ``flwr-clientapp`` process for *every message*: each one imports
torch and flwr, installs the app bundle (FAB) and loads the ClientApp again. On a
small device that start-up dominates a round, and the drift measurement sends a
second message per round.

With ``flower-supernode --isolation process`` the SuperNode starts no executor: it
serves its Runtime API (``--host``/``--port``, default ``127.0.0.1:9094``) and waits
for an outside process to acquire its tasks. :class:`ClientAppWorker` is that
process. It does, for each task, what Flower's ``flwr-clientapp`` does (pull the
message, the node's context and the FAB; run the ClientApp; push the reply and the
updated context, heartbeating meanwhile), but in one process that stays up: torch,
the app's modules and their per-process caches (model, data) are loaded once.

The node's state (``context.state``) still lives in the SuperNode, exactly as with
``flwr-clientapp``: each task pulls it and pushes it back, so the drift exchange
finds the local model its train message kept whichever path runs it.

Run one per SuperNode, on the same device::

    flower-supernode --isolation process --port 9094 ...  &
    python -m fedavg_relu.runtime.clientapp_worker --runtime-api-address 127.0.0.1:9094 --insecure

The worker runs the code the run shipped: it imports the app's packages from the FAB's
install folder (dropping any copy imported earlier, e.g. from an editable install), and
when a run ships a different FAB it drops the previous app's modules and loads the new
one; third-party modules (torch, numpy, flwr) stay loaded.

SIGTERM or SIGINT stops the worker at once (exit code 143 or 130): a task in progress is
abandoned, not finished. The SuperNode is told the task failed, with an error reply
("ClientApp worker stopped by signal 15 ..."), in one attempt without retries, so the
ServerApp counts the client as failed instead of waiting for ``round-timeout``. The
process then ends with ``os._exit``: unloading torch and flwr at interpreter exit takes
seconds. Whatever happens, the process is gone :data:`EXIT_GRACE` seconds after the
signal; a second signal ends it at once.

Why this module is longer than most: it mirrors the loop of Flower's own `flwr-
clientapp` process step by step, kept together so the two can be read side by side when
Flower changes.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from logging import DEBUG, ERROR, INFO, WARNING
from pathlib import Path

import httpx
from flwr.app import Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.logger import log
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.object_ref import load_app
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

# The SuperExec auth interceptor signs only these methods (as flower-superexec does)
_AUTH_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask"})

#: Seconds from SIGTERM/SIGINT to a forced exit, whatever the worker is doing.
EXIT_GRACE = 3.0


class WorkerStopped(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error
    """Raised in the serving thread by SIGTERM/SIGINT while a task runs: abandon the task."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


@dataclass
class TaskOutcome:
    """What one task did (for logs and tests)."""

    message_type: str
    ok: bool
    seconds: float
    details: str = ""


class ClientAppWorker:
    """Acquire this SuperNode's ClientApp tasks and run them in this process.

    Parameters
    ----------
    runtime_api_address
        The SuperNode's Runtime API, ``host:port`` (its ``--host``/``--port``).
    insecure
        Plain HTTP to the Runtime API (the SuperNode serves HTTP unless given
        ``--ssl-certfile``/``--ssl-keyfile``; it binds 127.0.0.1 by default).
    root_certificates
        PEM path of the CA that signed the Runtime API's certificate (TLS case).
    superexec_auth_secret
        The bytes of the SuperNode's ``--superexec-auth-secret-file``: then only a
        process that knows the secret can acquire tasks.
    poll_interval
        Seconds between ``AcquireTask`` polls when the SuperNode has no task.
    """

    def __init__(
        self,
        runtime_api_address: str,
        insecure: bool = True,
        root_certificates: str | None = None,
        superexec_auth_secret: bytes | None = None,
        poll_interval: float = 0.1,
    ) -> None:
        self.runtime_api_address = runtime_api_address
        self.insecure = insecure
        self.root_certificates = None if insecure else root_certificates
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._busy = False  # a task is running in serve()'s thread
        self._task: dict = {}  # the task in progress: token, message, context (for abandon)
        self.stopped_by: int | None = None  # the signal that stopped the worker
        self._app: ClientApp | None = None
        self._app_hash: str | None = None
        self._app_dir: Path | None = None
        self.outcomes: list[TaskOutcome] = []
        interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if superexec_auth_secret:
            interceptors.append(
                SuperExecAuthHttpInterceptor(master_secret=superexec_auth_secret, protected_methods=_AUTH_METHODS)
            )
        self._control = RuntimeHttpClient.from_server_address(
            server_address=runtime_api_address,
            insecure=insecure,
            root_certificates=self.root_certificates,
            interceptors=interceptors,
            retry_invoker=None,  # polls: an unreachable SuperNode is retried by serve(), interruptibly
        )

    # --- main loop ----------------------------------------------------------
    def serve(self, max_tasks: int | None = None) -> None:
        """Acquire and run tasks until :meth:`stop` (or ``max_tasks`` tasks)."""
        log(INFO, "ClientApp worker: serving the SuperNode Runtime API at %s (pid %d)",
            self.runtime_api_address, os.getpid())
        done = 0
        try:
            while not self._stop.is_set() and (max_tasks is None or done < max_tasks):
                try:
                    res = self._control.AcquireTask(
                        AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
                    )
                except httpx.TransportError as err:  # SuperNode not up yet, or restarting
                    log(DEBUG, "ClientApp worker: Runtime API not reachable: %s", err)
                    self._stop.wait(1.0)
                    continue
                except httpx.HTTPStatusError as err:
                    if err.response.status_code in (401, 403):
                        raise RuntimeError(
                            f"the SuperNode at {self.runtime_api_address} refused AcquireTask "
                            f"({err.response.status_code}): give this worker the SuperNode's "
                            "--superexec-auth-secret-file"
                        ) from err
                    raise
                if res.HasField("task") and res.token:
                    if res.task.type != TaskType.CLIENT_APP.value:
                        log(ERROR, "ClientApp worker: cannot run task type %r (task %d)", res.task.type, res.task.task_id)
                        continue
                    self.run_task(res.token)
                    done += 1
                else:
                    self._stop.wait(self.poll_interval)
        finally:
            self._control.close()

    def stop(self) -> None:
        """Stop after the current task."""
        self._stop.set()

    def terminate(self, signum: int) -> None:
        """Stop now; call from a signal handler in serve()'s thread. A running task is abandoned."""
        self.stopped_by = signum
        self._stop.set()
        if self._busy:
            raise WorkerStopped(signum)

    # --- one task -----------------------------------------------------------
    def run_task(self, token: str) -> TaskOutcome:
        """Run the task behind ``token``: what ``flwr-clientapp --token`` does, in this process.

        :class:`WorkerStopped` (from :meth:`terminate`) abandons the task: the SuperNode gets an
        error reply and a failed task output (one try each), and the exception propagates.
        """
        t0 = time.perf_counter()
        self._task = {"token": token}
        self._busy = True
        try:
            return self._run_task(token, t0)
        except WorkerStopped as stopped:
            self._busy = False
            self._abandon(stopped.signum, time.perf_counter() - t0)
            raise
        finally:
            self._busy = False
            self._task = {}

    def _abandon(self, signum: int, seconds: float) -> None:
        """Tell the SuperNode the task in progress failed: an error reply and the task output, no retries."""
        token, message, context = (self._task.get(k) for k in ("token", "message", "context"))
        reason = f"ClientApp worker stopped by signal {signum} before the task finished"
        log(WARNING, "ClientApp worker: %s task abandoned after %.2fs (signal %d)",
            message.metadata.message_type if message is not None else "?", seconds, signum)
        client = RuntimeHttpClient.from_server_address(
            server_address=self.runtime_api_address,
            insecure=self.insecure,
            root_certificates=self.root_certificates,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
            retry_invoker=None,
        )
        try:
            # an error reply unless the real one was already on its way (two replies to one message)
            if message is not None and context is not None and not self._task.get("reply-pushed"):
                push_message(client, Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason=reason), reply_to=message),
                             context)
            push_task_output(client, context, SubStatus.FAILED, reason)
        except Exception as ex:  # pylint: disable=broad-exception-caught
            log(WARNING, "ClientApp worker: could not report the abandoned task: %s", ex)
        finally:
            client.close()
        self.outcomes.append(TaskOutcome(message.metadata.message_type if message is not None else "?",
                                         False, seconds, reason))

    def _run_task(self, token: str, t0: float) -> TaskOutcome:
        client = RuntimeHttpClient.from_server_address(
            server_address=self.runtime_api_address,
            insecure=self.insecure,
            root_certificates=self.root_certificates,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
            retry_invoker=_task_retry_invoker(),
        )
        heartbeat = HeartbeatSender(_heartbeat_fn(client))
        try:
            heartbeat.start()
            return self._pull_run_push(client, t0)
        finally:  # no network call here: WorkerStopped must leave at once
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()

    def _pull_run_push(self, client: RuntimeHttpClient, t0: float) -> TaskOutcome:
        """Pull the task's input, run the ClientApp, push the reply and the task output.

        Each step catches ``Exception`` only, so :class:`WorkerStopped` skips every later step.
        """
        message = context = reply = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, run, fab = pull_task_input(client)
            self._task.update(message=message, context=context)
            client_app = self._load(run.fab_id, run.fab_version, fab.hash_str, fab.content)
            reply = client_app(message=message, context=context)
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # pylint: disable=broad-exception-caught
            # same error reply as flwr-clientapp: the run goes on, the server sees the reason
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"
            if isinstance(ex, LoadClientAppError):
                code, reason = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, f"An exception was raised when attempting to load `ClientApp`: {ex}"
            log(ERROR, "ClientApp raised an exception", exc_info=ex)
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        try:
            if reply is not None and context is not None:
                self._task["reply-pushed"] = True
                push_message(client, reply, context)
        except Exception as ex:  # pylint: disable=broad-exception-caught
            log(ERROR, "ClientApp worker: failed to push the reply", exc_info=ex)
            sub_status, details = SubStatus.FAILED, f"failed to push reply: {ex}"
        try:
            push_task_output(client, context, sub_status, details)
        except Exception as ex:  # pylint: disable=broad-exception-caught
            log(ERROR, "ClientApp worker: failed to push the task output: %s", ex)
        outcome = TaskOutcome(
            message.metadata.message_type if message is not None else "?",
            sub_status == SubStatus.COMPLETED, time.perf_counter() - t0, details,
        )
        self.outcomes.append(outcome)
        log(INFO, "ClientApp worker: %s task %s in %.2fs", outcome.message_type,
            "done" if outcome.ok else "FAILED", outcome.seconds)
        return outcome

    def _load(self, fab_id: str, fab_version: str, fab_hash: str, fab_content: bytes) -> ClientApp:
        """The ClientApp of this FAB: installed and imported once per FAB hash.

        The app's top-level packages are (re)imported from the FAB's install folder, not from
        wherever this process first found them (e.g. an editable install of the same project),
        so the worker runs exactly the code ``flwr run`` shipped.
        """
        if self._app is not None and self._app_hash == fab_hash:
            return self._app
        app_dir = Path(install_from_fab(fab_content, skip_prompt=True)).resolve()
        _unload_app_packages(app_dir, self._app_dir)
        from flwr.common.config import get_project_config  # noqa: PLC0415 - only here

        config = get_project_config(app_dir)
        ref = config["tool"]["flwr"]["app"]["components"]["clientapp"]
        client_app = load_app(ref, LoadClientAppError, app_dir)
        if not isinstance(client_app, ClientApp):
            raise LoadClientAppError(f"Attribute {ref} is not of type {ClientApp}")
        log(INFO, "ClientApp worker: loaded %s (%s %s, FAB %s) from %s", ref, fab_id, fab_version, fab_hash[:8], app_dir)
        self._app, self._app_hash, self._app_dir = client_app, fab_hash, app_dir
        return client_app


def _task_retry_invoker() -> RetryInvoker:
    """Retries for one task's calls: transport errors and 502/503/504 for up to a minute.

    Flower's ``make_simple_http_retry_invoker`` retries forever and SIGINTs its own process
    on a 401 (fine for a one-shot ``flwr-clientapp``); a long-running worker must instead
    give up on the task and serve the next one.
    """
    def giveup(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code not in (502, 503, 504)
        return False

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=10),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=60.0,
        should_giveup=giveup,
    )


def _heartbeat_fn(client: RuntimeHttpClient):
    """Task heartbeats; unlike flwr-clientapp's, a refused one does not SIGINT the process."""
    request = SendTaskHeartbeatRequest()

    def send() -> bool:
        try:
            res = client.SendTaskHeartbeat(request)
        except (httpx.TransportError, httpx.HTTPStatusError):
            return False
        if not res.success:
            log(WARNING, "ClientApp worker: the SuperNode no longer knows this task")
        return True

    return send


def _unload_app_packages(app_dir: Path, previous_dir: Path | None) -> None:
    """Forget the modules of the app's top-level packages and the previous app's sys.path entry.

    Third-party modules (torch, numpy, flwr) stay loaded: that is the point of a warm worker.
    """
    tops = {p.name for p in app_dir.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    tops |= {p.stem for p in app_dir.glob("*.py")}
    for name in list(sys.modules):
        if name.split(".")[0] in tops and name != __name__:
            del sys.modules[name]
    if previous_dir is not None:
        while str(previous_dir) in sys.path:
            sys.path.remove(str(previous_dir))


def main(argv: list[str] | None = None) -> None:
    """``python -m fedavg_relu.runtime.clientapp_worker``: serve one SuperNode until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description="Long-running ClientApp process for a SuperNode started "
                                     "with --isolation process.")
    parser.add_argument("--runtime-api-address", default="127.0.0.1:9094",
                        help="the SuperNode's Runtime API host:port (its --host/--port; default 127.0.0.1:9094)")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true",
                     help="plain HTTP to the Runtime API (the SuperNode's default; keep it on 127.0.0.1)")
    tls.add_argument("--root-certificates", help="CA of the Runtime API's TLS certificate")
    parser.add_argument("--superexec-auth-secret-file",
                        help="the file given to the SuperNode's --superexec-auth-secret-file")
    parser.add_argument("--poll-interval", type=float, default=0.1, help="seconds between polls (default 0.1)")
    parser.add_argument("--max-tasks", type=int, default=None, help="exit after this many tasks (tests)")
    parser.add_argument("--preload", action="append", default=[], metavar="MODULE",
                        help="import MODULE before the first task (e.g. torch), so round 1 does not wait for it")
    args = parser.parse_args(argv)
    for module in args.preload:
        t0 = time.perf_counter()
        importlib.import_module(module)
        log(INFO, "ClientApp worker: preloaded %s in %.1fs", module, time.perf_counter() - t0)
    secret = Path(args.superexec_auth_secret_file).read_bytes() if args.superexec_auth_secret_file else None
    worker = ClientAppWorker(
        args.runtime_api_address,
        insecure=args.root_certificates is None,
        root_certificates=args.root_certificates,
        superexec_auth_secret=secret,
        poll_interval=args.poll_interval,
    )

    def _terminate(signum, _frame):  # abandon the current task and exit
        if worker.stopped_by is not None:  # a second signal: now
            _exit(128 + signum)
        log(INFO, "ClientApp worker: signal %d, exiting (a task in progress is abandoned)", signum)
        threading.Thread(target=_exit_after, args=(EXIT_GRACE, 128 + signum), daemon=True).start()
        worker.terminate(signum)

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    try:
        worker.serve(max_tasks=args.max_tasks)
    except WorkerStopped:
        pass
    if worker.stopped_by is not None:
        log(INFO, "ClientApp worker: stopped by signal %d", worker.stopped_by)
        _exit(128 + worker.stopped_by)


def _exit(code: int) -> None:
    """Flush the logs and end the process now (no interpreter teardown: unloading torch takes seconds)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # pylint: disable=broad-exception-caught
            pass
    os._exit(code)


def _exit_after(seconds: float, code: int) -> None:
    """The watchdog of a stopping worker: exit ``seconds`` from now whatever the main thread does."""
    time.sleep(seconds)
    log(WARNING, "ClientApp worker: still busy %.0fs after the signal; exiting now", seconds)
    _exit(code)


if __name__ == "__main__":
    main()
