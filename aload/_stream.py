"""What a worker does for one job of an iterable dataset: the next batch of its own stream."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

from ._fetch import EXHAUSTED, Abandoned, Batch, Finish, JobState
from ._worker_info import worker_dataset


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
        finish: Finish,
        num_streams: int,
        skip: dict[int, int] | None = None,
    ) -> None:
        self._dataset = dataset
        self._batch_size = batch_size
        self._drop_last = drop_last
        self._finish = finish
        self._iterators: list[Iterator[Any] | None] = [None] * num_streams
        self._finished = [False] * num_streams
        self._shared_lock = threading.Lock() if isinstance(dataset, Iterator) else None
        self._skip = skip or {}

    def __call__(self, job: JobState) -> Batch:
        worker = job.worker or 0
        if self._finished[worker]:
            return EXHAUSTED
        iterator = self._iterators[worker]
        if iterator is None:
            own = worker_dataset()  # a thread worker's replica; a process has its own copy
            iterator = self._iterators[worker] = iter(self._dataset if own is None else own)
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
                return self._finish.sample(sample)
            self._finished[worker] = True
            return EXHAUSTED
        samples = []
        for sample in iterator:
            samples.append(sample)
            if len(samples) == self._batch_size:
                return self._finish.samples(samples)
            if job.cancelled:
                raise Abandoned
        self._finished[worker] = True
        if not samples or self._drop_last:
            return EXHAUSTED
        return self._finish.samples(samples)


def length_check(dataset: Any, reported: int, num_workers: int) -> Callable[[int], None]:
    """torch's warning, word for word, for an iterable dataset that yields more batches than
    the length `len(loader)` read from it: a sign that its workers do not shard it."""

    def check(yielded: int) -> None:
        if yielded <= reported:
            return
        message = (
            f"Length of IterableDataset {dataset} was reported to be {reported}"
            f"(when accessing len(dataloader)), but {yielded} samples have been fetched. "
        )
        if num_workers > 0:
            message += (
                "For multiprocessing data-loading, this could be caused by not properly "
                "configuring the IterableDataset replica at each worker. Please see "
                "https://pytorch.org/docs/stable/data.html#torch.utils.data.IterableDataset "
                "for examples."
            )
        warnings.warn(message, stacklevel=4)

    return check
