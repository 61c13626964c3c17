"""The loader beside a training step: each batch feeds a real forward, backward and optimizer
step of a small MLP on the CPU (torch's intra-op threads, as a user's loop has them).

The limit is the same steps over batches already in memory. Two figures say what a loader
costs training: its share of the limit's samples/s (it includes waits for data), and the
step-time inflation, the median step beside the loader against the median step alone (what
the loader's work takes from the step's cores and from its turns on the GIL). The step is
sized to take about as long as the loader's workers need to prepare a batch, where
contention shows most."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.utils.data as tud

from aload.bench import datasets as ds
from aload.bench.contenders import Contender, Drained, aload_loader, batch_len, torch_loader

FEATURES = 256
BATCH = 32
MAX_WIDTH = 4096


class Featurized(tud.Dataset):
    """(features, label) items whose preparation does `work[index]`'s work first."""

    def __init__(self, work: Any) -> None:
        self.work = work
        self.rows = torch.randn(1024, FEATURES, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.work)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self.work[index]
        return self.rows[index % 1024], index % 10


class Step:
    """One SGD step of an MLP (FEATURES -> width -> width -> 10) on a batch."""

    def __init__(self, width: int) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(FEATURES, width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, 10),
        )
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)

    def __call__(self, batch: Any) -> None:
        features, labels = batch
        loss = torch.nn.functional.cross_entropy(self.model(features), labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


def _step_seconds(step: Step, batch: Any) -> float:
    step(batch)
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(5):
            step(batch)
        runs.append((time.perf_counter() - started) / 5)
    return statistics.median(runs)


def step_for(seconds: float, budget: float = 3.0) -> Step:
    """A step that takes `seconds` here, within 5% where the width allows (calibrated from a
    width of 256: the cost grows about as the width squared, less where threads help).

    The search ends after `budget` seconds with the closest step found: on a busy machine a
    step on torch's intra-op threads can take a hundred times as long as on an idle one.
    """
    batch = (torch.randn(BATCH, FEATURES), torch.randint(0, 10, (BATCH,)))
    deadline = time.monotonic() + budget
    width = 256
    closest: tuple[float, Step] | None = None
    for _ in range(8):
        step = Step(width)
        took = _step_seconds(step, batch)
        miss = abs(took / seconds - 1)
        if closest is None or miss < closest[0]:
            closest = (miss, step)
        if miss < 0.05 or time.monotonic() > deadline:
            break
        # At most 2x per round, within 16-4096: a noisy (busy) timing cannot run away.
        scale = min(2.0, max(0.5, (seconds / took) ** 0.5))
        width = min(MAX_WIDTH, max(16, round(width * scale)))
    assert closest is not None
    return closest[1]


def batch_seconds(data: tud.Dataset, workers: int) -> float:
    """How long `workers` workers take for a batch of `data`, at best: one batch's items read
    and collated on this thread (the median of 5), divided among them."""
    runs = []
    for start in range(0, 5 * BATCH, BATCH):
        started = time.perf_counter()
        tud.default_collate([data[i] for i in range(start, start + BATCH)])
        runs.append(time.perf_counter() - started)
    return statistics.median(runs) / workers


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the block (None: left as they are)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(
    step: Step, step_threads: int | None = None
) -> Callable[[Callable[[], Iterable[Any]]], Drained]:
    """A drive that runs `step` on every batch of a fresh loader (`for`), on `step_threads`
    intra-op threads (None: torch's default), and times the steps after the first batch
    arrived: the step time of a running job, start-up left out (the first batch column has
    it)."""

    def drive(make: Callable[[], Iterable[Any]]) -> Drained:
        with intra_op_threads(step_threads):
            return _drive(make)

    def _drive(make: Callable[[], Iterable[Any]]) -> Drained:
        started = time.perf_counter()
        samples, first = 0, None
        steps: list[float] = []
        for batch in make():
            if first is None:
                first = time.perf_counter()
            else:
                samples += batch_len(batch)
            step_started = time.perf_counter()
            step(batch)
            steps.append(time.perf_counter() - step_started)
        if first is None:
            return Drained(0, 0.0, time.perf_counter() - started)
        elapsed = time.perf_counter() - first
        return Drained(samples, first - started, elapsed, step_s=statistics.median(steps))

    return drive


# Linux's nice (0 to 19) of the workers in the rows that lower it: the step's threads get the
# cores first, the workers what is left.
WORKERS_NICE = 10


def lower_priority(worker_id: int) -> None:
    """A `worker_init_fn` that lowers its worker's priority: a worker thread's own (on Linux a
    thread has its own nice), a worker process's."""
    os.nice(WORKERS_NICE)


def training_contenders(
    work: Any, workers: int, step_threads: int | None = None
) -> tuple[list[Contender], float]:
    """The limit (steps over batches in memory), torch's loader in processes, aload's in
    threads, in processes and choosing (`worker_mode="auto"`), each driving the same step
    on `step_threads` intra-op threads (None: torch's default, where torch's processes and
    aload's threads also run at a lower priority, on Linux); and the step's length, as long
    as `workers` take for a batch at best."""
    data = Featurized(work)
    seconds = batch_seconds(data, workers)
    with intra_op_threads(step_threads):
        step = step_for(seconds)
    in_memory = list(tud.DataLoader(data, batch_size=BATCH))
    drive = train(step, step_threads)
    limit = Contender("limit", 0, lambda: in_memory, drive, "the steps alone, data in memory")
    loaders = [
        torch_loader(data, workers, batch_size=BATCH),
        aload_loader(data, workers, batch_size=BATCH),
        aload_loader(data, workers, batch_size=BATCH, worker_mode="process"),
        aload_loader(data, workers, batch_size=BATCH, worker_mode="auto"),
    ]
    if step_threads is None and sys.platform == "linux":  # the step's team takes every core
        lowered = f"nice {WORKERS_NICE}"
        loaders += [
            torch_loader(data, workers, lowered, batch_size=BATCH, worker_init_fn=lower_priority),
            aload_loader(
                data, workers, detail=lowered, batch_size=BATCH, worker_init_fn=lower_priority
            ),
        ]
    return [limit, *(dataclasses.replace(c, drive=drive) for c in loaders)], seconds


def python_work(n: int, per_item_s: float) -> Any:
    return ds.PythonDataset(n, ds.python_rounds_for(per_item_s))


def numpy_work(n: int, per_item_s: float) -> Any:
    return ds.NumpyDataset(n, ds.numpy_size_for(per_item_s))
