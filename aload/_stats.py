"""What a loader measures while it runs, and the frozen snapshots users read.

The scheduler reports each batch it hands over (samples, queue depth, jobs in flight) and the
front ends report time: from the consumer asking for a batch to getting it is *waiting*, from
getting it to asking again is the *loop body*. Their ratio says whether training is data-bound.
A few clock reads per batch: cheap enough to stay on.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._fetch import STAGES
from ._mode import WorkerModeTuning
from ._read_ahead import ReadAhead
from ._retry import Reads, Retry
from ._tuner import Tuning

logger = logging.getLogger("aload")


@dataclass(frozen=True)
class StageStats:
    """One stage of an epoch's batches, as measured.

    Attributes:
        name: "read" (`__getitem__`, `__getitems__`, a gather, a stream's `next`, an async
            dataset's awaited reads), "map" (`transform`, per sample), "collate"
            (`collate_fn`), "map_batch" (`batch_transform`) or "pin".
        where: what runs it: "worker threads", "worker processes", "Ray actors", "aload's
            loop" (an async dataset's reads; its `map` and later stages when it has no
            workers) or "the consumer" (reads in the loop's own thread: not timed).
        concurrency: how many of it run at once (0: the consumer's own thread).
        items: samples (read, map) or batches (collate, map_batch, pin) through it.
        seconds: time spent in it, summed over the workers that run it.
        busy_fraction: `seconds` over what its workers had (concurrency x the epoch's
            seconds): 1 means a call in every slot, always.
        queued: batches waiting for one of its workers, on average over the epoch: more
            than a few, and this stage holds the others back.
        waiting_before: seconds its workers sat idle, summed over them, with nothing to
            take: the stage before had not delivered (an async dataset's reads), or no batch
            was left to read. (Idle time while batches were queued for them went between
            calls, to the hand-over and the GIL: it is in neither wait.)
        waiting_after: seconds its workers sat idle, summed over them, because the batches
            they had finished filled the bound on batches in flight: the consumer (or the
            copy to the device) had not taken them.

    `queued` and the waits are the workers', so they are given on the first stage the
    workers run (the stages after it on the same workers follow in the same call), and are
    0 on the others and where no workers run (the consumer). An async dataset's reads on
    aload's loop have their own: batches' worth of item reads waiting for a free read slot,
    and the slots' idle time, waiting after where the bound on batches in flight was full
    (the stages after had not taken what was read), else before (no batch left to read).
    """

    name: str
    where: str
    concurrency: int
    items: int
    seconds: float
    busy_fraction: float
    queued: float = 0.0
    waiting_before: float = 0.0
    waiting_after: float = 0.0


@dataclass(frozen=True)
class EpochStats:
    """One epoch, as the consumer saw it.

    Attributes:
        epoch: the epoch's number (0 for the first).
        batches: batches handed to the consumer.
        samples: samples in them.
        seconds: from the first request for a batch to the last hand-over.
        wait_seconds: time the consumer spent waiting for batches.
        body_seconds: time the consumer spent between batches (the loop body).
        held_back_seconds: the part of `wait_seconds` in which a slow batch, yielded in
            order, held back those finished after it: every batch the bound allows was in
            flight, and workers sat idle.
        mean_queue_depth: finished batches waiting for the consumer, on average at hand-over.
        max_queue_depth: the most finished batches that were waiting at once.
        in_flight: batches submitted but not yet handed over, now.
        retries: reads retried after a transient error.
        skipped: samples dropped from their batch within the failure budget.
        workers_replaced: workers that died and were replaced, their batches read again
            (Ray actors).
        finished: whether the epoch ran to its end.
        stages: the epoch's stages in order (read, then those the loader was given: map,
            collate, map_batch, pin), each with where it ran and the time it took.
        workers: the workers that collate (and read, but for async datasets) at once; 0:
            the consumer reads its own batches, which no stage's time covers.
        read_concurrency: reads at once: `workers`, or an async dataset's
            `max_concurrency` (where tuned, the concurrency in force at the end).
        workers_memory: the bytes worker processes held of their own (pages not shared
            with this process) at the last look, taken out of `memory_budget` before the
            batches in flight; None where not measured (no budget, no worker processes, or
            not Linux).
    """

    epoch: int
    batches: int
    samples: int
    seconds: float
    wait_seconds: float
    body_seconds: float
    mean_queue_depth: float
    max_queue_depth: int
    in_flight: int
    retries: int
    skipped: int
    finished: bool
    workers_replaced: int = 0
    stages: tuple[StageStats, ...] = ()
    workers: int = 0
    read_concurrency: int = 0
    held_back_seconds: float = 0.0
    workers_memory: int | None = None

    def stage(self, name: str) -> StageStats | None:
        """The stage called `name`, or None where the epoch has none."""
        return next((stage for stage in self.stages if stage.name == name), None)

    def _measure(self, name: str, measure: str) -> float:
        """A stage's `measure` ("seconds", "busy_fraction"); 0 where the epoch has no such
        stage."""
        stage = self.stage(name)
        return 0.0 if stage is None else float(getattr(stage, measure))

    @property
    def read_seconds(self) -> float:
        """Time spent reading samples, summed over the readers."""
        return self._measure("read", "seconds")

    @property
    def collate_seconds(self) -> float:
        """Time spent in `collate_fn`, summed over the workers."""
        return self._measure("collate", "seconds")

    @property
    def read_busy_fraction(self) -> float:
        """Share of the readers' time spent reading (1: a read in every slot, always)."""
        return self._measure("read", "busy_fraction")

    @property
    def collate_busy_fraction(self) -> float:
        """Share of the workers' time spent collating."""
        return self._measure("collate", "busy_fraction")

    @property
    def worker_busy_fraction(self) -> float:
        """Share of the workers' time spent on batches (1: never idle): every stage they
        run (for an async dataset, whose reads run on aload's loop, all but the reads)."""
        shared = self.read_concurrency == self.workers  # the same workers read and finish
        busy = sum(s.seconds for s in self.stages if shared or s.name != "read")
        return _share(busy, self.workers * self.seconds)

    @property
    def bottleneck(self) -> str | None:
        """The stage that holds the epoch back (None before its first batch):

        - "training": the loop body; batches are ready when asked for (waiting < 10%).
        - a stage's name ("read", "map", "collate", "map_batch", "pin"): the busiest for
          the workers that run it; more workers (or a cheaper stage) would help. "read"
          also where reads run on the consumer's thread.
        - "hand-over": the consumer waits while the workers are idle half the time or more:
          moving batches to the loop costs (large batches through shared memory or Ray's
          object store), or too few are read ahead (`prefetch_factor`).
        - "order": for half the wait or more, a slow batch, yielded in order, held back those
          finished after it while workers sat idle: `prefetch_factor="auto"` reads further
          ahead, `in_order=False` yields batches as they finish.
        """
        if self.batches == 0:
            return None
        if self.wait_fraction < 0.1:
            return "training"
        if self.held_back_seconds >= 0.5 * self.wait_seconds:
            return "order"
        timed = [stage for stage in self.stages if stage.concurrency and stage.seconds]
        if self.workers == 0 or not timed:
            return "read"
        busiest = max(timed, key=lambda stage: stage.busy_fraction)
        if max(busiest.busy_fraction, self.worker_busy_fraction) < 0.5:
            return "hand-over"
        return busiest.name

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def wait_fraction(self) -> float:
        """Share of the consumer's time spent waiting for data: near 1 means data-bound."""
        total = self.wait_seconds + self.body_seconds
        return self.wait_seconds / total if total > 0 else 0.0


@dataclass(frozen=True)
class LoaderStats:
    """Running totals over every epoch of one loader, and the current (or last) epoch.

    Attributes:
        epochs: epochs started.
        batches, samples, wait_seconds, body_seconds, retries, skipped: summed over epochs.
        skipped_indices: the indices of the skipped samples, in the order they were skipped
            (the most recent 1,000).
        epoch: the current or last epoch's stats, or None before the first.
        tuning: with `num_workers="auto"` or `max_concurrency="auto"`, how many reads run
            at once and why (an `aload.Tuning`); None otherwise.
        worker_mode: with `worker_mode="auto"`, the workers in use and each epoch's verdict
            (an `aload.WorkerModeTuning`); None otherwise.
        read_ahead: with `prefetch_factor="auto"`, how far ahead the workers read and why
            (an `aload.ReadAhead`); None otherwise.
        workers_tuning: with an async dataset and `num_workers="auto"` on threads, how many
            of the threads that finish its batches run at once and why (`tuning` is then
            its reads, with `max_concurrency="auto"`); None otherwise.
    """

    epochs: int
    batches: int
    samples: int
    wait_seconds: float
    body_seconds: float
    retries: int
    skipped: int
    skipped_indices: tuple[Any, ...]
    epoch: EpochStats | None
    tuning: Tuning | None = None
    worker_mode: WorkerModeTuning | None = None
    read_ahead: ReadAhead | None = None
    workers_tuning: Tuning | None = None

    @property
    def wait_fraction(self) -> float:
        total = self.wait_seconds + self.body_seconds
        return self.wait_seconds / total if total > 0 else 0.0


def _busy(stage: StageStats, seconds: float) -> str:
    """A stage for the epoch's log line, over `seconds` of the epoch: "map 91% busy (2 at
    once on worker processes)", and for the workers' first stage their queue and waits
    ("... 1.2 batches queued, idle 2% waiting before, 5% after")."""
    if not stage.concurrency:
        return f"{stage.name} on {stage.where}"
    line = (
        f"{stage.name} {stage.busy_fraction:.0%} busy "
        f"({stage.concurrency} at once on {stage.where})"
    )
    if stage.queued or stage.waiting_before or stage.waiting_after:
        capacity = stage.concurrency * seconds
        line += (
            f", {stage.queued:.1f} batches queued, idle "
            f"{_share(stage.waiting_before, capacity):.0%} waiting on the stage before, "
            f"{_share(stage.waiting_after, capacity):.0%} on the stage after"
        )
    return line


def _share(busy: float, capacity: float) -> float:
    return min(1.0, busy / capacity) if capacity > 0 else 0.0


class EpochMeter:
    """Counts one epoch; updated only from the consumer's side of the scheduler."""

    def __init__(
        self, epoch: int, reads: Reads, on_batch: Callable[[EpochMeter], None] | None = None
    ) -> None:
        self.epoch = epoch
        self.reads = reads
        # Who reads and who finishes (the loader says, once its pool is chosen), and the
        # stages its batches go through: for the stages' stats.
        self.workers = self.read_concurrency = 0
        self.read_where = self.workers_where = "the consumer"
        self.stages: tuple[str, ...] = ("read", "collate")
        self.stage_seconds = [0.0] * len(STAGES)
        self.read_clock: Any = None  # reads timed elsewhere (aload's fetchers), if any
        self.read_clock_start = 0.0
        self.on_batch = on_batch
        self.on_end: list[Callable[[], None]] = []  # told when the epoch runs out
        self.batches = self.samples = 0
        self.wait = self.body = 0.0
        self.held_back = 0.0  # seconds of `wait` that a slow batch, in order, held back
        self.workers_memory: int | None = None  # bytes worker processes hold, where watched
        self.depth_sum = self.max_depth = self.in_flight = 0
        # The workers over time, from a look as the consumer takes each batch (`sample`):
        # batch-seconds queued for a worker, and worker-seconds idle (waiting on the stage
        # after: the part in which the batches they finished filled the bound).
        self.sampled_at = self.first_sampled_at = 0.0  # the last look, and the first
        self.queued_seconds = self.idle_seconds = self.idle_after_seconds = 0.0
        self.queue_held_seconds = 0.0  # of the looks' time, that with batches queued for a worker
        self._queued = self._idle = self._idle_after = 0  # as the last look saw them
        # aload's loop reading: item-seconds of reads queued for a free slot, and the
        # seconds the bound was full, of those the looks covered.
        self.reads_queued_seconds = self.bound_full_seconds = 0.0
        self._reads_queued = self._full = 0
        self.first_ask: float | None = None
        self.last_handover: float | None = None
        self.asked_at: float | None = None  # the consumer waits since then (None: it does not)
        self.finished = False

    def asked(self) -> float:
        """The consumer asks for a batch: the loop body since the last one has ended."""
        now = time.perf_counter()
        if self.first_ask is None:
            self.first_ask = now
        if self.last_handover is not None:
            self.body += now - self.last_handover
            self.last_handover = None
        self.asked_at = now
        return now

    def handed_over(self, asked_at: float) -> None:
        """The consumer got what it asked for (a batch, an error, or the end)."""
        now = time.perf_counter()
        self.wait += now - asked_at
        self.last_handover = now
        self.asked_at = None

    def waited(self) -> float:
        """Seconds the consumer has waited so far, the wait it is in now included."""
        asked_at = self.asked_at
        return self.wait + (0.0 if asked_at is None else time.perf_counter() - asked_at)

    def reading_seconds(self) -> float:
        """Seconds spent reading so far, summed over the readers."""
        seconds = self.stage_seconds[0]
        if self.read_clock is not None:  # reads timed by aload's fetchers
            seconds += self.read_clock.seconds - self.read_clock_start
        return seconds

    def finishing_seconds(self) -> float:
        """Seconds spent on the stages after the reads so far, summed over the workers."""
        return sum(self.stage_seconds[1:])

    def watch_reads(self, clock: Any) -> None:
        """Count the reads `clock` (a `ReadClock`: aload's fetchers) times from now on."""
        self.read_clock, self.read_clock_start = clock, clock.seconds

    def worked(self, timing: Sequence[float]) -> None:
        """A worker spent `timing` (seconds in each of `STAGES`) on a delivered batch."""
        seconds = self.stage_seconds
        for stage, spent in enumerate(timing):
            seconds[stage] += spent

    def delivered(self, samples: int, queue_depth: int, in_flight: int) -> None:
        self.batches += 1
        self.samples += samples
        self.depth_sum += queue_depth
        self.max_depth = max(self.max_depth, queue_depth)
        self.in_flight = in_flight
        if self.on_batch is not None:
            self.on_batch(self)

    def end(self) -> None:
        """The epoch ran out of batches: log a summary line and close what watches it."""
        if self.finished:
            return
        self.finished = True
        self.in_flight = 0
        stats = self.snapshot()
        logger.debug(
            "aload: epoch %d: %d batches, %d samples in %.2f s (%.0f samples/s), "
            "waited %.0f%% of the time, bottleneck: %s (%s), %d retries, %d skipped",
            stats.epoch,
            stats.batches,
            stats.samples,
            stats.seconds,
            stats.samples_per_second,
            100 * stats.wait_fraction,
            stats.bottleneck,
            "; ".join(_busy(stage, stats.seconds) for stage in stats.stages),
            stats.retries,
            stats.skipped,
        )
        told, self.on_end = self.on_end, []  # (what they hold, such as workers, goes)
        for tell in told:
            tell()

    def sample(self, in_flight: int, ready: int, full: bool) -> None:
        """Where the scheduler's batches stand once the consumer has taken one (and more
        were submitted): `in_flight` not yet yielded, `ready` of them finished, and whether
        they `full`y take the bound. It counts until the next batch is taken: batches beyond
        the workers are queued for them; idle workers wait on the stage after where the
        batches finished fill the bound and none is being read before them (else on the
        stage before). Changes come mostly as a wait ends, so from its start, this is what
        the consumer's wait (or loop body) saw."""
        now = time.perf_counter()
        last, self.sampled_at = self.sampled_at, now
        if not last:
            self.first_sampled_at = now
        else:
            spent = now - last
            self.queued_seconds += spent * self._queued
            self.idle_seconds += spent * self._idle
            self.idle_after_seconds += spent * self._idle_after
            if self._queued:
                self.queue_held_seconds += spent
            if self.read_clock is not None:  # aload's loop reads: its slots' queue and waits
                self.reads_queued_seconds += spent * self._reads_queued
                self.bound_full_seconds += spent * self._full
        clock = self.read_clock
        reading = 0 if clock is None else clock.batches
        spare = self.workers - (in_flight - ready - reading)
        self._queued = max(0, -spare)
        self._idle = max(0, spare) if self.workers else 0
        self._idle_after = self._idle if full and not reading else 0
        if clock is not None:
            self._full, self._reads_queued = full, len(clock.queue)

    def _stages(self, seconds: float) -> tuple[StageStats, ...]:
        """The epoch's stages as measured so far, over `seconds` of the epoch."""
        spent = list(self.stage_seconds)
        spent[0] = self.reading_seconds()
        # The workers' stages: all, unless aload's loop reads (`read_clock`); the first of
        # them carries their queue and waits.
        loop_reads = self.read_clock is not None
        on_workers = [name for name in self.stages if not (loop_reads and name == "read")]
        first = on_workers[0] if on_workers else None
        workers_busy = sum(spent[STAGES.index(name)] for name in on_workers)
        stages = []
        for name in self.stages:
            reads = name == "read"
            concurrency = self.read_concurrency if reads else self.workers
            stage_seconds = spent[STAGES.index(name)]
            stage = StageStats(
                name=name,
                where=self.read_where if reads else self.workers_where,
                concurrency=concurrency,
                items=self.samples if name in ("read", "map") else self.batches,
                seconds=stage_seconds,
                busy_fraction=_share(stage_seconds, concurrency * seconds),
            )
            if name == first and self.workers:
                stage = self._with_waits(stage, seconds, workers_busy)
            elif reads and loop_reads:
                stage = self._with_read_waits(stage, seconds)
            stages.append(stage)
        return tuple(stages)

    @property
    def sampled_seconds(self) -> float:
        """Seconds the looks covered: from the first to the last."""
        return self.sampled_at - self.first_sampled_at

    def _with_read_waits(self, stage: StageStats, seconds: float) -> StageStats:
        """aload's reads `stage` with the item reads queued for a slot (in batches' worth,
        over `seconds`), and the slots' idle time (exact) told apart by the share of the
        time the bound on batches in flight was full (waiting after: nothing more could be
        submitted)."""
        idle = max(0.0, stage.concurrency * seconds - stage.seconds)
        looked = self.sampled_seconds
        after = idle * self.bound_full_seconds / looked if looked > 0 else 0.0
        per_batch = self.samples / self.batches if self.batches else 1.0
        return dataclasses.replace(
            stage,
            queued=self.reads_queued_seconds / per_batch / seconds if seconds > 0 else 0.0,
            waiting_before=idle - after,
            waiting_after=after,
        )

    def _with_waits(self, stage: StageStats, seconds: float, busy: float) -> StageStats:
        """`stage` with the workers' queue over `seconds`, and their idle time (their time
        less `busy`: exact) told apart in the shares the looks saw. Idle time while batches
        were queued for them went between calls (handing batches over; threads waiting for
        the GIL): it is no wait on another stage, and is in neither wait."""
        idle = max(0.0, self.workers * seconds - busy)
        looked = self.idle_seconds
        after = idle * self.idle_after_seconds / looked if looked > 0 else 0.0
        sampled = self.sampled_seconds
        unqueued = 1 - self.queue_held_seconds / sampled if sampled > 0 else 1.0
        return dataclasses.replace(
            stage,
            queued=self.queued_seconds / seconds if seconds > 0 else 0.0,
            waiting_before=(idle - after) * unqueued,
            waiting_after=after,
        )

    def elapsed(self) -> float:
        """Seconds from the first batch asked for to the last handed over (or now)."""
        if self.first_ask is None:
            return 0.0
        return (self.last_handover or time.perf_counter()) - self.first_ask

    def snapshot(self) -> EpochStats:
        seconds = self.elapsed()
        return EpochStats(
            epoch=self.epoch,
            batches=self.batches,
            samples=self.samples,
            seconds=seconds,
            wait_seconds=self.wait,
            body_seconds=self.body,
            held_back_seconds=self.held_back,
            workers_memory=self.workers_memory,
            mean_queue_depth=self.depth_sum / self.batches if self.batches else 0.0,
            max_queue_depth=self.max_depth,
            in_flight=self.in_flight,
            retries=self.reads.retries,
            skipped=len(self.reads.skipped),
            workers_replaced=self.reads.replaced,
            finished=self.finished,
            stages=self._stages(seconds),
            workers=self.workers,
            read_concurrency=self.read_concurrency,
        )


class StatsKeeper:
    """Totals over past epochs, and the meters of the last `WINDOW` epochs (which may still
    be counting): bounded however many epochs a loader runs."""

    WINDOW = 8
    SKIPPED_KEPT = 1000  # skipped indices remembered, the most recent

    def __init__(self) -> None:
        self._meters: deque[EpochMeter] = deque()
        self._past = _Totals()
        self._past_skipped: deque[Any] = deque(maxlen=self.SKIPPED_KEPT)

    def new_epoch(self, epoch: int, retry: Retry, max_skipped: int) -> EpochMeter:
        meter = EpochMeter(epoch, Reads(retry, max_skipped))
        self._meters.append(meter)
        if len(self._meters) > self.WINDOW:
            oldest = self._meters.popleft()
            self._past = self._past.plus(oldest.snapshot())
            self._past_skipped.extend(oldest.reads.skipped)
        return meter

    def snapshot(
        self,
        tuning: Tuning | None = None,
        worker_mode: WorkerModeTuning | None = None,
        read_ahead: ReadAhead | None = None,
        workers_tuning: Tuning | None = None,
    ) -> LoaderStats:
        recent = [meter.snapshot() for meter in self._meters]
        totals = self._past
        for stats in recent:
            totals = totals.plus(stats)
        skipped = deque(self._past_skipped, maxlen=self.SKIPPED_KEPT)
        for meter in self._meters:
            skipped.extend(meter.reads.skipped)
        return LoaderStats(
            epochs=totals.epochs,
            batches=totals.batches,
            samples=totals.samples,
            wait_seconds=totals.wait_seconds,
            body_seconds=totals.body_seconds,
            retries=totals.retries,
            skipped=totals.skipped,
            skipped_indices=tuple(skipped),
            epoch=recent[-1] if recent else None,
            tuning=tuning,
            worker_mode=worker_mode,
            read_ahead=read_ahead,
            workers_tuning=workers_tuning,
        )


@dataclass(frozen=True)
class _Totals:
    """Sums over epochs that have left the window."""

    epochs: int = 0
    batches: int = 0
    samples: int = 0
    wait_seconds: float = 0.0
    body_seconds: float = 0.0
    retries: int = 0
    skipped: int = 0

    def plus(self, epoch: EpochStats) -> _Totals:
        return _Totals(
            self.epochs + 1,
            self.batches + epoch.batches,
            self.samples + epoch.samples,
            self.wait_seconds + epoch.wait_seconds,
            self.body_seconds + epoch.body_seconds,
            self.retries + epoch.retries,
            self.skipped + epoch.skipped,
        )


def count_samples(indices: Any, batch: Any) -> int:
    """Samples in a batch: its indices where known, else the batch's leading size."""
    kind = type(indices)
    if kind is list:  # the common cases first: this runs once per batch
        return len(indices)
    if kind is torch.Tensor:  # 1-D (a batch), or 0-D (one index)
        return indices.numel()
    if indices is not None:
        return len(indices) if isinstance(indices, Sequence | torch.Tensor) else 1
    return _leading_size(batch)


def _leading_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        return _leading_size(next(iter(batch.values()))) if batch else 0
    if isinstance(batch, Sequence) and not isinstance(batch, str | bytes):
        if batch and isinstance(batch[0], torch.Tensor | Mapping | tuple):
            return _leading_size(batch[0])
        return len(batch)
    return 1
