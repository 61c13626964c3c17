"""What a worker does for one job of a map-style dataset: read one batch and finish it.

The cheapest read that gives the same batch as torch: one indexing operation per tensor for
in-memory tensors and arrays, `__getitems__` where the dataset has it, `__getitem__` per index
otherwise (retried, or skipped within the failure budget, as the loader was told).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from ._checkpoint import (
    END_REPORT,
    WORKER_START,
    DatasetResume,
    end_report,
    has_state,
    restore_process_rngs,
)
from ._cuda import pin_batch
from ._intra_op import SERIAL_ELEMENTS, on_one_thread
from ._retry import Reads
from ._sample_random import BatchKey, EpochSeeds, Reading, leave, reading
from ._worker_info import collate_in_thread, get_worker_info, in_worker_process, worker_dataset

Batch = Any
Gather = Callable[[torch.Tensor], Any]


class Abandoned(Exception):
    """Raised inside a job whose epoch was closed, to stop reading samples nobody will use."""


class JobState(Protocol):
    """What a read needs to know about its job."""

    indices: Any
    worker: int | None
    cancelled: bool
    state: Any  # the worker's dataset state after this batch, set by a reader that keeps it
    timing: Any  # seconds in each of `STAGES`, set where the batch is read


# The stages of a batch, in order: where a job's time goes, for the stats. A worker reads,
# then `Finish` maps each sample, collates, maps the batch and pins it.
STAGES = ("read", "map", "collate", "map_batch", "pin")
_FINISH_STAGES = len(STAGES) - 1

_finishing = threading.local()  # this thread's seconds in each `Finish` stage, for its job


def _finish_clock() -> list[float]:
    """This thread's seconds in each stage of `Finish` (map, collate, map_batch, pin) for the
    job it runs (`timed_call`), to add to."""
    spent = getattr(_finishing, "seconds", None)
    if spent is None:
        spent = _finishing.seconds = [0.0] * _FINISH_STAGES
    return spent


def timed_call(work: Callable[..., Batch], *args: Any) -> tuple[Batch, tuple[float, ...]]:
    """`work(*args)`, and the seconds it took on this thread in each of `STAGES` (reading is
    what `Finish` did not take): how a worker times the job it runs, for the stats."""
    finishing = _finishing.seconds = [0.0] * _FINISH_STAGES  # this job's, from now on
    started = time.perf_counter()
    batch = work(*args)
    took = time.perf_counter() - started
    return batch, (took - sum(finishing), *finishing)


class Finish:
    """What follows the reads of a batch, on the same worker: map each sample (`transform`),
    collate, map the batch (`batch_transform`), pin. Kept in one place so every kind of
    reader ends a batch the same way; each stage's time is counted (`timed_call`)."""

    def __init__(
        self,
        collate_fn: Callable[[Any], Any],
        transform: Callable[[Any], Any] | None,
        pin: bool,
        batch_transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.collate_fn = collate_fn
        self.transform = transform
        self.batch_transform = batch_transform
        self.pin = pin

    @property
    def after_collate(self) -> bool:
        """Whether a collated batch has more to go through (a batch map, pinning)."""
        return self.pin or self.batch_transform is not None

    def samples(
        self,
        samples: list[Any],
        keys: Sequence[Any] | None = None,
        current: Reading | None = None,
    ) -> Batch:
        """A batch from its samples; with the `current` reading, each sample's transform sees
        its key (its index, from `keys`) and the collate the batch's."""
        spent = _finish_clock()
        started = time.perf_counter()
        transform = self.transform
        if transform is not None:
            if current is None:
                samples = [transform(sample) for sample in samples]
            else:
                assert keys is not None
                transformed = []
                for key, sample in zip(keys, samples, strict=True):
                    current.key = key
                    transformed.append(transform(sample))
                samples = transformed
        if current is not None:
            current.key = BatchKey(keys)
        return self._collated(samples, spent, started)

    def keyed(
        self, samples: list[Any], keys: Sequence[Any] | None, seeds: EpochSeeds | None
    ) -> Batch:
        """`samples`, for samples read elsewhere (an async dataset's, on aload's loop): their
        `keys` (indices) name them to `sample_random()`; None, for a stream's."""
        with reading(None if keys is None else seeds) as current:
            return self.samples(samples, keys, current)

    def keyed_sample(self, sample: Any, key: Any, seeds: EpochSeeds | None) -> Batch:
        """`sample`, for a sample read elsewhere, as `keyed`."""
        with reading(None if key is None else seeds, key):
            return self.sample(sample)

    def sample(self, sample: Any) -> Batch:
        """A single sample, when batching is off (`batch_size=None`)."""
        spent = _finish_clock()
        started = time.perf_counter()
        if self.transform is not None:
            sample = self.transform(sample)
        return self._collated(sample, spent, started)

    def batch(self, batch: Batch) -> Batch:
        """A batch that is already collated (gathered in one operation)."""
        return self._after(batch, _finish_clock(), time.perf_counter())

    def _collated(self, samples: Any, spent: list[float], started: float) -> Batch:
        mapped = time.perf_counter()
        spent[0] += mapped - started
        batch = collate_in_thread(self.collate_fn, samples)
        collated = time.perf_counter()
        spent[1] += collated - mapped
        return self._after(batch, spent, collated) if self.after_collate else batch

    def _after(self, batch: Batch, spent: list[float], started: float) -> Batch:
        """The stages after collate: the batch's map, then pinning."""
        if self.batch_transform is not None:
            batch = self.batch_transform(batch)
            mapped = time.perf_counter()
            spent[2] += mapped - started
            started = mapped
        if self.pin:
            batch = pin_batch(batch)
            spent[3] += time.perf_counter() - started
        return batch


def per_worker_reader(
    dataset: Any, build: Callable[[Any], Callable[[JobState], Batch]]
) -> Callable[[JobState], Batch]:
    """A reader that reads each thread worker's own replica of `dataset` (see `replica`),
    with `build(replica)` made once per replica, in the worker that reads it; outside a
    thread worker it reads `dataset`."""
    readers: dict[int, Callable[[JobState], Batch]] = {}

    def read(job: JobState) -> Batch:
        own = worker_dataset()
        if own is None:
            own = dataset
        reader = readers.get(id(own))
        if reader is None:  # built where it reads: a resumed copy loads its worker's state
            reader = readers[id(own)] = build(own)
        return reader(job)

    return read


def map_reader(
    dataset: Any,
    finish: Finish,
    *,
    batched: bool,
    reads: Reads,
    seeds: EpochSeeds | None = None,
    resume: DatasetResume | None = None,
) -> Callable[[JobState], Batch]:
    """Return the function that turns one job's indices into one finished batch; with
    `seeds`, user code reading a sample sees its own `sample_random()`.

    A dataset with its own state (`has_state`) is first put where this worker's copy stood
    (`resume`), and each batch carries the state after it (the first, the one before it too),
    as `(worker, {"dataset": ...})`. In a worker process, the process's RNGs are put where
    they stood at the end of its last epoch (`resume`), and an `END_REPORT` job is answered.
    """
    info = get_worker_info()  # readers are built in the worker that uses them
    worker = 0 if info is None else info.id
    get_item = reads.retrying(dataset.__getitem__)
    read = _plain_map_reader(dataset, finish, get_item, batched, reads, seeds)
    if has_state(dataset):
        read = _keeping_state(dataset, worker, resume, read)
    if not in_worker_process():
        return read
    if resume is not None and (rng := resume.rng_for(worker)) is not None:
        restore_process_rngs(rng)

    def read_or_report(job: JobState) -> Batch:
        if isinstance(job.indices, str) and job.indices == END_REPORT:
            job.state = (worker, end_report(dataset))
            return EXHAUSTED
        return read(job)

    return read_or_report


def _keeping_state(
    dataset: Any, worker: int, resume: DatasetResume | None, read: Callable[[JobState], Batch]
) -> Callable[[JobState], Batch]:
    """`read` of a dataset with its own state: resumed where this worker's copy stood, each
    batch carrying the state after it."""
    if resume is not None and (state := resume.state_for(worker)) is not None:
        dataset.load_state_dict(state)
    before = [{"dataset": dataset.state_dict()}]  # goes with this copy's first batch

    def read_keeping_state(job: JobState) -> Batch:
        batch = read(job)
        state = {"dataset": dataset.state_dict()}
        if before:
            with suppress(IndexError):  # another thread sharing the copy took it
                state[WORKER_START] = before.pop()
        job.state = (worker, state)
        return batch

    return read_keeping_state


def _plain_map_reader(
    dataset: Any,
    finish: Finish,
    read: Callable[[Any], Any],
    batched: bool,
    reads: Reads,
    seeds: EpochSeeds | None,
) -> Callable[[JobState], Batch]:
    """`map_reader` without the dataset's own state."""
    if not batched:

        def read_one(job: JobState) -> Batch:
            with reading(seeds, job.indices):
                return finish.sample(read(job.indices))

        return read_one
    gather = batch_gather(dataset, finish)
    if gather is not None:
        alone = on_one_thread(gather)
        # Fewer rows than this make ops too small for torch to parallelise: the thread's
        # setting need not change (three calls into the OpenMP runtime, ~1 us a batch).
        serial_rows = SERIAL_ELEMENTS // max(1, row_elements(dataset))
        finished = finish.batch if finish.after_collate else None

        def read_gathered(job: JobState) -> Batch:
            index = job.indices
            if type(index) is not torch.Tensor:  # lists from samplers without a fast path
                index = torch.as_tensor(index, dtype=torch.long)
            batch = gather(index) if index.numel() < serial_rows else alone(index)
            return batch if finished is None else finished(batch)

        return read_gathered
    getitems = getattr(dataset, "__getitems__", None)
    if getitems:
        read_batch = reads.retrying(getitems)

        def read_whole(job: JobState) -> Batch:
            with reading(seeds, BatchKey(job.indices)) as current:
                return finish.samples(read_batch(job.indices), job.indices, current)

        return read_whole

    def read_each(job: JobState) -> Batch:
        samples = []
        skipped: list[int] = []
        current = None if seeds is None else Reading(seeds)
        token = None if current is None else current.enter()
        try:
            for index in job.indices:
                if job.cancelled:
                    raise Abandoned
                if current is not None:
                    current.key = index
                try:
                    samples.append(read(index))
                except Exception as error:
                    if not reads.may_skip(index, error):
                        raise
                    skipped.append(len(samples) + len(skipped))  # its position
            keys = job.indices
            if skipped:  # the samples' own indices (a batch may hold an index twice)
                keys = [index for at, index in enumerate(keys) if at not in skipped]
            return finish.samples(samples, keys, current)
        finally:
            if token is not None:
                leave(token)

    return read_each


def batch_gather(dataset: Any, finish: Finish) -> Gather | None:
    """The one-operation read of a whole batch, where it gives what the samples collated
    would (no transform, torch's `default_collate`); else None. A batch map and pinning
    still follow it (`Finish.batch`)."""
    if finish.collate_fn is not default_collate or finish.transform is not None:
        return None
    return vectorized_gather(dataset, pin=finish.pin)


def row_tensors(dataset: Any) -> list[tuple[int, int]]:
    """The (elements, bytes) of each tensor in one row that `vectorized_gather(dataset)`
    reads, from the dataset's shapes alone (no read, so nothing runs at construction)."""
    if isinstance(dataset, torch.Tensor | np.ndarray):
        row = math.prod(dataset.shape[1:])
        return [(row, row * dataset.itemsize)]
    if isinstance(dataset, Subset):
        return row_tensors(dataset.dataset)
    return [t for tensor in dataset.tensors for t in row_tensors(tensor)]


def batch_bytes(dataset: Any, batch_size: int) -> int:
    """The bytes of a batch of `batch_size` rows that `vectorized_gather(dataset)` reads."""
    return batch_size * sum(size for _, size in row_tensors(dataset))


def row_elements(dataset: Any) -> int:
    """The elements of the widest tensor of a row that `vectorized_gather(dataset)` reads:
    each tensor is gathered by its own op."""
    return max((elements for elements, _ in row_tensors(dataset)), default=0)


def vectorized_gather(dataset: Any, pin: bool = False) -> Gather | None:
    """Return a one-operation batch read equal to `default_collate` of the samples, or None.

    Covers a `TensorDataset`, a tensor, a numeric numpy array, and `Subset`s of those (what
    `random_split` returns); any subclass that changes how an item is read is left alone.
    With `pin`, tensor rows are gathered straight into pinned memory (one copy, not two).
    """
    kind = type(dataset)
    if isinstance(dataset, torch.Tensor):
        if dataset.layout is torch.strided and dataset.dim() >= 1:
            return (lambda index: pinned_rows(dataset, index)) if pin else partial(rows, dataset)
        return None
    if isinstance(dataset, np.ndarray):
        if dataset.ndim >= 2 and (dataset.dtype.kind in "biuf"):
            return lambda index: torch.as_tensor(dataset[index.numpy()])
        return None
    if kind.__getitem__ is TensorDataset.__getitem__ and not hasattr(kind, "__getitems__"):
        tensors = dataset.tensors
        if all(t.layout is torch.strided for t in tensors):
            if pin:
                return lambda index: [pinned_rows(t, index) for t in tensors]
            return lambda index: [rows(t, index) for t in tensors]
        return None
    if kind.__getitem__ is Subset.__getitem__ and kind.__getitems__ is Subset.__getitems__:
        inner = vectorized_gather(dataset.dataset, pin)
        if inner is None:
            return None
        positions = torch.as_tensor(dataset.indices, dtype=torch.long)
        return lambda index: inner(rows(positions, index))
    return None


def rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`tensor[index]` for a 1-D index: `index_select` gives the same tensor, about 3x as fast
    as advanced indexing for batches of a few hundred rows. It refuses negative indices,
    which indexing counts from the end: those (and the error for a bad index) take the
    indexing path."""
    try:
        return torch.index_select(tensor, 0, index)
    except IndexError:
        return tensor[index]


def pinned_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`tensor[index]` for a 1-D index, written straight into pinned host memory."""
    out = torch.empty((len(index), *tensor.shape[1:]), dtype=tensor.dtype, pin_memory=True)
    try:
        return torch.index_select(tensor, 0, index, out=out)
    except IndexError:  # negative indices (see `rows`)
        return out.copy_(tensor[index])


class _Exhausted:
    """The type of `EXHAUSTED`; it unpickles as the same object, so it can cross processes."""

    def __reduce__(self) -> str:
        return "EXHAUSTED"

    def __repr__(self) -> str:
        return "EXHAUSTED"


EXHAUSTED: Any = _Exhausted()
"""What a stream reader returns when its worker's stream has no batch left."""


def describe_indices(indices: Sequence[Any] | Any, limit: int = 16) -> str:
    """Indices for an error message: all of them, or the first `limit` and a count."""
    if isinstance(indices, torch.Tensor):
        indices = indices.tolist()
    if not isinstance(indices, Sequence) or len(indices) <= limit:
        return repr(indices)
    head = ", ".join(repr(i) for i in indices[:limit])
    return f"[{head}, ...] ({len(indices)} indices)"
