"""The workers of an epoch that moved to others while it ran (`worker_mode="auto"`)."""

from __future__ import annotations

from . import Job, WorkerPool


class HandOff:
    """New jobs go to `current`; `previous` finish the jobs they were given, and stop with
    the epoch, which owns them; `current` stops with it only where the epoch owns it (else
    it is the loader's persistent workers). `retired`: persistent workers among `previous`
    that the loader let go, which the epoch now owns too."""

    def __init__(
        self,
        previous: WorkerPool,
        current: WorkerPool,
        owns_current: bool,
        retired: WorkerPool | None = None,
    ) -> None:
        self._previous, self._current = previous, current
        owned = (previous, retired, current if owns_current else None)
        self._owned = tuple(pool for pool in owned if pool is not None)
        self.where = current.where

    def submit(self, job: Job, worker: int | None = None) -> None:
        self._current.submit(job, worker)

    def begin(self) -> None:
        self._current.begin()

    def shutdown(self) -> None:
        for pool in self._owned:
            pool.shutdown()

    def join(self, timeout: float | None = None) -> bool:
        return all([pool.join(timeout) for pool in self._owned])

    @property
    def alive(self) -> bool:
        return any(pool.alive for pool in self._owned)

    @property
    def alive_workers(self) -> int:
        return sum(pool.alive_workers for pool in self._owned)

    def timed_out(self, job: Job) -> None:
        self._previous.timed_out(job)
        self._current.timed_out(job)
