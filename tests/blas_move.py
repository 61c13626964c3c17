"""Run by test_worker_mode.py in a fresh process: an epoch whose worker threads multiply
matrices on the BLAS moves to forked worker processes (a verdict forced for them), and its
batches are torch's. A fork while a thread is inside a BLAS call deadlocks (OpenBLAS stops
its team in the fork, and waits for the team, which is busy with that call): in a process of
its own, a hang is a timeout for the test, not a stuck suite."""

from __future__ import annotations

import numpy as np
import torch
import torch.utils.data as tud

import aload
from aload._mode import ModeChooser

_judge_threads = ModeChooser.judge_threads


def judged_for_processes(self, epoch, seconds, *args, **kwargs):
    _judge_threads(self, epoch, seconds, *args, **kwargs)
    if self.worker_mode == "thread" and not self.settled and seconds >= 0.1:
        self._choose(epoch, "process", "forced by the test")


class Products(tud.Dataset):
    """A matrix product per item: the BLAS runs it on a team of every core."""

    def __init__(self) -> None:
        self.matrix = np.random.default_rng(0).random((192, 192))

    def __len__(self) -> int:
        return 3000

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy((self.matrix @ (self.matrix + index))[0, :4].copy())


if __name__ == "__main__":
    ModeChooser.judge_threads = judged_for_processes
    loader = aload.DataLoader(
        Products(),
        batch_size=16,
        num_workers=2,
        worker_mode="auto",
        multiprocessing_context="fork",
    )
    read = torch.cat(list(loader))
    assert torch.equal(read, torch.cat(list(tud.DataLoader(Products(), batch_size=16))))
    print(loader.stats.worker_mode.history[0].worker_mode)
