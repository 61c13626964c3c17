"""`async for` never blocks the event loop, under asyncio and trio alike."""

from __future__ import annotations

import itertools
import time

import anyio
import pytest
import torch
from conftest import Indexed, flatten, heartbeat
from loop_pauses import best_of, best_pause
from torch.utils.data import TensorDataset

import aload


@pytest.mark.anyio
@pytest.mark.parametrize("num_workers", [0, 2])
async def test_event_loop_keeps_running_while_slow_batches_load(anyio_backend, num_workers):
    """The loop beats on while each batch takes 40 ms to read. The better of two tries, as
    the other loop-pause tests: a pause that aload causes comes every time, a collection of
    this long suite's heap or a busy moment of CI's two cores (37 ms once) does not."""

    async def pause() -> float:
        loader = aload.DataLoader(Indexed(24, delay=0.01), batch_size=4, num_workers=num_workers)
        async with heartbeat() as beat:
            seen = flatten([batch async for batch in loader])
        assert sorted(seen) == list(range(24))
        assert beat.beats >= 20
        return beat.longest_gap

    longest = await best_of(pause, 0.035, tries=2)
    assert longest < 0.035, f"{longest * 1000:.1f} ms"


@pytest.mark.anyio
async def test_other_tasks_get_turns_while_batches_are_already_ready(anyio_backend):
    """Ready batches are taken without a pass of the event loop each, yet other tasks get a
    turn at least every millisecond or so (a loop body that never awaits included). The
    better of two epochs, as the loop-pause tests: CI's busy cores once held one turn 20.3 ms
    where the others came every millisecond."""

    async def longest_wait() -> float:
        loader = aload.DataLoader(
            TensorDataset(torch.arange(100_000)), batch_size=10, num_workers=2
        )
        turns: list[float] = []

        async def take_turns() -> None:
            while True:
                await anyio.lowlevel.checkpoint()
                turns.append(time.perf_counter())

        async with anyio.create_task_group() as tg:
            tg.start_soon(take_turns)
            await anyio.lowlevel.checkpoint()
            started = time.perf_counter()
            batches = 0
            async for _batch in loader:  # counted, not kept: 10,000 kept would time the GC
                batches += 1
            ended = time.perf_counter()
            tg.cancel_scope.cancel()
        assert batches == 10_000
        during = [started, *(t for t in turns if started < t < ended), ended]
        return max(b - a for a, b in itertools.pairwise(during))

    wait = await best_of(longest_wait, 0.02, tries=2)
    assert wait < 0.02, f"other tasks waited {wait * 1000:.1f} ms for a turn"


@pytest.mark.anyio
async def test_each_step_is_a_cancellation_point_even_with_batches_ready(anyio_backend):
    """The loop body cancels its own scope: the next step raises there, though the batch is
    ready without a wait (the cancellation check is found once per epoch, made each step)."""

    async def cancelled_at_the_third() -> None:
        loader = aload.DataLoader(TensorDataset(torch.arange(1000)), batch_size=10, num_workers=2)
        taken = 0
        with anyio.CancelScope() as scope:
            async for _batch in loader:
                taken += 1
                if taken == 3:
                    scope.cancel()
        assert taken == 3
        assert scope.cancelled_caught

    assert await best_pause(cancelled_at_the_third, 0.035, tries=2) < 0.035


@pytest.mark.anyio
async def test_several_epochs_under_each_backend(anyio_backend):
    loader = aload.DataLoader(
        Indexed(33), batch_size=5, shuffle=True, num_workers=3, in_order=False
    )
    for _epoch in range(3):
        assert sorted(flatten([batch async for batch in loader])) == list(range(33))


@pytest.mark.anyio
async def test_two_loaders_feed_two_tasks_concurrently(anyio_backend):
    results: dict[str, list[int]] = {}

    async def consume(name: str, n: int) -> None:
        loader = aload.DataLoader(Indexed(n, delay=0.001), batch_size=4, num_workers=2)
        results[name] = flatten([batch async for batch in loader])

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume, "train", 40)
        tg.start_soon(consume, "val", 12)
    assert results == {"train": list(range(40)), "val": list(range(12))}


def test_plain_for_runs_inside_a_worker_thread_of_a_running_loop():
    loader = aload.DataLoader(Indexed(10), batch_size=5, num_workers=2)

    async def main() -> list[int]:
        return await anyio.to_thread.run_sync(lambda: flatten(list(loader)))

    assert anyio.run(main) == list(range(10))
