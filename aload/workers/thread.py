"""Thread workers: a fixed set of daemon threads that share the dataset.

aload starts and stops these threads itself rather than borrowing anyio's thread cache, whose
idle threads linger for seconds after use: when an epoch ends or is abandoned, its threads end
with it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from queue import SimpleQueue

from . import Job

_STOP = None


class ThreadPool:
    """`num_workers` threads, each running jobs from a queue until `shutdown`.

    Args:
        num_workers: how many threads to start.
        setup: run once in each thread before its first job, with the worker id; if it raises,
            every job sent to that thread fails with that exception.
        dedicated_queues: one queue per worker, so `submit(job, worker=i)` runs on thread i
            (iterable datasets keep one iterator per worker); otherwise all threads share one
            queue and the first free thread takes the next job.
    """

    def __init__(
        self,
        num_workers: int,
        setup: Callable[[int], None] | None = None,
        *,
        dedicated_queues: bool = False,
    ) -> None:
        if dedicated_queues:
            self._queues: list[SimpleQueue[Job | None]] = [
                SimpleQueue() for _ in range(num_workers)
            ]
        else:
            self._queues = [SimpleQueue()] * num_workers
        self._setup = setup
        self._threads = [
            threading.Thread(
                target=self._work, args=(i, self._queues[i]), name=f"aload-worker-{i}", daemon=True
            )
            for i in range(num_workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job, worker: int | None = None) -> None:
        self._queues[worker or 0].put(job)

    def shutdown(self) -> None:
        for queue in self._queues:
            queue.put(_STOP)

    def join(self, timeout: float | None = None) -> bool:
        for thread in self._threads:
            thread.join(timeout)
        return not self.alive

    @property
    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def _work(self, worker_id: int, queue: SimpleQueue[Job | None]) -> None:
        setup_error: BaseException | None = None
        if self._setup is not None:
            try:
                self._setup(worker_id)
            except BaseException as error:
                setup_error = error
        while (job := queue.get()) is not _STOP:
            if setup_error is None:
                job.run()
            else:
                job.fail(setup_error)
