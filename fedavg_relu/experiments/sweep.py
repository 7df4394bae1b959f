"""Sweeps: a grid of run configurations, run one cell at a time (or several at once), collected into tidy tables.

A sweep file is TOML::

    [sweep]                      # optional: how to run it
    name = "theory-small"        # default: the file's stem
    output-dir = "results/theory-small"   # default: results/<name>; relative to $FEDAVG_RELU_HOME or the cwd
    engine = "in-process"        # or "simulation" (Flower's Ray engine)
    threads = 1                  # torch intra-op threads while cells run (default 1)
    central-baseline = ["non-iid"]   # centralized GD per cell of these groups (true: every cell; THEORY.md prediction 6)

    [base]                       # run-config keys shared by every cell
    dataset = "synthetic"
    batch-size = "full"

    [[grid]]                     # one or more grids; each adds the cartesian product of its lists
    group = "width"              # a label for the cells of this grid (a column of the tables)
    width = [64, 256, 1024]
    seed = [0, 1]

    [[grid]]
    group = "tau"
    local-steps = [1, 5, 20]

A single ``[grid]`` table works too (group ``"main"``). Every cell is ``base``
overlaid with one combination of its grid's values and validated as a
:class:`~fedavg_relu.core.config.RunConfig`; problems of all cells are reported in
one :class:`~fedavg_relu.core.config.ConfigError`. ``output-dir`` and ``run-name``
are the sweep's to set: cell ``c`` runs in ``<output-dir>/runs/<cell-id>``.

The cell id is a stable hash (the first 12 hex digits of SHA-256) of the
canonical JSON of the keys the sweep file sets for that cell, after validation
(so ``width = 64`` and ``width = 64.0`` are the same cell, and a run-config key
added to the project later does not change old ids). A cell whose run folder
holds a ``config.json`` with the same configuration and a ``metrics.jsonl``
with ``num-server-rounds + 1`` rows is finished and skipped on a rerun; an
unfinished folder is cleared and run again. A cell that appears in two grids
runs once and is listed under both groups.

Outputs, each written atomically (:func:`fedavg_relu.core.results.atomic_write_text`):

``<output-dir>/metrics.csv``
    the tidy per-round table: one row per (group, cell, round) with the
    columns ``group``, ``cell-id``, every run-config key (``output-dir``,
    ``run-name`` and the tracker keys left out), ``effective-learning-rate``, ``round`` and every
    metric the run recorded. Configuration columns keep their names; a metric
    named like a run-config key (``gradient-dissimilarity``, ``local-steps``)
    becomes ``metric.<key>``.
``<output-dir>/cells.csv``
    one row per (group, cell): the configuration, the final round's metrics
    and, with ``central-baseline``, the comparison with centralized GD
    (:func:`fedavg_relu.core.centralized.compare_with_central`, cached per cell in
    ``central.json``).

Engines: ``in-process`` (default) runs each cell with
:func:`fedavg_relu.runtime.simulation.run_in_process`: the project's real ServerApp
logic, Flower strategy and ClientApp handlers over an in-process Flower Grid.
``simulation`` uses :func:`fedavg_relu.runtime.simulation.simulate` (Flower's Ray
simulation engine), which costs ~15-20 s of start-up per cell on 2 cores.

Tracking: ``tracker`` / ``mlflow-tracking-uri`` in ``[base]`` (or
:func:`override_cells`'s, from ``--tracker``) belong to the sweep, not to its cells
(no part of a cell id): each cell's run folder is logged once it has ended, as one run
of the experiment named after the sweep (:func:`track_cell`).

Interrupts: :func:`run_sweep` records the cells under way as ``interrupted`` (reason
``interrupted by SIGINT``) and raises again; a rerun goes on with the unfinished cells.

This module imports flwr only when cells run (the engines, and the quieting of
Flower's logger); expanding, checking and tabulating a sweep does not.

Why this module is longer than most: one sweep's whole life, from the TOML file to the
cells, their resumable runs and the tidy tables, so a reader can follow a cell from file
to table in one place.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedavg_relu.core.config import TRACKERS, ConfigError, RunConfig, did_you_mean
from fedavg_relu.core.results import atomic_write_text, read_metrics

ENGINES = ("in-process", "simulation")
SWEEP_KEYS = ("name", "output-dir", "engine", "central-baseline", "threads")
RESERVED_KEYS = ("output-dir", "run-name")  # set per cell by the sweep
TRACKING_KEYS = ("tracker", "mlflow-tracking-uri")  # the sweep's, not the cells': no part of a cell's identity
GROUP_KEY = "group"
DEFAULT_GROUP = "main"
METRICS_TABLE = "metrics.csv"
CELLS_TABLE = "cells.csv"
CENTRAL_FILE = "central.json"


@dataclass(frozen=True)
class Cell:
    """One configuration of a sweep."""

    cell_id: str  # stable hash of ``values``
    groups: tuple[str, ...]  # the grids that produced it
    values: dict[str, Any]  # the keys the sweep file sets for this cell (validated, kebab-case)
    config: RunConfig  # the full run config, output-dir/run-name pointing at the cell's folder
    varied: tuple[str, ...] = ()  # the keys its (first) grid varies

    @property
    def run_dir(self) -> Path:
        """The cell's run folder."""
        return Path(self.config.output_dir) / self.config.run_name


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file."""

    name: str
    output_dir: Path  # absolute
    engine: str
    central_baseline: bool | tuple[str, ...]  # True/False, or the groups whose cells get the baseline
    base: dict[str, Any]
    grids: list[tuple[str, dict[str, list[Any]]]]  # (group, key -> values), in file order
    threads: int = 1  # torch intra-op threads while cells run in this process
    tracker: str = "none"  # [base] tracker: every finished cell goes to it, one run per cell (see track_cell)
    tracking_uri: str = ""  # [base] mlflow-tracking-uri; "" = <output-dir>/mlflow.db

    def cells(self) -> list[Cell]:
        """The cells of every grid (see :func:`expand_grid`)."""
        return expand_grid(self)


@dataclass
class SweepResult:
    """What :func:`run_sweep` did."""

    spec: SweepSpec
    cells: list[Cell]
    ran: list[str] = field(default_factory=list)  # cell ids run now
    skipped: list[str] = field(default_factory=list)  # cell ids already finished
    failed: dict[str, str] = field(default_factory=dict)  # cell id -> error
    interrupted: list[str] = field(default_factory=list)  # cell ids under way when an interrupt stopped the sweep
    seconds: float = 0.0

    @property
    def metrics_path(self) -> Path:
        """The tidy per-round table."""
        return self.spec.output_dir / METRICS_TABLE

    @property
    def cells_path(self) -> Path:
        """The per-cell table."""
        return self.spec.output_dir / CELLS_TABLE


# --- parsing ------------------------------------------------------------------
def _base_dir() -> Path:
    return Path(os.environ.get("FEDAVG_RELU_HOME", os.getcwd()))


def parse_sweep(data: Mapping[str, Any], name: str = "sweep", output_dir: str | os.PathLike | None = None) -> SweepSpec:
    """Validate a sweep mapping (the parsed TOML); raise :class:`ConfigError` listing every problem."""
    problems: list[str] = []
    for key in sorted(set(data) - {"sweep", "base", "grid"}):
        problems.append(f"{key}: unknown table; expected [sweep], [base] and [grid] / [[grid]]")
    sweep = dict(data.get("sweep", {}))
    for key in sorted(set(sweep) - set(SWEEP_KEYS)):
        problems.append(f"sweep.{key}={sweep[key]!r}: unknown key{did_you_mean(key, SWEEP_KEYS)}; "
                        f"expected one of {', '.join(SWEEP_KEYS)}")
    name = str(sweep.get("name", name))
    engine = sweep.get("engine", "in-process")
    if engine not in ENGINES:
        problems.append(f"sweep.engine={engine!r}: expected one of {ENGINES}")
    central = sweep.get("central-baseline", False)
    if isinstance(central, list) and all(isinstance(g, str) for g in central):
        central = tuple(central)
    elif not isinstance(central, bool):
        problems.append(f"sweep.central-baseline={central!r}: expected true, false or a list of group names")
    threads = sweep.get("threads", 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        problems.append(f"sweep.threads={threads!r}: expected an integer >= 1")
    base = dict(data.get("base", {}))
    tracking = {key: base.pop(key) for key in TRACKING_KEYS if key in base}
    tracker, tracking_uri = tracking.get("tracker", "none"), tracking.get("mlflow-tracking-uri", "")
    if tracker not in TRACKERS:
        problems.append(f"base.tracker={tracker!r}: expected one of {', '.join(TRACKERS)}{did_you_mean(tracker, TRACKERS)}")
    if not isinstance(tracking_uri, str):
        problems.append(f"base.mlflow-tracking-uri={tracking_uri!r}: expected a string")
    raw_grids = data.get("grid", [])
    if isinstance(raw_grids, Mapping):
        raw_grids = [raw_grids]
    grids: list[tuple[str, dict[str, list[Any]]]] = []
    for i, grid in enumerate(raw_grids):
        grid = dict(grid)
        group = str(grid.pop(GROUP_KEY, DEFAULT_GROUP if len(raw_grids) == 1 else f"grid{i}"))
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                problems.append(f"grid[{group}].{key}={values!r}: expected a non-empty list of values")
        grids.append((group, {k: v for k, v in grid.items() if isinstance(v, list) and v}))
    if not grids:
        grids = [(DEFAULT_GROUP, {})]
    for where, keys in [("base", base)] + [(f"grid[{g}]", k) for g, k in grids]:
        for key in RESERVED_KEYS:
            if key in keys:
                problems.append(f"{where}.{key}: set by the sweep (use sweep.output-dir); remove it")
        for key in TRACKING_KEYS:
            if key in keys:
                problems.append(f"{where}.{key}: one tracker for the whole sweep; expected it in [base] (or --{key})")
    if problems:
        raise ConfigError(problems)
    out = Path(output_dir if output_dir is not None else sweep.get("output-dir", f"results/{name}")).expanduser()
    if not out.is_absolute():
        out = _base_dir() / out
    return SweepSpec(name, out.resolve(), engine, central, base, grids, threads, str(tracker), str(tracking_uri))


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML file's content; invalid TOML is a :class:`ConfigError` naming the file."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"{path}: not valid TOML: {err}"]) from err


def load_sweep(path: str | os.PathLike, output_dir: str | os.PathLike | None = None, **overrides: Any) -> SweepSpec:
    """Read and validate a sweep TOML file (``output_dir`` overrides ``sweep.output-dir``; ``overrides``:
    :func:`override_cells`'s keywords)."""
    return parse_sweep(override_cells(read_toml(path), **overrides), name=Path(path).stem, output_dir=output_dir)


def override_cells(data: Mapping[str, Any], seeds: Sequence[int] | None = None, rounds: int | None = None,
                   tracker: str | None = None, tracking_uri: str | None = None) -> dict[str, Any]:
    """A copy of a sweep file's mapping with the command line's choices applied (``None`` leaves a thing as is).

    ``seeds`` becomes every grid's ``seed`` list (and leaves ``[base]``), ``rounds`` is
    ``[base] num-server-rounds`` (and leaves the grids), ``tracker`` / ``tracking_uri`` are
    ``[base] tracker`` / ``mlflow-tracking-uri``.
    """
    data = copy.deepcopy(dict(data))
    base = data.setdefault("base", {})
    grids = data.get("grid", [])
    grids = [grids] if isinstance(grids, Mapping) else list(grids)
    if seeds is not None:
        base.pop("seed", None)
        for grid in grids:
            grid["seed"] = list(seeds)
        if not grids:
            data["grid"] = {"seed": list(seeds)}
    override_base(base, grids, rounds, tracker, tracking_uri)
    return data


def override_base(base: dict[str, Any], tables: Sequence[Any], rounds: int | None, tracker: str | None,
                  tracking_uri: str | None) -> None:
    """The command line's ``rounds`` / ``tracker`` / ``tracking_uri`` into ``base`` (``None``: as the file says).

    ``rounds`` becomes ``[base] num-server-rounds`` and is removed from every table of ``tables``
    (grids or partition settings) that is a mapping, so the command line wins everywhere.
    """
    if rounds is not None:
        base["num-server-rounds"] = rounds
        for table in tables:
            if isinstance(table, dict):
                table.pop("num-server-rounds", None)
    if tracker is not None:
        base["tracker"] = tracker
    if tracking_uri is not None:
        base["mlflow-tracking-uri"] = tracking_uri


# --- cells --------------------------------------------------------------------
def cell_id(values: Mapping[str, Any]) -> str:
    """First 12 hex digits of SHA-256 of the canonical JSON (sorted keys) of ``values``."""
    text = json.dumps(dict(values), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def expand_grid(spec: SweepSpec) -> list[Cell]:
    """Every cell: ``base`` overlaid with each combination of each grid's lists, validated.

    Order: grids in file order, then the cartesian product with the last key
    varying fastest. A configuration produced by several grids is one cell
    (first position kept) that lists every group.
    """
    problems: list[str] = []
    cells: dict[str, Cell] = {}
    runs_dir = spec.output_dir / "runs"
    for group, grid in spec.grids:
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            mapping = {**spec.base, **dict(zip(keys, combo, strict=True))}
            try:
                cfg = RunConfig.from_mapping(mapping)
            except ConfigError as err:
                where = ", ".join(f"{k}={v!r}" for k, v in zip(keys, combo, strict=True)) or "base"
                problems.extend(f"[{group}: {where}] {p}" for p in err.problems)
                continue
            full = cfg.to_mapping()
            values = {k: full[k] for k in sorted(mapping)}
            cid = cell_id(values)
            if cid in cells:
                old = cells[cid]
                if group not in old.groups:
                    cells[cid] = dataclasses.replace(old, groups=old.groups + (group,))
                continue
            cfg = dataclasses.replace(cfg, output_dir=str(runs_dir), run_name=cid)
            cells[cid] = Cell(cid, (group,), values, cfg, tuple(keys))
    for cell in cells.values():  # the baseline compares with the run's final model: without model.pt it cannot
        if wants_central(spec, cell) and not cell.config.save_model:
            problems.append(f"[{', '.join(cell.groups)}: {describe(cell).split(': ', 1)[-1]}] save-model=false: "
                            "sweep.central-baseline compares each of its cells' final model (model.pt) with centralized GD; "
                            "expected save-model = true for these cells, or their groups left out of sweep.central-baseline")
    if problems:
        raise ConfigError(problems)
    return list(cells.values())


def _same_config(saved: Mapping[str, Any], cfg: RunConfig) -> bool:
    """True when ``saved`` agrees with ``cfg`` on every key both know (output-dir/run-name aside)."""
    current = cfg.to_mapping()
    for key in set(saved) & set(current) - set(RESERVED_KEYS):
        a, b = saved[key], current[key]
        if isinstance(a, float) or isinstance(b, float):
            if not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12)):
                return False
        elif a != b:
            return False
    return True


def is_complete(cell: Cell) -> bool:
    """True when the cell's folder holds a finished run of exactly this configuration."""
    run_dir = cell.run_dir
    try:
        with open(run_dir / "config.json", encoding="utf-8") as fh:
            saved = json.load(fh)["config"]
        rows = read_metrics(run_dir)
    except (OSError, ValueError, KeyError):
        return False
    if not _same_config(saved, cell.config):
        return False
    # the model file counts only until the centralized comparison that needs it is cached: a clone of the
    # repository holds the run folders' tables (results/theory-full/runs) but not their model files
    if cell.config.save_model and not (run_dir / "model.pt").exists() and not (run_dir / CENTRAL_FILE).exists():
        return False
    return len(rows) == cell.config.num_server_rounds + 1


def run_cell(cell: Cell, engine: str = "in-process") -> Path:
    """Run one cell from scratch with ``engine``; return its run folder."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: expected one of {ENGINES}")
    if cell.run_dir.exists():
        shutil.rmtree(cell.run_dir)  # an unfinished or different run: start over
    if engine == "simulation":
        from fedavg_relu.runtime.simulation import simulate

        return Path(simulate(cell.config))
    from fedavg_relu.runtime.simulation import run_in_process

    return Path(run_in_process(cell.config))


def central_comparison(cell: Cell) -> dict[str, float]:
    """The cell's comparison with centralized GD, computed once and cached in ``central.json``."""
    path = cell.run_dir / CENTRAL_FILE
    if path.exists():
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    from fedavg_relu.core.centralized import compare_with_central

    values = compare_with_central(cell.run_dir)
    atomic_write_text(path, json.dumps({k: (None if not math.isfinite(v) else v) for k, v in values.items()}, indent=1) + "\n")
    return values


def wants_central(spec: SweepSpec, cell: Cell) -> bool:
    """Whether the sweep asks for the centralized baseline of this cell.

    The baseline needs the cell's final model: :func:`expand_grid` refuses a sweep that asks
    for it on a cell with ``save-model=false``.
    """
    wanted = spec.central_baseline
    if isinstance(wanted, tuple):
        wanted = any(g in wanted for g in cell.groups)
    return bool(wanted)


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Set torch's intra-op thread count for the block, then restore it."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextmanager
def _quiet_flower(quiet: bool) -> Iterator[None]:
    """Raise the ``flwr`` logger to CRITICAL while cells run: their per-round lines would break the bar, and
    the ServerApp's closing ERROR line repeats what the sweep itself reports (a failed cell, with its error, or
    the one line of an interrupt)."""
    if quiet:
        import flwr.common.logger  # noqa: F401  (configures the logger on import: do that first)
    logger = logging.getLogger("flwr")
    old = logger.level
    if quiet:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(old)


def run_sweep(
    spec: SweepSpec,
    engine: str | None = None,
    progress: bool = True,
    quiet: bool = True,
    max_cells: int | None = None,
    threads: int | None = None,
    jobs: int = 1,
) -> SweepResult:
    """Run every unfinished cell, then write the tables.

    Parameters
    ----------
    spec
        The sweep (:func:`load_sweep`).
    engine
        ``in-process`` or ``simulation``; default the sweep file's.
    progress
        Show a tqdm progress bar (on stderr).
    quiet
        Silence Flower's per-round log lines while cells run.
    max_cells
        Run at most this many unfinished cells (the rest stay for a rerun).
    threads
        torch intra-op threads while the cells run (default: the sweep file's,
        1 unless set). One thread is the fastest for the small models of a
        sweep, above all on a machine shared with other work, where torch's
        default (one per core) loses most of its time waiting between threads.
    jobs
        Cells run at once, each in a process of its own (spawned; 1: one after
        another in this process). Memory adds up: a width-8192 cell of the
        theory sweep peaks at about 8.6 GB.

    A failing cell is recorded in ``failed`` and the sweep goes on; the tables
    hold the finished cells. With ``spec.tracker`` every cell that ran (and every
    finished one not logged yet) goes to the tracker (:func:`track_cell`).

    An interrupt (``KeyboardInterrupt``, or :class:`~fedavg_relu.runtime.flower_run.RunInterrupted`
    from SIGINT/SIGTERM) stops the cells under way (worker processes are terminated), records
    each as ``interrupted`` with the reason ``interrupted by SIGINT`` (or the signal's name) in
    its ``summary.json``, writes the tables of the finished cells, and is raised again; a rerun
    continues with the unfinished cells.
    """
    from tqdm import tqdm

    engine = engine or spec.engine
    if engine not in ENGINES:
        raise ConfigError([f"engine={engine!r}: expected one of {ENGINES}"])
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError([f"jobs={jobs!r}: expected an integer >= 1 (cells run at once)"])
    if spec.tracker != "none":
        from fedavg_relu.core.tracking import check_available

        check_available(spec.tracker)  # before any cell runs
    cells = spec.cells()
    result = SweepResult(spec, cells)
    t0 = time.perf_counter()
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(cells), desc=spec.name, unit="cell", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    with bar:
        todo = _unfinished(spec, cells, result, bar, max_cells)
        try:
            if jobs > 1 and len(todo) > 1:
                _run_parallel(spec, todo, result, bar, engine, jobs, quiet, threads or spec.threads)
            else:
                for cell in todo:
                    bar.set_postfix_str(describe(cell), refresh=True)
                    _record(spec, result, bar, cell,
                            *_run_one(cell, engine, wants_central(spec, cell), quiet, threads or spec.threads))
        except BaseException as err:
            reason = interrupt_reason(err)
            if reason is not None:
                result.interrupted = _mark_interrupted(todo, result, reason)
                write_tables(spec, cells)
            raise
    write_tables(spec, cells)
    result.seconds = time.perf_counter() - t0
    return result


def _unfinished(spec: SweepSpec, cells: Sequence[Cell], result: SweepResult, bar: Any,
                max_cells: int | None) -> list[Cell]:
    """The cells to run now (at most ``max_cells``); finished ones are recorded as skipped, with their
    centralized baseline made sure of (cached, or computed from the saved model)."""
    todo: list[Cell] = []
    for cell in cells:
        if is_complete(cell):
            result.skipped.append(cell.cell_id)
            _track(spec, cell, bar)
            if wants_central(spec, cell):
                try:
                    central_comparison(cell)
                except Exception as err:
                    _record(spec, result, bar, cell, None, f"central baseline: {type(err).__name__}: {err}", ran=False)
                    continue
            bar.update(1)
        elif max_cells is not None and len(todo) >= max_cells:
            bar.update(1)
        else:
            todo.append(cell)
    return todo


def _record(spec: SweepSpec, result: SweepResult, bar: Any, cell: Cell, error: str | None,
            central_error: str | None, ran: bool = True) -> None:
    """Note one cell's outcome in ``result`` (a failure also on the console) and advance the bar."""
    if error is not None:
        result.failed[cell.cell_id] = error
        bar.write(f"sweep {spec.name}: cell {cell.cell_id} ({describe(cell)}) failed: {error}")
    elif ran:
        result.ran.append(cell.cell_id)
    if central_error is not None:
        result.failed[cell.cell_id] = central_error
        bar.write(f"sweep {spec.name}: centralized baseline of cell {cell.cell_id} failed: {central_error}")
    if ran:
        _track(spec, cell, bar)
    bar.update(1)


def interrupt_reason(err: BaseException) -> str | None:
    """``interrupted by SIGINT`` for a ``KeyboardInterrupt``, the signal's for a ``RunInterrupted``; else ``None``."""
    import signal

    if isinstance(err, KeyboardInterrupt):
        return "interrupted by SIGINT"
    signum = getattr(err, "signum", None)  # RunInterrupted (fedavg_relu.runtime.flower_run.raise_on_signals)
    return f"interrupted by {signal.Signals(signum).name}" if isinstance(signum, int) else None


def _mark_interrupted(todo: Sequence[Cell], result: SweepResult, reason: str) -> list[str]:
    """Record every cell of ``todo`` that started and did not end as ``interrupted`` with ``reason``."""
    from fedavg_relu.core.results import write_summary

    done = set(result.ran) | set(result.failed)
    marked = []
    for cell in todo:
        if cell.cell_id in done or not cell.run_dir.exists() or is_complete(cell):
            continue
        write_summary(cell.run_dir, "interrupted", reason, num_server_rounds=cell.config.num_server_rounds,
                      written_by="fedavg-relu sweep")
        marked.append(cell.cell_id)
    return marked


# --- experiment tracking --------------------------------------------------------
def is_tracked(spec: SweepSpec, cell: Cell) -> bool:
    """True when the cell's run folder was already logged to the sweep's tracker and experiment."""
    from fedavg_relu.core.tracking import default_mlflow_uri, read_tracking_record

    record = read_tracking_record(cell.run_dir)
    if record.get("tracker") != spec.tracker or record.get("experiment") != spec.name:
        return False
    return spec.tracker != "mlflow" or record.get("tracking-uri") == (spec.tracking_uri or default_mlflow_uri(spec.output_dir))


def track_cell(spec: SweepSpec, cell: Cell) -> str:
    """Log the cell's run folder to the sweep's tracker as one run of the experiment named after the sweep.

    The run is named after the cell's groups and varied keys and tagged ``sweep``,
    ``cell-id`` and ``group``; an MLflow run logged for the same cell before (a failed
    attempt, since rerun) is deleted, so the experiment holds one run per cell. The cell's
    folder records the run in ``tracking.json``. Returns the tracker's run id.
    """
    from fedavg_relu.core.results import track_run_folder
    from fedavg_relu.core.tracking import TRACKING_FILE, open_tracker

    name = f"{'/'.join(cell.groups)}: " + " ".join(f"{k}={cell.values[k]}" for k in cell.varied)
    tags = {"sweep": spec.name, "cell-id": cell.cell_id, "group": "/".join(cell.groups)}
    tracker = open_tracker(spec.tracker, spec.output_dir, name, experiment=spec.name,
                           tracking_uri=spec.tracking_uri, tags=tags)
    track_run_folder(cell.run_dir, tracker)
    if hasattr(tracker, "delete_runs_tagged"):
        tracker.delete_runs_tagged("cell-id", cell.cell_id)
    atomic_write_text(cell.run_dir / TRACKING_FILE, json.dumps({**tracker.record(), "experiment": spec.name}, indent=1) + "\n")
    return tracker.run_id


def _track(spec: SweepSpec, cell: Cell, bar: Any) -> None:
    """:func:`track_cell` when the sweep has a tracker and the cell has a run folder not logged yet; a
    tracker error is a warning on the console (the cell's result stands)."""
    if spec.tracker == "none" or not (cell.run_dir / "config.json").exists() or is_tracked(spec, cell):
        return
    try:
        track_cell(spec, cell)
    except Exception as err:  # noqa: BLE001 - the run folder and the tables hold the result anyway
        bar.write(f"sweep {spec.name}: cell {cell.cell_id} not logged to {spec.tracker}: {type(err).__name__}: {err}")


def _run_one(cell: Cell, engine: str, central: bool, quiet: bool, threads: int) -> tuple[str | None, str | None]:
    """One cell and its centralized baseline (here, or in a worker process): (the run's error, the baseline's)."""
    with _quiet_flower(quiet), _torch_threads(threads):
        try:
            run_cell(cell, engine)
        except Exception as err:  # reported by the parent, which goes on
            return f"{type(err).__name__}: {err}", None
        if central:
            try:
                central_comparison(cell)
            except Exception as err:
                return None, f"central baseline: {type(err).__name__}: {err}"
    return None, None


def _run_parallel(spec: SweepSpec, todo: Sequence[Cell], result: SweepResult, bar: Any, engine: str, jobs: int,
                  quiet: bool, threads: int) -> None:
    """``todo``, ``jobs`` cells at a time in spawned processes (a worker killed, e.g. by the kernel's
    OOM killer, fails its cell, and the cells still queued on that pool)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_ignore_sigint)
    try:
        futures = {pool.submit(_run_one, cell, engine, wants_central(spec, cell), quiet, threads): cell for cell in todo}
        for future in as_completed(futures):
            cell = futures[future]
            try:
                outcome = future.result()
            except Exception as err:  # the worker died (BrokenProcessPool)
                outcome = (f"worker process: {type(err).__name__}: {err}", None)
            bar.set_postfix_str(describe(cell), refresh=False)
            _record(spec, result, bar, cell, *outcome)
    except BaseException:
        for process in list(getattr(pool, "_processes", {}).values()):  # the workers ignore SIGINT: stop them here
            process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _ignore_sigint() -> None:
    """A worker leaves Ctrl-C to the parent, which stops it (no traceback from every worker of the pool)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def describe(cell: Cell) -> str:
    """``group cell-id: key=value ...`` of the keys the cell's grid varies."""
    return f"{'/'.join(cell.groups)} {cell.cell_id}: " + " ".join(f"{k}={cell.values[k]}" for k in cell.varied)


# --- tables -------------------------------------------------------------------
def config_columns(cfg: RunConfig) -> dict[str, Any]:
    """The run-config columns of a cell's rows (``output-dir``, ``run-name`` and the tracker keys left out)."""
    return {k: v for k, v in cfg.to_mapping().items() if k not in RESERVED_KEYS + TRACKING_KEYS}


def collect_rows(spec: SweepSpec, cells: Sequence[Cell]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of the per-round and the per-cell tables, for the finished cells."""
    metric_rows: list[dict[str, Any]] = []
    cell_rows: list[dict[str, Any]] = []
    for cell in cells:
        if not is_complete(cell):
            continue
        with open(cell.run_dir / "config.json", encoding="utf-8") as fh:
            derived = json.load(fh).get("derived", {})
        rows = read_metrics(cell.run_dir)
        central: dict[str, Any] = {}
        if wants_central(spec, cell) and (cell.run_dir / CENTRAL_FILE).exists():
            with open(cell.run_dir / CENTRAL_FILE, encoding="utf-8") as fh:
                central = json.load(fh)
        config = config_columns(cell.config)
        for group in cell.groups:
            head = {"group": group, "cell-id": cell.cell_id, **config,
                    "effective-learning-rate": derived.get("effective-learning-rate")}
            clash = set(head) & {k for r in rows for k in r}  # e.g. gradient-dissimilarity, local-steps
            rows = [{(f"metric.{k}" if k in clash else k): v for k, v in r.items()} for r in rows]
            for row in rows:
                metric_rows.append({**head, **row})
            final = dict(rows[-1])
            cell_rows.append({**head, "run-dir": os.path.relpath(cell.run_dir, spec.output_dir), **final, **central})
    return metric_rows, cell_rows


def write_tables(spec: SweepSpec, cells: Sequence[Cell] | None = None) -> tuple[Path, Path]:
    """Write ``metrics.csv`` and ``cells.csv`` of the finished cells atomically; return their paths."""
    from fedavg_relu.core.results import rows_to_csv

    metric_rows, cell_rows = collect_rows(spec, cells if cells is not None else spec.cells())
    metrics_path, cells_path = spec.output_dir / METRICS_TABLE, spec.output_dir / CELLS_TABLE
    atomic_write_text(metrics_path, rows_to_csv(metric_rows) if metric_rows else "")
    atomic_write_text(cells_path, rows_to_csv(cell_rows) if cell_rows else "")
    return metrics_path, cells_path


def read_tables(output_dir: str | os.PathLike):
    """``(metrics, cells)`` pandas DataFrames of a sweep's output folder."""
    import pandas as pd

    out = Path(output_dir)
    return pd.read_csv(out / METRICS_TABLE), pd.read_csv(out / CELLS_TABLE)
