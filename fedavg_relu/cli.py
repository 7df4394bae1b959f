"""``fedavg-relu``: the command line.

``fedavg-relu run``
    Validate the run config (``pyproject.toml`` defaults + ``--run-config``),
    then ``flwr run`` the app on a private simulation SuperLink (own FLWR_HOME,
    ports and Ray temp dir; stopped by PID afterwards), stream the rounds, check
    the run's final status and print the output folder.
``fedavg-relu validate``
    Only the validation step.
``fedavg-relu sweep CONFIG``
    Run a grid of configurations (resumable) into tidy tables (:mod:`fedavg_relu.sweep`).
``fedavg-relu compare CONFIG``
    Compare strategies on the same partitions and seeds (:mod:`fedavg_relu.compare`).
``fedavg-relu plot SWEEP_DIR``
    Draw the theory figures from a sweep's tables (:mod:`fedavg_relu.plots`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig
from .simulation import default_cpus_per_client


def find_app_dir(start: Path | None = None) -> Path:
    """The Flower app folder: the cwd if it holds this app's pyproject.toml, else the checkout."""
    candidates = [Path(start or Path.cwd()).resolve(), Path(__file__).resolve().parent.parent]
    for folder in candidates:
        pyproject = folder / "pyproject.toml"
        if pyproject.exists() and "fedavg_relu.server_app" in pyproject.read_text(encoding="utf-8"):
            return folder
    raise SystemExit(
        "fedavg-relu: no pyproject.toml of the fedavg-relu app found in the current folder or the package's "
        "checkout; run from a checkout of the project (or pass --app DIR)"
    )


def app_defaults(app_dir: Path) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the app's pyproject.toml."""
    with open(app_dir / "pyproject.toml", "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def parse_overrides(text: list[str] | None) -> dict[str, Any]:
    """``key=value ...`` strings parsed exactly as ``flwr run --run-config`` parses them."""
    from flwr.common.config import parse_config_args

    return dict(parse_config_args(text or None))


def resolve(app_dir: Path, overrides: dict[str, Any]) -> RunConfig:
    """Defaults + overrides, validated (raises :class:`ConfigError`)."""
    merged = app_defaults(app_dir)
    merged.update(overrides)
    return RunConfig.from_mapping(merged)


def _cmd_validate(args: argparse.Namespace) -> int:
    app_dir = Path(args.app).resolve() if args.app else find_app_dir()
    try:
        cfg = resolve(app_dir, parse_overrides(args.run_config))
    except ConfigError as err:
        print(f"fedavg-relu: {err}", file=sys.stderr)
        return 2
    for key, value in cfg.to_mapping().items():
        print(f"{key} = {value!r}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .flower_run import IsolatedFlower
    from .results import resolve_run_dir

    app_dir = Path(args.app).resolve() if args.app else find_app_dir()
    overrides = parse_overrides(args.run_config)
    try:
        cfg = resolve(app_dir, overrides)
    except ConfigError as err:
        print(f"fedavg-relu: {err}", file=sys.stderr)
        return 2
    # Fix the output folder here, so the ServerApp (whose cwd is the SuperLink's) writes where we say.
    run_dir = resolve_run_dir(cfg)
    overrides["output-dir"] = str(run_dir.parent)
    overrides["run-name"] = run_dir.name
    num_supernodes = args.num_supernodes or cfg.num_nodes  # packed mode: ceil(num-partitions / clients-per-node)
    if args.cpus_per_client is None:
        args.cpus_per_client = default_cpus_per_client(num_supernodes)
    print(
        f"fedavg-relu: {cfg.model_family} m={cfg.width} L={cfg.depth} tau={cfg.local_steps} on {cfg.dataset} "
        f"({cfg.partitioner}, {cfg.num_partitions} clients, {num_supernodes} SuperNodes, "
        f"{args.cpus_per_client} CPU each), {cfg.num_server_rounds} rounds",
        flush=True,
    )
    t0 = time.perf_counter()
    with IsolatedFlower(home=args.flwr_home, keep_home=args.keep_flwr_home) as flower:
        result = flower.run(app_dir, overrides, num_supernodes, args.cpus_per_client, echo=not args.quiet)
    seconds = time.perf_counter() - t0
    ok = result.returncode == 0 and result.status == "finished:completed" and (run_dir / "metrics.jsonl").exists()
    if not ok:
        print(
            f"fedavg-relu: run {result.run_id} ended {result.status} (flwr exit {result.returncode}); "
            f"see the log above",
            file=sys.stderr,
        )
        return 1
    print(f"fedavg-relu: finished in {seconds:.1f}s; outputs in {run_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fedavg-relu``."""
    parser = argparse.ArgumentParser(prog="fedavg-relu", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--run-config", "-c", action="append", metavar='"KEY=VALUE ..."',
        help="override run-config keys (same syntax as `flwr run --run-config`)",
    )
    common.add_argument("--app", help="the Flower app folder (default: this checkout)")
    run = sub.add_parser("run", parents=[common], help="run the simulation with `flwr run` (isolated)")
    run.add_argument("--num-supernodes", type=int, default=0, help="simulated SuperNodes (default: num-partitions, or ceil(num-partitions / clients-per-node))")
    run.add_argument("--cpus-per-client", type=int, default=None,
                     help="Ray CPUs per ClientApp actor (default 1; every core when one node trains everything)")
    run.add_argument("--flwr-home", help="FLWR_HOME to use (default: a fresh temporary folder)")
    run.add_argument("--keep-flwr-home", action="store_true", help="keep the temporary FLWR_HOME (logs)")
    run.add_argument("--quiet", action="store_true", help="do not echo Flower's log stream")
    run.set_defaults(func=_cmd_run)
    val = sub.add_parser("validate", parents=[common], help="validate the run config and print it")
    val.set_defaults(func=_cmd_validate)
    from .plots import add_plot_command
    from .sweep import add_sweep_command

    add_sweep_command(sub)
    add_plot_command(sub)
    from .compare import add_compare_command

    add_compare_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedavg-relu`` console script."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("FEDAVG_RELU_HOME", str(Path.cwd()))
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
