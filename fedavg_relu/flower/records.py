"""Conversions between parameter dicts and Flower records, and reading a RecordDict without leaks.

Read a message's records with :func:`array_records` / :func:`metric_records` /
:func:`config_records`, never with ``RecordDict.array_records`` & co. In flwr 1.42
those properties build a ``_SyncedDict`` that holds a bound method of itself: every
call leaves a reference cycle that keeps the records alive until Python's cyclic
garbage collector happens to run. For a reply at width 8192 that is 268 MB per
access, and it was what made the ServerApp's memory grow with the number of clients
(issue 12; ``tests/test_memory.py`` shows the cycle). :class:`GarbageBudget` collects
such cycles made by code we do not own (Flower's own strategies read
``array_records``) once enough reply bytes have passed.
"""

from __future__ import annotations

import gc
import io
import math
import threading
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedavg_relu.flower.seam import NUMPY_STYPE


def params_to_arrays(params: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` holding ``params`` (name -> array), in order."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in params.items()})


def arrays_to_params(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The ``name -> numpy array`` dict of an ``ArrayRecord`` (writable copies)."""
    return {name: array.numpy() for name, array in record.items()}


def array_view(array: Array) -> np.ndarray:
    """``array.numpy()`` without the copy: a read-only view of the Array's ``.npy`` bytes.

    Flower 1.42 keeps an ``Array`` of stype ``numpy.ndarray`` as the bytes ``np.save`` wrote
    (``Array.from_numpy_ndarray``), and ``Array.numpy()`` copies them out with ``np.load``: at
    width 8192 that is 268 MB copied (and its pages faulted in) per model received. Here the
    header is parsed and the data mapped in place. A Fortran-ordered or object array, another
    stype, or bytes that are not a whole ``.npy`` fall back to (or fail like) ``array.numpy()``.
    ``tests/test_flower_contract.py`` checks the format against Flower's own ``Array``.
    For readers only: the view must not be written to or wrapped by torch for writing.
    """
    data = array.data
    if array.stype != NUMPY_STYPE or not isinstance(data, bytes):
        return array.numpy()
    head = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(head)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(head)
    except ValueError:
        return array.numpy()  # raises as Flower does
    count = math.prod(shape)
    if fortran_order or dtype.hasobject or head.tell() + count * dtype.itemsize != len(data):
        return array.numpy()
    return np.frombuffer(data, dtype=dtype, count=count, offset=head.tell()).reshape(shape)


def arrays_to_views(record: ArrayRecord) -> dict[str, np.ndarray]:
    """:func:`arrays_to_params` without copies: read-only views (:func:`array_view`), for readers only."""
    return {name: array_view(array) for name, array in record.items()}


def array_records(content: RecordDict) -> dict[str, ArrayRecord]:
    """``content``'s ArrayRecords, name -> record, in order (a plain dict: no reference cycle)."""
    return {name: record for name, record in content.items() if isinstance(record, ArrayRecord)}


def metric_records(content: RecordDict) -> dict[str, MetricRecord]:
    """``content``'s MetricRecords, name -> record, in order (a plain dict: no reference cycle)."""
    return {name: record for name, record in content.items() if isinstance(record, MetricRecord)}


def config_records(content: RecordDict) -> dict[str, ConfigRecord]:
    """``content``'s ConfigRecords, name -> record, in order (a plain dict: no reference cycle)."""
    return {name: record for name, record in content.items() if isinstance(record, ConfigRecord)}


def array_bytes(message: Message) -> int:
    """Bytes of array data ``message`` carries (0 for an error reply)."""
    if message.has_error():
        return 0
    return sum(len(array.data) for record in array_records(message.content).values() for array in record.values())


def release(message: Message) -> None:
    """Empty ``message``'s ArrayRecords: its array bytes are freed now, whoever still holds the message.

    For a reply that has been folded into a running sum. Safe only when nothing
    reads the message's arrays afterwards.
    """
    if message.has_error():
        return
    for record in array_records(message.content).values():
        record.clear()


class GarbageBudget:
    """Run the cyclic garbage collector after every ``limit`` bytes of replies.

    Parameters
    ----------
    limit : int
        Bytes of reply arrays to let pass between two collections. The default,
        512 MB, is two models at width 8192 and thousands at the default width,
        so a full collection (~0.1 s here) costs nothing measurable at any width.
    """

    def __init__(self, limit: int = 512 * 2**20) -> None:
        self.limit = int(limit)
        self.pending = 0
        self.collections = 0
        self._lock = threading.Lock()

    def spend(self, nbytes: int) -> bool:
        """Count ``nbytes`` more; collect (and return True) once ``limit`` is reached."""
        with self._lock:
            self.pending += int(nbytes)
            if self.pending < self.limit:
                return False
            self.pending = 0
            self.collections += 1
        gc.collect()
        return True
