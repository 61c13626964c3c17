"""What aload's event loop does for one job of an async dataset: await its samples.

Reads overlap on the loop pool's fetchers; the batch is then finished (transform, collate,
pin) on a CPU worker, so CPU work never holds up the reads.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any

import anyio

from ._fetch import EXHAUSTED, Batch, Finish, JobState
from ._retry import Reads
from ._sample_random import BatchKey, EpochSeeds, fetcher_reading, reading
from .workers.loop import LoopPool

_SKIPPED: Any = object()


def is_async_map_style(dataset: Any) -> bool:
    """Whether the dataset's `__getitem__` (or `__getitems__`) is a coroutine function."""
    kind = type(dataset)
    return any(
        inspect.iscoroutinefunction(getattr(kind, name, None))
        for name in ("__getitem__", "__getitems__")
    )


class AsyncMapReader:
    """Reads one batch of an async map-style dataset; awaits `__getitems__` when it is async.

    Item reads go to the loop pool's fetchers, so all batches in flight share its
    `max_concurrency`; a read that still fails after retries is dropped if the failure
    budget allows, else it fails the batch.
    """

    def __init__(
        self,
        dataset: Any,
        finish: Finish,
        *,
        batched: bool,
        reads: Reads,
        pool: LoopPool,
        seeds: EpochSeeds | None = None,
    ) -> None:
        self._getitem = reads.aretrying(dataset.__getitem__)
        getitems = getattr(dataset, "__getitems__", None)
        async_getitems = getitems if inspect.iscoroutinefunction(getitems) else None
        self._getitems = reads.aretrying(async_getitems) if async_getitems else None
        self._finish = finish
        self._batched = batched
        self._reads = reads
        self._pool = pool
        self._seeds = seeds

    async def __call__(self, job: JobState) -> Batch:
        if not self._batched:
            (sample,) = await self._pool.read_all(self._read_one, [job.indices])
            finish = partial(self._finish.keyed_sample, sample, job.indices, self._seeds)
            return await self._pool.run_cpu(finish, (sample, job.indices))
        if self._getitems is not None:
            with reading(self._seeds, BatchKey(job.indices)):
                samples = await self._getitems(job.indices)
            keys = job.indices
        else:
            read = await self._pool.read_all(self._read_one, job.indices)
            kept = [i for i, sample in enumerate(read) if sample is not _SKIPPED]
            samples = [read[i] for i in kept]
            keys = [job.indices[i] for i in kept]
        finish = partial(self._finish.keyed, samples, keys, self._seeds)
        return await self._pool.run_cpu(finish, (samples, keys))

    async def _read_one(self, index: Any) -> Any:
        if self._seeds is not None:
            # Runs in a fetcher task of aload's loop, one read at a time: the task keeps one
            # Reading in its own context, pointed at each sample as it is read.
            fetcher_reading(self._seeds, index)
        try:
            return await self._getitem(index)
        except Exception as error:
            if self._batched and self._reads.may_skip(index, error):
                return _SKIPPED
            raise


class AsyncStreamReader:
    """Reads an async iterable (an async generator, a stream) batch by batch, in order."""

    def __init__(
        self,
        dataset: Any,
        finish: Finish,
        batch_size: int | None,
        drop_last: bool,
        pool: LoopPool,
        skip: int = 0,
    ) -> None:
        self._dataset = dataset
        self._finish = finish
        self._batch_size = batch_size
        self._drop_last = drop_last
        self._pool = pool
        self._skip = skip
        self._iterator: Any = None
        self._finished = False
        self._lock: anyio.Lock | None = None

    async def __call__(self, job: JobState) -> Batch:
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:  # one stream: batches are taken from it one after another
            samples = await self._next_samples()
        if samples is None:
            return EXHAUSTED
        if self._batch_size is None:
            finish = partial(self._finish.keyed_sample, samples[0], None, None)
            return await self._pool.run_cpu(finish, (samples[0], None))
        finish = partial(self._finish.keyed, samples, None, None)
        return await self._pool.run_cpu(finish, (samples, None))

    async def _next_samples(self) -> list[Any] | None:
        if self._finished:
            return None
        wanted = self._batch_size or 1
        samples: list[Any] = []
        try:
            if self._iterator is None:
                self._iterator = aiter(self._dataset)
                for _ in range(self._skip * wanted):  # resuming: drop what was delivered
                    await anext(self._iterator)
            while len(samples) < wanted:
                samples.append(await anext(self._iterator))
        except StopAsyncIteration:
            self._finished = True
        if not samples or (self._finished and self._drop_last and self._batch_size):
            return None
        return samples
