"""Per-client drift in a sweep (fedavg_relu.experiments.clients): shares, dominant clients, the figure."""

from __future__ import annotations

import pandas as pd
import pytest

from fedavg_relu.experiments.clients import dominant_clients, drift_shares, plot_client_drift_by_width, read_client_tables


def _rows():
    """Two rounds of one cell (width 64) with clients 0 (n=1) and 1 (n=3).

    Round 1: d = 0.4, 0.2 -> p = 1/4, 3/4; D = 0.1 + 0.15 = 0.25; shares 0.4 and 0.6.
    Round 2: d = 0.8, 0.0 -> D = 0.2; shares 1.0 and 0.0.
    """
    return pd.DataFrame({
        "cell-id": "a", "width": 64, "round": [1, 1, 2, 2], "client": [0, 1, 0, 1],
        "num-examples": [1, 3, 1, 3], "relative-gradient-drift": [0.4, 0.2, 0.8, 0.0],
    })


def test_shares_are_p_weighted_parts_of_the_round_mean():
    out = drift_shares(_rows())
    assert out["p"].tolist() == pytest.approx([0.25, 0.75, 0.25, 0.75])
    assert out["share"].tolist() == pytest.approx([0.4, 0.6, 1.0, 0.0])
    assert out.groupby("round")["share"].sum().tolist() == pytest.approx([1.0, 1.0])


def test_a_round_without_drift_has_no_shares():
    rows = _rows()
    rows["relative-gradient-drift"] = 0.0
    assert drift_shares(rows)["share"].isna().all()


def test_dominant_client_by_width():
    """Client 0: mean share (0.4 + 1.0) / 2 = 0.7, mean p 0.25, so drift/mean = 2.8; it had the top share
    in round 2 only (round 1's top was client 1 with 0.6): top-share 0.5."""
    top = dominant_clients(drift_shares(_rows()))
    assert top.to_dict("records") == [pytest.approx(
        {"width": 64, "client": 0, "share": 0.7, "p": 0.25, "drift/mean": 2.8, "top-share": 0.5})]


def test_tables_are_read_from_the_run_folders_and_the_figure_names_the_configuration(tmp_path):
    """Two cells, one without clients.csv (skipped); the cell's width and seed land on its rows; the
    figure's title carries the cells' configuration (width varies, dirichlet-alpha=0.1 fixed)."""
    (tmp_path / "runs" / "a").mkdir(parents=True)
    _rows().drop(columns=["cell-id", "width"]).to_csv(tmp_path / "runs" / "a" / "clients.csv", index=False)
    cells = pd.DataFrame({"cell-id": ["a", "b"], "run-dir": ["runs/a", "runs/b"], "width": [64, 128], "seed": [0, 0],
                          "partitioner": "dirichlet", "dirichlet-alpha": 0.1, "group": "non-iid"})
    clients = read_client_tables(tmp_path, cells)
    assert len(clients) == 4 and set(clients["width"]) == {64} and set(clients["cell-id"]) == {"a"}
    fig = plot_client_drift_by_width(clients, cells, "Per-client drift")
    title = fig._suptitle.get_text()
    assert title.startswith("Per-client drift") and "dirichlet-alpha=0.1" in title and "width ∈ {64, 128}" in title
    with pytest.raises(FileNotFoundError, match="client-metrics"):
        read_client_tables(tmp_path, cells.iloc[1:])


def test_client_figure_is_drawn_for_the_skewed_group_only(tmp_path):
    """fig8 from the non-iid cells' clients.csv (PNG written); a sweep without that group, or without any
    per-client table, draws nothing rather than an empty figure."""
    from fedavg_relu.experiments.clients import client_figures

    (tmp_path / "runs" / "a").mkdir(parents=True)
    _rows().drop(columns=["cell-id", "width"]).to_csv(tmp_path / "runs" / "a" / "clients.csv", index=False)
    cells = pd.DataFrame({"cell-id": ["a", "b"], "run-dir": ["runs/a", "runs/b"], "width": [64, 128], "seed": 0,
                          "group": ["non-iid", "width"]})
    paths = client_figures(tmp_path, cells, tmp_path / "figs", formats=("png",), dpi=40)
    assert [p.name for p in paths] == ["fig8_client_drift_by_width.png"] and paths[0].stat().st_size > 1000
    assert client_figures(tmp_path, cells[cells["group"] == "width"], tmp_path / "none", formats=("png",)) == []
    assert client_figures(tmp_path, cells.assign(**{"run-dir": "runs/missing"}), tmp_path / "none", formats=("png",)) == []
    assert not (tmp_path / "none").exists()


def test_size_ranks_compare_clients_by_data_not_by_index():
    """Cell a: n = (1, 3) -> client 1 is rank 1; cell b: n = (4, 2) -> client 0 is rank 1; a tie keeps index order."""
    from fedavg_relu.experiments.clients import size_ranks

    rows = pd.DataFrame({"cell-id": ["a", "a", "a", "b", "b", "c", "c"], "client": [0, 1, 0, 0, 1, 0, 1],
                         "num-examples": [1, 3, 1, 4, 2, 5, 5]})
    assert size_ranks(rows).tolist() == [2, 1, 2, 1, 2, 1, 2]
