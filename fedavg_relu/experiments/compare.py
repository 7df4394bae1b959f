"""Compare strategies on the same data, partitions, seeds and metrics.

A comparison file is TOML::

    [compare]
    name = "strategies-small"          # default: the file's stem
    output-dir = "results/strategies-small"
    strategies = ["fedavg", "fedprox", "scaffold", "fednova"]
    seeds = [0, 1, 2]
    target-loss = 0.2                  # for "rounds to reach the target" (global loss)

    [base]                             # run-config keys shared by every run
    dataset = "synthetic"

    [partitions.iid]                   # one table per partition setting
    partitioner = "iid"

    [partitions.dirichlet-0.1]
    partitioner = "dirichlet"
    dirichlet-alpha = 0.1

It becomes a sweep (:mod:`fedavg_relu.experiments.sweep`; one grid per partition, group =
the partition's name, cells = strategies x seeds), so runs are resumable and
identical runs are shared. Every strategy sees the same partitions (same
seed -> same split) and the same initial model. The outputs, next to the
sweep's tables:

``comparison.csv``
    per (partition, strategy): mean and std over seeds of the final and best
    global loss and test accuracy, the rounds needed to reach ``target-loss``
    (NaN where a seed never reached it, with the count that did), and the mean
    over rounds of the gradient drift and the model divergence.
``comparison.md``
    the same table in Markdown, with the configuration it came from.
``figures/compare-<partition>.png`` (and ``.pdf``; dots in the name become ``_``)
    global loss and relative gradient drift by round, one line per strategy,
    bands = mean +- std over seeds, titled with the configuration.

:func:`override_comparison` narrows a comparison file (strategies, seeds, rounds) and sets its
tracker, as ``fedavg-relu compare --strategies ... --seeds ... --rounds ... --tracker ...`` does;
the command line writes to ``runs/compare/<name>`` unless ``--results`` asks for the file's
``output-dir``.

This module does not import flwr (the engines do, when runs start).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedavg_relu.core.config import STRATEGIES, ConfigError, did_you_mean
from fedavg_relu.core.results import atomic_write_text
from fedavg_relu.experiments.sweep import SweepSpec, override_base, parse_sweep, read_tables, read_toml, run_sweep

COMPARE_KEYS = ("name", "output-dir", "strategies", "seeds", "target-loss", "engine")


def parse_comparison(data: Mapping[str, Any], name: str = "compare", output_dir: str | os.PathLike | None = None) -> tuple[SweepSpec, float]:
    """The sweep a comparison file describes, and its target loss; :class:`ConfigError` lists every problem."""
    problems: list[str] = []
    for key in sorted(set(data) - {"compare", "base", "partitions"}):
        problems.append(f"{key}: unknown table; expected [compare], [base] and [partitions.NAME]")
    spec = dict(data.get("compare", {}))
    for key in sorted(set(spec) - set(COMPARE_KEYS)):
        problems.append(f"compare.{key}={spec[key]!r}: unknown key{did_you_mean(key, COMPARE_KEYS)}; "
                        f"expected one of {', '.join(COMPARE_KEYS)}")
    strategies = spec.get("strategies", ["fedavg"])
    if not isinstance(strategies, list) or not strategies:
        problems.append(f"compare.strategies={strategies!r}: expected a non-empty list of strategy names")
        strategies = []
    for s in strategies:
        if s not in STRATEGIES:
            problems.append(f"compare.strategies: {s!r} is not a strategy; expected names from {', '.join(STRATEGIES)}"
                            f"{did_you_mean(s, STRATEGIES)}")
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        problems.append(f"compare.seeds={seeds!r}: expected a non-empty list of integers")
        seeds = [0]
    target = spec.get("target-loss", 0.0)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or target < 0:
        problems.append(f"compare.target-loss={target!r}: expected a number >= 0")
        target = 0.0
    partitions = data.get("partitions", {"default": {}})
    if not isinstance(partitions, Mapping) or not partitions:
        problems.append("partitions: expected one or more [partitions.NAME] tables")
        partitions = {}
    if problems:
        raise ConfigError(problems)
    grids = []
    for part_name, keys in partitions.items():
        if not isinstance(keys, Mapping) or any(isinstance(v, (Mapping, list)) for v in keys.values()):
            raise ConfigError([
                f"partitions.{part_name}={keys!r}: expected a table of run-config values "
                '(quote names that contain dots: [partitions."dirichlet-0.1"])'
            ])
        if "strategy" in keys or "seed" in keys:
            raise ConfigError([f"partitions.{part_name}: strategy and seed are set by [compare]"])
        grids.append({"group": part_name, **{k: [v] for k, v in keys.items()}, "strategy": list(strategies), "seed": list(seeds)})
    sweep_data = {
        "sweep": {
            "name": str(spec.get("name", name)),
            "output-dir": spec.get("output-dir", f"results/{spec.get('name', name)}"),
            "engine": spec.get("engine", "in-process"),
        },
        "base": dict(data.get("base", {})),
        "grid": grids,
    }
    return parse_sweep(sweep_data, name=name, output_dir=output_dir), float(target)


def load_comparison(path: str | os.PathLike, output_dir: str | os.PathLike | None = None,
                    **overrides: Any) -> tuple[SweepSpec, float]:
    """Read a comparison TOML file (``overrides``: :func:`override_comparison`'s keywords)."""
    return parse_comparison(override_comparison(read_toml(path), **overrides), name=Path(path).stem, output_dir=output_dir)


def override_comparison(data: Mapping[str, Any], strategies: Sequence[str] | None = None,
                        seeds: Sequence[int] | None = None, rounds: int | None = None, tracker: str | None = None,
                        tracking_uri: str | None = None) -> dict[str, Any]:
    """A copy of a comparison file's mapping with the command line's choices applied (``None``: as the file says).

    ``strategies`` and ``seeds`` replace ``compare.strategies`` / ``compare.seeds``;
    ``rounds`` is ``[base] num-server-rounds`` (and leaves the partition tables);
    ``tracker`` / ``tracking_uri`` are ``[base] tracker`` / ``mlflow-tracking-uri``.
    """
    data = copy.deepcopy(dict(data))
    spec = data.setdefault("compare", {})
    base = data.setdefault("base", {})
    if strategies is not None:
        spec["strategies"] = list(strategies)
    if seeds is not None:
        spec["seeds"] = list(seeds)
    override_base(base, list(data.get("partitions", {}).values()), rounds, tracker, tracking_uri)
    return data


def rounds_to_target(rounds: np.ndarray, loss: np.ndarray, target: float) -> float:
    """First round whose global loss is <= ``target`` (NaN if never)."""
    hit = np.nonzero(np.asarray(loss) <= target)[0]
    return float(np.asarray(rounds)[hit[0]]) if len(hit) else math.nan


def summarize(metrics, target: float):
    """Per (group, strategy) summary over seeds of the per-round table ``metrics`` (pandas)."""
    import pandas as pd

    per_run = []
    for (group, strategy, seed), run in metrics[metrics["round"] >= 1].groupby(["group", "strategy", "seed"]):
        run = run.sort_values("round")
        per_run.append(
            {
                "group": group, "strategy": strategy, "seed": seed,
                "final-global-loss": run["global-loss"].iloc[-1],
                "best-global-loss": run["global-loss"].min(),
                "final-test-accuracy": run["test-accuracy"].iloc[-1],
                "best-test-accuracy": run["test-accuracy"].max(),
                "rounds-to-target": rounds_to_target(run["round"].to_numpy(), run["global-loss"].to_numpy(), target),
                "mean-gradient-drift": run["gradient-drift-mean"].mean(),
                "mean-relative-gradient-drift": run["relative-gradient-drift-mean"].mean(),
                "mean-model-divergence": run["model-divergence"].mean(),
            }
        )
    runs = pd.DataFrame(per_run)
    value_cols = [c for c in runs.columns if c not in ("group", "strategy", "seed")]
    rows = []
    for (group, strategy), g in runs.groupby(["group", "strategy"], sort=False):
        row: dict[str, Any] = {"partition": group, "strategy": strategy, "seeds": len(g)}
        for col in value_cols:
            values = g[col].to_numpy(dtype=float)
            finite = values[np.isfinite(values)]
            row[f"{col}-mean"] = float(finite.mean()) if len(finite) else math.nan
            row[f"{col}-std"] = float(finite.std()) if len(finite) > 1 else 0.0
        row["seeds-reaching-target"] = int(np.isfinite(g["rounds-to-target"].to_numpy(dtype=float)).sum())
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(summary, caption: str) -> str:
    """A Markdown table of the main columns of :func:`summarize`'s result."""

    def pm(row, col, fmt):
        mean, std = row[f"{col}-mean"], row[f"{col}-std"]
        return "–" if not math.isfinite(mean) else f"{fmt.format(mean)} ± {fmt.format(std)}"

    lines = [
        caption, "",
        "| partition | strategy | final global loss | best test acc. | rounds to target (seeds) | mean rel. drift | mean divergence |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, row in summary.iterrows():
        lines.append(
            f"| {row['partition']} | {row['strategy']} | {pm(row, 'final-global-loss', '{:.4f}')} | "
            f"{pm(row, 'best-test-accuracy', '{:.3f}')} | {pm(row, 'rounds-to-target', '{:.1f}')} "
            f"({row['seeds-reaching-target']}/{row['seeds']}) | {pm(row, 'mean-relative-gradient-drift', '{:.3f}')} | "
            f"{pm(row, 'mean-model-divergence', '{:.3g}')} |"
        )
    return "\n".join(lines) + "\n"


def plot_comparison(metrics, group: str, caption: str):
    """Global loss and relative drift by round for one partition, one line per strategy, bands over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import textwrap

    data = metrics[(metrics["group"] == group) & (metrics["round"] >= 1)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    colors = plt.get_cmap("tab20").colors
    for i, (strategy, g) in enumerate(data.groupby("strategy", sort=False)):
        style = {"color": colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20], "linestyle": "-" if i < 10 else "--"}
        for ax, col, log in ((axes[0], "global-loss", True), (axes[1], "relative-gradient-drift-mean", False)):
            stats = g.groupby("round")[col].agg(["mean", "std"]).fillna(0.0)
            ax.plot(stats.index, stats["mean"], marker="o", ms=3, label=strategy, **style)
            ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.15, color=style["color"])
            ax.set_yscale("log" if log else "linear")
    axes[0].set(xlabel="round r", ylabel="global loss F(W^r)", title="global loss")
    axes[1].set(xlabel="round r", ylabel="‖∇f_k(W_k) − ∇f_k(W̄)‖ / ‖∇f_k(W̄)‖", title="relative gradient drift")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Strategies, partition {group}\n" + "\n".join(textwrap.wrap(caption, 170)), fontsize=8)
    fig.tight_layout()
    return fig


def caption_for(spec: SweepSpec, group: str) -> str:
    """The configuration a comparison figure came from (base keys and the partition's keys)."""
    keys = dict(spec.base)
    for g, grid in spec.grids:
        if g == group:
            keys.update({k: v[0] for k, v in grid.items() if k not in ("strategy", "seed")})
    seeds = next(grid["seed"] for g, grid in spec.grids if g == group)
    return ", ".join(f"{k}={v}" for k, v in keys.items()) + f"; seeds {seeds}"


def run_comparison(spec: SweepSpec, target: float, progress: bool = True, **options: Any) -> Path:
    """Run (or resume) the comparison, then write comparison.csv, comparison.md and the figures.

    ``options`` go to :func:`~fedavg_relu.experiments.sweep.run_sweep` (``engine``, ``jobs``,
    ``threads``, ``max_cells``, ``quiet``); an interrupt stops it as it stops a sweep.
    """
    result = run_sweep(spec, progress=progress, **options)
    if result.failed:
        raise RuntimeError(f"{len(result.failed)} run(s) failed: {result.failed}")
    return write_comparison(spec, target)


def write_comparison(spec: SweepSpec, target: float) -> Path:
    """Summaries and figures from the sweep's per-round table; returns comparison.md's path."""
    from fedavg_relu.experiments.plots import save_figure

    metrics, _ = read_tables(spec.output_dir)
    summary = summarize(metrics, target)
    order = {name: i for i, name in enumerate(spec.grids[0][1].get("strategy", []))}
    groups = {g: i for i, (g, _) in enumerate(spec.grids)}
    summary = summary.sort_values(
        by=["partition", "strategy"], key=lambda col: col.map(groups if col.name == "partition" else order)
    ).reset_index(drop=True)
    atomic_write_text(spec.output_dir / "comparison.csv", summary.to_csv(index=False))
    parts = []
    for group, _ in spec.grids:
        caption = caption_for(spec, group)
        parts.append(to_markdown(summary[summary["partition"] == group], f"**{group}** ({caption}; target loss {target})"))
        fig = plot_comparison(metrics, group, caption)
        save_figure(fig, spec.output_dir / "figures" / f"compare-{group.replace('.', '_')}")
        import matplotlib.pyplot as plt

        plt.close(fig)
    path = spec.output_dir / "comparison.md"
    atomic_write_text(path, "\n".join(parts))
    return path
