"""The notebooks: what is stored in them is clean (fast), and notebook 01 executes in small mode (e2e; a few
minutes on 2 cores)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "01_local_sgd_theory.ipynb"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
#: An absolute path of some machine: a Unix top-level folder where checkouts, homes and temp files live, or a drive.
MACHINE_PATH = re.compile(r"(?<![\w.<~])/(?:work|home|tmp|root|Users|var|opt|srv|mnt|private)/|\b[A-Z]:\\\\")


def _script():
    spec = importlib.util.spec_from_file_location("execute_notebooks", ROOT / "scripts" / "execute_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def problems(nb) -> list[str]:
    """Progress-bar or tqdm-warning chunks on stderr, and outputs holding a machine's absolute path."""
    found = []
    progress = _script().PROGRESS
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            text = json.dumps(out)
            if out.get("name") == "stderr" and progress.search("".join(out.get("text", ""))):
                found.append(f"cell {i}: progress bar on stderr: {text[:120]}")
            for match in MACHINE_PATH.finditer(text):
                found.append(f"cell {i}: machine path: {text[max(0, match.start() - 40):match.start() + 60]}")
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_notebooks_hold_no_progress_bars_or_machine_paths(path):
    """The committed notebooks' outputs: no tqdm chunks (each redraw is a stderr output), no TqdmWarning, no
    absolute path of the machine that executed them (scripts/execute_notebooks.py cleans them)."""
    found = problems(json.loads(path.read_text(encoding="utf-8")))
    assert not found, f"{path.name}: run `python scripts/execute_notebooks.py --clean-only`:\n" + "\n".join(found[:10])


def test_clean_drops_bars_and_relativizes_paths(tmp_path):
    """The check fails on a notebook with a bar chunk, a TqdmWarning and three machine paths; clean() leaves the
    real stderr warning and the printed lines, with the paths relative to the checkout, <tmp> and ~."""
    import nbformat

    script = _script()
    home = str(Path.home())
    outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="\rsweep:  40%|####      | 2/5 [00:01<00:02, 1.2cell/s]"),
        nbformat.v4.new_output("stream", name="stderr", text="/work/x/.venv/tqdm/auto.py:21: TqdmWarning: IProgress not found"),
        nbformat.v4.new_output("stream", name="stderr", text="UserWarning: something real\n"),
        nbformat.v4.new_output("stream", name="stdout",
                               text=f"loaded from /work/x/results/small\ntables in /tmp/cmp-abc1\nconfig {home}/cfg.toml\n"),
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("run()", outputs=outputs)])
    assert len(problems(nb)) == 6  # the bar; the warning (a tqdm chunk, and a path); the three printed paths
    cleaned = script.clean(nb, ["/work/x"])
    assert problems(cleaned) == []
    texts = [o["text"] for o in cleaned.cells[0].outputs]
    assert texts == ["UserWarning: something real\n",
                     "loaded from results/small\ntables in <tmp>/cmp-abc1\nconfig ~/cfg.toml\n"]




def _set_parameters(nb, **values) -> None:
    """Append assignments to the cell tagged ``parameters`` (as papermill would)."""
    cell = next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", []))
    cell.source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())


@pytest.mark.e2e
def test_theory_notebook_runs_in_small_mode(tmp_path, monkeypatch):
    """Small mode runs the whole small sweep into a fresh folder; no cell errors, seven measured verdicts, figures drawn."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    _set_parameters(nb, MODE="small", SWEEP_OUTPUT=str(tmp_path / "sweep"))
    # the kernel must be this venv's Python: ipykernel's native spec uses sys.executable, and an
    # installed "python3" spec runs `python` from PATH, so put the venv first
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on any failing cell
    summary = "".join(
        out.get("text", "") for c in nb.cells if c.cell_type == "code" for out in c.get("outputs", [])
        if out.get("output_type") == "stream"
    )
    import ast
    import re

    printed = re.search(r"\{1: '.*?'\}", summary)  # the summary cell prints {n: verdict} of every prediction
    assert printed is not None, summary[-2000:]
    verdicts = ast.literal_eval(printed.group(0))
    assert set(verdicts) == set(range(1, 8))  # predictions 1-6, and 7 (the small sweep records ntk-change)
    assert all(v in ("agrees", "disagrees", "undetermined") for v in verdicts.values()), verdicts  # each one judged
    figures = sorted(p.name for p in (tmp_path / "sweep" / "figures").glob("*.png"))
    assert "fig1_loss_vs_round.png" in figures and "fig6_central_gap_vs_width.png" in figures
    # fig1-4, fig4b (the small sweep sets drift-nonlinear), fig6, fig5 at two learning rates, fig7
    # (ntk-change is recorded by default), the per-client section's fig8, and the explanations the width
    # group's data allows (fig4c, fig7a-c; fig5b needs three step sizes, fig7d a kernel.csv)
    assert figures == sorted([
        "fig1_loss_vs_round.png", "fig2_distance_vs_width.png", "fig3_flips_vs_width.png",
        "fig4_drift_smoothness_vs_width.png", "fig4b_nonlinear_drift_vs_width.png", "fig4c_slopes_by_width_range.png",
        "fig5_tau_tradeoff_lr0.1.png", "fig5_tau_tradeoff_lr1.png",
        "fig6_central_gap_vs_width.png", "fig7_ntk_change_vs_width.png", "fig7a_ntk_change_by_round.png",
        "fig7b_ntk_change_vs_flips.png", "fig7c_ntk_slope_by_width_range.png", "fig8_client_drift_by_width.png",
    ]), figures
    # the per-client section: the dominant client's table, one row per width of the non-iid group
    assert "top-share" in "".join(
        str(out.get("data", {}).get("text/plain", "")) for c in nb.cells if c.cell_type == "code" for out in c.get("outputs", []))
    assert (tmp_path / "sweep" / "metrics.csv").stat().st_size > 0
