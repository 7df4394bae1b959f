"""Tests of fedavg_relu/flower/validation.py and its use by the strategy layer (property-based, hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedavg_relu.runtime.local_grid import LocalGrid, ensure_task_identity
from fedavg_relu.flower.records import params_to_arrays
from fedavg_relu.flower.validation import Rejected, UpdateRules, check_update
from flwr.serverapp.strategy import FedAvg

from strategies import DriftRecorder
from strategies.exchange import DriftSettings

GLOBAL = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([0.5, -0.5], np.float32)}
KEYS = frozenset({"num-examples", "train-loss", "loss-before"})  # this test's own rules
RULES = UpdateRules.for_model(GLOBAL, KEYS, max_num_examples=10_000)
GOOD_METRICS = {"num-examples": 10, "train-loss": 0.3, "loss-before": 0.4}


def _strategy(inner=None) -> DriftRecorder:
    inner = inner or FedAvg(min_available_nodes=1, min_train_nodes=1)
    return DriftRecorder(inner, drift=DriftSettings(GLOBAL, 0.1), rules=RULES, measure_drift=False)


def _message(node: int, content: RecordDict) -> Message:
    ensure_task_identity()
    request = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    return Message(content=content, reply_to=request)


def _content(params, metrics) -> RecordDict:
    record = RecordDict({"metrics": MetricRecord(metrics)})
    if params is not None:
        record["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in params.items()})
    return record


# --- bad replies, one generator per kind, each with the reason it must get ------------
def _with_nonfinite(draw):
    name = draw(st.sampled_from(sorted(GLOBAL)))
    params = {k: v.copy() for k, v in GLOBAL.items()}
    flat = params[name].reshape(-1)
    flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return _content(params, GOOD_METRICS), "non-finite"


def _with_wrong_shape(draw):
    name = draw(st.sampled_from(sorted(GLOBAL)))
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3).filter(lambda s: tuple(s) != GLOBAL[name].shape))
    return _content(dict(GLOBAL, **{name: np.ones(shape, np.float32)}), GOOD_METRICS), "array-shape"


def _with_wrong_dtype(draw):
    name = draw(st.sampled_from(sorted(GLOBAL)))
    dtype = draw(st.sampled_from([np.float64, np.float16, np.int32, np.int64]))
    return _content(dict(GLOBAL, **{name: GLOBAL[name].astype(dtype)}), GOOD_METRICS), "array-dtype"


def _with_missing_or_extra_array(draw):
    params = dict(GLOBAL)
    if draw(st.booleans()):
        del params[draw(st.sampled_from(sorted(GLOBAL)))]
    else:
        params[draw(st.text("abcxyz", min_size=2, max_size=5))] = np.zeros(2, np.float32)
    return _content(params, GOOD_METRICS), "array-names"


def _with_bad_metric_keys(draw):
    metrics = dict(GOOD_METRICS)
    if draw(st.booleans()):
        del metrics[draw(st.sampled_from(["train-loss", "loss-before"]))]
    else:
        metrics[draw(st.sampled_from(["accuracy", "extra-key", "lr"]))] = 1.0
    return _content(GLOBAL, metrics), "metric-keys"


def _with_bad_weight(draw):
    n = draw(st.one_of(st.integers(-10**12, 0), st.integers(10_001, 10**15), st.floats(0.1, 99.9).filter(lambda f: not f.is_integer())))
    return _content(GLOBAL, dict(GOOD_METRICS, **{"num-examples": n})), "num-examples"


def _with_nonfinite_metric(draw):
    key = draw(st.sampled_from(["train-loss", "loss-before"]))
    return _content(GLOBAL, dict(GOOD_METRICS, **{key: draw(st.sampled_from([np.nan, np.inf]))})), "non-finite-metric"


def _malformed(draw):
    if draw(st.booleans()):
        return _content(None, GOOD_METRICS), "malformed"  # no ArrayRecord
    record = _content(GLOBAL, GOOD_METRICS)
    record["more"] = MetricRecord({"x": 1.0})  # two MetricRecords
    return record, "malformed"


BAD_KINDS = [
    _with_nonfinite, _with_wrong_shape, _with_wrong_dtype, _with_missing_or_extra_array,
    _with_bad_metric_keys, _with_bad_weight, _with_nonfinite_metric, _malformed,
]


@st.composite
def bad_reply(draw):
    """One corrupted reply and the reason it must be rejected with."""
    return draw(st.sampled_from(BAD_KINDS))(draw)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad=bad_reply())
def test_every_kind_of_bad_reply_is_rejected_with_its_reason(bad):
    """A corrupted reply next to a good one: the good one alone is averaged; the bad one is counted under its reason."""
    content, reason = bad
    good = _message(1, _content({k: v + 1 for k, v in GLOBAL.items()}, GOOD_METRICS))
    strategy = _strategy()
    strategy._global[1] = GLOBAL
    arrays, metrics = strategy.aggregate_train(1, [good, _message(2, content)])
    assert metrics[f"rejected-{reason}"] == 1
    assert metrics["clients-rejected"] == 1 and metrics["clients-trained"] == 1
    np.testing.assert_array_equal(arrays["w"].numpy(), GLOBAL["w"] + 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bads=st.lists(bad_reply(), min_size=1, max_size=5))
def test_all_bad_replies_leave_the_model_unchanged_byte_for_byte(bads):
    """Only bad replies: aggregate_train returns no arrays, the round is skipped, Flower keeps W^r exactly."""
    strategy = _strategy()
    messages = [_message(i + 1, content) for i, (content, _) in enumerate(bads)]
    arrays, metrics = strategy.aggregate_train(1, messages)
    assert arrays is None
    assert metrics["round-skipped"] == 1 and metrics["clients-rejected"] == len(bads)

    def replies_badly(message, context):
        content, _ = bads[(context.node_id - 1) % len(bads)]
        return Message(content=content, reply_to=message)

    grid = LocalGrid(replies_badly, 2, {})
    strategy = _strategy()
    initial = params_to_arrays(GLOBAL)
    before = {k: v.numpy().tobytes() for k, v in initial.items()}
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=2, train_config=ConfigRecord())
    assert len(result.arrays) == 0  # never replaced
    assert {k: v.numpy().tobytes() for k, v in initial.items()} == before
    assert [strategy.round_metrics[r]["round-skipped"] for r in (1, 2)] == [1, 1]


def test_duplicate_and_unexpected_nodes_are_rejected():
    """Node 1 replies twice (second is a duplicate); node 9 was not sampled."""
    strategy = _strategy()
    grid = LocalGrid(lambda m, c: None, 2, {})
    list(strategy.configure_train(1, params_to_arrays(GLOBAL), ConfigRecord(), grid))  # samples nodes 1 and 2
    good = _content(GLOBAL, GOOD_METRICS)
    arrays, metrics = strategy.aggregate_train(1, [_message(1, good), _message(1, good), _message(9, good)])
    assert (metrics["rejected-duplicate-node"], metrics["rejected-unexpected-node"], metrics["clients-trained"]) == (1, 1, 1)
    assert metrics["clients-failed"] == 1  # node 2 never answered
    np.testing.assert_array_equal(arrays["w"].numpy(), GLOBAL["w"])


def test_update_norm_bound():
    """||W_k - W^r|| = ||(1,1,1,1,1,1,1,1)|| = sqrt(8) ~ 2.83: rejected under a bound of 2, accepted under 3."""
    moved = {k: v + 1 for k, v in GLOBAL.items()}
    with pytest.raises(Rejected, match="update-norm"):
        check_update(moved, GOOD_METRICS, UpdateRules.for_model(GLOBAL, KEYS, max_update_norm=2.0), GLOBAL)
    assert check_update(moved, GOOD_METRICS, UpdateRules.for_model(GLOBAL, KEYS, max_update_norm=3.0), GLOBAL) == 10


def test_valid_update_passes_and_returns_weight():
    """A clean update returns its num-examples; an integral float weight is accepted as that integer."""
    assert check_update(GLOBAL, GOOD_METRICS, RULES) == 10
    assert check_update(GLOBAL, dict(GOOD_METRICS, **{"num-examples": 7.0}), RULES) == 7


def test_evaluate_replies_are_screened_before_flowers_average():
    """A recorder around a FedAvg built directly runs Flower's evaluate phase. Kept: n=10 with loss 0.5 and n=30 with
    loss 0.1, so the weighted mean is (10*0.5 + 30*0.1) / 40 = 0.2. Dropped, where Flower's average would
    end the run or be wrecked: an error reply, a reply carrying arrays, num-examples 0, and keys other than
    the first kept reply's. With only the first three bad ones, nothing is left: None."""
    from flwr.app import Error

    strategy = _strategy()
    good = [_message(1, RecordDict({"metrics": MetricRecord({"num-examples": 10, "loss": 0.5})})),
            _message(2, RecordDict({"metrics": MetricRecord({"num-examples": 30, "loss": 0.1})}))]
    request = Message(content=RecordDict(), dst_node_id=3, message_type="evaluate")
    bad = [Message(Error(0, "boom"), reply_to=request),
           _message(4, _content(GLOBAL, {"num-examples": 10, "loss": 0.5})),
           _message(5, RecordDict({"metrics": MetricRecord({"num-examples": 0, "loss": 0.5})})),
           _message(6, RecordDict({"metrics": MetricRecord({"num-examples": 10, "accuracy": 0.9})}))]
    result = strategy.aggregate_evaluate(1, good[:1] + bad + good[1:])
    assert result["loss"] == pytest.approx(0.2)
    assert strategy.aggregate_evaluate(1, bad[:3]) is None
