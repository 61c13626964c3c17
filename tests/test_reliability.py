"""Nothing leaks, nothing hangs: dropped loaders, early exits, shared iterators, hung reads.

Each test counts what a user would find left over (child processes, threads, file
descriptors, files in /dev/shm) and waits only a bounded time, so a regression fails
rather than hangs.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref

import anyio
import anyio.lowlevel
import pytest
import torch
from conftest import (
    Indexed,
    aload_threads,
    eventually,
    flatten,
    open_fds,
    wait_for_no_workers,
)
from loop_pauses import best_pause
from torch.utils.data import Dataset

import aload
from aload.bench.memory import descendants


def children() -> set[int]:
    """This process's live descendants (a fork server's workers are its grandchildren)."""
    return set(descendants(os.getpid()))


@pytest.fixture
def process_services():
    """Start the fork server (and resource tracker) first: they live on by design."""
    list(aload.DataLoader(Indexed(2), num_workers=1, worker_mode="process"))
    assert eventually(lambda: not aload_threads())


def shm_files() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("torch_")}


class Rows(Dataset):
    """Batches of 64 KiB tensors, slow enough that workers hold work when an epoch stops."""

    def __len__(self):
        return 400

    def __getitem__(self, index):
        time.sleep(0.002)
        return torch.full((16_384,), float(index))


# -- 1. a dropped persistent process loader releases its workers ------------------------------


@pytest.mark.usefixtures("process_services")
def test_dropped_persistent_process_loader_stops_its_workers_and_collector():
    before_children, before_fds = children(), open_fds()
    for _ in range(3):
        loader = aload.DataLoader(
            Indexed(8), batch_size=2, num_workers=2, worker_mode="process", persistent_workers=True
        )
        assert sorted(flatten(loader)) == list(range(8))
        del loader
    gc.collect()
    assert eventually(lambda: children() <= before_children)
    assert eventually(lambda: not aload_threads())
    assert eventually(lambda: open_fds() <= before_fds)


# -- 2. leaving process epochs early leaves nothing in /dev/shm -------------------------------


def test_leaving_process_epochs_early_leaves_no_shared_memory_files():
    before = shm_files()
    loader = aload.DataLoader(Rows(), batch_size=8, num_workers=2, worker_mode="process")
    for _ in range(30):
        for i, _batch in enumerate(loader):
            if i == 1:
                break
    gc.collect()
    assert eventually(lambda: not aload_threads())
    assert shm_files() - before == set()


# -- 3. two consumers of one iterator are served together --------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("num_workers", [0, 2])
async def test_two_coroutines_sharing_one_async_iterator_split_it(anyio_backend, num_workers):
    loader = aload.DataLoader(Indexed(40, delay=0.001), batch_size=2, num_workers=num_workers)

    async def split() -> None:
        it = loader.__aiter__()
        got: dict[str, list[int]] = {"a": [], "b": []}

        async def consume(name):
            async for batch in it:
                got[name].extend(int(x) for x in batch)
                await anyio.lowlevel.checkpoint()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume, "a")
                tg.start_soon(consume, "b")
        assert sorted(got["a"] + got["b"]) == list(range(40))

    assert await best_pause(split, 0.05, tries=2) < 0.05


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_threads_sharing_one_iterator_split_the_epoch(num_workers):
    loader = aload.DataLoader(Indexed(60, delay=0.001), batch_size=2, num_workers=num_workers)
    it = iter(loader)
    got: list[list[int]] = [[], []]

    def consume(mine):
        for batch in it:
            mine.extend(int(x) for x in batch)

    threads = [threading.Thread(target=consume, args=(got[i],)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads)
    assert sorted(got[0] + got[1]) == list(range(60))


# -- 4. concurrent epochs of one loader -------------------------------------------------------


def test_state_dict_refuses_to_mix_two_live_epochs():
    loader = aload.DataLoader(Indexed(20), batch_size=2, shuffle=True, num_workers=2)
    first, second = iter(loader), iter(loader)
    next(first)
    next(second)
    with pytest.raises(RuntimeError, match="2 epochs of this DataLoader are running"):
        loader.state_dict()
    first.close()
    state = loader.state_dict()  # one live epoch: exact again
    resumed = aload.DataLoader(Indexed(20), batch_size=2, shuffle=True, num_workers=2)
    resumed.load_state_dict(state)
    assert len(flatten(resumed)) == 18
    second.close()


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_loading_a_state_while_an_epoch_runs_ends_that_epoch(mode):
    """As torchdata's StatefulDataLoader drops its iterator: the running epoch stops, and the
    next epoch started is the loaded one."""
    generator = torch.Generator().manual_seed(3)
    loader = aload.DataLoader(
        Indexed(8), batch_size=2, shuffle=True, num_workers=2, worker_mode=mode, generator=generator
    )
    state = loader.state_dict()
    expected = flatten(loader)  # the epoch the state describes
    it = iter(loader)
    next(it)
    loader.load_state_dict(state)
    with pytest.raises(StopIteration):
        next(it)
    assert flatten(loader) == expected


@pytest.mark.usefixtures("process_services")
def test_epochs_started_at_once_from_two_threads_share_one_persistent_pool():
    before = children()
    loader = aload.DataLoader(
        Indexed(8), batch_size=2, num_workers=2, worker_mode="process", persistent_workers=True
    )
    results: list[list[int]] = [[], []]
    barrier = threading.Barrier(2)

    def run(mine):
        barrier.wait()
        mine.extend(flatten(loader))

    threads = [threading.Thread(target=run, args=(results[i],)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results[0]) == sorted(results[1]) == list(range(8))
    assert len(children() - before) <= 2
    loader.close()
    assert eventually(lambda: children() <= before)


# -- 5 and 6. a read that hangs: bounded shutdown, and a persistent pool replaces the worker ---


class HangsAt(Dataset):
    """Index `stuck` blocks until `release` is set; every other index returns at once."""

    def __init__(self, n, stuck):
        self.n, self.stuck = n, stuck
        self.release = threading.Event()

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        if index == self.stuck:
            self.release.wait(30)
        return index


def test_closing_after_a_timeout_returns_within_the_timeout_and_warns_of_the_stuck_thread():
    ds = HangsAt(8, stuck=2)
    it = iter(aload.DataLoader(ds, batch_size=2, num_workers=2, timeout=0.3))
    next(it)
    with pytest.raises(TimeoutError):
        next(it)
    started = time.monotonic()
    with pytest.warns(RuntimeWarning, match="1 worker thread is still inside a read"):
        it.close()
    assert time.monotonic() - started < 0.6
    ds.release.set()


@pytest.mark.anyio
async def test_aclose_after_a_timeout_returns_within_it_and_the_loop_keeps_beating(anyio_backend):

    async def times_out_and_closes() -> None:
        ds = HangsAt(8, stuck=2)
        it = aload.DataLoader(ds, batch_size=2, num_workers=2, timeout=0.3).__aiter__()
        await it.__anext__()
        with pytest.raises(TimeoutError):
            await it.__anext__()
        started = time.monotonic()
        with pytest.warns(RuntimeWarning, match="1 worker thread is still inside a read"):
            await it.aclose()
        closing = time.monotonic() - started
        ds.release.set()
        assert closing < 0.6

    assert await best_pause(times_out_and_closes, 0.05, tries=2) < 0.05


class HangsOnceInAProcess(Dataset):
    """Index 3 hangs the first time it is read in any process (a file remembers)."""

    def __init__(self, marker):
        self.marker = marker

    def __len__(self):
        return 8

    def __getitem__(self, index):
        if index == 3 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            time.sleep(60)
        return index


def test_persistent_process_pool_replaces_a_worker_that_timed_out(tmp_path):
    loader = aload.DataLoader(
        HangsOnceInAProcess(str(tmp_path / "hung")),
        batch_size=2,
        num_workers=2,
        worker_mode="process",
        persistent_workers=True,
        timeout=1.0,
    )
    with pytest.raises(TimeoutError):
        list(loader)
    started = time.monotonic()
    assert flatten(loader) == list(range(8))  # the next epoch has healthy workers
    assert time.monotonic() - started < 5
    loader.close()


# -- 7. statistics stay small however many epochs run ----------------------------------------


def test_stats_keep_totals_in_bounded_memory():
    loader = aload.DataLoader(list(range(4)), batch_size=2)
    for _ in range(300):
        for _batch in loader:
            pass
    stats = loader.stats
    assert (stats.epochs, stats.batches, stats.samples) == (300, 600, 1200)
    assert len(loader._engine._stats._meters) <= 8  # the window of recent epochs, not the history


class Sample:
    """A sample that can say whether anything still holds it."""


class TrackedReads:
    """An async dataset that keeps a weak reference to each sample it read."""

    def __init__(self) -> None:
        self.read = weakref.WeakSet()

    def __len__(self) -> int:
        return 4096

    async def __getitem__(self, index: int) -> Sample:
        await anyio.sleep(0.001)
        sample = Sample()
        self.read.add(sample)
        return sample


def test_an_async_epoch_left_early_holds_none_of_its_samples():
    """Reads queued when the epoch is left (a batch read in part) are dropped with it: the
    loader's stats, which outlive the epoch, hold none of their samples."""
    dataset = TrackedReads()
    loader = aload.DataLoader(dataset, batch_size=64, max_concurrency=4, collate_fn=list)
    epoch = iter(loader)
    first = next(epoch)
    time.sleep(0.01)  # the next batch is read in part: 4 at a time, 1 ms each
    del epoch, first  # the epoch is left, with that batch's other reads still queued
    wait_for_no_workers()
    gc.collect()
    assert len(dataset.read) == 0
    assert loader.stats.epoch.batches == 1


# -- 9. a bad Retry names its argument --------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"backoff": "1"}, "backoff"), ({"backoff": float("nan")}, "backoff")]
)
def test_bad_retry_names_the_argument(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        aload.Retry(**kwargs)
