"""Prediction 7 taken apart: what makes the tangent kernel move less than m^-1/2 in the `paper` family.

Four measurements, each answering one candidate explanation (issue 23):

* :func:`round_table` / :func:`saturation`: ``ntk-change`` against the round, from every
  run's per-round record. Does the kernel stop moving once the loss is small?
* :func:`slope_by_round`: the width slope at each round. Does the slope depend on how many
  rounds are run?
* :func:`flip_law`: ``ntk-change`` against the activation flips against W^0, all rounds and
  widths together: the least-squares fit ``log Δ = a + b log flips + c log m``. In the
  `paper` family at depth 1 (A and B frozen, W_1 trained) the kernel
  ``Θ(x, x') = ⟨h(x), h(x')⟩ Σ_i b_i s_i(x) s_i(x')`` (``h = relu(A x)``, ``b_i = Σ_j B_ji²``,
  ``s_i`` the on/off state of unit i of W_1's layer) changes *only* through flips. Flips of
  random sign add up like a random walk: ``‖ΔΘ‖/‖Θ‖ ≈ 2 sqrt(E[b²] p / m)`` for a flip
  fraction p, i.e. b = 1/2, c = −1/2; flips of one sign add up coherently, ``≈ 2 |μ| p``
  (b = 1, c = 0). docs/theory.md has the derivation.
* :func:`window_slopes`: the width slope over sub-ranges of widths (finite-width effects at
  the small widths that anchor the fit would make the slope change along the range).

And one measurement that needs the models (:func:`probe_kernels`): the kernel change and the
flips recomputed from W^0 (:func:`fedavg_relu.core.task.initial_params`) and a run's final
model (``model.pt``) on two probe sets, the held-out split (the server's probes) and the
training inputs; plus the net sign of the flips, ``μ = (on − off)/(on + off)``. Run it as
``python -m fedavg_relu.experiments.kernel results/ntk-probes --figures docs/figures`` (writes
``kernel.csv`` and figure 7d).

This module does not import flwr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fedavg_relu.experiments import uncertainty
from fedavg_relu.experiments.analysis import _band, _title, fit_loglog_slope, new_figure, per_cell, seed_stats

#: Sub-ranges of widths (a factor 8 each) for :func:`window_slopes`.
WINDOWS = ((64, 512), (128, 1024), (256, 2048), (512, 4096), (1024, 8192), (64, 2048), (64, 8192))


def round_table(metrics: pd.DataFrame, group: str = "width") -> pd.DataFrame:
    """Rows (cell, round >= 1) of a group: width, seed, round, ``ntk-change``, ``activation-flips-init``."""
    frame = metrics[(metrics["group"] == group) & (metrics["round"] >= 1)] if "group" in metrics else metrics
    columns = ["cell-id", "width", "seed", "round", "ntk-change", "activation-flips-init"]
    return frame[[c for c in columns if c in frame]].dropna().reset_index(drop=True)


def saturation(rounds: pd.DataFrame, early: int = 10) -> pd.DataFrame:
    """Per width: the seed-mean ``ntk-change`` at round ``early`` and at the last round, their ratio, and the
    log-log slope of ``ntk-change`` against the round over rounds ``early``..R (0: the kernel has stopped)."""
    out = []
    for width, frame in rounds.groupby("width"):
        stats = seed_stats(frame, "round", "ntk-change", log=True).set_index("round")["center"]
        last = int(stats.index.max())
        late = stats[stats.index >= early]
        out.append({"width": int(width), f"ntk-change-r{early}": float(stats.get(early, math.nan)),
                    "ntk-change-last": float(stats[last]), "ratio-last-to-early": float(stats[last] / stats.get(early, math.nan)),
                    "late-slope-vs-round": fit_loglog_slope(late.index, late.to_numpy()).slope})
    return pd.DataFrame(out)


def slope_by_round(rounds: pd.DataFrame, which: tuple[int, ...] = (1, 3, 10, 30)) -> pd.DataFrame:
    """The width slope of ``ntk-change`` (and of the flips) at each round of ``which``, with 95 % intervals."""
    out = []
    for r in which:
        frame = rounds[rounds["round"] == r]
        if not len(frame):
            continue
        row = {"round": r}
        for y in ("ntk-change", "activation-flips-init"):
            groups = {float(w): list(f[y].astype(float)) for w, f in frame.groupby("width")}
            row[f"slope-{y}"] = fit_loglog_slope(*_means(groups)).slope
            interval = uncertainty.bootstrap_loglog_slope(groups, f"7/round{r}/{y}")
            row[f"low-{y}"], row[f"high-{y}"] = interval.low, interval.high
        out.append(row)
    return pd.DataFrame(out)


def _means(groups: dict[float, list[float]]) -> tuple[list[float], list[float]]:
    xs = sorted(groups)
    return xs, [float(np.exp(np.mean(np.log(groups[x])))) for x in xs]


def flip_law(rounds: pd.DataFrame, num_draws: int = 1000) -> dict[str, float]:
    """Fit ``log ntk-change = a + b log flips + c log m`` over every (cell, round); b, c with 95 % intervals.

    The intervals draw whole cells (a seed's 30 rounds together) with replacement within each width.
    Also returned: ``r2`` of the fit, and ``r2-flips-only`` of ``log ntk-change = a + b log flips``.
    """
    data = rounds[(rounds["ntk-change"] > 0) & (rounds["activation-flips-init"] > 0)]
    cells = [frame for _, frame in data.groupby("cell-id")]
    widths = np.array([float(f["width"].iloc[0]) for f in cells])

    def fit(frames: list[pd.DataFrame]) -> tuple[np.ndarray, float]:
        joined = pd.concat(frames)
        design = np.column_stack([np.ones(len(joined)), np.log(joined["activation-flips-init"]), np.log(joined["width"])])
        target = np.log(joined["ntk-change"].to_numpy(float))
        coef, *_ = np.linalg.lstsq(design, target, rcond=None)
        resid = target - design @ coef
        return coef, 1 - float(resid @ resid) / float(((target - target.mean()) ** 2).sum())

    coef, r2 = fit(cells)
    only = np.polyfit(np.log(data["activation-flips-init"]), np.log(data["ntk-change"]), 1)
    resid = np.log(data["ntk-change"]) - np.polyval(only, np.log(data["activation-flips-init"]))
    r2_only = 1 - float((resid**2).sum()) / float(((np.log(data["ntk-change"]) - np.log(data["ntk-change"]).mean()) ** 2).sum())
    rng = uncertainty.generator("7/flip-law")
    draws = []
    by_width = {w: np.flatnonzero(widths == w) for w in np.unique(widths)}
    for _ in range(num_draws):
        picked = [cells[i] for idx in by_width.values() for i in rng.choice(idx, size=len(idx))]
        draws.append(fit(picked)[0])
    draws = np.array(draws)
    b, c = uncertainty.percentile_interval(draws[:, 1]), uncertainty.percentile_interval(draws[:, 2])
    return {"b-flips": float(coef[1]), "b-low": b.low, "b-high": b.high, "c-width": float(coef[2]), "c-low": c.low,
            "c-high": c.high, "r2": r2, "slope-flips-only": float(only[0]), "r2-flips-only": r2_only}


def window_slopes(cells: pd.DataFrame, y: str, windows=WINDOWS, x: str = "width", prefix: str = "window") -> pd.DataFrame:
    """The log-log slope of ``y`` against ``x`` over each window ``(low, high)`` of x, with its 95 % interval."""
    out = []
    for low, high in windows:
        frame = cells[(cells[x] >= low) & (cells[x] <= high)]
        groups = {float(w): list(pd.to_numeric(f[y]).astype(float)) for w, f in frame.groupby(x)}
        if len(groups) < 2 or max(groups) < high:
            continue
        interval = uncertainty.bootstrap_loglog_slope(groups, f"{prefix}/{y}/{low}-{high}")
        out.append({"widths": f"{low}-{high}", "slope": fit_loglog_slope(*_means(groups)).slope,
                    "low": interval.low, "high": interval.high})
    return pd.DataFrame(out)


def width_cells(metrics: pd.DataFrame, group: str = "width") -> pd.DataFrame:
    """One row per cell of a group: ``ntk-change`` and ``activation-flips-init`` at the last round."""
    frame = metrics[metrics["group"] == group]
    return per_cell(frame, {"ntk-change": "final", "activation-flips-init": "final"})


# --- recomputed from the models ---------------------------------------------------------------
def flip_counts(patterns_init: list, patterns_now: list) -> tuple[float, float]:
    """``(flip fraction, net sign μ)`` over every (probe, unit) of the measured layers.

    μ = (units turned on − units turned off) / flips: 0 when the flips cancel, ±1 when all go one way.
    """
    on = sum(int((~a & b).sum()) for a, b in zip(patterns_init, patterns_now, strict=True))
    off = sum(int((a & ~b).sum()) for a, b in zip(patterns_init, patterns_now, strict=True))
    total = sum(int(a.numel()) for a in patterns_init)
    flips = on + off
    return flips / total, ((on - off) / flips if flips else 0.0)


def probe_kernel_row(run_dir: Path) -> dict[str, float | int | str]:
    """Kernel change and flips on the held-out and the training probes, W^0 against the run's ``model.pt``."""
    import torch

    from fedavg_relu.core.centralized import load_run_model
    from fedavg_relu.core.data import load_central, load_test
    from fedavg_relu.core.mechanism import ntk_change, ntk_gram, probe_indices
    from fedavg_relu.core.task import initial_params

    cfg, model = load_run_model(run_dir)
    final = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    init = {k: torch.as_tensor(v) for k, v in initial_params(cfg).items()}
    test = load_test(cfg)
    probes = {"held-out": test.x[probe_indices(len(test.x), cfg.ntk_probe_size or 64, cfg.seed)],
              "train": load_central(cfg).train.x}
    row: dict[str, float | int | str] = {"cell-id": run_dir.name, "model-family": cfg.model_family, "width": cfg.width,
                                         "depth": cfg.depth, "seed": cfg.seed, "rounds": cfg.num_server_rounds}
    for name, x in probes.items():
        theta0 = ntk_gram(model, init, x)
        theta = ntk_gram(model, final, x)
        with torch.no_grad():
            _load(model, init)
            before = model.forward_with_patterns(x.to(next(model.parameters()).dtype))[1]
            _load(model, final)
            after = model.forward_with_patterns(x.to(next(model.parameters()).dtype))[1]
        flips, net = flip_counts(before, after)
        row.update({f"ntk-change/{name}": ntk_change(theta, theta0), f"flips/{name}": flips, f"net-sign/{name}": net,
                    f"probes/{name}": int(x.shape[0])})
        if cfg.model_family == "paper" and cfg.depth == 1:
            row[f"random-sign/{name}"] = random_sign_change(model, x, before[0], after[0], theta0)
    return row


def random_sign_change(model, x, s_init, s_now, theta_init) -> float:
    """The kernel change the same flips would make with random signs: ``sqrt(Σ_i b_i² ‖H ⊙ Δ_i‖²_F) / ‖Θ⁰‖_F``.

    For the `paper` family at depth 1, ``ΔΘ = Σ_i b_i H ⊙ Δ_i`` with ``H = h hᵀ`` (h = relu(A x),
    frozen), ``b_i = Σ_j B_ji²`` and ``Δ_i = s_i s_iᵀ − s⁰_i s⁰_iᵀ`` (unit i's on/off states on the
    probes). Giving each unit's term an independent random sign ε_i makes
    ``E‖Σ_i ε_i b_i H ⊙ Δ_i‖² = Σ_i b_i² ‖H ⊙ Δ_i‖²``: the random-walk size of the flips. The measured
    change over this reference is ~1 when the flips' signs cancel and grows with their coherence.
    With binary states, ``Δ_i² = a + c − 2ac`` for ``a = s_i s_iᵀ``, ``c = s⁰_i s⁰_iᵀ``, so
    ``‖H ⊙ Δ_i‖² = q(s_i) + q(s⁰_i) − 2 q(s_i ∧ s⁰_i)`` with ``q(v) = vᵀ (H ⊙ H) v``.
    """
    import torch

    with torch.no_grad():
        dtype = torch.float64
        h = torch.relu(x.to(dtype) @ model.input.weight.to(dtype).T)  # (P, m)
        h2 = (h @ h.T) ** 2  # (H ⊙ H), (P, P)
        b = (model.output.weight.to(dtype) ** 2).sum(0)  # (m,)
        s, s0 = s_now.to(dtype), s_init.to(dtype)

        def q(v):
            return torch.einsum("xi,xy,yi->i", v, h2, v)

        per_unit = q(s) + q(s0) - 2 * q(s * s0)
        norm = torch.linalg.matrix_norm(torch.as_tensor(theta_init, dtype=dtype))
        return float(torch.sqrt((b**2 * per_unit.clamp(min=0)).sum()) / norm)


def _load(model, params: dict) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in params:
                p.copy_(params[name].to(p.dtype))


def probe_kernels(sweep_dir: str | Path) -> pd.DataFrame:
    """:func:`probe_kernel_row` for every run folder of a sweep that kept its ``model.pt``, with the group column."""
    sweep_dir = Path(sweep_dir)
    cells = pd.read_csv(sweep_dir / "cells.csv")
    rows = []
    for _, cell in cells.iterrows():
        run_dir = sweep_dir / str(cell["run-dir"])
        if (run_dir / "model.pt").exists():
            rows.append({"group": cell["group"], **probe_kernel_row(run_dir),
                         "ntk-change/recorded": float(cell.get("ntk-change", math.nan))})
    if not rows:
        raise FileNotFoundError(f"no model.pt under {sweep_dir}/runs: run the sweep with save-model = true")
    return pd.DataFrame(rows)


def plot_ntk_probes(table: pd.DataFrame, caption: pd.DataFrame | None = None) -> Figure:
    """Final kernel change vs width on held-out and training probes (each group's longest runs), with the
    change the same flips would make with random signs (``random-sign/*``, `paper` depth 1) dashed."""
    fig, (ax,) = new_figure(width=7.0, height=4.6)
    longest = table[table["rounds"] == table.groupby("group")["rounds"].transform("max")]
    for group, frame in longest.groupby("group"):
        for probe, marker in (("held-out", "o"), ("train", "s")):
            stats = seed_stats(frame, "width", f"ntk-change/{probe}", log=True)
            fit = fit_loglog_slope(stats["width"], stats["center"])
            _band(ax, stats, "width", f"{group}, {probe} probes: slope {fit.slope:+.2f}", marker=marker)
            reference = f"random-sign/{probe}"
            if reference in frame and frame[reference].notna().all():
                stats = seed_stats(frame, "width", reference, log=True)
                fit = fit_loglog_slope(stats["width"], stats["center"])
                ax.plot(stats["width"], stats["center"], ls="--", lw=1, color=ax.lines[-1].get_color(),
                        label=f"  same flips, random signs: slope {fit.slope:+.2f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width")
    ax.set_ylabel("‖Θ(W^R) − Θ(W^0)‖_F / ‖Θ(W^0)‖_F")
    ax.legend(fontsize=6.5)
    ax.grid(alpha=0.3, which="both")
    _title(fig, "7d. Held-out vs training-input probes, the flips' random-walk reference, and every layer trained "
                "(ntk family); recomputed from W^0 and the saved final models",
           caption if caption is not None else table)
    return fig


def main(argv: list[str] | None = None) -> int:
    """``python -m fedavg_relu.experiments.kernel SWEEP_DIR``: write ``SWEEP_DIR/kernel.csv``."""
    from fedavg_relu.core.results import atomic_write_text

    parser = argparse.ArgumentParser(description="kernel change on held-out and training probes, from saved models")
    parser.add_argument("sweep_dir")
    parser.add_argument("--figures", default=None, help="also draw fig7d_ntk_change_probes (png, pdf) into this folder")
    parser.add_argument("--dpi", type=int, default=110)
    parser.add_argument("--reuse", action="store_true", help="draw from an existing kernel.csv instead of recomputing it")
    args = parser.parse_args(argv)
    target = Path(args.sweep_dir) / "kernel.csv"
    if args.reuse and target.exists():
        table = pd.read_csv(target)
    else:
        table = probe_kernels(args.sweep_dir)
        atomic_write_text(target, table.to_csv(index=False))
    report = {"cells": len(table), "file": str(target)}
    if args.figures:
        from fedavg_relu.experiments.analysis import save_figure

        metrics = pd.read_csv(Path(args.sweep_dir) / "metrics.csv")
        metrics = metrics[metrics["num-server-rounds"] == metrics.groupby("group")["num-server-rounds"].transform("max")]
        report["figures"] = [str(p) for p in save_figure(plot_ntk_probes(table, metrics), Path(args.figures)
                                                         / "fig7d_ntk_change_probes", dpi=args.dpi)]
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
