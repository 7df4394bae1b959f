"""Tests of how `fedavg-relu run` ends: exit codes from summary.json, interrupts, and every process stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedavg_relu.cli import report_interrupted, resume_command, run_outcome
from fedavg_relu.core.config import RunConfig
from fedavg_relu.runtime.flower_run import (
    RunInterrupted,
    descendants,
    kill_pids,
    pid_alive,
    processes_marked_by,
    raise_on_signals,
)
from fedavg_relu.core.results import read_summary, write_summary

APP_DIR = str(Path(__file__).resolve().parent.parent)


def _summary(status: str, reason: str = "", **extra) -> dict:
    base = {"status": status, "reason": reason, "rounds-completed": 2, "clients-failed": 0,
            "clients-rejected": 0, "run-dir": "/runs/x"}
    base.update(extra)
    return base


# --- the decision ---------------------------------------------------------------------------------
def test_completed_summary_and_completed_flower_run_exit_0(tmp_path):
    """Both say completed: exit 0, the summary's lines."""
    outcome = run_outcome(_summary("completed"), "finished:completed", 0, 7, tmp_path)
    assert outcome.exit_code == 0
    assert outcome.lines[0].startswith("fedavg-relu: run completed: 2 rounds")


def test_degraded_summary_exits_3_with_failures_and_unmeasured_in_the_final_lines(tmp_path):
    """summary.json says degraded (a node failed every round): exit 3, the first line counts failures and
    unmeasured clients, the reason is last."""
    reason = "1 node(s) failed in every round they were sampled (node 2: ValueError: 32 features, expected 64)"
    summary = _summary("degraded", reason, **{"clients-failed": 2, "clients-unmeasured": 0})
    outcome = run_outcome(summary, "finished:completed", 0, 7, tmp_path)
    assert outcome.exit_code == 3
    assert outcome.lines[0] == ("fedavg-relu: run DEGRADED: 2 rounds; client failures 2, rejected replies 0, "
                                "unmeasured clients 0")
    assert outcome.lines[-1] == f"fedavg-relu: degraded: {reason}"


def test_failed_summary_exits_1_with_the_reason_last(tmp_path):
    """Flower says finished:completed (as it does when every client failed), summary.json says failed: exit 1."""
    reason = "round 2: all 50 clients failed; Ray's memory monitor killed workers"
    outcome = run_outcome(_summary("failed", reason), "finished:completed", 0, 7, tmp_path)
    assert outcome.exit_code == 1
    assert outcome.lines[-1] == f"fedavg-relu: failed: {reason}"


def test_missing_summary_exits_1_and_says_so(tmp_path):
    """No summary.json: exit 1; the one line names the folder and Flower's own status."""
    outcome = run_outcome(None, "finished:failed", 0, 7, tmp_path)
    assert outcome.exit_code == 1
    assert f"no summary.json in {tmp_path}" in outcome.lines[-1]
    assert "finished:failed" in outcome.lines[-1]


def test_missing_summary_quotes_the_apps_first_error(tmp_path):
    """No summary.json, and the stream holds the app's ConfigError (3 lines) and a later Flower error: the app's is quoted."""
    output = (
        "Successfully started run 7\n"
        "\x1b[91mERROR \x1b[0m:     fedavg-relu: invalid run configuration (1 problem(s)):\n"
        "  - width=3: expected 64, the value of the checkpointed run\n"
        "\x1b[91mERROR \x1b[0m:     Exit Code: 700\n"
    )
    outcome = run_outcome(None, "finished:failed", 0, 7, tmp_path, output)
    assert outcome.lines[-1].endswith(
        "first error: invalid run configuration (1 problem(s)): - width=3: expected 64, the value of the checkpointed run"
    )
    assert run_outcome(None, "finished:failed", 0, 7, tmp_path, output.replace("fedavg-relu: ", "")).lines[-1].endswith(
        "first error: Exit Code: 700"
    )


def test_completed_summary_but_flower_failed_exits_1(tmp_path):
    """The ServerApp wrote completed but Flower reports a failure afterwards: exit 1, Flower's status last."""
    outcome = run_outcome(_summary("completed"), "finished:failed", 0, 7, tmp_path)
    assert outcome.exit_code == 1
    assert "finished:failed" in outcome.lines[-1]


def test_interrupted_summary_without_reason_exits_1(tmp_path):
    """A summary that says interrupted (the ServerApp's own) is no success either; a reason line is made up."""
    outcome = run_outcome(_summary("interrupted"), "finished:stopped", 0, 7, tmp_path)
    assert outcome.exit_code == 1
    assert outcome.lines[-1].startswith("fedavg-relu: interrupted: no reason given")


def test_resume_command_repeats_the_config_and_names_the_folder(tmp_path):
    """The user's overrides stay (the checkpoint needs the same config); resume, folder and name are set."""
    text = resume_command({"width": 64, "resume": False, "run-name": "old"}, tmp_path / "runs" / "r1")
    assert text.startswith('fedavg-relu run --run-config "')  # the README's quoting: single inside double
    assert "width=64" in text and "resume=true" in text and "resume=false" not in text and "'old'" not in text
    assert "run-name='r1'" in text and f"output-dir='{tmp_path / 'runs'}'" in text


def test_resume_command_parses_to_the_checkpointed_config(tmp_path):
    """The hint's --run-config, parsed as flwr parses it, gives the interrupted run's config up to resumable keys."""
    import shlex

    from fedavg_relu.flower.checkpoint import RESUMABLE_CHANGES
    from fedavg_relu.cli import parse_overrides, resolve

    user = {"dataset": "synthetic", "width": 64, "partitioner": "dirichlet", "dirichlet-alpha": 0.3, "verbose": True}
    run_dir = tmp_path / "my runs" / "r 1"
    ran = resolve(Path(APP_DIR), {**user, "output-dir": str(run_dir.parent), "run-name": run_dir.name})
    argv = shlex.split(resume_command(user, run_dir))
    assert argv[:4] == ["fedavg-relu", "run", "--run-config", argv[3]] and len(argv) == 4
    resumed = resolve(Path(APP_DIR), parse_overrides([argv[3]]))
    assert resumed.resume is True
    differ = {k for k, v in resumed.to_mapping().items() if ran.to_mapping()[k] != v}
    assert differ <= RESUMABLE_CHANGES and "resume" in differ


def test_report_interrupted_writes_the_summary_when_the_serverapp_did_not(tmp_path):
    """metrics.jsonl reaches round 3 of 10: summary.json says interrupted after round 3; the hint comes last."""
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in range(4)))
    cfg = RunConfig.from_mapping({"num-server-rounds": 10})
    lines = report_interrupted(signal.SIGTERM, run_dir, cfg, {}, since=time.time() - 5)
    summary = read_summary(run_dir)
    assert (summary["status"], summary["rounds-completed"]) == ("interrupted", 3)
    assert summary["reason"] == "SIGTERM after round 3 of 10"
    assert "interrupted by SIGTERM after round 3 of 10" in lines[0]
    assert "resume=true" in lines[-1]


def test_report_interrupted_keeps_a_summary_written_by_this_attempt(tmp_path):
    """A summary.json newer than the start but older than the signal is the ServerApp's own verdict: left as it is."""
    start = time.time() - 5
    write_summary(tmp_path, "failed", "all clients failed in round 1")
    report_interrupted(signal.SIGINT, tmp_path, RunConfig(), {}, since=start, interrupted_at=time.time() + 1)
    assert read_summary(tmp_path)["status"] == "failed"


def test_a_failure_written_after_the_signal_is_the_interrupts_echo(tmp_path):
    """Ctrl-C stops the clients under a running round; the ServerApp may record that round's loss as a
    failure before it stops itself. Written after the signal, it becomes "interrupted" (the ServerApp's
    reason kept in the text); a "completed" written after the signal stands (the run had finished)."""
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in range(3)))
    cfg = RunConfig.from_mapping({"num-server-rounds": 40})
    signal_at = time.time() - 1
    write_summary(tmp_path, "failed", "round 3 lost every client")
    report_interrupted(signal.SIGINT, tmp_path, cfg, {}, since=signal_at - 10, interrupted_at=signal_at)
    summary = read_summary(tmp_path)
    assert summary["status"] == "interrupted"
    assert summary["reason"] == "SIGINT after round 2 of 40 (while stopping, the ServerApp reported: round 3 lost every client)"
    write_summary(tmp_path, "completed", "")
    report_interrupted(signal.SIGINT, tmp_path, cfg, {}, since=signal_at - 10, interrupted_at=signal_at)
    assert read_summary(tmp_path)["status"] == "completed"


# --- signals and processes ----------------------------------------------------------------------
def test_raise_on_signals_raises_once_then_ignores():
    """SIGTERM -> RunInterrupted (exit 143); a second signal in the same block is ignored; handlers restored."""
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted) as info:
        with raise_on_signals():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            except RunInterrupted:
                os.kill(os.getpid(), signal.SIGINT)  # ignored: no KeyboardInterrupt
                time.sleep(0.2)
                raise
    assert info.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before


_MARKED_CHILD = r"""
import os, subprocess, sys, time
from fedavg_relu.runtime.flower_run import processes_marked_by
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
time.sleep(0.5)
found = processes_marked_by([os.environ["MARK"]])
print(grandchild.pid, int(os.getpid() in found), int(grandchild.pid in found), flush=True)
time.sleep(60)
"""


def test_marked_processes_are_found_in_other_sessions_but_never_the_caller(tmp_path):
    """A child (marker in its environment) scans /proc: it finds its grandchild in another session, not itself.

    From here, kill_pids stops both by PID (SIGTERM) within seconds.
    """
    mark = f"FEDAVG_RELU_TEST_MARK={tmp_path}"
    env = dict(os.environ, MARK=mark, FEDAVG_RELU_TEST_MARK=str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", _MARKED_CHILD], env=env, stdout=subprocess.PIPE, text=True)
    try:
        grandchild, self_found, grandchild_found = map(int, child.stdout.readline().split())
        assert (self_found, grandchild_found) == (0, 1)
        assert processes_marked_by([mark]) == {child.pid, grandchild}
        assert descendants(child.pid) == {grandchild}  # another session, still a child
    except ValueError:
        pytest.fail("the marked child printed nothing")
    finally:
        found = processes_marked_by([mark])
        kill_pids({pid: None for pid in found}, grace=3.0)
        child.wait(timeout=10)
    assert not any(pid_alive(pid) for pid in found)
    assert processes_marked_by([mark]) == set()


# --- end to end ---------------------------------------------------------------------------------
def _processes_naming(*paths: Path) -> set[int]:
    """PIDs (not this one) whose environment or command line mentions one of ``paths``."""
    needles = [str(p).encode() for p in paths]
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                environ = fh.read()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        if any(n in environ or n in cmdline for n in needles):
            found.add(int(entry))
    return found


@pytest.mark.e2e
def test_sigint_stops_every_process_and_says_how_to_resume(tmp_path):
    """`fedavg-relu run` (tiny synthetic run, 2 clients, width 64) gets a terminal's Ctrl-C after round 1.

    SIGINT goes to the wrapper's whole process group, as a terminal sends it. The wrapper exits 130
    within seconds, without a traceback, says at which round it stopped (the last round in
    metrics.jsonl) and how to resume; summary.json says interrupted; a few seconds later no process
    whose environment or command line names the run's FLWR_HOME or the wrapper's Ray temp dir is left.
    """
    home, runs = tmp_path / "flwr-home", tmp_path / "runs"
    run_config = (
        f'dataset="synthetic" synthetic-num-examples=200 width=64 num-server-rounds=40 num-partitions=2 '
        f'local-steps=2 output-dir="{runs}" run-name="sig"'
    )
    cmd = [sys.executable, "-m", "fedavg_relu.cli", "run", "--app", APP_DIR, "--flwr-home", str(home),
           "--run-config", run_config]
    env = dict(os.environ, PYTHONUNBUFFERED="1", FEDAVG_RELU_HOME=str(tmp_path))
    out = open(tmp_path / "out.txt", "w+")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    metrics = runs / "sig" / "metrics.jsonl"

    def rounds() -> list[int]:
        try:
            return [json.loads(line)["round"] for line in metrics.read_text().splitlines() if line.strip()]
        except (OSError, ValueError):
            return []

    try:
        deadline = time.monotonic() + 240  # round 1 needs Ray and the actors up: ~25 s idle, minutes on a busy machine
        while time.monotonic() < deadline and proc.poll() is None and max(rounds(), default=-1) < 1:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert max(rounds(), default=-1) >= 1, "round 1 never reached metrics.jsonl"
        running = _processes_naming(home)
        assert len(running) >= 4  # superlink, superexec, flwr run, flwr-simulation, Ray ...
        t_signal = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        returncode = proc.wait(timeout=60)
        seconds = time.monotonic() - t_signal
        time.sleep(3)
        left = _processes_naming(home) | (running & {p for p in running if pid_alive(p)})
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _processes_naming(home):
            os.kill(pid, signal.SIGKILL)
    out.seek(0)
    output = out.read()
    assert returncode == 130, output[-3000:]
    assert seconds < 30, f"took {seconds:.0f}s to stop"
    assert "Traceback" not in output, output[-3000:]
    last = max(rounds())
    assert 1 <= last < 40
    assert f"interrupted by SIGINT after round {last} of 40" in output
    assert "resume=true" in output.splitlines()[-1] and "run-name='sig'" in output.splitlines()[-1]
    summary = read_summary(runs / "sig")
    assert summary["status"] == "interrupted", summary
    assert left == set(), f"still alive: {left}"


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_malformed_run_config_string_exits_2_naming_it_without_a_traceback(command, capsys):
    """`partitioner=dirichlet` (a string without quotes) is refused by flwr's parser: exit 2 before
    anything starts, one problem line that quotes the string and shows the quoted form, no traceback."""
    from fedavg_relu.cli import main

    assert main([command, "--app", APP_DIR, "-c", "partitioner=dirichlet"]) == 2
    err = capsys.readouterr().err
    assert "--run-config 'partitioner=dirichlet'" in err and 'partitioner=\\"dirichlet\\"' not in err
    # the fix it shows is quoted as the README quotes: string values in single quotes inside double quotes
    assert '--run-config "num-server-rounds=3 partitioner=\'dirichlet\'' in err and "Traceback" not in err
