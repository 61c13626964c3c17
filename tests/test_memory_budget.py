"""`memory_budget=`: the batches in flight stay within a number of bytes."""

from __future__ import annotations

import gc
import multiprocessing
import os
import threading
import time
import warnings
import weakref

import pytest
import torch
from conftest import Indexed, aload_threads, eventually, open_fds
from loop_pauses import best_pause

import aload
import aload.workers.process
from aload._memory_budget import batch_nbytes

MIB = 2**20


class Quarters(Indexed):
    """Each sample is 256 KiB (a batch of 4 is 1 MiB); `reads` counts across thread workers'
    replicas."""

    def __init__(self, n: int = 64) -> None:
        super().__init__(n)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.full((64 * 1024,), float(super().__getitem__(index)))


def most_read_ahead(budget: int | None, **kwargs) -> tuple[int, list[int]]:
    """Batches read but not yet yielded, at most, over an epoch with a slow loop body (so the
    workers read as far ahead as they may); and the samples in the order they came."""
    dataset = Quarters()
    loader = aload.DataLoader(dataset, batch_size=4, num_workers=4, memory_budget=budget, **kwargs)
    ahead, seen = 0, []
    for yielded, batch in enumerate(loader, start=1):
        time.sleep(0.01)  # the loop body: the workers fill what they may
        ahead = max(ahead, dataset.reads - 4 * yielded)
        seen.extend(int(x) for x in batch[:, 0])
    return -(-ahead // 4), seen


@pytest.mark.parametrize("in_order", [True, False])
def test_batches_in_flight_stay_within_the_budget(in_order):
    """Without a budget, 4 workers x 2 read 8 batches ahead. 7 MiB of 1 MiB batches: the one
    the loop holds, and 3 being built (each its samples and the batch they become)."""
    unbounded, seen = most_read_ahead(None, in_order=in_order)
    bounded, seen_bounded = most_read_ahead(7 * MIB, in_order=in_order)
    assert unbounded >= 6
    assert bounded <= 3
    assert sorted(seen) == sorted(seen_bounded) == list(range(64))


def test_no_more_worker_threads_start_than_the_budget_lets_read_at_once():
    """Each thread that allocates keeps a malloc arena: 8 threads for 2 batches in flight
    would hold memory the budget does not see. Threads start for jobs that wait for one."""
    dataset = Quarters()
    loader = aload.DataLoader(dataset, batch_size=4, num_workers=8, memory_budget=5 * MIB)
    most = 0
    for _batch in loader:
        time.sleep(0.005)
        most = max(most, len(aload_threads()))
    assert most <= 3  # 2 batches in flight (a thread may start just before one goes idle)
    assert dataset.reads == 64


def test_the_first_batch_is_read_alone_until_it_says_how_large_batches_are():
    dataset = Quarters()
    loader = aload.DataLoader(dataset, batch_size=4, num_workers=4, memory_budget=100 * MIB)
    it = iter(loader)
    next(it)
    time.sleep(0.05)
    assert dataset.reads <= 4 + 4 * 8  # then as many as the bound allows (8 of 100 fit)
    rest = sum(len(batch) for batch in it)
    assert rest == 60


def test_a_budget_smaller_than_a_batch_still_reads_one_at_a_time_and_says_so():
    dataset = Quarters(16)
    loader = aload.DataLoader(dataset, batch_size=4, num_workers=4, memory_budget=1)
    with pytest.warns(RuntimeWarning, match=r"needs 3.0 MiB: the batch the loop holds and one"):
        seen = [int(x) for batch in loader for x in batch[:, 0]]
    assert seen == list(range(16))


class LiveBytes:
    """Counts the bytes of the samples and batches alive at once, and the most there were."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = self.most = 0

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.now += tensor.nbytes
            self.most = max(self.most, self.now)
        weakref.finalize(tensor, self.drop, tensor.nbytes)
        return tensor

    def drop(self, size: int) -> None:
        with self.lock:
            self.now -= size


class TrackedQuarters(Quarters):
    """Quarters whose samples, read slowly (1 ms each), and batches are counted alive."""

    def __init__(self, live: LiveBytes) -> None:
        super().__init__(96)
        self.live = live

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(0.001)
        return self.live.track(super().__getitem__(index))


@pytest.mark.parametrize(
    "budget", [None, 7 * MIB, 4 * MIB], ids=["no budget", "3 in flight", "1 in flight"]
)
def test_the_samples_and_batches_alive_at_once_stay_within_the_budget(budget):
    """What a budget promises a user: the batch the loop holds, the batches ready and those
    being built, with their samples, never take more than it (with thread workers: 1 MiB
    batches of 4 samples). Without one, 4 workers x 2 read 8 batches ahead."""
    live = LiveBytes()
    loader = aload.DataLoader(
        TrackedQuarters(live),
        batch_size=4,
        num_workers=4,
        memory_budget=budget,
        collate_fn=lambda samples: live.track(torch.stack(samples)),
    )
    seen = []
    for batch in loader:
        time.sleep(0.01)  # a slow loop body: the workers fill what the budget lets them
        seen.extend(int(x) for x in batch[:, 0])
    assert seen == list(range(96))
    if budget is None:
        assert live.most > 8 * MIB
    else:
        assert live.most <= budget


@pytest.mark.parametrize(
    ("budget", "error"), [(0, ValueError), (-5, ValueError), ("1GB", TypeError), (1.5, TypeError)]
)
def test_a_bad_budget_is_refused_naming_it(budget, error):
    with pytest.raises(error, match="memory_budget"):
        aload.DataLoader(Quarters(), memory_budget=budget)


def test_a_batch_weighs_its_tensors_arrays_and_bytes_at_any_depth():
    import numpy as np

    batch = {"x": torch.zeros(10, dtype=torch.float64), "y": [np.zeros(4, np.int32), b"abc"]}
    assert batch_nbytes(batch) == 80 + 16 + 3
    assert batch_nbytes(("text", 7)) == 0


class AwaitedQuarters(Quarters):
    async def __getitem__(self, index: int) -> torch.Tensor:
        return super().__getitem__(index)


@pytest.mark.parametrize(
    ("make", "kwargs"),
    [
        (Quarters, {"num_workers": 4}),
        (AwaitedQuarters, {"num_workers": 2, "prefetch_factor": 4}),
    ],
    ids=["threads", "async dataset"],
)
def test_every_mode_keeps_its_batches_in_flight_within_the_budget(make, kwargs):
    """What the loader itself counts in flight after each batch, in each kind of pool (worker
    processes, whose own memory counts too, below): 5 MiB hold the batch the loop holds and
    two being built."""
    loader = aload.DataLoader(make(), batch_size=4, memory_budget=5 * MIB, **kwargs)
    in_flight, seen = [], []
    for batch in loader:
        time.sleep(0.005)
        in_flight.append(loader.stats.epoch.in_flight)
        seen.extend(int(x) for x in batch[:, 0])
    assert max(in_flight) <= 2
    assert sorted(seen) == list(range(64))


def test_auto_tunes_within_the_budget():
    """`num_workers="auto"` may try more reads at once; the budget still caps what is in
    flight (a step past it adds nothing, so the tuner takes it back)."""
    loader = aload.DataLoader(
        Quarters(256), batch_size=4, num_workers="auto", memory_budget=5 * MIB
    )
    in_flight, seen = [], []
    for batch in loader:
        in_flight.append(loader.stats.epoch.in_flight)
        seen.extend(int(x) for x in batch[:, 0])
    assert max(in_flight) <= 2
    assert sorted(seen) == list(range(256))


async def pause_over_epochs(loader: aload.DataLoader) -> tuple[float, list[int]]:
    """The caller's loop pause over an `async for` epoch of `loader` (the better of two
    tries), and the samples of the last epoch, in the order they came; closes it."""
    seen: list[int] = []

    async def run() -> None:
        seen.clear()
        async for batch in loader:
            seen.extend(int(x) for x in batch[:, 0])

    gc.collect()
    try:
        pause = await best_pause(run, 0.03, tries=2)
    finally:  # (persistent workers: a failure must not leave them to the next tests)
        await loader.aclose()
    return pause, seen


@pytest.mark.anyio
async def test_a_budget_under_async_for_keeps_the_loop_running(anyio_backend):
    """The budget is applied as batches are delivered, on the caller's loop: it must not
    stall it, and loses nothing."""
    loader = aload.DataLoader(
        Quarters(), batch_size=4, num_workers=2, memory_budget=5 * MIB, persistent_workers=True
    )
    pause, seen = await pause_over_epochs(loader)
    assert sorted(seen) == list(range(64))
    assert pause < 0.03


BALLAST = 64 * MIB
_ballast = b""


# Room beside the ballast for what two forked workers hold of their own (about 45 MiB: the
# pages of the test process that their collections touch, more the larger it has grown) and
# for the batches: for the tests that watch the workers' memory, not the bound it sets.
ROOMY = 2 * BALLAST + 112 * MIB


def hold_ballast(worker_id: int) -> None:
    """A worker process that keeps 64 MiB of its own (a cache it filled, a model it loaded)."""
    global _ballast
    _ballast = bytearray(b"\x01") * BALLAST  # written, so its pages are the worker's own


def on_processes(budget: int, worker_init_fn=hold_ballast, **kwargs) -> aload.DataLoader:
    """128 samples in 32 batches of 1 MiB on 2 worker processes, within `budget`."""
    return aload.DataLoader(
        Quarters(128),
        batch_size=4,
        num_workers=2,
        worker_mode="process",
        worker_init_fn=worker_init_fn,
        memory_budget=budget,
        **kwargs,
    )


def epochs_on_processes(budget: int, worker_init_fn=None) -> list:
    """Two epochs of 32 batches of 1 MiB on 2 persistent worker processes (up to 32 in
    flight without a budget) with a slow loop body: after each batch, the batches in flight
    and the workers' memory as the loader last measured it; and the samples; per epoch."""
    loader = on_processes(budget, worker_init_fn, prefetch_factor=16, persistent_workers=True)
    epochs = []
    try:
        for _ in range(2):
            after_each, seen = [], []
            for batch in loader:
                time.sleep(0.005)
                epoch = loader.stats.epoch
                after_each.append((epoch.in_flight, epoch.workers_memory))
                seen.extend(int(x) for x in batch[:, 0])
            epochs.append((after_each, seen))
    finally:
        loader.close()
    return epochs


needs_linux = pytest.mark.skipif(
    not os.path.exists("/proc/self/smaps_rollup"), reason="Linux measures it"
)


@pytest.fixture
def looks_often(monkeypatch):
    """The pools read their workers' memory every 20 ms (not every half second)."""
    monkeypatch.setattr(aload.workers.process, "WATCH_SECONDS", 0.02)


@needs_linux
@pytest.mark.usefixtures("looks_often")
def test_what_worker_processes_hold_of_their_own_comes_out_of_the_budget():
    """Beside the workers' usual memory (some tens of MiB: the pages their writes copied,
    their heaps), a budget of 2 x 64 MiB + 48 MiB leaves room for all 32 batches in flight;
    once each worker also holds 64 MiB, a budget of that, their usual memory and 12 MiB lets
    in flight what the workers' memory, as last measured, leaves of it. (The usual memory
    grows with the test process they are forked from: 44 MiB for two alone, 47 in the whole
    suite on CI, where a fixed budget left no room at all.)"""
    plain = epochs_on_processes(2 * BALLAST + 48 * MIB)
    plain_after_each, _ = plain[1]
    assert max(in_flight for in_flight, _ in plain_after_each) >= 24
    usual = max(held for _, held in plain_after_each)
    budget = 2 * BALLAST + usual + 12 * MIB
    ballasted = epochs_on_processes(budget, hold_ballast)
    after_each, _ = ballasted[1]  # the second epoch: the workers' memory known from its start
    assert min(held for _, held in after_each) >= 2 * BALLAST
    # Batches are sent while they fit what the workers' memory left of the budget when it
    # was last measured (as it grows, those already sent stay in flight).
    allowed = 0
    for in_flight, held in after_each:
        allowed = max(allowed, (budget - held) // MIB)
        assert in_flight <= allowed + 1
    assert max(in_flight for in_flight, _ in after_each) <= 30
    for _, seen in plain + ballasted:
        assert seen == list(range(128))


@needs_linux
@pytest.mark.usefixtures("looks_often")
def test_workers_that_alone_take_the_budget_read_one_batch_at_a_time_and_say_so():
    with pytest.warns(RuntimeWarning, match=r"worker processes hold \d+ MiB of their own"):
        epochs = epochs_on_processes(32 * MIB, hold_ballast)
    after_each, _ = epochs[1]
    assert max(in_flight for in_flight, _ in after_each) <= 2
    for _, seen in epochs:
        assert seen == list(range(128))


def test_the_workers_memory_is_measured_only_for_processes_under_a_budget():
    threads = aload.DataLoader(Quarters(), batch_size=4, num_workers=2, memory_budget=4 * MIB)
    processes = aload.DataLoader(Quarters(), batch_size=4, num_workers=2, worker_mode="process")
    for loader in (threads, processes):
        assert sum(len(batch) for batch in loader) == 64
        assert loader.stats.epoch.workers_memory is None


@needs_linux
@pytest.mark.usefixtures("looks_often")
def test_the_warning_made_an_error_loses_no_batch():
    """Said before a batch is taken: a loop that turns warnings into errors, and goes on after
    one, still gets every sample once, in order."""
    loader = on_processes(32 * MIB)
    seen, raised = [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        batches = iter(loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except RuntimeWarning:
                raised += 1
                continue
            time.sleep(0.005)
            seen.extend(int(x) for x in batch[:, 0])
    assert raised == 1
    assert seen == list(range(128))


@needs_linux
@pytest.mark.anyio
@pytest.mark.usefixtures("looks_often")
async def test_watching_the_workers_memory_keeps_the_loop_running(anyio_backend):
    """The pool reads its workers' page tables on its own thread, never on the caller's."""
    loader = on_processes(ROOMY, persistent_workers=True)
    pause, seen = await pause_over_epochs(loader)
    assert seen == list(range(128))
    assert loader.stats.epoch.workers_memory >= 2 * BALLAST
    assert pause < 0.03


def leave_early_on_processes(budget: int) -> None:
    """Leave an epoch of watched worker processes after 8 batches, drop the loader, and wait
    for its processes to end."""
    loader = on_processes(budget)
    for seen, _ in enumerate(loader):
        if seen == 8:
            break
    assert loader.stats.epoch.workers_memory  # the pool was reading its workers' memory
    del loader
    # its processes, and the pool's collector thread, which closes their pipes as they end
    assert eventually(lambda: not (multiprocessing.active_children() or aload_threads()), 5)


@needs_linux
@pytest.mark.usefixtures("looks_often")
def test_leaving_a_watched_epoch_early_leaves_no_process_shared_memory_or_descriptor():
    # A first run opens what multiprocessing keeps once per program (its resource tracker).
    leave_early_on_processes(ROOMY)
    shm_before, fds_before = set(os.listdir("/dev/shm")), open_fds()
    leave_early_on_processes(ROOMY)
    assert set(os.listdir("/dev/shm")) <= shm_before
    assert open_fds() <= fds_before
