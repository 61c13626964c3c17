"""What a worker does for one job: read the samples of one batch and collate them.

Map-style datasets get the cheapest read that gives the same batch as torch: one indexing
operation per tensor for in-memory tensors and arrays, `__getitems__` where the dataset has it,
`__getitem__` per index otherwise. Iterable datasets get one iterator per worker, batched.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate

Batch = Any
Gather = Callable[[torch.Tensor], Any]


class Abandoned(Exception):
    """Raised inside a job whose epoch was closed, to stop reading samples nobody will use."""


class JobState(Protocol):
    """What a read needs to know about its job."""

    indices: Any
    worker: int | None
    cancelled: bool


def map_reader(
    dataset: Any, collate_fn: Callable[[Any], Any], auto_collation: bool
) -> Callable[[JobState], Batch]:
    """Return the function that turns one job's indices into one collated batch."""
    if not auto_collation:
        return lambda job: collate_fn(dataset[job.indices])
    gather = vectorized_gather(dataset) if collate_fn is default_collate else None
    if gather is not None:
        return lambda job: gather(torch.as_tensor(job.indices, dtype=torch.long))
    getitems = getattr(dataset, "__getitems__", None)
    if getitems:
        return lambda job: collate_fn(getitems(job.indices))

    def read_each(job: JobState) -> Batch:
        samples = []
        for index in job.indices:
            if job.cancelled:
                raise Abandoned
            samples.append(dataset[index])
        return collate_fn(samples)

    return read_each


def vectorized_gather(dataset: Any) -> Gather | None:
    """Return a one-operation batch read equal to `default_collate` of the samples, or None.

    Covers a `TensorDataset`, a tensor, a numeric numpy array, and `Subset`s of those (what
    `random_split` returns); any subclass that changes how an item is read is left alone.
    """
    kind = type(dataset)
    if isinstance(dataset, torch.Tensor):
        if dataset.layout is torch.strided and dataset.dim() >= 1:
            return dataset.__getitem__
        return None
    if isinstance(dataset, np.ndarray):
        if dataset.ndim >= 2 and (dataset.dtype.kind in "biuf"):
            return lambda index: torch.as_tensor(dataset[index.numpy()])
        return None
    if kind.__getitem__ is TensorDataset.__getitem__ and not hasattr(kind, "__getitems__"):
        tensors = dataset.tensors
        if all(t.layout is torch.strided for t in tensors):
            return lambda index: [t[index] for t in tensors]
        return None
    if kind.__getitem__ is Subset.__getitem__ and kind.__getitems__ is Subset.__getitems__:
        inner = vectorized_gather(dataset.dataset)
        if inner is None:
            return None
        positions = torch.as_tensor(dataset.indices, dtype=torch.long)
        return lambda index: inner(positions[index])
    return None


_EXHAUSTED = object()


def is_exhausted(batch: Batch) -> bool:
    """Whether a worker's stream had no batch left to give."""
    return batch is _EXHAUSTED


class StreamReader:
    """One epoch of an iterable dataset: each worker reads its own iterator, in batches.

    Each worker's iterator is created in that worker's thread on its first job, so the
    dataset's `__iter__` sees that worker's `get_worker_info()`. A one-shot iterator (a
    generator, a file) cannot be copied per worker; its workers take turns under a lock.
    `skip` fast-forwards each worker's stream by that many batches, when resuming.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None,
        drop_last: bool,
        collate_fn: Callable[[Any], Any],
        num_streams: int,
        skip: dict[int, int] | None = None,
    ) -> None:
        self._dataset = dataset
        self._batch_size = batch_size
        self._drop_last = drop_last
        self._collate_fn = collate_fn
        self._iterators: list[Iterator[Any] | None] = [None] * num_streams
        self._finished = [False] * num_streams
        self._shared_lock = threading.Lock() if isinstance(dataset, Iterator) else None
        self._skip = skip or {}

    def __call__(self, job: JobState) -> Batch:
        worker = job.worker or 0
        if self._finished[worker]:
            return _EXHAUSTED
        iterator = self._iterators[worker]
        if iterator is None:
            iterator = self._iterators[worker] = iter(self._dataset)
            # Resuming: re-read and drop what this worker delivered before the checkpoint.
            per_batch = self._batch_size or 1
            for _ in islice(iterator, self._skip.get(worker, 0) * per_batch):
                pass
        if self._shared_lock is None:
            return self._next_batch(worker, iterator, job)
        with self._shared_lock:
            return self._next_batch(worker, iterator, job)

    def _next_batch(self, worker: int, iterator: Iterator[Any], job: JobState) -> Batch:
        if self._batch_size is None:
            for sample in islice(iterator, 1):
                return self._collate_fn(sample)
            self._finished[worker] = True
            return _EXHAUSTED
        samples = []
        for sample in iterator:
            samples.append(sample)
            if len(samples) == self._batch_size:
                return self._collate_fn(samples)
            if job.cancelled:
                raise Abandoned
        self._finished[worker] = True
        if not samples or self._drop_last:
            return _EXHAUSTED
        return self._collate_fn(samples)


def describe_indices(indices: Sequence[Any] | Any, limit: int = 16) -> str:
    """Indices for an error message: all of them, or the first `limit` and a count."""
    if not isinstance(indices, Sequence) or len(indices) <= limit:
        return repr(indices)
    head = ", ".join(repr(i) for i in indices[:limit])
    return f"[{head}, ...] ({len(indices)} indices)"
