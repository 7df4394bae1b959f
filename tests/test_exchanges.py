"""Every exchange against bad replies (property-based, hypothesis): none ends the run, none poisons a metric.

For each exchange (drift, packed drift with its lockstep sums and per-client lists, cohort
query, packed train) a good reply is built the way the ClientApp builds it, then corrupted
one way at a time. The properties: the exchange never raises; a bad reply is counted with
its reason; the summary equals the summary of the good replies alone (so nothing bad
reached a mean); no count is negative; rows name only clients a node was given.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedavg_relu.core.metrics import ClientDrift, summarize_drift
from fedavg_relu.core.packed import DriftSums, summarize_drift_sums
from fedavg_relu.flower import schema as wire
from fedavg_relu.flower.client_table import client_row_lists
from fedavg_relu.flower.records import params_to_arrays
from fedavg_relu.runtime.local_grid import ensure_task_identity
from strategies.cohorts import Cohorts
from strategies.exchange import DriftExchange, DriftSettings, PackedDriftExchange, TrainedNode

INIT = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}
SETTINGS = DriftSettings(INIT, 0.1, gradient_dissimilarity=True, client_metrics=True, num_partitions=8)
NUMBER_ABUSE = [math.inf, -math.inf, math.nan, 1e9, -1.0, 2.5, 0, [1.0, 2.0], 1e300]  # (a bool cannot cross the wire)


class ScriptedGrid:
    """Answers each message with the reply a script makes for its node (or several, or none)."""

    def __init__(self, script):
        ensure_task_identity()
        self.script = script

    def send_and_receive(self, messages, *, timeout=None):
        for msg in messages:
            for content in self.script(int(msg.metadata.dst_node_id)):
                if isinstance(content, tuple):  # (node it claims to be, content)
                    node, content = content
                    request = Message(content=RecordDict(), dst_node_id=node, message_type=msg.metadata.message_type)
                    yield Message(content=content, reply_to=request) if content is not None else Message(Error(2, "x"), reply_to=request)
                elif content is None:
                    yield Message(Error(2, "client raised"), reply_to=msg)
                else:
                    yield Message(content=content, reply_to=msg)

    def get_node_ids(self):
        return [1, 2, 3]


def _drift(n: int, seed: int) -> ClientDrift:
    rng = np.random.default_rng(seed)
    a, b, c, d = (float(v) for v in rng.uniform(0.1, 2.0, 4))
    return ClientDrift(n, a, 0.9 * a, b, 0.8 * b, c, d, 0.1, 0.2)


def _gradient(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in INIT.items()}


def _drift_content(drift: ClientDrift, partition: int, gradient: dict | None) -> RecordDict:
    metrics = MetricRecord(dict(drift.to_metrics(), **{wire.PARTITION_ID: partition}))
    content = RecordDict({wire.METRICS: metrics})
    if gradient is not None:
        content[wire.GRADIENT] = params_to_arrays(gradient)
    return content


# --- the standard drift exchange -------------------------------------------------------------
def _corrupt_drift(kind: str, value, drift: ClientDrift, partition: int, gradient) -> RecordDict | list:
    metrics = dict(drift.to_metrics(), **{wire.PARTITION_ID: partition})
    if kind == "metric":
        key, v = value
        metrics[key] = v
    elif kind == "missing":
        del metrics[value]
    elif kind == "extra":
        metrics[value] = 1.0
    elif kind == "partition":
        metrics[wire.PARTITION_ID] = value
    content = RecordDict({wire.METRICS: MetricRecord(metrics)})
    grad = {k: v.copy() for k, v in gradient.items()}
    if kind == "gradient":
        if value == "complex":
            content[wire.GRADIENT] = ArrayRecord({k: Array(v.astype(np.complex64)) for k, v in grad.items()})
        elif value == "shape":
            content[wire.GRADIENT] = params_to_arrays(dict(grad, w=np.zeros((3, 2), np.float32)))
        elif value == "nan":
            grad["b"][0] = np.nan
            content[wire.GRADIENT] = params_to_arrays(grad)
        elif value == "int":
            content[wire.GRADIENT] = params_to_arrays({k: v.astype(np.int32) for k, v in grad.items()})
        # "missing": no gradient record at all
    else:
        content[wire.GRADIENT] = params_to_arrays(grad)
    if kind == "records":
        content["more"] = MetricRecord({"x": 1.0})
    return content


DRIFT_KEYS = sorted(wire.DRIFT_METRICS.required)
bad_drift = st.one_of(
    st.tuples(st.just("metric"), st.tuples(st.sampled_from(DRIFT_KEYS), st.sampled_from(NUMBER_ABUSE))),
    st.tuples(st.just("missing"), st.sampled_from(DRIFT_KEYS)),
    st.tuples(st.just("extra"), st.sampled_from(["weight", "num-clients", "client/ids"])),
    st.tuples(st.just("partition"), st.sampled_from([-1, 8, 2.5, math.inf, [1]])),
    st.tuples(st.just("gradient"), st.sampled_from(["complex", "shape", "nan", "missing", "int"])),
    st.tuples(st.just("records"), st.just(None)),
)


def _still_valid(kind, value, drift) -> ClientDrift | None:
    """The measurement a corruption leaves when the value happens to be allowed (e.g. NaN flips-init), else None.

    Decided by hand, not by the schema under test: in range means a finite number within the field's
    documented bounds (norms >= 0, fractions in [0, 1], num-examples = the train reply's 10/20/30)."""
    if kind != "metric":
        return None
    key, v = value
    if isinstance(v, list):
        return None
    if math.isnan(v):
        ok = key == "flips-init"
    elif math.isinf(v) or v < 0:
        ok = False
    elif key == "num-examples":
        ok = v == drift.num_examples
    elif key in ("flips-local", "flips-init"):
        ok = v <= 1
    else:
        ok = True
    return ClientDrift.from_metrics(dict(drift.to_metrics(), **{key: v})) if ok else None


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bads=st.lists(bad_drift, min_size=1, max_size=2), extra=st.sampled_from(["none", "duplicate", "stranger", "error"]))
def test_bad_drift_replies_never_end_the_run_or_reach_the_metrics(bads, extra):
    """Nodes 1-3 trained (n = 10, 20, 30); node 1 replies well, nodes 2.. with the corruptions drawn, plus
    possibly a second reply of node 1, a reply from node 9 that was never asked, or an error reply.
    The summary equals summarize_drift over the valid replies alone; every rejection is counted."""
    drifts = {1: _drift(10, 1), 2: _drift(20, 2), 3: _drift(30, 3)}
    grads = {k: _gradient(k) for k in drifts}
    valid = {1}
    plan = {1: [_drift_content(drifts[1], 0, grads[1])]}
    for node, (kind, value) in zip((2, 3), bads):
        plan[node] = [_corrupt_drift(kind, value, drifts[node], node - 1, grads[node])]
        kept = _still_valid(kind, value, drifts[node])
        if kept is not None:
            valid.add(node)
            drifts[node] = kept
    if extra == "duplicate":
        plan[1].append(_drift_content(drifts[1], 0, grads[1]))
    elif extra == "stranger":
        plan[1].append((9, _drift_content(_drift(10, 9), 5, grads[1])))
    elif extra == "error" and 3 not in plan:
        plan[3] = [None]
    trained = [TrainedNode(k, drifts[k].num_examples, 1.0, 2.0) for k in (1, 2, 3)]
    result = DriftExchange(SETTINGS).run(ScriptedGrid(lambda node: plan.get(node, [])), 1, params_to_arrays(INIT), trained)
    out = result.metrics
    good = [drifts[k] for k in sorted(valid)]
    mine = {k: out[k] for k in summarize_drift(good, 0.1) if k in out}
    for key, value in summarize_drift(good, 0.1).items():
        assert mine[key] == pytest.approx(value, nan_ok=True), key
    assert out[wire.CLIENTS_MEASURED] == len(valid)
    assert out[wire.CLIENTS_UNMEASURED] == 3 - len(valid) >= 0
    answered_bad = sum(1 for node in (2, 3) if node in plan and plan[node][0] is not None and node not in valid)
    assert out[wire.DRIFT_REJECTED] == answered_bad + (extra in ("duplicate", "stranger"))
    assert sorted(r["client"] for r in result.rows) == sorted(k - 1 for k in valid)
    assert all(v >= 0 for k, v in out.items() if k.startswith("drift-rejected"))


def test_a_drift_reply_must_repeat_its_train_reply_count():
    """n = 10 in the train reply: a drift reply saying 10^9 (or 11) is rejected as num-examples, not averaged."""
    d = _drift(10, 1)
    for claimed in (10**9, 11):
        reply = _drift_content(ClientDrift(claimed, *list(vars(d).values())[1:]), 0, _gradient(1))
        out = DriftExchange(SETTINGS).run(ScriptedGrid(lambda node: [reply]), 1, params_to_arrays(INIT),
                                          [TrainedNode(1, 10, 1.0, 2.0)]).metrics
        assert out["drift-rejected-num-examples"] == 1 and out[wire.CLIENTS_MEASURED] == 0


def test_gradient_dissimilarity_needs_two_clients():
    """One measured client: gradient-dissimilarity is absent (null), never 1.0 or 0 (it compares clients)."""
    d = _drift(10, 1)
    out = DriftExchange(SETTINGS).run(ScriptedGrid(lambda node: [_drift_content(d, 0, _gradient(1))]), 1,
                                      params_to_arrays(INIT), [TrainedNode(1, 10, 1.0, 2.0)]).metrics
    assert "gradient-dissimilarity" not in out and out[wire.CLIENTS_MEASURED] == 1


# --- the packed drift exchange ------------------------------------------------------------------
def _packed_values(ids: list[int], seed: int, lockstep: bool) -> dict:
    drifts = [_drift(10 + i, seed + i) for i, _ in enumerate(ids)]
    sums = DriftSums()
    for d in drifts:
        sums.add(d, 1.0)
    values = dict(sums.to_metrics())
    values.update(client_row_lists(ids, drifts, [1.0] * len(ids), [2] * len(ids), False))
    if lockstep:
        values[wire.LOCKSTEP_STEPS] = [1]
        values.update(sums.to_metrics(prefix=f"{wire.LOCKSTEP_PREFIX}1/"))
    return values


PACKED_CORRUPTIONS = [
    ("num-clients", 0), ("num-clients", 3), ("num-examples", math.inf), ("num-examples", 1e9), ("drift", -1.0),
    ("divergence", math.nan), ("flips-local", 1e6), ("flips-init", math.inf), ("moved-clients", 9),
    ("nonlinear-examples", 5.0), ("grad-norm-sq", -0.5), ("loss-global", [1.0]), ("relative-max", math.inf),
    ("client/ids", [0, 0]), ("client/ids", [0, 7]), ("client/ids", [0, 1, 2]), ("client/gradient-drift", [1.0]),
    ("client/num-examples", [1, 1]), ("lockstep-steps", [1, 2]), ("lockstep-step-1/num-clients", 0.0),
    ("lockstep-step-1/num-examples", 0.0), ("lockstep-step-1/drift", -3.0), ("lockstep-steps", [0]),
    ("unknown-key", 1.0), ("lockstep-step-1/drift", math.inf),
]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corruption=st.sampled_from(PACKED_CORRUPTIONS), gradient=st.sampled_from(["ok", "complex", "missing", "nan"]))
def test_bad_packed_drift_replies_never_end_the_run_or_reach_the_metrics(corruption, gradient):
    """Node 1 (clients 0, 1) replies well; node 2 (clients 2, 3) with one corrupted value or gradient.
    The summary is node 1's alone; node 2's clients are unmeasured; no row names client 2 or 3."""
    key, value = corruption
    good = _packed_values([0, 1], 1, lockstep=True)
    bad = _packed_values([2, 3], 5, lockstep=True)
    bad[key] = value
    grad_ok = {k: np.asarray(v, np.float64) for k, v in _gradient(1).items()}

    def content(values, grad_kind):
        c = RecordDict({wire.METRICS: MetricRecord(values)})
        if grad_kind == "ok":
            c[wire.GRADIENT_SUM] = params_to_arrays(grad_ok)
        elif grad_kind == "complex":
            c[wire.GRADIENT_SUM] = ArrayRecord({k: Array(v.astype(np.complex128)) for k, v in grad_ok.items()})
        elif grad_kind == "nan":
            c[wire.GRADIENT_SUM] = params_to_arrays({k: np.full_like(v, np.nan) for k, v in grad_ok.items()})
        return c

    plan = {1: [content(good, "ok")], 2: [content(bad, gradient)]}
    trained = [TrainedNode(1, int(good["num-examples"]), 1.0, 2.0, [0, 1]),
               TrainedNode(2, int(_packed_values([2, 3], 5, False)["num-examples"]), 1.0, 2.0, [2, 3])]
    result = PackedDriftExchange(SETTINGS).run(ScriptedGrid(lambda n: plan[n]), 1, params_to_arrays(INIT), trained)
    out = result.metrics
    alone = DriftSums.from_metrics(good)
    for k, v in summarize_drift_sums(alone, 0.1).items():
        assert out[k] == pytest.approx(v, nan_ok=True), k
    assert (out[wire.CLIENTS_MEASURED], out[wire.CLIENTS_UNMEASURED], out[wire.DRIFT_REJECTED]) == (2, 2, 1)
    assert sorted(r["client"] for r in result.rows) == [0, 1]
    assert out["lockstep-nodes"] == 1


# --- the cohort query ---------------------------------------------------------------------------
COHORT_ABUSE = [None, {}, {wire.PARTITION_ID: -1}, {wire.PARTITION_ID: 1.5}, {wire.PARTITION_ID: math.inf},
                {wire.PARTITION_ID: [0]}, {wire.PARTITION_ID: 0, "first-client": 0}, {"first-client": 0, "num-clients": 2},
                {wire.PARTITION_ID: math.nan}]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad=st.sampled_from(COHORT_ABUSE), duplicate=st.booleans())
def test_a_bad_cohort_reply_costs_its_node_that_round_only(bad, duplicate):
    """6 clients, 2 per node, nodes 1-3. Node 2's first answer is bad (an error, a missing or ill-typed
    partition id, an old-style reply): round 1 runs with nodes 1 and 3 (clients 2, 3 have no node), the
    node is counted, and round 2 asks it again and it holds clients 2, 3. A node claiming node 1's partition
    id stays idle. Nothing raises."""
    answers = {1: [{wire.PARTITION_ID: 0}], 2: [bad, {wire.PARTITION_ID: 1}], 3: [{wire.PARTITION_ID: 0 if duplicate else 2}]}

    def script(node):
        answer = answers[node].pop(0) if len(answers[node]) > 1 else answers[node][0]
        return [None if answer is None else RecordDict({wire.METRICS: MetricRecord(answer)})]

    cohorts = Cohorts(6, 2, wait_timeout=0.1)
    grid = ScriptedGrid(script)
    holder, failed = cohorts.discover(grid, 1)
    assert failed == 1
    expected = {0: 1, 1: 1} if duplicate else {0: 1, 1: 1, 4: 3, 5: 3}
    assert holder == expected
    holder, failed = cohorts.discover(grid, 2)
    assert failed == 0 and holder[2] == holder[3] == 2


def test_packed_messages_name_the_clients_the_server_chose():
    """The inner strategy's per-client messages become one train.packed message per node naming its clients."""
    from flwr.serverapp.strategy import FedAvg

    ensure_task_identity()
    cohorts = Cohorts(5, 2)
    holder = {0: 11, 1: 11, 2: 12, 3: 12}  # client 4 has no node this round
    inner = FedAvg(min_available_nodes=5, fraction_train=1.0)
    msgs = list(inner.configure_train(1, params_to_arrays(INIT), ConfigRecord({}), cohorts.virtual_grid()))
    packed = cohorts.pack(msgs, holder)
    assert {m.metadata.dst_node_id: list(m.content["config"][wire.VIRTUAL_CLIENTS]) for m in packed.messages} == {11: [0, 1], 12: [2, 3]}
    assert packed.unheld == [4] and all(m.metadata.message_type == wire.PACKED_TRAIN for m in packed.messages)
    assert all(m.content["config"][wire.NUM_PARTITIONS] == 5 for m in packed.messages)


# --- packed train replies go through the train screen --------------------------------------------
@pytest.mark.parametrize(("key", "value", "reason"), [
    (wire.NUM_EXAMPLES, math.inf, "num-examples"), (wire.NUM_EXAMPLES, 0, "num-examples"),
    (wire.NUM_EXAMPLES, 2 * 10**9, "num-examples"), (wire.TRAIN_LOSS, -1.0, "metric-bounds"),
    (wire.LOSS_BEFORE, math.nan, "non-finite-metric"), (wire.LOCAL_STEPS, [2], "metric-type"),
])
def test_bad_train_metrics_are_rejected_by_the_schema(key, value, reason):
    """The train reply's MetricRecord follows TRAIN_METRICS: counts bounded, losses >= 0 and finite, scalars."""
    from fedavg_relu.flower.validation import UpdateRules, check_update

    rules = UpdateRules.for_model(INIT, wire.TRAIN_METRIC_KEYS, max_num_examples=10**9)
    metrics = {wire.NUM_EXAMPLES: 10, wire.TRAIN_LOSS: 0.5, wire.LOSS_BEFORE: 0.6, wire.LOCAL_STEPS: 2.0}
    with pytest.raises(wire.Rejected, match=reason):
        check_update(INIT, dict(metrics, **{key: value}), rules)
