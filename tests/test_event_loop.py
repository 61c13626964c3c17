"""The caller's event loop never stalls: a heartbeat task beats on it while `async for` starts
epochs, runs them and ends them, in every way an epoch can run (workers starting, a fork
server's first start, a dataset's `__aenter__`, persistent pools reused and replaced). The
modes are measured in a fresh process, as a user's script runs (20 ms at most); the cases
that need this process's state (a killed worker, early exits) here, with a bound that allows
for this larger process's forks."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import pytest
import torch
from conftest import Indexed, flatten
from loop_pauses import BOUND, MODES, best_pause  # the modes, measured in a fresh process

import aload


def fork_seconds() -> float:
    """How long this process takes to fork (the median of three): a fork holds the GIL for
    as long as it copies the page tables, so the caller's loop waits that long, once per
    worker process started."""
    times = []
    for _ in range(3):
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        times.append(time.perf_counter() - started)
        os.waitpid(pid, 0)
    return sorted(times)[1]


@contextlib.contextmanager
def timed_forks() -> Iterator[list[float]]:
    """How long each fork of this process took (the parent's side) while inside. A fork holds
    the GIL while it copies the page tables, so the caller's loop waits that long whatever
    aload does; forked from a worker's thread while the last epoch's children come and go,
    one took twice as long as `fork_seconds()` in CI."""
    took: list[float] = []
    fork = os.fork

    def timed_fork() -> int:
        started = time.perf_counter()
        pid = fork()
        if pid:
            took.append(time.perf_counter() - started)
        return pid

    os.fork = timed_fork
    try:
        yield took
    finally:
        os.fork = fork


def allowed_pause(forks: Sequence[float] = ()) -> float:
    """The longest pause of the caller's loop allowed around epoch start and end: 30 ms, or
    about two forks of this (large: torch, datasets, pyarrow) test process, as it is now,
    or one of the `forks` the case made (+5 ms), where that is longer: workers start off the
    caller's thread, so at most one fork at a time stalls its loop. (A fresh process pauses
    ~10 ms: `python -m aload.bench --workloads loop`. What this catches takes far longer: a
    fork server's start, a dataset pickled, an `__aenter__` awaited, forks back to back.)"""
    return max(0.03, 2 * fork_seconds() + 0.005, max(forks, default=0.0) + 0.005)


async def pause_and_allowance(run) -> tuple[float, float]:
    """The pause of this loop while `await run()` runs (the better of two tries), and the
    pause allowed given the forks it made."""
    with timed_forks() as forks:
        pause = await best_pause(run, allowed_pause(), tries=2)
    return pause, allowed_pause(forks)


@pytest.fixture(scope="module")
def fresh_process_pauses() -> dict[str, float]:
    """Every mode's pause, measured in one fresh process (tests/loop_pauses.py)."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("loop_pauses.py"))],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("mode", list(MODES))
def test_the_callers_loop_pauses_under_20_ms_around_epochs(fresh_process_pauses, backend, mode):
    pause = fresh_process_pauses[f"{backend}: {mode}"]
    assert pause < BOUND, f"{pause * 1000:.1f} ms"


@pytest.mark.anyio
async def test_replacing_a_broken_persistent_pool_does_not_pause_the_loop(anyio_backend):

    async def replace_a_broken_pool():
        loader = aload.DataLoader(
            Indexed(64), batch_size=8, num_workers=2, worker_mode="process", persistent_workers=True
        )
        assert len([b async for b in loader]) == 8
        os.kill(loader._persistent_pool._processes[0].pid, signal.SIGKILL)
        await anyio.sleep(0.2)  # the collector sees the death: the pool is broken
        assert sorted(flatten([b async for b in loader])) == list(range(64))
        await loader.aclose()

    pause, allowed = await pause_and_allowance(replace_a_broken_pool)
    assert pause < allowed, f"{pause * 1000:.1f} ms"


@pytest.mark.anyio
async def test_async_with_stops_persistent_workers_without_pausing_the_loop(anyio_backend):

    async def two_epochs_then_close():
        async with aload.DataLoader(
            Indexed(64), batch_size=8, num_workers=2, worker_mode="process", persistent_workers=True
        ) as loader:
            for _ in range(2):
                assert sorted(flatten([b async for b in loader])) == list(range(64))
            pool = loader._persistent_pool
        assert not pool.alive
        assert loader._persistent_pool is None
        assert not multiprocessing.active_children()

    pause, allowed = await pause_and_allowance(two_epochs_then_close)
    assert pause < allowed, f"{pause * 1000:.1f} ms"


@pytest.mark.anyio
async def test_leaving_an_epoch_early_does_not_pause_the_loop(anyio_backend):

    async def leave_three_epochs():
        loader = aload.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(512, 64)),
            batch_size=8,
            num_workers=2,
            worker_mode="process",
        )
        for _ in range(3):
            async for _ in loader:
                break

    pause, allowed = await pause_and_allowance(leave_three_epochs)
    assert pause < allowed, f"{pause * 1000:.1f} ms"


@pytest.mark.anyio
@pytest.mark.parametrize("method", [None, "forkserver"])
async def test_leaving_while_the_workers_still_start_leaves_no_process(anyio_backend, method):
    """Cancelled before its processes are up (a fork server's start takes a second): the
    background start stops them as soon as it ends, and nothing is left running."""
    loader = aload.DataLoader(
        Indexed(64),
        batch_size=8,
        num_workers=2,
        worker_mode="process",
        multiprocessing_context=method,
    )
    with anyio.move_on_after(0.005):
        async for _ in loader:
            pass
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:  # noqa: ASYNC110
        await anyio.sleep(0.05)
    assert multiprocessing.active_children() == []
    assert sorted(flatten([b async for b in loader])) == list(range(64))  # and it starts again
