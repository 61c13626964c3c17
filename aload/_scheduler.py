"""The one place where concurrency lives: one epoch's jobs, their order, waits and shutdown.

The scheduler is pull-based. Each time the consumer asks for a batch it submits jobs until
`max_in_flight` batches are submitted but not yet yielded, takes the next finished one
(in sampler order, or as finished), and submits again so workers keep going while the loop
body runs. No task runs on the event loop between two batches, so an abandoned `async for`
leaves nothing behind but worker threads, which it stops.

Workers and consumer share one thing, the `_Mailbox`: workers append finished jobs and,
only when the consumer is waiting, wake it (through the event loop for `async for`, through
a `threading.Event` for a plain `for`).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
from anyio import RunFinishedError

from ._checkpoint import END_REPORT, Delivered
from ._errors import LoaderTimeoutError
from ._fetch import EXHAUSTED, Abandoned, describe_indices, timed_call
from ._memory_budget import MemoryBudget, batch_nbytes
from ._read_ahead import ReadAheadTuner
from ._stats import EpochMeter, count_samples
from ._tuner import Autotuner
from .workers import WorkerPool
from .workers.handoff import HandOff

# anyio imports its asyncio backend on first use, which would be inside a caller's first
# `async for`: 10-20 ms on that loop. Here it is paid once, with aload's own import.
with contextlib.suppress(ImportError):
    import anyio._backends._asyncio

if TYPE_CHECKING:
    from ._device import DeviceStage

# `async for` over batches that are already there gives other tasks a turn this often.
_YIELD_EVERY = 0.001

_WAIT = object()
_END = object()


@dataclass(frozen=True)
class WorkersMove:
    """Other workers for the rest of an epoch (`worker_mode="auto"` chose them while it ran):
    the `pool` and how its jobs are read, whether the epoch owns (and so stops) it, the
    epoch's bound on batches in flight with them, the bytes they hold of their own, and
    what the epoch asks after each batch from then on (it may move the epoch again).
    `retired`: the loader's persistent workers that it stops using; the epoch owns them
    from then on (they finish what they were given, and stop with it). `tuning`: the new
    workers' tuned stages, whose bound on batches in flight replaces `max_in_flight`."""

    pool: WorkerPool
    read: Any
    owns_pool: bool
    max_in_flight: int
    workers_memory: Callable[[], int] | None = None
    watch: Callable[[], WorkersMove | None] | None = None
    retired: WorkerPool | None = None
    tuning: Autotuner | None = None


async def wait_stopped(pool: WorkerPool, deadline: float | None = None) -> bool:
    """Wait, without blocking the event loop, until `pool` has no worker left running (or
    `deadline`, a `time.monotonic()`, passes); whether it stopped. Polls with sleeps that
    double up to 50 ms: a stopped pool has nothing that could wake a waiter."""
    delay = 0.0002
    while pool.alive:
        if deadline is not None and time.monotonic() >= deadline:
            return False
        await anyio.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


class _Mailbox:
    """Finished jobs, and how to wake the consumers waiting for one (usually one; several
    when tasks or threads share an iterator)."""

    __slots__ = ("done", "waiters")

    def __init__(self) -> None:
        self.done: deque[_Job] = deque()
        self.waiters: set[Callable[[], None]] = set()

    def post(self, job: _Job) -> None:
        """Called from a worker thread. A consumer adds its waiter before it last looks at
        `done`, and the worker appends before it reads `waiters`, so no wake-up is missed."""
        self.done.append(job)
        if self.waiters:
            self.wake_all()

    def wake_all(self) -> None:
        for waiter in tuple(self.waiters):
            waiter()


class _Job:
    """One batch to load: its position in the epoch, its indices (or worker), its outcome."""

    __slots__ = (
        "cancelled",
        "error",
        "indices",
        "mailbox",
        "read",
        "seq",
        "state",
        "timing",
        "value",
        "worker",
    )

    def __init__(
        self,
        seq: int,
        indices: Any,
        worker: int | None,
        read: Callable[[_Job], Any],
        mailbox: _Mailbox,
    ) -> None:
        self.seq = seq
        self.indices = indices
        self.worker = worker
        self.read = read
        self.mailbox = mailbox
        self.cancelled = False
        self.value: Any = None
        self.error: BaseException | None = None
        self.state: Any = None
        # (seconds reading, seconds collating) where a worker read it; None when unknown.
        self.timing: Sequence[float] | None = None

    def run(self) -> None:
        if self.cancelled:
            return
        try:
            value, self.timing = timed_call(self.read, self)
        except Abandoned:
            return
        except BaseException as error:
            self.fail(error)
            return
        self.deliver(value)

    async def arun(self) -> None:
        """`run`, for a job whose read is a coroutine (async datasets, on aload's loop)."""
        if self.cancelled:
            return
        try:
            value = await self.read(self)
        except anyio.get_cancelled_exc_class():
            raise
        except Abandoned:
            return
        except BaseException as error:
            self.fail(error)
            return
        self.deliver(value)

    def deliver(self, value: Any) -> None:
        """Report the batch (read here, or in a worker process)."""
        if self.cancelled:
            return
        self.value = value
        self.mailbox.post(self)

    def fail(self, error: BaseException) -> None:
        if self.cancelled:
            return
        self.error = error
        self.mailbox.post(self)

    def describe(self) -> str:
        if self.indices is None:
            return f"batch {self.seq} (from worker {self.worker or 0})"
        return f"batch {self.seq} (indices {describe_indices(self.indices)})"


class IndexBatches:
    """Job source for map-style datasets: the index sampler's batches, each for any worker.

    A batch's seq is its position in the sampler's order; batches already delivered before a
    checkpoint are skipped.
    """

    def __init__(
        self, index_sampler: Iterable[Any], delivered: Delivered, end_reports: int = 0
    ) -> None:
        # `end_reports`: after the last batch, that many `END_REPORT` jobs, one per worker
        # when dealt in turn (persistent worker processes say where their RNGs stand).
        if end_reports:
            index_sampler = itertools.chain(index_sampler, [END_REPORT] * end_reports)
        self._batches = enumerate(index_sampler)
        # Only batches delivered before this epoch started (a resumed one) are skipped: the
        # source is always ahead of what the epoch delivers.
        self._delivered = delivered if delivered.prefix or delivered.beyond else None
        self._primed: tuple[int, Any, int | None] | None = None
        self.done = False

    def prime(self) -> None:
        """Start the sampler now (it draws its randomness when it starts), as torch's loader
        does when it starts workers, so the global RNG is drawn from in torch's order."""
        self._primed = self.next()

    def next(self) -> tuple[int, Any, int | None] | None:
        if self._primed is not None:
            primed, self._primed = self._primed, None
            return primed
        delivered = self._delivered
        for seq, indices in self._batches:
            if delivered is None or seq not in delivered:
                return seq, indices, None
        self.done = True
        return None

    def returned(self, worker: int | None, exhausted: bool) -> None:
        pass


class WorkerStreams:
    """Job source for iterable datasets: one batch from each worker in turn.

    Turns cycle over the worker ids in a fixed order, skipping workers whose stream has
    ended, so the order of batches does not depend on when an end is noticed. With
    `max_in_flight` (for `in_order=False`), a worker also loses its turn while it holds its
    share of the batches in flight, as in torch, so one slow stream cannot take every slot
    and hold back the others.
    """

    def __init__(
        self, num_workers: int, first_turn: int = 0, max_in_flight: int | None = None
    ) -> None:
        self._num_workers = num_workers
        self._live = set(range(num_workers))
        self._turn = first_turn
        self._seq = 0
        self._max_in_flight = max_in_flight
        self._outstanding = [0] * num_workers
        self.done = False

    def prime(self) -> None:
        pass

    def next(self) -> tuple[int, Any, int | None] | None:
        """The next job, or None: when every stream has ended (`done`), or when every live
        worker holds its share of the jobs in flight."""
        for _ in range(self._num_workers):
            if not self._live:
                break
            worker = self._turn % self._num_workers
            self._turn += 1
            if worker in self._live and self._has_room(worker):
                self._seq += 1
                self._outstanding[worker] += 1
                return self._seq - 1, None, worker
        self.done = not self._live
        return None

    def returned(self, worker: int | None, exhausted: bool) -> None:
        """A job of `worker` came back; `exhausted`: its stream has ended."""
        self._outstanding[worker or 0] -= 1
        if exhausted:
            self._live.discard(worker or 0)

    def _has_room(self, worker: int) -> bool:
        if self._max_in_flight is None:
            return True
        return self._outstanding[worker] < max(1, self._max_in_flight // len(self._live))


JobSource = IndexBatches | WorkerStreams


class Epoch:
    """The state of one pass over the data; `EpochIterator` is the handle users hold."""

    def __init__(
        self,
        *,
        source: JobSource,
        read: Callable[[Any], Any],
        pool: WorkerPool,
        owns_pool: bool,
        max_in_flight: int,
        in_place: bool,
        in_order: bool,
        timeout: float,
        delivered: Delivered,
        meter: EpochMeter,
        stage: DeviceStage | None = None,
        depth: int = 0,
        length: Callable[[], int] | None = None,
        check_yielded: Callable[[int], None] | None = None,
        deal_over: int = 0,
        tuning: Autotuner | None = None,
        memory_budget: MemoryBudget | None = None,
        read_ahead: ReadAheadTuner | None = None,
        workers_memory: Callable[[], int] | None = None,
        watch_workers: Callable[[], WorkersMove | None] | None = None,
    ) -> None:
        """`in_place`: the pool reads a job as it is submitted (on the consumer's thread), so
        each batch is read when it is taken, and nothing ahead of it. `depth`: batches in
        flight per worker (`prefetch_factor`): how far ahead the device stage copies, and
        how the bound divides among workers. `length` answers `len()` of the epoch;
        `check_yielded` is told how many batches have been yielded, after each.
        `deal_over`: batch `seq` goes to worker `seq % deal_over`, as torch deals batches to
        its worker processes (so each worker's own RNG draws what torch's would); 0: to
        whichever worker is free. `tuning` (`"auto"`): the tuned stages, told of each batch
        delivered; their bound on batches in flight replaces `max_in_flight`.
        `memory_budget`: the bytes this process's batches may take (the one the loop holds,
        those being built, those ready): fewer in flight than the bound where the largest
        batch so far says so (one until the first says how large), after `workers_memory()`:
        the bytes worker processes hold of their own, last measured.
        `read_ahead` (`prefetch_factor="auto"`): told how long the consumer waits while held
        back (`_watch_held_back`), it scales the bound on batches in flight.
        `watch_workers` (`worker_mode="auto"`): asked after each batch delivered; the
        workers it returns take the epoch's batches not yet given to the workers before
        (`_move`), and the previous workers (which the epoch then owns) finish theirs."""
        self._source = source
        self._delivered = delivered
        self._meter = meter
        self._read = read
        self._pool = pool
        self._owns_pool = owns_pool
        self._tuning = tuning
        if tuning is not None:
            max_in_flight = tuning.start()
        self._budget = None if in_place else memory_budget
        self._read_ahead = read_ahead
        if read_ahead is not None:
            read_ahead.restart()
        self._waiting_since: float | None = None  # when the consumer began to wait
        self._held_since: float | None = None  # when it began to be held back
        self._finished_pace = 0.0  # batches a second the workers finished meanwhile
        # Batches are weighed for the budget and the read-ahead (a flag: read per batch).
        self._weighing = self._budget is not None or read_ahead is not None
        self._largest_batch = 0  # bytes, of the batches delivered so far
        self._workers_memory = None if self._budget is None else workers_memory
        self._workers_held = 0  # bytes the worker processes hold of their own, last measured
        # Not one batch fits the budget: said once an epoch, at the next poll (before
        # a batch is taken, so that an error raised for the warning loses none).
        self._warning_due = self._warned = False
        self._depth = max(1, depth)
        self._bound = max_in_flight  # at torch's prefetch factor, without the memory budget
        self._max_in_flight = max_in_flight
        self._bound_changed()
        self._in_place = in_place
        self._in_order = in_order
        self._timeout = timeout
        self._mailbox = _Mailbox()
        # Taken around each poll: consumers on two threads may share one iterator.
        self._lock = threading.RLock()
        self._in_flight: dict[int, _Job] = {}
        self._ready_by_seq: dict[int, _Job] = {}
        self._ready_fifo: deque[_Job] = deque()
        self._stage = stage
        self._stage_depth = 0 if in_place else depth
        # In order, a slow batch can hold back those finished after it: timed (`held_back`).
        self._watching_order = in_order and not in_place
        self._staged: deque[_Job] = deque()
        self._next_seq = 0
        self._source_done = False
        self._closed = False
        self.length = length
        self._check_yielded = check_yielded
        self._deal_over = deal_over
        self._watch_workers = watch_workers
        self._turn_due = 0.0  # when `anext` next gives other tasks a turn, at the latest
        # The running backend's cancellation check, found at the first `anext` (finding it
        # costs as much as the check): an epoch is iterated on one event loop.
        self._checkpoint_if_cancelled: Callable[[], Coroutine[Any, Any, None]] | None = None

    # -- async -------------------------------------------------------------------------------

    async def anext(self) -> Any:
        # A checkpoint in two halves: cancellation is checked before a batch is taken, and
        # the turn given to other tasks after it is shielded, so no taken batch is lost.
        # While batches are ready without waiting, the turn is given once per `_YIELD_EVERY`
        # rather than per batch: other tasks still run every millisecond, and a loop over
        # small ready batches does not pay a pass of the event loop for each.
        checkpoint_if_cancelled = self._checkpoint_if_cancelled
        if checkpoint_if_cancelled is None:
            backend = anyio.lowlevel.current_token().backend_class
            checkpoint_if_cancelled = backend.checkpoint_if_cancelled
            self._checkpoint_if_cancelled = checkpoint_if_cancelled
        await checkpoint_if_cancelled()
        asked_at = self._meter.asked()
        deadline = None
        waited = False
        try:
            while (batch := self._locked_poll()) is _WAIT:
                deadline = deadline or self._deadline()
                await self._wait_async(deadline)
                waited = True
        finally:
            self._meter.handed_over(asked_at)
        if batch is _END:
            await self.aclose()
            raise StopAsyncIteration
        now = time.monotonic()
        if waited or now >= self._turn_due:  # waiting gave other tasks their turn already
            if not waited:
                await anyio.lowlevel.cancel_shielded_checkpoint()
            self._turn_due = now + _YIELD_EVERY
        return batch

    async def aclose(self) -> None:
        """Stop, and wait for the epoch's own workers to end: at most `timeout` when the
        loader has one (a read that hangs cannot be stopped; its thread is left to end)."""
        self.stop()
        if self._owns_pool and not await wait_stopped(self._pool, self._deadline()):
            self._warn_left_running()

    async def _wait_async(self, deadline: float | None) -> None:
        token = anyio.lowlevel.current_token()
        arrived = anyio.Event()

        def wake() -> None:
            with contextlib.suppress(RunFinishedError):  # the loop is gone: nobody waits
                token.backend_class.run_sync_soon(arrived.set, (), token.native_token)

        self._mailbox.waiters.add(wake)
        self._pool.begin()
        try:
            if self._mailbox.done or self._closed:
                return
            look = self._look_in(deadline)
            if look is not None:
                with anyio.move_on_after(look):
                    await arrived.wait()
                    return
                self._look()
                return
            if deadline is None:
                await arrived.wait()
                return
            with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                await arrived.wait()
                return
            raise self._timed_out()
        finally:
            self._mailbox.waiters.discard(wake)

    # -- blocking ----------------------------------------------------------------------------

    def next(self) -> Any:
        asked_at = self._meter.asked()
        deadline = None
        try:
            while (batch := self._locked_poll()) is _WAIT:
                deadline = deadline or self._deadline()
                self._wait_blocking(deadline)
        finally:
            self._meter.handed_over(asked_at)
        if batch is _END:
            self.close()
            raise StopIteration
        return batch

    def close(self) -> None:
        """Stop, and wait for the epoch's own workers to end (at most `timeout`, as
        `aclose`)."""
        self.stop()
        if self._owns_pool and not self._pool.join(self._timeout or None):
            self._warn_left_running()

    def _warn_left_running(self) -> None:
        stuck = self._pool.alive_workers
        warnings.warn(
            f"{stuck} worker thread{'s are' if stuck != 1 else ' is'} still inside a read "
            f"that did not return within timeout={self._timeout:g} s; closing does not wait "
            "for it: it ends on its own when the read returns (a daemon thread)",
            RuntimeWarning,
            stacklevel=3,
        )

    def _wait_blocking(self, deadline: float | None) -> None:
        arrived = threading.Event()
        self._mailbox.waiters.add(arrived.set)
        self._pool.begin()
        try:
            if self._mailbox.done or self._closed:
                return
            look = self._look_in(deadline)
            if look is not None:
                if not arrived.wait(look):
                    self._look()
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if not arrived.wait(remaining):
                raise self._timed_out()
        finally:
            self._mailbox.waiters.discard(arrived.set)

    # -- shared ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the epoch can still yield batches (not ended, stopped or abandoned)."""
        return not self._closed

    def stop(self) -> None:
        """Drop queued work and ask the epoch's own workers to end; never blocks (beyond
        another consumer's poll). Consumers waiting on this epoch wake and see its end."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for job in self._in_flight.values():
                job.cancelled = True
            self._in_flight.clear()
            self._ready_by_seq.clear()
            self._ready_fifo.clear()
            self._staged.clear()
            self._mailbox.done.clear()
        if self._owns_pool:
            self._pool.shutdown()
        self._mailbox.wake_all()

    def _locked_poll(self) -> Any:
        with self._lock:
            return self._poll()

    def _poll(self) -> Any:
        """The next batch if one is due; else `_WAIT` (workers are on it) or `_END`."""
        if self._warning_due:
            self._warn_over_budget()
        while not self._closed:
            if self._stage is not None:
                job = self._take_staged()
            elif self._in_place:  # (a call less per batch than through `_take_one`)
                job = self._take_in_place()
            else:
                job = self._take()
            if job is None:
                if self._source_done and not self._in_flight:
                    self._delivered.complete = True
                    self._meter.end()
                    return _END
                if self._watching_order:
                    self._watch_held_back()
                return _WAIT
            if job.error is not None:
                if job.indices is END_REPORT:  # the epoch's data is all here: no RNGs kept
                    continue
                error, job.error = job.error, None
                error.add_note(f"aload: raised while loading {job.describe()}")
                raise error
            batch = job.value
            if batch is EXHAUSTED:  # a worker's stream ended: nothing to yield
                self._delivered.add(job.seq, job.worker, False)
                if job.state is not None:
                    self._delivered.keep(job.worker, job.state)
                continue
            if self._weighing:
                self._weigh(batch)
            if self._waiting_since is not None:
                self._waited()
            if self._stage is not None:
                batch = self._stage.hand_over(batch)
            self._delivered.add(job.seq, job.worker, True)
            if job.state is not None:  # where the batch's worker stands after it
                self._delivered.keep(job.worker, job.state)
            meter = self._meter
            if job.timing is not None:
                meter.worked(job.timing)
            if self._in_place:  # nothing is read ahead
                meter.delivered(count_samples(job.indices, batch), len(self._staged), 0)
            else:
                ready = len(self._ready_by_seq) + len(self._ready_fifo) + len(self._staged)
                meter.delivered(count_samples(job.indices, batch), ready, len(self._in_flight))
                if self._tuning is not None:
                    self._tune(meter, self._tuning)
            if self._check_yielded is not None:
                self._check_yielded(meter.batches)
            if self._watch_workers is not None and (move := self._watch_workers()) is not None:
                self._move(move)
            return batch
        return _END

    def _move(self, move: WorkersMove) -> None:
        """Give the batches not yet submitted to `move`'s workers, with their bound (nothing
        of the previous workers' is tuned any more; the new ones may be); the previous
        workers finish what they were given, and stop with the epoch."""
        self._watch_workers = move.watch
        self._pool = HandOff(self._pool, move.pool, move.owns_pool, move.retired)
        self._owns_pool = True
        self._read = move.read
        self._deal_over = 0  # whichever worker is free
        self._tuning = move.tuning
        if self._budget is not None:
            self._workers_memory = move.workers_memory
        self._bound = move.max_in_flight if move.tuning is None else move.tuning.start()
        self._bound_changed()
        self._pool.begin()
        self._fill()

    def _look_in(self, deadline: float | None) -> float | None:
        """Seconds until the tuner looks at the readers before the first batch, where that
        comes before the timeout's `deadline`; None: no look is due."""
        tuning = self._tuning
        due = None if tuning is None else tuning.look_due()
        if due is None:
            return None
        look = max(0.0, due - time.perf_counter())
        if deadline is not None and look >= deadline - time.monotonic():
            return None
        return look

    def _look(self) -> None:
        """The tuner's look before the first batch, while the consumer waits for it: adopt
        the bound its step brings (the next poll submits what it allows). Batches finished
        but held back behind the first, read in order, say that the readers are not slow:
        it is one slow batch."""
        with self._lock:
            tuning = self._tuning
            if tuning is None or self._closed:  # (stopped meanwhile, by another thread)
                return
            self._collect()
            finished = len(self._ready_by_seq) + len(self._ready_fifo) + len(self._staged)
            bound = tuning.look(self._meter.waited(), finished)
            if bound is not None:
                self._bound = bound
                self._bound_changed()

    def _tune(self, meter: EpochMeter, tuning: Autotuner) -> None:
        """Tell the tuned stages this batch's totals; adopt the bound a move brings."""
        bound = tuning.observe(meter.samples, meter.batches, meter.wait)
        if bound is not None:
            self._bound = bound
            self._bound_changed()

    def _watch_held_back(self) -> None:
        """The consumer waits: note when it began, and when it began to be held back by the
        batch due, read in order: the bound is full of batches, those finished waiting
        behind it, and workers sit idle."""
        if self._waiting_since is None:
            self._waiting_since = time.perf_counter()
        if self._held_since is not None or len(self._in_flight) < self._max_in_flight:
            return
        if self._idle_workers():
            self._held_since = now = time.perf_counter()
            if self._read_ahead is not None:  # its pace before the loop has one of its own
                waited = max(now - self._waiting_since, 1e-6)
                self._finished_pace = len(self._ready_by_seq) / waited

    def _idle_workers(self) -> bool:
        """Whether some worker has nothing to read: it has finished every batch dealt to it,
        or every batch of its stream in flight, or (workers that take any batch) fewer
        batches are left than workers."""
        ready = self._ready_by_seq
        unfinished = [job for seq, job in self._in_flight.items() if seq not in ready]
        if self._deal_over:  # batch `seq` is worker `seq % deal_over`'s
            return len({job.seq % self._deal_over for job in unfinished}) < self._deal_over
        workers = max(1, self._bound // self._depth)
        if unfinished and unfinished[0].worker is not None:  # streams: a worker's own batches
            return len({job.worker for job in unfinished}) < workers
        return len(unfinished) < workers

    def _waited(self) -> None:
        """The consumer's wait ended: if it was held back, count it in the stats and tell the
        read-ahead tuner how long, and how long the wait was (what reading further ahead
        would have covered)."""
        now = time.perf_counter()
        waited, held_since = now - self._waiting_since, self._held_since  # type: ignore[operator]
        self._waiting_since = self._held_since = None
        if held_since is None:
            return
        self._meter.held_back += now - held_since
        if self._read_ahead is not None and self._read_ahead.held_back(
            now - held_since,
            waited=waited,
            in_flight=self._max_in_flight,
            largest_batch=self._largest_batch,
            batches=self._meter.batches,
            finished_pace=self._finished_pace,
        ):
            self._bound_changed()

    def _weigh(self, batch: Any) -> None:
        """A delivered batch's bytes: the largest so far sets how many fit in the budget
        (with what worker processes hold of their own taken out of it first)."""
        size = batch_nbytes(batch)
        held = self._workers_held
        if self._workers_memory is not None:
            held = self._meter.workers_memory = self._workers_memory()
        if size > self._largest_batch or held != self._workers_held:
            self._largest_batch, self._workers_held = max(size, self._largest_batch), held
            self._bound_changed()

    def _bound_changed(self) -> None:
        """Put `_bound` in force as `_max_in_flight`: read further ahead where the read-ahead
        is tuned, fewer in flight where the memory budget says so (the one place both
        apply, whichever of the bound, the factor or the largest batch changed)."""
        bound = self._bound
        if self._read_ahead is not None:
            bound = round(bound * self._read_ahead.scale)
        budget = self._budget
        if budget is not None:  # one until a batch says how large they are
            batch, held = self._largest_batch, self._workers_held
            builders = max(1, bound // self._depth)
            bound = min(bound, budget.batches(batch, held, builders))
            self._warning_due = bool(batch) and not budget.fits(batch, held) and not self._warned
        self._max_in_flight = bound

    def _warn_over_budget(self) -> None:
        """Say once an epoch that not even one batch fits the budget, and what takes it."""
        self._warning_due, self._warned = False, True
        budget, batch, held = self._budget, self._largest_batch, self._workers_held
        assert budget is not None
        mib = 2**20
        if held and budget.fits(batch):  # the workers took the room
            reason = (
                f"the worker processes hold {held / mib:,.0f} MiB of their own, which leaves "
                f"no room for a batch of {batch / mib:,.1f} MiB"
            )
            advice = "Fewer workers, or worker_mode='thread' (no copies), would fit"
        else:
            built = " (its samples and the batch they become)" if budget.samples_here else ""
            reason = (
                f"a batch of {batch / mib:,.1f} MiB in flight needs "
                f"{budget.needs(batch) / mib:,.1f} MiB: the batch the loop holds and one "
                f"being built{built}"
            )
            advice = "A larger budget, or smaller batches, would fit"
        warnings.warn(
            f"memory_budget={budget.limit:,} bytes: {reason}; one batch is read at a time. "
            f"{advice}",
            RuntimeWarning,
            stacklevel=2,
        )

    def _take_one(self) -> _Job | None:
        # Not a bound method kept on the epoch: that would be a cycle, and a dropped epoch
        # (and the loader its `length` holds) must be freed at once, not at the next GC.
        return self._take_in_place() if self._in_place else self._take()

    def _take(self) -> _Job | None:
        """Submit what the bound allows, then return the next finished job that is due."""
        self._fill()
        self._collect()
        if self._in_order:
            while self._next_seq in self._delivered:
                self._next_seq += 1
            job = self._ready_by_seq.pop(self._next_seq, None)
            if job is not None:
                self._next_seq += 1
        else:
            job = self._ready_fifo.popleft() if self._ready_fifo else None
        if job is not None:
            del self._in_flight[job.seq]
            self._fill()
            in_flight = len(self._in_flight)  # where the others stand now, for the stats
            ready = len(self._ready_by_seq) + len(self._ready_fifo)
            self._meter.sample(in_flight, ready, in_flight >= self._max_in_flight)
        return job

    def _take_in_place(self) -> _Job | None:
        """`_take` for a pool that reads in place: the next job, read now. None jobs are in
        flight, and the source already skips the batches delivered before a resume."""
        spec = self._source.next()
        if spec is None:
            self._source_done = True
            return None
        job = _Job(*spec, self._read, self._mailbox)
        try:  # read on the consumer's thread: nothing can cancel it, nobody else waits for it
            job.value = self._read(job)
        except BaseException as error:
            job.error = error
        if job.state is not None:
            self._delivered.arrived(job.worker, job.state)
        if job.worker is not None:  # a worker's stream (map-style batches have no worker)
            self._source.returned(job.worker, job.value is EXHAUSTED)
        return job

    def _take_staged(self) -> _Job | None:
        """`_take` through the device stage: due jobs start their copy to the device up to
        `depth` batches ahead of the one returned, so the copy of the next batch runs
        while the loop body works on this one."""
        staged = self._staged
        while len(staged) <= self._stage_depth and (job := self._take_one()) is not None:
            if job.error is None and job.value is not EXHAUSTED:
                try:
                    job.value = self._stage.issue(job.value)  # type: ignore[union-attr]
                except Exception as error:
                    job.value, job.error = None, error
            staged.append(job)
        return staged.popleft() if staged else None

    def _fill(self) -> None:
        # Within a memory budget, batches staged on their way to the device count too.
        staged = 0 if self._budget is None else len(self._staged)
        while not self._source_done and len(self._in_flight) + staged < self._max_in_flight:
            spec = self._source.next()
            if spec is None:
                self._source_done = self._source.done
                return
            job = _Job(*spec, self._read, self._mailbox)
            self._in_flight[job.seq] = job
            worker = job.worker
            if worker is None and self._deal_over:
                worker = job.seq % self._deal_over
            self._pool.submit(job, worker)

    def _collect(self) -> None:
        done = self._mailbox.done
        while done:
            job = done.popleft()
            if job.state is not None:
                self._delivered.arrived(job.worker, job.state)
            self._source.returned(job.worker, job.value is EXHAUSTED)
            if self._in_order:
                self._ready_by_seq[job.seq] = job
            else:
                self._ready_fifo.append(job)

    def _deadline(self) -> float | None:
        return time.monotonic() + self._timeout if self._timeout > 0 else None

    def _timed_out(self) -> LoaderTimeoutError:
        """The late batch's worker is stopped where it can be (a process); the error says
        which batch was late."""
        if self._in_order:
            late = self._in_flight[self._next_seq]
        else:
            late = self._in_flight[min(self._in_flight)]
        self._pool.timed_out(late)
        return LoaderTimeoutError(
            f"DataLoader timed out after {self._timeout:g} seconds: {late.describe()} was not ready"
        )


class EpochIterator:
    """One pass over the data, as an async iterator (`async for`) or a plain one (`for`).

    Batches come in sampler order when `in_order`, else in the order they finish. At most
    `max_in_flight` batches are submitted but not yet yielded, however slow the consumer.
    A failed batch raises its original exception with a note naming the batch and its
    indices; iteration may go on after it. Dropping this handle (leaving the loop by break,
    exception or cancellation) drops the queued jobs and stops the epoch's own workers.

    No frame of this class stays in a traceback: an error kept alive by the caller must not
    keep the handle, and so the workers, alive.
    """

    __slots__ = ("_epoch",)

    def __init__(self, epoch: Epoch) -> None:
        self._epoch = epoch

    def __aiter__(self) -> EpochIterator:
        return self

    def __anext__(self) -> Coroutine[Any, Any, Any]:
        """Return the next batch; always a cancellation point, never blocks the event loop.

        Raises:
            LoaderTimeoutError: (a TimeoutError and a RuntimeError) when `timeout` > 0 and
                the batch is not ready in time.
        """
        return self._epoch.anext()

    def __iter__(self) -> EpochIterator:
        return self

    def __len__(self) -> int:
        """Batches in the whole epoch, as `len(loader)` counts them."""
        if self._epoch.length is None:
            raise TypeError("this epoch's length is not known")
        return self._epoch.length()

    def __next__(self) -> Any:
        """Return the next batch, blocking the calling thread until it is ready.

        Raises:
            LoaderTimeoutError: (a TimeoutError and a RuntimeError) when `timeout` > 0 and
                the batch is not ready in time.
        """
        epoch = self._epoch
        del self  # keep this handle out of the traceback of whatever `next` raises
        return epoch.next()

    async def aclose(self) -> None:
        """Stop the epoch and wait, without blocking the event loop, for its workers to end."""
        await self._epoch.aclose()

    def close(self) -> None:
        """Stop the epoch and wait for its workers to end (blocks the calling thread)."""
        self._epoch.close()

    def __del__(self) -> None:
        epoch = getattr(self, "_epoch", None)
        if epoch is not None:
            epoch.stop()
