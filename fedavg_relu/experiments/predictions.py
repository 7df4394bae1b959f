"""THEORY.md's predictions, checked against a theory sweep's tables.

Each check returns a :class:`Check`: the prediction in words, the measured
numbers (slopes of log-log fits, per-round rates, ratios), the rule that decides
agreement (fixed here, before looking at any particular run) and the verdict.
The numbers come from the metrics the runs recorded (``metrics.csv`` /
``cells.csv`` of :mod:`fedavg_relu.experiments.sweep`); nothing is re-computed from models.

Groups read (see ``sweeps/theory-*.toml``): ``width`` (IID clients, predictions
1-4), ``tau`` (prediction 5), ``non-iid`` (prediction 6, with the sweep's
``central-baseline``).

Per-cell reductions: cumulative quantities (distance from initialization,
flips against W^0, the centralized comparison) are taken at the last round;
per-round quantities (drift, effective smoothness, flips between local and
averaged models, divergence) are averaged over rounds 1..R of a cell. Seeds are
then averaged at each width (τ) and the log-log slope fitted through the means.

Uncertainty (issue 23): every number a rule judges also gets a 95 % bootstrap interval
(:mod:`fedavg_relu.experiments.uncertainty`: seeds drawn with replacement at each width or
τ, and, given the run folders' per-client rows, the clients inside each drawn run). A rule
is a list of :class:`Condition` on measured keys, fixed here; the point verdict
(``Check.agrees``) applies them to the point estimates as before, and the reported verdict
applies them to the intervals: ``agrees`` when every condition holds over its whole
interval, ``disagrees`` when some condition fails over its whole interval, ``undetermined``
otherwise (an interval straddles a threshold).

Issue 14's mechanism metrics enter when the tables carry them: prediction 4 adds
the nonlinear drift fraction (``drift-nonlinear``) to its rule, and prediction 7
(the tangent kernel moves less in wider networks) is checked when the width group
recorded ``ntk-change``; tables without them are judged as before.

This module does not import flwr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fedavg_relu.experiments import uncertainty
from fedavg_relu.experiments.analysis import (
    NONIID_GROUP,
    TAU_GROUP,
    WIDTH_GROUP,
    fit_linear_rate,
    fit_loglog_slope,
    per_cell,
    seed_stats,
    with_loss_curve,
)


@dataclass(frozen=True)
class Condition:
    """One clause of a rule: ``measured[key]`` lies in ``low .. high`` (ends included when ``closed``)."""

    key: str
    low: float = -math.inf
    high: float = math.inf
    closed: bool = False

    def holds(self, value: float) -> bool:
        """Whether ``value`` satisfies the clause (NaN never does)."""
        if self.closed:
            return bool(self.low <= value <= self.high)
        return bool(self.low < value < self.high)

    def judge(self, interval: uncertainty.Interval) -> bool | None:
        """True when the clause holds over all of ``interval``, False when nowhere in it, None otherwise."""
        if not interval.known:
            return None
        if self.holds(interval.low) and self.holds(interval.high):
            return True
        below = interval.high < self.low or (not self.closed and interval.high == self.low)
        above = interval.low > self.high or (not self.closed and interval.low == self.high)
        return False if below or above else None


@dataclass
class Check:
    """One prediction: what it says, what was measured, the rule and the verdict."""

    number: int
    prediction: str
    measured: dict[str, float] = field(default_factory=dict)
    summary: str = ""  # the measured number(s) in one line
    rule: str = ""  # when the run counts as agreeing
    agrees: bool | None = None  # the rule on the point estimates; None: not measurable from these tables
    conditions: list[Condition] = field(default_factory=list)  # the rule, clause by clause
    intervals: dict[str, uncertainty.Interval] = field(default_factory=dict)  # bootstrap interval per judged key

    def decide(self) -> None:
        """Set ``agrees`` from the conditions on the point estimates."""
        self.agrees = all(c.holds(self.measured[c.key]) for c in self.conditions)

    @property
    def interval_verdict(self) -> bool | None:
        """The rule on the intervals: True (every clause holds throughout), False (one fails throughout), None."""
        return self.judge_clauses(self.conditions)

    def judge_clauses(self, conditions: list[Condition]) -> bool | None:
        """``conditions`` (some of the rule's clauses) on their intervals, combined as :attr:`interval_verdict` does."""
        states = [c.judge(self.intervals.get(c.key, uncertainty.Interval(math.nan, math.nan))) for c in conditions]
        if any(state is False for state in states):
            return False
        return True if states and all(states) else None

    @property
    def verdict(self) -> str:
        """``agrees`` / ``disagrees`` / ``undetermined`` (from the intervals) or ``not measured``.

        Without intervals (none computed), the point verdict: ``agrees`` / ``disagrees``.
        """
        if self.agrees is None:
            return "not measured"
        if not self.intervals:
            return "agrees" if self.agrees else "disagrees"
        return {True: "agrees", False: "disagrees", None: "undetermined"}[self.interval_verdict]

    def with_interval(self, key: str, fmt: str = "+.3f") -> str:
        """``value [low, high]`` of a measured key (the value alone when it has no interval)."""
        text = format(self.measured[key], fmt)
        interval = self.intervals.get(key)
        return f"{text} {interval.format(fmt)}" if interval is not None and interval.known else text

    def intervals_text(self) -> str:
        """The judged keys' intervals, ``key [low, high]; ...``."""
        return "; ".join(f"{c.key} {self.intervals[c.key]}" for c in self.conditions if c.key in self.intervals)


# --- the per-client rows of the run folders, for the bootstrap over clients -----------------
#: Metric of the sweep tables -> the ``clients.csv`` columns it needs and how to compute it per client
#: (the table's value is the ``p``-weighted mean of this over the clients of each round).
CLIENT_METRICS = {
    "relative-gradient-drift-mean": (("relative-gradient-drift",), lambda rows: rows["relative-gradient-drift"]),
    "gradient-drift-mean": (("gradient-drift",), lambda rows: rows["gradient-drift"]),
    "effective-smoothness-mean": (("gradient-drift", "param-distance"),
                                  lambda rows: rows["gradient-drift"] / rows["param-distance"]),
    "effective-smoothness-lr-mean": (("gradient-drift", "param-distance"),
                                     lambda rows: rows["effective-learning-rate"] * rows["gradient-drift"]
                                     / rows["param-distance"]),
    "model-divergence": (("param-distance",), lambda rows: rows["param-distance"] ** 2),
    "activation-flips-local": (("activation-flips-local",), lambda rows: rows["activation-flips-local"]),
    "nonlinear-drift-fraction-mean": (("nonlinear-drift-fraction",), lambda rows: rows["nonlinear-drift-fraction"]),
}


def run_units(cells: pd.DataFrame, x: str, y: str, clients: pd.DataFrame | None, first: bool = False
           ) -> dict[float, list[uncertainty.Unit]]:
    """Design point -> the runs' units of ``y``: a :class:`~fedavg_relu.experiments.uncertainty.ClientPanel`
    when ``clients`` holds the cell's per-client rows with the columns ``y`` needs and ``y`` is a per-client
    mean (:data:`CLIENT_METRICS`), else the cell's value.

    ``first``: round 1 only (the ``"first"`` reducer), else rounds >= 1 (``"mean"``).
    """
    groups: dict[float, list[uncertainty.Unit]] = {}
    by_cell = dict(tuple(clients.groupby("cell-id"))) if clients is not None and y in CLIENT_METRICS else {}
    for _, cell in cells.iterrows():
        rows = by_cell.get(cell["cell-id"])
        unit: uncertainty.Unit
        needed, per_client = CLIENT_METRICS.get(y, ((), None))
        if per_client is not None and rows is not None and len(rows) and all(column in rows for column in needed):
            rows = rows[rows["round"] == 1] if first else rows[rows["round"] >= 1]
            rows = rows.assign(**{"effective-learning-rate": float(cell.get("effective-learning-rate", math.nan))})
            values = per_client(rows).astype(float)
            table = pd.DataFrame({"round": rows["round"], "client": rows["client"], "v": values,
                                  "n": rows["num-examples"].astype(float)})
            v = table.pivot_table(index="round", columns="client", values="v", aggfunc="first")
            n = table.pivot_table(index="round", columns="client", values="n", aggfunc="first").reindex_like(v)
            unit = uncertainty.ClientPanel(v.to_numpy(float), np.nan_to_num(n.to_numpy(float)))
        else:
            unit = float(pd.to_numeric(pd.Series([cell.get(y)]), errors="coerce").iloc[0])
        groups.setdefault(float(cell[x]), []).append(unit)
    return groups


def _slope_interval(cells: pd.DataFrame, x: str, y: str, clients: pd.DataFrame | None, name: str,
                    first: bool = False) -> uncertainty.Interval:
    return uncertainty.bootstrap_loglog_slope(run_units(cells, x, y, clients, first), name)


def _group(table: pd.DataFrame, group: str) -> pd.DataFrame:
    return table[table["group"] == group] if "group" in table.columns else table.iloc[0:0]


def _slope(cells: pd.DataFrame, x: str, y: str) -> float:
    stats = seed_stats(cells, x, y, log=True)
    return fit_loglog_slope(stats[x], stats["center"]).slope


def check_linear_convergence(metrics: pd.DataFrame, clients: pd.DataFrame | None = None) -> Check:
    """1. log F(W^r) is close to a straight line in r for wide networks.

    Fit ``log F`` (seed-mean of log) over rounds 1..R per width; rho = exp(slope).
    Also the widest width's per-round ratio over the first and the last third of
    the rounds (``rho-early`` = (F(1 + k)/F(1))^(1/k), ``rho-late`` =
    (F(R)/F(R - k))^(1/k), k = R // 3): equal for an exactly straight line.
    Rule: at the widest width rho < 1 and r2 >= 0.95. Intervals: the widest width's
    seeds drawn with replacement, the line refitted to the mean of their log F.
    """
    check = Check(1, "For wide networks the global loss decays linearly: log F(W^r) is close to a straight line in r.",
                  rule="widest width: fitted per-round ratio rho < 1 and r² >= 0.95 of the log-linear fit (rounds 1..R)")
    data = with_loss_curve(_group(metrics, WIDTH_GROUP))
    if not len(data):
        return check
    fits = {}
    for width, frame in data.groupby("width"):
        stats = seed_stats(frame[frame["round"] >= 1], "round", "train-objective", log=True)
        fits[int(width)] = fit_linear_rate(stats["round"], stats["center"])
    widest, narrowest = max(fits), min(fits)
    f, g = fits[widest], fits[narrowest]
    curve = seed_stats(data[data["width"] == widest], "round", "train-objective", log=True).set_index("round")["center"]
    last, k = int(curve.index.max()), max(1, int(curve.index.max()) // 3)
    early = (curve[1 + k] / curve[1]) ** (1 / k) if 1 + k in curve.index else math.nan
    late = (curve[last] / curve[last - k]) ** (1 / k) if last - k >= 1 else math.nan
    check.measured = {"rho-widest": f.rate, "r2-widest": f.r2, "rho-narrowest": g.rate, "r2-narrowest": g.r2,
                      "width-widest": widest, "width-narrowest": narrowest, "rho-early": early, "rho-late": late}
    for width, fit in fits.items():
        check.measured[f"rho/m={width}"] = fit.rate
        check.measured[f"r2/m={width}"] = fit.r2
    check.summary = (f"m={widest}: rho={f.rate:.3f} per round, r²={f.r2:.3f} (per-round ratio {early:.3f} over "
                     f"rounds 1-{1 + k}, {late:.3f} over rounds {last - k}-{last}); "
                     f"m={narrowest}: rho={g.rate:.3f}, r²={g.r2:.3f}")
    check.conditions = [Condition("rho-widest", high=1.0), Condition("r2-widest", low=0.95, high=math.inf, closed=True)]
    check.decide()
    widest_rows = data[(data["width"] == widest) & (data["round"] >= 1)]
    curves = widest_rows.pivot_table(index="seed", columns="round", values="train-objective", aggfunc="first")
    rho, r2 = uncertainty.bootstrap_curve_fit(curves.to_numpy(float), curves.columns.to_numpy(float), "1/rho-r2")
    check.intervals = {"rho-widest": rho, "r2-widest": r2}
    return check


def _width_cells(metrics: pd.DataFrame) -> pd.DataFrame:
    return per_cell(_group(metrics, WIDTH_GROUP), {
        "distance-from-init": "final", "relative-distance-from-init": "final", "activation-flips-init": "final",
        "activation-flips-local": "mean", "relative-gradient-drift-mean": "mean", "effective-smoothness-mean": "mean",
        "effective-smoothness-lr-mean": "mean", "nonlinear-drift-fraction-mean": "mean", "ntk-change": "final",
        "effective-learning-rate": "final",
    })


def _recorded(cells: pd.DataFrame, column: str) -> bool:
    return column in cells and pd.to_numeric(cells[column], errors="coerce").notna().any()


def check_distance(metrics: pd.DataFrame, clients: pd.DataFrame | None = None) -> Check:
    """2. ‖W^R − W^0‖ falls with width with log-log slope near −1/2. Rule: slope in [−0.7, −0.3]."""
    check = Check(2, "Distance from initialization falls with width, log-log slope near −1/2 (absolute distance).",
                  rule="slope of log ‖W^R − W^0‖ vs log m in [−0.7, −0.3]")
    cells = _width_cells(metrics)
    if not len(cells):
        return check
    slope = _slope(cells, "width", "distance-from-init")
    rel = _slope(cells, "width", "relative-distance-from-init")
    check.measured = {"slope": slope, "slope-relative": rel}
    check.summary = f"slope {slope:+.3f} (relative distance ‖W^R − W^0‖/‖W^0‖: {rel:+.3f})"
    check.conditions = [Condition("slope", -0.7, -0.3, closed=True)]
    check.decide()
    check.intervals = {"slope": _slope_interval(cells, "width", "distance-from-init", clients, "2/slope")}
    return check


def check_flips(metrics: pd.DataFrame, clients: pd.DataFrame | None = None) -> Check:
    """3. Activation flips fall with width. Rule: both flip slopes < −0.1."""
    check = Check(3, "Activation flips fall with width.",
                  rule="log-log slopes of flips (W^R vs W^0, and W_k vs W^{r+1}) vs m both < −0.1")
    cells = _width_cells(metrics)
    if not len(cells):
        return check
    init = _slope(cells, "width", "activation-flips-init")
    local = _slope(cells, "width", "activation-flips-local")
    check.measured = {"slope-init": init, "slope-local": local}
    check.summary = f"flips vs W^0: slope {init:+.3f}; flips W_k vs W^{{r+1}}: slope {local:+.3f}"
    check.conditions = [Condition("slope-init", high=-0.1), Condition("slope-local", high=-0.1)]
    check.decide()
    check.intervals = {"slope-init": _slope_interval(cells, "width", "activation-flips-init", clients, "3/init"),
                       "slope-local": _slope_interval(cells, "width", "activation-flips-local", clients, "3/local")}
    return check


def check_drift_smoothness(metrics: pd.DataFrame, clients: pd.DataFrame | None = None) -> Check:
    """4. Relative drift does not fall with m; smoothness grows ∝ m; η × smoothness stays bounded.

    Rule: relative-drift slope > −0.15, smoothness slope in [0.7, 1.3], η·smoothness |slope| < 0.15.
    When the width group recorded the nonlinear drift fraction (``drift-nonlinear=true``), the
    prediction's first sentence is tested too: its slope (mean over rounds of the p-weighted
    mean) must be < −0.1, the same bar as the flips of prediction 3. Without it, the
    non-linear part is reported as not measured.
    """
    check = Check(4, "The raw relative drift is set by η̃τ, not width (does not fall with m); the effective "
                     "smoothness grows with the kernel's scale (∝ m); times η it stays bounded. "
                     "(The non-linear part of the drift, optional in THEORY.md, is not measured.)",
                  rule="slopes vs m: relative drift > −0.15; smoothness in [0.7, 1.3]; η × smoothness within ±0.15")
    cells = _width_cells(metrics)
    if not len(cells):
        return check
    drift = _slope(cells, "width", "relative-gradient-drift-mean")
    smooth = _slope(cells, "width", "effective-smoothness-mean")
    smooth_lr = _slope(cells, "width", "effective-smoothness-lr-mean")
    check.measured = {"slope-relative-drift": drift, "slope-smoothness": smooth, "slope-smoothness-lr": smooth_lr}
    check.summary = (f"slopes: relative drift {drift:+.3f}, effective smoothness {smooth:+.3f}, "
                     f"η × smoothness {smooth_lr:+.3f}")
    check.conditions = [Condition("slope-relative-drift", low=-0.15), Condition("slope-smoothness", 0.7, 1.3, closed=True),
                        Condition("slope-smoothness-lr", -0.15, 0.15)]
    check.intervals = {
        key: _slope_interval(cells, "width", metric, clients, f"4/{key}")
        for key, metric in (("slope-relative-drift", "relative-gradient-drift-mean"),
                            ("slope-smoothness", "effective-smoothness-mean"),
                            ("slope-smoothness-lr", "effective-smoothness-lr-mean"))
    }
    if _recorded(cells, "nonlinear-drift-fraction-mean"):
        nonlinear = _slope(cells, "width", "nonlinear-drift-fraction-mean")
        check.prediction = ("The non-linear part of the gradient drift falls with width; the raw relative drift is "
                            "set by η̃τ, not width (does not fall with m); the effective smoothness grows with the "
                            "kernel's scale (∝ m); times η it stays bounded.")
        check.rule = "slopes vs m: nonlinear drift fraction < −0.1; " + check.rule.removeprefix("slopes vs m: ")
        check.measured["slope-nonlinear-fraction"] = nonlinear
        check.summary = f"slopes: nonlinear drift fraction {nonlinear:+.3f}, " + check.summary.removeprefix("slopes: ")
        check.conditions.insert(0, Condition("slope-nonlinear-fraction", high=-0.1))
        check.intervals["slope-nonlinear-fraction"] = _slope_interval(
            cells, "width", "nonlinear-drift-fraction-mean", clients, "4/slope-nonlinear-fraction")
    check.decide()
    return check


def check_ntk_change(metrics: pd.DataFrame, clients: pd.DataFrame | None = None) -> Check:
    """7. The relative NTK change after R rounds falls with width, log-log slope near −1/2.

    ``ntk-change`` at the last round (held-out probe set, trace over outputs), seeds
    averaged in log space per width. Rule: slope in [−0.7, −0.3], the band of prediction 2.
    The kernel is the server's (one value per run): its interval draws seeds only.
    """
    check = Check(7, "The tangent kernel moves less in wider networks: the relative NTK change after a fixed number "
                     "of rounds falls with width (lazy training: log-log slope near −1/2).",
                  rule="slope of log ‖Θ(W^R) − Θ(W^0)‖_F/‖Θ(W^0)‖_F vs log m in [−0.7, −0.3]")
    cells = _width_cells(metrics)
    if not len(cells) or not _recorded(cells, "ntk-change"):
        return check
    slope = _slope(cells, "width", "ntk-change")
    check.measured = {"slope": slope}
    check.summary = f"slope {slope:+.3f}"
    check.conditions = [Condition("slope", -0.7, -0.3, closed=True)]
    check.decide()
    check.intervals = {"slope": _slope_interval(cells, "width", "ntk-change", None, "7/slope")}
    return check


def check_local_steps(metrics: pd.DataFrame, clients: pd.DataFrame | None = None) -> Check:
    """5. More τ: lower loss per round, less progress per local step, divergence and drift grow (sub-linearly).

    Measured: final loss ratio (τ_max vs τ_min at the last round); loss after a
    common budget of T = R·τ_min local steps, at τ_max vs τ_min; log-log slopes
    vs τ of divergence and drift in round 1 (where every τ starts from the same
    W^0; later rounds start from models that more τ has already trained further,
    with smaller gradients); the slope of √divergence between the two largest τ
    (sub-linear: < 1).
    Rule: loss per round falls (ratio < 1), loss per step rises (ratio > 1),
    divergence and drift slopes > 0.
    """
    check = Check(5, "More local steps τ buy lower loss per round but less progress per local step; "
                     "divergence and drift grow with τ (sub-linearly at large τ).",
                  rule="F_R(τ_max)/F_R(τ_min) < 1; F(T steps)(τ_max)/F(T steps)(τ_min) > 1; "
                       "divergence and drift log-log slopes vs τ > 0")
    data = with_loss_curve(_group(metrics, TAU_GROUP))
    if not len(data):
        return check
    parts = []
    for lr, frame in data.groupby("learning-rate"):
        measured, text, intervals = _tau_tradeoff(frame, clients, f"lr={lr:g}")
        check.measured.update({f"{k}/lr={lr:g}": v for k, v in measured.items()})
        check.intervals.update({f"{k}/lr={lr:g}": v for k, v in intervals.items()})
        check.conditions += [Condition(f"loss-ratio-per-round/lr={lr:g}", high=1.0),
                             Condition(f"loss-ratio-per-step/lr={lr:g}", low=1.0),
                             Condition(f"slope-divergence/lr={lr:g}", low=0.0),
                             Condition(f"slope-drift/lr={lr:g}", low=0.0)]
        parts.append(f"η̃={lr:g}: {text}")
    check.summary = " | ".join(parts)
    check.rule += " (at every learning rate of the sweep)"
    check.decide()
    return check


def _tau_tradeoff(data: pd.DataFrame, clients: pd.DataFrame | None = None, name: str = ""
                  ) -> tuple[dict[str, float], str, dict[str, uncertainty.Interval]]:
    """Prediction 5's numbers at one learning rate (``data``: one τ sweep with ``train-objective``), and the
    intervals of the four judged ones (``name`` seeds them)."""
    taus = sorted(int(t) for t in data["local-steps"].unique())
    tmin, tmax = taus[0], taus[-1]
    rounds = int(data["round"].max())
    budget = rounds * tmin

    def losses(tau: int, rnd: int) -> list[uncertainty.Unit]:
        return [float(v) for v in data[(data["local-steps"] == tau) & (data["round"] == rnd)]["train-objective"]]

    def loss_at(tau: int, rnd: int) -> float:
        return float(np.exp(np.log(losses(tau, rnd)).mean()))

    per_round = loss_at(tmax, rounds) / loss_at(tmin, rounds)
    per_step = loss_at(tmax, budget // tmax) / loss_at(tmin, budget // tmin) if budget % tmax == 0 else math.nan
    cells = per_cell(data, {"model-divergence": "first", "relative-gradient-drift-mean": "first",
                            "gradient-drift-mean": "first"})
    div = _slope(cells, "local-steps", "model-divergence")
    drift = _slope(cells, "local-steps", "gradient-drift-mean")
    rel = _slope(cells, "local-steps", "relative-gradient-drift-mean")
    stats = seed_stats(cells, "local-steps", "model-divergence", log=True)
    top = stats.tail(2)
    tail = fit_loglog_slope(top["local-steps"], np.sqrt(top["center"])).slope if len(top) == 2 else math.nan
    measured = {"loss-ratio-per-round": per_round, "loss-ratio-per-step": per_step, "budget-steps": budget,
                "slope-divergence": div, "slope-drift": drift, "slope-relative-drift": rel,
                "slope-distance-largest-tau": tail, "tau-min": tmin, "tau-max": tmax}
    text = (f"F after {rounds} rounds τ={tmax}/τ={tmin} = {per_round:.3f}; F after {budget} local steps "
            f"τ={tmax}/τ={tmin} = {per_step:.3f}; round-1 slopes vs τ: divergence {div:+.2f}, drift {drift:+.2f} "
            f"(relative {rel:+.2f}); ‖W_k − W‖ slope between the two largest τ {tail:+.2f}")
    intervals = {
        "loss-ratio-per-round": uncertainty.bootstrap_ratio(losses(tmax, rounds), losses(tmin, rounds),
                                                            f"5/{name}/per-round"),
        "slope-divergence": _slope_interval(cells, "local-steps", "model-divergence", clients, f"5/{name}/div", True),
        "slope-drift": _slope_interval(cells, "local-steps", "gradient-drift-mean", clients, f"5/{name}/drift", True),
    }
    if budget % tmax == 0:
        intervals["loss-ratio-per-step"] = uncertainty.bootstrap_ratio(
            losses(tmax, budget // tmax), losses(tmin, budget // tmin), f"5/{name}/per-step")
    return measured, text, intervals


def check_central_gap(cells: pd.DataFrame) -> Check:
    """6. Non-IID: ‖W_fed − W_central‖ shrinks with width (≈ m^-1/2); relative distance and loss gap need not.

    Rule: absolute-distance slope < −0.25 (the side THEORY.md predicts firmly);
    the relative distance's and the loss gap's slopes are reported as found.
    """
    check = Check(6, "Under a non-IID partition the parameter distance between FedAvg and centralized GD "
                     "(same W^0, same total local steps) shrinks with width (Jian & Liu: O(m^-1/2)); relative to "
                     "the distance moved it need not shrink, and the loss gap is set by η, τ and heterogeneity.",
                  rule="slope of log ‖W_fed − W_central‖ vs log m < −0.25; the other two reported")
    data = _group(cells, NONIID_GROUP)
    if not len(data) or "central-distance" not in data:
        return check
    dist = _slope(data, "width", "central-distance")
    rel = _slope(data, "width", "central-distance-relative")
    gap = _slope(data, "width", "loss-gap")
    widths = sorted(data["width"].unique())
    gap_mean = data.groupby("width")["loss-gap"].mean()
    ratio = float(gap_mean[widths[-1]] / gap_mean[widths[0]])
    check.measured = {"slope-distance": dist, "slope-relative-distance": rel, "slope-loss-gap": gap,
                      "loss-gap-ratio-widest-narrowest": ratio}
    check.summary = (f"slopes vs m: ‖W_fed − W_c‖ {dist:+.3f}, relative {rel:+.3f}, loss gap {gap:+.3f} "
                     f"(loss gap m={widths[-1]} / m={widths[0]} = {ratio:.2f})")
    check.conditions = [Condition("slope-distance", high=-0.25)]
    check.decide()
    check.intervals = {"slope-distance": _slope_interval(data, "width", "central-distance", None, "6/slope-distance")}
    return check


def check_all(metrics: pd.DataFrame, cells: pd.DataFrame, clients: pd.DataFrame | None = None) -> list[Check]:
    """The checks in order: the six of THEORY.md's first list, and 7 when the width group recorded ``ntk-change``.

    ``clients``: the run folders' per-client rows with a ``cell-id`` column
    (:func:`fedavg_relu.experiments.clients.read_client_tables`); with them the intervals
    of per-client means draw clients too, without them only seeds.
    """
    checks = [
        check_linear_convergence(metrics, clients), check_distance(metrics, clients), check_flips(metrics, clients),
        check_drift_smoothness(metrics, clients), check_local_steps(metrics, clients), check_central_gap(cells),
    ]
    if _recorded(_group(metrics, WIDTH_GROUP), "ntk-change"):
        checks.append(check_ntk_change(metrics, clients))
    return checks


def checks_table(checks: list[Check]) -> pd.DataFrame:
    """One row per prediction: number, measured summary, intervals, rule, verdict."""
    return pd.DataFrame([{"prediction": c.number, "measured": c.summary, "intervals": c.intervals_text(),
                          "rule": c.rule, "verdict": c.verdict} for c in checks])


def checks_markdown(checks: list[Check]) -> str:
    """A Markdown table of the checks (for the README / the closing note)."""
    lines = ["| # | prediction | measured | 95 % intervals | verdict |", "| --- | --- | --- | --- | --- |"]
    for c in checks:
        lines.append(f"| {c.number} | {c.prediction} | {c.summary} | {c.intervals_text() or '—'} | {c.verdict} |")
    return "\n".join(lines) + "\n"
