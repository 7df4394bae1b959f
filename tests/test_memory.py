"""Reply memory is freed when a reply is consumed, not when Python's cyclic GC happens to run (issue 12).

Measured before the fix (width 4096, 1 round, ``simulate``): the ServerApp process
peaked at 2.45 GB with 8 clients and 2.82 GB with 24, about +28 MB per client; at
the peak 11 replies (67 MB each) were unreachable but uncollected, kept alive by the
reference cycle that Flower's ``RecordDict.array_records`` leaves. After: 2.12 GB and
2.15 GB (benchmarks/memory.py measures the whole process tree at width 8192).
"""

from __future__ import annotations

import gc
import os
import weakref

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedavg_relu.flower import seam
from fedavg_relu.flower.records import GarbageBudget, array_bytes, array_records, metric_records, release
from fedavg_relu.flower.streaming import StreamingGrid


@pytest.fixture(autouse=True)
def _no_automatic_gc():
    """Only explicit collections in these tests, so what they count is what the code did."""
    seam.ensure_task_identity()
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def _reply(values: int = 250) -> Message:
    request = Message(content=RecordDict(), dst_node_id=2, message_type="train")
    request.metadata.__dict__["_message_id"] = "m"
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(values, np.float32))}),
                          "metrics": MetricRecord({"num-examples": 1})})
    return Message(content=content, reply_to=request)


def test_flower_views_leave_a_cycle_and_ours_do_not():
    """Why the helpers exist. flwr 1.42's ``RecordDict.array_records`` builds a ``_SyncedDict`` holding a
    bound method of itself: after the message is dropped, the record survives until ``gc.collect()``.
    Through :func:`array_records` / :func:`metric_records` (plain dicts) nothing survives: the weak
    reference dies with the last strong one and ``gc.collect()`` finds 0 objects.

    If the first half fails, Flower fixed the cycle; the helpers still work, and this docstring and
    fedavg_relu/flower/records.py should say so.
    """
    reply = _reply()
    ref = weakref.ref(reply.content["arrays"]["w"])
    reply.content.array_records  # noqa: B018 - the access alone makes the cycle
    del reply
    assert ref() is not None
    assert gc.collect() > 0 and ref() is None

    reply = _reply()
    ref = weakref.ref(reply.content["arrays"]["w"])
    assert list(array_records(reply.content)) == ["arrays"] and list(metric_records(reply.content)) == ["metrics"]
    del reply
    assert ref() is None
    assert gc.collect() == 0


def test_release_frees_the_bytes_of_a_message_still_held():
    """``release`` empties the ArrayRecords: the Array (and its bytes) dies although the message lives;
    the MetricRecord stays. ``array_bytes`` is then 0; before, it was the .npy payload of 250 float32
    values: 1000 data bytes plus the header, i.e. more than 1000."""
    reply = _reply()
    ref = weakref.ref(reply.content["arrays"]["w"])
    assert array_bytes(reply) > 1000
    release(reply)
    assert ref() is None and len(reply.content["arrays"]) == 0 and reply.content["metrics"]["num-examples"] == 1
    assert array_bytes(reply) == 0


def test_garbage_budget_counts_bytes_and_collects_at_the_limit():
    """limit 2500: spending 1000 three times collects once, at the third (3000 >= 2500), then starts over."""
    budget = GarbageBudget(limit=2500)
    assert [budget.spend(1000) for _ in range(6)] == [False, False, True, False, False, True]
    assert budget.collections == 2 and budget.pending == 0


class _Grid:
    """Flower's push/pull API with one reply per pull."""

    pull_interval = 0.0

    def __init__(self, replies):
        self.replies = list(replies)

    def push_messages(self, messages):
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
        return [f"m{i}" for i in range(len(messages))]

    def pull_messages(self, ids):
        if not self.replies:
            return []
        reply = self.replies.pop(0)
        reply.metadata.__dict__["_reply_to_message_id"] = sorted(ids)[0]
        return [reply]


@pytest.mark.parametrize("limit, survivors", [(10**12, 6), (2 * 1100, 0)])
def test_streaming_grid_collects_what_a_careless_consumer_leaves(limit, survivors):
    """Six replies of ~1.1 kB each, read by a consumer that uses Flower's ``array_records`` (a cycle per
    reply). With a budget that never fills all six replies' arrays are still alive at the end; with a
    budget of two replies the grid collects after every second reply, the last one included, so none
    is."""
    replies = [_reply() for _ in range(6)]
    refs = [weakref.ref(r.content["arrays"]["w"]) for r in replies]
    grid = StreamingGrid(_Grid(replies), budget=GarbageBudget(limit=limit))
    del replies
    messages = [Message(RecordDict(), dst_node_id=2, message_type="train") for _ in range(6)]
    for reply in grid.send_and_receive(messages, timeout=5):
        reply.content.array_records  # noqa: B018
    del reply
    assert sum(ref() is not None for ref in refs) == survivors
    assert grid.budget.collections == (0 if survivors else 3)


class _SlowGrid:
    """Replies are stored when `deliver` is called; `pull_messages` hands out (and forgets) the stored
    replies of the ids asked for, as Flower's in-memory LinkState does."""

    pull_interval = 0.0

    def __init__(self):
        self.count = 0
        self.sent = {}
        self.store = {}

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{self.count}"
            self.sent[f"m{self.count}"] = msg
            ids.append(f"m{self.count}")
            self.count += 1
        return ids

    def deliver(self, message_id):
        reply = _reply()
        reply.metadata.__dict__["_reply_to_message_id"] = message_id
        self.store[message_id] = reply

    def pull_messages(self, ids):
        return [self.store.pop(i) for i in list(ids) if i in self.store]


def test_a_reply_after_its_exchange_timed_out_is_pulled_and_dropped_by_the_next_one():
    """Exchange 1 (message m0) times out with no reply. m0's reply then arrives, and would stay in the
    store for the rest of the run. Exchange 2 (m1) pulls it with its own: it yields only m1's reply,
    the late one is counted and its arrays freed, and the store is empty."""
    grid = _SlowGrid()
    streaming = StreamingGrid(grid)
    assert list(streaming.send_and_receive([Message(RecordDict(), dst_node_id=2, message_type="train")], timeout=0.05)) == []
    assert streaming.abandoned == {"m0"}
    grid.deliver("m0")
    late = grid.store["m0"]
    stream = streaming.send_and_receive([Message(RecordDict(), dst_node_id=3, message_type="train")], timeout=5)
    grid.deliver("m1")
    replies = list(stream)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m1"]
    assert streaming.late_replies == 1 and streaming.abandoned == set() and grid.store == {}
    assert len(late.content["arrays"]) == 0  # released


def test_a_cohort_stack_larger_than_memory_is_mapped_read_only(tmp_path):
    """Packed mode's drift handler maps the cohort's stacked W_k (K x the model) from disk. At width 8192 with
    100 clients that is 27 GB on a 24 GB machine: copy-on-write (``writable=True``, a private writable mapping)
    counts the whole file against the kernel's commit limit and failed with ENOMEM (every client unmeasured,
    found by benchmarks/memory.py). ``writable=False`` maps it read-only: it works and reads pages on demand.

    The stack here is a sparse file of twice the machine's memory (no disk used); under the kernel's default
    heuristic overcommit (vm.overcommit_memory = 0) the writable mapping must fail, which shows the case is real.
    """
    import errno

    from fedavg_relu.core.spill import LocalModelStore

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    clients = 2 * memory // (1024 * 1024) + 1  # float32 rows of 1024 x 256 = 1 MiB: > 2x the memory
    store = LocalModelStore(run_id=1, node_id=2, root=tmp_path)
    stack = store.allocate(3, {"hidden.0.weight": ((clients, 1024, 256), np.float32)})
    stack["hidden.0.weight"][clients - 1, 0, :4] = [1.0, 2.0, 3.0, 4.0]  # one page written, the rest sparse
    store.commit(3, stack)
    del stack
    kept = store.load(3, writable=False)["hidden.0.weight"]
    assert kept.shape == (clients, 1024, 256) and not kept.flags.writeable
    assert kept[clients - 1, 0, :4].tolist() == [1.0, 2.0, 3.0, 4.0] and kept[0, 0, 0] == 0.0
    chunk = np.asarray(kept)[[0, clients - 1]]  # what the cohort code does: a copy of the chunk, writable
    assert chunk.flags.writeable and chunk[1, 0, 3] == 4.0
    with open("/proc/sys/vm/overcommit_memory") as fh:
        heuristic = fh.read().strip() == "0"
    if heuristic:
        with pytest.raises(OSError) as err:
            store.load(3, writable=True)
        assert err.value.errno == errno.ENOMEM


def test_local_grid_record_of_sent_messages_keeps_no_arrays():
    """The in-process grid records what it sent, but not the arrays: memory stays flat over a long run.

    Each round sends a new model (an ArrayRecord); the grid used to keep every message whole,
    so a 30-round in-process run at width 8192 held 30 × 268 MB of old models (a sweep cell
    grew to 12 GB and was OOM-killed next to a second one). Here 10 messages of 4 MiB of
    arrays each go through the grid and are dropped by the sender: what tracemalloc still
    counts afterwards must stay below one message's arrays (keeping them would be 40 MiB),
    while the record still has each message's type and config, in order.
    """
    import tracemalloc

    from flwr.app import ConfigRecord

    from fedavg_relu.runtime.local_grid import LocalGrid

    def echo(message, context):
        return Message(RecordDict({"metrics": MetricRecord({"ok": 1})}), reply_to=message)

    grid = LocalGrid(echo, 1, {})
    size = 4 << 20
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(10):
            arrays = ArrayRecord({"w": Array(np.full(size // 4, i, dtype=np.float32))})
            message = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"i": i})}),
                              dst_node_id=1, message_type="train", group_id=str(i))
            replies = list(grid.send_and_receive([message]))
            assert replies[0].content["metrics"]["ok"] == 1
            del message, arrays, replies
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert retained < size, f"{retained / 2**20:.1f} MiB retained after 10 messages of 4 MiB"
    assert [m.content["config"]["i"] for m in grid.sent] == list(range(10))
    assert [m.metadata.message_type for m in grid.sent] == ["train"] * 10
    assert all(not m.content.array_records for m in grid.sent)
