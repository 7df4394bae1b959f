"""Tests of fedavg_relu/flower/schema.py: the names the core produces are the schema's, and the validator's rules."""

from __future__ import annotations

import math

import pytest

from fedavg_relu.core.metrics import ClientDrift, summarize_drift
from fedavg_relu.core.packed import DriftSums
from fedavg_relu.flower import schema as wire


def test_core_names_its_metrics_as_the_schema_does():
    """ClientDrift's and DriftSums' kebab-case fields are exactly the drift and packed-drift specs' fixed keys,
    and every key summarize_drift can produce is one of the schema's round metrics."""
    assert set(wire.field_names(ClientDrift)) == wire.DRIFT_METRICS.keys - {wire.PARTITION_ID}
    assert set(wire.field_names(DriftSums)) == {f.key for f in wire.DRIFT_SUM_FIELDS}
    d = ClientDrift(4, 1.0, 0.5, 2.0, 1.5, 0.3, 0.2, 0.1, 0.0, 0.3)
    assert set(summarize_drift([d, d], 0.1, 1.0)) == set(wire.DRIFT_SUMMARY_METRICS)


@pytest.mark.parametrize(("values", "reason"), [
    ({"a": 1.0}, "metric-keys"),  # b missing
    ({"a": 1.0, "b": 2, "c": 3}, "metric-keys"),  # c unexpected
    ({"a": -0.5, "b": 2}, "metric-bounds"),  # a >= 0
    ({"a": 2.0, "b": 2}, "metric-bounds"),  # a <= the named bound, 1.5
    ({"a": 1.0, "b": 2.5}, "metric-type"),  # b a count
    ({"a": math.nan, "b": 2}, "non-finite-metric"),
    ({"a": [1.0], "b": 2}, "metric-type"),
])
def test_check_metrics_names_the_reason(values, reason):
    """A two-field spec: a number in [0, "limit"] and a count; each kind of violation gets its reason."""
    spec = wire.MetricsSpec("probe", (wire.Field("a", hi="limit"), wire.Field("b", "count")))
    with pytest.raises(wire.Rejected, match=reason):
        wire.check_metrics(spec, values, {"limit": 1.5})
    assert wire.check_metrics(spec, {"a": 1.5, "b": 2.0}, {"limit": 1.5}) == {"a": 1.5, "b": 2.0}


def test_empty_maxima_and_nan_are_allowed_only_where_the_schema_says():
    """-inf is a maximum over no client only while its count is 0; NaN only in fields that allow it."""
    spec = wire.MetricsSpec("probe", (wire.Field("n", "count"), wire.Field("m", empty_max="n"), wire.Field("r", nan=True)))
    assert wire.check_metrics(spec, {"n": 0, "m": -math.inf, "r": math.nan})
    with pytest.raises(wire.Rejected, match="non-finite"):
        wire.check_metrics(spec, {"n": 1, "m": -math.inf, "r": 0.0})
    with pytest.raises(wire.Rejected, match="non-finite"):
        wire.check_metrics(spec, {"n": 0, "m": math.inf, "r": 0.0})


def test_ids_are_unique_and_bounded():
    """An ids list with a repeat is client-ids; an id past its bound is metric-bounds."""
    spec = wire.MetricsSpec("probe", (wire.Field("ids", "ids", hi="top"),))
    with pytest.raises(wire.Rejected, match="client-ids"):
        wire.check_metrics(spec, {"ids": [1, 1]}, {"top": 5})
    with pytest.raises(wire.Rejected, match="metric-bounds"):
        wire.check_metrics(spec, {"ids": [1, 6]}, {"top": 5})
    with pytest.raises(ValueError, match="unknown rejection reason"):
        wire.Rejected("made-up", "")


def test_metric_names_spelt_in_the_experiments_and_the_docs_script_are_the_schemas():
    """Every string constant in fedavg_relu/experiments/ and scripts/render_docs.py that names a round metric
    (by its stem) is one the schema lists (ROUND_METRICS, ROUND_METRIC_PATTERNS), a per-client column
    (core.metrics.CLIENT_COLUMNS) or a column the analyses declare they derive (analysis.DERIVED_COLUMNS):
    a misspelt or renamed metric fails here, not as an empty figure."""
    import ast
    import re
    from pathlib import Path

    from fedavg_relu.core.metrics import CLIENT_COLUMNS
    from fedavg_relu.experiments.analysis import DERIVED_COLUMNS

    stem = re.compile(r"^(gradient-drift|relative-gradient-drift|model-divergence|effective-smoothness|activation-flips|"
                      r"global-loss|local-loss|gradient-dissimilarity|nonlinear-drift-fraction|ntk-change|clients-|"
                      r"loss-before|loss-ratio|distance-from-init|relative-distance-from-init|round-skipped|drift-rejected|"
                      r"test-loss|test-accuracy|lockstep-)[a-z0-9/<>=.-]*$")
    known = [re.compile(p) for p in (*wire.ROUND_METRIC_PATTERNS, *DERIVED_COLUMNS)]
    root = Path(__file__).resolve().parents[1]
    unknown = set()
    for path in [*sorted((root / "fedavg_relu" / "experiments").glob("*.py")), root / "scripts" / "render_docs.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and stem.match(node.value):
                name = node.value
                if name in wire.ROUND_METRICS or name in CLIENT_COLUMNS or any(p.fullmatch(name) for p in known):
                    continue
                unknown.add(f"{path.name}: {name}")
    assert not unknown, sorted(unknown)
    assert "ntk-change-r10" not in wire.ROUND_METRICS and any(p.fullmatch("ntk-change-r10") for p in known)


def test_every_key_a_run_records_is_a_schema_round_metric(tmp_path):
    """A 2-round packed run with lockstep drift (in process): each metrics.jsonl key is in ROUND_METRICS or
    matches one of ROUND_METRIC_PATTERNS."""
    import json
    import re

    from fedavg_relu.runtime.simulation import run_in_process

    run_dir = run_in_process({
        "dataset": "synthetic", "synthetic-num-examples": 120, "num-partitions": 3, "width": 8, "num-server-rounds": 2,
        "clients-per-node": 3, "lockstep-drift-steps": "1", "drift-nonlinear": True, "output-dir": str(tmp_path),
        "run-name": "probe",
    })
    keys = {k for line in (run_dir / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
    patterns = [re.compile(p) for p in wire.ROUND_METRIC_PATTERNS]
    assert sorted(k for k in keys if k not in wire.ROUND_METRICS and not any(p.fullmatch(k) for p in patterns)) == []
