"""The package layers import only downward, and the core never imports flwr (issue 13).

Layers, bottom to top (docs/architecture.md):

====  ==========================================  =============================================
rank  modules                                     what
====  ==========================================  =============================================
0     ``fedavg_relu.core.*``                      math, data, config: no flwr
1     ``fedavg_relu.flower.*``                    wire protocol, records, validation, the seam
2     ``strategies.*`` | ``clients.*``            server-side strategies | ClientApp handlers
3     ``fedavg_relu.server_app``                  the ServerApp
4     ``fedavg_relu.runtime.*``                   simulation, in-process grid, flwr run, deployment
5     ``fedavg_relu.experiments.*``               sweeps, comparisons, figures, predictions
6     ``fedavg_relu.cli``                         every subcommand
====  ==========================================  =============================================

Every import counts, lazy ones inside functions included. ``strategies`` and
``clients`` share a rank and must not import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedavg_relu", "strategies", "clients")


def rank(module: str) -> tuple[int, str]:
    """(rank, side) of a project module; side tells strategies from clients at rank 2."""
    if module == "fedavg_relu":
        return 0, ""
    for prefix, value in (("fedavg_relu.core", 0), ("fedavg_relu.flower", 1), ("fedavg_relu.server_app", 3),
                          ("fedavg_relu.runtime", 4), ("fedavg_relu.experiments", 5), ("fedavg_relu.cli", 6)):
        if module == prefix or module.startswith(prefix + "."):
            return value, ""
    for side in ("strategies", "clients"):
        if module == side or module.startswith(side + "."):
            return 2, side
    raise AssertionError(f"{module}: in no layer; add it to tests/test_layers.py and docs/architecture.md")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved), lazy ones included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


MODULES = modules()


def project_target(name: str) -> str | None:
    """The longest project module ``name`` points into (None outside the project)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_every_module_has_a_layer():
    """A new module must be placed in a layer (rank raises otherwise)."""
    assert {rank(m) for m in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_only_downward(module):
    """Every project module ``module`` imports has a rank <= its own; rank 2 does not cross sides."""
    mine, side = rank(module)
    bad = []
    for target in sorted(filter(None, map(project_target, imports(module, MODULES[module])))):
        theirs, their_side = rank(target)
        if theirs > mine or (theirs == mine == 2 and their_side != side):
            bad.append(f"{target} (rank {theirs})")
    assert not bad, f"{module} (rank {mine}) imports upward: {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if rank(m)[0] == 0))
def test_core_does_not_import_flwr(module):
    """flwr_datasets (a data library) is allowed; flwr itself is not."""
    flwr = sorted(i for i in imports(module, MODULES[module]) if i == "flwr" or i.startswith("flwr."))
    assert not flwr, f"{module} imports {flwr}"


def test_the_checker_sees_upward_imports(tmp_path):
    """The checker itself: a lazy relative import from core up to the runtime is found."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from ..runtime import simulation\n    import flwr.app\n")
    found = imports("fedavg_relu.core.m", source)
    assert "fedavg_relu.runtime.simulation" in found and "flwr.app" in found
    assert rank(project_target("fedavg_relu.runtime.simulation"))[0] > rank("fedavg_relu.core.m")[0]
