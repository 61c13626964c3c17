"""`prefetch_factor="auto"`: how far ahead of the loop the workers read, found online.

Batches are yielded in order, so a slow read (a timeout and retry, a cold cache) holds back
every batch finished after it. When it takes longer than the batches in flight last, they
fill the bound and the workers stop while the loop waits for the slow one: a throughput
hill climb cannot see this (one stall swamps a window), but the epoch can. It times the loop
waiting while the bound is full and workers have nothing to read ("held back"), and each
time that ends, if the loop was held back more than `HELD` of the time since the last
change (and more than a hiccup), the read-ahead grows: to hold the batches the loop would
have taken while held back, at the pace it takes them otherwise, and at least twice as far.
It grows while the batches in flight fit in `memory_budget` (or `MEMORY` without one), and
never shrinks: batches read ahead cost memory within that, not speed. Every change is a
`Decision` (its `concurrency`: the prefetch factor), logged on the `aload` logger.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from ._history import History
from ._tuner import Decision

logger = logging.getLogger("aload")

START = 2  # torch's prefetch_factor
MAXIMUM = 256  # batches in flight per worker, at most
HELD = 0.05  # held back more than this share of the time: read further ahead
HELD_SECONDS = 0.001  # held back less than this in all: a hiccup (at start-up), no cost
MEMORY = 2**30  # bytes the batches in flight may take, without a memory_budget
PACE_SECONDS, PACE_BATCHES = 0.01, 4  # enough of the loop to measure its pace


@dataclass(frozen=True)
class ReadAhead:
    """What `prefetch_factor="auto"` settled on: batches in flight per worker now, and every
    change with its reason, oldest first (a `Decision`'s `concurrency` is the factor): the
    first 32 and the latest 224, `dropped` counting those left out between."""

    prefetch_factor: int
    history: tuple[Decision, ...]
    dropped: int = 0


class ReadAheadTuner:
    """Finds the prefetch factor; the epoch tells it each time the loop stops being held
    back, and scales its bound on batches in flight by `scale`."""

    def __init__(self, memory_budget: int | None = None) -> None:
        self.factor = START
        self.memory_budget = memory_budget
        self.history: History[Decision] = History()
        self._began = time.perf_counter()
        self._since = self._began  # the last change (or the epoch's start)
        self._held = 0.0  # seconds held back since then
        self._since_batches = 0  # the epoch's batches delivered by then

    @property
    def scale(self) -> float:
        """How many times the bound at torch's prefetch factor the epoch keeps in flight."""
        return self.factor / START

    def resume(self, factor: int) -> None:
        """Start from the factor a saved run had settled on."""
        self._set(max(START, min(factor, MAXIMUM)), "resumed from a state")

    def snapshot(self) -> ReadAhead:
        return ReadAhead(self.factor, tuple(self.history), self.history.dropped)

    def restart(self) -> None:
        """A new epoch: its time held back is measured from its start."""
        self._since, self._held, self._since_batches = time.perf_counter(), 0.0, 0

    def held_back(
        self,
        seconds: float,
        *,
        waited: float,
        in_flight: int,
        largest_batch: int,
        batches: int,
        finished_pace: float,
    ) -> bool:
        """The loop was held back `seconds` of a wait of `waited`, with `in_flight` batches
        (the bound) of at most `largest_batch` bytes, `batches` into the epoch, while the
        workers finished `finished_pace` batches a second; returns whether the factor
        changed. It grows to hold what the loop would have taken during the wait, at the
        pace it takes batches when not held back (the workers' pace before it has one),
        and at least doubles."""
        self._held += seconds
        now = time.perf_counter()
        elapsed = now - self._since
        if self._held <= max(HELD * elapsed, HELD_SECONDS) or self.factor >= MAXIMUM:
            return False
        pace = finished_pace
        free = elapsed - self._held  # time the loop was not held back since the last change
        if free >= PACE_SECONDS and batches - self._since_batches >= PACE_BATCHES:
            # the loop's own pace, measured over enough of it
            pace = (batches - self._since_batches) / free
        workers = in_flight / self.factor  # batches in flight per unit of the factor
        wanted = max(2 * self.factor, math.ceil((in_flight + waited * pace) / workers))
        memory = MEMORY if self.memory_budget is None else self.memory_budget
        fits = MAXIMUM if not largest_batch else int(memory // (largest_batch * workers))
        factor = min(wanted, MAXIMUM, fits)
        if factor <= self.factor:
            return False  # more would not fit in memory
        self._set(
            factor,
            f"the loop was held back {self._held / elapsed:.0%} of the time by a slow batch, "
            f"with {in_flight} batches in flight and workers idle: reading {factor} a "
            "worker ahead",
            batches,
        )
        return True

    def _set(self, factor: int, reason: str, batches: int = 0) -> None:
        self.factor = factor
        self._since, self._held, self._since_batches = time.perf_counter(), 0.0, batches
        self.history.append(Decision(self._since - self._began, factor, reason))
        logger.debug("aload: prefetch_factor='auto': %s", reason)
