"""The loaders under test, each behind the same small interface: build it, then drain it.

torch's DataLoader and aload are always there; torchdata's nodes and SPDL's pipeline join in when
they are installed. Every loader reads the same dataset through the same sampler and collate.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import anyio
import torch
import torch.utils.data as tud

import aload
from aload.collate import default_collate
from aload.workers.loop import loop_options


@dataclass(frozen=True)
class Drained:
    """What one pass over a fresh loader delivered, timed from the call that built it; its
    peak memory where the pass measured it itself (run in a fresh process); and the median
    loop body where that body is a training step."""

    samples: int
    first_batch_s: float
    elapsed_s: float
    peak_mib: float | None = None
    step_s: float | None = None


def batch_len(batch: Any) -> int:
    """Samples in a batch: its length, or the length of its first field."""
    if isinstance(batch, (list, tuple)):
        return batch_len(batch[0])
    return len(batch)


def drain(make: Callable[[], Iterable[Any]], seconds: float | None = None) -> Drained:
    """Build a loader and iterate it with a plain `for`: one epoch, or its first `seconds`
    (then the epoch is closed, after the clock stops: an aload epoch stops its workers)."""
    started = time.perf_counter()
    samples, first = 0, None
    epoch = iter(make())
    for batch in epoch:
        first = first or time.perf_counter() - started
        samples += batch_len(batch)
        if seconds is not None and time.perf_counter() - started > seconds:
            elapsed = time.perf_counter() - started
            epoch.close()  # type: ignore[attr-defined]
            return Drained(samples, first, elapsed)
    return Drained(samples, first or 0.0, time.perf_counter() - started)


def drain_async(make: Callable[[], Any]) -> Drained:
    """Build a loader and iterate it with `async for` (the event loop's start is not timed)."""

    async def run() -> Drained:
        started = time.perf_counter()
        samples, first = 0, None
        async for batch in make():
            first = first or time.perf_counter() - started
            samples += batch_len(batch)
        return Drained(samples, first or 0.0, time.perf_counter() - started)

    return anyio.run(run)


def drain_warm(make: Callable[[], Any]) -> Drained:
    """Build a loader with workers that stay, read one epoch untimed (the workers start),
    then time the next: what a loop over many epochs pays per epoch."""
    loader = make()
    for _ in loader:
        pass
    drained = drain(lambda: loader)
    close = getattr(loader, "close", None)
    if close is not None:
        close()
    return drained


def drain_stepping(step_seconds: float) -> Callable[[Callable[[], Iterable[Any]]], Drained]:
    """A drive that iterates a fresh loader with a plain `for` and waits `step_seconds` after
    each batch, leaving the CPU free (a training step on a GPU): the loader must read ahead
    while the step runs."""

    def drive(make: Callable[[], Iterable[Any]]) -> Drained:
        def batches() -> Iterator[Any]:
            for batch in make():
                yield batch
                time.sleep(step_seconds)

        return drain(batches)

    return drive


def drain_epochs(
    epochs: int, seconds: float | None = None
) -> Callable[[Callable[[], Any]], Drained]:
    """A drive that builds a loader and iterates `epochs` epochs of it with a plain `for`,
    timed whole (`drain`, stopped after `seconds` if given): what a loader that learns across
    epochs (`worker_mode="auto"`) pays for its search, next to loaders that do not search."""

    def drive(make: Callable[[], Iterable[Any]]) -> Drained:
        def batches() -> Iterator[Any]:
            loader = make()
            try:
                for _ in range(epochs):
                    yield from loader
            finally:
                close = getattr(loader, "close", None)
                if close is not None:
                    close()

        return drain(batches, seconds)

    return drive


@dataclass(frozen=True)
class Contender:
    """One loader configuration: `family` names the loader, `workers` its degree of parallelism."""

    family: str
    workers: int
    make: Callable[[], Any]
    drive: Callable[[Callable[[], Any]], Drained] = drain
    detail: str = ""

    @property
    def name(self) -> str:
        detail = f", {self.detail}" if self.detail else ""
        return f"{self.family} workers={self.workers}{detail}"


def sampler_for(dataset: Any, shuffle: bool) -> tud.Sampler[int]:
    if shuffle:
        return tud.RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
    return tud.SequentialSampler(dataset)


class BatchFetcher:
    """Reads and collates one batch of indices the way torch's map-style fetcher does."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __call__(self, indices: list[int]) -> Any:
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(indices) if getitems else [self.dataset[i] for i in indices]
        return default_collate(items)


class AsyncBatchFetcher:
    """Awaits one batch's items concurrently (a dataset with `async def __getitem__`)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    async def __call__(self, indices: list[int]) -> Any:
        items = await asyncio.gather(*(self.dataset[i] for i in indices))
        return default_collate(items)


def torch_loader(dataset: Any, workers: int, detail: str = "", **kwargs: Any) -> Contender:
    return Contender(
        "torch",
        workers,
        lambda: tud.DataLoader(dataset, num_workers=workers, **kwargs),
        detail=detail,
    )


def aload_loader(
    dataset: Any, workers: int, *, asynchronous: bool = False, detail: str = "", **kwargs: Any
) -> Contender:
    """aload with a plain `for`, or with `async for` where `asynchronous`."""
    loop = "async for" if asynchronous else "for"
    return Contender(
        f"aload {kwargs.get('worker_mode', 'thread')}",
        workers,
        lambda: aload.DataLoader(dataset, num_workers=workers, **kwargs),
        drain_async if asynchronous else drain,
        ", ".join(filter(None, [loop, detail])),
    )


def aload_plan(plan: Any, workers: int, detail: str = "", **options: Any) -> Contender:
    """aload running a composed `aload.Plan`, with a plain `for`."""
    return Contender("aload plan", workers, lambda: plan.loader(**options), drain, detail)


def torchdata_nodes(
    dataset: Any, workers: int, batch_size: int, *, shuffle: bool = False, method: str = "thread"
) -> list[Contender]:
    """torchdata.nodes: sampler → batcher → (parallel) mapper → loader; [] if not installed."""
    try:
        import torchdata.nodes as tn
    except ImportError:
        return []

    def make() -> Any:
        node: Any = tn.Batcher(tn.SamplerWrapper(sampler_for(dataset, shuffle)), batch_size, False)
        if workers == 0:
            node = tn.Mapper(node, BatchFetcher(dataset))
        else:
            node = tn.ParallelMapper(node, BatchFetcher(dataset), workers, method=method)
        return tn.Loader(node)

    return [Contender(f"torchdata nodes {method}", workers, make)]


class SpdlLoader:
    """An SPDL pipeline per epoch: batch sampler → `fetch` with `concurrency` → sink."""

    def __init__(self, batches: Iterable[list[int]], fetch: Any, concurrency: int) -> None:
        self.batches, self.fetch, self.concurrency = batches, fetch, concurrency

    def __iter__(self) -> Iterator[Any]:
        from spdl.pipeline import PipelineBuilder

        builder: Any = PipelineBuilder()
        pipeline = (
            builder.add_source(self.batches)
            .pipe(self.fetch, concurrency=self.concurrency, output_order="input")
            .add_sink(2 * self.concurrency)
            .build(num_threads=max(1, self.concurrency))
        )
        with pipeline.auto_stop():
            yield from pipeline.get_iterator()


def spdl_pipeline(
    dataset: Any, workers: int, batch_size: int, *, shuffle: bool = False, awaited: bool = False
) -> list[Contender]:
    """SPDL with `workers` batches in flight on threads (awaited on its loop for async
    datasets); [] if not installed."""
    try:
        import spdl.pipeline  # noqa: F401
    except ImportError:
        return []
    fetch = AsyncBatchFetcher(dataset) if awaited else BatchFetcher(dataset)

    def make() -> SpdlLoader:
        batches = tud.BatchSampler(sampler_for(dataset, shuffle), batch_size, drop_last=False)
        return SpdlLoader(batches, fetch, max(1, workers))

    return [Contender("spdl pipeline", workers, make)]


# -- the limits: the least code that does a workload's work, with no loader at all ----------


def limit_gather(data: tud.TensorDataset, batch_size: int) -> Contender:
    """A shuffled in-memory epoch by hand: one `randperm`, one `index_select` per tensor per
    batch (about 3x as fast as `tensor[index]`, so the stricter of the two limits)."""

    def batches() -> Iterator[list[torch.Tensor]]:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield [torch.index_select(t, 0, index) for t in data.tensors]

    return Contender("limit", 0, batches, detail="randperm + index_select, no loader")


def limit_threads(data: Any, batch_size: int, threads: int) -> Contender:
    """Blocking reads by hand: `threads` threads of a `ThreadPoolExecutor` read every item,
    collated in order into batches."""

    def batches() -> Iterator[Any]:
        with ThreadPoolExecutor(threads) as pool:
            items = pool.map(data.__getitem__, range(len(data)))
            while batch := list(itertools.islice(items, batch_size)):
                yield default_collate(batch)

    return Contender("limit", threads, batches, detail="ThreadPoolExecutor.map, no loader")


def limit_processes(work: Callable[[Any], Any], items: list[Any], processes: int) -> Contender:
    """CPU work by hand: `work` over every item on a pool of `processes` forked processes
    (started before the clock), in chunks, with no reads and no batching."""

    def drive(make: Callable[[], Any]) -> Drained:
        context = multiprocessing.get_context("fork")
        with context.Pool(processes) as pool:
            pool.map(abs, range(processes))  # every process up
            started = time.perf_counter()
            results = pool.imap(work, items, chunksize=max(1, len(items) // (8 * processes)))
            next(results)
            first = time.perf_counter() - started
            done = 1 + sum(1 for _ in results)
            elapsed = time.perf_counter() - started
        return Drained(done, first, elapsed)

    return Contender("limit", processes, lambda: None, drive, "its CPU work alone, on processes")


def limit_asyncio(data: Any, concurrency: int) -> Contender:
    """Awaited reads by hand: a bare asyncio loop with `concurrency` tasks, each with one
    read in flight at a time, and no batching; on uvloop where aload's loop is."""

    options = loop_options()

    def drive(make: Callable[[], Any]) -> Drained:
        async def run() -> Drained:
            started = time.perf_counter()
            indices = iter(range(len(data)))
            first: list[float] = []

            async def reader() -> int:
                done = 0
                for index in indices:
                    await data[index]
                    if not first:
                        first.append(time.perf_counter() - started)
                    done += 1
                return done

            counts = await asyncio.gather(*(reader() for _ in range(concurrency)))
            return Drained(sum(counts), first[0], time.perf_counter() - started)

        return anyio.run(run, backend="asyncio", backend_options=options)

    loop = "uvloop" if options["use_uvloop"] else "asyncio"
    return Contender("limit", 0, lambda: None, drive, f"{loop}, {concurrency} tasks, no loader")
