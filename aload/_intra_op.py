"""Loader work runs with one torch intra-op thread, as in torch's worker processes.

torch's worker processes call `torch.set_num_threads(1)`. Threads can't: that call is
process-wide (and rebuilds a thread pool). But the OpenMP runtime torch parallelises with
keeps the team size per thread, so a worker thread (and the consumer's thread while it
gathers a batch) can ask for one thread for itself and leave the training thread's setting
alone. Without this, every worker thread's torch op fans out over every core, and with the
cores busy (training), the op waits for a team that isn't scheduled: a 3 µs gather of 256
rows took 13-24 µs here with another process on both cores.

Where torch does not use OpenMP (or its runtime can't be found), nothing changes.

Worker processes also get one thread in each BLAS library loaded (numpy's OpenBLAS, MKL),
once their dataset starts its team: a team runs a thread per core in every process, and with a
matrix product per item, 2 worker processes on 2 cores read 4x slower than with one BLAS
thread each (torch's workers too: they limit only torch's own threads).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

SERIAL_ELEMENTS = 32768
"""torch's grain size (`at::internal::GRAIN_SIZE`): an op on fewer elements runs on the calling
thread without a team, so it has none to wait for and needs no setting changed."""

P = ParamSpec("P")
R = TypeVar("R")


@functools.cache
def _openmp() -> tuple[Callable[[int], None], Callable[[], int]] | None:
    """`omp_set_num_threads` and `omp_get_max_threads` of the runtime torch uses, or None."""
    if not torch._C.has_openmp:
        return None
    try:
        runtime = ctypes.CDLL(None)
        set_threads, max_threads = runtime.omp_set_num_threads, runtime.omp_get_max_threads
    except (OSError, AttributeError, TypeError):
        return None
    set_threads.argtypes, set_threads.restype = [ctypes.c_int], None
    max_threads.argtypes, max_threads.restype = [], ctypes.c_int
    return set_threads, max_threads


def use_one_thread() -> None:
    """From now on, torch ops on the calling thread run on that thread alone (a worker
    thread calls this when it starts)."""
    openmp = _openmp()
    if openmp is not None:
        torch.get_num_threads()  # torch sets up this thread's team first, or it would undo ours
        openmp[0](1)


def on_one_thread(function: Callable[P, R]) -> Callable[P, R]:
    """`function`, with its torch ops on the calling thread alone; the thread's own setting
    comes back after each call (the consumer's thread gathers batches and draws the
    sampler's permutations with it: with the cores busy, a team would wait for its members)."""
    openmp = _openmp()
    if openmp is None:
        return function
    set_threads, max_threads = openmp

    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        torch.get_num_threads()
        before = max_threads()
        set_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            set_threads(before)

    return call


def one_blas_thread() -> None:
    """From now on, every BLAS library loaded in this process runs one thread."""
    from threadpoolctl import ThreadpoolController  # only in worker processes that need it

    pools = ThreadpoolController().select(user_api="blas")
    if any(pool.num_threads != 1 for pool in pools.lib_controllers):
        pools.limit(limits=1)


class BlasTeamWatch:
    """In a worker process: once it runs more threads than it started with (a BLAS's team,
    started by the dataset's first call that fans out; a spawned worker's import of numpy
    starts it at once), every BLAS runs one thread.

    Not at the worker's start: setting it then makes OpenBLAS start its thread server, whose
    spare thread spins a core for ~100 ms, in every worker of every epoch, BLAS or not (pure
    Python items on 2 processes read 10-18% slower). Nor in the parent around the fork: its
    own server restarts when the setting comes back, and spins there. Linux only."""

    CHECKS = 8  # the first batches, then one in `EVERY`: a check lists the process's threads
    EVERY = 64

    def __init__(self) -> None:
        self._started = _threads()
        self._batches = 0
        if self._started is not None and self._started > 1:  # spawned: numpy started it
            self._started = None
            one_blas_thread()  # a team that runs already takes the setting without a spin

    def batch_done(self) -> None:
        """Call after each batch the worker reads."""
        if self._started is None:
            return
        self._batches += 1
        if self._batches > self.CHECKS and self._batches % self.EVERY:
            return
        threads = _threads()
        if threads is not None and threads > self._started:
            self._started = None  # once: the team is told, and threads the dataset starts stay
            one_blas_thread()


def _threads() -> int | None:
    """The threads this process runs (None where /proc cannot say)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None
