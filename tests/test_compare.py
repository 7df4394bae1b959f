"""Tests of fedavg_relu/experiments/compare.py: parsing, the summary numbers, and a tiny real comparison."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from fedavg_relu.experiments.compare import parse_comparison, rounds_to_target, run_comparison, summarize
from fedavg_relu.core.config import ConfigError


def test_rounds_to_target():
    """Loss (0.9, 0.5, 0.2, 0.1) by round (1..4): first <= 0.3 is round 3; target 0.01 is never reached -> NaN."""
    rounds, loss = [1, 2, 3, 4], [0.9, 0.5, 0.2, 0.1]
    assert rounds_to_target(rounds, loss, 0.3) == 3.0
    assert math.isnan(rounds_to_target(rounds, loss, 0.01))


def test_bad_strategy_in_comparison_is_named_with_choices():
    """An unknown strategy name in [compare] is refused with the valid names."""
    with pytest.raises(ConfigError, match=r"'fedsgd' is not a strategy; expected names from fedavg, .*fednova"):
        parse_comparison({"compare": {"strategies": ["fedavg", "fedsgd"]}})


def test_misspelled_compare_key_gets_the_closest_key():
    """compare.stratgies is refused, naming 'strategies' as the key meant."""
    with pytest.raises(ConfigError, match=r"compare\.stratgies=\['fedavg'\]: unknown key \(did you mean 'strategies'\?\)"):
        parse_comparison({"compare": {"stratgies": ["fedavg"]}})


def test_dotted_partition_name_gets_a_clear_error():
    """[partitions.dirichlet-0.1] unquoted nests a table: the error says to quote the name."""
    with pytest.raises(ConfigError, match="quote names that contain dots"):
        parse_comparison({"partitions": {"dirichlet-0": {"1": {"partitioner": "dirichlet"}}}})


def test_comparison_becomes_one_grid_per_partition(tmp_path):
    """2 strategies x 3 seeds x 2 partitions = 12 cells, groups named after the partitions."""
    spec, target = parse_comparison(
        {
            "compare": {"strategies": ["fedavg", "scaffold"], "seeds": [0, 1, 2], "target-loss": 0.5},
            "base": {"dataset": "synthetic", "width": 16},
            "partitions": {"iid": {"partitioner": "iid"}, "skewed": {"partitioner": "dirichlet", "dirichlet-alpha": 0.1}},
        },
        output_dir=tmp_path,
    )
    cells = spec.cells()
    assert target == 0.5 and len(cells) == 12
    assert {c.groups[0] for c in cells} == {"iid", "skewed"}
    assert {(c.config.strategy, c.config.seed) for c in cells if c.groups[0] == "skewed"} == {
        (s, k) for s in ("fedavg", "scaffold") for k in (0, 1, 2)
    }


def test_summary_numbers_on_a_hand_made_table():
    """Two seeds of one strategy: final losses 0.2 and 0.4 -> mean 0.3, std 0.1; target 0.3 reached at rounds 2 and never."""
    rows = []
    for seed, losses in ((0, [0.5, 0.25, 0.2]), (1, [0.6, 0.5, 0.4])):
        for r, loss in enumerate(losses, start=1):
            rows.append({"group": "iid", "strategy": "fedavg", "seed": seed, "round": r, "global-loss": loss,
                         "test-accuracy": 0.5 + 0.1 * r, "gradient-drift-mean": 1.0 * seed,
                         "relative-gradient-drift-mean": 0.1, "model-divergence": 2.0})
    out = summarize(pd.DataFrame(rows), target=0.3).iloc[0]
    assert out["final-global-loss-mean"] == pytest.approx(0.3)
    assert out["final-global-loss-std"] == pytest.approx(0.1)
    assert out["rounds-to-target-mean"] == 2.0 and out["seeds-reaching-target"] == 1
    assert out["mean-gradient-drift-mean"] == pytest.approx(0.5)
    assert out["best-test-accuracy-mean"] == pytest.approx(0.8)


def test_tiny_comparison_writes_table_and_figures(tmp_path):
    """fedavg vs fednova, 1 seed, 2 rounds: comparison.csv has one row per strategy, figures exist; rerun skips all."""
    data = {
        "compare": {"strategies": ["fedavg", "fednova"], "seeds": [0], "target-loss": 10.0},
        "base": {"dataset": "synthetic", "synthetic-num-examples": 80, "num-partitions": 2, "width": 16,
                 "num-server-rounds": 2},
        "partitions": {"iid": {"partitioner": "iid"}},
    }
    spec, target = parse_comparison(data, output_dir=tmp_path)
    md = run_comparison(spec, target, progress=False)
    table = pd.read_csv(tmp_path / "comparison.csv")
    assert list(table["strategy"]) == ["fedavg", "fednova"]
    assert (table["rounds-to-target-mean"] == 1.0).all()  # loss < 10 after round 1
    assert "| iid | fednova |" in md.read_text()
    assert (tmp_path / "figures" / "compare-iid.png").stat().st_size > 1000
    from fedavg_relu.experiments.sweep import run_sweep

    assert run_sweep(spec, progress=False).ran == []


@pytest.mark.e2e
def test_notebook_02_small_mode_executes(tmp_path):
    """notebooks/02_compare_strategies.ipynb in small mode runs every cell without error and prints its findings."""
    from pathlib import Path

    import nbformat
    from nbclient import NotebookClient

    root = Path(__file__).resolve().parent.parent
    nb = nbformat.read(root / "notebooks" / "02_compare_strategies.ipynb", as_version=4)
    assert nb.cells[1].source.strip().startswith('MODE = "small"')
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(root / "notebooks")}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "small mode: 8 runs" in outputs
    assert "FedAvg mean relative drift" in outputs and "SCAFFOLD / FedAvg drift ratio" in outputs


# --- the command line: steering a comparison ------------------------------------------------
ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
TINY_FILE = """\
[compare]
name = "tiny"
output-dir = "results/tiny"
strategies = ["fedavg", "fedprox", "scaffold"]
seeds = [0, 1, 2]
target-loss = 10.0

[base]
dataset = "synthetic"
synthetic-num-examples = 40
synthetic-input-dim = 6
synthetic-num-classes = 3
num-partitions = 2
batch-size = "full"
local-steps = 2
width = 16
num-server-rounds = 8

[partitions.iid]
partitioner = "iid"
"""


def test_override_comparison_replaces_strategies_seeds_and_rounds():
    """--strategies/--seeds replace [compare]'s lists; --rounds sets [base] and leaves partition tables; the
    file's mapping itself is untouched."""
    from fedavg_relu.experiments.compare import override_comparison

    data = {"compare": {"strategies": ["fedavg"], "seeds": [0]}, "base": {"num-server-rounds": 8},
            "partitions": {"iid": {"partitioner": "iid", "num-server-rounds": 5}}}
    out = override_comparison(data, strategies=["scaffold"], seeds=[3, 4], rounds=2, tracker="mlflow")
    assert out["compare"] == {"strategies": ["scaffold"], "seeds": [3, 4]}
    assert out["base"] == {"num-server-rounds": 2, "tracker": "mlflow"} and out["partitions"]["iid"] == {"partitioner": "iid"}
    assert data["partitions"]["iid"]["num-server-rounds"] == 5 and data["compare"]["seeds"] == [0]


def test_cli_compare_dry_run_prints_the_narrowed_cells_outside_results(tmp_path, capsys, monkeypatch):
    """`compare compare/strategies.toml --strategies fedavg,scaffold --seeds 1 --rounds 2 --dry-run`: 2 strategies x
    1 seed x 2 partitions = 4 todo cells, each with seed 1 and 2 rounds, into runs/compare/strategies; nothing written."""
    from fedavg_relu.cli import main

    monkeypatch.setenv("FEDAVG_RELU_HOME", str(tmp_path))
    argv = ["compare", str(ROOT / "compare" / "strategies.toml"), "--strategies", "fedavg,scaffold", "--seeds", "1",
            "--rounds", "2", "--dry-run"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    cells = [line for line in lines if line.startswith("todo")]
    assert len(cells) == 4 and all(line.endswith("seed=1") for line in cells)
    assert sorted(line.split("strategy=")[1].split()[0] for line in cells) == ["fedavg", "fedavg", "scaffold", "scaffold"]
    assert lines[-1] == f"4 cells; outputs in {tmp_path / 'runs' / 'compare' / 'strategies'}"
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
    from fedavg_relu.experiments.compare import load_comparison

    spec, _ = load_comparison(ROOT / "compare" / "strategies.toml", tmp_path, strategies=["fedavg"], rounds=2)
    assert {c.config.num_server_rounds for c in spec.cells()} == {2}


def test_cli_compare_refuses_bad_steering(tmp_path, capsys, monkeypatch):
    """--results with --seeds (a partial rebuild of committed tables), a misspelled strategy (closest name offered)
    and --seeds that are no integers each exit 2 with one clear line."""
    from fedavg_relu.cli import main

    monkeypatch.setenv("FEDAVG_RELU_HOME", str(tmp_path))
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_FILE)
    assert main(["compare", str(path), "--results", "--seeds", "1", "--dry-run"]) == 2
    assert "--results: rebuilds the committed tables from the file as it is" in capsys.readouterr().err
    assert main(["compare", str(path), "--strategies", "fedavg,scafold", "--dry-run"]) == 2
    assert "'scafold' is not a strategy; expected names from fedavg" in (err := capsys.readouterr().err)
    assert "(did you mean 'scaffold'?)" in err
    assert main(["compare", str(path), "--seeds", "one", "--dry-run"]) == 2
    assert "--seeds='one': expected comma-separated integers" in capsys.readouterr().err


def test_cli_compare_runs_narrowed_cells_outside_results_and_results_flag_writes_there(tmp_path, capsys, monkeypatch):
    """--strategies fedavg,scaffold --seeds 1 --rounds 2: 2 cells run into runs/compare/tiny, the table has both
    strategies and 1 seed, results/ stays empty; --results --dry-run points at the file's compare.output-dir."""
    from fedavg_relu.cli import main

    monkeypatch.setenv("FEDAVG_RELU_HOME", str(tmp_path))
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_FILE)
    assert main(["compare", str(path), "--strategies", "fedavg,scaffold", "--seeds", "1", "--rounds", "2",
                 "--no-progress"]) == 0
    out = tmp_path / "runs" / "compare" / "tiny"
    table = pd.read_csv(out / "comparison.csv")
    assert list(table["strategy"]) == ["fedavg", "scaffold"] and set(table["seeds"]) == {1}
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics["seed"]) == {1} and metrics["round"].max() == 2
    assert not (tmp_path / "results").exists()
    capsys.readouterr()
    assert main(["compare", str(path), "--results", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"9 cells; outputs in {tmp_path / 'results' / 'tiny'}"


@pytest.mark.e2e
def test_ctrl_c_on_compare_prints_one_line_to_resume_and_records_the_reason(tmp_path):
    """SIGINT while the first cell runs (300 rounds): exit 130, no traceback, one line naming the command that
    resumes; the cell's summary.json says interrupted, 'interrupted by SIGINT'. The command it names then
    finishes the comparison."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "tiny.toml"
    path.write_text(TINY_FILE.replace("num-server-rounds = 8", "num-server-rounds = 300"))
    env = {**os.environ, "FEDAVG_RELU_HOME": str(tmp_path)}
    argv = ["compare", str(path), "--strategies", "fedavg", "--seeds", "0", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "fedavg_relu.cli", *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "runs" / "compare" / "tiny" / "runs"
    deadline = time.monotonic() + 300
    while not list(runs.glob("*/metrics.jsonl")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # a few rounds in
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err, err[-3000:]
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 1, lines  # the one line, nothing else (no Flower error line, no bar with --no-progress)
    assert lines[0].startswith("fedavg-relu compare: interrupted by SIGINT; finished cells are kept in "), lines
    assert lines[0].endswith("resume with: fedavg-relu " + " ".join(argv[:1] + [str(path)] + argv[2:]))
    (run_dir,) = runs.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["reason"] == "interrupted by SIGINT"
    done = subprocess.run(  # the resume command: the unfinished cell runs again, and the comparison is written
        [sys.executable, "-m", "fedavg_relu.cli", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "| iid | fedavg |" in done.stdout, done.stderr[-3000:]


@pytest.mark.e2e
def test_ctrl_c_with_jobs_stops_the_workers_and_marks_every_cell_under_way(tmp_path):
    """--jobs 2, SIGINT to the parent once both cells write rounds: exit 130, one line, no traceback from the
    parent or the two spawned workers (they leave Ctrl-C to it and are terminated), both cells recorded
    'interrupted by SIGINT', and no worker left running."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "tiny.toml"
    path.write_text(TINY_FILE.replace("num-server-rounds = 8", "num-server-rounds = 400"))
    env = {**os.environ, "FEDAVG_RELU_HOME": str(tmp_path)}
    argv = ["compare", str(path), "--strategies", "fedavg,fedprox", "--seeds", "0", "--jobs", "2", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "fedavg_relu.cli", *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    runs = tmp_path / "runs" / "compare" / "tiny" / "runs"
    deadline = time.monotonic() + 300
    while len(list(runs.glob("*/metrics.jsonl"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedavg-relu compare: interrupted by SIGINT;"), lines
    reasons = sorted(json.loads((d / "summary.json").read_text())["reason"] for d in runs.iterdir())
    assert reasons == ["interrupted by SIGINT"] * 2
    def left() -> list[str]:  # the processes of the command's session still alive
        ps = subprocess.run(["ps", "-o", "pid=,sid=,args=", "-e"], capture_output=True, text=True).stdout
        return [line for line in ps.splitlines() if line.split()[1] == str(proc.pid) and "<defunct>" not in line]

    deadline = time.monotonic() + 15
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left(), f"outlived the interrupted comparison: {left()}"
