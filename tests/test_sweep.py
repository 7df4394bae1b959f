"""Tests of fedavg_relu.experiments.sweep: grid expansion, stable cell ids, resuming, the tidy tables and the CLI."""

from __future__ import annotations

import json
import os
import time

import pandas as pd
import pytest

from fedavg_relu.cli import main
from fedavg_relu.core.config import ConfigError, RunConfig
from fedavg_relu.experiments.sweep import (
    cell_id,
    expand_grid,
    is_complete,
    load_sweep,
    parse_sweep,
    read_tables,
    run_sweep,
)

TINY_BASE = {
    "dataset": "synthetic", "synthetic-num-examples": 40, "synthetic-input-dim": 6, "synthetic-num-classes": 3,
    "num-partitions": 2, "batch-size": "full", "local-steps": 2, "num-server-rounds": 2, "width": 16,
}


def _tiny(tmp_path, **sweep) -> dict:
    return {"sweep": {"output-dir": str(tmp_path / "sweep"), **sweep}, "base": dict(TINY_BASE),
            "grid": {"seed": [0, 1]}}


def test_grid_is_the_cartesian_product_in_file_order(tmp_path):
    """width x seed = 2 x 3 = 6 cells, the last key varying fastest; base keys in every cell."""
    spec = parse_sweep({"base": {"dataset": "synthetic"}, "grid": {"width": [32, 64], "seed": [0, 1, 2]}},
                       output_dir=tmp_path)
    cells = expand_grid(spec)
    assert [(c.config.width, c.config.seed) for c in cells] == [(32, 0), (32, 1), (32, 2), (64, 0), (64, 1), (64, 2)]
    assert all(c.config.dataset == "synthetic" and c.groups == ("main",) for c in cells)
    assert all(c.run_dir == tmp_path.resolve() / "runs" / c.cell_id for c in cells)
    assert cells[0].varied == ("width", "seed")


def test_several_grids_add_up_and_shared_cells_run_once(tmp_path):
    """Grid a: width {32, 64}; grid b: width 64 x tau {1, 5}: 2 + 2 = 4 combinations, 3 cells (width 64, tau 5 is the base)."""
    data = {"base": {"local-steps": 5}, "grid": [{"group": "a", "width": [32, 64]},
                                                 {"group": "b", "width": [64], "local-steps": [1, 5]}]}
    cells = expand_grid(parse_sweep(data, output_dir=tmp_path))
    assert len(cells) == 3
    shared = [c for c in cells if c.config.width == 64 and c.config.local_steps == 5]
    assert len(shared) == 1 and shared[0].groups == ("a", "b")


def test_cell_id_is_a_stable_hash_of_the_set_keys():
    """sha256 of '{"seed":0,"width":64}' starts 1cec23ad3c80, whatever the key order."""
    assert cell_id({"width": 64, "seed": 0}) == "1cec23ad3c80"
    assert cell_id({"seed": 0, "width": 64}) == "1cec23ad3c80"
    assert cell_id({"seed": 1, "width": 64}) != "1cec23ad3c80"


def test_cell_id_uses_validated_values(tmp_path):
    """width = 64 and width = 64.0 validate to the same int, so they are the same cell (same id)."""
    a = expand_grid(parse_sweep({"grid": {"width": [64]}}, output_dir=tmp_path))[0]
    b = expand_grid(parse_sweep({"grid": {"width": [64.0]}}, output_dir=tmp_path))[0]
    assert a.cell_id == b.cell_id == cell_id({"width": 64})


def test_bad_sweep_files_list_every_problem(tmp_path):
    """Unknown table, unknown [sweep] key, bad engine, reserved key and an empty grid list: five problems in one error."""
    data = {"extra": {}, "sweep": {"engine": "ray", "colour": 1}, "base": {"run-name": "x"}, "grid": {"width": []}}
    with pytest.raises(ConfigError, match="5 problem") as err:
        parse_sweep(data, output_dir=tmp_path)
    text = str(err.value)
    for needle in ("extra: unknown table", "sweep.colour", "sweep.engine='ray'", "base.run-name: set by the sweep",
                   "grid[main].width=[]"):
        assert needle in text


def test_invalid_cells_are_reported_with_their_values(tmp_path):
    """width = 0 and width = -1 are out of range: one error naming both cells."""
    spec = parse_sweep({"grid": {"width": [0, 8, -1]}}, output_dir=tmp_path)
    with pytest.raises(ConfigError, match="2 problem") as err:
        expand_grid(spec)
    assert "[main: width=0] width=0: expected an integer >= 1" in str(err.value)
    assert "[main: width=-1]" in str(err.value)


def test_central_baseline_without_saved_models_is_refused(tmp_path):
    """The centralized baseline compares a cell's final model (model.pt) with centralized GD: a sweep
    that asks for it on cells with save-model=false is refused, naming the group, the key and the fix.
    Before, those cells silently got no baseline and prediction 6 read "not measured". Cells of groups
    left out of central-baseline may have save-model=false; the grid may set it per group."""
    data = {"sweep": {"central-baseline": ["skewed"]}, "base": {"dataset": "synthetic", "save-model": False},
            "grid": [{"group": "plain", "width": [4]}, {"group": "skewed", "width": [8, 16]}]}
    with pytest.raises(ConfigError) as err:
        expand_grid(parse_sweep(data, output_dir=tmp_path))
    assert len(err.value.problems) == 2  # widths 8 and 16 of "skewed"; "plain" is fine
    assert all(p.startswith("[skewed") and "save-model=false" in p and "expected save-model = true" in p
               for p in err.value.problems), err.value.problems
    data["grid"][1]["save-model"] = [True]
    cells = expand_grid(parse_sweep(data, output_dir=tmp_path))
    assert [(c.groups, c.config.save_model) for c in cells] == [(("plain",), False), (("skewed",), True), (("skewed",), True)]


def test_load_sweep_reads_toml_and_resolves_relative_output(tmp_path, monkeypatch):
    """A relative sweep.output-dir resolves under $FEDAVG_RELU_HOME; the name defaults to the file's stem."""
    monkeypatch.setenv("FEDAVG_RELU_HOME", str(tmp_path))
    path = tmp_path / "mine.toml"
    path.write_text('[sweep]\noutput-dir = "out/x"\ncentral-baseline = ["b"]\n[base]\nwidth = 8\n[grid]\nseed = [0]\n')
    spec = load_sweep(path)
    assert spec.name == "mine"
    assert spec.output_dir == (tmp_path / "out" / "x").resolve()
    assert spec.central_baseline == ("b",)
    assert spec.cells()[0].config.width == 8
    path.write_text("[grid\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_sweep(path)


def test_run_resume_and_tables(tmp_path):
    """Two tiny cells (width 16, 2 rounds) run; a rerun runs nothing; a truncated cell is rerun alone.

    Tables: metrics.csv has 2 cells x 3 rounds (0..2) = 6 rows with the configuration columns, the
    metric named like a config key renamed metric.gradient-dissimilarity; cells.csv has 2 rows with the
    central comparison (central-steps = R * tau = 4).
    """
    spec = parse_sweep(_tiny(tmp_path, **{"central-baseline": True}))
    first = run_sweep(spec, progress=False)
    assert len(first.ran) == 2 and not first.skipped and not first.failed
    cells = spec.cells()
    assert all(is_complete(c) for c in cells)
    stamps = {c.cell_id: os.stat(c.run_dir / "metrics.jsonl").st_mtime_ns for c in cells}
    time.sleep(0.01)
    second = run_sweep(spec, progress=False)
    assert second.ran == [] and sorted(second.skipped) == sorted(stamps)
    assert {c.cell_id: os.stat(c.run_dir / "metrics.jsonl").st_mtime_ns for c in cells} == stamps

    metrics, cell_table = read_tables(spec.output_dir)
    assert len(metrics) == 6 and sorted(metrics["round"].unique()) == [0, 1, 2]
    config_keys = set(RunConfig().to_mapping()) - {"output-dir", "run-name", "tracker", "mlflow-tracking-uri"}
    assert config_keys <= set(metrics.columns) and "tracker" not in metrics.columns  # the sweep's, not the cells'
    assert {"group", "cell-id", "effective-learning-rate", "global-loss", "gradient-drift-mean"} <= set(metrics.columns)
    assert "metric.gradient-dissimilarity" in metrics.columns
    assert sorted(metrics["seed"].unique()) == [0, 1] and set(metrics["width"]) == {16}
    assert metrics["effective-learning-rate"].iloc[0] == pytest.approx(1.0 * 6 / 16)
    assert len(cell_table) == 2 and set(cell_table["central-steps"]) == {4}
    assert (cell_table["central-distance"] > 0).all()

    broken = cells[1]
    lines = (broken.run_dir / "metrics.jsonl").read_text().splitlines()
    (broken.run_dir / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")  # as if stopped after round 1
    assert not is_complete(broken)
    third = run_sweep(spec, progress=False)
    assert third.ran == [broken.cell_id] and third.skipped == [cells[0].cell_id]

    # a clone of the repository has the run folders' tables but no model files (*.pt are not committed):
    # a cell whose centralized comparison is cached is still finished; without that cache it is not
    kept = cells[0]
    (kept.run_dir / "model.pt").unlink()
    assert is_complete(kept)
    (kept.run_dir / "central.json").unlink()
    assert not is_complete(kept)


def test_changed_configuration_is_not_taken_for_finished(tmp_path):
    """A finished folder whose config.json says width 32 is not this width-16 cell: it is rerun."""
    spec = parse_sweep(_tiny(tmp_path))
    run_sweep(spec, progress=False, max_cells=1)
    cell = spec.cells()[0]
    path = cell.run_dir / "config.json"
    saved = json.loads(path.read_text())
    saved["config"]["width"] = 32
    path.write_text(json.dumps(saved))
    assert not is_complete(cell)


def test_max_cells_leaves_the_rest_for_later(tmp_path):
    """max_cells=1 of 2: one runs, the tables hold that cell only (3 rounds)."""
    spec = parse_sweep(_tiny(tmp_path))
    result = run_sweep(spec, progress=False, max_cells=1)
    assert len(result.ran) == 1
    metrics, cells = read_tables(spec.output_dir)
    assert len(metrics) == 3 and len(cells) == 1


def test_failing_cell_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    """The engine raises for seed 1 (injected): that cell is recorded as failed, seed 0 still finishes."""
    import fedavg_relu.runtime.simulation as simulation

    real = simulation.run_in_process

    def flaky(cfg, *args, **kwargs):
        if cfg.seed == 1:
            raise RuntimeError("injected engine failure")
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(simulation, "run_in_process", flaky)
    spec = parse_sweep(_tiny(tmp_path))
    result = run_sweep(spec, progress=False)
    assert len(result.ran) == 1 and len(result.failed) == 1
    assert "injected engine failure" in next(iter(result.failed.values()))
    metrics = pd.read_csv(result.metrics_path)
    assert set(metrics["seed"]) == {0}


def test_cli_sweep_dry_run_and_run(tmp_path, capsys, monkeypatch):
    """`fedavg-relu sweep F --dry-run` lists 2 todo cells; a run then reports '2 ran'; a second dry run lists them done."""
    monkeypatch.setenv("FEDAVG_RELU_HOME", str(tmp_path))
    path = tmp_path / "s.toml"
    base = "\n".join(f"{k} = {json.dumps(v)}" for k, v in TINY_BASE.items())
    path.write_text(f'[sweep]\noutput-dir = "out"\n[base]\n{base}\n[grid]\nseed = [0, 1]\n')
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("todo") == 2 and "2 cells" in out
    assert main(["sweep", str(path), "--no-progress"]) == 0
    assert "2 ran, 0 already finished, 0 failed" in capsys.readouterr().out
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("done") == 2


def test_cli_sweep_reports_config_errors(tmp_path, capsys):
    """A sweep file with an unknown run-config key exits 2 and names the key."""
    path = tmp_path / "bad.toml"
    path.write_text('[base]\nwidht = 8\n')
    assert main(["sweep", str(path), "--output-dir", str(tmp_path / "o")]) == 2
    assert "widht=8: unknown key" in capsys.readouterr().err


def test_cli_dry_run_into_a_closed_pipe_exits_0_without_a_traceback(tmp_path):
    """`fedavg-relu sweep F --dry-run | head -1`: the reader leaves before the listing is written, so the
    write fails with EPIPE. The command exits 0 and prints no traceback (before: BrokenPipeError, exit 1)."""
    import subprocess
    import sys

    path = tmp_path / "s.toml"
    path.write_text('[sweep]\nname = "p"\noutput-dir = "out"\n[base]\ndataset = "synthetic"\n'
                    '[[grid]]\ngroup = "g"\nseed = [' + ", ".join(str(i) for i in range(40)) + "]\n")
    proc = subprocess.Popen([sys.executable, "-m", "fedavg_relu.cli", "sweep", str(path), "--dry-run"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()


TIMING = {"seconds", "elapsed", "drift-seconds", "train-seconds", "evaluate-seconds"}


@pytest.mark.slow
def test_jobs_run_cells_in_processes_of_their_own_with_the_same_numbers(tmp_path):
    """jobs=2: the two tiny cells run in two spawned processes; every metric of every round equals the
    serial sweep's (same seeds, same code), timings aside; a rerun finds both finished. A cell whose
    folder cannot be replaced (a file in its place) fails alone, reported, and the other runs."""
    serial = parse_sweep(_tiny(tmp_path / "serial"))
    parallel = parse_sweep(_tiny(tmp_path / "parallel"))
    assert run_sweep(serial, progress=False).failed == {}
    result = run_sweep(parallel, progress=False, jobs=2)
    assert sorted(result.ran) == sorted(c.cell_id for c in parallel.cells()) and result.failed == {}
    a, _ = read_tables(serial.output_dir)
    b, _ = read_tables(parallel.output_dir)
    keys = ["cell-id", "round"]
    a, b = a.sort_values(keys).reset_index(drop=True), b.sort_values(keys).reset_index(drop=True)
    numeric = [c for c in a.columns if c not in TIMING and pd.api.types.is_float_dtype(a[c])]
    assert len(a) == len(b) == 6 and "global-loss" in numeric and "gradient-drift-mean" in numeric
    pd.testing.assert_frame_equal(a[numeric], b[numeric], rtol=1e-6, atol=1e-9)
    assert run_sweep(parallel, progress=False, jobs=2).ran == []

    broken = parse_sweep(_tiny(tmp_path / "broken"))
    first, second = broken.cells()
    first.run_dir.parent.mkdir(parents=True)
    first.run_dir.write_text("not a folder")
    result = run_sweep(broken, progress=False, jobs=2)
    assert result.ran == [second.cell_id] and list(result.failed) == [first.cell_id]
    assert "NotADirectoryError" in result.failed[first.cell_id]
    with pytest.raises(ConfigError, match="jobs=0"):
        run_sweep(broken, progress=False, jobs=0)


def test_override_cells_sets_seeds_in_every_grid_and_rounds_in_base():
    """--seeds replaces each grid's seed list and leaves [base]; --rounds goes to [base] and leaves the grids;
    a file without grids gets one over the seeds; the input mapping is unchanged."""
    from fedavg_relu.experiments.sweep import override_cells

    data = {"base": {"seed": 9, "num-server-rounds": 10}, "grid": [{"width": [8], "num-server-rounds": [5]}, {"seed": [0]}]}
    out = override_cells(data, seeds=[3, 4], rounds=2)
    assert out["base"] == {"num-server-rounds": 2}
    assert out["grid"] == [{"width": [8], "seed": [3, 4]}, {"seed": [3, 4]}]
    assert data["grid"][0] == {"width": [8], "num-server-rounds": [5]} and data["base"]["seed"] == 9
    assert override_cells({"base": {}}, seeds=[1])["grid"] == {"seed": [1]}


def test_cli_sweep_seeds_and_rounds_narrow_the_cells(tmp_path, capsys, monkeypatch):
    """`sweep F --seeds 5 --rounds 1 --dry-run` on a 2-seed file: one cell, seed 5, 1 round."""
    monkeypatch.setenv("FEDAVG_RELU_HOME", str(tmp_path))
    path = tmp_path / "s.toml"
    base = "\n".join(f"{k} = {json.dumps(v)}" for k, v in TINY_BASE.items())
    path.write_text(f'[sweep]\noutput-dir = "out"\n[base]\n{base}\n[grid]\nseed = [0, 1]\n')
    assert main(["sweep", str(path), "--seeds", "5", "--rounds", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("todo") and out[0].endswith("seed=5") and out[-1].startswith("1 cells;")
    spec = load_sweep(path, seeds=[5], rounds=1)
    assert [(c.config.seed, c.config.num_server_rounds) for c in spec.cells()] == [(5, 1)]
