"""The zero-worker pool: runs each job at once in the caller's thread, as torch does with
`num_workers=0` (used only by plain `for` loops, where blocking the caller is the contract)."""

from __future__ import annotations

from . import Job


class InlinePool:
    """Runs a job inside `submit`, so the caller loads its own batches, one at a time."""

    where = "the consumer"  # what runs its jobs, for the stats' stages

    def submit(self, job: Job, worker: int | None = None) -> None:
        job.run()

    def begin(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> bool:
        return True

    @property
    def alive(self) -> bool:
        return False

    @property
    def alive_workers(self) -> int:
        return 0

    def timed_out(self, job: Job) -> None:
        pass
