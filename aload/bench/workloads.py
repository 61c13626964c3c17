"""The suite: each workload is a dataset and the loaders that read it, sized by `Settings`."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.utils.data as tud

import aload
from aload.bench import datasets as ds
from aload.bench import training
from aload.bench.contenders import (
    Contender,
    aload_loader,
    aload_plan,
    drain_epochs,
    drain_stepping,
    drain_warm,
    limit_asyncio,
    limit_gather,
    limit_processes,
    limit_threads,
    spdl_pipeline,
    torch_loader,
    torchdata_nodes,
)


@dataclass(frozen=True)
class Settings:
    """Sizes and worker counts for a run: `scale` multiplies item counts, `workers` (when set)
    replaces every workload's own worker counts; `given`: item sizes calibrated by the process
    that started this one (`calibrated`), so that every process of a run gives an item the
    same work (calibrated in each process, 20 calibrations of one item cost spread 1.6x)."""

    scale: float = 1.0
    workers: int | None = None
    given: dict[str, int] = dataclasses.field(default_factory=dict, compare=False)

    def calibrated(self) -> dict[str, int]:
        """The item sizes this process has calibrated so far, to give a process it starts."""
        return {name: self.__dict__[name] for name in _CALIBRATED if name in self.__dict__}

    def items(self, count: int) -> int:
        return max(1, round(count * self.scale))

    def counts(self, *defaults: int) -> tuple[int, ...]:
        return defaults if self.workers is None else (self.workers,)

    @cached_property
    def numpy_size(self) -> int:
        return self.given.get("numpy_size") or ds.numpy_size_for(0.002)

    @cached_property
    def python_rounds(self) -> int:
        return self.given.get("python_rounds") or ds.python_rounds_for(0.0005)


_CALIBRATED = ("numpy_size", "python_rounds")  # Settings' sizes calibrated on this machine


# A run lasts at least this long: a fresh loader is built and drained again until it has. An
# in-memory epoch can take 10 ms, where one preemption on a shared machine moves the figure
# by half; users' epochs are long.
MIN_RUN_S = 0.3


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    contenders: list[Contender]
    min_run_s: float = MIN_RUN_S  # 0: one pass a run (runs sized to last on their own)


def _every_loader(
    data: Any,
    batch_size: int,
    workers: int,
    *,
    threads: int | None = None,
    shuffle: bool = False,
    peer_method: str = "thread",
) -> list[Contender]:
    """The rows most workloads share: torch with `workers` processes, aload with `threads`
    (`for` and `async for`) and with `workers` processes, then the peers with `threads`."""
    threads = workers if threads is None else threads
    kw: dict[str, Any] = {"batch_size": batch_size, "shuffle": shuffle}
    return [
        torch_loader(data, workers, **kw),
        aload_loader(data, threads, **kw),
        aload_loader(data, threads, asynchronous=True, **kw),
        *([aload_loader(data, workers, worker_mode="process", **kw)] if workers else []),
        *torchdata_nodes(data, threads, batch_size, shuffle=shuffle, method=peer_method),
        *spdl_pipeline(data, threads, batch_size, shuffle=shuffle),
    ]


def _forkserver(data: Any, workers: int, **kwargs: Any) -> Contender:
    """aload's process workers started by a fork server instead of the default fork (the
    server started once before the suite; the fresh-process cases show its first start)."""
    return aload_loader(
        data,
        workers,
        detail="forkserver",
        worker_mode="process",
        multiprocessing_context="forkserver",
        **kwargs,
    )


def _tensor(s: Settings) -> Workload:
    """An in-memory TensorDataset, shuffled: the loader's own overhead per batch."""
    n = s.items(100_000)
    data = tud.TensorDataset(torch.randn(n, 64), torch.randint(0, 10, (n,)))
    contenders = [limit_gather(data, 256)]
    contenders += [c for w in s.counts(0, 2) for c in _every_loader(data, 256, w, shuffle=True)]
    return Workload("tensor", f"TensorDataset {n:,} x 64, batch 256, shuffled", contenders)


def _io(s: Settings) -> Workload:
    """A blocking 2 ms read per item (a file, a network fetch): how many reads overlap."""
    n = s.items(2048)
    data = ds.SleepDataset(n, 0.002)
    (processes,), (threads,) = s.counts(8), s.counts(32)
    return Workload(
        "io",
        f"2 ms blocking read per item, {n:,} items, batch 32 (threads are cheap: 32 of them)",
        [limit_threads(data, 32, threads), *_every_loader(data, 32, processes, threads=threads)],
    )


def _async(s: Settings) -> Workload:
    """An awaited 2 ms read per item (async __getitem__; blocking for the peers)."""
    n = s.items(4096)
    awaited, blocking = ds.AwaitingDataset(n, 0.002), ds.SleepDataset(n, 0.002)
    (processes,) = s.counts(8)
    contenders = [limit_asyncio(awaited, 256), torch_loader(blocking, processes, batch_size=32)]
    for concurrency in (64, 256):
        for asynchronous in (False, True):
            contenders.append(
                aload_loader(
                    awaited,
                    0,
                    asynchronous=asynchronous,
                    detail=f"max_concurrency={concurrency}",
                    batch_size=32,
                    max_concurrency=concurrency,
                )
            )
        # SPDL awaits whole batches: concurrency/32 batches of 32 reads is the same read count.
        contenders += spdl_pipeline(awaited, concurrency // 32, 32, awaited=True)
    return Workload(
        "async",
        f"2 ms awaited read per item (blocking for torch), {n:,} items, batch 32",
        contenders,
    )


def _remote_decode(s: Settings) -> Workload:
    """An awaited 2 ms read, then ~0.5 ms of GIL-holding decode per item: two executors."""
    n = s.items(2048)
    (w,) = s.counts(2)
    decode = ds.Decode(s.python_rounds)
    awaited = ds.AwaitingDataset(n, 0.002)
    blocking = ds.ReadThenDecode(n, 0.002, decode)
    kw: dict[str, Any] = {"batch_size": 32}
    plan = aload.Plan(awaited, batch_size=32).read(aload.loop(64)).map(decode, aload.processes(w))
    detail = "reads on aload's loop, decode on processes"
    # The same reads blocking (a plain dataset), on 16 threads, the decode on the processes.
    split = aload.Plan(ds.SleepDataset(n, 0.002), batch_size=32).read(aload.threads(16))
    split = split.map(decode, aload.processes(w))
    split_detail = "blocking reads on 16 threads, decode on processes"
    warm = [
        torch_loader(blocking, 8, detail="persistent", persistent_workers=True, **kw),
        aload_plan(plan, w, f"{detail}, persistent", persistent_workers=True),
        aload_plan(split, w, f"{split_detail}, persistent", persistent_workers=True),
    ]
    return Workload(
        "remote-decode",
        f"an awaited 2 ms read (blocking for torch), then ~0.5 ms of pure-Python decode per "
        f"item (holds the GIL), {n:,} items, batch 32; the limit: the decodes alone on {w} "
        "processes, started before the clock; persistent rows: an epoch after the first",
        [
            limit_processes(decode.index, list(range(n)), w),
            torch_loader(blocking, 8, **kw),
            aload_loader(blocking, 8, worker_mode="process", **kw),
            aload_loader(awaited, w, transform=decode, detail="reads on aload's loop", **kw),
            aload_plan(plan, w, detail),
            aload_plan(split, w, split_detail),
            *[dataclasses.replace(row, drive=drain_warm) for row in warm],
        ],
    )


def _numpy(s: Settings) -> Workload:
    """~2 ms of numpy work per item that releases the GIL: threads in parallel."""
    n = s.items(512)
    data = ds.NumpyDataset(n, s.numpy_size)
    (w,) = s.counts(2)
    return Workload(
        "numpy",
        f"~2 ms of GIL-releasing numpy work per item (sort of {s.numpy_size:,} floats), "
        f"{n:,} items, batch 32",
        _every_loader(data, 32, w),
    )


def _blas(s: Settings) -> Workload:
    """Matrix products per item: the BLAS's own threads in each worker process."""
    n = s.items(2048)
    data = ds.MatmulDataset(n, 192)
    (w,) = s.counts(2)
    return Workload(
        "blas",
        f"a numpy product of two 192 x 192 matrices per item (the BLAS), {n:,} items, batch 16",
        _every_loader(data, 16, w),
    )


def _python(s: Settings) -> Workload:
    """~0.5 ms of pure-Python work per item that holds the GIL: processes' case."""
    n = s.items(1024)
    data = ds.PythonDataset(n, s.python_rounds)
    (w,) = s.counts(2)
    return Workload(
        "python",
        f"~0.5 ms of pure-Python work per item (holds the GIL), {n:,} items, batch 32",
        [
            torch_loader(data, w, batch_size=32),
            aload_loader(data, w, batch_size=32, worker_mode="process"),
            aload_loader(data, w, batch_size=32),
            *torchdata_nodes(data, w, 32, method="process"),
            *spdl_pipeline(data, w, 32),
        ],
    )


def _auto_grid(
    name: str,
    items: str,
    data: Any,
    batch_size: int,
    counts: tuple[int, ...],
    processes: tuple[int, ...] = (),
) -> Workload:
    """`num_workers="auto"` beside static thread counts (and process counts) and torch's 8
    processes, each run a fresh loader: auto's figure includes its search."""
    process_rows = [
        aload_loader(data, w, batch_size=batch_size, worker_mode="process")  # type: ignore[arg-type]
        for w in ((*processes, "auto") if processes else ())
    ]
    return Workload(
        name,
        f"{items}, batch {batch_size}: static thread counts against num_workers='auto' (a "
        "fresh loader each run: its search included)"
        + (", and the same for processes" if processes else ""),
        [
            torch_loader(data, 8, batch_size=batch_size),
            *(aload_loader(data, w, batch_size=batch_size) for w in counts),
            *process_rows,
            aload_loader(data, "auto", batch_size=batch_size),  # type: ignore[arg-type]
        ],
    )


def _auto(s: Settings) -> Workload:
    """A store that serves 8 reads at once (2 ms each): the best static setting is 8."""
    n = s.items(6000)
    items = f"a store serving 8 reads at once, 2 ms each, {n:,} items"
    return _auto_grid("auto", items, ds.StoreDataset(n, 0.002, 8), 4, s.counts(2, 4, 8, 16, 32))


def _auto_batches(s: Settings) -> Workload:
    """Blocking 2 ms reads in batches of 256: a thread takes half a second a batch, so a step
    up shows that long after it is taken."""
    n = s.items(30_000)
    items = f"a 2 ms blocking read per item, {n:,} items"
    data = ds.SleepDataset(n, 0.002)
    return _auto_grid("auto-batches", items, data, 256, s.counts(16, 32, 64))


def _auto_gil(s: Settings) -> Workload:
    """Pure-Python items: more threads only contend for the GIL."""
    n = s.items(2048)
    items = f"~0.5 ms of pure-Python work per item (holds the GIL), {n:,} items"
    data = ds.PythonDataset(n, s.python_rounds)
    return _auto_grid("auto-gil", items, data, 8, s.counts(1, 2, 4, 8), s.counts(1, 2))


def _auto_train(s: Settings) -> Workload:
    """Waiting reads, some slow, beside a training step: a tuned reader needs batches ahead
    while the step runs, as torch's workers have with prefetch_factor."""
    n = s.items(4000)
    items = (
        f"reads that wait 0.2 ms, 10 ms for one item in 50, {n:,} items, beside a 2 ms step "
        "that leaves the CPU free (a GPU's)"
    )
    data = ds.JitteryDataset(n, 0.0002, 0.010, 50)
    grid = _auto_grid("auto-train", items, data, 8, s.counts(2, 4, 8, 16), s.counts(2))
    read_ahead = aload_loader(
        data,
        "auto",  # type: ignore[arg-type]
        batch_size=8,
        worker_mode="process",
        prefetch_factor="auto",
        detail="prefetch_factor='auto'",
    )
    drive = drain_stepping(0.002)
    return dataclasses.replace(
        grid,
        contenders=[dataclasses.replace(c, drive=drive) for c in (*grid.contenders, read_ahead)],
    )


def _auto_tail(s: Settings) -> Workload:
    """Fast reads with a rare slow one (a timeout and retry), read in order beside a step:
    the slow batch holds back those finished after it until the bound on batches in flight
    is full and the workers stop, unless they read far enough ahead."""
    n = s.items(8000)
    items = (
        f"reads that wait 0.2 ms, 100 ms for one item in 400 (a timeout and retry), {n:,} "
        "items, beside a 1 ms step that leaves the CPU free"
    )
    data = ds.JitteryDataset(n, 0.0002, 0.100, 400)
    (w,) = s.counts(4)

    def reading(detail: str, workers: Any = w, **kwargs: Any) -> Contender:
        return aload_loader(data, workers, batch_size=8, detail=detail, **kwargs)

    rows = [
        torch_loader(data, w, batch_size=8),
        *(reading(f"prefetch_factor={f}", prefetch_factor=f) for f in (2, 8, 32)),
        reading("in_order=False", in_order=False),
        reading("prefetch_factor='auto'", prefetch_factor="auto"),
        reading("prefetch_factor='auto'", "auto", prefetch_factor="auto"),
    ]
    drive = drain_stepping(0.001)
    return Workload(
        "auto-tail",
        f"{items}, batch 8, {w} workers, in order: static prefetch_factor against "
        "prefetch_factor='auto' (a fresh loader each run: its search included)",
        [dataclasses.replace(row, drive=drive) for row in rows],
    )


def _auto_mode(name: str, items: str, data: Any, workers: int) -> Workload:
    """`worker_mode="auto"` beside static threads and processes and torch's processes, each
    a fresh loader over 3 epochs timed whole: auto's figure includes its epoch on threads."""
    epochs = 3
    rows = [
        torch_loader(data, workers, batch_size=32),
        aload_loader(data, workers, batch_size=32),
        aload_loader(data, workers, batch_size=32, worker_mode="process"),
        aload_loader(data, workers, batch_size=32, worker_mode="auto"),
    ]
    return Workload(
        name,
        f"{items}, batch 32, {workers} workers, {epochs} epochs of a fresh loader timed whole: "
        "static worker modes against worker_mode='auto'",
        [dataclasses.replace(row, drive=drain_epochs(epochs)) for row in rows],
    )


def _auto_mode_gil(s: Settings) -> Workload:
    """Pure-Python items: auto should move to processes after its first epoch."""
    n = s.items(1024)
    items = f"~0.5 ms of pure-Python work per item (holds the GIL), {n:,} items"
    (w,) = s.counts(2)
    return _auto_mode("auto-mode-gil", items, ds.PythonDataset(n, s.python_rounds), w)


def _auto_mode_numpy(s: Settings) -> Workload:
    """Items whose work releases the GIL: auto should stay on threads."""
    n = s.items(512)
    items = f"~2 ms of GIL-releasing numpy work per item, {n:,} items"
    (w,) = s.counts(2)
    return _auto_mode("auto-mode-numpy", items, ds.NumpyDataset(n, s.numpy_size), w)


def _async_grid(
    name: str, description: str, awaited: Any, blocking: Any, counts: tuple[int, ...]
) -> Workload:
    """`max_concurrency="auto"` beside static counts on an async store, and torch's 8
    processes on its blocking twin, each run a fresh loader: auto's figure includes its
    search."""

    def awaiting(concurrency: int | str, detail: str) -> Contender:
        return aload_loader(
            awaited, 0, asynchronous=True, batch_size=16, max_concurrency=concurrency, detail=detail
        )

    return Workload(
        name,
        f"{description}, batch 16: static max_concurrency against max_concurrency='auto' "
        "(torch: blocking reads, 8 processes)",
        [
            torch_loader(blocking, 8, batch_size=16),
            *(awaiting(c, f"{c} at once") for c in counts),
            awaiting("auto", "auto"),
        ],
    )


def _auto_async(s: Settings) -> Workload:
    """An async store that serves 64 reads at once (5 ms each): 64 at once or more is best."""
    n = s.items(12_000)
    return _async_grid(
        "auto-async",
        f"an async store serving 64 reads at once, 5 ms each, {n:,} items",
        ds.AsyncStoreDataset(n, 0.005, 64),
        ds.StoreDataset(n, 0.005, 64),
        s.counts(16, 64, 256, 1024),
    )


def _auto_shift(s: Settings) -> Workload:
    """Reads whose latency shifts mid-epoch from a store that limits requests a second: the
    best concurrency moves with the latency, and past it retries flood the limit."""
    n = s.items(12_000)
    return _async_grid(
        "auto-shift",
        f"an async store limited to 8,000 requests a second (refused ones count; a retry waits "
        f"20 ms), reads of 1 ms for the first {n // 2:,} items and 10 ms for the next "
        f"{n - n // 2:,}",
        *ds.shifting_stores(n),
        s.counts(16, 32, 64, 128),
    )


def _auto_stages(s: Settings) -> Workload:
    """Two knobs: awaited reads from a store that serves 64 at once (5 ms each), then a 1 ms
    call to another service per sample on the thread workers (the GIL released)."""
    n = s.items(12_000)
    store, call = ds.AsyncStoreDataset(n, 0.005, 64), ds.ServiceCall(0.001)
    blocking = ds.ReadThenCall(ds.StoreDataset(n, 0.005, 64), call)

    def row(reads: Any, workers: Any, settled: bool = False) -> Contender:
        detail = f"max_concurrency={reads!r}" + (", its 2nd epoch" if settled else "")
        contender = aload_loader(
            store, workers, batch_size=16, max_concurrency=reads, transform=call, detail=detail
        )
        return dataclasses.replace(contender, drive=drain_warm) if settled else contender

    settings = ((16, 4), (64, 4), (64, 16), (256, 16), (256, 32))
    return Workload(
        "auto-stages",
        f"an async store serving 64 reads at once, 5 ms each, then a 1 ms call to another "
        f"service per sample on thread workers, {n:,} items, batch 16: static max_concurrency "
        "and num_workers against both 'auto', a fresh loader (the search of both in its "
        "epoch) and its second epoch (torch: blocking reads and calls, 8 processes)",
        [
            torch_loader(blocking, 8, batch_size=16),
            *(row(reads, workers) for reads, workers in settings),
            row("auto", "auto"),
            row("auto", "auto", settled=True),
        ],
    )


_BUDGET = 200 * 2**20  # the images' memory budget: below what their fastest setting takes
_WITHIN = "memory_budget=200 MiB"


def _images(s: Settings) -> Workload:
    """3 x 224 x 224 float32 samples: large batches through shared or pinned memory."""
    n = s.items(512)
    data = ds.ImageDataset(n)
    (w,) = s.counts(2)
    return Workload(
        "images",
        f"image-sized samples 3 x 224 x 224 float32, {n:,} items, batch 64, one epoch including "
        "worker start (both fork by default; aload's forkserver row uses a warm server)",
        [
            torch_loader(data, w, batch_size=64),
            aload_loader(data, w, batch_size=64),
            # A batch is 37 MiB, and 74 while its samples are collated: 4 threads (the grid's
            # fastest) read 8 ahead; within 200 MiB, the batch the loop holds and 2 built.
            aload_loader(data, 2 * w, batch_size=64),
            aload_loader(data, 2 * w, batch_size=64, memory_budget=_BUDGET, detail=_WITHIN),
            aload_loader(
                data,
                "auto",  # type: ignore[arg-type]
                batch_size=64,
                memory_budget=_BUDGET,
                detail=_WITHIN,
            ),
            aload_loader(data, w, batch_size=64, worker_mode="process"),
            _forkserver(data, w, batch_size=64),
            *torchdata_nodes(data, w, 64),
            *spdl_pipeline(data, w, 64),
        ],
    )


def _memory(s: Settings) -> Workload:
    """1 M records as small Python objects, a shuffled eighth read: copy-on-read."""
    n = s.items(1_000_000)
    data = ds.RecordsDataset(n)
    (w,) = s.counts(2)
    # A random eighth of the records: enough to touch nearly every page that holds them.
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n // 8].tolist()
    kw: dict[str, Any] = {"batch_size": 256, "sampler": chosen}
    return Workload(
        "memory",
        f"{n:,} records held as {4 * n:,} small Python objects; a shuffled eighth of them read, "
        "batch 256. Forked workers copy the pages they read",
        [
            torch_loader(data, w, **kw),
            aload_loader(data, w, **kw),
            aload_loader(data, w, worker_mode="process", **kw),
            _forkserver(data, w, **kw),
        ],
    )


def _warm_rows(data: Any, workers: int, batch_size: int) -> list[Contender]:
    """torch's worker processes, aload's and Ray actors, each timed on an epoch after the
    first (persistent workers: Ray actors take seconds to start, as a cluster's do)."""
    kw: dict[str, Any] = {"batch_size": batch_size, "persistent_workers": True}
    rows = [
        torch_loader(data, workers, **kw),
        aload_loader(data, workers, worker_mode="process", **kw),
        aload_loader(data, workers, worker_mode="ray", **kw),
    ]
    return [dataclasses.replace(row, drive=drain_warm) for row in rows]


def _connect_ray(workers: int) -> None:
    """A local Ray cluster with a CPU per actor, started before anything is timed."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)


def _on_ray(name: str, items: str, dataset: Callable[[int], Any], count: int) -> Any:
    """A Ray workload: `dataset(n)`'s items on Ray actors of a local cluster against worker
    processes, each timed on the epoch after the first (workers kept)."""

    def build(s: Settings) -> Workload:
        n = s.items(count)
        (w,) = s.counts(2)
        _connect_ray(w)
        return Workload(
            name,
            f"{items}, {n:,} items, batch 32, on {w} Ray actors of a local cluster against {w} "
            "worker processes; the epoch after the first (workers kept). One machine: this "
            "measures Ray's overhead, not scale-out. Actors' memory is not counted (they are "
            "the cluster's processes, not this one's children)",
            _warm_rows(dataset(n), w, 32),
        )

    return build


def _ray(s: Settings) -> Workload:
    """The python workload's items on Ray actors: on one machine, the object store's cost."""
    items = "~0.5 ms of pure-Python work per item"
    return _on_ray("ray", items, lambda n: ds.PythonDataset(n, s.python_rounds), 1024)(s)


def _ray_overhead(s: Settings) -> Workload:
    """Items that cost nothing, on Ray actors: each batch's round trip (32 / samples/s)."""
    items = "items that cost nothing (their index: 32 / samples/s is a batch's round trip)"
    return _on_ray("ray-overhead", items, ds.IndexDataset, 8192)(s)


def _train(
    work: Callable[[int, float], Any], kind: str, split: bool = False
) -> Callable[[Settings], Workload]:
    """`split`: the workers get half the cores and the step the other half (its intra-op
    threads), the step as long as the workers take for a batch: each side could keep up on
    its own cores, so what the step loses is what the loader takes from it."""

    def build(s: Settings) -> Workload:
        n, per_item = s.items(4096), 0.0002
        cores = len(os.sched_getaffinity(0))
        (w,) = s.counts(max(1, cores // 2) if split else 2)
        threads = max(1, cores - w) if split else None
        contenders, step_s = training.training_contenders(work(n, per_item), w, threads)
        on = (
            f"{threads} intra-op thread{'s' * (threads != 1)}"
            if threads
            else "torch's intra-op threads"
        )
        return Workload(
            f"train-{kind}" + ("-split" if split else ""),
            f"a training step (MLP, SGD, {on}) per batch of 32; items "
            f"take ~0.2 ms of {kind} work each, {n:,} items; the step {step_s * 1000:.1f} ms, "
            f"as long as a batch takes {w} worker{'s' * (w != 1)} at best; samples/s from the "
            "first batch on",
            contenders,
        )

    build.__doc__ = (
        f"A training step per batch, items of ~0.2 ms {kind} work: how much the loader "
        "slows training (the limit: the steps alone)"
        + (
            "; the workers on half the cores, the step on the other half's intra-op threads."
            if split
            else "."
        )
    )
    return build


WORKLOADS: dict[str, Callable[[Settings], Workload]] = {
    "tensor": _tensor,
    "io": _io,
    "async": _async,
    "numpy": _numpy,
    "blas": _blas,
    "python": _python,
    "remote-decode": _remote_decode,
    "images": _images,
    "auto": _auto,
    "auto-batches": _auto_batches,
    "auto-gil": _auto_gil,
    "auto-async": _auto_async,
    "auto-train": _auto_train,
    "auto-shift": _auto_shift,
    "auto-tail": _auto_tail,
    "auto-stages": _auto_stages,
    "auto-mode-gil": _auto_mode_gil,
    "auto-mode-numpy": _auto_mode_numpy,
    "memory": _memory,
    "train-python": _train(training.python_work, "python"),
    "train-numpy": _train(training.numpy_work, "numpy"),
    "train-python-split": _train(training.python_work, "python", split=True),
    "train-numpy-split": _train(training.numpy_work, "numpy", split=True),
}
if importlib.util.find_spec("ray") is not None:  # pip install 'aload[ray]'
    WORKLOADS.update({"ray": _ray, "ray-overhead": _ray_overhead})
