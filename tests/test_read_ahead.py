"""`prefetch_factor="auto"`: workers read further ahead while a slow batch, read in order,
holds the others back; batches, order and errors stay torch's."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import torch
import torch.utils.data as tud
from conftest import aload_threads, eventually, open_fds, wait_for_no_workers
from loop_pauses import best_pause

import aload
from aload._read_ahead import MAXIMUM, START, ReadAheadTuner


class SlowItems(tud.Dataset):
    """Instant reads but for `slow` items, which take `seconds` (a timeout and retry). Counts
    reads in shared memory, and how many were done while a slow one was being read."""

    def __init__(self, n: int, slow: tuple[int, ...], seconds: float = 0.2) -> None:
        self.n, self.slow, self.seconds = n, slow, seconds
        self.reads = multiprocessing.Value("i", 0)
        self.reads_during_slow = multiprocessing.Value("i", 0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        if index in self.slow:
            before = self.reads.value
            time.sleep(self.seconds)
            with self.reads_during_slow.get_lock():
                self.reads_during_slow.value += self.reads.value - before
        with self.reads.get_lock():
            self.reads.value += 1
        return torch.tensor([index])


def reads_during_slow_of_the_second_epoch(**kwargs) -> tuple[int, aload.DataLoader]:
    dataset = SlowItems(300, slow=(5,))
    loader = aload.DataLoader(dataset, batch_size=1, num_workers=2, **kwargs)
    for _ in range(2):
        dataset.reads_during_slow.value = 0
        assert sorted(int(b) for b in loader) == list(range(300))
    return dataset.reads_during_slow.value, loader


def test_a_slow_batch_that_held_the_others_back_makes_the_workers_read_further_ahead():
    static, _ = reads_during_slow_of_the_second_epoch(prefetch_factor=2)
    tuned, loader = reads_during_slow_of_the_second_epoch(prefetch_factor="auto")
    # torch's bound: 2 workers x 2 batches in flight, the slow one among them.
    assert static <= 2 * 2
    assert tuned >= 100  # the other worker read on while the slow one took 0.2 s
    read_ahead = loader.stats.read_ahead
    assert read_ahead.prefetch_factor > START
    assert "held back" in read_ahead.history[0].reason
    assert loader.prefetch_factor == "auto"


@pytest.mark.parametrize("worker_mode", ["thread", "process"])
def test_reading_ahead_keeps_torchs_batches_and_order(worker_mode):
    dataset = SlowItems(200, slow=(3, 90), seconds=0.05)
    generator = torch.Generator().manual_seed(7)
    expected = [
        b.tolist() for b in tud.DataLoader(dataset, batch_size=4, shuffle=True, generator=generator)
    ]
    loader = aload.DataLoader(
        dataset,
        batch_size=4,
        shuffle=True,
        generator=generator.manual_seed(7),
        num_workers=2,
        worker_mode=worker_mode,
        prefetch_factor="auto",
    )
    assert [b.tolist() for b in loader] == expected
    assert loader.stats.read_ahead.prefetch_factor > START
    wait_for_no_workers()


def test_batches_yielded_as_they_finish_are_never_held_back():
    _, loader = reads_during_slow_of_the_second_epoch(prefetch_factor="auto", in_order=False)
    assert loader.stats.read_ahead.prefetch_factor == START
    assert loader.stats.read_ahead.history == ()


def test_a_training_step_longer_than_the_reads_needs_nothing_more_ahead():
    loader = aload.DataLoader(
        SlowItems(64, slow=()), batch_size=4, num_workers=2, prefetch_factor="auto"
    )
    for _ in loader:
        time.sleep(0.002)
    assert loader.stats.read_ahead.prefetch_factor == START


def test_it_never_reads_ahead_past_the_memory_budget():
    tuner = ReadAheadTuner(memory_budget=8 * 2**20)
    # 4 batches of 1 MiB in flight (2 workers x 2), held back the whole time of a long wait:
    # twice as far fits in 8 MiB, no further.
    assert tuner.held_back(
        0.5, waited=0.5, in_flight=4, largest_batch=2**20, batches=0, finished_pace=1e4
    )
    assert tuner.factor == 4
    assert not tuner.held_back(
        0.5, waited=0.5, in_flight=8, largest_batch=2**20, batches=0, finished_pace=1e4
    )
    assert tuner.factor == 4


def test_it_grows_to_hold_what_the_loop_takes_during_the_wait():
    tuner = ReadAheadTuner()
    time.sleep(0.2)  # the loop took 100 batches in 0.1 s, then was held back 0.1 s
    assert tuner.held_back(
        0.1, waited=0.1, in_flight=4, largest_batch=100, batches=100, finished_pace=0.0
    )
    # 4 in flight and ~100 more the loop would have taken meanwhile, over 2 workers
    assert 40 <= tuner.factor <= 60
    assert tuner.factor <= MAXIMUM


def test_being_held_back_a_small_share_of_the_time_changes_nothing():
    tuner = ReadAheadTuner()
    time.sleep(0.2)
    assert not tuner.held_back(
        0.005, waited=0.005, in_flight=4, largest_batch=100, batches=400, finished_pace=0.0
    )
    assert tuner.factor == START


def test_the_factor_resumes_with_the_state():
    _, loader = reads_during_slow_of_the_second_epoch(prefetch_factor="auto")
    settled = loader.stats.read_ahead.prefetch_factor
    resumed = aload.DataLoader(
        SlowItems(300, slow=(5,)), batch_size=1, num_workers=2, prefetch_factor="auto"
    )
    resumed.load_state_dict(loader.state_dict())
    assert resumed.stats.read_ahead.prefetch_factor == settled


def test_prefetch_factor_auto_is_checked_as_torch_checks_the_number():
    with pytest.raises(ValueError, match="prefetch_factor option could only be specified"):
        aload.DataLoader(range(8), prefetch_factor="auto")
    with pytest.raises(TypeError, match="prefetch_factor must be an int or 'auto', got 'fast'"):
        aload.DataLoader(range(8), num_workers=2, prefetch_factor="fast")
    assert aload.DataLoader(range(8), num_workers=2).stats.read_ahead is None


@pytest.mark.anyio
async def test_reading_ahead_under_async_for_keeps_the_loop_running(anyio_backend):
    async def epoch():
        dataset = SlowItems(400, slow=(5, 200), seconds=0.1)
        loader = aload.DataLoader(dataset, batch_size=2, num_workers=2, prefetch_factor="auto")
        assert [int(i) for batch in [b async for b in loader] for i in batch] == list(range(400))
        assert loader.stats.read_ahead.prefetch_factor > START

    assert await best_pause(epoch, 0.05, tries=2) < 0.05


def test_persistent_worker_processes_keep_reading_further_ahead_and_torchs_batches():
    dataset = SlowItems(160, slow=(3,), seconds=0.1)
    kwargs = {"batch_size": 2, "num_workers": 2, "persistent_workers": True}
    expected = [b.tolist() for b in tud.DataLoader(dataset, **kwargs)]
    loader = aload.DataLoader(dataset, worker_mode="process", prefetch_factor="auto", **kwargs)
    for _ in range(2):
        assert [b.tolist() for b in loader] == expected
    grown = loader.stats.read_ahead.prefetch_factor
    assert grown > START
    dataset.reads_during_slow.value = 0
    assert [b.tolist() for b in loader] == expected
    assert dataset.reads_during_slow.value > 2 * 2  # beyond torch's bound, on the same workers
    loader.close()
    wait_for_no_workers()


class SlowLarge(tud.Dataset):
    """Samples of 128 KiB (a batch of 4 goes through shared memory), one slow early on."""

    def __len__(self) -> int:
        return 400

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == 5:
            time.sleep(0.1)
        return torch.full((32 * 1024,), float(index))


def leave_early(prefetch_factor) -> int:
    """Leave an epoch of 2 worker processes after 40 batches; the factor it had grown to."""
    loader = aload.DataLoader(
        SlowLarge(),
        batch_size=4,
        num_workers=2,
        worker_mode="process",
        prefetch_factor=prefetch_factor,
    )
    for seen, _ in enumerate(loader):
        if seen == 40:  # past the slow batch
            break
    factor = loader.prefetch_factor
    if loader.stats.read_ahead is not None:
        factor = loader.stats.read_ahead.prefetch_factor
    del loader
    # its processes, and the pool's collector thread, which closes their pipes as they end
    eventually(lambda: not (multiprocessing.active_children() or aload_threads()), 5)
    return factor


def test_leaving_a_grown_epoch_early_leaves_no_process_shared_memory_or_descriptor():
    # A static epoch first: what multiprocessing opens once per program (its resource
    # tracker, the arena for shared values) is then open before the count.
    leave_early(2)
    shm_before, fds_before = set(os.listdir("/dev/shm")), open_fds()
    assert leave_early("auto") > START  # many more in flight than torch's bound
    assert multiprocessing.active_children() == []
    assert set(os.listdir("/dev/shm")) <= shm_before
    assert open_fds() <= fds_before
