"""How the app's dependencies install: uv (Flower's runtime install) takes torch's CPU build.

``flwr run`` without FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 makes the SuperLink run
``python -m uv sync`` on the app bundle's pyproject.toml (flwr/supercore/superexec/
dependency_installer.py). Left alone, uv takes torch from PyPI, whose Linux wheels pull
gigabytes of CUDA libraries (``nvidia-*``). pyproject.toml routes torch to PyTorch's CPU
index instead. What these tests show offline: the table is there, Flower's bundle keeps it,
and uv resolves torch to the ``+cpu`` build through it (the CPU index's URL swapped for a
local copy holding the same wheel). Not shown here (no network but the package registries):
a real ``uv sync`` against download.pytorch.org.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_torch_comes_from_the_explicit_pytorch_cpu_index():
    """[tool.uv.sources] pins torch to the index named pytorch-cpu: PyTorch's CPU wheels, explicit (so nothing
    else is looked up there); the torch range admits 2.13.0, the CPU wheel `make install` pins."""
    config = _pyproject()
    assert config["tool"]["uv"]["sources"]["torch"] == [{"index": "pytorch-cpu"}]
    (index,) = [i for i in config["tool"]["uv"]["index"] if i["name"] == "pytorch-cpu"]
    assert index == {"name": "pytorch-cpu", "url": CPU_INDEX, "explicit": True}
    from packaging.requirements import Requirement

    (torch,) = [Requirement(d) for d in config["project"]["dependencies"] if d.startswith("torch")]
    assert torch.specifier.contains("2.13.0")


def test_flowers_app_bundle_keeps_the_uv_configuration():
    """The FAB that `flwr run` builds (its pyproject.toml is re-written from the parsed file) still holds
    [tool.uv.sources] and [[tool.uv.index]], so the runtime install's `uv sync` sees them."""
    from flwr.cli.build import build_fab_from_files

    files = {"pyproject.toml": (ROOT / "pyproject.toml").read_bytes(),
             "fedavg_relu/server_app.py": b"", "clients/client_app.py": b""}
    fab, _ = build_fab_from_files(files)
    with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
        shipped = tomllib.loads(bundle.read("pyproject.toml").decode())
    assert shipped["tool"]["uv"] == _pyproject()["tool"]["uv"]


def _local_wheel_sources() -> tuple[Path, Path]:
    """This machine's copy of torch's CPU wheel and its local package index (skip where they are absent)."""
    wheels = sorted(Path("/opt/wheels").glob("torch-2.13.0+cpu-*.whl"))
    simple = Path("/opt/pypi/simple")
    if not wheels or not (simple / "filelock" / "index.html").exists():
        pytest.skip("needs the local torch CPU wheel (/opt/wheels) and package index (/opt/pypi/simple) to resolve offline")
    return wheels[0], simple


def test_uv_resolves_torch_to_the_cpu_build_offline(tmp_path):
    """`uv lock --offline` of the project's torch requirement and its [tool.uv] tables, with the pytorch-cpu
    index's URL replaced by a local index that holds PyTorch's CPU wheel: torch locks to 2.13.0+cpu from that
    index, numpy from the default index (explicit = true), and no nvidia-* package appears."""
    pytest.importorskip("uv", reason="uv (in .[dev]) is not installed")
    wheel, simple = _local_wheel_sources()
    (tmp_path / "cpu" / "torch").mkdir(parents=True)
    (tmp_path / "cpu" / "torch" / "index.html").write_text(f'<a href="{wheel.as_uri()}">{wheel.name}</a>\n')
    text = (ROOT / "pyproject.toml").read_text()
    uv_tables = text[text.index("[tool.uv.sources]"):text.index("[tool.pytest.ini_options]")]
    torch = next(d for d in _pyproject()["project"]["dependencies"] if d.startswith("torch"))
    project = tmp_path / "probe"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        f'[project]\nname = "probe"\nversion = "0"\nrequires-python = ">=3.11"\n'
        f'dependencies = ["{torch}", "numpy>=1.26"]\n\n{uv_tables}')
    local_cpu = (tmp_path / "cpu").as_uri()
    proc = subprocess.run(
        [sys.executable, "-m", "uv", "lock", "--offline", "--no-cache", "--python", sys.executable,
         "--index", f"pytorch-cpu={local_cpu}", "--default-index", simple.as_uri()],
        cwd=project, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    packages = {p["name"]: p for p in tomllib.loads((project / "uv.lock").read_text())["package"]}
    assert packages["torch"]["version"] == "2.13.0+cpu"
    assert packages["torch"]["source"] == {"registry": str(tmp_path / "cpu")}  # uv writes local indexes as paths
    assert packages["numpy"]["source"] == {"registry": str(simple)}
    assert not [name for name in packages if name.startswith("nvidia")]


@pytest.mark.parametrize("path", ["certificates/ca.key", "certificates/supernode-1.pub", "deploy/server.key",
                                  "results/x/mlflow.db", "results/x/mlartifacts/1/a.json", "results/x/wandb/run.wandb",
                                  "results/x/runs/abc/tracking.json"])
def test_keys_and_tracker_stores_stay_out_of_git(path):
    """docs/deployment.md's `make_certs.py certificates` writes private keys into the clone, and trackers write their
    local stores next to results: git ignores them (`git check-ignore` exits 0)."""
    import shutil

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    proc = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT)
    assert proc.returncode == 0, f"{path} is not ignored by .gitignore"
