"""Per-client drift in a sweep: who drifts, by width, and who makes the mean.

Every run folder of a sweep holds ``clients.csv`` (one row per round and client,
:func:`fedavg_relu.core.metrics.client_row`'s columns). These functions gather the
rows of a sweep's cells, say how much of the round's mean drift each client makes,
and draw the distribution by width. Notebook 01's per-client section uses them.

The round's mean relative drift is p-weighted, ``D = sum_k p_k d_k`` with
``p_k = n_k / sum_j n_j`` (``relative-gradient-drift-mean`` in ``metrics.jsonl``);
client k's share of it is ``p_k d_k / D``. The shares of a round add up to 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .plots import config_caption, new_figure

#: The cell columns copied onto every client row (what a figure or table groups by).
CELL_COLUMNS = ("group", "cell-id", "width", "seed", "partitioner", "dirichlet-alpha", "num-partitions", "local-steps")


def read_client_tables(sweep_dir: str | Path, cells: pd.DataFrame) -> pd.DataFrame:
    """Every cell's ``clients.csv`` under ``sweep_dir`` (``cells``' ``run-dir``), with the cell's columns.

    A cell without a per-client table (``client-metrics=false``, or a run folder
    not kept) contributes no rows. Raises ``FileNotFoundError`` when no cell has one.
    """
    frames = []
    for _, cell in cells.iterrows():
        path = Path(sweep_dir) / str(cell["run-dir"]) / "clients.csv"
        if not path.exists():
            continue
        frame = pd.read_csv(path)
        for column in CELL_COLUMNS:
            if column in cell:
                frame[column] = cell[column]
        frames.append(frame)
    if not frames:
        raise FileNotFoundError(f"no clients.csv under {sweep_dir}/runs: run the sweep with client-metrics=true")
    return pd.concat(frames, ignore_index=True)


def drift_shares(clients: pd.DataFrame, column: str = "relative-gradient-drift") -> pd.DataFrame:
    """``clients`` plus ``p`` (n_k / sum n_j in its round) and ``share`` (p_k d_k / sum_j p_j d_j) of ``column``.

    Rows are grouped by (cell, round). A round whose clients all have zero drift
    gets NaN shares (nobody makes a zero mean).
    """
    out = clients.copy()
    keys = ["cell-id", "round"]
    n = out["num-examples"].astype(float)
    out["p"] = n / n.groupby([out[k] for k in keys]).transform("sum")
    weighted = out["p"] * out[column].astype(float)
    total = weighted.groupby([out[k] for k in keys]).transform("sum")
    out["share"] = weighted / total.where(total > 0)
    return out


def dominant_clients(shares: pd.DataFrame, by: Sequence[str] = ("width",)) -> pd.DataFrame:
    """For each value of ``by``: the client with the largest share of the mean drift, over all rounds and seeds.

    Columns: ``by``, ``client``, ``share`` (its mean share over the rounds),
    ``p`` (its mean data share), ``drift/mean`` (its mean drift over the round's
    p-weighted mean), and ``top-share`` (how often it had the largest share of a round).
    """
    rows = []
    for key, frame in shares.groupby(list(by)):
        per_client = frame.groupby("client").agg(share=("share", "mean"), p=("p", "mean"))
        per_client["drift/mean"] = per_client["share"] / per_client["p"]
        tops = frame.loc[frame.groupby(["cell-id", "round"])["share"].idxmax(), "client"]
        top = per_client["share"].idxmax()
        row = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
        row.update(client=int(top), share=float(per_client.loc[top, "share"]), p=float(per_client.loc[top, "p"]),
                   **{"drift/mean": float(per_client.loc[top, "drift/mean"]), "top-share": float((tops == top).mean())})
        rows.append(row)
    return pd.DataFrame(rows)


def size_ranks(rows: pd.DataFrame) -> pd.Series:
    """Each row's client's rank in data size within its run: 1 for the most examples (ties: lower index first)."""
    sizes = rows.groupby(["cell-id", "client"])["num-examples"].first().reset_index()
    sizes = sizes.sort_values(["cell-id", "num-examples", "client"], ascending=[True, False, True])
    sizes["rank"] = sizes.groupby("cell-id").cumcount() + 1
    ranks = sizes.set_index(["cell-id", "client"])["rank"]
    return pd.Series(ranks.reindex(pd.MultiIndex.from_frame(rows[["cell-id", "client"]])).to_numpy(), index=rows.index)


def plot_client_drift_by_width(clients: pd.DataFrame, cells: pd.DataFrame, title: str,
                               column: str = "relative-gradient-drift") -> Figure:
    """Left: every client's ``column`` over rounds, clients and seeds, by width (a box per width; each
    run's clients' means over rounds as points; log scale). Right: the mean share of the round's mean
    drift of the client with the most data in its run, the second most, and so on, by width.

    Clients are compared by their rank in data size within their run, not by index: with a
    partition per seed, client k of one seed holds other data than client k of another (ties
    in size keep index order). The title names the configuration of ``cells``.
    """
    shares = drift_shares(clients, column)
    widths = sorted(shares["width"].unique())
    fig, (left, right) = new_figure(ncols=2, width=5.4, height=4.2)
    data = [shares.loc[shares["width"] == w, column].to_numpy(float) for w in widths]
    left.boxplot(data, positions=range(len(widths)), widths=0.5, showfliers=False)
    for i, w in enumerate(widths):
        means = shares[shares["width"] == w].groupby(["cell-id", "client"])[column].mean()
        left.scatter(np.full(len(means), i) + np.linspace(-0.15, 0.15, len(means)), means, s=10, zorder=3,
                     alpha=0.7, color="tab:blue")
    left.set_xticks(range(len(widths)), [str(int(w)) for w in widths])
    left.set_yscale("log")
    left.set_xlabel("width m")
    left.set_ylabel("relative drift ‖Δ∇f_k‖ / ‖∇f_k(W̄)‖ per client")
    ranked = shares.assign(rank=size_ranks(shares))
    per = ranked.groupby(["width", "rank"])["share"].mean().unstack("rank")
    bottom = np.zeros(len(per))
    for rank in per.columns:
        label = "most data" if rank == 1 else ("least data" if rank == per.columns.max() else f"rank {rank} in data")
        right.bar(range(len(per)), per[rank].fillna(0).to_numpy(), bottom=bottom, label=label)
        bottom += per[rank].fillna(0).to_numpy()
    right.set_xticks(range(len(per)), [str(int(w)) for w in per.index])
    right.set_xlabel("width m")
    right.set_ylabel("share of the round's mean drift, p_k d_k / Σ p_j d_j", fontsize=8)
    right.legend(fontsize=7, loc="lower right", framealpha=0.9)
    fig.suptitle(f"{title}\n{config_caption(cells, width=int(fig.get_figwidth() * 14))}", fontsize=8.5)
    return fig


def client_figures(sweep_dir: str | Path, cells: pd.DataFrame, out_dir: str | Path,
                   formats: Sequence[str] = ("png", "pdf"), dpi: int = 110, group: str = "non-iid") -> list[Path]:
    """fig8: :func:`plot_client_drift_by_width` of ``group``'s cells into ``out_dir``; return the files.

    Nothing (an empty list) when the sweep has no such group or none of its run
    folders holds a ``clients.csv``.
    """
    from .plots import save_figure

    skewed = cells[cells["group"] == group] if "group" in cells else cells.iloc[:0]
    if not len(skewed):
        return []
    try:
        clients = read_client_tables(sweep_dir, skewed)
    except FileNotFoundError:
        return []
    fig = plot_client_drift_by_width(clients, skewed, "8. Per-client relative drift by width, Dirichlet label skew")
    return save_figure(fig, Path(out_dir) / "fig8_client_drift_by_width", formats, dpi)
