"""``fedavg-relu``: the command line.

``fedavg-relu run``
    Validate the run config (``pyproject.toml`` defaults + ``--run-config``) and
    check that it can run (:mod:`fedavg_relu.core.preflight`), then ``flwr run`` the
    app on a private simulation SuperLink (own FLWR_HOME, ports and Ray temp
    dir; every process stopped by PID afterwards), stream one line per round,
    and end with the run's ``summary.json``: exit 0 only when it says
    ``completed`` and Flower says ``finished:completed``, else 1 with the reason
    as the last line. SIGINT / SIGTERM stop every process of the run within
    seconds, print the round reached and how to resume, and exit 130 / 143.
``fedavg-relu validate``
    Only the validation step.
``fedavg-relu sweep CONFIG``
    Run a grid of configurations (resumable) into tidy tables (:mod:`fedavg_relu.experiments.sweep`).
``fedavg-relu compare CONFIG``
    Compare strategies on the same partitions and seeds (:mod:`fedavg_relu.experiments.compare`).
``fedavg-relu plot SWEEP_DIR``
    Draw the theory figures from a sweep's tables (:mod:`fedavg_relu.experiments.plots`).

Why this module is longer than most: every subcommand's argument parsing lives here on
purpose, so the library modules below hold no command-line glue.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedavg_relu.core.config import ConfigError, RunConfig
from fedavg_relu.runtime.simulation import default_cpus_per_client


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
    """``key=value ...`` strings parsed exactly as ``flwr run --run-config`` parses them.

    Raises :class:`ConfigError` naming the string and the expected form when Flower's
    parser refuses it (most often a string value without quotes).
    """
    from fedavg_relu.flower.seam import parse_config_args

    try:
        return dict(parse_config_args(text or None))
    except Exception as err:  # flwr raises click.ClickException; a future parser may raise ValueError
        given = " ".join(text or [])
        raise ConfigError([
            f"--run-config {given!r}: not KEY=VALUE pairs as flwr run reads them; expected e.g. "
            "'num-server-rounds=3 partitioner=\"dirichlet\" dirichlet-alpha=0.3' (string values in double quotes). "
            f"Flower's parser said: {getattr(err, 'message', err)}"
        ]) from None


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


def _preflight(cfg: RunConfig) -> None:
    """:func:`fedavg_relu.core.preflight.check_run` (raises :class:`ConfigError`)."""
    from fedavg_relu.core.preflight import check_run

    check_run(cfg)


@dataclass(frozen=True)
class RunOutcome:
    """How ``fedavg-relu run`` ends: its exit code and the closing lines (the reason last when it failed)."""

    exit_code: int
    lines: list[str]


def first_error(output: str) -> str | None:
    """One line saying what went wrong in a ``flwr run`` stream: the app's first ``ERROR`` record (a
    ``fedavg-relu: ...`` message, with its ``  - `` problem lines), else Flower's last one; ``None`` if none."""
    from fedavg_relu.flower.console import split_level

    lines = output.splitlines()
    parsed = [split_level(line) for line in lines]
    errors = [i for i, (level, _) in enumerate(parsed) if level in ("ERROR", "CRITICAL")]
    if not errors:
        return None
    ours = [i for i in errors if parsed[i][1].startswith("fedavg-relu:")]
    if not ours:
        return parsed[errors[-1]][1][:1000]
    i = ours[0]
    parts = [parsed[i][1].removeprefix("fedavg-relu:").strip()]
    for line in lines[i + 1 :]:
        if not line.startswith("  - "):
            break
        parts.append(line.strip())
    return " ".join(parts)[:1000]


def run_outcome(
    summary: Mapping[str, Any] | None, flwr_status: str, flwr_returncode: int, run_id: int | None, run_dir: Path,
    output: str = "",
) -> RunOutcome:
    """Exit 0 only when ``summary.json`` says completed and Flower says ``finished:completed`` (exit 0).

    ``summary`` is the run folder's ``summary.json`` written by this attempt
    (``None`` when there is none); ``output`` is the ``flwr run`` stream, from
    which the first error is quoted when there is no summary.
    """
    from fedavg_relu.flower.console import format_summary

    flwr_ok = flwr_returncode == 0 and flwr_status == "finished:completed"
    flwr_says = f"Flower reports run {run_id} ended {flwr_status} (flwr exit {flwr_returncode})"
    if summary is None:
        error = first_error(output)
        reason = (
            f"fedavg-relu: failed: no summary.json in {run_dir}: the ServerApp stopped before it wrote how the "
            f"run ended; {flwr_says}; " + (f"first error: {error}" if error else "see the log above")
        )
        return RunOutcome(1, [reason])
    lines = format_summary(summary).splitlines()
    status = summary.get("status")
    if status == "completed" and flwr_ok:
        return RunOutcome(0, lines)
    if status == "completed":  # the ServerApp finished, then something failed after it
        return RunOutcome(1, lines + [f"fedavg-relu: failed: {flwr_says} after the ServerApp wrote its summary"])
    if not any(line.startswith(f"fedavg-relu: {status}: ") for line in lines):
        lines.append(f"fedavg-relu: {status}: no reason given; {flwr_says}")
    return RunOutcome(1, lines)


def resume_command(overrides: Mapping[str, Any], run_dir: Path) -> str:
    """The ``fedavg-relu run`` command that continues ``run_dir`` from its last checkpoint (same config)."""
    from fedavg_relu.runtime.flower_run import run_config_arg

    keep = {k: v for k, v in overrides.items() if k not in ("resume", "run-name", "output-dir")}
    keep.update({"resume": True, "run-name": run_dir.name, "output-dir": str(run_dir.parent)})
    return f"fedavg-relu run --run-config {shlex.quote(run_config_arg(keep))}"


def _last_round(run_dir: Path) -> int | None:
    from fedavg_relu.core.results import read_metrics

    try:
        rounds = [int(row["round"]) for row in read_metrics(run_dir) if "round" in row]
    except (OSError, ValueError):
        return None
    return max(rounds, default=None)


def _fresh_summary(run_dir: Path, since: float) -> dict[str, Any] | None:
    """``summary.json`` when it was written after ``since`` (Unix time): an older one is a previous attempt's."""
    from fedavg_relu.core.results import SUMMARY_NAME, read_summary

    try:
        if (run_dir / SUMMARY_NAME).stat().st_mtime < since:
            return None
    except OSError:
        return None
    return read_summary(run_dir)


def report_interrupted(
    signum: int, run_dir: Path, cfg: RunConfig, user_overrides: Mapping[str, Any], since: float,
    stop_seconds: float | None = None, interrupted_at: float | None = None,
) -> list[str]:
    """After an interrupt: make sure ``summary.json`` says how the run ended; the lines to print (resume hint last).

    A summary the ServerApp wrote during this attempt (after ``since``) stands, with one
    exception: a ``failed`` one written after the signal (``interrupted_at``, Unix time). That
    failure is the interrupt's echo (its clients were stopped under it, so a round lost them),
    and the run is recorded as ``interrupted``, the ServerApp's reason kept after it.
    """
    import signal

    from fedavg_relu.core.results import write_summary

    name = signal.Signals(signum).name
    last = _last_round(run_dir)
    where = "before round 0 was written" if last is None else f"after round {last} of {cfg.num_server_rounds}"
    summary = _fresh_summary(run_dir, since)
    reason = f"{name} {where}"
    echo = (summary is not None and interrupted_at is not None and summary.get("status") == "failed"
            and float(summary.get("written-at") or 0.0) >= interrupted_at)
    if echo:
        reason += f" (while stopping, the ServerApp reported: {summary.get('reason', '')})"
    if (summary is None or echo) and run_dir.exists():
        write_summary(run_dir, "interrupted", reason, num_server_rounds=cfg.num_server_rounds,
                      written_by="fedavg-relu run")
    took = "" if stop_seconds is None else f" ({stop_seconds:.1f}s)"
    lines = [f"fedavg-relu: interrupted by {name} {where}; every process of the run is stopped{took}"]
    if run_dir.exists():
        lines.append(f"fedavg-relu: outputs so far in {run_dir}")
    every = cfg.checkpoint_every
    since_ckpt = "" if every in (0, 1) else f" (checkpoints every {every} rounds)"
    lines.append(f"fedavg-relu: resume from the last checkpoint{since_ckpt} with:")
    lines.append(f"  {resume_command(user_overrides, run_dir)}")
    return lines


def _cmd_run(args: argparse.Namespace) -> int:
    from fedavg_relu.flower.console import is_noise_line
    from fedavg_relu.runtime.flower_run import IsolatedFlower, RunInterrupted, raise_on_signals
    from fedavg_relu.core.results import resolve_run_dir

    app_dir = Path(args.app).resolve() if args.app else find_app_dir()
    try:
        overrides = parse_overrides(args.run_config)
    except ConfigError as err:
        print(f"fedavg-relu: {err}", file=sys.stderr)
        return 2
    if args.verbose:
        overrides["verbose"] = True
    user_overrides = dict(overrides)
    try:
        with raise_on_signals():  # preflight may load a data set: a Ctrl-C there is no traceback either
            cfg = resolve(app_dir, overrides)
            _preflight(cfg)
    except ConfigError as err:
        print(f"fedavg-relu: {err}", file=sys.stderr)
        return 2
    except RunInterrupted as stop:
        print(f"\nfedavg-relu: {stop} before the run started; nothing to stop", flush=True)
        return stop.exit_code
    # Fix the output folder here, so the ServerApp (whose cwd is the SuperLink's) writes where we say.
    run_dir = resolve_run_dir(cfg)
    overrides["output-dir"] = str(run_dir.parent)
    overrides["run-name"] = run_dir.name
    num_supernodes = args.num_supernodes or cfg.num_nodes  # packed mode: ceil(num-partitions / clients-per-node)
    if args.cpus_per_client is None:
        args.cpus_per_client = default_cpus_per_client(num_supernodes, joining=bool(os.environ.get("RAY_ADDRESS")))  # a cluster node may have fewer cores
    print(
        f"fedavg-relu: {cfg.model_family} m={cfg.width} L={cfg.depth} tau={cfg.local_steps} on {cfg.dataset} "
        f"({cfg.partitioner}, {cfg.num_partitions} clients, {num_supernodes} SuperNodes, "
        f"{args.cpus_per_client} CPU each), {cfg.num_server_rounds} rounds",
        flush=True,
    )
    t0, started_at = time.perf_counter(), time.time()
    interrupted: RunInterrupted | None = None
    t_interrupt = 0.0
    with raise_on_signals():  # the first SIGINT/SIGTERM raises RunInterrupted, later ones are ignored
        flower: IsolatedFlower | None = None
        try:
            flower = IsolatedFlower(home=args.flwr_home, keep_home=args.keep_flwr_home)
            flower.start()
            result = flower.run(
                app_dir, overrides, num_supernodes, args.cpus_per_client, echo=not args.quiet,
                hide=None if args.verbose else is_noise_line,
            )
        except RunInterrupted as stop:
            interrupted, t_interrupt = stop, time.perf_counter()
            print(f"\nfedavg-relu: {stop}; stopping every process of the run ...", flush=True)
        except BaseException:
            if flower is not None:
                flower.stop()
            raise
        while flower is not None:  # a signal during a normal stop() turns it into a fast one
            try:
                flower.stop(grace=3.0 if interrupted else 10.0)
                flower = None
            except RunInterrupted as stop:
                interrupted, t_interrupt = stop, time.perf_counter()
                print(f"\nfedavg-relu: {stop}; stopping every process of the run ...", flush=True)
        if interrupted is not None:
            stopped = time.perf_counter() - t_interrupt
            for line in report_interrupted(interrupted.signum, run_dir, cfg, user_overrides, started_at, stopped,
                                           interrupted_at=interrupted.at):
                print(line, flush=True)
            args.fast_exit = True  # everything is stopped and written: skip the interpreter's slow teardown
            return interrupted.exit_code
    seconds = time.perf_counter() - t0
    outcome = run_outcome(
        _fresh_summary(run_dir, started_at), result.status, result.returncode, result.run_id, run_dir, result.output
    )
    if outcome.exit_code == 0:
        outcome.lines[0] += f" in {seconds:.0f}s"
    for line in outcome.lines:
        print(line, flush=True)
    return outcome.exit_code


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
    run.add_argument("--verbose", action="store_true",
                     help="show Flower's own per-round dump and banners (sets run-config verbose=true)")
    run.set_defaults(func=_cmd_run)
    val = sub.add_parser("validate", parents=[common], help="validate the run config and print it")
    val.set_defaults(func=_cmd_validate)
    add_sweep_command(sub)
    add_plot_command(sub)
    add_compare_command(sub)
    add_deploy_command(sub)
    return parser


# --- the experiment subcommands (sweep, plot, compare) ---------------------------------------
def add_sweep_command(subparsers) -> None:
    """Add ``fedavg-relu sweep CONFIG`` to the CLI's subparsers."""
    from fedavg_relu.experiments.sweep import ENGINES

    p = subparsers.add_parser("sweep", help="run a grid of configurations (resumable) and collect tidy tables")
    p.add_argument("config", help="sweep TOML file ([sweep], [base], [[grid]])")
    p.add_argument("--engine", choices=ENGINES, help="in-process (default) or simulation (Flower's Ray engine)")
    p.add_argument("--output-dir", help="override sweep.output-dir")
    p.add_argument("--dry-run", action="store_true", help="list the cells (and whether each is finished) and exit")
    p.add_argument("--max-cells", type=int, help="run at most this many unfinished cells")
    p.add_argument("--threads", type=int, help="torch threads while cells run (default: sweep.threads, 1)")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells run at once, each in its own process (default 1; memory adds up: ~8.6 GB per width-8192 theory cell)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="keep Flower's per-round log lines")
    p.add_argument("--figures", metavar="DIR", help="afterwards draw the theory figures into DIR (PNG and PDF)")
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args) -> int:
    from fedavg_relu.experiments.sweep import describe, is_complete, load_sweep, read_tables, run_sweep

    try:
        spec = load_sweep(args.config, args.output_dir)
        cells = spec.cells()
    except (ConfigError, OSError) as err:
        print(f"fedavg-relu sweep: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        for cell in cells:
            print(f"{'done' if is_complete(cell) else 'todo'}  {describe(cell)}")
        print(f"{len(cells)} cells; outputs in {spec.output_dir}")
        return 0
    if args.jobs < 1:
        print(f"fedavg-relu sweep: --jobs={args.jobs}: expected an integer >= 1 (cells run at once)", file=sys.stderr)
        return 2
    result = run_sweep(spec, engine=args.engine, progress=not args.no_progress, quiet=not args.verbose,
                       max_cells=args.max_cells, threads=args.threads, jobs=args.jobs)
    print(
        f"fedavg-relu sweep {spec.name}: {len(result.ran)} ran, {len(result.skipped)} already finished, "
        f"{len(result.failed)} failed, {len(cells) - len(result.ran) - len(result.skipped) - len(result.failed)} left "
        f"in {result.seconds:.1f}s; tables {result.metrics_path} and {result.cells_path}"
    )
    for cid, err in result.failed.items():
        print(f"  failed {cid}: {err}", file=sys.stderr)
    if args.figures:
        from fedavg_relu.experiments.plots import theory_figures

        metrics, cells_table = read_tables(spec.output_dir)
        paths = theory_figures(metrics, cells_table, args.figures)
        print(f"figures: {', '.join(str(p) for p in paths)}")
    return 1 if result.failed else 0


def add_plot_command(subparsers) -> None:
    """Add ``fedavg-relu plot SWEEP_DIR`` to the CLI's subparsers."""
    p = subparsers.add_parser("plot", help="draw the theory figures (and the per-client figure, from the run folders) from a sweep's tables")
    p.add_argument("sweep_dir", help="a sweep's output folder (with metrics.csv and cells.csv)")
    p.add_argument("--out", default=None, help="figure folder (default: SWEEP_DIR/figures)")
    p.add_argument("--formats", default="png,pdf", help="comma-separated formats (default png,pdf)")
    p.add_argument("--dpi", type=int, default=110)
    p.set_defaults(func=_cmd_plot)


def _cmd_plot(args) -> int:
    from fedavg_relu.experiments.clients import client_figures
    from fedavg_relu.experiments.plots import theory_figures
    from fedavg_relu.experiments.sweep import read_tables

    metrics, cells = read_tables(args.sweep_dir)
    out = args.out or str(Path(args.sweep_dir) / "figures")
    formats = tuple(args.formats.split(","))
    paths = theory_figures(metrics, cells, out, formats=formats, dpi=args.dpi)
    paths += client_figures(args.sweep_dir, cells, out, formats=formats, dpi=args.dpi)
    for path in paths:
        print(path)
    return 0 if paths else 1


def add_compare_command(subparsers) -> None:
    """Add ``fedavg-relu compare CONFIG`` to the CLI's subparsers."""
    p = subparsers.add_parser("compare", help="compare strategies on the same partitions and seeds")
    p.add_argument("config", help="comparison TOML file ([compare], [base], [partitions.NAME])")
    p.add_argument("--output-dir", help="override compare.output-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> int:
    from fedavg_relu.experiments.compare import load_comparison, run_comparison

    try:
        spec, target = load_comparison(args.config, args.output_dir)
    except (ConfigError, OSError) as err:
        print(f"fedavg-relu compare: {err}", file=sys.stderr)
        return 2
    path = run_comparison(spec, target, progress=not args.no_progress)
    print(path.read_text())
    print(f"fedavg-relu compare: tables and figures in {spec.output_dir}")
    return 0


# --- deploy: the hardened SuperLink (docs/deployment.md) ------------------------------------
def add_deploy_command(subparsers) -> None:
    """Add ``fedavg-relu deploy superlink`` to the CLI's subparsers."""
    p = subparsers.add_parser("deploy", help="start deployment services (a loopback-only SuperLink behind nginx)")
    what = p.add_subparsers(dest="service", required=True)
    link = what.add_parser(
        "superlink", help="the SuperLink on 127.0.0.1 and nginx on the public address, forwarding the Fleet API only")
    link.add_argument("--certs", default="certificates",
                      help="scripts/make_certs.py output (server.pem must name --public-host; default: certificates)")
    link.add_argument("--public-host", required=True, help="the address the devices dial (nginx listens there)")
    link.add_argument("--public-port", type=int, default=9093, help="nginx's port (default 9093)")
    link.add_argument("--port", type=int, default=9091, help="the SuperLink's port on 127.0.0.1 (default 9091)")
    link.add_argument("--home", default="superlink",
                      help="the SuperLink's FLWR_HOME: database, logs, nginx's config and logs (default: superlink)")
    link.set_defaults(func=_cmd_deploy_superlink)


def _cmd_deploy_superlink(args) -> int:
    from fedavg_relu.runtime.proxy import HardenedSuperLink, serve

    for key in ("public_port", "port"):
        if not 0 < getattr(args, key) < 65536:
            print(f"fedavg-relu deploy: --{key.replace('_', '-')}={getattr(args, key)}: expected a port in 1..65535",
                  file=sys.stderr)
            return 2
    try:
        hardened = HardenedSuperLink(args.certs, args.home, args.public_host, args.public_port, args.port)
    except (OSError, ValueError) as err:
        print(f"fedavg-relu deploy: {err}", file=sys.stderr)
        return 2
    try:
        return serve(hardened)
    except (OSError, RuntimeError) as err:
        print(f"fedavg-relu deploy: {err}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedavg-relu`` console script."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("FEDAVG_RELU_HOME", str(Path.cwd()))
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # here, so that a reader that left is caught below and not at exit
    except BrokenPipeError:  # e.g. `fedavg-relu sweep FILE --dry-run | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 0
    if argv is None and getattr(args, "fast_exit", False):
        # As the console script, after an interrupt: tearing down flwr's imports takes seconds on a busy
        # machine (measured 6.6 s at load 10); every output is already written and flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
