"""The docs: rendered numbers equal the committed results, pages cover the code, links stay inside the repository.

``scripts/render_docs.py`` renders every block between ``<!-- render:NAME -->``
markers in README.md and docs/*.md from the code (RunConfig, validation reasons,
the strategy registry) and from the files under ``results/`` and
``benchmarks/results/``. These tests fail when a committed page differs from
what the script renders, so a changed results file without a re-render fails.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_renderer():
    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "scripts" / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["render_docs"] = module
    spec.loader.exec_module(module)
    return module


render_docs = _load_renderer()
PAGES = render_docs.pages(ROOT)
PAGE_IDS = [str(p.relative_to(ROOT)) for p in PAGES]
#: Pages whose links are relative to the repository root (the README, and the next README before it moves there).
ROOT_PAGES = {"README.md", render_docs.NEXT_README}


@pytest.fixture(scope="module")
def blocks():
    """Every rendered block of every page (rendering reads the results once)."""
    return render_docs.render_pages(PAGES, ROOT, write=False)


# --- rendered numbers --------------------------------------------------------------------
def test_committed_docs_equal_what_the_results_render(blocks):
    """No block differs from what render_docs.py makes of the current code and results files."""
    stale = [f"{b.page}:{b.line}: render:{b.name}" for b in blocks if b.stale]
    assert not stale, "stale docs blocks (run `python scripts/render_docs.py`):\n" + "\n".join(stale)


def test_pages_with_measured_numbers_render_them(blocks):
    """The tables of measured numbers sit in rendered blocks on the pages that show them (the front door: the
    next README until it replaces README.md)."""
    found = {(b.page, b.name) for b in blocks}
    front = render_docs.NEXT_README if (ROOT / render_docs.NEXT_README).exists() else "README.md"
    expected = {
        ("docs/configuration.md", "config-reference"),
        ("docs/reliability.md", "validation-reasons"),
        ("docs/strategies.md", "strategy-registry"),
        ("docs/strategies.md", "strategies-comparison"),
        ("docs/scale.md", "scale-paths"),
        ("docs/scale.md", "scale-scan"),
        ("docs/scale.md", "scale-workloads"),
        ("docs/scale.md", "scale-targets"),
        ("docs/scale.md", "memory-table"),
        ("docs/reproducing.md", "predictions"),
        (front, "predictions"),
        (front, "strategies-summary"),
    }
    assert expected <= found, f"missing blocks: {sorted(expected - found)}"


def _scale_paths_block(text: str) -> str:
    start = text.index("<!-- render:scale-paths")
    return text[start:text.index("<!-- /render:scale-paths -->", start)]


def test_a_number_that_differs_from_the_results_is_stale_and_rerendered():
    """Packed mode's client-updates/s in scale.md, read from scale.json and changed by +1, makes exactly that
    block stale; rendering the changed page gives back the committed page."""
    text = (ROOT / "docs" / "scale.md").read_text(encoding="utf-8")
    data = json.loads((ROOT / "benchmarks" / "results" / "scale.json").read_text(encoding="utf-8"))
    rate = next(p for p in data["paths"] if p["path"] == "packed")["client-updates-per-s"]
    shown, wrong = f"| {rate:.0f} |", f"| {rate + 1:.0f} |"
    block = _scale_paths_block(text)
    assert block.count(shown) >= 1
    tampered = text.replace(block, block.replace(shown, wrong, 1))
    new, found = render_docs.render_text(tampered, ROOT, "docs/scale.md")
    assert [b.name for b in found if b.stale] == ["scale-paths"]
    assert new == text


def test_check_exits_1_names_the_stale_block_and_writes_nothing(tmp_path, capsys):
    """--check on a page whose inline width (scale.json meta.width) is wrong: exit 1, "p.md:2: render:num is
    stale", page unchanged; without --check the page gets the value from the file and --check then exits 0."""
    width = json.loads((ROOT / "benchmarks" / "results" / "scale.json").read_text(encoding="utf-8"))["meta"]["width"]
    page = tmp_path / "p.md"
    text = "# p\nwidth <!-- render:num file=benchmarks/results/scale.json at=meta.width -->1<!-- /render:num -->\n"
    page.write_text(text, encoding="utf-8")
    assert render_docs.main(["--check", "--root", str(ROOT), str(page)]) == 1
    assert "p.md:2: render:num is stale" in capsys.readouterr().out
    assert page.read_text(encoding="utf-8") == text
    assert render_docs.main(["--root", str(ROOT), str(page)]) == 0
    assert f"-->{width}<!--" in page.read_text(encoding="utf-8")
    assert render_docs.main(["--check", "--root", str(ROOT), str(page)]) == 0


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("<!-- render:no-such-table -->\n<!-- /render:no-such-table -->", "unknown marker render:no-such-table"),
        ("<!-- render:scale-paths -->\n", "never closed"),
        ("<!-- render:num file=results/none.json at=a -->x<!-- /render:num -->", "results/none.json does not exist"),
        ("<!-- render:num file=benchmarks/results/scale.json at=paths[path=nope].round-s -->x<!-- /render:num -->",
         "matches 0 items"),
    ],
)
def test_bad_markers_are_errors_naming_the_place(text, match):
    """Unknown names, unclosed markers, missing files and selectors that match nothing raise RenderError."""
    with pytest.raises(render_docs.RenderError, match=match):
        render_docs.render_text(text, ROOT, "x.md")


def test_lookup_walks_keys_and_selects_list_items():
    """lookup({"a": [{"k": "x", "v": 1}, {"k": "y.z", "v": 2}]}, "a[k=y.z].v") is 2; numbers match numerically."""
    data = {"a": [{"k": "x", "v": 1}, {"k": "y.z", "v": 2}], "n": [{"m": 64.0, "v": 3}]}
    assert render_docs.lookup(data, "a[k=y.z].v") == 2
    assert render_docs.lookup(data, "n[m=64].v") == 3


def test_memory_table_renders_memory_py_rows(tmp_path):
    """memory.json rows as benchmarks/memory.py writes them: peak PSS 1.234 -> "1.23", last round 12.04 s -> "12.0";
    a failed row without round times shows "—" and 0 rounds; a missing file gives the command that makes it."""
    assert "python benchmarks/memory.py" in render_docs.render_memory_table(tmp_path, {})
    folder = tmp_path / "benchmarks" / "results" / "memory"
    folder.mkdir(parents=True)
    rows = [
        {"path": "packed", "clients": 50, "peak-pss-gib": 1.234, "peak-rss-gib": 2.0, "round-seconds": [30.0, 12.04],
         "rounds": 2, "status": "completed", "loadavg": [2.46, 2.1, 1.9]},
        {"path": "standard", "clients": 50, "peak-pss-gib": 9.5, "peak-rss-gib": 11.25, "status": "failed"},
    ]
    (folder / "memory.json").write_text(json.dumps({"meta": {"width": 8192}, "rows": rows}))
    out = render_docs.render_memory_table(tmp_path, {})
    assert out.startswith("width=8192\n\n| path | clients |")
    assert "| packed | 50 | 1.23 | 2.00 | 12.0 | 2 | completed | 2.5 |" in out
    assert "| standard | 50 | 9.50 | 11.25 | — | 0 | failed | — |" in out


def test_deploy_stop_renders_deploy_latency_rows(tmp_path):
    """deploy_latency.py stop's JSON ([seconds, exit code] per process) becomes one row each, 2 decimals; a
    missing file gives the command that makes it."""
    assert "deploy_latency.py stop --json" in render_docs.render_deploy_stop(tmp_path, {})
    folder = tmp_path / "benchmarks" / "results" / "deploy"
    folder.mkdir(parents=True)
    (folder / "stop.json").write_text(json.dumps({"stop": {"worker-idle": [0.1349, -15], "supernode": [2.8, 0]}}))
    out = render_docs.render_deploy_stop(tmp_path, {})
    assert "| ClientApp worker, idle (torch loaded) | 0.13 | -15 |" in out
    assert "| SuperNode (Flower's own handler) | 2.80 | 0 |" in out and "long train task" not in out


def test_drift_overhead_renders_drift_overhead_py_rows(tmp_path):
    """drift_overhead.py's JSON (meta with the settings, one row per case) becomes one row per case: seconds
    with 3 decimals, each setting's ratio to ``off`` with 2 (1.9598 / 1.3041 = 1.5028 -> 1.50), and a line
    that names the workload and the load."""
    folder = tmp_path / "benchmarks" / "results"
    folder.mkdir(parents=True)
    meta = {"width": 2048, "rounds": 4, "repeats": 3, "cpus": 2, "torch-threads": 2, "loadavg": [1.25, 1.0, 1.0],
            "workload": "digits, 10 clients", "settings": {"off": {}, "drift": {}}}
    row = {"case": "full batch (tau=5)", "round-seconds": {"off": 1.3041, "drift": 1.9598},
           "ratio-to-off": {"off": 1.0, "drift": 1.9598 / 1.3041}}
    (folder / "drift_overhead.json").write_text(json.dumps({"meta": meta, "rows": [row]}))
    out = render_docs.render_drift_overhead(tmp_path, {})
    assert "| case | off s/round | drift s/round (× off) |" in out
    assert "| full batch (tau=5) | 1.304 | 1.960 (1.50×) |" in out
    assert "digits, 10 clients, width 2048, 4 rounds × 3 repeats" in out and "load average 1.2" in out


# --- the pages cover the code ------------------------------------------------------------
def test_configuration_page_lists_every_runconfig_field_with_its_default():
    """Every RunConfig field appears as `key` in configuration.md, in a row that shows its default."""
    import dataclasses

    from fedavg_relu.core.config import RunConfig

    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for field in dataclasses.fields(RunConfig):
        key = field.name.replace("_", "-")
        row = next((line for line in text.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, f"{key} missing from docs/configuration.md"
        assert f"`{render_docs.toml_value(field.default)}" in row, row


def test_reliability_page_lists_every_rejection_reason():
    """Every reason of schema.REASONS appears with its counter rejected-<reason>."""
    validation = render_docs.find_module("schema")
    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    for reason in validation.REASONS:
        assert f"| `{reason}` | `rejected-{reason}` |" in text


def test_metrics_page_names_every_summary_status():
    """summary.json's statuses (results.SUMMARY_STATUSES) are each explained in metrics.md."""
    results = render_docs.find_module("results")
    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    for status in results.SUMMARY_STATUSES:
        assert f"**`{status}`**" in text


def _documented_form(key: str) -> str:
    """A metrics.jsonl key as metrics.md writes it: per-layer and per-step keys by their pattern."""
    key = re.sub(r"/step-\d+$", "/step-<t>", key)
    key = re.sub(r"^((?:relative-)?distance-from-init)/.+$", r"\1/<layer>", key)
    if key.startswith("drift-rejected-"):
        return "drift-rejected-<reason>"
    return "rejected-<reason>" if key.startswith("rejected-") else key


def test_metrics_page_documents_every_key_and_file_a_run_writes(tmp_path):
    """A 2-round packed run with lockstep drift (width 16, 4 clients, in process): every metrics.jsonl key and
    every file of the run folder is named in metrics.md as `key`."""
    from fedavg_relu.runtime.simulation import run_in_process

    run_dir = run_in_process({
        "dataset": "synthetic", "synthetic-num-examples": 200, "num-partitions": 4, "width": 16,
        "num-server-rounds": 2, "clients-per-node": 4, "lockstep-drift-steps": "1,5", "batch-size": 0,
        "output-dir": str(tmp_path), "run-name": "probe",
    })
    keys = {k for line in (run_dir / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
    assert any(k.startswith("lockstep-") for k in keys) and "gradient-drift-mean" in keys
    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`([^`\n]+)`", FENCE.sub("", text)))
    missing = sorted({_documented_form(k) for k in keys} - documented)
    assert not missing, f"metrics.jsonl keys not documented in docs/metrics.md: {missing}"
    files = sorted(p.name for p in run_dir.iterdir())
    assert {"config.json", "metrics.jsonl", "metrics.csv", "model.pt", "summary.json", "checkpoint.pt"} <= set(files)
    assert not [f for f in files if f not in documented and f"{f}/" not in documented]


# --- links --------------------------------------------------------------------------------
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")


def _prose(text: str) -> str:
    """``text`` without code blocks and inline code (their brackets are not links)."""
    return CODE.sub("", FENCE.sub("", text))


def _links(page: Path) -> list[str]:
    text = _prose(page.read_text(encoding="utf-8"))
    return LINK.findall(text) + HTML_LINK.findall(text)


def _is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I))


def _base(page: Path) -> Path:
    return ROOT if str(page.relative_to(ROOT)) in ROOT_PAGES else page.parent


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text stays
    text = text.replace("`", "").replace("*", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown page (duplicates numbered as GitHub does)."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(page):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            out.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    return out


def _prose_lines(page: Path) -> list[str]:
    return FENCE.sub("", page.read_text(encoding="utf-8")).splitlines()


def test_slug_follows_github():
    """Headings as GitHub anchors them: punctuation dropped, code marks dropped, spaces to hyphens."""
    assert slug("summary.json: how the run ended") == "summaryjson-how-the-run-ended"
    assert slug("Lockstep drift (packed mode, `lockstep-drift-steps`)") == "lockstep-drift-packed-mode-lockstep-drift-steps"
    assert slug("Packed mode: what travels, and why the numbers are the same") == \
        "packed-mode-what-travels-and-why-the-numbers-are-the-same"


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_no_link_leaves_the_repository(page):
    """Every relative link resolves inside the checkout (a clone has no ../shared); no absolute file paths."""
    text = page.read_text(encoding="utf-8")
    assert "../shared" not in text
    outside = []
    for target in _links(page):
        if _is_external(target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        resolved = (_base(page) / path).resolve()
        if path.startswith("/") or not resolved.is_relative_to(ROOT):
            outside.append(target)
    assert not outside, f"{page.relative_to(ROOT)} links outside the repository: {outside}"


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_relative_link_points_to_an_existing_file_and_heading(page):
    """Every relative link names a file that exists; a #fragment into a Markdown page names one of its headings."""
    broken = []
    for target in _links(page):
        if _is_external(target):
            continue
        path, _, fragment = target.partition("#")
        file = (_base(page) / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{target} (no heading #{fragment} in {file.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


@pytest.mark.parametrize("name, min_figures", [("01_local_sgd_theory.ipynb", 7), ("02_compare_strategies.ipynb", 2)])
def test_notebooks_are_committed_with_their_small_mode_outputs(name, min_figures):
    """The saved notebooks show their results without running anything (scripts/execute_notebooks.py
    writes them): every code cell ran, in order, none raised, the figures are PNG outputs, and the
    parameters are small mode's. tests/test_notebooks.py and tests/test_compare.py execute fresh copies."""
    nb = json.loads((ROOT / "notebooks" / name).read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= min_figures
    assert 'MODE = "small"' in "".join(code[0]["source"])


def test_memory_table_shows_the_pss_split_when_measured(tmp_path):
    """Rows with peak-pss-anon/-shmem/-file get three more columns (2 decimals); a row without them shows
    "—" there; meta's note is printed under the table, not in the caption."""
    folder = tmp_path / "benchmarks" / "results" / "memory"
    folder.mkdir(parents=True)
    rows = [
        {"path": "packed", "clients": 40, "peak-pss-gib": 2.234, "peak-rss-gib": 2.81, "peak-pss-anon-gib": 1.494,
         "peak-pss-shmem-gib": 0.05, "peak-pss-file-gib": 0.716, "round-seconds": [54.8], "rounds": 1, "status": "completed"},
        {"path": "standard", "clients": 10, "peak-pss-gib": 2.4, "peak-rss-gib": 3.27, "rounds": 1, "status": "completed"},
    ]
    (folder / "memory.json").write_text(json.dumps({"meta": {"width": 2048, "note": "why"}, "rows": rows}))
    out = render_docs.render_memory_table(tmp_path, {})
    assert "| of it: process | shared (Ray store) | mapped files |" in out
    assert "| packed | 40 | 2.23 | 1.49 | 0.05 | 0.72 | 2.81 | 54.8 | 1 | completed | — |" in out
    assert "| standard | 10 | 2.40 | — | — | — | 3.27 | — | 1 | completed | — |" in out
    assert out.startswith("width=2048\n\n") and out.endswith("\n\nwhy")
    rows[1]["dirichlet-alpha"] = 0.5  # a row measured at another α shows it in a column of its own
    (folder / "memory.json").write_text(json.dumps({"meta": {"width": 2048}, "rows": rows}))
    out = render_docs.render_memory_table(tmp_path, {})
    assert "| path | clients | Dirichlet α | peak PSS GiB |" in out
    assert "| packed | 40 | — | 2.23 |" in out and "| standard | 10 | 0.5 | 2.40 |" in out
