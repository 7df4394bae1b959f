"""Every message type and record key that crosses the wire, in one place.

The strategies (server side) and the ClientApp handlers (node side) both import
their names from here, so a key can never be spelt two ways. Record and config
keys are kebab-case; message types are Flower's ``<category>.<action>`` with an
identifier as the action (Flower requires it).

The two functions at the end encode a packed cohort's per-client table as
MetricRecord lists and decode it again.

This module does not import flwr.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fedavg_relu.core.metrics import CLIENT_COLUMNS, ClientDrift, client_row

# --- message types -------------------------------------------------------------------
TRAIN = "train"  # one node = one client: W^r -> W_k
DRIFT = "query.drift"  # W^{r+1} -> drift scalars (+ gradient at W^{r+1})
PACKED_TRAIN = "train.packed"  # one node = a cohort of virtual clients
PACKED_DRIFT = "query.packed_drift"  # W^{r+1} -> the cohort's DriftSums (+ sum_k n_k grad)
COHORT = "query.cohort"  # which virtual clients does this node hold?

# --- records of a message's RecordDict -------------------------------------------------
ARRAYS = "arrays"  # the model (ArrayRecord)
CONFIG = "config"  # the round's instructions (ConfigRecord)
METRICS = "metrics"  # a reply's scalars (MetricRecord)
GRADIENT = "gradient"  # drift reply: grad f_k(W^{r+1}) (ArrayRecord)
GRADIENT_SUM = "gradient-sum"  # packed drift reply: sum_k n_k grad f_k(W^{r+1}), float64

# --- ConfigRecord keys (server -> node) --------------------------------------------------
SERVER_ROUND = "server-round"
LEARNING_RATE = "learning-rate"
LOCAL_STEPS = "local-steps"
BATCH_SIZE = "batch-size"
MOMENTUM = "momentum"
WEIGHT_DECAY = "weight-decay"
LOCAL_EPOCHS = "local-epochs"
PROXIMAL_MU = "proximal-mu"  # FedProx sends it
KEEP_LOCAL_MODEL = "keep-local-model"  # a drift exchange follows: keep W_k until then
MEASURED_ROUND = "measured-round"  # the node measured f_k at exactly this W^r in that round's drift exchange
RETURN_GRADIENT = "return-gradient"  # drift: also send grad f_k(W^{r+1})
DRIFT_NONLINEAR = "drift-nonlinear"  # drift: also measure the nonlinear drift fraction (fedavg_relu.core.mechanism)
CLIENT_METRICS = "client-metrics"  # drift: also report the per-client row (partition id; packed: client/* lists)
VIRTUAL_CLIENTS = "virtual-clients"  # packed: which of the node's virtual clients train this round
CLIENTS_PER_NODE = "clients-per-node"  # packed: virtual clients per node, as the server decided
NUM_PARTITIONS = "num-partitions"  # packed: virtual clients in the whole federation

# --- MetricRecord keys of a train reply (node -> server) -----------------------------------
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
LOSS_BEFORE = "loss-before"
TRAIN_METRIC_KEYS = frozenset({NUM_EXAMPLES, TRAIN_LOSS, LOSS_BEFORE, LOCAL_STEPS})

# --- MetricRecord keys of a drift reply (node -> server), besides ClientDrift.to_metrics() ----
PARTITION_ID = "partition-id"  # standard path: the node's partition id (with client-metrics; absent without one)
CLIENT_PREFIX = "client/"  # packed: one list per per-client column, "client/<column>", clients in "client/ids" order
CLIENT_IDS = "client/ids"  # packed: the virtual clients (partition ids) of the lists

# --- cohort reply ------------------------------------------------------------------------
FIRST_CLIENT = "first-client"
NUM_CLIENTS = "num-clients"

# --- SCAFFOLD: control variates travel inside the model's ArrayRecord -----------------------
SCAFFOLD_CONTROL_PREFIX = "scaffold-c/"  # server control variate c (server -> node)
SCAFFOLD_DELTA_PREFIX = "scaffold-dc/"  # dc_k = c_k+ - c_k (node -> server)


# --- the per-client table, as lists --------------------------------------------------------
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
