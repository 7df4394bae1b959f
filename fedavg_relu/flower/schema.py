"""The one schema of every exchange: message types, record keys, metric names, kinds and bounds.

Every producer and consumer of a message takes its names from here: the strategies
(server side), the ClientApp handlers (node side), the experiments and
``scripts/render_docs.py``. For each reply a :class:`MetricsSpec` lists its fields
with their kind and bounds, and :func:`check_metrics` (the one validator, derived
from the specs) checks a reply's MetricRecord against one. What a bound refers to
(``max-num-examples``, the ``num-examples`` of the node's train reply, the clients a
node was given) is passed in by the caller, who knows the round.

The exchanges of a round (message type: what goes out -> what comes back):

* ``train`` (one client per node): W^r + config -> W_k + :data:`TRAIN_METRICS`;
* ``query.drift``: W^{r+1} -> :data:`DRIFT_METRICS` (+ grad f_k(W^{r+1}) as ``gradient``);
* ``query.cohort`` (packed mode, every round): nothing -> :data:`COHORT_METRICS`;
* ``train.packed``: W^r + config + ``virtual-clients`` -> the cohort's mean model + :data:`TRAIN_METRICS`;
* ``query.packed_drift``: W^{r+1} -> :data:`PACKED_DRIFT_METRICS` (sums, lockstep sums, per-client lists)
  (+ ``gradient-sum``).

This module does not import flwr (the strategies and handlers wrap its results in records).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields as dc_fields

# --- message types -------------------------------------------------------------------
TRAIN = "train"  # one node = one client: W^r -> W_k
DRIFT = "query.drift"  # W^{r+1} -> drift scalars (+ gradient at W^{r+1})
PACKED_TRAIN = "train.packed"  # one node = a cohort of virtual clients
PACKED_DRIFT = "query.packed_drift"  # W^{r+1} -> the cohort's DriftSums (+ sum_k n_k grad)
COHORT = "query.cohort"  # which partition does this node hold? (asked every packed round)

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
VIRTUAL_CLIENTS = "virtual-clients"  # packed: the virtual clients (partition ids) this node trains this round
NUM_PARTITIONS = "num-partitions"  # packed: virtual clients in the whole federation (the server's word)
STATE_KEY = "state-key"  # SCAFFOLD: names the run's client state on the nodes' disks (survives a resume)
CHECKPOINTED_ROUND = "checkpointed-round"  # SCAFFOLD: the last round the server checkpointed (older c_k may go)
STATE_ATTEMPT = "state-attempt"  # SCAFFOLD: this attempt of the run (a resume is a new one)
RESUMED_AFTER = "resumed-after"  # SCAFFOLD: the round this attempt resumed after (0: a fresh run)
FEDNOVA_MOMENTUM = "fednova-momentum"  # FedNova: rho of its normaliser (a packed cohort then replies FedNova's sums)

# --- MetricRecord keys of a train reply (node -> server) -----------------------------------
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
LOSS_BEFORE = "loss-before"
TRAIN_METRIC_KEYS = frozenset({NUM_EXAMPLES, TRAIN_LOSS, LOSS_BEFORE, LOCAL_STEPS})

# --- MetricRecord keys of a drift reply (node -> server) --------------------------------------
PARTITION_ID = "partition-id"  # standard drift reply (with client-metrics) and cohort reply: the node's partition
CLIENT_PREFIX = "client/"  # packed: one list per per-client column, "client/<column>", clients in "client/ids" order
CLIENT_IDS = "client/ids"  # packed: the virtual clients (partition ids) of the lists
LOCKSTEP_STEPS = "lockstep-steps"  # packed: the local steps t at which lockstep sums were recorded
LOCKSTEP_PREFIX = "lockstep-step-"  # packed: "lockstep-step-<t>/<sum>"

# --- SCAFFOLD: control variates travel inside the model's ArrayRecord -----------------------
SCAFFOLD_CONTROL_PREFIX = "scaffold-c/"  # server control variate c (server -> node)
SCAFFOLD_DELTA_PREFIX = "scaffold-dc/"  # dc_k = c_k+ - c_k (node -> server)

# --- round metrics the strategy records (metrics.jsonl) ---------------------------------------
CLIENTS_SAMPLED = "clients-sampled"
CLIENTS_TRAINED = "clients-trained"
CLIENTS_FAILED = "clients-failed"
CLIENTS_REJECTED = "clients-rejected"
CLIENTS_MEASURED = "clients-measured"
CLIENTS_UNMEASURED = "clients-unmeasured"
DRIFT_REJECTED = "drift-rejected"
DRIFT_REJECTED_PREFIX = "drift-rejected-"  # per reason
COHORT_FAILED_NODES = "cohort-failed-nodes"  # packed: nodes whose cohort reply was an error or bad this round
ROUND_SKIPPED = "round-skipped"
DRIFT_SECONDS = "drift-seconds"
LOCKSTEP_NODES = "lockstep-nodes"
COUNT_METRICS = (CLIENTS_SAMPLED, CLIENTS_TRAINED, CLIENTS_FAILED, CLIENTS_REJECTED, CLIENTS_MEASURED,
                 CLIENTS_UNMEASURED, DRIFT_REJECTED, COHORT_FAILED_NODES, ROUND_SKIPPED)
#: The drift summary of a round (fedavg_relu.core.metrics.summarize_drift; tests/test_schema.py keeps them equal).
DRIFT_SUMMARY_METRICS = (
    "global-loss", "local-loss", "model-divergence", "model-divergence-max", "gradient-drift-mean",
    "gradient-drift-max", "relative-gradient-drift-mean", "relative-gradient-drift-max", "activation-flips-local",
    "activation-flips-init", "effective-smoothness-mean", "effective-smoothness-max", "effective-smoothness-lr-mean",
    "effective-smoothness-lr-max", "gradient-dissimilarity", "nonlinear-drift-fraction-mean",
    "nonlinear-drift-fraction-max",
)
#: Every name a run's metrics.jsonl may hold (a user's strategy may add its own): the drift summary, the counts,
#: the train replies' averages and the rest of a round's row.
ROUND_METRICS = frozenset(DRIFT_SUMMARY_METRICS + COUNT_METRICS + (
    "round", TRAIN_LOSS, LOCAL_STEPS, LOSS_BEFORE, "loss-ratio", "distance-from-init", "relative-distance-from-init", "ntk-change",
    "test-loss", "test-accuracy", DRIFT_SECONDS, LOCKSTEP_NODES, "seconds", "elapsed",
))
#: The families of round-metric names (per layer, per reason, per lockstep step).
ROUND_METRIC_PATTERNS = (
    r"(relative-)?distance-from-init/.+", r"rejected-[a-z-]+", r"drift-rejected-[a-z-]+", r"lockstep-[a-z-]+/step-\d+",
)
#: Drift metrics that compare clients or need an average of several: ``null`` in metrics.jsonl unless two or
#: more clients were measured (with one, W^{r+1} is its own model and each would be 0 or 1 by construction).
PAIRWISE_METRICS = (
    "model-divergence", "model-divergence-max", "gradient-drift-mean", "gradient-drift-max",
    "relative-gradient-drift-mean", "relative-gradient-drift-max", "activation-flips-local",
    "effective-smoothness-mean", "effective-smoothness-max", "effective-smoothness-lr-mean",
    "effective-smoothness-lr-max", "gradient-dissimilarity", "nonlinear-drift-fraction-mean",
    "nonlinear-drift-fraction-max",
)

# --- why a reply is rejected ------------------------------------------------------------------
REASONS = (
    "malformed",  # not exactly one ArrayRecord and one MetricRecord, or unreadable arrays
    "record-layout",  # records named or typed otherwise than the strategy reads (e.g. "weights" for "arrays")
    "array-names",  # missing or extra arrays
    "array-shape",  # an array's shape differs from the global model's
    "array-dtype",  # an array's dtype differs from the global model's
    "non-finite",  # NaN or inf in an array
    "metric-keys",  # missing or extra metric keys
    "num-examples",  # num-examples not a positive integer within the bound (or not the train reply's)
    "metric-type",  # a metric value of the wrong kind (a list where a scalar is read, a float for an id, ...)
    "non-finite-metric",  # NaN or inf where the schema allows none
    "metric-bounds",  # a value outside its bounds (a negative norm, a fraction above 1, a count above its total)
    "client-ids",  # ids duplicated, or outside what the node was given
    "update-norm",  # ||W_k - W^r|| above the configured bound
    "duplicate-node",  # a second reply of the same node in one exchange
    "unexpected-node",  # a reply from a node that was not asked
    "examples-outlier",  # num-examples far above the round's other replies (max-examples-ratio)
    "update-outlier",  # ||W_k - W^r|| far above the round's other replies (max-update-ratio)
)


class Rejected(Exception):
    """A reply that must not be used; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --- fields and specs ---------------------------------------------------------------------------
KINDS = ("count", "number", "id", "ids", "numbers")


@dataclass(frozen=True)
class Field:
    """One metric of a reply.

    Attributes
    ----------
    key
        The wire key.
    kind
        ``count`` (a non-negative integer; an integral float is accepted), ``number`` (int or
        float), ``id`` (an integer id), ``ids`` (a list of integer ids), ``numbers`` (a list of
        numbers).
    lo, hi
        Inclusive bounds (None: unbounded). ``hi`` may name another field of the same reply or
        a bound the caller passes (e.g. ``"max-num-examples"``).
    nan
        NaN is allowed (the quantity was not measurable, e.g. a ratio over a zero norm).
    empty_max
        -inf is allowed while the field named here is 0 (a maximum over no client); ``"*"``: always.
    required
        The key must be present.
    """

    key: str
    kind: str = "number"
    lo: float | None = 0.0
    hi: float | str | None = None
    nan: bool = False
    empty_max: str | None = None
    required: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.key}: kind {self.kind!r} not in {KINDS}")


@dataclass(frozen=True)
class MetricsSpec:
    """The MetricRecord of one kind of reply: its fixed fields and its families of keys.

    ``families`` maps a regular expression over keys to the field spec every matching key
    follows (e.g. the per-client lists ``client/<column>``); ``key`` in those specs is unused.
    """

    name: str
    fields: tuple[Field, ...]
    families: tuple[tuple[str, Field], ...] = ()

    @property
    def keys(self) -> frozenset[str]:
        """The fixed keys."""
        return frozenset(f.key for f in self.fields)

    @property
    def required(self) -> frozenset[str]:
        """The keys that must be present."""
        return frozenset(f.key for f in self.fields if f.required)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bound(ref: float | str | None, values: Mapping[str, object], bounds: Mapping[str, float]) -> float | None:
    if ref is None or isinstance(ref, (int, float)):
        return ref
    if ref in bounds:
        return float(bounds[ref])
    value = values.get(ref)
    return float(value) if _is_number(value) and math.isfinite(float(value)) else None  # type: ignore[arg-type]


def _check_scalar(spec: Field, key: str, value: object, values, bounds) -> None:
    if not _is_number(value):
        raise Rejected("metric-type", f"{key}={value!r}: expected a number")
    x = float(value)  # type: ignore[arg-type]
    if spec.kind in ("count", "id") and not (math.isfinite(x) and x.is_integer()):
        raise Rejected("num-examples" if key == NUM_EXAMPLES else "metric-type", f"{key}={value!r}: expected an integer")
    if math.isnan(x):
        if spec.nan:
            return
        raise Rejected("non-finite-metric", f"{key}={value!r}")
    if math.isinf(x):
        if x < 0 and spec.empty_max is not None and (spec.empty_max == "*" or values.get(spec.empty_max) == 0):
            return
        raise Rejected("non-finite-metric", f"{key}={value!r}")
    lo, hi = _bound(spec.lo, values, bounds), _bound(spec.hi, values, bounds)
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        reason = "num-examples" if key == NUM_EXAMPLES else "metric-bounds"
        raise Rejected(reason, f"{key}={value!r}: expected a value in [{lo}, {hi}]")


def check_value(spec: Field, key: str, value: object, values: Mapping[str, object], bounds: Mapping[str, float]) -> None:
    """Raise :class:`Rejected` unless ``value`` (under ``key``) follows ``spec``."""
    if spec.kind in ("ids", "numbers"):
        if not isinstance(value, list):
            raise Rejected("metric-type", f"{key}: expected a list")
        item = Field(key, "id" if spec.kind == "ids" else "number", spec.lo, spec.hi, spec.nan)
        for v in value:
            _check_scalar(item, key, v, values, bounds)
        if spec.kind == "ids" and len(set(value)) != len(value):
            raise Rejected("client-ids", f"{key}: duplicate ids")
        return
    _check_scalar(spec, key, value, values, bounds)


def check_metrics(spec: MetricsSpec, values: Mapping[str, object], bounds: Mapping[str, float] | None = None) -> dict:
    """Raise :class:`Rejected` unless ``values`` (a reply's MetricRecord) follows ``spec``; return a plain copy.

    Every required key present, no key that neither a field nor a family names, every
    value of its kind, finite unless the field allows NaN (or -inf as an empty maximum),
    and inside its bounds. ``bounds`` gives the values of named bounds
    (``max-num-examples``, ``num-clients-given``, ...).
    """
    bounds = bounds or {}
    values = dict(values)
    missing = sorted(spec.required - set(values))
    by_key = {f.key: f for f in spec.fields}
    families = [(re.compile(pattern), f) for pattern, f in spec.families]
    unknown = sorted(k for k in values if k not in by_key and not any(p.fullmatch(k) for p, _ in families))
    if missing or unknown:
        raise Rejected("metric-keys", f"{spec.name}: missing {missing}, unexpected {unknown}")
    for key, value in values.items():
        field = by_key.get(key) or next(f for p, f in families if p.fullmatch(key))
        check_value(field, key, value, values, bounds)
    return values


# --- the replies ---------------------------------------------------------------------------------
MAX_NUM_EXAMPLES = "max-num-examples"  # bound: the run's max-num-examples
TRAINED_EXAMPLES = "trained-examples"  # bound: num-examples of the node's train reply this round
CLIENTS_GIVEN = "clients-given"  # bound: how many virtual clients the node trained this round
NUM_PARTITIONS_BOUND = "num-partitions-bound"  # bound: largest valid partition id (num-partitions - 1)

TRAIN_METRICS = MetricsSpec("train reply", (
    Field(NUM_EXAMPLES, "count", lo=1, hi=MAX_NUM_EXAMPLES),
    Field(TRAIN_LOSS),
    Field(LOSS_BEFORE),
    Field(LOCAL_STEPS),  # a packed node reports its cohort's example-weighted mean
))

DRIFT_METRICS = MetricsSpec("drift reply", (
    Field(NUM_EXAMPLES, "count", lo=TRAINED_EXAMPLES, hi=TRAINED_EXAMPLES),  # = the node's train reply
    Field("loss-at-global"),
    Field("loss-at-local"),
    Field("grad-norm-global"),
    Field("grad-norm-local"),
    Field("gradient-drift"),
    Field("param-distance"),
    Field("flips-local", hi=1.0),
    Field("flips-init", hi=1.0, nan=True),  # NaN: W^0's patterns unknown
    Field("nonlinear-fraction", nan=True, required=False),  # ||Δg - lin|| / ||Δg||: >= 0, not bounded by 1; NaN: not measured
    Field(PARTITION_ID, "id", hi=NUM_PARTITIONS_BOUND, required=False),
))

COHORT_METRICS = MetricsSpec("cohort reply", (Field(PARTITION_ID, "id", hi=None),))

#: The sums of a packed drift reply (fedavg_relu.core.packed.DriftSums; tests/test_schema.py keeps them equal).
DRIFT_SUM_FIELDS = (
    Field("num-clients", "count", lo=1, hi=CLIENTS_GIVEN),
    Field("num-examples", "number", lo=TRAINED_EXAMPLES, hi=TRAINED_EXAMPLES),  # = the node's train reply
    Field("loss-global"),
    Field("loss-local"),
    Field("loss-before"),
    Field("divergence"),
    Field("divergence-max"),
    Field("drift"),
    Field("drift-max"),
    Field("relative", nan=True),  # NaN: a client with ||grad f_k(W^{r+1})|| = 0 and nonzero drift
    Field("relative-max", nan=True),
    Field("flips-local", hi="num-examples"),  # sum_k n_k * fraction_k
    Field("flips-init", hi="num-examples", nan=True),
    Field("moved-examples", hi="num-examples"),
    Field("smoothness"),
    Field("smoothness-max", nan=True, empty_max="moved-clients"),
    Field("moved-clients", "count", hi="num-clients"),
    Field("grad-norm-sq"),
    Field("nonlinear-examples", hi="num-examples"),
    Field("nonlinear"),
    Field("nonlinear-max", empty_max="nonlinear-examples"),
)


def _lockstep_family() -> tuple[str, Field]:
    names = "|".join(re.escape(f.key) for f in DRIFT_SUM_FIELDS)
    # per step: sign only here (a maximum may be -inf, a ratio NaN); the strategy checks each step's counts
    # against the reply's own (fedavg_relu.flower.schema.check_lockstep)
    return (rf"{re.escape(LOCKSTEP_PREFIX)}\d+/({names})", Field("lockstep", nan=True, empty_max="*"))


PACKED_DRIFT_METRICS = MetricsSpec(
    "packed drift reply",
    DRIFT_SUM_FIELDS + (
        Field(LOCKSTEP_STEPS, "ids", lo=1, required=False),
        Field(CLIENT_IDS, "ids", hi=NUM_PARTITIONS_BOUND, required=False),
    ),
    families=(
        _lockstep_family(),
        (rf"{re.escape(CLIENT_PREFIX)}(num-examples|local-steps)", Field("client", "numbers")),
        (rf"{re.escape(CLIENT_PREFIX)}(loss-before|loss-after|gradient-drift|param-distance)", Field("client", "numbers")),
        (rf"{re.escape(CLIENT_PREFIX)}(relative-gradient-drift|nonlinear-drift-fraction)", Field("client", "numbers", nan=True)),
        (rf"{re.escape(CLIENT_PREFIX)}activation-flips-local", Field("client", "numbers", hi=1.0)),
    ),
)


def field_names(dataclass_type) -> tuple[str, ...]:
    """The kebab-case keys of a dataclass's fields (how core's dataclasses name their metrics)."""
    return tuple(f.name.replace("_", "-") for f in dc_fields(dataclass_type))
