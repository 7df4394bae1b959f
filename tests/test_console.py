"""Tests of fedavg_relu/flower/console.py and summary.json (results.write_summary / read_summary)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from fedavg_relu.flower.console import (
    FlowerDumpFilter,
    format_summary,
    is_noise_line,
    quiet_flower_logs,
    strip_level,
)
from fedavg_relu.core.results import SUMMARY_NAME, read_summary, write_summary


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def flwr_capture():
    """Records that pass the ``flwr`` logger's filters; the logger's filters are restored afterwards."""
    from flwr.common.logger import FLOWER_LOGGER

    saved, level = list(FLOWER_LOGGER.filters), FLOWER_LOGGER.level
    FLOWER_LOGGER.setLevel(logging.DEBUG)  # other code in this process (sweeps, benchmarks) may have raised it
    handler = _Capture()
    FLOWER_LOGGER.addHandler(handler)
    yield FLOWER_LOGGER, handler
    FLOWER_LOGGER.removeHandler(handler)
    FLOWER_LOGGER.filters[:] = saved
    FLOWER_LOGGER.setLevel(level)


def _strategy_record(logger: logging.Logger, level: int, msg: str, *args) -> logging.LogRecord:
    """A record as Flower's Strategy.start makes it (its pathname is flwr/serverapp/strategy/strategy.py)."""
    import flwr.serverapp.strategy.strategy as strategy_module

    return logger.makeRecord(logger.name, level, strategy_module.__file__, 232, msg, args, None, "start")


def test_quiet_filter_drops_flower_round_dump_and_keeps_warnings(flwr_capture):
    """Quiet: Flower's Aggregated MetricRecord dump and FedAvg.summary() lines go; its WARNING and our own lines stay."""
    from flwr.common.logger import log
    from flwr.serverapp.strategy import FedAvg

    logger, captured = flwr_capture
    quiet_flower_logs(verbose=False)
    logger.handle(_strategy_record(logger, logging.INFO, "\t└──> Aggregated MetricRecord: %s", {"train-loss": 0.5}))
    FedAvg().summary()  # real Flower INFO lines from flwr/serverapp/strategy/fedavg.py
    FedAvg(fraction_evaluate=0.0)  # real Flower WARNING from the same module
    logger.handle(_strategy_record(logger, logging.ERROR, "strategy broke"))
    logger.handle(_strategy_record(logger, logging.INFO, "Waiting for nodes to connect: %d connected", 2))
    log(logging.INFO, "round   1/2  test-loss 0.5")  # the project's own line (logged from this file)
    assert not any("Aggregated MetricRecord" in m or "Sampling" in m or "Keys in records" in m for m in captured.messages)
    assert captured.messages == [
        "fraction_evaluate is set to 0.0. Federated evaluation will be skipped.",
        "strategy broke",
        "Waiting for nodes to connect: 2 connected",
        "round   1/2  test-loss 0.5",
    ]


def test_quiet_flower_logs_is_idempotent_and_verbose_lets_everything_through(flwr_capture):
    """Two quiet calls install one filter; verbose removes it and the dump is shown again."""
    from flwr.serverapp.strategy import FedAvg

    logger, captured = flwr_capture
    quiet_flower_logs(False)
    quiet_flower_logs(False)
    assert sum(isinstance(f, FlowerDumpFilter) for f in logger.filters) == 1
    quiet_flower_logs(True)
    assert not any(isinstance(f, FlowerDumpFilter) for f in logger.filters)
    FedAvg().summary()
    assert any("Sampling" in m for m in captured.messages)


def test_filter_decides_by_the_record_source_folder(tmp_path):
    """With a given noisy folder: INFO from inside it is dropped, INFO from elsewhere and WARNING from inside pass."""
    noisy = str(tmp_path / "strategy") + os.sep
    flt = FlowerDumpFilter((noisy,))
    inside = logging.makeLogRecord({"pathname": noisy + "fedavg.py", "levelno": logging.INFO, "msg": "dump"})
    outside = logging.makeLogRecord({"pathname": str(tmp_path / "ours.py"), "levelno": logging.INFO, "msg": "x"})
    warning = logging.makeLogRecord({"pathname": noisy + "fedavg.py", "levelno": logging.WARNING, "msg": "w"})
    assert (flt.filter(inside), flt.filter(outside), flt.filter(warning)) == (False, True, True)


def test_format_summary_completed():
    """A completed run: status, rounds of total, failure counts and the folder; no reason line."""
    text = format_summary({
        "status": "completed", "reason": "", "rounds-completed": 3, "num-server-rounds": 3,
        "clients-failed": 2, "clients-rejected": 1, "run-dir": "/runs/a",
    })
    lines = text.splitlines()
    assert lines[0].startswith("fedavg-relu: run completed: 3 of 3 rounds")
    assert "client failures 2" in lines[0] and "rejected replies 1" in lines[0]
    assert lines[1] == "fedavg-relu: outputs in /runs/a"
    assert len(lines) == 2


def test_format_summary_failed_puts_the_reason_last():
    """A failed run: the reason (whitespace collapsed to one line) is the last line."""
    text = format_summary({
        "status": "failed", "reason": "round 2: all 50 clients failed\n(Ray killed workers)",
        "rounds-completed": 1, "clients-failed": 50, "clients-rejected": 0, "run-dir": "/runs/b",
    })
    lines = text.splitlines()
    assert "run FAILED: 1 round;" in lines[0] and "client failures 50" in lines[0]
    assert lines[-1] == "fedavg-relu: failed: round 2: all 50 clients failed (Ray killed workers)"


def test_noise_lines_of_the_echo():
    """Banners and Flower's federation hints are noise; the per-round line and client errors are not."""
    assert is_noise_line("\x1b[92mINFO \x1b[0m:      Starting Flower Simulation\n")
    assert is_noise_line("(ClientAppActor pid=7822) WARNING :   Manually terminating ClientAppActor")
    assert is_noise_line("\x1b[36m(ClientAppActor pid=13994)\x1b[0m \x1b[93mWARNING \x1b[0m:   Manually terminating ClientAppActor")
    assert is_noise_line("\x1b[92mINFO \x1b[0m:      \n")
    assert is_noise_line("(pid=18621) [mutex.cc : 452] RAW: Lock blocking 0x559217bdbf10   @ 0x7f1aceb98752")
    assert not is_noise_line("\x1b[92mINFO \x1b[0m:      round   1/10  train-loss 0.6643  test-acc 0.142  80.9s")
    assert not is_noise_line("WARNING :   round 2: no update was aggregated; the global model is unchanged")
    assert strip_level("\x1b[93mWARNING \x1b[0m:   something odd ") == "something odd"


def test_write_summary_defaults_from_metrics_and_reads_back(tmp_path):
    """Counts default to metrics.jsonl: last round 2; failed 1 + 3 = 4; rejected 0 + 2 = 2; extras are kebab-cased."""
    rows = [
        {"round": 0, "test-loss": 1.0},
        {"round": 1, "clients-failed": 1, "clients-rejected": 0},
        {"round": 2, "clients-failed": 3, "clients-rejected": 2},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write_summary(tmp_path, "failed", "all clients failed in round 3", num_server_rounds=5)
    assert path == tmp_path.resolve() / SUMMARY_NAME
    summary = read_summary(tmp_path)
    assert summary is not None
    assert (summary["status"], summary["reason"]) == ("failed", "all clients failed in round 3")
    assert (summary["rounds-completed"], summary["clients-failed"], summary["clients-rejected"]) == (2, 4, 2)
    assert summary["run-dir"] == str(tmp_path.resolve()) and summary["num-server-rounds"] == 5


def test_write_summary_explicit_fields_win_and_no_temporary_file_is_left(tmp_path):
    """Given counts override the metrics file's; the folder holds only summary.json afterwards (atomic rename)."""
    write_summary(tmp_path, "completed", "", rounds_completed=7, clients_failed=0, clients_rejected=0)
    write_summary(tmp_path, "interrupted", "SIGINT after round 3", rounds_completed=3)
    assert [p.name for p in tmp_path.iterdir()] == [SUMMARY_NAME]
    summary = read_summary(tmp_path)
    assert (summary["status"], summary["rounds-completed"], summary["clients-failed"]) == ("interrupted", 3, 0)


def test_write_summary_rejects_an_unknown_status(tmp_path):
    """Only completed / failed / interrupted."""
    with pytest.raises(ValueError, match="status='done'"):
        write_summary(tmp_path, "done", "")
    assert not (tmp_path / SUMMARY_NAME).exists()


def test_read_summary_missing_or_broken_is_none(tmp_path):
    """No file, or a file that is not a JSON object: None."""
    assert read_summary(tmp_path) is None
    Path(tmp_path / SUMMARY_NAME).write_text("[1, 2]")
    assert read_summary(tmp_path) is None
