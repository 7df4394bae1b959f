"""Execute the notebooks in small mode and save them with their outputs (what the repository commits).

    python scripts/execute_notebooks.py            # both notebooks
    python scripts/execute_notebooks.py 02         # the ones whose name contains "02"

Small mode is each notebook's default (``MODE = "small"``): notebook 01 runs
``sweeps/theory-small.toml`` into ``results/theory-small`` (not committed), notebook
02 runs its eight-run comparison in a temporary folder. The saved notebooks show
their tables and figures without running anything; ``tests/test_notebooks.py`` and
``tests/test_compare.py`` still execute fresh copies. The kernel is this Python.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def execute(path: Path) -> float:
    """Run every cell of ``path`` in small mode and write it back with its outputs; return seconds."""
    import nbformat
    import nbformat.validator
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    nb = nbformat.from_dict(nbformat.validator.normalize(nb)[1])  # gives new cells their ids
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, path)
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    # the kernel must be this Python: an installed "python3" kernel spec runs `python` from PATH
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    chosen = [p for p in NOTEBOOKS if not argv or any(a in p.name for a in argv)]
    for path in chosen:
        print(f"{path.relative_to(ROOT)}: executed in {execute(path):.0f} s", flush=True)
    return 0 if chosen else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
