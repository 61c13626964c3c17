"""Plans: `DataLoader` compiles to one, a composed one builds the same loader, and the map
per batch (`batch_transform`) runs after collate in every mode, as a collate that did both."""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import re
import threading
import time

import anyio
import pytest
import torch
import torch.utils.data as tud
from conftest import Indexed, assert_resumes_exactly
from loop_pauses import best_pause
from torch.utils.data import default_collate

import aload


def double_batch(batch):
    return batch * 2


def plus_one(sample):
    return sample + 1


def collate_then_double(samples):
    """What torch's loader is given for `transform=plus_one, batch_transform=double_batch`."""
    return double_batch(default_collate([plus_one(s) for s in samples]))


class AwaitedIndexed:
    """Item i is i, after an awaited 1 ms read (a remote store)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        await anyio.sleep(0.001)
        return index


MODES = {
    "0 workers": {},
    "threads": {"num_workers": 2},
    "processes": {"num_workers": 2, "worker_mode": "process"},
}


@pytest.mark.parametrize("mode", MODES)
def test_a_batch_transform_gives_torchs_batches_for_a_collate_that_does_it(mode):
    """Same seed, same batches as torch's loader whose collate_fn maps, collates, maps."""
    common = {"batch_size": 8, "shuffle": True}
    torch_batches = list(
        tud.DataLoader(
            Indexed(100),
            collate_fn=collate_then_double,
            generator=torch.Generator().manual_seed(3),
            **common,
        )
    )
    loader = aload.DataLoader(
        Indexed(100),
        transform=plus_one,
        batch_transform=double_batch,
        generator=torch.Generator().manual_seed(3),
        **common,
        **MODES[mode],
    )
    batches = list(loader)
    assert len(batches) == len(torch_batches) == 13
    for ours, theirs in zip(batches, torch_batches, strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    "workers", [{}, {"num_workers": 2}, {"num_workers": 2, "worker_mode": "process"}]
)
def test_an_async_datasets_batches_are_mapped_after_collate_on_its_cpu_workers(workers):
    loader = aload.DataLoader(
        AwaitedIndexed(64),
        batch_size=8,
        transform=plus_one,
        batch_transform=double_batch,
        **workers,
    )
    batches = list(loader)
    assert [b.tolist() for b in batches] == [
        [2 * (i + 1) for i in range(start, start + 8)] for start in range(0, 64, 8)
    ]


def test_a_batch_transform_follows_a_one_operation_gather():
    """A TensorDataset is gathered a batch at a time; the batch map still sees every batch."""
    data = torch.arange(200.0).view(100, 2)
    seen = []

    def note(batch):
        seen.append(batch[0].shape[0])
        return [batch[0] * 2]

    loader = aload.DataLoader(tud.TensorDataset(data), batch_size=10, batch_transform=note)
    batches = list(loader)
    assert seen == [10] * 10
    assert torch.equal(torch.cat([b[0] for b in batches]), data * 2)


def test_a_batch_transform_must_be_callable():
    with pytest.raises(TypeError, match="batch_transform must be callable"):
        aload.DataLoader(Indexed(8), batch_transform=3)


def test_a_loader_shows_its_plan_and_the_plan_builds_a_loader_with_the_same_batches():
    loader = aload.DataLoader(
        Indexed(50),
        batch_size=4,
        shuffle=True,
        num_workers=2,
        transform=plus_one,
        generator=torch.Generator().manual_seed(5),
    )
    plan = loader.plan
    assert [stage.name for stage in plan.stages] == ["read", "map", "collate"]
    assert str(plan) == ("read on 2 worker threads -> map plus_one -> collate default_collate")
    again = plan.loader()
    assert (again.num_workers, again.transform, again.batch_size) == (2, plus_one, 4)
    # The plan holds the loader's generator: draw the same epoch from the same state.
    first = [b.tolist() for b in loader]
    plan.batching["generator"].manual_seed(5)
    assert [b.tolist() for b in again] == first


def test_a_composed_plan_is_the_loader_its_arguments_build():
    plan = (
        aload.Plan(Indexed(40), batch_size=8, shuffle=True, generator=torch.Generator())
        .read(aload.threads(2), max_skipped=1)
        .map(plus_one)
        .collate()
        .map_batch(double_batch)
    )
    assert [stage.name for stage in plan.stages] == ["read", "map", "collate", "map_batch"]
    arguments = plan.arguments()
    assert (arguments["num_workers"], arguments["worker_mode"]) == (2, "thread")
    assert arguments["max_skipped"] == 1
    plan.batching["generator"].manual_seed(1)
    composed = [b.tolist() for b in plan.loader(prefetch_factor=3)]
    torch_batches = tud.DataLoader(
        Indexed(40),
        batch_size=8,
        shuffle=True,
        collate_fn=collate_then_double,
        generator=torch.Generator().manual_seed(1),
    )
    assert composed == [b.tolist() for b in torch_batches]


def test_stages_are_kept_in_plan_order_whatever_the_order_they_are_given():
    plan = aload.Plan(Indexed(8), batch_size=2).map_batch(double_batch).map(plus_one)
    assert [s.name for s in plan.stages] == ["read", "map", "collate", "map_batch"]
    replaced = plan.map(double_batch)
    assert (replaced.stages[1].fn, plan.stages[1].fn) == (double_batch, plus_one)


def test_an_async_read_and_a_map_on_processes_is_two_executors():
    plan = (
        aload.Plan(AwaitedIndexed(64), batch_size=8)
        .read(aload.loop(32))
        .map(plus_one, aload.processes(2))
    )
    arguments = plan.arguments()
    assert arguments["max_concurrency"] == 32
    assert (arguments["num_workers"], arguments["worker_mode"]) == (2, "process")
    loader = plan.loader()
    assert sorted(i for b in loader for i in b.tolist()) == list(range(1, 65))
    assert str(loader.plan) == (
        "read on aload's loop (32 at once) -> map plus_one on 2 worker processes -> collate "
        "default_collate"
    )
    stages = {stage.name: stage for stage in loader.stats.epoch.stages}
    assert (stages["read"].where, stages["read"].concurrency) == ("aload's loop", 32)
    assert (stages["map"].where, stages["map"].concurrency) == ("worker processes", 2)
    assert stages["read"].items == stages["map"].items == 64
    assert stages["collate"].items == 8


def test_a_map_on_the_loop_itself_needs_no_workers():
    plan = aload.Plan(AwaitedIndexed(16), batch_size=4).map(plus_one, aload.loop())
    assert plan.arguments()["num_workers"] == 0
    assert sorted(i for b in plan.loader() for i in b.tolist()) == list(range(1, 17))


def test_reads_on_processes_auto_are_one_process_per_core():
    loader = aload.Plan(Indexed(64), batch_size=4).read(aload.processes("auto")).loader()
    assert (loader.num_workers, loader.worker_mode) == (len(os.sched_getaffinity(0)), "process")
    assert [i for b in loader for i in b.tolist()] == list(range(64))
    assert str(loader.plan.stages[0]) == "read on auto worker processes"


def test_plans_that_cannot_run_are_refused_naming_the_stage():
    sync = aload.Plan(Indexed(8), batch_size=2).read(aload.threads(2))
    with pytest.raises(ValueError, match=r"a dataset read by workers is mapped where it is read"):
        sync.read(aload.processes(2)).map(plus_one, aload.ray_actors(2)).arguments()
    with pytest.raises(TypeError, match=r"read\(\) runs on an executor"):
        sync.read(4)
    with pytest.raises(ValueError, match=r"threads\(\) takes a positive int or 'auto', got 0"):
        aload.threads(0)
    with pytest.raises(ValueError, match=r"processes\(\) takes a positive int or 'auto', got 0"):
        aload.processes(0)
    with pytest.raises(TypeError, match=r"map_batch\(\) takes a callable"):
        sync.map_batch(None)
    with pytest.raises(TypeError, match="num_workers, which the plan sets"):
        sync.loader(num_workers=3)
    # The loader's own checks hold too: torch's rules for the batching arguments.
    with pytest.raises(ValueError, match="sampler option is mutually exclusive with shuffle"):
        aload.Plan(Indexed(8), shuffle=True, sampler=[0, 1]).loader()


def spin(seconds):
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        pass


def slow_map(sample):
    spin(0.002)
    return sample


def slow_batch_map(batch):
    spin(0.02)
    return batch


@pytest.mark.parametrize("mode", ["thread", "process"])
@pytest.mark.parametrize(
    ("stage", "transform", "batch_transform"),
    [("map", slow_map, None), ("map_batch", None, slow_batch_map)],
)
def test_a_slow_map_stage_is_named_the_bottleneck(mode, stage, transform, batch_transform, caplog):
    loader = aload.DataLoader(
        Indexed(64),
        batch_size=8,
        num_workers=2,
        worker_mode=mode,
        persistent_workers=True,
        transform=transform,
        batch_transform=batch_transform,
    )
    with caplog.at_level(logging.DEBUG, logger="aload"):
        for _ in range(2):  # the second epoch, its workers already running
            for _ in loader:
                pass
    loader.close()
    epoch = loader.stats.epoch
    assert epoch.bottleneck == stage, epoch
    where = "worker threads" if mode == "thread" else "worker processes"
    line = caplog.records[-1].getMessage()
    assert f"bottleneck: {stage} (read " in line
    assert re.search(rf"; {stage} \d+% busy \(2 at once on {where}\)", line), line
    slow = epoch.stage(stage)
    assert slow.where == f"worker {mode}{'es' if mode == 'process' else 's'}"
    assert slow.seconds >= (64 * 0.002 if stage == "map" else 8 * 0.02) * 0.9


def two_executor_plans():
    """Awaited reads mapped on threads; blocking reads on threads mapped on processes."""
    awaited = aload.Plan(AwaitedIndexed(128), batch_size=8, shuffle=True).read(aload.loop(64))
    blocking = aload.Plan(Indexed(128, delay=0.001), batch_size=8, shuffle=True)
    return {
        "awaited reads, threads": awaited.map(plus_one, aload.threads(2)),
        "threaded reads, processes": blocking.read(aload.threads(4)).map(
            plus_one, aload.processes(2)
        ),
    }


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(two_executor_plans()))
async def test_a_composed_plan_under_async_for_keeps_the_loop_running(anyio_backend, name):
    """Persistent workers: a fork from this suite's large process may hold the GIL for tens
    of milliseconds (`loop_pauses.py` measures starts in a fresh process); the second try's
    epoch has no start in it."""
    plan = two_executor_plans()[name].map_batch(double_batch)
    loader = plan.loader(persistent_workers=True)
    seen: list[int] = []

    async def run() -> None:
        seen.clear()
        async for batch in loader:
            seen.extend(batch.tolist())

    gc.collect()
    pause = await best_pause(run, 0.03, tries=2)
    await loader.aclose()
    assert sorted(seen) == [2 * (i + 1) for i in range(128)]
    assert pause < 0.03


class Stateful(Indexed):
    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def read_where(index):
    """A plain read that says which thread and process ran it."""
    return threading.current_thread().name, os.getpid(), index


def map_where(sample):
    thread, pid, index = sample
    return thread, pid, os.getpid(), index


def test_a_plain_dataset_read_on_threads_is_mapped_on_processes():
    """Reads on 4 threads of this process, the map on 2 worker processes: torch's samples in
    torch's order for the same seed."""
    plan = (
        aload.Plan(Indexed(96), batch_size=8, shuffle=True, generator=torch.Generator())
        .read(aload.threads(4))
        .map(plus_one, aload.processes(2))
    )
    assert str(plan).startswith("read on 4 worker threads -> map plus_one on 2 worker processes")
    plan.batching["generator"].manual_seed(7)
    loader = plan.loader()
    assert [str(stage) for stage in loader.plan.stages[:2]] == [str(s) for s in plan.stages[:2]]
    expected = tud.DataLoader(
        Indexed(96),
        batch_size=8,
        shuffle=True,
        collate_fn=lambda samples: default_collate([plus_one(s) for s in samples]),
        generator=torch.Generator().manual_seed(7),
    )
    assert [b.tolist() for b in loader] == [b.tolist() for b in expected]
    stages = {stage.name: stage for stage in loader.stats.epoch.stages}
    assert (stages["read"].where, stages["read"].concurrency) == ("worker threads", 4)
    assert (stages["map"].where, stages["map"].concurrency) == ("worker processes", 2)


class WhereRead(Indexed):
    def __getitem__(self, index):
        time.sleep(0.002)  # blocking I/O: the threads overlap it
        return read_where(index)


def test_threaded_reads_run_beside_the_loop_and_the_map_in_other_processes():
    plan = aload.Plan(WhereRead(64), batch_size=8).read(aload.threads(4))
    plan = plan.map(map_where, aload.processes(2))
    loader = plan.collate(list).loader()
    samples = [sample for batch in loader for sample in batch]
    assert sorted(index for *_, index in samples) == list(range(64))
    read_threads = {thread for thread, *_ in samples}
    assert "MainThread" not in read_threads
    assert len(read_threads) <= 4
    assert {pid for _, pid, _, _ in samples} == {os.getpid()}  # read here
    assert os.getpid() not in {mapped for _, _, mapped, _ in samples}  # mapped there
    # The read threads end with the epoch's loop, the processes with the epoch.
    deadline = time.monotonic() + 5
    while (leftover(read_threads) or multiprocessing.active_children()) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert leftover(read_threads) == set()
    assert multiprocessing.active_children() == []


def leftover(names: set[str]) -> set[str]:
    """The threads of these names still alive."""
    return {thread.name for thread in threading.enumerate()} & names


def test_only_threads_then_processes_split_a_plain_datasets_read_from_its_map():
    with pytest.raises(ValueError, match=r"but for reads on threads\(n\)"):
        aload.Plan(Indexed(8)).read(aload.processes(2)).map(plus_one, aload.threads(2)).loader()
    with pytest.raises(ValueError, match=r"but for reads on threads\(n\)"):
        aload.Plan(Indexed(8)).read(aload.threads("auto")).map(
            plus_one, aload.processes(2)
        ).loader()
    with pytest.raises(ValueError, match="without a state_dict"):
        aload.Plan(Stateful(8)).read(aload.threads(2)).map(plus_one, aload.processes(2)).loader()


class BatchReads(Indexed):
    """Logs each `__getitems__` call's size and thread, as torch's fetcher calls it."""

    def __init__(self, n):
        super().__init__(n)
        self.calls = []

    def __getitems__(self, indices):
        self.calls.append((len(indices), threading.current_thread().name))
        return [self[index] for index in indices]


def test_threaded_reads_take_a_whole_batch_on_a_thread_through_getitems():
    """One thread hop a batch (a hop costs ~30-60 us of CPU), through `__getitems__` where
    the dataset has it, as torch's fetcher reads a batch."""
    dataset = BatchReads(40)
    plan = (
        aload.Plan(dataset, batch_size=8).read(aload.threads(3)).map(plus_one, aload.processes(2))
    )
    assert sorted(i for b in plan.loader() for i in b.tolist()) == list(range(1, 41))
    assert sorted(size for size, _ in dataset.calls) == [8] * 5
    assert "MainThread" not in {thread for _, thread in dataset.calls}


class BrokenAtFive(Indexed):
    def __getitem__(self, index):
        if index == 5:
            raise KeyError(index)
        return index


def test_a_read_that_fails_on_a_thread_raises_its_own_error_naming_the_batch():
    plan = aload.Plan(BrokenAtFive(16), batch_size=4).read(aload.threads(2))
    loader = plan.map(plus_one, aload.processes(2)).loader()
    with pytest.raises(KeyError) as raised:
        list(loader)
    assert raised.value.__notes__ == ["aload: raised while loading batch 1 (indices [4, 5, 6, 7])"]


def test_a_stage_given_again_replaces_its_arguments_too():
    plan = aload.Plan(Indexed(8)).read(aload.threads(2), max_skipped=3, retry=aload.Retry())
    assert plan.arguments()["max_skipped"] == 3
    again = plan.read(aload.threads(4))
    assert (again.arguments()["max_skipped"], again.arguments()["retry"]) == (0, None)
    with pytest.raises(TypeError, match="retry, which the plan sets"):
        again.loader(retry=aload.Retry())


@pytest.mark.parametrize("stop", [1, 5])
def test_a_plan_read_on_threads_and_mapped_on_processes_resumes_exactly(stop):
    def make():
        plan = aload.Plan(
            Indexed(64), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3)
        )
        return plan.read(aload.threads(4)).map(plus_one, aload.processes(2)).loader()

    assert_resumes_exactly(make, stop, settle=0.05)
