"""Datasets whose reads are coroutines: awaited concurrently on aload's event loop."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
import traceback
from typing import ClassVar

import anyio
import pytest
import torch
from conftest import (
    PassesState,
    aload_threads,
    assert_resumes_exactly,
    eventually,
    flatten,
    heartbeat,
    open_fds,
    wait_for_no_workers,
)
from loop_pauses import best_pause

import aload


class Remote:
    """An async map-style dataset: every read awaits `latency` seconds, like a remote store."""

    def __init__(self, n, latency=0.001):
        self.n, self.latency = n, latency
        self.active = self.peak = self.started = self.cancelled = 0
        self.threads = set()

    def __len__(self):
        return self.n

    async def __getitem__(self, index):
        self.started += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.threads.add(threading.current_thread().name)
        try:
            await anyio.sleep(self.latency)
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        finally:
            self.active -= 1
        return index


def test_plain_for_loop_reads_an_async_dataset_exactly_once():
    ds = Remote(100)
    loader = aload.DataLoader(ds, batch_size=8, shuffle=True, max_concurrency=16)
    for _epoch in range(2):
        assert sorted(flatten(list(loader))) == list(range(100))
    assert ds.threads == {"aload-worker-loop"}


@pytest.mark.anyio
@pytest.mark.parametrize("in_order", [True, False])
async def test_async_for_reads_an_async_dataset_exactly_once(anyio_backend, in_order):
    loader = aload.DataLoader(
        Remote(90), batch_size=7, shuffle=True, num_workers=2, in_order=in_order
    )

    async def two_epochs() -> None:
        for _epoch in range(2):
            assert sorted(flatten([b async for b in loader])) == list(range(90))

    # aload's loop runs the reads: the caller's never stalls
    assert await best_pause(two_epochs, 0.05, tries=2) < 0.05


class LoopKinds(Remote):
    """`Remote`, noting the kind of event loop each read ran on."""

    def __init__(self, n):
        super().__init__(n)
        self.loops = set()

    async def __getitem__(self, index):
        self.loops.add(type(asyncio.get_running_loop()).__module__.split(".")[0])
        return await super().__getitem__(index)


@pytest.mark.anyio
@pytest.mark.parametrize("setting", [None, "asyncio"])
async def test_aloads_loop_runs_on_uvloop_where_installed_unless_told_not_to(
    anyio_backend, monkeypatch, setting
):
    """uvloop where installed (`aload[uvloop]`); ALOAD_LOOP=asyncio keeps asyncio's own loop.
    Either way each sample comes once and the caller's loop beats on."""
    pytest.importorskip("uvloop")
    if setting is None:
        monkeypatch.delenv("ALOAD_LOOP", raising=False)
    else:
        monkeypatch.setenv("ALOAD_LOOP", setting)

    async def epoch() -> None:
        ds = LoopKinds(96)
        loader = aload.DataLoader(ds, batch_size=8, shuffle=True, max_concurrency=16)
        assert sorted(flatten([b async for b in loader])) == list(range(96))
        assert ds.loops == {"uvloop" if setting is None else "asyncio"}
        assert ds.threads == {"aload-worker-loop"}

    assert await best_pause(epoch, 0.05, tries=2) < 0.05


@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def test_epochs_whole_or_left_early_leave_no_thread_or_descriptor_on_either_loop(monkeypatch, kind):
    """aload's loop starts for each epoch and takes its selector and wake-up pipe with it when
    the epoch ends or is left, on uvloop as on asyncio's loop."""
    if kind == "uvloop":
        pytest.importorskip("uvloop")
    monkeypatch.setenv("ALOAD_LOOP", kind)
    loader = aload.DataLoader(Remote(64), batch_size=4, max_concurrency=8)
    assert sorted(flatten(loader)) == list(range(64))
    assert eventually(lambda: not aload_threads())
    before = open_fds()
    for epoch in range(10):
        batches = iter(loader)
        next(batches)
        if epoch % 2:
            batches.close()  # left early
        else:
            assert len(flatten([next(batches), *batches])) == 60
    del batches
    assert eventually(lambda: not aload_threads())
    assert eventually(lambda: open_fds() <= before)


@pytest.mark.parametrize("workers", [{}, {"num_workers": 2, "worker_mode": "process"}])
def test_a_bad_aload_loop_setting_is_refused_before_any_worker_starts(monkeypatch, workers):
    """ALOAD_LOOP names asyncio or uvloop: another value raises as the epoch starts, naming
    the variable, and leaves no worker thread or process running."""
    monkeypatch.setenv("ALOAD_LOOP", "uv")
    before = threading.active_count()
    loader = aload.DataLoader(Remote(8), batch_size=4, **workers)
    with pytest.raises(ValueError, match="ALOAD_LOOP must be 'asyncio' or 'uvloop', got 'uv'"):
        iter(loader)
    assert multiprocessing.active_children() == []
    assert threading.active_count() == before


def test_in_order_batches_follow_the_sampler():
    loader = aload.DataLoader(Remote(50), batch_size=5, max_concurrency=32)
    assert flatten(list(loader)) == list(range(50))


@pytest.mark.parametrize("max_concurrency", [1, 8, 40])
def test_reads_in_flight_reach_but_never_pass_max_concurrency(max_concurrency):
    ds = Remote(200, latency=0.003)
    list(aload.DataLoader(ds, batch_size=10, max_concurrency=max_concurrency))
    assert ds.peak == max_concurrency


def test_reads_stay_bounded_with_a_slow_consumer():
    ds = Remote(1000)
    loader = aload.DataLoader(ds, batch_size=4, max_concurrency=8, prefetch_factor=2)
    it = iter(loader)
    next(it)
    time.sleep(0.2)
    in_flight_batches = 8 // 4 * 2
    assert ds.started == 4 * (1 + in_flight_batches)
    it.close()


def test_async_getitems_is_awaited_once_per_batch():
    class Batched(Remote):
        calls = 0

        async def __getitems__(self, indices):
            type(self).calls += 1
            await anyio.sleep(0.001)
            return [i * 2 for i in indices]

    loader = aload.DataLoader(Batched(20), batch_size=6)
    assert flatten(list(loader)) == [i * 2 for i in range(20)]
    assert Batched.calls == 4


def test_async_iterable_is_a_stream_dataset():
    class Feed:
        async def __aiter__(self):
            for i in range(23):
                await anyio.lowlevel.checkpoint()
                yield {"id": i}

    loader = aload.DataLoader(Feed(), batch_size=5, drop_last=True, num_workers=2)
    batches = [b["id"].tolist() for b in loader]
    assert batches == [list(range(i, i + 5)) for i in range(0, 20, 5)]


def test_an_async_generator_object_is_read_once():
    async def feed():
        for i in range(10):
            yield i

    assert flatten(list(aload.DataLoader(feed(), batch_size=4))) == list(range(10))


def test_transform_runs_on_cpu_workers_after_the_await():
    where = set()

    def transform(sample):
        where.add(threading.current_thread().name)
        return sample + 1000

    loader = aload.DataLoader(Remote(30), batch_size=5, num_workers=2, transform=transform)
    assert sorted(flatten(list(loader))) == list(range(1000, 1030))
    assert where
    assert all(name.startswith("aload-worker-") for name in where)
    assert "aload-worker-loop" not in where


def tag_with_process(sample):
    """A transform that says which process ran it (module level: spawn pickles it)."""
    return os.getpid(), sample + 1000


@pytest.mark.parametrize("method", [None, "spawn"])
def test_an_async_datasets_transform_runs_on_worker_processes(method):
    loader = aload.DataLoader(
        Remote(30),
        batch_size=5,
        num_workers=2,
        worker_mode="process",
        multiprocessing_context=method,
        transform=tag_with_process,
    )
    for _ in range(2):  # a second epoch starts its own workers
        batches = list(loader)
        assert sorted(flatten([values for _, values in batches])) == list(range(1000, 1030))
        pids = {int(pid) for pids, _ in batches for pid in pids}
        assert os.getpid() not in pids
        assert 1 <= len(pids) <= 2


def plus_1000(sample):
    return sample + 1000


@pytest.mark.parametrize("persistent", [False, True])
def test_an_async_datasets_cpu_threads_stay_between_epochs_when_persistent(persistent):
    """As torch's persistent workers: `worker_init_fn` runs once per worker, not per epoch."""
    inits: list[int] = []
    loader = aload.DataLoader(
        Remote(32),
        batch_size=4,
        num_workers=2,
        persistent_workers=persistent,
        worker_init_fn=inits.append,
    )
    for _ in range(3):
        assert sorted(flatten(list(loader))) == list(range(32))
    assert len(inits) <= 2 if persistent else len(inits) > 2
    loader.close()
    wait_for_no_workers()


@pytest.mark.parametrize("persistent", [False, True])
def test_an_async_datasets_cpu_processes_stay_between_epochs_when_persistent(persistent):
    """The same 2 processes finish every epoch's batches (no start per epoch), or new ones."""
    loader = aload.DataLoader(
        Remote(32),
        batch_size=4,
        num_workers=2,
        worker_mode="process",
        persistent_workers=persistent,
        transform=tag_with_process,
    )
    pids = set()
    for _ in range(3):
        batches = list(loader)
        assert sorted(flatten([values for _, values in batches])) == list(range(1000, 1032))
        pids |= {int(pid) for pid_batch, _ in batches for pid in pid_batch}
    assert len(pids) <= 2 if persistent else len(pids) > 2
    loader.close()
    deadline = time.monotonic() + 5  # every process reaped, persistent ones by close()
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert multiprocessing.active_children() == []


def test_worker_processes_transform_each_sample_of_a_batch_sampler_batch():
    """A batch_sampler batches too (torch's auto-collation): the processes transform each
    sample, then collate, into torch's batches."""
    batches = torch.utils.data.BatchSampler(range(12), batch_size=4, drop_last=False)
    ours = aload.DataLoader(
        Remote(12), batch_sampler=batches, num_workers=2, worker_mode="process", transform=plus_1000
    )
    theirs = torch.utils.data.DataLoader([i + 1000 for i in range(12)], batch_sampler=batches)
    assert [b.tolist() for b in ours] == [b.tolist() for b in theirs]


@pytest.mark.anyio
async def test_cpu_heavy_transform_never_blocks_the_callers_loop(anyio_backend):
    def transform(sample):
        time.sleep(0.005)  # CPU work stand-in
        return sample

    loader = aload.DataLoader(Remote(60), batch_size=6, num_workers=2, transform=transform)
    gaps, last = [], time.perf_counter()

    async def tick():
        nonlocal last
        while True:
            await anyio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        seen = flatten([b async for b in loader])
        tg.cancel_scope.cancel()
    assert sorted(seen) == list(range(60))
    assert max(gaps) < 0.03


class BrokenRemote(Remote):
    def __init__(self, n, broken, exc=KeyError):
        super().__init__(n)
        self.broken, self.exc = broken, exc

    async def __getitem__(self, index):
        value = await super().__getitem__(index)
        if index in self.broken:
            raise self.exc(f"sample {index} is gone")
        return value


def test_failed_async_read_raises_its_own_error_naming_the_indices():
    loader = aload.DataLoader(BrokenRemote(20, {9}), batch_size=4, max_concurrency=4)
    with pytest.raises(KeyError, match="sample 9 is gone") as caught:
        list(loader)
    assert "indices [8, 9, 10, 11]" in "\n".join(caught.value.__notes__)
    assert "__getitem__" in [f.name for f in traceback.extract_tb(caught.value.__traceback__)]


def test_hung_read_times_out_naming_the_indices_and_is_cancelled():
    class Hung(Remote):
        async def __getitem__(self, index):
            if index == 5:
                self.latency = 30
            return await super().__getitem__(index)

    ds = Hung(12)
    with pytest.raises(TimeoutError, match=r"batch 1 \(indices \[4, 5, 6, 7\]\)"):
        list(aload.DataLoader(ds, batch_size=4, timeout=0.3))
    deadline = time.monotonic() + 2
    while ds.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ds.active == 0
    assert ds.cancelled >= 1


def test_a_fault_of_aloads_own_loop_is_logged_and_leaves_no_read_running(monkeypatch, caplog):
    """A fetcher that breaks (a bug of aload's, simulated) stops aload's loop with an error
    on the `aload` logger, its reads are cancelled, and the batches it held fail at once
    with that error as their cause: the consumer is not left waiting (with no `timeout`, it
    had waited for good). A consumer that goes on gets every later batch failed the same
    way, the cause with it, and then the end of the epoch."""
    from aload.workers import loop

    def broken(self):
        raise RuntimeError("fetcher bug")

    monkeypatch.setattr(loop._ItemReads, "count_one", broken)
    ds = Remote(64, latency=0.01)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="stopped on an error") as raised:
        list(aload.DataLoader(ds, batch_size=4, max_concurrency=8, timeout=30))
    assert not isinstance(raised.value, TimeoutError)
    assert "fetcher bug" in str(raised.value.__cause__)
    assert time.monotonic() - started < 10
    assert ds.active == 0
    assert any(
        "stopped on an error" in r.getMessage() and "fetcher bug" in str(r.exc_info[1])
        for r in caplog.records
    )
    epoch = iter(aload.DataLoader(Remote(64, latency=0.01), batch_size=4, max_concurrency=8))
    failures: list[RuntimeError] = []
    while True:
        try:
            next(epoch)
        except StopIteration:
            break
        except RuntimeError as error:
            failures.append(error)
    assert len(failures) == 16  # every batch, none delivered, none lost
    assert all("stopped on an error" in str(error) for error in failures)
    assert all("fetcher bug" in str(error.__cause__) for error in failures)
    # Each its own error, naming its own batch only.
    assert len({id(error) for error in failures}) == 16
    assert all(len(error.__notes__) == 1 for error in failures)


@pytest.mark.anyio
async def test_async_for_gets_a_fault_of_aloads_loop_at_once_and_the_loop_beats_on(
    anyio_backend, monkeypatch, caplog
):
    """The same fault met by `async for`: the batch fails with the fault as its cause, within
    seconds under a 30 s timeout, the caller's loop beating throughout, and no read runs on."""
    from aload.workers import loop

    def broken(self):
        raise RuntimeError("fetcher bug")

    monkeypatch.setattr(loop._ItemReads, "count_one", broken)

    async def fails() -> None:
        ds = Remote(64, latency=0.01)
        loader = aload.DataLoader(ds, batch_size=4, max_concurrency=8, timeout=30)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="stopped on an error") as raised:
            async for _batch in loader:
                pass
        assert "fetcher bug" in str(raised.value.__cause__)
        assert time.monotonic() - started < 10
        assert ds.active == 0

    assert await best_pause(fails, 0.05, tries=2) < 0.05


def test_a_batch_handed_to_aloads_stopped_loop_fails_at_once():
    """Batches are handed to aload's loop in bursts (one wake-up of the loop takes all that
    came meanwhile): one handed over once the loop has stopped fails at once, saying why,
    instead of waiting for a loop that will never take it."""
    from aload.workers.loop import LoopPool

    class Batch:
        failed: ClassVar[list[BaseException]] = []

        def fail(self, error):
            self.failed.append(error)

    pool = LoopPool(Remote(1))
    pool.shutdown()
    assert pool.join(5)
    pool.submit(Batch())
    (error,) = Batch.failed
    assert isinstance(error, RuntimeError)
    assert "event loop has stopped" in str(error)


@pytest.mark.anyio
async def test_cancelling_the_consumer_cancels_every_read_in_flight(anyio_backend):
    ds = Remote(10_000, latency=0.05)
    with anyio.move_on_after(0.2):
        async for _ in aload.DataLoader(ds, batch_size=8, max_concurrency=32):
            pass
    deadline = time.monotonic() + 2
    while ds.active and time.monotonic() < deadline:  # noqa: ASYNC110 - state of another thread
        await anyio.sleep(0.01)
    assert ds.active == 0
    assert ds.cancelled > 0
    assert ds.started < 10_000


class Flaky(Remote):
    """Each index fails `failures` times with a transient error before it reads."""

    def __init__(self, n, failures, exc=ConnectionResetError):
        super().__init__(n)
        self.left = dict.fromkeys(range(n), failures)
        self.exc = exc

    async def __getitem__(self, index):
        if self.left[index] > 0:
            self.left[index] -= 1
            raise self.exc(f"reset while reading {index}")
        return await super().__getitem__(index)


def test_transient_errors_are_retried_and_counted():
    loader = aload.DataLoader(
        Flaky(12, failures=2), batch_size=4, retry=aload.Retry(attempts=3, backoff=0)
    )
    assert sorted(flatten(list(loader))) == list(range(12))
    assert loader.stats.retries == 24
    assert loader.stats.skipped == 0


def test_errors_that_are_not_transient_are_not_retried():
    loader = aload.DataLoader(
        Flaky(4, failures=1, exc=ValueError), batch_size=4, retry=aload.Retry(attempts=5)
    )
    with pytest.raises(ValueError, match="reset while reading"):
        list(loader)
    assert loader.stats.retries == 0


def test_retries_run_out_and_the_last_error_is_raised():
    loader = aload.DataLoader(
        Flaky(4, failures=9), batch_size=2, retry=aload.Retry(attempts=3, backoff=0)
    )
    with pytest.raises(ConnectionResetError):
        list(loader)


@pytest.mark.parametrize("async_dataset", [True, False])
def test_failure_budget_skips_and_counts_samples_then_raises_past_it(async_dataset, caplog):
    class SyncBroken(torch.utils.data.Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, index):
            if index in {3, 14}:
                raise OSError(f"sample {index} is gone")
            return index

    def make(max_skipped):
        ds = BrokenRemote(20, {3, 14}, exc=OSError) if async_dataset else SyncBroken()
        return aload.DataLoader(ds, batch_size=5, max_skipped=max_skipped)

    loader = make(2)
    seen = flatten(list(loader))
    assert seen == [i for i in range(20) if i not in {3, 14}]
    assert loader.stats.skipped == 2
    assert sorted(loader.stats.skipped_indices) == [3, 14]
    assert "skipped sample 3" in caplog.text
    with pytest.raises(OSError, match="sample 14 is gone"):
        list(make(1))


def test_sync_datasets_are_retried_too():
    class SyncFlaky(torch.utils.data.Dataset):
        def __init__(self):
            self.failed = set()

        def __len__(self):
            return 6

        def __getitem__(self, index):
            if index not in self.failed:
                self.failed.add(index)
                raise TimeoutError("slow disk")
            return index

    loader = aload.DataLoader(
        SyncFlaky(), batch_size=3, num_workers=2, retry=aload.Retry(backoff=0)
    )
    assert sorted(flatten(list(loader))) == list(range(6))
    assert loader.stats.retries == 6


def test_async_context_dataset_is_entered_on_the_loop_for_each_epoch():
    class WithSession(Remote):
        events: ClassVar[list[tuple[str, str]]] = []

        async def __aenter__(self):
            self.events.append(("enter", threading.current_thread().name))
            self.session = object()
            return self

        async def __aexit__(self, *exc):
            self.events.append(("exit", threading.current_thread().name))
            del self.session

        async def __getitem__(self, index):
            assert self.session is not None
            return await super().__getitem__(index)

    loader = aload.DataLoader(WithSession(8), batch_size=4)
    list(loader)
    list(loader)
    assert WithSession.events == [("enter", "aload-worker-loop"), ("exit", "aload-worker-loop")] * 2


def test_async_dataset_resumes_mid_epoch():
    def make():
        return aload.DataLoader(
            Remote(60),
            batch_size=4,
            shuffle=True,
            max_concurrency=16,
            generator=torch.Generator().manual_seed(2),
        )

    assert_resumes_exactly(make, stop=5)


class RemoteWithNoise(Remote):
    """An async map-style dataset that adds noise from a generator it checkpoints."""

    def __init__(self, n):
        super().__init__(n)
        self.generator = torch.Generator().manual_seed(0)

    async def __getitem__(self, index):
        noise = int(torch.randint(1000, (), generator=self.generator))
        return await super().__getitem__(index) * 1000 + noise

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


class RemoteStream(PassesState):
    """An async stream that counts where it stands, and starts over (a new pass) once it
    ends: its state must resume it, and a stream that ended is not read again."""

    def __init__(self, n):
        self.n, self.position, self.passes = n, 0, 0

    async def __aiter__(self):
        while self.position < self.n:
            await anyio.sleep(0.0005)
            self.position += 1
            yield self.passes * 1000 + self.position - 1
        self.position = 0
        self.passes += 1


@pytest.mark.anyio
@pytest.mark.parametrize("stop", [0, 3, 6])
@pytest.mark.parametrize("kind", ["map-style", "stream"])
async def test_an_async_datasets_own_state_resumes(anyio_backend, kind, stop):
    def make():
        if kind == "stream":
            return aload.DataLoader(RemoteStream(22), batch_size=4)
        return aload.DataLoader(
            RemoteWithNoise(30),
            batch_size=4,
            shuffle=True,
            max_concurrency=1,  # one read at a time: the draws keep their order
            generator=torch.Generator().manual_seed(2),
        )

    async with heartbeat() as beat:
        loader = make()
        batches = aiter(loader)
        head = [(await anext(batches)).tolist() for _ in range(stop)]
        state = loader.state_dict()
        rest = [batch.tolist() async for batch in batches]
        resumed = make()
        resumed.load_state_dict(state)
        assert [batch.tolist() async for batch in resumed] == rest
        assert head + rest == [batch.tolist() async for batch in make()]
    assert beat.longest_gap < 0.25


class CountsBatchCalls:
    """An async `__getitems__` that records how many of its calls are in flight at most."""

    def __init__(self) -> None:
        self.now = self.most = 0

    def __len__(self) -> int:
        return 1024

    async def __getitem__(self, index: int) -> int:
        return index

    async def __getitems__(self, indices: list[int]) -> list[int]:
        self.now += 1
        self.most = max(self.most, self.now)
        await anyio.sleep(0.005)
        self.now -= 1
        return list(indices)


@pytest.mark.parametrize(
    ("max_concurrency", "prefetch_factor", "calls"), [(256, 2, 16), (64, 2, 4), (256, 1, 8)]
)
def test_a_batch_call_counts_as_its_items_against_max_concurrency(
    max_concurrency, prefetch_factor, calls
):
    """What the async-datasets guide says: max_concurrency / batch_size calls at once, times
    prefetch_factor."""
    dataset = CountsBatchCalls()
    loader = aload.DataLoader(
        dataset, batch_size=32, max_concurrency=max_concurrency, prefetch_factor=prefetch_factor
    )
    assert flatten(list(loader)) == list(range(1024))
    assert dataset.most == calls
