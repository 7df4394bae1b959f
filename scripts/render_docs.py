"""Render the generated parts of the docs from the code and the committed results.

Every table of measured numbers in ``README.md`` and ``docs/*.md`` sits between
two marker comments, and so do the tables generated from the code (the run
configuration, the rejection reasons)::

    <!-- render:scale-paths dir=benchmarks/results -->
    | path | ... |
    <!-- /render:scale-paths -->

This script rewrites only what lies between the markers; everything else is
prose written by hand. A marker on its own line makes a block (a table, a
paragraph); markers inside a line make an inline value::

    packed mode reaches <!-- render:num file=benchmarks/results/scale.json at=paths[path=packed].flops-fraction-of-peak fmt=.2f -->0.18<!-- /render:num --> of the peak

Arguments are ``key=value`` words (``shlex`` quoting: ``label="two words"``).
The names and their arguments are in :data:`RENDERERS`; ``--list`` prints them.

Usage::

    python scripts/render_docs.py            # rewrite every stale block in place
    python scripts/render_docs.py --check    # exit 1 and list the stale blocks; write nothing
    python scripts/render_docs.py --list     # the marker names

Adding a rendered table: write a function ``(root: Path, args: dict) -> str``
below, register it in :data:`RENDERERS` under its marker name, put the empty
markers where the table belongs and run the script. ``tests/test_docs.py`` then
fails whenever the committed page and the results disagree.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import importlib
import io
import json
import math
import pkgutil
import re
import shlex
import sys
import tokenize
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: The next front-door README, written under docs/ until it replaces README.md; its links are relative to the root.
NEXT_README = "docs/_README.next.md"  # a draft front door, when one is being written

MARKER = re.compile(r"<!--\s*render:(?P<name>[a-z0-9-]+)(?P<args>[^>]*?)\s*-->(?P<body>.*?)<!--\s*/render:(?P=name)\s*-->", re.S)
OPENING = re.compile(r"<!--\s*render:([a-z0-9-]+)")
CLOSING = re.compile(r"<!--\s*/render:([a-z0-9-]+)\s*-->")


class RenderError(Exception):
    """A marker the script cannot render (unknown name, bad argument, missing data); the message says where."""


def pages(root: Path = ROOT) -> list[Path]:
    """Every page the script renders: README.md and docs/*.md."""
    found = [root / "README.md"] if (root / "README.md").exists() else []
    return found + sorted((root / "docs").glob("*.md"))


# --- finding modules that may move between subpackages --------------------------------
def find_module(name: str):
    """``fedavg_relu.<name>``, or the module called ``name`` in any subpackage of ``fedavg_relu``."""
    try:
        return importlib.import_module(f"fedavg_relu.{name}")
    except ModuleNotFoundError:
        pass
    import fedavg_relu

    for info in pkgutil.walk_packages(fedavg_relu.__path__, "fedavg_relu."):
        if info.name.rsplit(".", 1)[-1] == name:
            return importlib.import_module(info.name)
    raise RenderError(f"no module named {name!r} in fedavg_relu")


def trailing_comments(source: str) -> dict[int, str]:
    """Line number -> the ``# comment`` ending that line (comment lines of their own excluded)."""
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    return {line: text for line, text in comments.items() if line in code_lines}


def cell(text: Any) -> str:
    """``text`` made safe for one Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# --- the run configuration (fedavg_relu/core/config.py) -------------------------------------
#: References in config.py's comments that mean other docs pages.
DOC_LINKS = {
    "(THEORY.md)": "([theory](theory.md))",
    "THEORY.md's metrics": "the [theory](theory.md)'s metrics",
    'README "Scale and speed"': "[scale](scale.md)",
}


class _Choices(tuple):
    """A tuple of names that formats as `a`, `b`, ... (for the config's choice lists)."""

    def __new__(cls, values):
        return super().__new__(cls, (f"`{v}`" for v in values))

    def __str__(self) -> str:
        return ", ".join(self)

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return str(self)


def toml_value(value: Any) -> str:
    """``value`` as it is written in ``pyproject.toml``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _accepted(module, source: str) -> dict[str, str]:
    """Field name -> what ``_range_problems`` accepts, evaluated from its ``checks`` list."""
    namespace = dict(vars(module))
    namespace.update({k: _Choices(v) for k, v in vars(module).items()
                      if k.isupper() and isinstance(v, tuple) and all(isinstance(x, str) for x in v)})
    accepted: dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "checks" and isinstance(node.value, ast.List):
            for entry in node.value.elts:
                if isinstance(entry, ast.Tuple) and len(entry.elts) == 3 and isinstance(entry.elts[0], ast.Constant):
                    what = eval(compile(ast.Expression(entry.elts[2]), "<config>", "eval"), namespace)  # noqa: S307 - our own source
                    accepted[entry.elts[0].value] = str(what)
    others: dict[str, list[tuple[int, str]]] = {}
    for node in ast.walk(ast.parse(source)):  # the other checks: f"key={self.field!r}: expected ..."
        if isinstance(node, ast.JoinedStr):
            text = "".join(
                v.value if isinstance(v, ast.Constant) else
                "{" + (v.value.attr.replace("_", "-") if isinstance(v.value, ast.Attribute) else "?") + "}"
                for v in node.values
            )
            match = re.match(r"^([a-z0-9-]+)=\{\1\}: expected (.*)$", text, re.S)
            if match and match.group(1).replace("-", "_") not in accepted:
                what = re.sub(r"([a-z0-9-]+)=\{\1\}", r"\1=…", match.group(2))
                others.setdefault(match.group(1).replace("-", "_"), []).append((node.lineno, what))
    for name, found in others.items():
        accepted[name] = "; ".join(what for _, what in sorted(found))
    return accepted


def _type_name(field: dataclasses.Field) -> str:
    return {"int": "integer", "float": "float", "bool": "boolean", "str": "string"}.get(
        field.type if isinstance(field.type, str) else field.type.__name__, str(field.type))


def render_config_reference(root: Path, args: Mapping[str, str]) -> str:
    """Every ``RunConfig`` field, by section: key, type, default, what validation accepts, its comment."""
    config = find_module("config")
    import inspect

    source = inspect.getsource(config)
    cls_source = inspect.getsource(config.RunConfig)
    first = source.index(cls_source)
    offset = source[:first].count("\n")  # line of the class in the module, minus one
    comments = trailing_comments(source)
    accepted = _accepted(config, source)
    choices = {k: str(_Choices(v)) for k, v in vars(config).items()
               if k.isupper() and isinstance(v, tuple) and all(isinstance(x, str) for x in v)}
    with open(root / "pyproject.toml", "rb") as fh:
        app_config = tomllib.load(fh).get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    fields = {f.name: f for f in dataclasses.fields(config.RunConfig)}
    sections: list[tuple[str, list[list[str]]]] = []
    tree = ast.parse(cls_source)
    body = tree.body[0].body  # type: ignore[attr-defined]
    section_lines = {i + 1 + offset: m.group(1).strip() for i, line in enumerate(cls_source.splitlines())
                     if (m := re.match(r"\s*# -+ (.+?) -+\s*$", line))}
    headings = sorted(section_lines.items())
    for node in body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        name = node.target.id
        line = node.lineno + offset
        heading = next((text for at, text in reversed(headings) if at < line), "settings")
        if not sections or sections[-1][0] != heading:
            sections.append((heading, []))
        field = fields[name]
        key = name.replace("_", "-")
        meaning = comments.get(line, "")
        for token, pretty in choices.items():
            meaning = re.sub(rf"^one of {token}\b\s*", "", meaning)  # the accepted column lists them
            meaning = re.sub(rf"\b{token}\b", pretty, meaning)
        for ref, link in DOC_LINKS.items():
            meaning = meaning.replace(ref, link)
        default = toml_value(field.default)
        if key in app_config and toml_value(app_config[key]) != default:
            default += f" (pyproject.toml: {toml_value(app_config[key])})"
        elif key not in app_config:
            default += " (not in pyproject.toml)"
        accepts = accepted.get(name) or {"boolean": "true or false", "string": "a string"}.get(_type_name(field), "")
        if name == "batch_size":
            accepts = accepts or 'an integer >= 0 or "full"'
        sections[-1][1].append([f"`{key}`", _type_name(field), f"`{default}`", accepts, meaning or "—"])
    parts = []
    for heading, rows in sections:
        for ref, link in DOC_LINKS.items():
            heading = heading.replace(ref, link)
        parts.append(f"### {heading}\n\n" + table(["key", "type", "default", "accepted", "meaning"], rows))
    return "\n\n".join(parts)


def render_validation_reasons(root: Path, args: Mapping[str, str]) -> str:
    """``schema.REASONS`` with each reason's comment: the rejection reasons a round counts."""
    validation = find_module("schema")
    import inspect

    source = inspect.getsource(validation)
    comments = trailing_comments(source)
    rows = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "REASONS" for t in node.targets):
            for elt in node.value.elts:  # type: ignore[attr-defined]
                rows.append([f"`{elt.value}`", f"`rejected-{elt.value}`", comments.get(elt.lineno, "")])
    if [r[0] for r in rows] != [f"`{r}`" for r in validation.REASONS]:
        raise RenderError("schema.REASONS is not a literal tuple of strings: cannot read its comments")
    return table(["reason", "counter in metrics.jsonl", "rejected when"], rows)


def render_resumable_keys(root: Path, args: Mapping[str, str]) -> str:
    """Inline: the run-config keys a resumed run may change (``checkpoint.RESUMABLE_CHANGES``)."""
    checkpoint = find_module("checkpoint")
    return ", ".join(f"`{key}`" for key in sorted(checkpoint.RESUMABLE_CHANGES))


#: The paper behind each strategy (prose: not derived from the code).
STRATEGY_PAPERS = {
    "FedAvg": "McMahan et al., AISTATS 2017",
    "FedProx": "Li et al., MLSys 2020",
    "FedAvgM": "Hsu et al., 2019 (arXiv:1909.06335)",
    "FedAdam": "Reddi et al., ICLR 2021",
    "FedYogi": "Reddi et al., ICLR 2021",
    "FedAdagrad": "Reddi et al., ICLR 2021",
    "FedMedian": "Yin et al., ICML 2018",
    "FedTrimmedAvg": "Yin et al., ICML 2018",
    "Krum": "Blanchard et al., NeurIPS 2017",
    "Scaffold": "Karimireddy et al., ICML 2020",
    "FedNova": "Wang et al., NeurIPS 2020",
}


def _keys_by_strategy(source: str) -> dict[str, list[str]]:
    """Strategy name -> the ``cfg.<field>`` keys its branch of ``strategy_kwargs`` reads."""
    tree = ast.parse(source)
    func = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "strategy_kwargs")
    found: dict[str, list[str]] = {}

    def names(test: ast.expr) -> list[str]:
        if isinstance(test, ast.Compare) and isinstance(test.comparators[0], ast.Constant):
            return [test.comparators[0].value]
        if isinstance(test, ast.Compare) and isinstance(test.comparators[0], ast.Tuple):
            return [e.value for e in test.comparators[0].elts]  # type: ignore[attr-defined]
        return []

    def visit(node: ast.If) -> None:
        keys = sorted({n.attr.replace("_", "-") for stmt in node.body for n in ast.walk(stmt)
                       if isinstance(n, ast.Attribute) and getattr(n.value, "id", "") == "cfg"})
        for name in names(node.test):
            found[name] = keys
        for nxt in node.orelse:
            if isinstance(nxt, ast.If):
                visit(nxt)

    for stmt in func.body:
        if isinstance(stmt, ast.If):
            visit(stmt)
    return found


def render_strategy_registry(root: Path, args: Mapping[str, str]) -> str:
    """``strategy = NAME``: the class behind it, the run-config keys it reads, the state a checkpoint keeps, packed mode."""
    import inspect

    registry = importlib.import_module("strategies.registry")
    state = importlib.import_module("strategies.state")
    config = importlib.import_module("fedavg_relu.core.config")
    keys = _keys_by_strategy(inspect.getsource(registry))
    rows = []
    for name, cls in registry.STRATEGY_CLASSES.items():
        origin = "Flower" if cls.__module__.startswith("flwr.") else f"`{cls.__module__.replace('.', '/')}.py`"
        cfg = config.RunConfig(strategy=name, dataset="synthetic", num_partitions=5, width=8)
        kept = ", ".join(f"`{a}`" for a in state.strategy_state(registry.build_inner(cfg, 0.1))) or "—"
        read = ", ".join(f"`{k}`" for k in keys.get(name, [])) or "—"
        packed = "yes" if name in config.PACKED_STRATEGIES else "no: needs every client's model"
        rows.append([f"`{name}`", f"`{cls.__name__}` ({origin})", read, kept, packed, STRATEGY_PAPERS.get(cls.__name__, "")])
    return table(["strategy", "update rule", "run-config keys it reads", "state kept for resume", "packed mode", "paper"], rows)


# --- benchmarks/results: scale.py's output --------------------------------------------------
def _json(root: Path, path: str) -> Any:
    file = root / path
    if not file.exists():
        raise RenderError(f"{path} does not exist")
    return json.loads(file.read_text(encoding="utf-8"))


def _scale(root: Path, args: Mapping[str, str]) -> dict[str, Any]:
    return _json(root, f"{args.get('dir', 'benchmarks/results').rstrip('/')}/scale.json")


def _gib(row: Mapping[str, Any]) -> str:
    return f"{row['peak-pss-gib']:.2f} ({row['peak-rss-gib']:.2f})"


def render_scale_paths(root: Path, args: Mapping[str, str]) -> str:
    """One row per path of ``scale.json``: speed, overhead, FLOP share, memory."""
    data = _scale(root, args)
    rows = []
    for p in data["paths"]:
        speedup = p.get("speedup-vs-stock-default")
        rows.append([
            p["path"], f"{p['actors']} x {p['threads-per-actor']}", f"{p['round-s']:.3f}", f"{p['client-updates-per-s']:.0f}",
            "—" if speedup is None else f"{speedup:.1f}", f"{p['overhead-ms-per-client-round']:.2f}",
            f"{p['flops-fraction-of-peak']:.2f}", _gib(p),
        ])
    return table(["path", "actors x threads", "round s", "client-updates/s", "x stock default",
                  "overhead ms/client-round", "FLOP/s / peak", "peak PSS GiB (RSS)"], rows)


def render_scale_scan(root: Path, args: Mapping[str, str]) -> str:
    """Round time and memory as the number of virtual clients grows (``scan`` of ``scale.json``)."""
    data = _scale(root, args)
    rows = [[s["path"], s["virtual-clients"], s["clients-per-round"], f"{s['round-s']:.3f}",
             f"{s['round-time-vs-smallest']:.2f}", _gib(s)] for s in data.get("scan", [])]
    if not rows:
        raise RenderError(f"{args.get('dir')}/scale.json has no scan")
    return table(["path", "virtual clients", "per round", "round s", "vs smallest", "peak PSS GiB (RSS)"], rows)


def render_scale_run(root: Path, args: Mapping[str, str]) -> str:
    """One paragraph: the machine, the workload and the reference timings of a ``scale.json`` run."""
    data = _scale(root, args)
    m = data["meta"]
    peak, loop = m["matmul-peak-gflops"], m["plain-loop-s"]
    out = m["outside-flower-2-threads"]
    return (
        f"Run {stamp_text(m)}. "
        f"Workload: {m['input-dim']} → {m['width']} → 10, {m['clients-per-round']} clients per round, "
        f"{m['examples-per-client']} examples and {m['local-steps']} full-batch step(s) per client, drift metrics "
        f"{'on' if m['drift-metrics'] else 'off'}, {m['rounds']} rounds; "
        f"{m['train-flops-per-client-round'] / 1e6:.1f} MFLOP of training per client-round. "
        f"Machine: {m['machine']}, torch {m['torch']}; the whole benchmark took {m['seconds']:.0f} s. "
        f"2048² float32 matmul: {peak['1']:.0f} GFLOP/s on 1 thread, {peak['2']:.0f} on 2. The same training in a "
        f"plain PyTorch loop over the round's clients: {loop['1']:.3f} s on 1 thread, {loop['2']:.3f} s on 2. "
        f"Outside Flower, on 2 threads: packed mode's cohort training alone takes {out['packed-compute-s'] * 1e3:.1f} ms "
        f"per round ({out['packed-compute-fraction-of-peak']:.2f} of the matmul peak); one plain PyTorch step of one "
        f"model on all the round's examples stacked takes {out['centralized-step-s'] * 1e3:.1f} ms "
        f"({out['centralized-step-fraction-of-peak']:.2f} of the peak)."
    )


def render_scale_profile(root: Path, args: Mapping[str, str]) -> str:
    """Where one standard-path client-round goes (``profile`` of ``scale.json``), in ms of actor time."""
    prof = _scale(root, args)["profile"]
    total = prof["actor-seconds-per-client-round"]
    rows = [
        ["our client code (records ↔ numpy, local training, reply)", prof["client-code-s"]],
        ["  of which the local training itself", prof["plain-training-s"]],
        ["serialization (message, context, reply: what Ray ships)", prof["serialization-s"]],
        ["Flower's messaging and scheduling (the rest)", prof["flower-messaging-s"]],
        ["actor time per client-round, in all", total],
    ]
    return table(["part", "ms per client-round", "share"],
                 [[name, f"{s * 1e3:.2f}", f"{s / total:.1%}"] for name, s in rows])


def _path(data: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    return next((p for p in data["paths"] if p["path"] == name), None)


def render_scale_workloads(root: Path, args: Mapping[str, str]) -> str:
    """One row per benchmark folder (``dirs=a,b,...``): client-updates/s per path and packed mode's FLOP shares."""
    rows = []
    for folder in args.get("dirs", "benchmarks/results").split(","):
        data = _scale(root, {"dir": folder})
        m = data["meta"]
        steps = f"{m['local-steps']} local step" + ("s" if m["local-steps"] != 1 else "")
        label = (f"{steps}, {m['input-dim']} inputs, drift {'on' if m['drift-metrics'] else 'off'} "
                 f"(`{folder}`)")

        def rate(name: str) -> str:
            p = _path(data, name)
            if p is None:
                return "—"
            s = p.get("speedup-vs-stock-default")
            return f"{p['client-updates-per-s']:.0f}/s" + (f" ({s:.1f}×)" if s is not None and name.startswith("packed") else "")

        packed = _path(data, "packed")
        out = m["outside-flower-2-threads"]
        shares = "—" if packed is None else (f"{packed['flops-fraction-of-peak']:.2f} / {out['packed-compute-fraction-of-peak']:.2f}"
                                             f" / {out['centralized-step-fraction-of-peak']:.2f}")
        rows.append([label, rate("stock-default"), rate("standard"), rate("packed"), rate("packed-2nodes"), shares,
                     stamp_text(m)])
    return table(["workload (64 or 256 → 4096 → 10, 100 clients/round, 32 examples)", "stock-default", "standard",
                  "packed (1 × 2)", "packed-2nodes", "packed FLOP share: round / training alone / plain step",
                  "when"], rows)


#: The performance targets scale.json is judged against.
TARGET_SPEEDUP, TARGET_FLOP_SHARE, TARGET_OVERHEAD_MS, TARGET_GROWTH, TARGET_MEMORY_GIB = 10.0, 0.5, 1.0, 1.2, 1.5


def render_scale_targets(root: Path, args: Mapping[str, str]) -> str:
    """The targets and whether ``scale.json`` meets them (every number and verdict computed here)."""
    data = _scale(root, args)
    out = data["meta"]["outside-flower-2-threads"]
    stock, stock1, std = _path(data, "stock-default"), _path(data, "stock-1cpu"), _path(data, "standard")
    packed, packed2 = _path(data, "packed"), _path(data, "packed-2nodes")
    yes = {True: "yes", False: "**no**"}
    rows = []
    speed = packed["client-updates-per-s"] / stock["client-updates-per-s"]
    speed2 = packed2["client-updates-per-s"] / stock["client-updates-per-s"] if packed2 else math.nan
    rows.append([f"packed ≥ {TARGET_SPEEDUP:g}× stock Flower's client-updates/s",
                 f"{packed['client-updates-per-s']:.0f} vs {stock['client-updates-per-s']:.0f}/s: {speed:.1f}× stock-default"
                 + (f" (packed-2nodes {speed2:.1f}×)" if packed2 else "")
                 + (f"; {packed['client-updates-per-s'] / stock1['client-updates-per-s']:.1f}× stock-1cpu" if stock1 else ""),
                 yes[speed >= TARGET_SPEEDUP]])
    share = packed["flops-fraction-of-peak"]
    rows.append([f"packed ≥ {TARGET_FLOP_SHARE:.0%} of the matmul peak",
                 f"{share:.2f} for the whole Flower round; {out['packed-compute-fraction-of-peak']:.2f} for the cohort "
                 f"training alone; {out['centralized-step-fraction-of-peak']:.2f} for one plain PyTorch step of one model "
                 "on all the data", yes[share >= TARGET_FLOP_SHARE]])
    over = packed["overhead-ms-per-client-round"]
    rows.append([f"packed framework overhead ≤ {TARGET_OVERHEAD_MS:g} ms per client-round",
                 f"{over:.2f} ms" + (f" (packed-2nodes {packed2['overhead-ms-per-client-round']:.2f} ms)" if packed2 else ""),
                 yes[over <= TARGET_OVERHEAD_MS]])
    ok = std["client-updates-per-s"] >= stock["client-updates-per-s"]
    rows.append(["standard path never slower than stock-default",
                 f"{std['client-updates-per-s']:.0f} vs {stock['client-updates-per-s']:.0f} client-updates/s"
                 + (f" (stock-1cpu: {stock1['client-updates-per-s']:.0f})" if stock1 else ""), yes[ok]])
    scan = data.get("scan", [])
    if scan:
        largest = max(s["virtual-clients"] for s in scan)
        smallest = min(s["virtual-clients"] for s in scan)
        growth = {s["path"]: s["round-time-vs-smallest"] for s in scan if s["virtual-clients"] == largest}
        rows.append([f"round time ×≤{TARGET_GROWTH:g} from {smallest:,} to {largest:,} virtual clients (same clients per round)",
                     "; ".join(f"{p} {g:.2f}×" for p, g in growth.items()), yes[growth.get("packed", math.inf) <= TARGET_GROWTH]])
        peak = next(s for s in scan if s["virtual-clients"] == largest and s["path"] == "packed")
        rows.append([f"peak memory of the whole process tree at {largest:,} virtual clients ≤ {TARGET_MEMORY_GIB:g} GiB",
                     f"packed {peak['peak-pss-gib']:.2f} GiB PSS ({peak['peak-rss-gib']:.2f} GiB RSS)",
                     yes[peak["peak-pss-gib"] <= TARGET_MEMORY_GIB]])
    return table(["target", "measured", "met?"], rows)


# --- benchmarks/results: headline.py and profile_packed.py (dated, with their commit) -------------
#: Above this 1-minute load average (2 cores) a run shared the machine with other work.
QUIET_LOAD = 3.0


def stamp_text(meta: Mapping[str, Any]) -> str:
    """``measured <date> at commit <sha>, load <1-min>`` of a results file's ``meta`` (what every measured
    number carries); older files say their commit was recorded later from git history."""
    commit = meta.get("git commit")
    if not meta.get("date") or not commit:
        raise RenderError("the results file records no date or no git commit: re-run its benchmark")
    text = f"measured {meta['date']} at commit `{commit[:10]}`"
    if meta.get("load"):
        text += f", load {meta['load'][0]:.1f}"
        if meta["load"][0] > QUIET_LOAD:
            text += " (a loaded machine: re-measure on a quiet one)"
    if meta.get("commit-note"):
        text += " (commit recorded later, from git history)"
    return text


def render_bench_stamp(root: Path, args: Mapping[str, str]) -> str:
    """Inline: when and on what commit the run behind ``file=`` (a JSON with ``meta``) was measured."""
    return stamp_text(_json(root, args["file"])["meta"])


HEADLINE = "benchmarks/results/headline.json"
#: The issue's targets for the headline comparison: packed vs pfl's best, vs stock-default, share of the peak at tau 5.
TARGET_X_PFL, TARGET_X_STOCK, TARGET_PEAK_TAU5 = 3.0, 30.0, 0.5


def render_headline_table(root: Path, args: Mapping[str, str]) -> str:
    """Every path of ``headline.json`` at every tau: round time, client-updates/s, ratios, shares of the peak."""
    data = _json(root, args.get("file", HEADLINE))
    m = data["meta"]
    lines = [f"{m['workload']}; {m['repeats']} interleaved runs of {m['rounds']} rounds per path, median of the "
             f"steady rounds; {m['machine']}, torch {m['torch']}, flwr {m['flwr']}, pfl {m['pfl']}; 2048² matmul "
             f"{m['matmul-peak-gflops']['1']:.0f} GFLOP/s on 1 thread, {m['matmul-peak-gflops']['2']:.0f} on 2; "
             f"{stamp_text(m)} (load {m['load-at-end'][0]:.1f} at the end).", ""]
    rows = []
    for tau, block in data["taus"].items():
        for p in block["paths"]:
            if "round-s" not in p:
                rows.append([tau, p["path"], p["layout"], "failed", "", "", "", "", ""])
                continue
            best = " (pfl's best)" if p["path"] == block.get("pfl-best") else ""
            rows.append([
                tau, f"{p['path']}{best}", p["layout"],
                f"{p['round-s']:.3f} ({p['round-s-min']:.3f}–{p['round-s-max']:.3f})",
                f"{p['client-updates-per-s']:.0f}", f"{p.get('x-stock-default', math.nan):.1f}",
                f"{p.get('x-pfl-best', math.nan):.2f}", f"{p['flops-fraction-of-peak']:.2f}",
                f"{p['fraction-of-gemm-roofline']:.2f}",
            ])
    lines.append(table(["τ", "path", "layout", "round s (min–max)", "client-updates/s", "× stock-default", "× pfl's best",
                        "FLOP/s / 2048² peak", "share of the GEMM roofline"], rows))
    return "\n".join(lines)


def render_headline_targets(root: Path, args: Mapping[str, str]) -> str:
    """The issue's targets for packed mode, judged on ``headline.json`` (every number and verdict computed here)."""
    data = _json(root, args.get("file", HEADLINE))
    yes = {True: "yes", False: "**no**"}
    rows = []
    for tau, block in data["taus"].items():
        packed = _path(block, "packed")
        if packed is None or "round-s" not in packed:
            continue
        if "x-pfl-best" in packed:
            rows.append([f"τ = {tau}: packed ≥ {TARGET_X_PFL:g}× pfl's best ({block['pfl-best']})",
                         f"{packed['x-pfl-best']:.2f}×", yes[packed["x-pfl-best"] >= TARGET_X_PFL]])
        if "x-stock-default" in packed:
            rows.append([f"τ = {tau}: packed ≥ {TARGET_X_STOCK:g}× stock-default", f"{packed['x-stock-default']:.1f}×",
                         yes[packed["x-stock-default"] >= TARGET_X_STOCK]])
        if tau == "5":
            share = packed["flops-fraction-of-peak"]
            rows.append([f"τ = 5: the whole round ≥ {TARGET_PEAK_TAU5:.0%} of the matmul peak",
                         f"{share:.2f} of the 2048² peak; {packed['fraction-of-gemm-roofline']:.2f} of the round's GEMMs "
                         "timed at their own shapes", yes[share >= TARGET_PEAK_TAU5]])
    return table(["target", "measured", "met?"], rows)


def render_headline_num(root: Path, args: Mapping[str, str]) -> str:
    """Inline: ``key=`` of path ``path=`` at ``tau=`` in ``headline.json`` (``fmt=``)."""
    data = _json(root, args.get("file", HEADLINE))
    row = _path(data["taus"][args["tau"]], args["path"])
    if row is None or args["key"] not in row:
        raise RenderError(f"headline.json has no {args['key']!r} for {args['path']} at tau={args['tau']}")
    return format(row[args["key"]], args.get("fmt", ""))


def render_gemm_roofline(root: Path, args: Mapping[str, str]) -> str:
    """The round's matrix products at ``tau=`` (``headline.json``): shape, count, rate at that shape, seconds."""
    data = _json(root, args.get("file", HEADLINE))
    roof = data["taus"][args["tau"]]["gemm-roofline"]
    rows = []
    for item in sorted(roof["products"], key=lambda i: -i["seconds"]):
        shape = (f"{item['batch']} × " if item["batch"] else "") + f"({item['m']} × {item['k']}) · ({item['k']} × {item['n']})"
        rows.append([item["name"], shape, item["count"], f"{item['flops'] / 1e9:.2f}", f"{item['gflops']:.0f}",
                     f"{item['seconds'] * 1e3:.1f}"])
    rows.append(["all of the round's products", "", "", f"{roof['flops'] / 1e9:.2f}", f"{roof['gflops']:.0f}",
                 f"{roof['roofline-s'] * 1e3:.1f}"])
    return table(["product", "shape (batch × A · B)", "per round", "GFLOP", "GFLOP/s at this shape (2 threads)", "ms"],
                 rows)


PROFILE = "benchmarks/results/profile.json"


def render_profile_split(root: Path, args: Mapping[str, str]) -> str:
    """Where a packed round's time goes at each tau of ``profile.json``: ms per round and share, then the jitter."""
    data = _json(root, args.get("file", PROFILE))
    taus = list(data["taus"])
    parts: list[str] = []
    for block in data["taus"].values():
        parts += [k for k in block["split-s"] if k not in parts]
    order = sorted(parts, key=lambda k: -max(b["split-s"].get(k, 0.0) for b in data["taus"].values()))
    rows = []
    for part in order:
        row = [part]
        for tau in taus:
            b = data["taus"][tau]
            v = b["split-s"].get(part, 0.0)
            row.append(f"{v * 1e3:.1f} ({v / b['simulated-round-s']:.0%})")
        rows.append(row)
    rows.append(["**round, simulated (evaluation out)**"] + [f"{data['taus'][t]['simulated-round-s'] * 1e3:.1f}" for t in taus])
    rows.append(["round in process (LocalGrid, no Ray; evaluation out)"]
                + [f"{data['taus'][t]['in-process-round-s'] * 1e3:.1f}" for t in taus])
    if all("simulated-handler-s" in data["taus"][t] for t in taus):
        rows.append(["train handler inside the Ray worker (simulated)"]
                    + [f"{data['taus'][t]['simulated-handler-s'] * 1e3:.1f}" for t in taus])
        rows.append(["train handler in process"] + [f"{data['taus'][t]['in-process-handler-s'] * 1e3:.1f}" for t in taus])
    rows.append(["cohort training alone, outside Flower (best of 4)"]
                + [f"{data['taus'][t]['cohort-training-alone-s'] * 1e3:.1f}" for t in taus])
    rows.append(["test evaluation (400 examples; taken out of the round)"] + [f"{data['taus'][t]['evaluation-s'] * 1e3:.1f}" for t in taus])
    head = f"{data['meta']['clients-per-round']} clients per round, {data['meta']['rounds']} rounds per measurement; {stamp_text(data['meta'])}."
    jitter = []
    for tau in taus:
        j = data["taus"][tau]["jitter"]
        for key, label in (("simulated-round-s", "simulated round"), ("handler-s", "train handler inside the Ray worker"),
                           ("round-minus-handler-s", "round − handler (server, messaging)"),
                           ("in-process-round-s", "in-process round")):
            v = j[key]
            jitter.append([tau, label, f"{v['min'] * 1e3:.1f}", f"{v['median'] * 1e3:.1f}", f"{v['max'] * 1e3:.1f}"])
    return "\n".join([head, "", table(["part", *(f"τ = {t}: ms per round (share)" for t in taus)], rows), "",
                      table(["τ", "rounds 2–R", "min ms", "median ms", "max ms"], jitter)])


# --- benchmarks/results: memory.py and drift_overhead.py -----------------------------------
def _missing(path: str, command: str) -> str:
    return f"*Not measured yet: `{path}` does not exist. `{command}` writes it; then run `python scripts/render_docs.py`.*"


def render_memory_table(root: Path, args: Mapping[str, str]) -> str:
    """Peak memory and round time by number of clients (``benchmarks/results/memory/memory.json``).

    Rows measured with the PSS split (process memory, shared memory, mapped files) show it.
    """
    path = args.get("file", "benchmarks/results/memory/memory.json")
    if not (root / path).exists():
        return _missing(path, "python benchmarks/memory.py")
    data = _json(root, path)
    meta, rows = data.get("meta", {}), data.get("rows", [])
    caption = ", ".join(f"{k}={v}" for k, v in meta.items() if k not in ("memory-gib", "note"))
    split = any("peak-pss-anon-gib" in r for r in rows)
    alpha = any("dirichlet-alpha" in r for r in rows)  # rows that differ in α carry their own
    body = []
    for r in rows:
        secs = r.get("round-seconds") or []
        load = r.get("loadavg")
        parts = [f"{r[k]:.2f}" if k in r else "—" for k in ("peak-pss-anon-gib", "peak-pss-shmem-gib", "peak-pss-file-gib")]
        body.append([r["path"], r["clients"], *([f"{r['dirichlet-alpha']:g}" if "dirichlet-alpha" in r else "—"] if alpha else []),
                     f"{r['peak-pss-gib']:.2f}", *(parts if split else []), f"{r['peak-rss-gib']:.2f}",
                     f"{secs[-1]:.1f}" if secs else "—", r.get("rounds", 0), r.get("status", ""),
                     f"{load[0]:.1f}" if load else "—"])
    head = ["path", "clients", *(["Dirichlet α"] if alpha else []), "peak PSS GiB",
            *(["of it: process", "shared (Ray store)", "mapped files"] if split else []),
            "peak RSS GiB", "s per round (last round)", "rounds done", "status", "load at end (1 min)"]
    note = f"\n\n{meta['note']}" if meta.get("note") else ""
    return (f"{caption}\n\n" if caption else "") + table(head, body) + note


def render_deploy_stop(root: Path, args: Mapping[str, str]) -> str:
    """SIGTERM to exit of a worker and a SuperNode (``benchmarks/deploy_latency.py stop --json FILE``)."""
    path = args.get("file", "benchmarks/results/deploy/stop.json")
    if not (root / path).exists():
        return _missing(path, f"python benchmarks/deploy_latency.py stop --json {path}")
    stop = _json(root, path).get("stop", {})
    labels = {"worker-idle": "ClientApp worker, idle (torch loaded)",
              "worker-busy": "ClientApp worker, 1 s into a long train task (abandoned, reported failed)",
              "supernode": "SuperNode (Flower's own handler)"}
    rows = [[label, f"{stop[key][0]:.2f}", stop[key][1]] for key, label in labels.items() if key in stop]
    return table(["process, state", "seconds from SIGTERM to exit", "exit code"], rows)


def render_deploy_proxy(root: Path, args: Mapping[str, str]) -> str:
    """Request and round latency without and with nginx in front of the SuperLink
    (``benchmarks/deploy_latency.py proxy --json FILE``), with the run's date and commit."""
    path = args.get("file", "benchmarks/results/deploy/proxy.json")
    if not (root / path).exists():
        return _missing(path, f"python benchmarks/deploy_latency.py proxy --json {path}")
    data = _json(root, path)["proxy"]
    req, runs = data["summary"]["requests"], data["summary"]["runs"]
    rows = []
    for mode, label in (("keep-alive", "one request, kept-alive TLS connection, ms (median / p90)"),
                        ("new-connection", "one request on a new TLS connection, ms (median / p90)")):
        d, p = req[f"direct-{mode}"], req[f"proxy-{mode}"]
        rows.append([label, f"{d['median']:.2f} / {d['p90']:.2f}", f"{p['median']:.2f} / {p['p90']:.2f}",
                     f"{p['median'] / d['median']:.2f}×"])
    for key, label, fmt in (("round-1", "round 1, s", ".1f"), ("round", "later rounds, s (median)", ".2f"),
                            ("node-round", "a node's time per round (train + drift message, received → reply sent), s", ".2f")):
        d, p = runs["direct"][key], runs["proxy"][key]
        rows.append([label, format(d, fmt), format(p, fmt), f"{p / d:.2f}×"])
    n = req["direct-keep-alive"]["n"]
    note = (f"\n\n*Measured {data['date']} at commit {data['commit']} on {data['cpus']} CPUs (load average "
            f"{data['loadavg'][0]:.1f} at the end), nginx {data['nginx']}, everything on loopback. Requests: {n} per "
            f"cell, an unsigned Fleet `get-run` (the SuperLink's middleware answers 401), direct and through nginx "
            f"interleaved in blocks of 20. Rounds: {data['config']}.*")
    return table(["", "SuperLink directly", "through nginx", "nginx / direct"], rows) + note


def render_drift_overhead(root: Path, args: Mapping[str, str]) -> str:
    """Seconds per round with each measurement on, and the ratio to all off (``benchmarks/drift_overhead.py --out FILE``)."""
    path = args.get("file", "benchmarks/results/drift_overhead.json")
    if not (root / path).exists():
        return _missing(path, f"python benchmarks/drift_overhead.py --out {path}")
    data = _json(root, path)
    meta = data["meta"]
    settings = list(meta["settings"])
    floor = all("drift-gradients-s" in r for r in data["rows"])
    header = ["case"] + [f"{s} s/round (× off)" if s != "off" else "off s/round" for s in settings]
    header += ["floor: 2 gradients/client s (× off)"] if floor else []
    body = [[r["case"]] + [f"{r['round-seconds'][s]:.3f}" + (f" ({r['ratio-to-off'][s]:.2f}×)" if s != "off" else "")
                           for s in settings]
            + ([f"{r['drift-gradients-s']:.3f} ({r['floor-ratio']:.2f}×)"] if floor else []) for r in data["rows"]]
    note = (f"\n\n*{meta['workload']}, width {meta['width']}, {meta['rounds']} rounds × {meta['repeats']} repeats per "
            f"setting, medians of rounds ≥ 1; {meta['cpus']} CPUs, {meta['torch-threads']} torch threads, "
            f"load average {meta['loadavg'][0]:.1f} at the end"
            + (f"; {stamp_text(meta)}" if meta.get("git commit") else "") + ".*")
    return table(header, body) + note


# --- results/strategies: the strategy comparison -----------------------------------------
def _csv(root: Path, path: str) -> list[dict[str, Any]]:
    file = root / path
    if not file.exists():
        raise RenderError(f"{path} does not exist")
    with open(file, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        for key, value in row.items():
            try:
                row[key] = float(value)
            except (TypeError, ValueError):
                pass
    return rows


def _pm(row: Mapping[str, Any], col: str, fmt: str) -> str:
    mean, std = row[f"{col}-mean"], row[f"{col}-std"]
    if not isinstance(mean, float) or not math.isfinite(mean):
        return "–"
    return f"{format(mean, fmt)} ± {format(std, fmt)}"


def _comparison(root: Path, args: Mapping[str, str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    folder = args.get("dir", "results/strategies")
    rows = _csv(root, f"{folder}/comparison.csv")
    spec_file = root / args.get("spec", "compare/strategies.toml")
    with open(spec_file, "rb") as fh:
        spec = tomllib.load(fh)
    return rows, spec


def render_strategies_comparison(root: Path, args: Mapping[str, str]) -> str:
    """``comparison.csv`` as one table per partition, each with the configuration it came from."""
    rows, spec = _comparison(root, args)
    base = ", ".join(f"{k}={v}" for k, v in spec.get("base", {}).items())
    seeds, target = spec["compare"].get("seeds"), spec["compare"].get("target-loss")
    parts = []
    for name in dict.fromkeys(r["partition"] for r in rows):
        keys = ", ".join(f"{k}={v}" for k, v in spec.get("partitions", {}).get(name, {}).items())
        body = [[r["partition"], r["strategy"], _pm(r, "final-global-loss", ".4f"), _pm(r, "best-test-accuracy", ".3f"),
                 f"{_pm(r, 'rounds-to-target', '.1f')} ({int(r['seeds-reaching-target'])}/{int(r['seeds'])})",
                 _pm(r, "mean-relative-gradient-drift", ".3f"), _pm(r, "mean-model-divergence", ".3g")]
                for r in rows if r["partition"] == name]
        parts.append(f"**{name}** ({base}, {keys}; seeds {seeds}; target loss {target})\n\n" + table(
            ["partition", "strategy", "final global loss", "best test acc.", "rounds to target (seeds)",
             "mean rel. drift", "mean divergence"], body))
    return "\n\n".join(parts)


def render_strategies_summary(root: Path, args: Mapping[str, str]) -> str:
    """One row per strategy, the partitions side by side: final loss, rounds to target, mean relative drift."""
    rows, spec = _comparison(root, args)
    names = list(dict.fromkeys(r["partition"] for r in rows))
    by = {(r["partition"], r["strategy"]): r for r in rows}
    header = ["strategy"] + [f"final loss, {p}" for p in names] + [f"rounds to loss {spec['compare'].get('target-loss')}, {p}" for p in names] \
        + [f"mean rel. drift, {p}" for p in names]
    body = []
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        line = [f"`{strategy}`"]
        line += [f"{by[(p, strategy)]['final-global-loss-mean']:.3f}" for p in names]
        for p in names:
            r = by[(p, strategy)]
            reached, seeds = int(r["seeds-reaching-target"]), int(r["seeds"])
            mean = r["rounds-to-target-mean"]
            line.append("never" if reached == 0 else f"{mean:.1f}" + ("" if reached == seeds else f" ({reached}/{seeds} seeds)"))
        line += [f"{by[(p, strategy)]['mean-relative-gradient-drift-mean']:.2f}" for p in names]
        body.append(line)
    return table(header, body)


# --- results/theory-full: the predictions ---------------------------------------------------
_CHECKS: dict[Path, list] = {}


def _checks(root: Path, folder: str) -> list:
    """The prediction checks of a sweep folder, with intervals that draw clients where its run folders have them."""
    key = (root / folder).resolve()
    if key not in _CHECKS:
        import pandas as pd

        predictions = find_module("predictions")
        metrics = pd.read_csv(root / folder / "metrics.csv")
        cells = pd.read_csv(root / folder / "cells.csv")
        try:
            clients = find_module("clients").read_client_tables(root / folder, cells.drop_duplicates("cell-id"))
        except FileNotFoundError:
            clients = None  # no per-client rows: the intervals draw seeds only
        _CHECKS[key] = predictions.check_all(metrics, cells, clients)
    return _CHECKS[key]


def _tau_drift(c) -> str:
    rates = sorted(float(k.split("lr=")[1]) for k in c.measured if k.startswith("slope-drift/lr="))
    return "round-1 drift slope vs τ: " + ", ".join(f"{c.with_interval(f'slope-drift/lr={lr:g}', '+.2f')} at η̃ = {lr:g}"
                                                    for lr in rates)


def _slopes(*keys: str):
    def text(c) -> str:
        return "slopes " + ", ".join(c.with_interval(k) for k in keys if k in c.measured)
    return text


#: Short labels and key numbers (with their 95 % intervals) of each prediction, for the README (``short=yes``).
PREDICTION_SHORT: dict[int, tuple[str, Callable[[Any], str]]] = {
    1: ("wide nets: the loss decays linearly",
        lambda c: f"ρ = {c.with_interval('rho-widest', '.3f')} per round, r² = {c.with_interval('r2-widest', '.3f')} "
                  f"at m = {c.measured['width-widest']:.0f}"),
    2: ("‖W^R − W^0‖ falls like m^-1/2", lambda c: f"slope {c.with_interval('slope')}"),
    3: ("activation flips fall with width",
        lambda c: f"slopes {c.with_interval('slope-init')} (vs W^0), {c.with_interval('slope-local')} (W_k vs W^(r+1))"),
    4: ("nonlinear drift falls with m; relative drift flat, smoothness ∝ m, η × smoothness bounded",
        _slopes("slope-nonlinear-fraction", "slope-relative-drift", "slope-smoothness", "slope-smoothness-lr")),
    5: ("more local steps: lower loss per round, drift grows", _tau_drift),
    6: ("non-IID: ‖W_fed − W_central‖ shrinks with m", lambda c: f"slope {c.with_interval('slope-distance')}"),
    7: ("the tangent kernel's change falls like m^-1/2", lambda c: f"slope {c.with_interval('slope')}"),
}


def render_predictions(root: Path, args: Mapping[str, str]) -> str:
    """The checks of ``fedavg_relu.experiments.predictions`` on a sweep's tables (1-7; 7 needs ``ntk-change``).

    Each judged number carries its 95 % bootstrap interval (seeds, and clients where the
    run folders hold ``clients.csv``); the verdict is agrees / disagrees / undetermined.
    ``rule=yes`` adds the agreement rule; ``short=yes`` gives a short label and the key numbers only.
    """
    checks = _checks(root, args.get("dir", "results/theory-full"))
    if args.get("short", "no") == "yes":
        body = []
        for c in checks:
            label, numbers = PREDICTION_SHORT.get(c.number, (c.prediction, lambda c: c.summary))
            body.append([c.number, label, numbers(c) if c.measured else "—", c.verdict])
        return table(["#", "prediction", "measured [95 % interval]", "verdict"], body)
    with_rule = args.get("rule", "no") == "yes"
    header = ["#", "prediction", "measured", "95 % intervals (bootstrap)"] + (["rule (fixed in code)"] if with_rule else []) \
        + ["verdict"]
    body = [[c.number, c.prediction, c.summary, c.intervals_text() or "—"] + ([c.rule] if with_rule else []) + [c.verdict]
            for c in checks]
    return table(header, body)


_CLIENT_ROWS: dict[tuple[Path, str], Any] = {}


def _client_rows(root: Path, folder: str, group: str):
    """The per-client rows of a sweep group's run folders (``clients.csv``), read once per render."""
    key = ((root / folder).resolve(), group)
    if key not in _CLIENT_ROWS:
        import pandas as pd

        cells = pd.read_csv(root / folder / "cells.csv")
        _CLIENT_ROWS[key] = find_module("clients").read_client_tables(root / folder, cells[cells["group"] == group])
    return _CLIENT_ROWS[key]


def render_client_dominance(root: Path, args: Mapping[str, str]) -> str:
    """Per seed (one partition each) and width: the client with the largest mean share of the mean drift.

    A cell is ``k: share (ratio×)``: client k made that mean share of the rounds' p-weighted mean
    drift, and its own relative drift was ``ratio`` times that mean (share / data share).
    Reads a sweep's run folders (``clients.csv``) through ``fedavg_relu.experiments.clients``
    (``dir=``, default results/theory-full; ``group=``, default non-iid).
    """
    clients_mod = find_module("clients")
    rows = _client_rows(root, args.get("dir", "results/theory-full"), args.get("group", "non-iid"))
    shares = clients_mod.drift_shares(rows)
    top = clients_mod.dominant_clients(shares, by=("seed", "width"))
    widths = sorted(top["width"].unique())
    body = []
    for seed, rows in top.groupby("seed"):
        sizes = shares[(shares["seed"] == seed) & (shares["round"] == 1)].groupby("client")["num-examples"].first()
        by_width = {r["width"]: f"{int(r['client'])}: {r['share']:.2f} ({r['drift/mean']:.2f}×)" for _, r in rows.iterrows()}
        body.append([int(seed), " / ".join(str(int(n)) for n in sizes)] + [by_width.get(w, "—") for w in widths])
    return table(["seed", "n_k of clients 0 / 1 / 2 / 3"] + [f"m = {int(w)}" for w in widths], body)


def render_client_spread(root: Path, args: Mapping[str, str]) -> str:
    """Per width: the median and the max of the per-client relative drift (all rounds, clients and seeds),
    for each of the sweep's ``groups=`` (default ``width,non-iid``), from the run folders' ``clients.csv``."""
    folder = args.get("dir", "results/theory-full")
    groups = args.get("groups", "width,non-iid").split(",")
    stats = {}
    for group in groups:
        rows = _client_rows(root, folder, group)
        stats[group] = rows.groupby("width")["relative-gradient-drift"].agg(["median", "max"])
    widths = sorted(set().union(*(s.index for s in stats.values())))
    header = ["width m"] + [f"{g}: {q}" for g in groups for q in ("median", "max")]
    body = [[int(w)] + [f"{stats[g].loc[w, q]:.2f}" if w in stats[g].index else "—" for g in groups for q in ("median", "max")]
            for w in widths]
    return table(header, body)


def render_runs_summary(root: Path, args: Mapping[str, str]) -> str:
    """Inline: ``N runs, M min of run time`` from a sweep's ``cells.csv`` (sum of each run's ``elapsed``)."""
    rows = _csv(root, f"{args['dir']}/cells.csv")
    total = sum(r["elapsed"] for r in rows if isinstance(r.get("elapsed"), float))
    return f"{len(rows)} runs, {total / 60:.1f} min of recorded run time"


# --- issue 23: the disagreements explained (prediction 7 decomposed, prediction 5 located) -------------------
_EXPLAIN: dict[tuple, Any] = {}


def _explained(root: Path, what: str, folder: str) -> Any:
    """Cached tables of ``fedavg_relu.experiments.kernel`` / ``stepsize`` for a sweep folder."""
    key = (what, (root / folder).resolve())
    if key not in _EXPLAIN:
        import pandas as pd

        kernel, stepsize = find_module("kernel"), find_module("stepsize")
        if what == "kernel-csv":
            file = root / folder / "kernel.csv"
            if not file.exists():
                raise RenderError(f"{folder}/kernel.csv does not exist (python -m fedavg_relu.experiments.kernel {folder})")
            _EXPLAIN[key] = pd.read_csv(file)
            return _EXPLAIN[key]
        metrics = pd.read_csv(root / folder / "metrics.csv")
        if what == "rounds":
            _EXPLAIN[key] = kernel.round_table(metrics)
        elif what == "flip-law":
            _EXPLAIN[key] = kernel.flip_law(_explained(root, "rounds", folder))
        elif what == "width-cells":
            _EXPLAIN[key] = kernel.width_cells(metrics)
        elif what == "local":
            cells = pd.read_csv(root / folder / "cells.csv")
            clients = find_module("clients").read_client_tables(root / folder, cells.drop_duplicates("cell-id"))
            local = stepsize.local_slopes(metrics, clients)
            summary = stepsize.range_summary(local)
            summary["smoothness"] = stepsize.measured_smoothness(stepsize.first_round_cells(metrics))
            check = find_module("predictions").check_local_steps(metrics, clients)
            _EXPLAIN[key] = (local, summary, check)
    return _EXPLAIN[key]


def _ci(value: float, low: float, high: float, fmt: str = "+.2f") -> str:
    return f"{value:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def render_ntk_by_round(root: Path, args: Mapping[str, str]) -> str:
    """The width slope of ``ntk-change`` and of the flips vs W^0 at rounds ``rounds=`` (default 1,3,10,30),
    95 % intervals over seeds, and the slope the random-sign flip law gives, (flip slope − 1)/2."""
    folder = args.get("dir", "results/theory-full")
    which = tuple(int(r) for r in args.get("rounds", "1,3,10,30").split(","))
    table_ = find_module("kernel").slope_by_round(_explained(root, "rounds", folder), which)
    body = [[int(r["round"]), _ci(r["slope-ntk-change"], r["low-ntk-change"], r["high-ntk-change"]),
             _ci(r["slope-activation-flips-init"], r["low-activation-flips-init"], r["high-activation-flips-init"]),
             f"{(r['slope-activation-flips-init'] - 1) / 2:+.2f}"] for _, r in table_.iterrows()]
    return table(["round", "kernel change: slope vs m", "flips vs W^0: slope vs m", "flip law: (flip slope − 1)/2"], body)


def render_ntk_saturation(root: Path, args: Mapping[str, str]) -> str:
    """Per width: seed-mean ``ntk-change`` at round 10 and at the last round, their ratio, the late slope vs round."""
    table_ = find_module("kernel").saturation(_explained(root, "rounds", args.get("dir", "results/theory-full")))
    body = [[int(r["width"]), f"{r['ntk-change-r10']:.4f}", f"{r['ntk-change-last']:.4f}", f"{r['ratio-last-to-early']:.2f}",
             f"{r['late-slope-vs-round']:+.2f}"] for _, r in table_.iterrows()]
    return table(["width m", "kernel change, round 10", "last round", "last / round 10", "slope vs round, rounds 10..R"], body)


def render_ntk_windows(root: Path, args: Mapping[str, str]) -> str:
    """Slopes of the last round's ``ntk-change`` and flips vs W^0 over sub-ranges of widths (95 % intervals, seeds)."""
    kernel = find_module("kernel")
    cells = _explained(root, "width-cells", args.get("dir", "results/theory-full"))
    ntk = kernel.window_slopes(cells, "ntk-change").set_index("widths")
    flips = kernel.window_slopes(cells, "activation-flips-init").set_index("widths")
    body = [[w, _ci(ntk.loc[w, "slope"], ntk.loc[w, "low"], ntk.loc[w, "high"]),
             _ci(flips.loc[w, "slope"], flips.loc[w, "low"], flips.loc[w, "high"]),
             f"{(flips.loc[w, 'slope'] - 1) / 2:+.2f}"] for w in ntk.index]
    return table(["widths", "kernel change: slope", "flips vs W^0: slope", "flip law: (flip slope − 1)/2"], body)


def render_ntk_probes(root: Path, args: Mapping[str, str]) -> str:
    """From ``kernel.csv`` (``dir=``, default results/ntk-probes): per group, number of rounds and probe set, the width
    slopes (95 % intervals over seeds) of the final kernel change, of the flips, and of the change the same flips would
    make with random signs (``paper`` at depth 1), the measured change over that reference at the narrowest and the
    widest width, and the flips' mean net sign μ."""
    import numpy as np

    unc = find_module("uncertainty")
    frame = _explained(root, "kernel-csv", args.get("dir", "results/ntk-probes"))
    body = []

    def slope_ci(rows, y, name):
        if y not in rows or rows[y].isna().all():
            return "—"
        groups = {float(w): list(g[y].astype(float)) for w, g in rows.groupby("width")}
        xs = sorted(groups)
        slope = float(np.polyfit(np.log(xs), [float(np.mean(np.log(groups[x]))) for x in xs], 1)[0])
        interval = unc.bootstrap_loglog_slope(groups, name)
        return _ci(slope, interval.low, interval.high)

    for (group, rounds), rows in frame.groupby(["group", "rounds"]):
        lo, hi = int(rows["width"].min()), int(rows["width"].max())
        for probe in ("held-out", "train"):
            key = f"7/probes/{group}/{rounds}/{probe}"
            line = [group, int(rounds), f"{lo}-{hi}", f"{probe} ({int(rows[f'probes/{probe}'].iloc[0])})",
                    slope_ci(rows, f"ntk-change/{probe}", key), slope_ci(rows, f"flips/{probe}", key + "/flips"),
                    slope_ci(rows, f"random-sign/{probe}", key + "/random")]
            if f"random-sign/{probe}" in rows and rows[f"random-sign/{probe}"].notna().all():
                ratio = rows[f"ntk-change/{probe}"] / rows[f"random-sign/{probe}"]
                line.append(f"{ratio[rows['width'] == lo].mean():.2f} → {ratio[rows['width'] == hi].mean():.2f}")
            else:
                line.append("—")
            line.append(f"{rows[f'net-sign/{probe}'].mean():+.2f}")
            body.append(line)
    return table(["group", "rounds R", "widths", "probes (examples)", "kernel change: slope vs m", "flips vs W^0: slope",
                  "random-sign reference: slope", "change / reference, narrowest → widest", "net sign μ of the flips"], body)


def render_explain_value(root: Path, args: Mapping[str, str]) -> str:
    """Inline: one number of the explanations: ``of=flip-law`` (keys of ``kernel.flip_law``), ``of=stepsize``
    (keys of ``stepsize.range_summary`` and ``smoothness``), ``of=probes`` (``key=max-recorded-gap``: the largest
    relative gap between the recorded and the recomputed held-out kernel change); ``dir=``, ``fmt=``."""
    what = args["of"]
    if what == "flip-law":
        value = _explained(root, "flip-law", args.get("dir", "results/theory-full"))[args["key"]]
    elif what == "stepsize":
        value = _explained(root, "local", args.get("dir", "results/tau-stepsize"))[1][args["key"]]
    elif what == "probes":
        import numpy as np

        frame = _explained(root, "kernel-csv", args.get("dir", "results/ntk-probes"))
        gap = (frame["ntk-change/held-out"] - frame["ntk-change/recorded"]).abs() / frame["ntk-change/recorded"]
        paper = frame[(frame["group"] == "paper") & (frame["rounds"] == frame["rounds"].max())]

        def slope(rows, y):
            means = rows.groupby("width")[y].apply(lambda v: float(np.mean(np.log(v))))
            return float(np.polyfit(np.log(means.index.to_numpy(float)), means.to_numpy(), 1)[0])

        values = {"max-recorded-gap": lambda: float(gap.max()),
                  "held-out-slope": lambda: slope(paper, "ntk-change/held-out"),
                  "train-slope": lambda: slope(paper, "ntk-change/train"),
                  "random-slope-held-out": lambda: slope(paper, "random-sign/held-out"),
                  "ntk-family-slope": lambda: slope(frame[frame["group"] == "ntk-family"], "ntk-change/held-out")}
        value = values[args["key"]]()
    else:
        raise RenderError(f"of={what!r}: expected flip-law, stepsize or probes")
    return format(value, args.get("fmt", ""))


def render_width_window(root: Path, args: Mapping[str, str]) -> str:
    """Inline: the width slope of a width-group metric over ``widths=LOW-HIGH`` with its 95 % interval (seeds,
    and clients where ``clients.csv`` has the metric): ``y=``, ``reducer=`` (final, mean; default mean), ``dir=``."""
    import pandas as pd

    folder = args.get("dir", "results/theory-full")
    low, high = (int(v) for v in args["widths"].split("-"))
    y, reducer = args["y"], args.get("reducer", "mean")
    metrics = pd.read_csv(root / folder / "metrics.csv")
    width = metrics[metrics["group"] == "width"]
    cells = find_module("plots").per_cell(width, {y: reducer, "effective-learning-rate": "final"})
    cells = cells[(cells["width"] >= low) & (cells["width"] <= high)]
    predictions, unc = find_module("predictions"), find_module("uncertainty")
    clients = _checks_clients(root, folder)
    groups = predictions.run_units(cells, "width", y, clients, first=reducer == "first")
    slope = find_module("plots").fit_loglog_slope(*zip(*[(w, math.exp(sum(math.log(v) for v in unc.unit_values(u)) / len(u)))
                                                         for w, u in sorted(groups.items())])).slope
    interval = unc.bootstrap_loglog_slope(groups, f"window/{y}/{low}-{high}")
    fmt = args.get("fmt", "+.3f")
    return f"{slope:{fmt}} {interval.format(fmt)}"


def _checks_clients(root: Path, folder: str):
    """The per-client rows of every cell of a sweep folder (None without any), read once."""
    key = ("clients", (root / folder).resolve())
    if key not in _EXPLAIN:
        import pandas as pd

        cells = pd.read_csv(root / folder / "cells.csv")
        try:
            _EXPLAIN[key] = find_module("clients").read_client_tables(root / folder, cells.drop_duplicates("cell-id"))
        except FileNotFoundError:
            _EXPLAIN[key] = None
    return _EXPLAIN[key]


def render_tau_stepsize(root: Path, args: Mapping[str, str]) -> str:
    """Per η̃ of the τ × η̃ grid (``dir=``, default results/tau-stepsize): prediction 5's whole rule at that η̃ (on the
    intervals), its round-1 drift slope over all τ and each consecutive pair's slope with its 95 % interval (seeds and
    clients), marked * when η τ L̂ ≤ 1."""
    local, _, check = _explained(root, "local", args.get("dir", "results/tau-stepsize"))
    pairs = [(int(a), int(b)) for a, b in local[["tau-low", "tau-high"]].drop_duplicates().itertuples(index=False)]
    body = []
    for lr, rows in local.groupby("learning-rate"):
        clauses = [c for c in check.conditions if c.key.endswith(f"/lr={lr:g}")]
        verdict = {True: "agrees", False: "disagrees", None: "undetermined"}[check.judge_clauses(clauses)]
        line = [f"{lr:g}", verdict, check.with_interval(f"slope-drift/lr={lr:g}", "+.2f")]
        for a, b in pairs:
            r = rows[(rows["tau-low"] == a) & (rows["tau-high"] == b)].iloc[0]
            line.append(_ci(r["slope"], r["low"], r["high"]) + (" *" if r["inside"] else ""))
        body.append(line)
    return table(["η̃", "prediction 5's rule", "drift slope over all τ"] + [f"τ {a} → {b}" for a, b in pairs], body)


# --- one number -------------------------------------------------------------------------------
_SEGMENT = re.compile(r"\[(?P<sel>[^\]]*)\]|(?P<key>[^.\[]+)")


def lookup(data: Any, at: str) -> Any:
    """The value at ``at`` in ``data``: ``a.b`` walks keys, ``[k=v,k2=v2]`` picks the list item with those fields."""
    value = data
    for match in _SEGMENT.finditer(at):
        if match.group("sel") is not None:
            wanted = dict(part.split("=", 1) for part in match.group("sel").split(","))
            hits = [item for item in value if all(_same(item.get(k), v) for k, v in wanted.items())]
            if len(hits) != 1:
                raise RenderError(f"[{match.group('sel')}] matches {len(hits)} items, expected 1")
            value = hits[0]
        else:
            key = match.group("key")
            if isinstance(value, list):
                value = value[int(key)]
            elif key in value:
                value = value[key]
            else:
                raise RenderError(f"no key {key!r} (have {sorted(value)[:12]})")
    return value


def _same(value: Any, text: str) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(text) == float(value)
        except ValueError:
            return False
    return str(value) == text


def render_num(root: Path, args: Mapping[str, str]) -> str:
    """Inline: one value of a JSON or CSV file (``file=``, ``at=``, ``fmt=``; ``div=`` divides by a second value)."""
    file = args["file"]
    data = _csv(root, file) if file.endswith(".csv") else _json(root, file)
    value = lookup(data, args["at"])
    if "div" in args:
        value = value / lookup(data, args["div"])
    if "scale" in args:
        value = value * float(args["scale"])
    return format(value, args.get("fmt", ""))


def render_prediction_value(root: Path, args: Mapping[str, str]) -> str:
    """Inline: one measured number of a prediction check (``n=``, ``key=``, ``fmt=``)."""
    checks = _checks(root, args.get("dir", "results/theory-full"))
    check = next(c for c in checks if c.number == int(args["n"]))
    return format(float(check.measured[args["key"]]), args.get("fmt", ""))


def render_prediction_interval(root: Path, args: Mapping[str, str]) -> str:
    """Inline: the 95 % bootstrap interval of one judged number of a prediction, ``[low, high]`` (``n=``, ``key=``, ``fmt=``)."""
    checks = _checks(root, args.get("dir", "results/theory-full"))
    check = next(c for c in checks if c.number == int(args["n"]))
    return check.intervals[args["key"]].format(args.get("fmt", "+.3f"))


def render_prediction_verdict(root: Path, args: Mapping[str, str]) -> str:
    """Inline: a prediction's verdict (agrees / disagrees / undetermined / not measured) (``n=``, ``dir=``)."""
    checks = _checks(root, args.get("dir", "results/theory-full"))
    return next(c for c in checks if c.number == int(args["n"])).verdict


@dataclass(frozen=True)
class Renderer:
    """A marker name's function and what it reads."""

    function: Callable[[Path, Mapping[str, str]], str]
    reads: str


RENDERERS: dict[str, Renderer] = {
    "config-reference": Renderer(render_config_reference, "fedavg_relu/core/config.py (RunConfig), pyproject.toml"),
    "validation-reasons": Renderer(render_validation_reasons, "fedavg_relu/flower/schema.py (REASONS)"),
    "resumable-keys": Renderer(render_resumable_keys, "fedavg_relu/flower/checkpoint.py (RESUMABLE_CHANGES)"),
    "strategy-registry": Renderer(render_strategy_registry, "strategies/registry.py (STRATEGY_CLASSES, strategy_kwargs)"),
    "scale-paths": Renderer(render_scale_paths, "DIR/scale.json (dir=, default benchmarks/results)"),
    "scale-scan": Renderer(render_scale_scan, "DIR/scale.json"),
    "scale-run": Renderer(render_scale_run, "DIR/scale.json"),
    "scale-profile": Renderer(render_scale_profile, "DIR/scale.json"),
    "scale-workloads": Renderer(render_scale_workloads, "DIR/scale.json for each of dirs=a,b,..."),
    "scale-targets": Renderer(render_scale_targets, "DIR/scale.json"),
    "bench-stamp": Renderer(render_bench_stamp, "inline: date, commit and load of a results file's meta (file=)"),
    "headline-table": Renderer(render_headline_table, "benchmarks/results/headline.json (file=)"),
    "headline-targets": Renderer(render_headline_targets, "benchmarks/results/headline.json (file=)"),
    "headline-num": Renderer(render_headline_num, "inline: one value of headline.json: tau= path= key= [fmt=]"),
    "gemm-roofline": Renderer(render_gemm_roofline, "benchmarks/results/headline.json: the round's GEMMs at tau="),
    "profile-split": Renderer(render_profile_split, "benchmarks/results/profile.json (file=)"),
    "memory-table": Renderer(render_memory_table, "benchmarks/results/memory/memory.json (file=)"),
    "deploy-stop": Renderer(render_deploy_stop, "benchmarks/results/deploy/stop.json (file=)"),
    "deploy-proxy": Renderer(render_deploy_proxy, "benchmarks/results/deploy/proxy.json (file=)"),
    "drift-overhead": Renderer(render_drift_overhead, "benchmarks/results/drift_overhead.json (file=)"),
    "strategies-comparison": Renderer(render_strategies_comparison, "results/strategies/comparison.csv, compare/strategies.toml"),
    "strategies-summary": Renderer(render_strategies_summary, "results/strategies/comparison.csv"),
    "predictions": Renderer(render_predictions, "results/theory-full/{metrics,cells}.csv via fedavg_relu.experiments.predictions (rule=yes, short=yes)"),
    "runs-summary": Renderer(render_runs_summary, "DIR/cells.csv (dir=)"),
    "client-spread": Renderer(render_client_spread, "DIR/runs/*/clients.csv via fedavg_relu.experiments.clients (dir=, groups=)"),
    "client-dominance": Renderer(render_client_dominance, "DIR/runs/*/clients.csv via fedavg_relu.experiments.clients (dir=, group=)"),
    "num": Renderer(render_num, "one value: file= at= [fmt= div= scale=]"),
    "prediction-value": Renderer(render_prediction_value, "one measured number of a prediction: n= key= [fmt=]"),
    "prediction-interval": Renderer(render_prediction_interval, "the 95 % interval of a prediction's number: n= key= [fmt= dir=]"),
    "prediction-verdict": Renderer(render_prediction_verdict, "a prediction's verdict: n= [dir=]"),
    "width-window": Renderer(render_width_window, "a width-group slope over widths=LOW-HIGH with its interval: y= [reducer= dir= fmt=]"),
    "ntk-by-round": Renderer(render_ntk_by_round, "DIR/metrics.csv via fedavg_relu.experiments.kernel (dir=, rounds=)"),
    "ntk-saturation": Renderer(render_ntk_saturation, "DIR/metrics.csv via fedavg_relu.experiments.kernel (dir=)"),
    "ntk-windows": Renderer(render_ntk_windows, "DIR/metrics.csv via fedavg_relu.experiments.kernel (dir=)"),
    "ntk-probes": Renderer(render_ntk_probes, "results/ntk-probes/kernel.csv (dir=)"),
    "tau-stepsize": Renderer(render_tau_stepsize, "results/tau-stepsize/{metrics,cells}.csv, runs/*/clients.csv via fedavg_relu.experiments.stepsize (dir=)"),
    "explain-value": Renderer(render_explain_value, "one number of the explanations: of= key= [dir= fmt=]"),
}


# --- the marker machinery --------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """One rendered block of a page."""

    page: str
    line: int
    name: str
    args: dict[str, str]
    old: str
    new: str

    @property
    def stale(self) -> bool:
        """True when the page holds something else than what the script renders."""
        return self.old != self.new


def parse_args(text: str) -> dict[str, str]:
    """``key=value`` words of a marker."""
    out = {}
    for word in shlex.split(text):
        if "=" not in word:
            raise RenderError(f"argument {word!r}: expected key=value")
        key, value = word.split("=", 1)
        out[key] = value
    return out


def check_balanced(text: str, page: str) -> None:
    """Raise :class:`RenderError` when an opening marker has no closing one or blocks nest."""
    opened = [(m.start(), m.group(1)) for m in OPENING.finditer(text)]
    closed = [(m.start(), m.group(1)) for m in CLOSING.finditer(text)]
    events = sorted([(at, "open", name) for at, name in opened] + [(at, "close", name) for at, name in closed])
    current = None
    for at, kind, name in events:
        line = text.count("\n", 0, at) + 1
        if kind == "open":
            if current is not None:
                raise RenderError(f"{page}:{line}: render:{name} opens inside render:{current}")
            current = name
        else:
            if current != name:
                raise RenderError(f"{page}:{line}: /render:{name} closes nothing")
            current = None
    if current is not None:
        raise RenderError(f"{page}: render:{current} is never closed")


def render_text(text: str, root: Path = ROOT, page: str = "<text>") -> tuple[str, list[Block]]:
    """``text`` with every marker block rendered, and the blocks (stale or not)."""
    check_balanced(text, page)
    blocks: list[Block] = []

    def replace(match: re.Match) -> str:
        name, body = match.group("name"), match.group("body")
        line = text.count("\n", 0, match.start()) + 1
        if name not in RENDERERS:
            raise RenderError(f"{page}:{line}: unknown marker render:{name} (known: {', '.join(RENDERERS)})")
        args = parse_args(match.group("args"))
        try:
            rendered = RENDERERS[name].function(root, args)
        except RenderError as err:
            raise RenderError(f"{page}:{line}: render:{name}: {err}") from err
        except (KeyError, ValueError, TypeError, StopIteration) as err:
            raise RenderError(f"{page}:{line}: render:{name}: {type(err).__name__}: {err}") from err
        # a block keeps blank lines around its content, so that a table ends before the closing marker
        new = f"\n\n{rendered.strip(chr(10))}\n\n" if body.startswith("\n") else rendered.strip()
        blocks.append(Block(page, line, name, args, body, new))
        return match.group(0)[: match.start("body") - match.start()] + new + match.group(0)[match.end("body") - match.start():]

    return MARKER.sub(replace, text), blocks


def render_pages(paths: Iterable[Path], root: Path = ROOT, write: bool = False) -> list[Block]:
    """Render every page; rewrite the stale ones when ``write``; return every block."""
    blocks: list[Block] = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        new, found = render_text(text, root, name)
        blocks.extend(found)
        if write and new != text:
            path.write_text(new, encoding="utf-8")
    return blocks


def main(argv: list[str] | None = None) -> int:
    """Command line; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 listing the stale blocks")
    parser.add_argument("--list", action="store_true", help="list the marker names and what each reads")
    parser.add_argument("--root", default=str(ROOT), help="the repository root (results are read from here)")
    parser.add_argument("pages", nargs="*", help="pages to render (default: README.md and docs/*.md)")
    args = parser.parse_args(argv)
    if args.list:
        for name, renderer in RENDERERS.items():
            print(f"{name:24s} {renderer.reads}")
        return 0
    root = Path(args.root).resolve()
    paths = [Path(p).resolve() for p in args.pages] or pages(root)
    try:
        blocks = render_pages(paths, root, write=not args.check)
    except RenderError as err:
        print(f"render_docs: {err}", file=sys.stderr)
        return 2
    stale = [b for b in blocks if b.stale]
    if args.check:
        for b in stale:
            print(f"{b.page}:{b.line}: render:{b.name} is stale")
        if stale:
            print(f"render_docs: {len(stale)} of {len(blocks)} block(s) stale; run python scripts/render_docs.py")
            return 1
        print(f"render_docs: {len(blocks)} block(s) up to date")
        return 0
    print(f"render_docs: {len(blocks)} block(s), {len(stale)} rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
