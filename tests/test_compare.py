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
