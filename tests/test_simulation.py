"""Tests for fedavg_relu.runtime.simulation's message extractor (the one Flower runtime function simulate() replaces).

The whole simulate() path runs in tests/test_e2e.py and tests/test_ray_cluster.py.
"""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace

from fedavg_relu.runtime.simulation import _add_messages_to_queue, _FastExtractor


class FakeState:
    """The part of Flower's InMemoryLinkState the extractor uses, with its delivery rule.

    ``get_message_ins(node_id, limit=1)`` returns the node's first undelivered
    message and marks it delivered (as in flwr/server/superlink/linkstate/in_memory_linkstate.py).
    """

    def __init__(self, messages):
        self.lock = threading.RLock()
        self.message_ins_store = {
            mid: SimpleNamespace(id=mid, metadata=SimpleNamespace(dst_node_id=node, delivered_at=at))
            for mid, node, at in messages
        }
        self.asked: list[int] = []

    def store_message_ins(self, msg):
        with self.lock:
            self.message_ins_store[msg.id] = msg

    def get_message_ins(self, node_id, limit):
        with self.lock:
            self.asked.append(node_id)
            for msg in self.message_ins_store.values():
                if msg.metadata.dst_node_id == node_id and msg.metadata.delivered_at == "":
                    msg.metadata.delivered_at = "now"
                    return [msg]
            return []


def _run(state, nodes, expected, interval=0.001, later=()):
    """Run the extractor; store ``later`` messages through the state once it runs; collect ``expected`` messages."""
    q: queue.Queue = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(target=_add_messages_to_queue, args=(state, q, dict.fromkeys(nodes, 0), stop, interval))
    thread.start()
    got = [q.get(timeout=10).id for _ in range(expected - len(later))]
    for msg in later:
        state.store_message_ins(msg)
    got += [q.get(timeout=10).id for _ in range(len(later))]
    stop.set()
    state.store_message_ins(SimpleNamespace(id="stop", metadata=SimpleNamespace(dst_node_id=-1, delivered_at="x")))
    thread.join(timeout=10)
    assert not thread.is_alive()
    return got, q


def test_extractor_delivers_each_pending_message_once_and_asks_only_their_nodes():
    """Messages a -> node 1, b -> node 3, c -> node 3, d -> node 2 (already delivered), e -> node 9 (not ours).

    Nodes 1..4 are ours. Expected: a, b, c delivered once each (node 3's two one per
    sweep, as Flower's limit=1 does), d and e never; nodes 2, 4 and 9 never asked.
    """
    state = FakeState([("a", 1, ""), ("b", 3, ""), ("c", 3, ""), ("d", 2, "earlier"), ("e", 9, "")])
    got, q = _run(state, [1, 2, 3, 4], 3)
    assert sorted(got) == ["a", "b", "c"] and q.empty()
    assert set(state.asked) == {1, 3}
    assert state.message_ins_store["e"].metadata.delivered_at == ""


def test_extractor_wakes_when_a_message_is_stored_and_restores_the_state():
    """Interval 60 s: a message stored after the first sweep is delivered only if storing wakes the loop.

    Afterwards the state's store_message_ins is its class's method again (the wrapper was
    an instance attribute, removed when the loop ends).
    """
    state = FakeState([("a", 1, "")])
    late = SimpleNamespace(id="late", metadata=SimpleNamespace(dst_node_id=2, delivered_at=""))
    got, q = _run(state, [1, 2], 2, interval=60.0, later=[late])
    assert got == ["a", "late"] and q.empty()
    assert "store_message_ins" not in vars(state)
    assert state.message_ins_store["late"].metadata.delivered_at == "now"


def test_fast_extractor_is_installed_only_inside_the_context():
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    with _FastExtractor():
        assert vce_api.add_messages_to_queue is _add_messages_to_queue
    assert vce_api.add_messages_to_queue is original


def test_default_cpus_per_client(monkeypatch):
    """One node gets every core (a packed node holding all virtual clients); several nodes 1 each; a joined cluster 1."""
    import fedavg_relu.runtime.simulation as sim

    monkeypatch.setattr(sim.os, "cpu_count", lambda: 8)
    assert sim.default_cpus_per_client(1) == 8
    assert sim.default_cpus_per_client(2) == 1
    assert sim.default_cpus_per_client(1, joining=True) == 1
    monkeypatch.setattr(sim.os, "cpu_count", lambda: None)
    assert sim.default_cpus_per_client(1) == 1


def test_install_fast_extractor_only_in_flowers_simulation_process(monkeypatch):
    """`flwr run`'s ServerApp runs in a `flwr-simulation` process: only there is Flower's extractor replaced."""
    from flwr.server.superlink.fleet.vce import vce_api

    from fedavg_relu.runtime.simulation import install_fast_extractor

    original = vce_api.add_messages_to_queue
    monkeypatch.setattr(vce_api, "add_messages_to_queue", original)  # restored after the test
    monkeypatch.setattr("sys.argv", ["/x/bin/pytest"])
    assert install_fast_extractor() is False and vce_api.add_messages_to_queue is original
    monkeypatch.setattr("sys.argv", ["/x/.venv/bin/flwr-simulation", "--insecure"])
    assert install_fast_extractor() is True and vce_api.add_messages_to_queue is _add_messages_to_queue
