"""Event-loop workers for async datasets: aload's own event loop, in one background thread.

The workers are `max_concurrency` long-lived fetcher tasks that take item reads from one
queue shared by every batch in flight, so reads overlap by the hundreds without a thread, or
even a new task, each; the batches are run by runner tasks that live as long, one per batch
in flight at most. The loop is asyncio's (on uvloop where it is installed), and aload's,
not the caller's: the caller's loop (asyncio or trio) only waits for finished batches, so
nothing of aload is left running on it between two batches, and the same dataset serves
plain `for` loops too. Clients bound to a loop (HTTP sessions, database pools) therefore
belong to this one: a dataset that is an async context manager is entered here before its
first read and exited after the epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence, Sized
from itertools import repeat
from typing import Any, Protocol, TypeVar, cast

import anyio
import anyio.lowlevel
from anyio import RunFinishedError

from .._fetch import timed_call
from . import Job, WorkerPool
from ._exit import stop_at_exit
from .thread import thread_cpu_seconds

T = TypeVar("T")
logger = logging.getLogger("aload")

# Which loop aload runs its own on: unset, uvloop where it is installed; "asyncio" or "uvloop".
LOOP_VARIABLE = "ALOAD_LOOP"


def uses_uvloop() -> bool:
    """Whether aload's loop runs on uvloop: where it is installed (`aload[uvloop]`), unless
    `ALOAD_LOOP=asyncio`. Its loop is written in C: awaited reads come about a quarter
    faster on it.

    Raises:
        ValueError: `ALOAD_LOOP` names another loop, or uvloop where it is not installed.
    """
    wanted = os.environ.get(LOOP_VARIABLE, "").strip().lower()
    installed = importlib.util.find_spec("uvloop") is not None
    if wanted not in {"", "asyncio", "uvloop"}:
        raise ValueError(f"{LOOP_VARIABLE} must be 'asyncio' or 'uvloop', got {wanted!r}")
    if wanted == "uvloop" and not installed:
        raise ValueError(f"{LOOP_VARIABLE}=uvloop, but uvloop is not installed (aload[uvloop])")
    return wanted != "asyncio" and installed


def loop_options() -> dict[str, Any]:
    """anyio's options for an asyncio loop run as aload runs its own (`uses_uvloop`)."""
    return {"use_uvloop": uses_uvloop()}


class AsyncJob(Job, Protocol):
    """A job an event loop can await."""

    async def arun(self) -> None:
        """Do the work and report the outcome; never raises."""


def _add_finishing(timing: list[float], spent: Sequence[float]) -> None:
    """Add the stages of finishing samples already read to `timing`: what the work spent
    outside them (handing the samples over) counts as collating, not reading."""
    for stage in range(1, len(timing)):
        timing[stage] += spent[stage]
    timing[2] += spent[0]


class ReadClock:
    """Seconds the fetchers have spent on reads, summed over fetchers, the batches whose
    reads are under way, and the item reads queued for a fetcher (`queue`, the fetchers'
    own queue once the loop is up): read by the loader's stats, which keep this small
    object and not the pool."""

    __slots__ = ("batches", "queue", "seconds")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.batches = 0
        self.queue: Sized = ()


class LoopPool:
    """Runs async jobs concurrently on an event loop in a thread of its own.

    Args:
        dataset: entered with `async with` on the loop first, if it is an async context manager.
        cpu: the pool that `run_cpu` hands CPU-bound work to, or None to run it on the loop.
        cpu_read: for worker processes: the plan they finish batches by, and its accounting.
        owns_cpu: whether this pool stops `cpu` when it stops (not persistent workers).
        max_concurrency: fetcher tasks, so item reads in flight at most, across batches.
    """

    where = "aload's loop"  # what runs its jobs, for the stats' stages

    def __init__(
        self,
        dataset: Any,
        cpu: WorkerPool | None = None,
        max_concurrency: int = 64,
        cpu_read: Any = None,
        owns_cpu: bool = True,
        options: dict[str, Any] | None = None,
    ) -> None:
        # The loop's kind (`loop_options()` unless given): a bad ALOAD_LOOP raises here.
        self._options = loop_options() if options is None else options
        self._dataset = dataset
        self._cpu = cpu
        self._owns_cpu = owns_cpu  # else persistent workers: they outlive this loop
        self._cpu_read = cpu_read
        # Fetcher tasks start as reads are queued, up to `_target` (starting one costs ~10 us:
        # 256 at once would hold the first batch's reads back by milliseconds).
        self._target = max_concurrency
        self._alive = 0  # fetcher tasks running
        self._retiring = 0  # fetchers to end after their current read: a lower concurrency
        self.read_clock = ReadClock()  # the fetchers' time reading, summed
        # Jobs submitted before the loop is up (the dataset's __aenter__ may take a while)
        # wait here: the caller never waits for the start.
        self._lock = threading.Lock()
        self._waiting: list[Job] | None = []
        # Jobs handed over once the loop is up, taken on the loop in one turn however many
        # came meanwhile (a consumer that takes a burst of batches submits a burst of jobs,
        # and one wake-up of the loop serves them all); None once the loop has stopped.
        self._inbox: list[Job] | None = []
        self._inbox_due = False  # a turn of the loop that takes the inbox is queued
        self._closing = False
        self._start_error: BaseException | None = None
        self._crash: BaseException | None = None  # the fault of aload's own that stopped it
        self._thread = threading.Thread(target=self._run, name="aload-worker-loop", daemon=True)
        self._thread.start()
        stop_at_exit(pool=self, thread=self._thread)

    def submit(self, job: Job, worker: int | None = None) -> None:
        with self._lock:
            if self._waiting is not None:
                self._waiting.append(job)
                return
            inbox = self._inbox
            if self._start_error is None and inbox is not None:
                inbox.append(job)
                if self._inbox_due:  # the loop takes it with the others
                    return
                self._inbox_due = True
        if self._start_error is not None:
            job.fail(self._start_error)
        elif inbox is None:
            job.fail(self._stopped())
        else:
            try:
                self._call_soon(self._take_inbox)
            except RunFinishedError:
                self._close_inbox()

    def _started(self, error: BaseException | None = None) -> None:
        """The loop is up (or failed to start): run (or fail) the jobs that waited for it."""
        self._start_error = error
        with self._lock:
            waiting, self._waiting = self._waiting or [], None
        for job in waiting:
            self.submit(job)

    def _take_inbox(self) -> None:
        """On the loop: queue the jobs handed over for runners, waking idle ones or starting
        them (a runner lives for the epoch: a task a batch would cost more than its reads'
        turns)."""
        with self._lock:
            jobs = self._inbox
            if jobs is None:  # the loop is stopping
                return
            self._inbox, self._inbox_due = [], False
        for job in jobs:
            self._jobs.append(cast(AsyncJob, job))  # this pool is only given coroutine reads
            if self._idle_runners:
                _wake(self._idle_runners.pop())
            else:
                self._spawn(self._run_jobs())

    def _close_inbox(self) -> None:
        """The loop has stopped: jobs handed over that it did not take fail, as later ones."""
        with self._lock:
            jobs, self._inbox = self._inbox or [], None
        for job in jobs:
            job.fail(self._stopped())

    async def _run_jobs(self) -> None:
        """One runner: runs queued jobs one after another, or sleeps until one is queued."""
        jobs, idle, loop, running = self._jobs, self._idle_runners, self._loop, self._running
        while True:
            while jobs:
                job = jobs.popleft()
                running.add(job)
                await job.arun()  # reports its outcome; cancelled, it stays in `running`
                running.discard(job)
            wake = loop.create_future()
            idle.append(wake)
            await wake

    async def read_all(
        self, read: Callable[[Any], Awaitable[Any]], items: Sequence[Any]
    ) -> list[Any]:
        """`await read(item)` for every item on the fetchers; the results in item order.

        Raises:
            the first error a read raised; the batch's other reads are dropped.
        """
        batch = _ItemReads(read, len(items), self._loop.create_future())
        self._requests.extend(zip(repeat(batch), range(len(items)), items))
        woken = min(len(items), len(self._idle))
        for _ in range(woken):
            _wake(self._idle.pop())
        self._start_fetchers(len(items) - woken)
        if items:
            self.read_clock.batches += 1
            try:
                await batch.done
            finally:
                self.read_clock.batches -= 1
        if batch.error is not None:
            raise batch.error
        return batch.results

    @property
    def cpu(self) -> WorkerPool | None:
        """The pool that finishes batches (None: this loop does)."""
        return self._cpu

    async def run_cpu(
        self, work: Callable[[], T], samples: Any = None, timing: list[float] | None = None
    ) -> T:
        """Run `work` (which finishes `samples`) on the CPU pool and wait for it without
        blocking this loop; worker processes get the samples and finish them by their plan.
        `timing` (seconds per stage) gains the seconds the work took where it ran."""
        if self._cpu is None:
            value, spent = timed_call(work)
            if timing is not None:
                _add_finishing(timing, spent)
            return value
        call = _CpuCall(work, self._token, samples, self._cpu_read)
        self._cpu.submit(call)
        await call.done.wait()
        if call.error is not None:
            raise call.error
        if timing is not None and call.timing is not None:
            _add_finishing(timing, call.timing)
        return call.value

    def set_concurrency(self, concurrency: int) -> None:
        """Run `concurrency` fetchers from now on (`max_concurrency="auto"`): more start on
        the loop as reads wait for them; fewer: that many end after their current read (none
        drops a read)."""
        with self._lock:
            if self._waiting is not None:  # not up yet: it starts with this many
                self._target = concurrency
                return
        with contextlib.suppress(RunFinishedError):
            self._call_soon(self._resize, concurrency)

    def _resize(self, concurrency: int) -> None:
        """On the loop: run `concurrency` fetchers, starting some for reads that wait for one,
        or retiring some."""
        running = self._alive - self._retiring
        self._target = concurrency
        if concurrency > running:
            self._retiring -= min(self._retiring, concurrency - running)  # not yet retired
            self._start_fetchers(len(self._requests))
        else:
            self._retiring += running - concurrency

    def _start_fetchers(self, reads: int) -> None:
        """On the loop: a fetcher for each of `reads` queued reads that no idle fetcher took,
        as far as the target allows."""
        for _ in range(min(reads, self._target - (self._alive - self._retiring))):
            self._alive += 1
            self._spawn(self._fetch())

    def begin(self) -> None:
        if self._cpu is not None:
            self._cpu.begin()

    def shutdown(self) -> None:
        """Stop the loop and the CPU pool; once: a pool shut down at the interpreter's exit
        may be asked again as it is collected, when the modules it would use are gone."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            running = self._waiting is None  # else the loop sees `_closing` once it is up
        if running:
            with contextlib.suppress(RunFinishedError):
                self._call_soon(self._stop.set)
        if self._own_cpu is not None:
            self._own_cpu.shutdown()

    def join(self, timeout: float | None = None) -> bool:
        started = time.monotonic()
        self._thread.join(timeout)
        if self._own_cpu is not None:
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
            self._own_cpu.join(left)
        return not self.alive

    @property
    def _own_cpu(self) -> WorkerPool | None:
        """The CPU pool this pool stops and waits for (None: none, or persistent workers)."""
        return self._cpu if self._owns_cpu else None

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() or (self._own_cpu is not None and self._own_cpu.alive)

    @property
    def alive_workers(self) -> int:
        cpu = 0 if self._own_cpu is None else self._own_cpu.alive_workers
        return int(self._thread.is_alive()) + cpu

    def loop_cpu_seconds(self) -> float | None:
        """The CPU time the loop's thread has used so far (it runs every read, so one core
        bounds how many it can keep in flight); None where a thread's clock cannot be read
        here (not Unix), or the loop has stopped."""
        return thread_cpu_seconds(self._thread)

    def timed_out(self, job: Job) -> None:
        pass  # the loop's reads are cancelled with the epoch

    def __del__(self) -> None:
        if hasattr(self, "_thread"):
            self.shutdown()

    async def _fetch(self) -> None:
        """One fetcher: does the next item read of any batch, or sleeps until one is queued.

        Taking a queued read costs no turn of the loop; only a read that waits does. Its
        reads add up in `read_clock` as each ends (one clock read a read), so the tuner sees
        a busy spell while it lasts.
        """
        requests, idle, clock, loop = self._requests, self._idle, self.read_clock, self._loop
        cancelled = anyio.get_cancelled_exc_class()
        while True:
            started = time.perf_counter()
            while requests:
                batch, position, item = requests.popleft()
                if batch.error is None:  # else a read of its batch failed: the batch is lost
                    try:
                        batch.results[position] = await batch.read(item)
                    except cancelled:
                        raise
                    except BaseException as error:
                        batch.fail(error)
                batch.count_one()
                ended = time.perf_counter()
                clock.seconds += ended - started
                started = ended
                if self._retiring:  # fewer fetchers wanted: this one ends, its read done
                    self._retiring -= 1
                    self._alive -= 1
                    return
            wake = loop.create_future()
            idle.append(wake)
            await wake

    def _call_soon(self, func: Callable[..., Any], *args: Any) -> None:
        self._token.backend_class.run_sync_soon(func, args, self._token.native_token)

    def _run(self) -> None:
        try:
            anyio.run(self._main, backend="asyncio", backend_options=self._options)
        except BaseException as error:
            if self._waiting is not None:  # the dataset's __aenter__ failed: report it per job
                self._started(error)
            elif error is not self._crash:  # (a crash is logged as the loop stops)
                logger.error("aload's event loop stopped on an error", exc_info=error)

    async def _main(self) -> None:
        self._token = anyio.lowlevel.current_token()
        self._loop = asyncio.get_running_loop()
        self._stop = anyio.Event()
        # Unbounded here; bounded by the scheduler, which keeps only so many batches in flight.
        self._requests: deque[tuple[_ItemReads, int, Any]] = deque()
        self.read_clock.queue = self._requests
        # Idle fetchers and runners wait on plain futures of this (asyncio) loop: an idle
        # spell a read costs half what an anyio Event's does.
        self._idle: list[asyncio.Future[None]] = []
        self._jobs: deque[AsyncJob] = deque()  # submitted, for the runners
        self._running: set[AsyncJob] = set()  # the runners' jobs now
        self._idle_runners: list[asyncio.Future[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()  # the fetchers and runners
        async with _entered(self._dataset):
            try:
                self._started()
                with self._lock:
                    closing = self._closing
                if not closing:
                    await self._stop.wait()
            finally:  # they end before the dataset's context exits: no read outlives it
                self._close_inbox()
                for task in self._tasks:
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
                self._fail_unfinished()
                # Reads left queued (an epoch stopped early) hold their batches' samples:
                # the stats, which outlive the loop, keep none of them.
                self._requests.clear()
                self.read_clock.queue = ()
        if self._crash is not None:
            raise self._crash

    def _fail_unfinished(self) -> None:
        """The loop is stopping: the jobs its runners held or had queued fail, saying why,
        rather than leave a consumer waiting for them (an epoch that stopped has cancelled
        its jobs already: their failure goes nowhere)."""
        if self._crash is not None:  # a fetcher or runner broke (a bug of aload's): say so
            logger.error("aload's event loop stopped on an error", exc_info=self._crash)
        unfinished = [*self._running, *self._jobs]
        self._running.clear()
        self._jobs.clear()
        for job in unfinished:
            job.fail(self._stopped())

    def _stopped(self) -> RuntimeError:
        """The error of a job this pool will not finish: its loop has stopped, on a fault of
        aload's own (then the cause) or not. One each: the consumer adds its batch's note."""
        if self._crash is None:
            return RuntimeError("aload's event loop has stopped; this batch did not run")
        error = RuntimeError(
            f"aload's event loop stopped on an error ({self._crash!r}); this batch did not finish"
        )
        error.__cause__ = self._crash
        return error

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Start a fetcher or a runner: a plain task of aload's loop (asyncio), which costs a
        quarter of a task group's (256 fetchers held the first reads back by 3 ms);
        `_main` cancels them before the dataset's context exits."""
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A fetcher or runner ended: retired, cancelled, or broken by a bug of aload's own
        (they catch every error of a read), which then stops the loop and is raised there."""
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            self._crash = self._crash or error
            self._stop.set()


class _ItemReads:
    """The item reads of one batch, and the future that says they are all done (or one
    failed). The fetchers await `read(item)` themselves: a coroutine less per item."""

    __slots__ = ("_remaining", "done", "error", "read", "results")

    def __init__(
        self, read: Callable[[Any], Awaitable[Any]], count: int, done: asyncio.Future[None]
    ) -> None:
        self.read = read
        self._remaining = count
        self.results: list[Any] = [None] * count
        self.error: BaseException | None = None
        self.done = done

    def fail(self, error: BaseException) -> None:
        """A read failed: the batch ends with `error`, its other reads are skipped."""
        self.error = error
        _wake(self.done)

    def count_one(self) -> None:
        """One read ended (or was skipped)."""
        self._remaining -= 1
        if self._remaining == 0:
            _wake(self.done)


def _wake(waiter: asyncio.Future[None]) -> None:
    """Wake the task awaiting `waiter`, unless it was cancelled (the epoch is ending)."""
    if not waiter.done():
        waiter.set_result(None)


@contextlib.asynccontextmanager
async def _entered(dataset: Any) -> Any:
    if hasattr(dataset, "__aenter__") and hasattr(dataset, "__aexit__"):
        async with dataset:
            yield
    else:
        yield


class _CpuCall:
    """A call handed from the event loop to a CPU worker, waking the loop when done. A worker
    process cannot take the call itself: it gets `indices` (the samples) and `read` (its
    plan), and reports back through `deliver`."""

    def __init__(
        self,
        work: Callable[[], Any],
        token: anyio.lowlevel.EventLoopToken,
        samples: Any = None,
        read: Any = None,
    ) -> None:
        self._work = work
        self._token = token
        self.indices = samples
        self.read = read
        self.done = anyio.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.state: Any = None
        # Seconds in each stage where it ran: a worker thread, or a worker process (which
        # sets it with the batch).
        self.timing: tuple[float, ...] | None = None

    def run(self) -> None:
        try:
            self.value, self.timing = timed_call(self._work)
        except BaseException as error:
            self.error = error
        self._wake()

    def deliver(self, value: Any) -> None:
        self.value = value
        self._wake()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._wake()

    def describe(self) -> str:
        return "a batch's samples to transform and collate"

    def _wake(self) -> None:
        with contextlib.suppress(RunFinishedError):
            self._token.backend_class.run_sync_soon(self.done.set, (), self._token.native_token)
