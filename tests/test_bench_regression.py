"""No silent regressions: the headline numbers were measured on the hot path as it is now.

``benchmarks/results/headline.json`` (and ``scale.json``, ``profile.json``, ``drift_overhead.json``: every results
file the docs render from a hot-path measurement) records the commit it was measured at
(``meta["git commit"]``). When a file of ``scale.HOT_PATH_FILES`` (cohort training,
the packed strategy and client, the messaging seam) has changed since, the numbers
in the README and docs describe code that no longer exists: re-run ``make bench``
and commit its results. The test compares commits, not times, and is skipped only
outside a git checkout (or in a shallow clone that lacks the recorded commit).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEADLINE = ROOT / "benchmarks" / "results" / "headline.json"


def _scale():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("scale", ROOT / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_headline_results_record_when_and_on_what_they_ran():
    meta = json.loads(HEADLINE.read_text())["meta"]
    assert meta["date"][:4].isdigit() and meta["date"].endswith("UTC")
    assert len(meta["git commit"] or "") == 40, "headline.json records no commit: re-run `make bench`"
    assert meta["hot-path-dirty"] is False, "headline.json was measured with uncommitted hot-path changes"
    assert len(meta["load"]) == 3


#: Results files the README and docs render that measure the hot path, and the command that re-makes each.
HOT_PATH_RESULTS = {
    "headline.json": "make bench",
    "scale.json": "python benchmarks/scale.py",
    "profile.json": "python benchmarks/profile_packed.py",
    "drift_overhead.json": "python benchmarks/drift_overhead.py --repeats 3 --out benchmarks/results/drift_overhead.json",
}


@pytest.mark.parametrize("name", sorted(HOT_PATH_RESULTS))
def test_hot_path_unchanged_since_the_results_were_measured(name):
    scale = _scale()
    if scale.git("rev-parse", "--git-dir") is None:
        pytest.skip("not a git checkout: cannot tell which commit the hot path is at")
    recorded = json.loads((HEADLINE.parent / name).read_text())["meta"]["git commit"]
    try:
        changed = scale.hot_path_changes(recorded)
    except LookupError as err:
        if scale.git("rev-parse", "--is-shallow-repository") == "true":
            pytest.skip(f"shallow clone: {err}")
        raise
    assert not changed, (
        f"{changed} changed after commit {recorded[:12]}, where benchmarks/results/{name} was measured: "
        f"re-run `{HOT_PATH_RESULTS[name]}` and commit benchmarks/results/{name}"
    )


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_hot_path_changes_sees_a_later_commit(tmp_path):
    """A scratch repository: hot.py committed (A), results recorded at A, then hot.py changed (B) -> stale;
    a change to another file (C) alone is not; hot.py changed and changed back is not."""
    scale = _scale()

    def run(*argv):
        subprocess.run(["git", *argv], cwd=tmp_path, check=True, capture_output=True)

    def commit(name, text):
        (tmp_path / name).write_text(text)
        run("add", name)
        run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", name)
        return scale.git("rev-parse", "HEAD", root=tmp_path)

    run("init", "-q")
    a = commit("hot.py", "x = 1\n")
    assert scale.hot_path_changes(a, ("hot.py",), root=tmp_path) == []
    commit("other.py", "y = 1\n")
    assert scale.hot_path_changes(a, ("hot.py",), root=tmp_path) == []
    commit("hot.py", "x = 2\n")
    assert scale.hot_path_changes(a, ("hot.py",), root=tmp_path) == ["hot.py"]
    commit("hot.py", "x = 1\n")  # undone again: the same code as at A
    assert scale.hot_path_changes(a, ("hot.py",), root=tmp_path) == []
    with pytest.raises(LookupError, match="not in this clone"):
        scale.hot_path_changes("0" * 40, ("hot.py",), root=tmp_path)
