"""`async for` never blocks the event loop, under asyncio and trio alike."""

from __future__ import annotations

import anyio
import pytest
import torch
from conftest import Indexed, flatten, heartbeat
from torch.utils.data import TensorDataset

import aload


@pytest.mark.anyio
@pytest.mark.parametrize("num_workers", [0, 2])
async def test_event_loop_keeps_running_while_slow_batches_load(anyio_backend, num_workers):
    loader = aload.DataLoader(Indexed(24, delay=0.01), batch_size=4, num_workers=num_workers)
    async with heartbeat() as beat:
        seen = flatten([batch async for batch in loader])
    assert sorted(seen) == list(range(24))
    assert beat.beats >= 20
    assert beat.longest_gap < 0.035


@pytest.mark.anyio
async def test_other_tasks_run_between_batches_that_are_already_ready(anyio_backend):
    # Kept small: anyio's pytest runner drives trio in guest mode, where a task that only
    # checkpoints makes every turn slow.
    loader = aload.DataLoader(TensorDataset(torch.arange(400)), batch_size=10, num_workers=2)
    ticks = 0

    async def count_turns() -> None:
        nonlocal ticks
        while True:
            await anyio.lowlevel.checkpoint()
            ticks += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(count_turns)
        batches = [batch async for batch in loader]
        tg.cancel_scope.cancel()
    assert len(batches) == 40
    assert ticks >= 20


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
