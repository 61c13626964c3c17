"""Shared test datasets and helpers."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, IterableDataset

import aload


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


class Indexed(Dataset):
    """Item i is i: the batches say exactly which samples arrived. Reads are logged in a list
    that every thread worker's replica shares (as state shared across workers must be)."""

    def __init__(self, n: int, delay: float = 0.0) -> None:
        self.n = n
        self.delay = delay
        self.read_log: list[int] = []

    @property
    def reads(self) -> int:
        return len(self.read_log)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        self.read_log.append(index)
        if self.delay:
            time.sleep(self.delay)
        return index


class Computes(Dataset):
    """`n` items of `seconds` of pure Python each (measured on the reading thread's own CPU
    clock): work that holds the GIL, so thread workers take turns on it."""

    def __init__(self, n: int, seconds: float) -> None:
        self.n, self.seconds = n, seconds

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        compute_for(self.seconds)
        return index


def compute_for(seconds: float) -> None:
    """Compute in Python for `seconds` of this thread's own CPU clock (holding the GIL)."""
    ends = time.thread_time() + seconds
    while time.thread_time() < ends:
        pass


class PassesState:
    """A stream's state as `position` (samples read this pass) and `passes` (passes ended):
    for test datasets that start a new pass once one ends."""

    position: int
    passes: int

    def state_dict(self):
        return {"position": self.position, "passes": self.passes}

    def load_state_dict(self, state):
        self.position, self.passes = state["position"], state["passes"]


class Shards(IterableDataset):
    """Each worker reads every num_workers-th item, starting at its id."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        info = aload.get_worker_info()
        start, step = (0, 1) if info is None else (info.id, info.num_workers)
        return iter(range(start, self.n, step))


class Heartbeat:
    """A task on the caller's event loop that beats every millisecond and records the longest
    gap between two beats: `async for` must never stall the loop it runs on."""

    def __init__(self) -> None:
        self.beats = 0
        self.longest_gap = 0.0

    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        last = time.perf_counter()
        task_status.started()
        while True:
            await anyio.sleep(0.001)
            now = time.perf_counter()
            self.longest_gap = max(self.longest_gap, now - last)
            last = now
            self.beats += 1


@contextlib.asynccontextmanager
async def heartbeat() -> AsyncIterator[Heartbeat]:
    """Run a `Heartbeat` on the current loop for the body of the `async with`, beating
    before the body starts (so a stall in the body's first synchronous stretch counts)."""
    beat = Heartbeat()
    async with anyio.create_task_group() as tg:
        await tg.start(beat.run)
        yield beat
        tg.cancel_scope.cancel()


@pytest.fixture(scope="session", autouse=True)
def _import_heap_frozen():
    """Freeze the heap the suite's imports leave (torch, datasets, pyarrow, ray: ~285,000
    objects) before the first test, as servers freeze their start-up heap. A full collection
    walked it for ~160 ms, holding the GIL on whichever thread set it off: loop-pause tests
    caught the collector (187 ms once in CI), not aload. Frozen, a collection takes ~2 ms."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def saved_and_loaded(state):
    """`state` after a trip through `torch.save` and `torch.load`, as a checkpoint makes it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def take_and_save(loader, stop: int, settle: float = 0.0):
    """The first `stop` batches of an epoch of `loader`, and its state then, saved and loaded
    (the epoch is closed after). `settle` pauses before saving, so later batches are
    prefetched (and staged) first."""
    it = iter(loader)
    head = [next(it) for _ in range(stop)]
    time.sleep(settle)
    state = saved_and_loaded(loader.state_dict())
    it.close()
    return head, state


def assert_resumes_exactly(make, stop: int, settle: float = 0.0) -> None:
    """The shared save/resume check: `stop` batches from one loader, then a fresh loader from
    its state (through torch.save), must give exactly the batches of one whole epoch."""
    whole = [b.tolist() for b in make()]
    head, state = take_and_save(make(), stop, settle)
    resumed = make()
    resumed.load_state_dict(state)
    assert [b.tolist() for b in head] + [b.tolist() for b in resumed] == whole


def run_fresh(script: str, timeout: float) -> str:
    """Run `script` (a file beside the tests) in a fresh Python process, as a user's script
    runs (a hang there is a timeout here, not a stuck suite); its stdout, once it passed."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name(script))],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def aload_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("aload-worker")]


def wait_for_no_workers(limit: float = 3.0) -> None:
    """Worker threads of an abandoned epoch end after their current item; wait for that."""
    deadline = time.monotonic() + limit
    while aload_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert aload_threads() == []


def open_fds() -> int:
    """File descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def eventually(condition, limit: float = 10.0) -> bool:
    """Whether `condition()` holds within `limit` seconds (checked every 20 ms)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def flatten(batches: list) -> list[int]:
    return [int(i) for batch in batches for i in batch]


@pytest.fixture(autouse=True)
def no_worker_thread_outlives_a_test():
    """Every test must leave no aload worker thread behind (abandoned epochs end promptly)."""
    yield
    wait_for_no_workers()


class ProcessDraws(torch.utils.data.IterableDataset):
    """A stream of draws from its worker process's own generators (torch's, numpy's,
    Python's), as random augmentation draws; it keeps no state of its own."""

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for k in range(6 if info.id == 0 else 3):  # streams of unequal length
            yield (info.id, k, int(torch.randint(1000, ())), int(np.random.randint(1000)),
                   random.randrange(1000))  # fmt: skip


class ProcessDrawsByIndex(Dataset):
    """The same draws, map-style: what random augmentation in `__getitem__` does."""

    def __len__(self):
        return 12

    def __getitem__(self, index):
        return (index, int(torch.randint(1000, ())), int(np.random.randint(1000)),
                random.randrange(1000))  # fmt: skip


def fields(batches):
    return [[field.tolist() for field in batch] for batch in batches]


def assert_worker_rngs_resume_between_epochs(make) -> None:
    """A persistent loader over draws from its workers' RNGs (`ProcessDraws`,
    `ProcessDrawsByIndex`): its second epoch draws on from the first, and a loader resumed from
    the state saved between them gives that second epoch exactly."""
    loader = make()
    first = fields(loader)
    between = saved_and_loaded(loader.state_dict())
    second = fields(loader)
    assert second != first  # the workers' RNGs went on
    loader.close()  # its workers go (Ray's actors hold the CPUs the new ones need)
    resumed = make()
    resumed.load_state_dict(between)
    assert fields(resumed) == second
    resumed.close()
