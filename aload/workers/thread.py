"""Thread workers: a fixed set of daemon threads that share the dataset.

aload starts and stops these threads itself rather than borrowing anyio's thread cache, whose
idle threads linger for seconds after use: when an epoch ends or is abandoned, its threads end
with it. The threads hold only their queue, never the pool, so a pool nobody holds any more
is collected and stops its threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from queue import Empty, SimpleQueue

from .._intra_op import use_one_thread
from . import Job
from ._exit import stop_at_exit

_STOP = None


class ThreadPool:
    """Up to `num_workers` threads, each running jobs from a queue until `shutdown`.

    Args:
        num_workers: how many threads to start.
        setup: run once in each thread before its first job, with the worker id; if it raises,
            every job sent to that thread fails with that exception.
        dedicated_queues: one queue per worker, so `submit(job, worker=i)` runs on thread i
            (iterable datasets keep one iterator per worker); otherwise all threads share one
            queue and the first free thread takes the next job.
        every_worker: start a thread per job until all run, busy or not (torch starts every
            worker, so a user's `worker_init_fn` runs in each); otherwise a thread starts
            only for a job that no idle thread can take.
        readers: at most this many threads run jobs at once, the rest of the queued jobs
            wait (`num_workers="auto"` tunes it with `limit_readers`); None: every thread.
    """

    where = "worker threads"  # what runs its jobs, for the stats' stages

    def __init__(
        self,
        num_workers: int,
        setup: Callable[[int], None] | None = None,
        *,
        dedicated_queues: bool = False,
        every_worker: bool = False,
        readers: int | None = None,
    ) -> None:
        if dedicated_queues:
            self._queues: list[SimpleQueue[Job | None]] = [
                SimpleQueue() for _ in range(num_workers)
            ]
        else:
            self._queues = [SimpleQueue()] * num_workers
        self._lock = threading.Lock()
        self._closed = False
        self._dedicated = dedicated_queues
        self._every_worker = every_worker
        self._idle = _Count()  # threads waiting for a job
        self._unfinished = _Count()  # jobs given and not yet ended
        self._gate = None if readers is None else _Gate(readers)
        self._threads = [
            threading.Thread(
                target=_work,
                args=(i, queue, setup, self._idle, self._gate, self._unfinished),
                name=f"aload-worker-{i}",
                daemon=True,
            )
            for i, queue in enumerate(self._queues)
        ]
        self._started = 0
        stop_at_exit(pool=self)

    def submit(self, job: Job, worker: int | None = None) -> None:
        """Queue a job, starting threads as work arrives: one more for a job that no idle
        thread can take (each job, with `every_worker`; thread `worker` for a dedicated
        queue), so the first job runs while the rest start (a thread takes ~0.15 ms to start;
        32 of them would hold the first batch back ~5 ms), and no more threads run than jobs
        do at once (each thread that allocates keeps its own malloc arena: idle threads would
        hold memory)."""
        with self._lock:
            if not self._closed:
                self._unfinished.add(1)
                self._queues[worker or 0].put(job)
                if self._started < len(self._threads):  # once all run, nothing more per job
                    if self._dedicated:
                        self._start_up_to(worker or 0)
                    elif self._every_worker or (
                        self._queues[0].qsize() > self._idle.value  # more than idle threads take
                        and (self._gate is None or self._started < self._gate.limit)
                    ):
                        self._start_up_to(0)
                return
        job.fail(_shut_down())

    def limit_readers(self, readers: int) -> None:
        """Let `readers` threads run jobs at once from now on (a pool made with `readers`),
        starting threads for the queued jobs a raised limit lets run."""
        assert self._gate is not None, "a pool made without readers= runs every thread"
        with self._lock:
            self._gate.set(readers)
            wanted = min(readers, self._started + self._queues[0].qsize(), len(self._threads))
            if not self._closed and self._started < wanted:
                self._start_up_to(wanted - 1)

    def _start_up_to(self, worker: int) -> None:
        """Start one more thread, and every thread up to `worker` (called under the lock)."""
        wanted = min(len(self._threads), max(self._started, worker) + 1)
        for thread in self._threads[self._started : wanted]:
            thread.start()
            stop_at_exit(thread=thread)
        self._started = wanted

    def begin(self) -> None:
        pass  # threads start as their first job comes

    def shutdown(self) -> None:
        """Stop every thread after its current job; queued jobs fail rather than vanish."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            queued: list[Job] = []
            for queue in {id(q): q for q in self._queues}.values():
                while True:
                    try:
                        job = queue.get_nowait()
                    except Empty:
                        break
                    if job is not _STOP:
                        queued.append(job)
            for queue in self._queues:
                queue.put(_STOP)
            if self._gate is not None:  # threads held at the gate go on to their _STOP
                self._gate.set(len(self._threads))
            self._unfinished.add(-len(queued))
        for job in queued:
            job.fail(_shut_down())

    def wait_finished(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every job given so far to end; whether they
        have (none queued, none running). Worker processes are forked only then where these
        threads read: a thread inside a BLAS call while the process forks deadlocks the
        fork (OpenBLAS stops its team in the fork, and the team is busy with that call)."""
        return self._unfinished.wait_zero(timeout)

    def join(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads[: self._started]:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not self.alive

    @property
    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    @property
    def alive_workers(self) -> int:
        return sum(thread.is_alive() for thread in self._threads)

    @staticmethod
    def clocks_readable() -> bool:
        """Whether `cpu_seconds` can read the threads' clocks here: Unix where
        `time.pthread_getcpuclockid` exists (not macOS, not Windows)."""
        return hasattr(time, "pthread_getcpuclockid")

    def cpu_seconds(self) -> float:
        """The CPU time the running threads have used so far (their own clocks: a thread
        that holds the GIL, or runs C code without it, counts; one that waits does not),
        where `clocks_readable`."""
        return sum(thread_cpu_seconds(thread) or 0.0 for thread in self._threads[: self._started])

    def timed_out(self, job: Job) -> None:
        pass  # a thread cannot be stopped: it ends when its read returns

    def __del__(self) -> None:
        if hasattr(self, "_threads"):
            self.shutdown()


def thread_cpu_seconds(thread: threading.Thread) -> float | None:
    """The CPU time `thread` has used so far, by its own clock; None where it is not running
    (a dead thread's id may be reused), or where a thread's clock cannot be read here."""
    if thread.ident is None or not thread.is_alive() or not ThreadPool.clocks_readable():
        return None
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except OSError:  # it ended between the check and the read
        return None


class _Count:
    """A count that a pool's threads change (they hold this, not the pool): its idle
    threads, or its jobs not yet ended, which `wait_zero` waits to see at none."""

    def __init__(self) -> None:
        self.value = 0
        self._changed = threading.Condition(threading.Lock())

    def add(self, change: int) -> None:
        with self._changed:
            self.value += change
            if not self.value:
                self._changed.notify_all()

    def wait_zero(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the count to reach 0; whether it did."""
        with self._changed:
            return self._changed.wait_for(lambda: not self.value, timeout)


class _Gate:
    """At most `limit` of a pool's threads take and run jobs at once; the others wait here,
    before the queue, so jobs still start in the order they were queued. A reader holds its
    place while it waits for a job, so after the limit falls, each reader that was waiting
    runs one more job before the lower limit holds."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._running = 0
        self._changed = threading.Condition()

    def set(self, limit: int) -> None:
        with self._changed:
            self.limit = limit
            self._changed.notify_all()

    def enter(self) -> None:
        with self._changed:
            while self._running >= self.limit:
                self._changed.wait()
            self._running += 1

    def leave(self) -> None:
        with self._changed:
            self._running -= 1
            self._changed.notify()


def _work(
    worker_id: int,
    queue: SimpleQueue[Job | None],
    setup: Callable[[int], None] | None,
    idle: _Count,
    gate: _Gate | None,
    unfinished: _Count,
) -> None:
    use_one_thread()  # one intra-op thread, as torch's worker processes have
    setup_error: BaseException | None = None
    if setup is not None:
        try:
            setup(worker_id)
        except BaseException as error:
            setup_error = error
    while True:
        if gate is not None:
            gate.enter()  # a reader's place, held while it waits for a job and runs it
        idle.add(1)
        job = queue.get()
        idle.add(-1)
        if job is _STOP:
            return
        if setup_error is None:
            job.run()
        else:
            job.fail(setup_error)
        unfinished.add(-1)
        if gate is not None:
            gate.leave()


def _shut_down() -> RuntimeError:
    return RuntimeError("aload workers were shut down (DataLoader.close()) before this batch ran")
