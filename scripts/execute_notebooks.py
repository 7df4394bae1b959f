"""Execute the notebooks in small mode and save them with their outputs (what the repository commits).

    python scripts/execute_notebooks.py            # both notebooks
    python scripts/execute_notebooks.py 02         # the ones whose name contains "02"
    python scripts/execute_notebooks.py --clean-only [--root DIR]   # only clean the stored outputs

Small mode is each notebook's default (``MODE = "small"``): notebook 01 runs
``sweeps/theory-small.toml`` into ``results/theory-small`` (not committed), notebook
02 runs its eight-run comparison in a temporary folder. The saved notebooks show
their tables and figures without running anything; ``tests/test_notebooks.py`` and
``tests/test_compare.py`` still execute fresh copies. The kernel is this Python.

What is stored is cleaned (:func:`clean`): progress bars and tqdm's warnings written to
stderr are dropped, and the paths of the machine that ran it become relative (the
checkout), ``<tmp>/...`` (the temporary folder) or ``~/...`` (the home folder).
``tests/test_notebooks.py`` fails on a stored notebook that holds either.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


#: stderr output that is a progress bar (tqdm redraws with "\r"; "42%|###") or tqdm's own notebook warning.
PROGRESS = re.compile(r"\r|\d+%\||TqdmWarning|IProgress not found")


def machine_paths(roots: list[str | Path] | None = None) -> list[tuple[str, str]]:
    """(prefix, replacement) pairs, longest first: each checkout root -> relative, the temporary folder ->
    ``<tmp>``, the home folder -> ``~``."""
    pairs = [(str(Path(r)), ".") for r in roots or [ROOT]]
    pairs += [(tempfile.gettempdir(), "<tmp>"), ("/tmp", "<tmp>"), (str(Path.home()), "~")]
    return sorted({p for p in pairs if p[0] not in ("", "/")}, key=lambda p: -len(p[0]))


def clean(nb, roots: list[str | Path] | None = None):
    """Drop progress-bar and tqdm-warning stderr outputs and replace machine paths in every output; return ``nb``."""
    import nbformat

    pairs = machine_paths(roots)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                text = out["text"] if isinstance(out["text"], str) else "".join(out["text"])
                if PROGRESS.search(text) or not text.strip():  # a bar, or the newline it ends with
                    continue
            text = json.dumps(out)
            for prefix, replacement in pairs:
                text = text.replace(prefix + "/", "" if replacement == "." else replacement + "/")
                text = re.sub(re.escape(prefix) + r"(?![\w.-])", replacement, text)
            kept.append(nbformat.from_dict(json.loads(text)))
        cell["outputs"] = kept
    return nb


def execute(path: Path) -> float:
    """Run every cell of ``path`` in small mode and write it back with its outputs; return seconds."""
    import nbformat
    import nbformat.validator
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    nb = nbformat.from_dict(nbformat.validator.normalize(nb)[1])  # gives new cells their ids
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(clean(nb), path)
    return time.perf_counter() - t0


def clean_only(path: Path, roots: list[str]) -> None:
    """Clean a stored notebook's outputs in place, running nothing (``roots``: checkouts it was executed in)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.write(clean(nb, [ROOT, *roots]), path)


def main(argv: list[str]) -> int:
    # the kernel must be this Python: an installed "python3" kernel spec runs `python` from PATH
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    roots = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--root"]
    names = [a for i, a in enumerate(argv) if not a.startswith("--") and (i == 0 or argv[i - 1] != "--root")]
    chosen = [p for p in NOTEBOOKS if not names or any(a in p.name for a in names)]
    for path in chosen:
        if "--clean-only" in argv:
            clean_only(path, roots)
            print(f"{path.relative_to(ROOT)}: cleaned", flush=True)
        else:
            print(f"{path.relative_to(ROOT)}: executed in {execute(path):.0f} s", flush=True)
    return 0 if chosen else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
