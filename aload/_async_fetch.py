"""What aload's event loop does for one job of an async dataset: await its samples.

Reads overlap on the loop pool's fetchers; the batch is then finished (transform, collate,
pin) on a CPU worker, so CPU work never holds up the reads.
"""

from __future__ import annotations

import inspect
import time
from functools import partial
from typing import Any

import anyio

from ._checkpoint import ENDED, WORKER_START, DatasetResume, has_state
from ._fetch import EXHAUSTED, STAGES, Batch, Finish, JobState
from ._retry import Reads
from ._sample_random import BatchKey, EpochSeeds, fetcher_reading, reading
from ._stream import snapshot, stateful_parts
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
    budget allows, else it fails the batch. A dataset with its own state is put back where a
    resumed epoch left it (`resume`), and each batch carries the state after its reads.
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
        resume: DatasetResume | None = None,
    ) -> None:
        self._dataset = dataset
        self._stateful = has_state(dataset)
        self._resume = resume
        self._before: dict[str, Any] | None = None
        self._getitem = reads.aretrying(dataset.__getitem__)
        getitems = getattr(dataset, "__getitems__", None)
        async_getitems = getitems if inspect.iscoroutinefunction(getitems) else None
        self._getitems = reads.aretrying(async_getitems) if async_getitems else None
        self._finish = finish
        self._batched = batched
        self._reads = reads
        self._pool = pool
        self._seeds = seeds
        # A read with no seeds to point and no budget to skip on is the dataset's own: the
        # fetchers await it with no coroutine of ours around it.
        skips = batched and reads.skips
        self._read = self._read_one if seeds is not None or skips else self._getitem
        self._skips = skips

    async def __call__(self, job: JobState) -> Batch:
        if self._stateful:
            self._start_state()
        after: dict[str, Any] = {}  # the dataset's state after this batch's last read
        read_one = self._read if not self._stateful else partial(self._read_noting, after)
        # Seconds in each stage (the fetchers' reads count on the pool's read clock).
        timing = job.timing = [0.0] * len(STAGES)
        if not self._batched:
            (sample,) = await self._pool.read_all(read_one, [job.indices])
            self._keep_state(job, after)
            finish = partial(self._finish.keyed_sample, sample, job.indices, self._seeds)
            return await self._pool.run_cpu(finish, (sample, job.indices), timing)
        if self._getitems is not None:
            started = time.perf_counter()
            with reading(self._seeds, BatchKey(job.indices)):
                samples = await self._getitems(job.indices)
            timing[0] += time.perf_counter() - started
            if self._stateful:
                after["dataset"] = self._dataset.state_dict()
            keys = job.indices
        else:
            samples = await self._pool.read_all(read_one, job.indices)
            keys = job.indices
            if self._skips and any(sample is _SKIPPED for sample in samples):  # dropped reads
                kept = [i for i, sample in enumerate(samples) if sample is not _SKIPPED]
                samples, keys = [samples[i] for i in kept], [keys[i] for i in kept]
        self._keep_state(job, after)
        finish = partial(self._finish.keyed, samples, keys, self._seeds)
        return await self._pool.run_cpu(finish, (samples, keys), timing)

    def _start_state(self) -> None:
        """At the first batch, on aload's loop: load where a resumed epoch left the dataset,
        and note the state reads start from (it goes with the first batch)."""
        resume, self._resume = self._resume, None
        if resume is not None and (state := resume.state_for(0)) is not None:
            self._dataset.load_state_dict(state)
        if self._before is None:
            self._before = {"dataset": self._dataset.state_dict()}

    async def _read_noting(self, after: dict[str, Any], index: Any) -> Any:
        """`_read_one`, noting the dataset's state as the read ends (before any other read
        can move it, with `max_concurrency=1`: reads of other batches overlap otherwise)."""
        try:
            return await self._read_one(index)
        finally:
            after["dataset"] = self._dataset.state_dict()

    def _keep_state(self, job: JobState, after: dict[str, Any]) -> None:
        """The batch carries the dataset's state after its last read."""
        if not self._stateful:
            return
        state = dict(after)
        if self._before:
            state[WORKER_START], self._before = self._before, {}
        job.state = (0, state)

    async def _read_one(self, index: Any) -> Any:
        if self._seeds is not None:
            # Runs in a fetcher task of aload's loop, one read at a time: the task keeps one
            # Reading in its own context, pointed at each sample as it is read.
            fetcher_reading(self._seeds, index)
        try:
            return await self._getitem(index)
        except Exception as error:
            if self._skips and self._reads.may_skip(index, error):
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
        state: dict[str, Any] | None = None,
    ) -> None:
        self._dataset = dataset
        self._finish = finish
        self._batch_size = batch_size
        self._drop_last = drop_last
        self._pool = pool
        self._skip = skip
        self._state = state  # where a resumed stream stood (its dataset's, its iterator's)
        self._iterator: Any = None
        self._stateful: tuple[Any, Any] = (None, None)
        self._initial: dict[str, Any] | None = None
        self._finished = False
        self._lock: anyio.Lock | None = None

    async def __call__(self, job: JobState) -> Batch:
        if self._lock is None:
            self._lock = anyio.Lock()
        timing = job.timing = [0.0] * len(STAGES)  # seconds in each stage
        async with self._lock:  # one stream: batches are taken from it one after another
            started = time.perf_counter()
            samples = await self._next_samples()
            timing[0] = time.perf_counter() - started
            job.state = self._snapshot()
        if samples is None:
            return EXHAUSTED
        if self._batch_size is None:
            finish = partial(self._finish.keyed_sample, samples[0], None, None)
            return await self._pool.run_cpu(finish, (samples[0], None), timing)
        finish = partial(self._finish.keyed, samples, None, None)
        return await self._pool.run_cpu(finish, (samples, None), timing)

    async def _next_samples(self) -> list[Any] | None:
        if self._finished:
            return None
        wanted = self._batch_size or 1
        samples: list[Any] = []
        try:
            if self._iterator is None:
                if self._state is not None and self._state.get(ENDED):
                    self._finished = True  # it ended before the save
                    return None
                await self._start()
            while len(samples) < wanted:
                samples.append(await anext(self._iterator))
        except StopAsyncIteration:
            self._finished = True
        if not samples or (self._finished and self._drop_last and self._batch_size):
            return None
        return samples

    async def _start(self) -> None:
        """Open the stream where it stood: the dataset's state loaded before `aiter()`, the
        iterator's after (as for streams read by workers), or else the delivered batches read
        again and dropped."""
        dataset, state = self._dataset, self._state
        if state is not None and "dataset" in state:
            dataset.load_state_dict(state["dataset"])
        self._iterator = iterator = aiter(dataset)
        if state is not None and "iterator" in state:
            iterator.load_state_dict(state["iterator"])
        self._stateful = stateful_parts(dataset, iterator)
        if state is None:
            for _ in range(self._skip * (self._batch_size or 1)):
                await anext(iterator)
        self._initial = self._snapshot()

    def _snapshot(self) -> dict[str, Any] | None:
        """The stream's states as they stand now (after a batch); the first batch's also
        brings the one it started from."""
        initial, self._initial = self._initial, None
        return snapshot(self._stateful, self._finished, initial)
