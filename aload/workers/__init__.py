"""Worker backends behind one small interface: run jobs, stop, report whether still alive.

A pool knows nothing about batches, ordering or errors: it runs `job.run()` (which never
raises) on its workers, and `job.fail(error)` if the worker could not start. The scheduler
owns everything else.
"""

from __future__ import annotations

from typing import Protocol


class Job(Protocol):
    """A unit of work as a pool sees it."""

    def run(self) -> None:
        """Do the work and report the outcome; never raises."""

    def fail(self, error: BaseException) -> None:
        """Report that the worker could not run jobs (its start-up raised `error`)."""


class WorkerPool(Protocol):
    """Runs jobs on workers; `submit` never blocks."""

    where: str  # what runs its jobs ("worker threads", ...), for the stats' stages

    def submit(self, job: Job, worker: int | None = None) -> None:
        """Queue `job`, on worker `worker` when the pool has one queue per worker."""

    def begin(self) -> None:
        """The consumer waits for a result: start what the pool held back until then (a
        process pool's forks, which hold the GIL, so as not to stall the consumer's thread
        while it sets up its epoch)."""

    def shutdown(self) -> None:
        """Ask every worker to stop after its current job, failing jobs still queued (and any
        submitted later); does not wait."""

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every worker has stopped; True when none is left."""

    @property
    def alive(self) -> bool:
        """Whether any worker is still running."""

    @property
    def alive_workers(self) -> int:
        """How many workers (threads or processes) are still running."""

    def timed_out(self, job: Job) -> None:
        """`job` took longer than the loader's timeout: stop its worker where a worker can be
        stopped (a process), so that no later batch waits behind it; else nothing."""
