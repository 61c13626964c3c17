"""Errors, timeouts and early exits: what reaches the consumer, and what is left running."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import traceback

import anyio
import pytest
from conftest import Indexed, aload_threads, flatten, wait_for_no_workers

import aload


class BrokenAt(Indexed):
    """Raises KeyError for one index, `times` times in all workers together (then heals)."""

    def __init__(self, n, broken, times=1_000_000):
        super().__init__(n)
        self.broken = broken
        self.failures_left = [times]  # shared by the workers' replicas

    def __getitem__(self, index):
        if index == self.broken and self.failures_left[0] > 0:
            self.failures_left[0] -= 1
            raise KeyError(f"sample {index} is corrupt")
        return index


def notes(error: BaseException) -> str:
    return "\n".join(getattr(error, "__notes__", []))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_error_in_getitem_keeps_its_type_and_traceback_and_names_the_indices(num_workers):
    loader = aload.DataLoader(BrokenAt(20, broken=6), batch_size=4, num_workers=num_workers)
    with pytest.raises(KeyError, match="sample 6 is corrupt") as caught:
        list(loader)
    assert "batch 1 (indices [4, 5, 6, 7])" in notes(caught.value)
    frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert "__getitem__" in frames
    wait_for_no_workers()


@pytest.mark.asyncio
async def test_error_reaches_async_for_and_the_next_epoch_starts_cleanly():
    loader = aload.DataLoader(BrokenAt(20, broken=13, times=1), batch_size=4, num_workers=3)
    with pytest.raises(KeyError) as caught:
        async for _ in loader:
            pass
    assert "indices [12, 13, 14, 15]" in notes(caught.value)
    assert sorted(flatten([b async for b in loader])) == list(range(20))


def test_long_index_lists_are_shortened_in_the_message():
    loader = aload.DataLoader(BrokenAt(100, broken=0), batch_size=64)
    with pytest.raises(KeyError) as caught:
        next(iter(loader))
    assert "(64 indices)" in notes(caught.value)


def test_error_in_collate_fn_is_reraised_with_the_indices():
    def collate(samples):
        if 9 in samples:
            raise ValueError("cannot collate")
        return samples

    loader = aload.DataLoader(Indexed(12), batch_size=5, collate_fn=collate, num_workers=2)
    with pytest.raises(ValueError, match="cannot collate") as caught:
        list(loader)
    assert "indices [5, 6, 7, 8, 9]" in notes(caught.value)


def test_iteration_can_go_on_after_a_failed_batch_without_losing_others():
    it = iter(aload.DataLoader(BrokenAt(12, broken=5), batch_size=3, num_workers=2))
    delivered, failed = [], 0
    while True:
        try:
            delivered.append(next(it).tolist())
        except KeyError:
            failed += 1
        except StopIteration:
            break
    assert failed == 1
    assert delivered == [[0, 1, 2], [6, 7, 8], [9, 10, 11]]


def test_failing_worker_init_fn_reaches_the_consumer():
    def init(worker_id):
        raise RuntimeError(f"worker {worker_id} cannot open its file")

    loader = aload.DataLoader(Indexed(8), batch_size=2, num_workers=2, worker_init_fn=init)
    with pytest.raises(RuntimeError, match="cannot open its file"):
        list(loader)
    wait_for_no_workers()


class SlowAt(Indexed):
    def __init__(self, n, slow, seconds):
        super().__init__(n)
        self.slow, self.seconds = slow, seconds

    def __getitem__(self, index):
        if index == self.slow:
            time.sleep(self.seconds)
        return index


@pytest.mark.parametrize("num_workers", [0, 2])
def test_timeout_names_the_late_batch(num_workers):
    loader = aload.DataLoader(
        SlowAt(12, slow=5, seconds=1.0), batch_size=2, num_workers=num_workers, timeout=0.2
    )
    it = iter(loader)
    assert next(it).tolist() == [0, 1]
    assert next(it).tolist() == [2, 3]
    started = time.monotonic()
    with pytest.raises(
        TimeoutError, match=r"timed out after 0.2 seconds: batch 2 \(indices \[4, 5\]\)"
    ):
        next(it)
    assert time.monotonic() - started < 0.9
    with pytest.warns(RuntimeWarning, match="still inside a read"):
        it.close()  # within the timeout, leaving the 1 s read to end on its own


@pytest.mark.anyio
async def test_timeout_applies_to_async_for(anyio_backend):
    loader = aload.DataLoader(SlowAt(6, slow=0, seconds=1.0), batch_size=2, timeout=0.1)
    with pytest.raises(TimeoutError, match="batch 0"):
        async for _ in loader:
            pass


def test_batches_inside_the_timeout_are_delivered():
    loader = aload.DataLoader(Indexed(20, delay=0.001), batch_size=4, num_workers=2, timeout=5)
    assert sorted(flatten(list(loader))) == list(range(20))


@pytest.mark.parametrize("blocking", [True, False])
def test_natural_end_of_epoch_leaves_no_thread_running(blocking):
    baseline = threading.active_count()
    loader = aload.DataLoader(Indexed(30), batch_size=4, num_workers=4)
    if blocking:
        list(loader)
    else:

        async def run():
            async for _ in loader:  # (threads start as jobs wait for one: up to 4)
                assert 1 <= len(aload_threads()) <= 4

        anyio.run(run)
    assert threading.active_count() <= baseline


def test_break_stops_workers_and_abandons_queued_batches():
    baseline = threading.active_count()
    ds = Indexed(400, delay=0.002)
    for batch in aload.DataLoader(ds, batch_size=8, num_workers=4, prefetch_factor=4):
        assert batch.tolist() == list(range(8))
        break
    wait_for_no_workers()
    assert threading.active_count() <= baseline
    reads = ds.reads
    assert reads < 400
    time.sleep(0.1)
    assert ds.reads == reads


@pytest.mark.anyio
async def test_break_out_of_async_for_stops_workers(anyio_backend):
    baseline = threading.active_count()
    async for _ in aload.DataLoader(Indexed(400, delay=0.002), batch_size=8, num_workers=4):
        break
    wait_for_no_workers()
    assert threading.active_count() <= baseline


@pytest.mark.anyio
async def test_cancelling_the_consumer_stops_workers_promptly(anyio_backend):
    baseline = threading.active_count()
    loader = aload.DataLoader(Indexed(10_000, delay=0.002), batch_size=16, num_workers=4)
    with anyio.move_on_after(0.1) as scope:
        async for _ in loader:
            await anyio.sleep(0.01)
    assert scope.cancelled_caught
    wait_for_no_workers(limit=0.5)
    assert threading.active_count() <= baseline


@pytest.mark.anyio
async def test_exception_in_the_loop_body_stops_workers(anyio_backend):
    async def train():
        async for _ in aload.DataLoader(Indexed(1000, delay=0.001), batch_size=8, num_workers=3):
            raise ZeroDivisionError("loss is nan")

    with pytest.raises(ZeroDivisionError):
        await train()
    wait_for_no_workers()


@pytest.mark.anyio
async def test_aclose_returns_once_workers_have_ended(anyio_backend):
    it = aiter(aload.DataLoader(Indexed(100, delay=0.001), batch_size=4, num_workers=3))
    await anext(it)
    await it.aclose()
    assert aload_threads() == []
    with pytest.raises(StopAsyncIteration):
        await anext(it)


def test_persistent_workers_serve_every_epoch_until_close():
    starts = []
    loader = aload.DataLoader(
        Indexed(12),
        batch_size=4,
        num_workers=2,
        persistent_workers=True,
        worker_init_fn=starts.append,
    )
    for _epoch in range(3):
        assert sorted(flatten(list(loader))) == list(range(12))
        assert len(aload_threads()) == 2
    assert sorted(starts) == [0, 1]
    loader.close()
    assert aload_threads() == []
    assert sorted(flatten(list(loader))) == list(range(12))
    loader.close()


def test_persistent_workers_drop_an_abandoned_epochs_batches():
    with aload.DataLoader(
        Indexed(40, delay=0.001), batch_size=4, num_workers=2, persistent_workers=True
    ) as loader:
        for _ in loader:
            break
        assert flatten(list(loader)) == list(range(40))
    assert aload_threads() == []


def test_without_persistent_workers_each_epoch_starts_fresh_workers():
    starts = []
    loader = aload.DataLoader(Indexed(8), batch_size=4, num_workers=2, worker_init_fn=starts.append)
    list(loader)
    assert aload_threads() == []
    list(loader)
    assert sorted(starts) == [0, 0, 1, 1]


def test_persistent_loader_used_as_a_temporary_still_finishes_its_epoch():
    # The loader is freed as soon as `for` has its iterator; its workers must serve the epoch.
    seen = []
    for batch in aload.DataLoader(
        Indexed(40), batch_size=4, num_workers=2, persistent_workers=True
    ):
        seen.extend(batch.tolist())
    assert seen == list(range(40))
    wait_for_no_workers()


def test_closing_a_loader_mid_epoch_fails_queued_batches_instead_of_hanging():
    loader = aload.DataLoader(
        Indexed(200, delay=0.002), batch_size=4, num_workers=2, persistent_workers=True
    )
    it = iter(loader)
    next(it)
    loader.close()
    with pytest.raises(RuntimeError, match="workers were shut down"):
        list(it)


EXITS_MID_EPOCH = r"""
import os, time
import anyio
import aload


class Slow:
    def __len__(self):
        return 100

    def __getitem__(self, i):
        os.write(1, f"start {i}\n".encode())  # one write per line: threads do not interleave
        time.sleep(0.3)
        os.write(1, f"end {i}\n".encode())
        return i


async def main():
    async for batch in aload.DataLoader(Slow(), batch_size=1, num_workers=3):
        return  # leave the loop, and then the program, while the workers are mid-item


anyio.run(main)
os.write(1, b"main done\n")
"""


def test_leaving_a_loop_and_exiting_at_once_lets_workers_finish_their_item():
    """Worker threads are daemons: without a join at exit, the interpreter would finalize
    (and tear torch down) while they are still inside an item, which can abort the process."""
    done = subprocess.run(
        [sys.executable, "-c", EXITS_MID_EPOCH],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split()
    started = {line for line in done.stdout.splitlines() if line.startswith("start")}
    ended = {line.replace("end", "start") for line in done.stdout.splitlines() if "end" in line}
    assert "done" in lines
    assert len(started) >= 2  # the first batch, and at least one more in flight at exit
    assert started == ended


HOLDS_AN_EPOCH_TILL_EXIT = """
import anyio
import aload


class Awaited:
    def __len__(self):
        return 64

    async def __getitem__(self, i):
        await anyio.sleep(0.001)
        return i


loader = aload.DataLoader(Awaited(), batch_size=4, num_workers={workers})
epoch = iter(loader)  # a module global: collected only as the interpreter ends
next(epoch)
{close}
print("done")
"""


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("close", ["epoch.close()", ""], ids=["closed", "left open"])
def test_an_async_epoch_held_until_exit_ends_without_a_word(workers, close):
    """The loop pool of an epoch that lives until the interpreter ends is collected after
    modules are torn down: it must not print an ignored exception on the way out."""
    script = HOLDS_AN_EPOCH_TILL_EXIT.format(workers=workers, close=close)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["done"]
    assert done.stderr == ""
