"""``fedavg-relu``: the command line.

Each subcommand and what it does:

``fedavg-relu run``
    Validate the run config (``pyproject.toml`` defaults + ``--run-config``) and
    check that it can run (:mod:`fedavg_relu.core.preflight`), then ``flwr run`` the
    app on a private simulation SuperLink (own FLWR_HOME, ports and Ray temp
    dir; every process stopped by PID afterwards), stream one line per round,
    and end with the run's ``summary.json``: exit 0 only when it says
    ``completed`` and Flower says ``finished:completed``, 3 when it says ``degraded``,
    else 1 with the reason as the last line. SIGINT / SIGTERM stop every process of the run within
    seconds, print the round reached and how to resume, and exit 130 / 143.
``fedavg-relu validate``
    Only the validation step.
``fedavg-relu sweep CONFIG``
    Run a grid of configurations (resumable) into tidy tables (:mod:`fedavg_relu.experiments.sweep`).
``fedavg-relu compare CONFIG``
    Compare strategies on the same partitions and seeds (:mod:`fedavg_relu.experiments.compare`);
    ``--strategies``, ``--seeds`` and ``--rounds`` narrow it, into ``runs/compare/NAME`` unless
    ``--results`` rebuilds the committed tables. Sweeps and comparisons share ``--dry-run``,
    ``--jobs``, ``--seeds``, ``--rounds``, ``--tracker``; Ctrl-C stops them with one line
    that holds the command to resume (exit 130, or 143 on SIGTERM).
``fedavg-relu plot SWEEP_DIR``
    Draw the theory figures from a sweep's tables (:mod:`fedavg_relu.experiments.plots`).

Why this module is longer than most: every subcommand's argument parsing lives here on
purpose, so the library modules below hold no command-line glue.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import sys
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedavg_relu.core.config import TRACKERS, ConfigError, RunConfig
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
            "--run-config \"num-server-rounds=3 partitioner='dirichlet' dirichlet-alpha=0.3\" "
            "(string values in single quotes, the whole list in double quotes). "
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
    """:func:`fedavg_relu.core.preflight.check_run`, and the tracker's package (raises :class:`ConfigError`)."""
    from fedavg_relu.core.preflight import check_run
    from fedavg_relu.core.tracking import check_available

    check_run(cfg)
    check_available(cfg.tracker)


#: ``fedavg-relu run``'s exit code for a run that ran to the end ``degraded`` (summary.json says why).
EXIT_DEGRADED = 3


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
    """Exit 0 only when ``summary.json`` says completed and Flower says ``finished:completed`` (exit 0);
    3 when it says ``degraded`` (a node or client failed every round, or a round measured fewer than two).

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
    if status == "degraded" and flwr_ok:  # it ran to the end, but some of it measured nothing
        return RunOutcome(EXIT_DEGRADED, lines)
    if not any(line.startswith(f"fedavg-relu: {status}: ") for line in lines):
        lines.append(f"fedavg-relu: {status}: no reason given; {flwr_says}")
    return RunOutcome(1, lines)


def run_config_text(overrides: Mapping[str, Any]) -> str:
    """``--run-config "..."`` as the README writes it: string values in single quotes (double where the
    value holds a single quote), the whole list in shell double quotes."""
    import json

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return f"'{v}'" if "'" not in str(v) else json.dumps(str(v))

    text = " ".join(f"{k}={value(v)}" for k, v in overrides.items())
    return '"' + re.sub(r'([\\"$`])', r"\\\1", text) + '"'


def resume_command(overrides: Mapping[str, Any], run_dir: Path) -> str:
    """The ``fedavg-relu run`` command that continues ``run_dir`` from its last checkpoint (same config)."""
    keep = {k: v for k, v in overrides.items() if k not in ("resume", "run-name", "output-dir")}
    keep.update({"resume": True, "run-name": run_dir.name, "output-dir": str(run_dir.parent)})
    return f"fedavg-relu run --run-config {run_config_text(keep)}"


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


DESCRIPTION = """\
Local SGD / FedAvg on wide ReLU networks as a Flower app, with the gradient drift measured every round.

  fedavg-relu run                                     one simulation (flwr run, isolated), one line per round
  fedavg-relu run -c "width=4096 partitioner='dirichlet'"   override run-config keys (docs/configuration.md)
  fedavg-relu validate -c "..."                       check a run config and print it
  fedavg-relu sweep sweeps/theory-small.toml          a grid of runs into tidy tables (resumable)
  fedavg-relu compare compare/strategies.toml --strategies fedavg,scaffold --seeds 0 --rounds 4
                                                      strategies side by side, into runs/compare/NAME
  fedavg-relu plot results/theory-small               the theory figures from a sweep's tables

Exit codes: 0 done, 1 failed, 2 bad input, 3 degraded (run), 130 / 143 interrupted (SIGINT / SIGTERM)."""


def version() -> str:
    """The installed package's version (the checkout's ``__version__`` when it is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("fedavg-relu")
    except PackageNotFoundError:
        from fedavg_relu import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fedavg-relu``."""
    parser = argparse.ArgumentParser(prog="fedavg-relu", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fedavg-relu {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
    p.add_argument("--output-dir", help="override sweep.output-dir")
    _add_cell_options(p, ENGINES)
    p.add_argument("--figures", metavar="DIR", help="afterwards draw the theory figures into DIR (PNG and PDF)")
    p.set_defaults(func=_cmd_sweep)


def _add_cell_options(p: argparse.ArgumentParser, engines: tuple[str, ...]) -> None:
    """The options ``sweep`` and ``compare`` share: which cells, how they run, where they are tracked."""
    p.add_argument("--seeds", metavar="S,S,...", help="run every cell with these seeds (comma-separated integers)")
    p.add_argument("--rounds", type=int, metavar="R", help="num-server-rounds of every cell")
    p.add_argument("--dry-run", action="store_true", help="list the cells (and whether each is finished) and exit")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells run at once, each in its own process (default 1; memory adds up: ~8.6 GB per width-8192 theory cell)")
    p.add_argument("--max-cells", type=int, help="run at most this many unfinished cells")
    p.add_argument("--engine", choices=engines, help="in-process (default) or simulation (Flower's Ray engine)")
    p.add_argument("--threads", type=int, help="torch threads while cells run (default: sweep.threads, 1)")
    p.add_argument("--tracker", choices=TRACKERS,
                   help="log every cell to MLflow or W&B (offline), one run per cell under one experiment (default: [base] tracker)")
    p.add_argument("--mlflow-tracking-uri", metavar="URI",
                   help="MLflow store or server (default: [base] mlflow-tracking-uri, else OUTPUT-DIR/mlflow.db)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="keep Flower's per-round log lines")


def _int_list(text: str | None, flag: str) -> list[int] | None:
    """``"0,1,2"`` -> ``[0, 1, 2]``; ConfigError naming ``flag`` otherwise."""
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values:
        raise ConfigError([f"{flag}={text!r}: expected comma-separated integers, e.g. {flag} 0,1,2"])
    return values


def _cell_overrides(args) -> dict[str, Any]:
    """The shared options as :func:`fedavg_relu.experiments.sweep.override_cells` takes them (ConfigError when malformed)."""
    if args.jobs < 1:
        raise ConfigError([f"--jobs={args.jobs}: expected an integer >= 1 (cells run at once)"])
    return {"seeds": _int_list(args.seeds, "--seeds"), "rounds": args.rounds, "tracker": args.tracker,
            "tracking_uri": args.mlflow_tracking_uri}


def _dry_run(cells, output_dir: Path) -> int:
    from fedavg_relu.experiments.sweep import describe, is_complete

    for cell in cells:
        print(f"{'done' if is_complete(cell) else 'todo'}  {describe(cell)}")
    print(f"{len(cells)} cells; outputs in {output_dir}")
    return 0


def _run_cells(command: str, argv: list[str], output_dir: Path, work) -> tuple[int, Any]:
    """``work()`` with SIGINT/SIGTERM turned into one line with the command that resumes; (exit code, result)."""
    from fedavg_relu.experiments.sweep import interrupt_reason
    from fedavg_relu.runtime.flower_run import raise_on_signals

    try:
        with raise_on_signals():
            return 0, work()
    except BaseException as err:  # RunInterrupted (SIGINT/SIGTERM) or KeyboardInterrupt; anything else goes on up
        reason = interrupt_reason(err)
        if reason is None:
            raise
        code = 128 + getattr(err, "signum", 2)
    print(f"\nfedavg-relu {command}: {reason}; finished cells are kept in {output_dir}; "
          f"resume with: fedavg-relu {shlex.join(argv)}", flush=True)
    return code, None


def _tracker_hint(spec) -> str:
    if spec.tracker == "mlflow":
        from fedavg_relu.core.tracking import default_mlflow_uri

        uri = spec.tracking_uri or default_mlflow_uri(spec.output_dir)
        return f"; MLflow experiment {spec.name!r}: mlflow ui --backend-store-uri {uri}"
    if spec.tracker == "wandb":
        return f"; W&B runs (group {spec.name!r}) in {spec.output_dir / 'wandb'}"
    return ""


def _cmd_sweep(args) -> int:
    from fedavg_relu.experiments.sweep import load_sweep, read_tables, run_sweep

    try:
        spec = load_sweep(args.config, args.output_dir, **_cell_overrides(args))
        cells = spec.cells()
    except (ConfigError, OSError) as err:
        print(f"fedavg-relu sweep: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        return _dry_run(cells, spec.output_dir)
    code, result = _run_cells("sweep", args.argv, spec.output_dir, lambda: run_sweep(
        spec, engine=args.engine, progress=not args.no_progress, quiet=not args.verbose,
        max_cells=args.max_cells, threads=args.threads, jobs=args.jobs))
    if result is None:
        args.fast_exit = True
        return code
    print(
        f"fedavg-relu sweep {spec.name}: {len(result.ran)} ran, {len(result.skipped)} already finished, "
        f"{len(result.failed)} failed, {len(cells) - len(result.ran) - len(result.skipped) - len(result.failed)} left "
        f"in {result.seconds:.1f}s; tables {result.metrics_path} and {result.cells_path}{_tracker_hint(spec)}"
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
    paths = theory_figures(metrics, cells, out, formats=formats, dpi=args.dpi, sweep_dir=args.sweep_dir)
    paths += client_figures(args.sweep_dir, cells, out, formats=formats, dpi=args.dpi)
    for path in paths:
        print(path)
    return 0 if paths else 1


def add_compare_command(subparsers) -> None:
    """Add ``fedavg-relu compare CONFIG`` to the CLI's subparsers."""
    from fedavg_relu.experiments.sweep import ENGINES

    p = subparsers.add_parser("compare", help="compare strategies on the same partitions and seeds")
    p.add_argument("config", help="comparison TOML file ([compare], [base], [partitions.NAME])")
    p.add_argument("--strategies", metavar="NAME,NAME,...", help="compare only these strategies (default: compare.strategies)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--output-dir", help="the output folder (default: runs/compare/NAME, outside the committed results/)")
    where.add_argument("--results", action="store_true",
                       help="write into the file's compare.output-dir (results/strategies for compare/strategies.toml): "
                            "rebuilds the committed tables, so only with the file's own strategies, seeds and rounds")
    _add_cell_options(p, ENGINES)
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> int:
    from fedavg_relu.experiments.compare import load_comparison, run_comparison

    try:
        overrides = _cell_overrides(args)
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()] if args.strategies is not None else None
        if args.results and (strategies or overrides["seeds"] or overrides["rounds"]):
            raise ConfigError(["--results: rebuilds the committed tables from the file as it is; expected no "
                               "--strategies, --seeds or --rounds with it (or --output-dir DIR for a narrowed comparison)"])
        name = Path(args.config).stem
        output_dir = None if args.results else (args.output_dir or Path("runs") / "compare" / name)
        spec, target = load_comparison(args.config, output_dir, strategies=strategies, **overrides)
        cells = spec.cells()
    except (ConfigError, OSError) as err:
        print(f"fedavg-relu compare: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        return _dry_run(cells, spec.output_dir)
    code, path = _run_cells("compare", args.argv, spec.output_dir, lambda: run_comparison(
        spec, target, progress=not args.no_progress, engine=args.engine, quiet=not args.verbose,
        max_cells=args.max_cells, threads=args.threads, jobs=args.jobs))
    if path is None:
        args.fast_exit = True
        return code
    print(path.read_text())
    print(f"fedavg-relu compare: tables and figures in {spec.output_dir}{_tracker_hint(spec)}")
    return 0


def unknown_command(argv: list[str], parser: argparse.ArgumentParser) -> str | None:
    """The error for a first argument that is no subcommand (with difflib's closest one); ``None`` if it is one."""
    if not argv or argv[0].startswith("-"):
        return None
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if argv[0] in commands:
        return None
    close = difflib.get_close_matches(argv[0], list(commands), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"fedavg-relu: {argv[0]!r} is not a command{hint}; expected one of {', '.join(commands)} (fedavg-relu --help)"


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
    console = argv is None  # as the console script (not called from Python)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    error = unknown_command(argv, parser)
    if error is not None:
        print(error, file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    args.argv = argv
    os.environ.setdefault("FEDAVG_RELU_HOME", str(Path.cwd()))
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # here, so that a reader that left is caught below and not at exit
    except BrokenPipeError:  # e.g. `fedavg-relu sweep FILE --dry-run | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 0
    if console and getattr(args, "fast_exit", False):
        # As the console script, after an interrupt: tearing down flwr's imports takes seconds on a busy
        # machine (measured 6.6 s at load 10); every output is already written and flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
