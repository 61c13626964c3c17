"""Loader work runs with one torch intra-op thread, as in torch's worker processes, and the
caller's own setting is left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.utils.data as tud
from conftest import flatten
from loop_pauses import best_pause
from torch.utils.data import Dataset, TensorDataset

import aload

OPENMP = "OpenMP" in torch.__config__.parallel_info()
needs_a_team = pytest.mark.skipif(
    not OPENMP or torch.get_num_threads() < 2,
    reason="needs torch on OpenMP with more than one intra-op thread",
)


class IntraOpThreads(Dataset):
    """Each sample: how many intra-op threads a torch op in the worker would use."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.get_num_threads()


@needs_a_team
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_workers_use_one_intra_op_thread_as_torchs_do(mode):
    before = torch.get_num_threads()
    theirs = set(flatten(tud.DataLoader(IntraOpThreads(), batch_size=2, num_workers=2)))
    ours = aload.DataLoader(IntraOpThreads(), batch_size=2, num_workers=2, worker_mode=mode)
    assert set(flatten(ours)) == theirs == {1}
    assert torch.get_num_threads() == before


@needs_a_team
@pytest.mark.anyio
async def test_gathers_on_the_callers_thread_leave_its_setting(anyio_backend):
    before = torch.get_num_threads()
    data = TensorDataset(torch.randn(4096, 64))
    for workers in (0, 2):
        loader = aload.DataLoader(data, batch_size=256, shuffle=True, num_workers=workers)
        assert sum(len(b[0]) for b in loader) == 4096
        assert torch.get_num_threads() == before

        async def epoch(loader: aload.DataLoader = loader) -> None:
            assert sum([len(b[0]) async for b in loader]) == 4096

        assert await best_pause(epoch, 0.035, tries=2) < 0.035
        assert torch.get_num_threads() == before


class SeesItsThreads(torch.Tensor):
    """Notes how many intra-op threads each `index_select` on it may use."""

    seen: list[int] = []  # noqa: RUF012 - one list for the test

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.index_select:
            cls.seen.append(torch.get_num_threads())
        return super().__torch_function__(func, types, args, kwargs or {})


@needs_a_team
@pytest.mark.parametrize(("width", "expected"), [(64, "the caller's"), (512, 1)])
def test_a_gather_big_enough_to_run_on_a_team_runs_on_the_callers_thread_alone(width, expected):
    """256 rows of 64 floats are below torch's grain: the op runs on the calling thread with
    no team, and the setting is left alone; 256 rows of 512 would fan out, so they get one."""
    before = torch.get_num_threads()
    SeesItsThreads.seen.clear()
    data = TensorDataset(torch.randn(1024, width).as_subclass(SeesItsThreads))
    loader = aload.DataLoader(data, batch_size=256, num_workers=0)
    assert sum(len(b[0]) for b in loader) == 1024
    gathered = SeesItsThreads.seen[-4:]  # the epoch's four batches
    assert gathered == [before if expected == "the caller's" else expected] * 4
    assert torch.get_num_threads() == before


def blas_threads() -> int:
    """The threads numpy's BLAS runs in this process (the most, over its libraries)."""
    from threadpoolctl import threadpool_info

    return max(pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas")


needs_a_blas_team = pytest.mark.skipif(
    blas_threads() < 2, reason="needs numpy's BLAS on more than one thread"
)


class BlasThreads(Dataset):
    """Each sample: a matrix product (a BLAS call that fans out), then how many threads the
    BLAS runs where it is read."""

    def __init__(self):
        self.matrix = np.random.default_rng(0).random((256, 256))

    def __len__(self):
        return 12

    def __getitem__(self, index):
        self.matrix @ self.matrix
        return blas_threads()


@needs_a_blas_team
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_worker_processes_run_one_blas_thread_and_the_caller_keeps_its_own(context):
    """A BLAS team of a thread per core in every worker process makes them take turns on
    the cores (torch's workers limit only torch's threads: a matrix product per item read 4x
    slower on 2 processes than on one BLAS thread each). A forked worker is told once its
    dataset starts the team (its first batch may use it); a spawned one, at its start."""
    before = blas_threads()
    loader = aload.DataLoader(
        BlasThreads(), batch_size=2, num_workers=2, worker_mode="process",
        multiprocessing_context=context,
    )  # fmt: skip
    batches = [batch.tolist() for batch in loader]
    assert len(batches) == 6
    assert {threads for batch in batches[2:] for threads in batch} == {1}
    if context == "spawn":
        assert batches[0] == batches[1] == [1, 1]
    assert blas_threads() == before


class Products(Dataset):
    """A numpy matrix product per item, as a tensor."""

    def __init__(self):
        self.matrix = np.random.default_rng(0).random((96, 96))

    def __len__(self):
        return 12

    def __getitem__(self, index):
        return torch.from_numpy(self.matrix @ (self.matrix + index))


@needs_a_blas_team
def test_products_on_one_blas_thread_are_torchs_samples():
    """Drop-in means identical: what one BLAS thread computes in aload's workers is what
    torch's workers compute on all of theirs."""
    theirs = list(tud.DataLoader(Products(), batch_size=4, num_workers=2))
    ours = list(aload.DataLoader(Products(), batch_size=4, num_workers=2, worker_mode="process"))
    assert len(ours) == len(theirs) == 3
    for mine, torchs in zip(ours, theirs, strict=True):
        assert torch.equal(mine, torchs)
