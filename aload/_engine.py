"""The engine behind `DataLoader`: runs the epochs of the plan its arguments compile to.

The one place that wires the parts: the workers each epoch reads on, the tuners and the
worker-mode verdict that carry over from one epoch to the next, persistent workers, and where
the loader stands for `state_dict()`."""

from __future__ import annotations

import dataclasses
import math
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from typing import Any

import torch.utils.data as tud

from ._async_fetch import AsyncMapReader, AsyncStreamReader
from ._checkpoint import (
    RNGS,
    WORKER_START,
    DatasetResume,
    Delivered,
    capture_start,
    check_resumable,
    has_state,
    plain_start,
    rank_part,
    readable,
    replaying_draws,
    restore_start,
    whole_state,
)
from ._config import AUTO, LoaderConfig, resolve_config
from ._cuda import pinning_enabled
from ._device import DeviceStage
from ._elastic import resplit_indices
from ._fetch import Finish, batch_bytes, batch_gather, map_reader, per_worker_reader
from ._memory_budget import MemoryBudget
from ._mode import MIN_SECONDS, ModeChooser, ProcessesWatch, ThreadsWatch
from ._plans import ProcessRead, ReaderPlan
from ._progress import progress_available, watch_progress
from ._read_ahead import ReadAheadTuner
from ._retry import Reads
from ._sample_random import EpochSeeds
from ._samplers import fast_index_batches
from ._scheduler import (
    Epoch,
    EpochIterator,
    IndexBatches,
    JobSource,
    WorkersMove,
    WorkerStreams,
    wait_stopped,
)
from ._stats import EpochMeter, LoaderStats, StatsKeeper
from ._stream import StreamReader, length_check
from ._threaded_reads import ThreadedReads
from ._tuner import ASYNC_START, THREADS_START, Autotuner, ConcurrencyTuner, TunedStage
from ._worker_info import draw_base_seed, worker_setup
from .plan import stage_names
from .workers import WorkerPool
from .workers.inline import InlinePool
from .workers.loop import LoopPool, loop_options
from .workers.process import ProcessPool
from .workers.ray_actors import RayPool
from .workers.thread import ThreadPool

# Pools whose workers are other processes: they build their readers from a plan, and each
# draws from its own RNG (so batches are dealt to them in torch's turn).
_READS_BY_PLAN = (ProcessPool, RayPool)

# A batch gathered from memory in at most this many bytes (~10-50 µs of copying) is read on
# the consumer's thread: a hand-off to a worker thread and back costs about as much.
IN_PLACE_GATHER_BYTES = 256 * 1024


class Engine:
    """Runs a loader's epochs from its `arguments` (all of `DataLoader`'s, by name), checked
    and compiled once (`resolve_config`; `plan_of` shows the plan) and again when one is set.

    What it keeps between epochs: persistent workers, the tuners and the worker-mode verdict
    (so that an argument set later keeps what they found), the stats, and the epoch a loaded
    state resumes.
    """

    def __init__(self, arguments: dict[str, Any], progress: bool) -> None:
        self.arguments = arguments
        self._configure(resolve_config(arguments))
        self._show_progress = progress_available(progress)
        self._persistent_pool: WorkerPool | None = None
        self._persistent_seed = 0
        self._pool_lock = threading.Lock()  # epochs started at once share one persistent pool
        self._epochs: weakref.WeakSet[Epoch] = weakref.WeakSet()
        self._next_epoch = 0
        self._progress: tuple[dict[str, Any], Delivered] | None = None
        self._resume: dict[str, Any] | None = None
        self._stats = StatsKeeper()
        self._iterable_length_read: int | None = None

    def _configure(self, config: LoaderConfig) -> None:
        """Adopt a validated configuration (at construction, and when an attribute is set)."""
        self.config = config
        chooser = getattr(self, "_mode_chooser", None)  # a verdict stands for the same workers
        self._mode_chooser = None
        asked_for = self.arguments["num_workers"]
        if self.arguments["worker_mode"] == AUTO and config.num_workers > 0:
            if chooser is None or chooser.asked_for != asked_for:
                chooser = ModeChooser(config.num_workers, asked_for=asked_for)
            self._mode_chooser = chooser
        # The tuners: what reads at once (an async dataset's reads, or thread workers), and
        # the thread workers that finish an async dataset's batches. Processes are one per
        # core, all started as in torch, with torch's read-ahead: fewer batches in flight
        # would only save memory (`memory_budget`), never time. An attribute set later keeps
        # what they found.
        settled = getattr(self, "_tuner", None), getattr(self, "_workers_tuner", None)
        self._tuner = self._workers_tuner = None
        if config.reads_tuned:
            self._tuner = _tuner_for(
                config.max_concurrency, ASYNC_START, "max_concurrency", settled[0]
            )
        if config.workers_tuned and config.worker_mode == "thread":
            maximum = config.num_workers
            if config.asynchronous:  # the threads that finish its batches
                self._workers_tuner = _tuner_for(maximum, THREADS_START, "num_workers", settled[1])
            else:  # the threads that read
                self._tuner = _tuner_for(maximum, THREADS_START, "num_workers", settled[0])
        read_ahead = getattr(self, "_read_ahead", None)  # kept as the tuner is
        if not config.read_ahead_tuned:
            read_ahead = None
        elif read_ahead is None or read_ahead.memory_budget != config.memory_budget:
            read_ahead = ReadAheadTuner(config.memory_budget)
        self._read_ahead = read_ahead
        self._stage = None
        if config.device is not None:
            self._stage = DeviceStage(config.device, config.to_device, config.device_transform)
        to_gpu = config.device is not None and config.device.type == "cuda"
        self._pin = pinning_enabled(config.pin_memory) or to_gpu
        # Batches read by one in-memory gather in this process (processes get lists, as in
        # torch): their indices come as tensors, and small ones are read in place.
        gather = None
        if config.worker_mode == "thread" and config.auto_collation and not config.iterable:
            finish = config.finish(pin=False)
            gather = batch_gather(config.dataset, finish)
        self._gathers = gather is not None
        self._gathers_in_place = gather is not None and self._small_gathers(config)

    def _small_gathers(self, config: LoaderConfig) -> bool:
        """Whether each gathered batch is so small (`IN_PLACE_GATHER_BYTES`) that handing it
        to a worker thread costs more than reading it: then the consumer's thread (or loop)
        gathers it, as it would with 0 workers. No user code runs in such a read, so nothing
        can tell; a `worker_init_fn`, a `batch_transform` or pinning keeps the workers."""
        if config.worker_init_fn is not None or config.batch_transform is not None or self._pin:
            return False
        batch_size = config.batch_size or getattr(config.batch_sampler, "batch_size", None)
        if not isinstance(batch_size, int):
            return False
        dataset = config.dataset
        return len(dataset) > 0 and batch_bytes(dataset, batch_size) <= IN_PLACE_GATHER_BYTES

    def set_arguments(self, arguments: dict[str, Any]) -> None:
        """Run from the next epoch on with `arguments` (one of them set again), checked again
        with the samplers built at first; persistent workers stop, to start again with them."""
        config = self._checked(arguments)
        self.arguments = arguments
        self._configure(config)
        self.close()

    def _checked(self, arguments: Mapping[str, Any]) -> LoaderConfig:
        """`arguments` checked again, with the samplers built at first (torch keeps them)."""
        old = self.config
        config = resolve_config(arguments)
        return dataclasses.replace(config, sampler=old.sampler, batch_sampler=old.batch_sampler)

    @property
    def worker_mode(self) -> str:
        """The workers the next epoch runs on (with "auto", the verdict's)."""
        chooser = self._mode_chooser
        return self.config.worker_mode if chooser is None else chooser.worker_mode

    def stats(self) -> LoaderStats:
        """What the loader measured, with what its tuners and verdicts decided."""
        chooser = self._mode_chooser
        read_ahead = self._read_ahead
        workers = self._workers_tuner
        return self._stats.snapshot(
            None if self._tuner is None else self._tuner.snapshot(),
            None if chooser is None else chooser.snapshot(),
            None if read_ahead is None else read_ahead.snapshot(),
            None if workers is None else workers.snapshot(),
        )

    def length(self) -> int:
        """Batches per epoch, as torch counts them (for an iterable, from `len(dataset)`)."""
        config = self.config
        if not config.iterable:
            return len(config.index_sampler)  # type: ignore[arg-type]
        length = len(config.dataset)
        self._iterable_length_read = length  # torch warns if more than this arrive
        if config.batch_size is None:
            return length
        if config.drop_last:
            return length // config.batch_size
        return math.ceil(length / config.batch_size)

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands (`DataLoader.state_dict`)."""
        if self._resume is not None:
            return self._resume
        running = self._running_epochs()
        if running > 1:
            raise RuntimeError(
                f"{running} epochs of this DataLoader are running at once, and a state "
                "describes one: close the others first (it.close() or leave their loops)"
            )
        if self._progress is not None and not self._progress[1].complete:
            start, delivered = self._progress
        else:
            start = capture_start(self.config, self._next_epoch, starting=False)
            if self._persistent_pool is not None:  # the next epoch draws no base seed
                start["base_seed"], start["drew_base_seed"] = self._persistent_seed, False
            delivered = self._next_delivered()
        part = {"start": plain_start(start), "delivered": delivered.to_dict()}
        state = whole_state(self.config, part)
        tuning: dict[str, Any] = {}  # a resumed run starts where this one settled
        if self._tuner is not None:
            tuning["concurrency"] = self._tuner.concurrency
        if self._workers_tuner is not None:
            tuning["workers"] = self._workers_tuner.concurrency
        if self._mode_chooser is not None:
            tuning["worker_mode"] = self._mode_chooser.worker_mode
        if self._read_ahead is not None:
            tuning["prefetch_factor"] = self._read_ahead.factor
        if tuning:
            state["tuning"] = tuning
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state` at the next epoch (`DataLoader.load_state_dict`)."""
        state = readable(state, self.config)
        check_resumable(state, self.config)
        tuning = state.get("tuning", {})
        if self._tuner is not None and "concurrency" in tuning:
            self._tuner.resume(tuning["concurrency"])
        if self._workers_tuner is not None and "workers" in tuning:
            self._workers_tuner.resume(tuning["workers"])
        if self._mode_chooser is not None and "worker_mode" in tuning:
            self._mode_chooser.resume(tuning["worker_mode"])
        if self._read_ahead is not None and "prefetch_factor" in tuning:
            self._read_ahead.resume(tuning["prefetch_factor"])
        for epoch in list(self._epochs):  # as torchdata's StatefulDataLoader drops its iterator
            epoch.stop()
        # Resumed as a fresh loader resumes it, by new workers: running ones have read (and
        # drawn from their own RNGs) past what the state describes.
        pool, self._persistent_pool = self._persistent_pool, None
        if pool is not None:
            pool.shutdown()
        self._resume = state

    def _next_delivered(self) -> Delivered:
        """The next epoch's record, empty but for where persistent workers' copies of the
        dataset and their processes' RNGs stand: where the last epoch left them (a stream's
        iterator is made anew)."""
        delivered = Delivered()
        last = self._progress
        # After an epoch left early they read ahead into batches nobody saw: unknown.
        if self._persistent_pool is None or last is None or not last[1].complete:
            return delivered
        for worker, state in last[1].states.items():
            if not self.config.iterable:
                delivered.states[worker] = state
            else:  # a stream's iterator is made anew; a worker process's RNGs carry on
                carried = {key: state[key] for key in ("dataset", RNGS) if key in state}
                if carried:
                    delivered.states[worker] = carried
        return delivered

    def _running_epochs(self) -> int:
        return sum(1 for epoch in self._epochs if epoch.running)

    def close(self) -> None:
        """Stop persistent workers and wait for them to end; the loader can start again."""
        pool = self._stop_persistent()
        if pool is not None:
            pool.join()

    async def aclose(self) -> None:
        """`close()` for async code: stop persistent workers and wait for them to end
        without blocking the event loop."""
        pool = self._stop_persistent()
        if pool is not None:
            await wait_stopped(pool)

    def _stop_persistent(self) -> WorkerPool | None:
        """Take the persistent pool, its workers told to stop (not waited for)."""
        pool, self._persistent_pool = self._persistent_pool, None
        if pool is not None:
            pool.shutdown()
        return pool

    def __del__(self) -> None:
        # A dropped loader is like a dropped file: its persistent workers stop once its
        # engine goes, with the last epoch that runs on it (without waiting here: a process
        # pool's collector reaps them).
        pool = getattr(self, "_persistent_pool", None)
        if pool is not None:
            pool.shutdown()

    def epoch(self, blocking: bool) -> EpochIterator:
        """Start an epoch: for `for` (`blocking`) or `async for`."""
        chooser = self._mode_chooser
        if chooser is not None and chooser.worker_mode != self.config.worker_mode:
            self._adopt_mode(chooser)
        config = self.config
        start, delivered, resumed = self._start_epoch()
        meter = self._stats.new_epoch(self._next_epoch - 1, config.retry, config.max_skipped)
        if self._show_progress:
            watch_progress(meter, self._length_or_none())
        reads = meter.reads
        finish = config.finish(self._pin)
        pool: WorkerPool
        # torch's draws, in torch's order: the workers' base seed, then (when workers start)
        # the sampler's. A resumed epoch draws them again from the state it started with.
        with replaying_draws(start if resumed else None):
            if config.asynchronous:
                loop_pool, seeds = self._loop_pool(config, start, resumed, blocking, reads)
                meter.watch_reads(loop_pool.read_clock)
                pool, owns_pool = loop_pool, True
                source, read = self._async_plan(
                    finish, reads, start, delivered, loop_pool, seeds, resumed
                )
            else:
                plan = None
                resume = self._dataset_resume(delivered) if resumed else None
                if config.worker_mode in ("process", "ray"):
                    plan = self._process_plan(delivered, start["epoch"], resume)
                pool, owns_pool = self._pool(config, blocking, start, resumed, plan)
                # Samples' seeds come from the epoch's base seed: drawn for the pool (or
                # the persistent pool's), in every mode, as torch draws it.
                seeds = EpochSeeds(start["base_seed"], start["epoch"])
                # Persistent processes dealt batches in turn draw their next epoch from
                # where this one leaves their RNGs: once its batches are sent, each says where.
                reports = 0 if owns_pool else self._deal_over(pool)
                source, read = self._plan(finish, reads, start, delivered, seeds, resume, reports)
                if isinstance(pool, _READS_BY_PLAN) and plan is not None:
                    read = ProcessRead(plan, reads)
            # An inline pool loads at submit time: submitting (or copying) ahead would load
            # before yielding.
            inline = isinstance(pool, InlinePool)
            # Who reads and collates, for the stats' stages: workers (a thread, for `async
            # for` without them), or the consumer itself (not timed); an async dataset's
            # reads, `max_concurrency` at once on aload's loop, then CPU workers (or the loop).
            meter.workers = meter.read_concurrency = 0 if inline else max(1, config.num_workers)
            if config.asynchronous:
                meter.read_concurrency = config.max_concurrency
            self._name_stages(meter, pool)
            if resumed or config.num_workers > 0:
                source.prime()
        if not config.iterable and not resumed and has_state(config.dataset):
            # Where reading starts: after the epoch's draws (the dataset may checkpoint
            # torch's global RNG, which they moved).
            with suppress(AttributeError):
                start["dataset"] = config.dataset.state_dict()
        if inline and isinstance(read, StreamReader):
            # torch calls iter(dataset) when a single-process epoch starts: so does this one
            # (its errors are raised here, and a state saved before the first batch has it).
            first = read.start_now()
            if first is not None:
                delivered.arrived(0, {WORKER_START: first})
        check = None
        if config.iterable and self._iterable_length_read is not None:
            check = length_check(config.dataset, self._iterable_length_read, config.num_workers)
        epoch = Epoch(
            source=source,
            read=read,
            pool=pool,
            owns_pool=owns_pool,
            max_in_flight=config.max_in_flight,
            in_place=inline,
            in_order=config.in_order,
            timeout=config.timeout,
            delivered=delivered,
            meter=meter,
            stage=self._stage,
            depth=config.depth,
            length=self.length,
            check_yielded=check,
            deal_over=self._deal_over(pool),
            tuning=None if inline else self._tuning(pool, meter),
            memory_budget=self._memory_budget(config),
            read_ahead=None if inline else self._read_ahead,
            workers_memory=self._watched_memory(pool),
            watch_workers=self._judge_mode(meter, pool, start, reads, read),
        )
        self._epochs.add(epoch)
        return EpochIterator(epoch)

    def _adopt_mode(self, chooser: ModeChooser) -> None:
        """Move to the workers `worker_mode="auto"` chose, as setting `worker_mode` would
        (the samplers kept; persistent workers of the mode before stop). Where those workers
        cannot take the loader's arguments (a start method that pickles, and an argument
        that cannot be pickled), the workers stay, and the verdict says why."""
        config = self._checked_for(chooser, chooser.worker_mode)
        if config is None:
            return
        self._configure(config)
        self._stop_persistent()

    def _checked_for(self, chooser: ModeChooser, worker_mode: str) -> LoaderConfig | None:
        """The loader's arguments checked again with `worker_mode`; None where those workers
        cannot take them (the chooser is told why, and stays on the workers in use)."""
        try:
            return self._checked({**self.arguments, "worker_mode": worker_mode})
        except (TypeError, ValueError) as error:
            chooser.refused(self.config.worker_mode, str(error))
            return None

    def _judge_mode(
        self,
        meter: EpochMeter,
        pool: WorkerPool,
        start: dict[str, Any],
        reads: Reads,
        read: Any,
    ) -> Callable[[], WorkersMove | None] | None:
        """With `worker_mode="auto"`, have the epoch judged (`_mode`): on thread workers, by
        the CPU time the loading takes, while it runs (what the epoch asks after each batch
        is returned: it moves the rest of the epoch to processes where it can) and at its
        end; on processes, at its end, by its speed."""
        chooser = self._mode_chooser
        if chooser is None or chooser.settled:
            return None
        epoch = start["epoch"]
        if isinstance(pool, ProcessPool):
            meter.on_end.append(
                lambda: chooser.judge_processes(epoch, meter.elapsed(), meter.samples)
            )
            return None
        if not isinstance(pool, ThreadPool):
            return None
        if not ThreadPool.clocks_readable():
            chooser.cannot_judge("a thread's CPU time cannot be read here: staying on threads")
            return None
        move = None
        if self._moves_mid_epoch():
            move = self._weakly(Engine._move_to_processes, pool, meter, start, reads, read)
        tuner = self._tuner if self.config.workers_tuned else None
        watch = ThreadsWatch(chooser, epoch, meter, pool.cpu_seconds, move, tuner)
        meter.on_end.append(watch.ended)
        return watch.after_batch

    def _weakly(
        self, move: Callable[..., WorkersMove | None], *args: Any
    ) -> Callable[[], WorkersMove | None]:
        """`move(self, *args)` for an epoch to call later, holding the engine weakly: the
        epoch's stats keep the call, and the engine keeps the stats (a cycle would keep a
        dropped loader's engine, and its persistent workers, until the next GC)."""
        engine = weakref.ref(self)

        def call() -> WorkersMove | None:
            this = engine()
            return None if this is None else move(this, *args)

        return call

    def _moves_mid_epoch(self) -> bool:
        """Whether an epoch on threads can give its remaining batches to processes: batches
        of a map-style dataset's indices, in lists, and no state of the dataset's own that
        each worker's copy would keep."""
        config = self.config
        return not (config.iterable or has_state(config.dataset) or self._gathers)

    def _move_to_processes(
        self,
        threads: ThreadPool,
        meter: EpochMeter,
        start: dict[str, Any],
        reads: Reads,
        threads_read: Any,
    ) -> WorkersMove | None:
        """The processes that take over an epoch on `threads` (which it then stops), with the
        same base seed, as `_adopt_mode` would for the next epoch; None where they cannot
        take the loader's arguments (the verdict then says why), or where another epoch
        shares the threads. They are judged after their start (`ProcessesWatch`): slower
        than the threads were, the epoch goes back to threads that read as `threads_read`
        (persistent ones too: they stop with the epoch)."""
        chooser = self._mode_chooser
        assert chooser is not None
        config = self._checked_for(chooser, "process")
        if config is None:
            return None
        with self._pool_lock:
            if self._running_epochs() > 1:
                return None  # the next epoch moves
            before, tuner = self.config, self._tuner
            self._configure(config)
            plan = self._process_plan(Delivered(), start["epoch"])
            seed = start["base_seed"]
            try:
                processes = self._process_pool(
                    config.dataset, seed, plan, blocking=False, fork_after=threads.wait_finished
                )
            except Exception as error:  # the epoch goes on, on its threads
                self._configure(before)
                chooser.refused(before.worker_mode, str(error))
                return None
            if self._persistent_pool is threads:  # the epoch stops them once they finish
                self._persistent_pool = None
            owns = not config.persistent_workers
            if not owns:
                self._persistent_pool, self._persistent_seed = processes, seed
        meter.workers = meter.read_concurrency = config.num_workers
        self._name_stages(meter, processes)
        moved_at, samples = meter.elapsed(), meter.samples
        epoch = start["epoch"]

        def judge() -> None:  # over the rest of the epoch, if long enough to say
            seconds = meter.elapsed() - moved_at
            if seconds >= MIN_SECONDS:
                chooser.judge_processes(epoch, seconds, meter.samples - samples)

        meter.on_end.append(judge)
        back = self._weakly(
            Engine._move_back_to_threads, before, tuner, meter, start, threads_read, processes
        )
        watch = ProcessesWatch(chooser, epoch, meter, back).after_batch
        return WorkersMove(
            processes,
            ProcessRead(plan, reads),
            owns,
            config.max_in_flight,
            self._watched_memory(processes),
            watch,
        )

    def _move_back_to_threads(
        self,
        config: LoaderConfig,
        tuner: ConcurrencyTuner | None,
        meter: EpochMeter,
        start: dict[str, Any],
        read: Any,
        processes: WorkerPool,
    ) -> WorkersMove | None:
        """Threads that take an epoch back from the `processes` that read it slower than the
        threads before them: the loader's arguments and the threads' tuner as they were, the
        same base seed, tuned on from where the tuner stood; None where another epoch shares
        the processes. Persistent processes are let go: they finish what they were given and
        stop with the epoch, and the next epoch starts persistent threads."""
        with self._pool_lock:
            if self._running_epochs() > 1:
                return None  # the next epoch moves
            self._configure(config)
            self._tuner = tuner
            threads = self._thread_pool(config, start["base_seed"])
            retired = None
            if self._persistent_pool is processes:
                self._persistent_pool, retired = None, processes
        meter.workers = meter.read_concurrency = max(1, config.num_workers)
        self._name_stages(meter, threads)
        tuning = self._tuning(threads, meter)  # `num_workers="auto"` tunes them on
        return WorkersMove(
            threads, read, True, config.max_in_flight, retired=retired, tuning=tuning
        )

    def _memory_budget(self, config: LoaderConfig) -> MemoryBudget | None:
        """The budget as the epoch weighs it: batches collated from samples in this process
        weigh their samples too while they are built."""
        if config.memory_budget is None:
            return None
        elsewhere = config.worker_mode in ("process", "ray") and not config.asynchronous
        one_op = self._gathers or not config.auto_collation
        return MemoryBudget(config.memory_budget, samples_here=not (elsewhere or one_op))

    def _watched_memory(self, pool: WorkerPool) -> Callable[[], int] | None:
        """With `memory_budget`, what the epoch's worker processes hold of their own (the
        pool watches it from now on); None where no worker processes run here."""
        processes = (pool.cpu or pool) if isinstance(pool, LoopPool) else pool
        if self.config.memory_budget is None or not isinstance(processes, ProcessPool):
            return None
        processes.watch_memory()
        return lambda: processes.private_memory

    def _name_stages(self, meter: EpochMeter, pool: WorkerPool) -> None:
        """Tell the epoch's stats its stages, and where its reads and the later stages run."""
        workers = (pool.cpu or pool) if isinstance(pool, LoopPool) else pool
        meter.read_where, meter.workers_where = pool.where, workers.where
        if isinstance(self.config.dataset, ThreadedReads):  # reads on threads of the loop
            meter.read_where = "worker threads"
        workers_pin = self._pin and not isinstance(workers, _READS_BY_PLAN)  # else the parent
        meter.stages = stage_names(self.config, workers_pin)

    def _tuning(self, pool: WorkerPool, meter: EpochMeter) -> Autotuner | None:
        """The epoch's tuned stages (None: nothing is tuned), each with how the concurrency
        its tuner finds is put in force (returning the epoch's bound on batches in flight)
        and how busy it has been: an async dataset's reads on aload's loop and the thread
        workers that finish its batches, or thread workers that read."""
        config = self.config
        stages = []
        if isinstance(pool, LoopPool):
            if self._tuner is not None:

                def set_reads(concurrency: int) -> int:
                    pool.set_concurrency(concurrency)
                    meter.read_concurrency = concurrency
                    return config.in_flight_for(concurrency)

                reads_stage = TunedStage(
                    self._tuner,
                    set_reads,
                    meter.reading_seconds,
                    whole_batches=False,
                    loop_seconds=pool.loop_cpu_seconds,
                )
                stages.append(reads_stage)
            if self._workers_tuner is not None:
                finishers, reads = pool.cpu, self._tuner
                assert isinstance(finishers, ThreadPool)  # gated for the tuner (`readers`)

                def set_finishers(concurrency: int) -> int:
                    meter.workers = concurrency
                    finishers.limit_readers(concurrency)
                    return config.in_flight_for(_reads_at_once(config, reads))

                tuner = self._workers_tuner
                stages.append(TunedStage(tuner, set_finishers, meter.finishing_seconds))
        elif self._tuner is not None:
            readers = pool
            assert isinstance(readers, ThreadPool)  # gated for the tuner (`readers`)

            def set_readers(concurrency: int) -> int:
                # `concurrency` threads read, each with prefetch_factor batches in flight, as
                # torch's workers have: one that finishes during a training step goes on.
                meter.workers = meter.read_concurrency = concurrency
                readers.limit_readers(concurrency)
                return concurrency * config.depth

            clock = readers.cpu_seconds if readers.clocks_readable() else None
            stages.append(TunedStage(self._tuner, set_readers, meter.reading_seconds, True, clock))
        return Autotuner(stages) if stages else None

    def _deal_over(self, pool: WorkerPool) -> int:
        """Over how many workers an epoch deals its batches in turn, as torch does: worker
        processes reading map-style batches in order (each process draws from its own RNG,
        so which batches it reads decides what it draws); else 0, any free worker."""
        config = self.config
        if isinstance(pool, _READS_BY_PLAN) and not config.iterable and config.in_order:
            return config.num_workers
        return 0

    def _base_seed(self, start: dict[str, Any], resumed: bool) -> int:
        """The base seed of workers started now, drawn as torch draws it (from `generator`,
        else the global RNG), and recorded in the epoch's start; a resumed epoch whose
        workers were already running when it started takes theirs, without drawing."""
        if resumed and not start["drew_base_seed"]:
            return int(start["base_seed"])
        seed = draw_base_seed(self.config.generator)
        start["base_seed"], start["drew_base_seed"] = seed, True
        return seed

    def _length_or_none(self) -> int | None:
        try:
            return self.length()
        except TypeError:
            return None

    def _plan(
        self,
        finish: Finish,
        reads: Reads,
        start: dict[str, Any],
        delivered: Delivered,
        seeds: EpochSeeds,
        resume: DatasetResume | None,
        end_reports: int = 0,
    ) -> tuple[JobSource, Any]:
        """Which jobs an epoch of a plain dataset has, and how a worker reads one."""
        config = self.config
        if config.iterable:
            streams = config.stream_count
            reader = StreamReader(
                config.dataset,
                config.batch_size,
                config.drop_last,
                finish,
                streams,
                skip=dict(delivered.per_worker),
                states=dict(delivered.states),
            )
            cap = None if config.in_order else config.max_in_flight
            return WorkerStreams(streams, delivered.next_turn, cap), reader
        batches = self._index_batches(start, as_tensors=self._gathers)
        source = IndexBatches(batches, delivered, end_reports)
        if self._gathers_in_place:  # read on the consumer's thread: no worker replica
            return source, map_reader(config.dataset, finish, batched=True, reads=reads)
        return source, per_worker_reader(
            config.dataset,
            lambda dataset: map_reader(
                dataset,
                finish,
                batched=config.auto_collation,
                reads=reads,
                seeds=seeds,
                resume=resume,
            ),
        )

    def _index_batches(self, start: dict[str, Any], as_tensors: bool = False) -> Iterable[Any]:
        """The epoch's index batches: cut from torch's draws for the default samplers
        (`_samplers`), as tensors where the read gathers with them; else the sampler's own;
        for an epoch resumed on another number of ranks, this rank's share of its rest."""
        config = self.config
        if start.get("resplit"):
            indices = resplit_indices(
                config.sampler,  # type: ignore[arg-type]
                start["epoch"],
                start["resplit"],
                config.batch_size,  # type: ignore[arg-type]
                config.drop_last,
            )
            return tud.BatchSampler(indices, config.batch_size, config.drop_last)  # type: ignore[arg-type]
        index_sampler = config.index_sampler
        fast = fast_index_batches(index_sampler, as_tensors)
        return index_sampler if fast is None else fast  # type: ignore[return-value]

    def _dataset_resume(self, delivered: Delivered) -> DatasetResume | None:
        """Where a resumed epoch's copies of a map-style dataset with its own state, and the
        RNGs of persistent worker processes, stood (its workers are new: loading a state
        stops persistent ones)."""
        if self.config.iterable:
            return None
        states = delivered.states
        if not has_state(self.config.dataset) and not any(RNGS in s for s in states.values()):
            return None
        return DatasetResume(dict(states))

    def _process_plan(
        self,
        delivered: Delivered,
        epoch: int,
        resume: DatasetResume | None = None,
        finish_only: bool = False,
    ) -> ReaderPlan:
        """What process workers build their reader from (they pin nothing: the parent does);
        `finish_only`: they get samples read on aload's loop, to transform and collate."""
        config = self.config
        return ReaderPlan(
            finish=config.finish(pin=False),
            batched=config.auto_collation,
            retry=config.retry,
            max_skipped=config.max_skipped,
            stream=config.iterable,
            batch_size=config.batch_size,
            drop_last=config.drop_last,
            num_streams=config.stream_count,
            skip=dict(delivered.per_worker),
            states=dict(delivered.states),
            finish_only=finish_only,
            epoch=epoch,
            dataset_resume=resume,
        )

    def _process_pool(
        self,
        dataset: Any,
        base_seed: int,
        plan: ReaderPlan,
        blocking: bool,
        fork_after: Callable[[float], bool] | None = None,
    ) -> ProcessPool:
        """Worker processes reading by `plan`; for `async for` they start in the background
        (once `fork_after` says they may fork, where given)."""
        config = self.config
        return ProcessPool(
            config.num_workers,
            config.process_context,
            dataset,
            config.worker_init_fn,
            base_seed,
            plan,
            pin=self._pin,
            background=not blocking,
            fork_after=fork_after,
        )

    def _async_plan(
        self,
        finish: Finish,
        reads: Reads,
        start: dict[str, Any],
        delivered: Delivered,
        pool: LoopPool,
        seeds: EpochSeeds,
        resumed: bool,
    ) -> tuple[JobSource, Any]:
        """Which jobs an epoch of an async dataset has, and how aload's loop reads one."""
        config = self.config
        if config.iterable:
            reader: Any = AsyncStreamReader(
                config.dataset,
                finish,
                config.batch_size,
                config.drop_last,
                pool,
                skip=delivered.per_worker.get(0, 0),
                state=delivered.states.get(0),
            )
            return WorkerStreams(1, delivered.next_turn), reader
        reader = AsyncMapReader(
            config.dataset,
            finish,
            batched=config.auto_collation,
            reads=reads,
            pool=pool,
            seeds=seeds,
            resume=self._dataset_resume(delivered) if resumed else None,
        )
        return IndexBatches(self._index_batches(start), delivered), reader

    def _start_epoch(self) -> tuple[dict[str, Any], Delivered, bool]:
        """Begin the next epoch, or replay the one a loaded state describes: its start, the
        batches already delivered, and whether it is resumed from a state."""
        config = self.config
        resumed = self._resume is not None
        if self._resume is not None:
            state, self._resume = self._resume, None
            part = rank_part(state, config)
            start = dict(part["start"])
            restore_start(config, start)
            delivered = Delivered.from_dict(part["delivered"], streams=config.iterable)
        else:
            start = capture_start(config, self._next_epoch, starting=True)
            delivered = self._next_delivered()
        self._next_epoch = start["epoch"] + 1
        if config.distributed:
            config.sampler.set_epoch(start["epoch"])  # type: ignore[union-attr]
        self._progress = (start, delivered)
        return start, delivered, resumed

    def _loop_pool(
        self,
        config: LoaderConfig,
        start: dict[str, Any],
        resumed: bool,
        blocking: bool,
        reads: Reads,
    ) -> tuple[LoopPool, EpochSeeds]:
        """aload's event loop for an async dataset, with CPU workers for the batches' finish
        (threads, or processes that get each batch's samples and transform and collate them),
        and the epoch's seeds. The loop starts for each epoch (in about a millisecond), so
        that the dataset's context and the loop's tasks never outlive it; the CPU workers
        stay between epochs with `persistent_workers`.
        """
        options = loop_options()  # (a bad ALOAD_LOOP raises before any worker starts)
        with self._pool_lock:
            cpu = self._persistent_or_none(start, resumed)
            seed = self._persistent_seed if cpu is not None else self._base_seed(start, resumed)
            seeds = EpochSeeds(seed, start["epoch"])
            owns_cpu = cpu is None
            cpu_read = None
            if config.num_workers and config.worker_mode == "process":
                plan = self._process_plan(Delivered(), seeds.epoch, finish_only=True)
                cpu_read = ProcessRead(plan, reads)
                # The workers finish samples read on aload's loop: they never get the dataset.
                cpu = cpu or self._process_pool(None, seed, plan, blocking)
            elif config.num_workers and cpu is None:
                setup = worker_setup(
                    config.num_workers,
                    seed,
                    config.dataset,
                    config.worker_init_fn,
                    replicate=False,  # its reads share aload's loop, not a worker each
                )
                tuner = self._workers_tuner
                cpu = ThreadPool(
                    config.num_workers,
                    setup,
                    every_worker=config.worker_init_fn is not None,
                    readers=None if tuner is None else tuner.concurrency,
                )
            if owns_cpu and cpu is not None and config.persistent_workers:
                self._persistent_pool, self._persistent_seed = cpu, seed
                owns_cpu = False
        at_once = _reads_at_once(config, self._tuner)
        loop_pool = LoopPool(config.dataset, cpu, at_once, cpu_read, owns_cpu, options)
        return loop_pool, seeds

    def _persistent_or_none(self, start: dict[str, Any], resumed: bool) -> WorkerPool | None:
        """The persistent workers, if they are running and sound (a broken process pool is
        let go: it stops on its own), with the epoch's start saying it drew no base seed;
        else None. Called under the pool lock."""
        persistent = self._persistent_pool
        if persistent is None:
            return None
        if isinstance(persistent, ProcessPool) and persistent.broken:
            # A worker process died: start a whole pool again. The broken one stops on its
            # own (its collector reaps it): waiting here would stall the caller.
            self._stop_persistent()
            return None
        if resumed and start["drew_base_seed"]:
            # The epoch first ran with a pool it started, which drew a base seed before the
            # sampler drew: draw it again, or the sampler's draws (and so the order) would
            # not be the ones the epoch made.
            draw_base_seed(self.config.generator)
        else:
            start["base_seed"], start["drew_base_seed"] = self._persistent_seed, False
        return persistent

    def _pool(
        self,
        config: LoaderConfig,
        blocking: bool,
        start: dict[str, Any],
        resumed: bool,
        plan: ReaderPlan | None,
    ) -> tuple[WorkerPool, bool]:
        """The workers for one epoch, and whether the epoch owns (and so stops) them; with a
        `plan` (worker_mode="process"), worker processes that read by it. Under a lock:
        epochs started at once share one persistent pool."""
        with self._pool_lock:
            persistent = self._persistent_or_none(start, resumed)
            if persistent is not None:
                return persistent, False
            base_seed = self._base_seed(start, resumed)
            pool: WorkerPool
            if self._gathers_in_place:  # persistent too: the base seed is drawn once
                pool = InlinePool()
            elif config.num_workers == 0:
                if blocking and config.timeout == 0:
                    return InlinePool(), True
                return ThreadPool(1, dedicated_queues=config.iterable), True
            elif plan is not None and config.worker_mode == "ray":
                pool = RayPool(
                    config.num_workers,
                    config.dataset,
                    config.worker_init_fn,
                    base_seed,
                    plan,
                    dict(config.ray_options),
                    pin=self._pin,
                    background=not blocking,
                )
            elif plan is not None:  # worker_mode="process"
                pool = self._process_pool(config.dataset, base_seed, plan, blocking)
            else:
                pool = self._thread_pool(config, base_seed)
            if config.persistent_workers:
                self._persistent_pool, self._persistent_seed = pool, base_seed
                return pool, False
            return pool, True

    def _thread_pool(self, config: LoaderConfig, base_seed: int) -> ThreadPool:
        """Thread workers that read by `config`, seeded from `base_seed`, as many reading at
        once as the tuner says (all, without one)."""
        setup = worker_setup(config.num_workers, base_seed, config.dataset, config.worker_init_fn)
        return ThreadPool(
            config.num_workers,
            setup,
            dedicated_queues=config.iterable,
            every_worker=config.worker_init_fn is not None,
            readers=None if self._tuner is None else self._tuner.concurrency,
        )


def _reads_at_once(config: LoaderConfig, tuner: ConcurrencyTuner | None) -> int:
    """An async dataset's reads awaited at once: `max_concurrency`, or where `tuner` is."""
    return config.max_concurrency if tuner is None else tuner.concurrency


def _tuner_for(
    maximum: int, start: int, knob: str, settled: ConcurrencyTuner | None
) -> ConcurrencyTuner:
    """A tuner for `knob`="auto" up to `maximum`, from where `settled` (the one before the
    loader's arguments changed) had settled if it tuned the same range, else from `start`."""
    if settled is not None and settled.maximum == maximum:
        start = settled.concurrency
    return ConcurrencyTuner(maximum, start=start, knob=knob)
