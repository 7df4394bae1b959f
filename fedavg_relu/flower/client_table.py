"""A packed cohort's per-client table as MetricRecord lists, and back.

A node that simulates many clients sends its per-client rows (the columns of
:func:`fedavg_relu.core.metrics.client_row`) as one list per column in its drift
reply's MetricRecord, under :data:`fedavg_relu.flower.schema.CLIENT_IDS` and
``CLIENT_PREFIX + column``: a few floats per client, in one message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fedavg_relu.core.metrics import CLIENT_COLUMNS, ClientDrift, client_row
from fedavg_relu.flower.schema import CLIENT_IDS, CLIENT_PREFIX


def client_row_lists(
    client_ids: Sequence[int], drifts: Sequence[ClientDrift], loss_before: Sequence[float],
    local_steps: Sequence[float], nonlinear: bool,
) -> dict[str, list]:
    """A cohort's per-client rows as one list per column (``client/ids``, ``client/<column>``) for a MetricRecord.

    The columns are :func:`fedavg_relu.core.metrics.client_row`'s, so the packed and the
    standard path write the same table; a few floats per client, in one message.
    """
    rows = [client_row(d, b, t, nonlinear) for d, b, t in zip(drifts, loss_before, local_steps, strict=True)]
    out: dict[str, list] = {CLIENT_IDS: [int(k) for k in client_ids]}
    for column in CLIENT_COLUMNS:
        if rows and column in rows[0]:
            out[CLIENT_PREFIX + column] = [float(r[column]) for r in rows]
    return out


def client_rows_from_lists(values: Mapping[str, object]) -> list[dict[str, float]]:
    """Inverse of :func:`client_row_lists`: rows ``{"client": id, <column>: value}``; ``[]`` without ``client/ids``.

    Raises ``ValueError`` when a list's length differs from the ids' or a value is not a number.
    """
    if CLIENT_IDS not in values:
        return []
    ids = list(values[CLIENT_IDS])  # type: ignore[call-overload]
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in ids):
        raise ValueError("client/ids: expected a list of integers")
    rows: list[dict[str, float]] = [{"client": k} for k in ids]
    for column in CLIENT_COLUMNS:
        key = CLIENT_PREFIX + column
        if key not in values:
            continue
        column_values = list(values[key])  # type: ignore[call-overload]
        if len(column_values) != len(ids):
            raise ValueError(f"{key}: {len(column_values)} values for {len(ids)} clients")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in column_values):
            raise ValueError(f"{key}: expected numbers")
        for row, value in zip(rows, column_values, strict=True):
            row[column] = int(value) if column in ("num-examples", "local-steps") and float(value).is_integer() else float(value)
    return rows
