"""What a loader measures while it runs, and the frozen snapshots users read.

The scheduler reports each batch it hands over (samples, queue depth, jobs in flight) and the
front ends report time: from the consumer asking for a batch to getting it is *waiting*, from
getting it to asking again is the *loop body*. Their ratio says whether training is data-bound.
A few clock reads per batch: cheap enough to stay on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._retry import Reads, Retry
from ._tuner import Tuning

logger = logging.getLogger("aload")


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
        mean_queue_depth: finished batches waiting for the consumer, on average at hand-over.
        max_queue_depth: the most finished batches that were waiting at once.
        in_flight: batches submitted but not yet handed over, now.
        retries: reads retried after a transient error.
        skipped: samples dropped from their batch within the failure budget.
        workers_replaced: workers that died and were replaced, their batches read again
            (Ray actors).
        finished: whether the epoch ran to its end.
        read_seconds: time spent reading samples (`__getitem__`, `__getitems__`, a gather,
            a stream's `next`; an async dataset's awaited reads), summed over the readers.
        collate_seconds: time spent finishing batches (`transform`, `collate_fn`,
            pinning), summed over the workers.
        workers: the workers that collate (and read, but for async datasets) at once; 0:
            the consumer reads its own batches, which neither time covers.
        read_concurrency: reads at once: `workers`, or an async dataset's
            `max_concurrency` (where tuned, the concurrency in force at the end).
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
    read_seconds: float = 0.0
    collate_seconds: float = 0.0
    workers: int = 0
    read_concurrency: int = 0

    @property
    def read_busy_fraction(self) -> float:
        """Share of the readers' time spent reading (1: a read in every slot, always)."""
        return _share(self.read_seconds, self.read_concurrency * self.seconds)

    @property
    def collate_busy_fraction(self) -> float:
        """Share of the workers' time spent collating."""
        return _share(self.collate_seconds, self.workers * self.seconds)

    @property
    def worker_busy_fraction(self) -> float:
        """Share of the workers' time spent on batches (1: never idle): reading and
        collating, or for async datasets (read on aload's loop) collating."""
        if self.read_concurrency == self.workers:  # the same workers read and collate
            return _share(self.read_seconds + self.collate_seconds, self.workers * self.seconds)
        return self.collate_busy_fraction

    @property
    def bottleneck(self) -> str | None:
        """The stage that holds the epoch back (None before its first batch):

        - "training": the loop body; batches are ready when asked for (waiting < 10%).
        - "read": the workers' reads of samples take the longest; more workers (or faster
          reads) would help. Also where reads run on the consumer's thread or aload's loop.
        - "collate": the workers' `transform`, `collate_fn` or pinning take the longest.
        - "hand-over": the consumer waits while the workers are idle half the time or more:
          moving batches to the loop costs (large batches through shared memory or Ray's
          object store), or too few are read ahead (`prefetch_factor`).
        """
        if self.batches == 0:
            return None
        if self.wait_fraction < 0.1:
            return "training"
        if self.workers == 0 or self.read_seconds + self.collate_seconds == 0:
            return "read"
        read, collate = self.read_busy_fraction, self.collate_busy_fraction
        if max(read, collate, self.worker_busy_fraction) < 0.5:
            return "hand-over"
        return "collate" if collate > read else "read"

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

    @property
    def wait_fraction(self) -> float:
        total = self.wait_seconds + self.body_seconds
        return self.wait_seconds / total if total > 0 else 0.0


def _share(busy: float, capacity: float) -> float:
    return min(1.0, busy / capacity) if capacity > 0 else 0.0


class EpochMeter:
    """Counts one epoch; updated only from the consumer's side of the scheduler."""

    def __init__(
        self, epoch: int, reads: Reads, on_batch: Callable[[EpochMeter], None] | None = None
    ) -> None:
        self.epoch = epoch
        self.reads = reads
        # Who reads and collates (the loader says, once its pool is chosen): for the stages.
        self.workers = self.read_concurrency = 0
        self.read_seconds = self.collate_seconds = 0.0
        self.read_clock: Any = None  # reads timed elsewhere (aload's fetchers), if any
        self.read_clock_start = 0.0
        self.on_batch = on_batch
        self.on_end: Callable[[], None] | None = None
        self.batches = self.samples = 0
        self.wait = self.body = 0.0
        self.depth_sum = self.max_depth = self.in_flight = 0
        self.first_ask: float | None = None
        self.last_handover: float | None = None
        self.finished = False

    def asked(self) -> float:
        """The consumer asks for a batch: the loop body since the last one has ended."""
        now = time.perf_counter()
        if self.first_ask is None:
            self.first_ask = now
        if self.last_handover is not None:
            self.body += now - self.last_handover
            self.last_handover = None
        return now

    def handed_over(self, asked_at: float) -> None:
        """The consumer got what it asked for (a batch, an error, or the end)."""
        now = time.perf_counter()
        self.wait += now - asked_at
        self.last_handover = now

    def watch_reads(self, clock: Any) -> None:
        """Count the reads `clock` (a `ReadClock`: aload's fetchers) times from now on."""
        self.read_clock, self.read_clock_start = clock, clock.seconds

    def worked(self, timing: Sequence[float]) -> None:
        """A worker spent `timing` (seconds reading, seconds collating) on a delivered batch."""
        self.read_seconds += timing[0]
        self.collate_seconds += timing[1]

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
            "waited %.0f%% of the time, bottleneck: %s, %d retries, %d skipped",
            stats.epoch,
            stats.batches,
            stats.samples,
            stats.seconds,
            stats.samples_per_second,
            100 * stats.wait_fraction,
            stats.bottleneck,
            stats.retries,
            stats.skipped,
        )
        if self.on_end is not None:
            self.on_end()

    def _read_seconds(self) -> float:
        watched = 0.0
        if self.read_clock is not None:
            watched = self.read_clock.seconds - self.read_clock_start
        return self.read_seconds + watched

    def snapshot(self) -> EpochStats:
        seconds = 0.0
        if self.first_ask is not None:
            seconds = (self.last_handover or time.perf_counter()) - self.first_ask
        return EpochStats(
            epoch=self.epoch,
            batches=self.batches,
            samples=self.samples,
            seconds=seconds,
            wait_seconds=self.wait,
            body_seconds=self.body,
            mean_queue_depth=self.depth_sum / self.batches if self.batches else 0.0,
            max_queue_depth=self.max_depth,
            in_flight=self.in_flight,
            retries=self.reads.retries,
            skipped=len(self.reads.skipped),
            workers_replaced=self.reads.replaced,
            finished=self.finished,
            read_seconds=self._read_seconds(),
            collate_seconds=self.collate_seconds,
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

    def snapshot(self, tuning: Tuning | None = None) -> LoaderStats:
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
