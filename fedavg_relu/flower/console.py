"""A quiet console: Flower's per-round dump kept out of it, a short final summary.

Flower's ``Strategy.start`` (``flwr/serverapp/strategy/``) logs at INFO, every
round, the aggregated ``MetricRecord`` (about 50 keys here), the sampling
details of ``configure_train`` / ``configure_evaluate``, round headers, and at
the end the whole per-key history: most of a default run's console. The
ServerApp logs its own one line per round, and the full metrics live in the run
folder's files. :func:`quiet_flower_logs` drops Flower's INFO/DEBUG records
from those modules at the source (the ``flwr`` logger), so they reach neither
the console nor the log stream that ``flwr run --stream`` shows. Warnings and
errors always pass; ``verbose=True`` (run-config ``verbose``, or
``fedavg-relu run --verbose``) lets everything through.

:func:`format_summary` turns a run folder's ``summary.json``
(:func:`fedavg_relu.core.results.write_summary`) into the few closing lines: status,
rounds, counts of failed and rejected clients, where the outputs are, and, when
the run did not complete, the reason as the last line.

:func:`is_noise_line` is the wrapper's side: lines of the echoed ``flwr run``
stream that carry no information for a user (banners, federation hints,
Flower's own summary lines) unless ``--verbose``.

Only the standard library is imported here.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

FLOWER_LOGGER_NAME = "flwr"  # flwr.supercore.logger.LOGGER_NAME


def _flower_noise_dirs() -> tuple[str, ...]:
    """Folders of the installed flwr whose INFO records are the per-round dump (found without importing flwr)."""
    import importlib.util

    spec = importlib.util.find_spec("flwr")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return tuple(os.path.join(os.path.realpath(root), "serverapp", "strategy") + os.sep for root in roots)


# INFO lines of Flower's strategy modules that still tell a user something: kept.
_KEEP = ("Waiting for nodes to connect", "Received error in reply from node")


class FlowerDumpFilter(logging.Filter):
    """Drops INFO/DEBUG records logged from Flower's strategy modules; keeps warnings, errors and every other record.

    Two INFO lines of those modules stay: "Waiting for nodes to connect" (a
    run that waits for SuperNodes says so) and "Received error in reply from
    node" (a client failure).
    """

    def __init__(self, noisy_dirs: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.noisy_dirs = _flower_noise_dirs() if noisy_dirs is None else tuple(noisy_dirs)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        path = os.path.realpath(record.pathname) if record.pathname else ""
        if not any(path.startswith(folder) for folder in self.noisy_dirs):
            return True
        return any(keep in str(record.msg) for keep in _KEEP)


def quiet_flower_logs(verbose: bool) -> None:
    """Keep Flower's per-round dump off the console (unless ``verbose``); idempotent.

    Installs one :class:`FlowerDumpFilter` on the ``flwr`` logger, or removes it
    when ``verbose`` is true. Flower logs every record through that logger
    itself (``flwr.common.logger.log``), so a logger filter stops them before
    any handler (console or log uploader) sees them.
    """
    logger = logging.getLogger(FLOWER_LOGGER_NAME)
    ours = [f for f in logger.filters if isinstance(f, FlowerDumpFilter)]
    if verbose:
        for flt in ours:
            logger.removeFilter(flt)
    elif not ours:
        logger.addFilter(FlowerDumpFilter())


# --- the closing summary ------------------------------------------------------
SUMMARY_PREFIX = "fedavg-relu: "
_STATUS_WORDS = {"completed": "run completed", "degraded": "run DEGRADED", "failed": "run FAILED", "interrupted": "run INTERRUPTED"}


def format_summary(summary: Mapping[str, Any]) -> str:
    """The closing lines of a run from its ``summary.json`` mapping (no trailing newline).

    Line 1: status, rounds done (of ``num-server-rounds`` when known), failed
    and rejected clients. Line 2: the output folder. When the status is not
    ``completed`` and a reason is given, the reason is the last line.
    """
    status = str(summary.get("status", "unknown"))
    rounds = summary.get("rounds-completed")
    total = summary.get("num-server-rounds")
    if rounds is None:
        done = "rounds unknown"
    elif total is not None:
        done = f"{rounds} of {total} rounds"
    else:
        done = f"{rounds} round{'' if rounds == 1 else 's'}"
    failed = int(summary.get("clients-failed") or 0)
    rejected = int(summary.get("clients-rejected") or 0)
    unmeasured = int(summary.get("clients-unmeasured") or 0)
    lines = [
        f"{SUMMARY_PREFIX}{_STATUS_WORDS.get(status, 'run ' + status)}: {done}; "
        f"client failures {failed}, rejected replies {rejected}, unmeasured clients {unmeasured}"
    ]
    if summary.get("run-dir"):
        lines.append(f"{SUMMARY_PREFIX}outputs in {summary['run-dir']}")
    reason = str(summary.get("reason") or "").strip()
    if reason and status != "completed":
        lines.append(f"{SUMMARY_PREFIX}{status}: {' '.join(reason.split())}")
    return "\n".join(lines)


# --- the wrapper's echo -------------------------------------------------------
_ACTOR_PREFIX = re.compile(r"^\((?:pid=\d+|\w+ pid=\d+)(?:, ip=[^)]*)?\)\s*")  # Ray's "(ClientAppActor pid=7822) "
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LEVEL_PREFIX = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s*")
_NOISE = tuple(
    re.compile(p)
    for p in (
        r"^$",
        r"^Flower configuration not found\. Created default configuration",
        r"^Using SuperLink: ",
        r"^Successfully installed .* to ",
        r"^Starting logstream for run_id",
        r"^Starting Flower Simulation",
        r"^Since flwr 1\.32, default simulated SuperNodes changed",
        r"^Federation `[^`]*` \(\d+ simulated SuperNodes\)",
        r"^To change federation size, use the following command",
        r"^flwr federation simulation-config ",
        r"^fraction_evaluate is set to 0\.0\. Federated evaluation will be skipped\.$",
        r"^Manually terminating ClientAppActor$",
        r"^\[mutex\.cc : \d+\] RAW: ",  # abseil's mutex tracing from a Ray worker
        r"^fedavg-relu: simulation runtime picks up messages",
        r"^fedavg-relu: (run completed|run FAILED|run INTERRUPTED|outputs in |failed: |interrupted: )",
    )
)


def split_level(line: str) -> tuple[str | None, str]:
    """``(level, message)`` of a streamed log line: Flower's ``INFO``/``ERROR``/... (``None`` when the line has no
    level prefix) and the text without colour codes, Ray's actor prefix and the level prefix, stripped."""
    text = _ACTOR_PREFIX.sub("", _ANSI.sub("", line).strip())
    match = _LEVEL_PREFIX.match(text)
    return (match.group(1), text[match.end() :].strip()) if match else (None, text.strip())


def strip_level(line: str) -> str:
    """``line`` without Ray's actor prefix, Flower's ``INFO :`` / ``WARNING :`` prefix and colour codes, stripped."""
    return split_level(line)[1]


def is_noise_line(line: str) -> bool:
    """True for a line of the ``flwr run --stream`` echo that a default (non-verbose) console leaves out.

    Flower's banners and federation hints, the empty lines around them, and
    the ServerApp's own closing summary (the wrapper prints it from
    ``summary.json`` instead, so it is shown once, last).
    """
    text = strip_level(line)
    return any(p.search(text) for p in _NOISE)
