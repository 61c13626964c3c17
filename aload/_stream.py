"""What a worker does for one job of an iterable dataset: the next batch of its own stream."""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from ._checkpoint import (
    ENDED,
    RNGS,
    WORKER_START,
    has_state,
    process_rngs,
    restore_process_rngs,
)
from ._fetch import EXHAUSTED, Abandoned, Batch, Finish, JobState
from ._worker_info import in_worker_process, one_shot, worker_dataset

_END = object()  # what next() returns once a stream ends

WorkerState = dict[str, Any]
"""A worker's stream states after a batch: its dataset's and its iterator's `state_dict()`."""


class StreamReader:
    """One epoch of an iterable dataset: each worker reads its own iterator, in batches.

    Each worker's iterator is created in that worker's thread on its first job, so the
    dataset's `__iter__` sees that worker's `get_worker_info()`. A one-shot iterator (a
    generator, a file) cannot be copied per worker; its workers take turns under a lock.

    Where the worker's dataset (its replica, its process's copy) or its iterator has
    `state_dict()`, each batch carries their states as they stand after it (`job.state`; the
    first batch also the states right after `iter()`, for a checkpoint none of the worker's
    batches reached): resuming loads a worker's states into its dataset before `iter()` and
    into its iterator after, as torchdata's StatefulDataLoader does. A worker without them is
    fast-forwarded instead: `skip` batches re-read and dropped.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None,
        drop_last: bool,
        finish: Finish,
        num_streams: int,
        skip: dict[int, int] | None = None,
        states: dict[int, WorkerState] | None = None,
    ) -> None:
        self._dataset = dataset
        self._batch_size = batch_size
        self._drop_last = drop_last
        self._finish = finish
        self._iterators: list[Iterator[Any] | None] = [None] * num_streams
        self._stateful: list[tuple[Any, Any]] = [(None, None)] * num_streams
        self._initial: list[WorkerState | None] = [None] * num_streams
        self._finished = [False] * num_streams
        self._shared_lock = threading.Lock() if one_shot(dataset) else None
        self._skip = skip or {}
        self._states = states or {}

    def __call__(self, job: JobState) -> Batch:
        worker = job.worker or 0
        if self._finished[worker]:
            return EXHAUSTED
        iterator = self._iterators[worker]
        if iterator is None:
            state = self._states.get(worker)
            if state is not None and state.get(ENDED):  # its stream ended before the save
                self._finished[worker] = True
                return EXHAUSTED
            iterator = self._iterators[worker] = self._start(worker)
        if self._shared_lock is None:
            return self._next_batch(worker, iterator, job)
        with self._shared_lock:
            return self._next_batch(worker, iterator, job)

    def start_now(self) -> WorkerState | None:
        """Start the only stream on the calling thread now (a single-process epoch, as
        torch's starts it): the state it starts from, or None for a stream without one."""
        self._iterators[0] = self._start(0)
        initial, self._initial[0] = self._initial[0], None
        return initial

    def _start(self, worker: int) -> Iterator[Any]:
        """The worker's iterator, where its stream stood at the checkpoint when resuming."""
        own = worker_dataset()  # a thread worker's replica; a process has its own copy
        source = self._dataset if own is None else own
        state = self._states.get(worker)
        if state is not None and RNGS in state and in_worker_process():
            restore_process_rngs(state[RNGS])  # where this process's ended stream left them
        if state is not None and "dataset" in state:
            source.load_state_dict(state["dataset"])
        iterator = iter(source)
        if state is not None and "iterator" in state:
            iterator.load_state_dict(state["iterator"])
        self._stateful[worker] = stateful_parts(source, iterator)
        if state is None:  # re-read and drop what this worker delivered before
            for _ in range(self._skip.get(worker, 0) * (self._batch_size or 1)):
                if next(iterator, _END) is _END:
                    break
        # Where the stream starts: the state of a worker none of whose batches is delivered.
        # A state made by `__iter__`'s body does not exist before the first sample: then
        # such a worker resumes from the dataset the resumed loader holds.
        with contextlib.suppress(AttributeError):
            self._initial[worker] = self._snapshot(worker)
        return iterator

    def _snapshot(self, worker: int) -> WorkerState | None:
        """The worker's dataset and iterator states, as they stand now (after a batch)."""
        return snapshot(self._stateful[worker])

    def _next_batch(self, worker: int, iterator: Iterator[Any], job: JobState) -> Batch:
        samples = self._next_samples(worker, iterator, job)
        initial, self._initial[worker] = self._initial[worker], None
        ended = self._finished[worker]
        job.state = snapshot(self._stateful[worker], ended, initial)
        if ended and in_worker_process():
            # A worker process's RNGs carry on into its next epoch when it persists: the
            # state saved between epochs takes them, for the resumed loader's new workers.
            job.state = {**(job.state or {ENDED: True}), RNGS: process_rngs()}
        if samples is None:
            return EXHAUSTED
        if self._batch_size is None:
            return self._finish.sample(samples[0])
        return self._finish.samples(samples)

    def _next_samples(
        self, worker: int, iterator: Iterator[Any], job: JobState
    ) -> list[Any] | None:
        """The worker's next batch of samples (one, unbatched); None once its stream ends."""
        wanted = self._batch_size or 1
        samples = []
        # next(), not a for loop: that calls iter() again, and a dataset that is its own
        # iterator may start over in __iter__ (torch's fetcher calls next() too).
        while (sample := next(iterator, _END)) is not _END:
            samples.append(sample)
            if len(samples) == wanted:
                return samples
            if job.cancelled:
                raise Abandoned
        self._finished[worker] = True
        if not samples or self._drop_last:
            return None
        return samples


def stateful_parts(source: Any, iterator: Any) -> tuple[Any, Any]:
    """Which of a stream's dataset and iterator keep a state (None for one that does not).
    A dataset that is its own iterator keeps one state, the iterator's: it is loaded after
    iter(), which may be what makes it (as torchdata keeps it)."""
    return (
        source if iterator is not source and has_state(source) else None,
        iterator if has_state(iterator) else None,
    )


def snapshot(
    parts: tuple[Any, Any], ended: bool = False, initial: WorkerState | None = None
) -> WorkerState | None:
    """A stream's states as they stand now (`stateful_parts`); None when it keeps none.
    `ended`: its stream ended, so a resume reads nothing more from it (its state may say
    "start over"); `initial`: the state it started from, which goes with its first batch."""
    dataset, iterator = parts
    if dataset is None and iterator is None:
        return None
    state: WorkerState = {}
    if dataset is not None:
        state["dataset"] = dataset.state_dict()
    if iterator is not None:
        state["iterator"] = iterator.state_dict()
    if ended:
        state[ENDED] = True
    if initial is not None:
        state[WORKER_START] = initial
    return state


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
