"""`num_workers="auto"` and `max_concurrency="auto"`: how many reads run at once, and how many
workers finish batches, found online.

A hill climb on measured throughput, one window at a time (a tenth of a second and a few
batches, and two of a batch's read times where each worker reads a whole batch): while the
consumer waits for data, read twice as many batches at once (where a batch takes so long to
read that windows last longer than a tenth of a second, as many more as the idle cores and the
consumer's wait leave room for, at least four times: each window costs seconds; readers that
wait, with no batch finished a tenth of a second into the search, take that step then, before
their first batch, which then measures the level they left, and look again a tenth of a
second later at the readers the step added), and keep the step only if
throughput rose with it over the mean of the level's last windows: by 15% of the step's share,
or by 30% of what the consumer's wait left to gain if that is less (waiting a third of the
time, it can go at most 1.5x as fast), and at least 2%. A kept step that gained less than half
its share has passed where throughput flattens: halfway back is tried, and kept if it loses
nothing (if it gains clearly, the step's own window was too early to tell: back up, and on; if
it loses, back up, and the next steps go halfway to twice that level, not double on one noisy
window). A long step is judged on its second window, once the threads it added have delivered;
one that still gained much, but less than its share, tries as many as gave that gain. A step
that did not help is taken back, and the level it reached becomes a ceiling that the next steps
go halfway to, while that is a step of at least a quarter (a smaller one is judged on noise).
When the very first step up did not help (work that holds the GIL), half as many are tried
once, and kept if they lose nothing. The ceiling is probed again now and then, and
forgotten when throughput stays well below where it settled for two windows (the data's cost
changed): then the first step goes to as many at once as would give the settled throughput
again (reads k times slower need k times as many at once, Little's law), is kept if it gains,
and where it gained less than that, as many as its gain needs are tried; past it, steps go by
halves. A step is not tried where the machine's idle cores (at least a tenth of a core, which a
busy machine still shares) could not give it the gain it must show (each sample costs at least
the CPU it cost before), so it never passes its CPU budget (the cores it may run on); found at
that budget before any step, half as many are tried once (readers that each run a team of
threads take each other's cores), and kept if they lose nothing. Nor is one tried where the
one thread that runs every awaited read, aload's loop, could not give the gain from the rest of
its core (reads in flight past what that core keeps up with only hold memory). It holds while
the consumer does not wait: more reads would only queue more batches.

The knobs: with thread workers, how many threads read at once (a pool of `maximum` threads
that start as work comes), each with `prefetch_factor` batches in flight as torch's workers
have, so a reader that finishes during a training step goes on to its next batch; with an
async dataset, how many reads are awaited at once, and how many of its thread workers finish
batches. Where an epoch has two knobs, `Autotuner` first ramps them up together while the
loop waits nearly all the time, then gives each window to the stage that holds the other
back. (Process workers are one per core, all started as torch starts them: fewer batches in
flight would save memory, never time, so nothing of theirs is tuned here.) Every change is a
`Decision` with its reason, logged on the `aload` logger.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ._collector_pauses import paused_seconds
from ._history import History

logger = logging.getLogger("aload")

GAIN = 0.02  # a step must raise throughput at least this much to be kept,
GAIN_SHARE = 0.15  # and this share of its own size (3 -> 4 at once: by 1/3 * 0.15),
ATTAINABLE_SHARE = 0.3  # or this share of the gain the consumer's wait leaves, if less
HALF_SHARE = 0.5  # a kept step that gained less than this share: try halfway back
WAITING = 0.05  # the consumer waits at least this share of a window: data holds it back
WINDOW_SECONDS = 0.1
WINDOW_BATCHES = 4
# ... and at least this many of a batch's read time, where a worker reads a whole batch: one
# added by a step delivers its first batch a read time after it (0.5 s for 256 items of 2 ms),
# so a shorter window would judge the step before the new workers could show.
READ_TIMES = 2
LONG_GROWTH = 4  # where windows are that long, a climb multiplies by at least this, not 2
RAMP_WINDOW_SECONDS = 0.05  # a ramp's step doubles throughput or not: a shorter window tells
REPROBE_WINDOWS = 16  # windows at a ceiling before it is probed again
# The least step halfway to a ceiling worth a window: one window's throughput varies by a
# fifth on a busy machine, so a smaller step (225 -> 226 reads at once) is judged on noise.
SMALLEST_STEP = 0.25
LEVEL_WINDOWS = 3  # a step is judged against the mean of this many windows before it
SHIFT = 0.3  # throughput this much below the settled level,
SHIFT_WINDOWS = 2  # this many windows in a row: the data's cost changed
SATURATED = 0.9  # a stage busy this share of its workers' time has no room to spare
RAMP_WAITING = 0.9  # while the loop waits this share of the time, stages double together
HEADROOM = 0.5  # a stage busy more than this share would hold back a doubled throughput
# Cores a busy machine still gives readers that want a little more: its scheduler shares the
# cores among the threads that can run, so readers that wait (on storage, a service) and use a
# hundredth of a core can double, where idle cores alone would forbid any step.
SHARED_ROOM = 0.1
# No batch yet a window into a fresh search: readers that wait (each used less than
# WAITING_READERS of a core) take their first step now, not after their first, slow batches.
FIRST_LOOK_SECONDS = WINDOW_SECONDS
WAITING_READERS = 0.25
THREADS_START = 2  # batches read at once by thread workers, to begin with
ASYNC_START = 32  # an async dataset's reads awaited at once, to begin with


def _idle_cores(began: float | None, ended: float | None, wall: float) -> float | None:
    """The cores that sat idle on average between two reads of `idle_seconds`, `wall`
    seconds apart (None where /proc/stat could not be read)."""
    return None if began is None or ended is None else (ended - began) / wall


def _bold_growth(waiting: float, allowed: float) -> float:
    """How far a long step goes: the gain the idle cores could feed (`allowed`) and the
    consumer's wait leave, at least `LONG_GROWTH` times."""
    attainable = 1 / (1 - waiting) if waiting < 1 else float("inf")
    return max(LONG_GROWTH, min(1 + allowed, attainable))


@dataclass(frozen=True)
class Decision:
    """One change of concurrency: when (seconds since the tuner started), to what, and why."""

    seconds: float
    concurrency: int
    reason: str


@dataclass(frozen=True)
class Tuning:
    """What `num_workers="auto"` settled on: batches read at once now, at most `maximum`
    (the threads it may use), and its changes with their reasons, oldest first: the first
    32 (the search) and the latest 224, with `dropped` counting those left out between (a
    tuner watches, and probes again, for as long as the loader runs)."""

    concurrency: int
    maximum: int
    history: tuple[Decision, ...]
    dropped: int = 0


def needed_gain(step: float, waited: float) -> float:
    """The share by which a step of `step` (1.0: doubling) must raise throughput to be kept,
    the consumer having waited `waited` of the window before it."""
    share = GAIN_SHARE * step
    if waited < 1:  # data that came at once would make it 1 / (1 - waited) as fast
        share = min(share, ATTAINABLE_SHARE * waited / (1 - waited))
    return max(GAIN, share)


def idle_seconds() -> float | None:
    """Seconds the cores this process may use have sat idle since the machine started, all
    together (Linux's /proc/stat: idle and waiting on I/O); None where it cannot be read."""
    try:
        cores = {f"cpu{core}".encode() for core in os.sched_getaffinity(0)}
        with open("/proc/stat", "rb") as stat:
            lines = [line.split() for line in stat if line.startswith(b"cpu")]
    except (OSError, AttributeError):
        return None
    ticks = sum(int(f[4]) + int(f[5]) for f in lines if f[0] in cores and len(f) > 5)
    return ticks / _TICKS_PER_SECOND


_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_budget() -> float:
    """The cores this process may run on."""
    try:
        return float(len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - platforms without affinity (macOS)
        return float(os.cpu_count() or 1)


class ConcurrencyTuner:
    """Finds how many batches to read at once, between 1 and `maximum`.

    `decide` is given each window's measures (by `Autotuner`) and moves `concurrency`.
    """

    def __init__(
        self, maximum: int, budget: float | None = None, start: int = 2, knob: str = "num_workers"
    ) -> None:
        self.maximum = maximum
        self.knob = knob  # the argument set to "auto", for the log
        self.budget = cpu_budget() if budget is None else budget
        self.concurrency = max(1, min(start, maximum))
        self._start = self.concurrency
        self.history: History[Decision] = History()
        self._began = time.perf_counter()
        # The level before a step, its throughput, and the consumer's share of time waiting.
        self._trial: tuple[int, float, float] | None = None
        self._ceiling: int | None = None  # a level that did not help
        self._at_ceiling = 0  # windows spent below the ceiling since it was set
        self._settled: float | None = None  # the throughput where the climb stopped
        self._explored = False  # a step up raised throughput, or fewer were tried
        self._may_step_down = False  # the first step up did not help: try fewer, once
        self._halfway = False  # the step down on trial is halfway back from a kept step up
        self._below_settled = 0  # windows in a row well below the settled throughput
        self._unmeasured = False  # the step on trial was taken before its level's first batch
        self._came_down = False  # the last change was a step down
        self._restoring = False  # the step on trial is the first after a shift (Little's law)
        self._allowed_before: dict[int, float] = {}  # the least, at levels left behind
        # Samples/s in the first window since the last change, and in the last few after it.
        self._first_at_level: float | None = None
        self._at_level: deque[float] = deque(maxlen=LEVEL_WINDOWS)
        # The gain the idle cores would allow more readers, in the same windows.
        self._allows_at_level: deque[float] = deque(maxlen=LEVEL_WINDOWS)

    def resume(self, concurrency: int) -> None:
        """Start from the concurrency a saved run had settled on."""
        self._set(max(1, min(concurrency, self.maximum)), "resumed from a state")

    def snapshot(self) -> Tuning:
        history = self.history
        return Tuning(self.concurrency, self.maximum, tuple(history), history.dropped)

    def fewest_since(self, moment: float) -> int:
        """The fewest at once from `moment` (a `time.perf_counter()`) to now: the level in
        force then, and each set since (where `moment` falls among decisions dropped from
        the history, from the last one kept before them: a window spans a few decisions)."""
        fewest = self.concurrency
        for decision in reversed(self.history):
            fewest = min(fewest, decision.concurrency)
            if self._began + decision.seconds < moment:  # the level in force at `moment`
                return fewest
        return min(fewest, self._start)

    @property
    def trying(self) -> bool:
        """Whether a step is on trial: the next window judges it. (A step down still to try
        is not one: it waits for a window in which this stage holds the others back.)"""
        return self._trial is not None

    def decide(
        self,
        throughput: float,
        waiting: float,
        cores: float,
        climb: bool = True,
        idle: float | None = None,
        bold: bool = False,
        loop: float | None = None,
    ) -> None:
        """One window's measures: samples/s, the consumer's share of time waiting, the cores
        the process used, those that sat idle (None: the budget's cores it did not use), and
        the share of a core used by the one thread that runs every read (None: none does).
        Moves `concurrency` (or not), as the module says; without `climb` (another stage
        holds this one back), only judges the step on trial. A climb doubles; `bold` (windows
        are long: slow batches, so each step costs seconds) goes as far as the idle cores and
        the consumer's wait leave room for, at least `LONG_GROWTH` times."""
        allows = self._allows(cores, idle, loop)
        if self._first_at_level is None:
            self._first_at_level = throughput
        else:
            self._at_level.append(throughput)
            self._allows_at_level.append(allows)
        if self._trial is not None and bold and not self._at_level:
            return  # slow batches: the workers a step added delivered in part of the window
        if self._trial is not None:
            before, baseline, waited = self._trial
            self._trial = None
            restoring, self._restoring = self._restoring, False
            if self.concurrency < before:  # a step down: keep it if it lost nothing
                from_a_kept_step, self._halfway = self._halfway, False
                self._judge_step_down(before, baseline, throughput, from_a_kept_step)
                return
            step = self.concurrency / before - 1
            if throughput <= baseline * (1 + needed_gain(step, waited)):
                self._ceiling, self._at_ceiling = self.concurrency, 0
                self._settled = baseline
                gain = throughput / baseline if baseline > 0 else 1.0
                proportional = min(round(before * gain), self.concurrency - 1)
                if step > 1 and gain >= 1 + HALF_SHARE and proportional > before:
                    # A long step that still gained much: as many as gave that gain, each
                    # as productive as before (a store that serves 8 at once: 2 -> 64 gave 4x).
                    self._trial = (before, baseline, waited)
                    self._set(
                        proportional,
                        f"{self.concurrency} at once gave {throughput:,.0f} samples/s, "
                        f"{gain:.1f}x {before} ({baseline:,.0f}), less than the step's share: "
                        f"trying {proportional}",
                    )
                    return
                self._set(
                    before,
                    f"{self.concurrency} at once gave {throughput:,.0f} samples/s, not more "
                    f"than {before} ({baseline:,.0f}): back to {before}",
                )
                # The very first step up did not help (work that holds the GIL): try fewer.
                self._may_step_down = not self._explored and before > 1
                return
            self._settled = throughput
            self._explored = True
            if restoring:  # where the climb stood before the shift: past it, by halves
                self._ceiling, self._at_ceiling = 2 * self.concurrency, 0
                gain = throughput / baseline if baseline > 0 else 1.0
                proportional = math.ceil(before * gain)
                if proportional < self.concurrency - 1:  # fewer, each as productive, gave it
                    self._trial, self._halfway = (self.concurrency, throughput, waiting), True
                    self._set(
                        proportional,
                        f"{self.concurrency} at once gave {throughput:,.0f} samples/s, "
                        f"{gain:.1f}x {before} ({baseline:,.0f}): trying {proportional}, as "
                        "many as that gain needs",
                    )
                    return
            elif throughput < baseline * (1 + HALF_SHARE * step) and self.concurrency - before > 1:
                # Less than half its share: the plateau begins between; try halfway back.
                halfway = before + (self.concurrency - before) // 2
                self._trial, self._halfway = (self.concurrency, throughput, waiting), True
                self._set(
                    halfway,
                    f"{self.concurrency} at once gave {throughput:,.0f} samples/s, "
                    f"{throughput / baseline - 1:.0%} more than {before}: trying {halfway}",
                )
                return
        if not climb or (self._came_down and not self._at_level):
            return  # (the first window after a step down ran partly at the level above)
        if self._may_step_down:
            self._may_step_down = False
            self._try_fewer(
                throughput, waiting, f"more than {self.concurrency} at once did not help"
            )
            return
        if waiting < WAITING:
            return  # training holds the loop back, not data: more reads would only queue
        restore, was_settled = 0, 0.0  # after a shift: as many as would give `was_settled`
        if self._settled is not None and throughput < self._settled * (1 - SHIFT):
            self._below_settled += 1
            if self._below_settled < SHIFT_WINDOWS:
                return  # one slow window: the next says whether the cost changed
            restore, was_settled = self._shifted(throughput)
        else:
            self._below_settled = 0
        if self._ceiling is not None:
            self._at_ceiling += 1
            if self._at_ceiling >= REPROBE_WINDOWS:
                self._ceiling = None  # probe the ceiling again: costs may have changed
        if cores >= self.budget * 0.95:  # every core it may use: more cannot add any
            if not self._explored and self.concurrency > 1:
                # ... before any step: readers that each run a team of threads (the BLAS,
                # torch's intra-op pool) may take each other's cores: fewer, once.
                self._try_fewer(
                    throughput,
                    waiting,
                    f"the loop waited {waiting:.0%} of the time with {self.concurrency} at "
                    f"once on {cores:.1f} of {self.budget:g} cores",
                )
            return
        # The least gain the idle cores allowed at this level, before a trial too (one
        # window's CPU time may dip, and the first after a trial runs partly at its level)
        allowed = min(self._allows_at_level, default=allows)
        allowed = min(allowed, self._allowed_before.get(self.concurrency, allowed))
        if self._ceiling is None:
            growth = _bold_growth(waiting, allowed) if bold else 2.0
            wanted = int(min(self.maximum, growth * self.concurrency))
            if restore > wanted:  # just after a shift: as many as give the old throughput
                restored = min(self.maximum, restore)
                step = restored / self.concurrency - 1
                if restored > wanted and allowed >= needed_gain(step, waiting):  # cores allow
                    wanted, self._restoring = restored, True
        else:  # halfway to the level that did not help
            wanted = self.concurrency + max(1, (self._ceiling - self.concurrency) // 2)
            wanted = min(wanted, self._ceiling - 1, self.maximum)
            if wanted < self.concurrency * (1 + SMALLEST_STEP):
                return  # too close to the ceiling for one window to tell them apart
        if wanted <= self.concurrency:
            return
        if allowed < needed_gain(wanted / self.concurrency - 1, waiting):
            return  # the idle cores could not give the step the gain it must show
        self._trial = (self.concurrency, self._level_throughput(), waiting)
        why = f"trying {wanted}"
        if self._restoring:
            why = (
                f"down from {was_settled:,.0f}, the reads got slower: trying {wanted}, as many "
                "as give that again"
            )
        self._set(
            wanted,
            f"the loop waited {waiting:.0%} of the time at {throughput:,.0f} samples/s with "
            f"{self.concurrency} at once, on {cores:.1f} of {self.budget:g} cores: {why}",
        )

    def _shifted(self, throughput: float) -> tuple[int, float]:
        """The data's cost changed (`throughput` the last of the slow windows): forget the
        ceiling and where it settled, and climb again from here. Returns as many at once as
        would give the settled throughput again, and that throughput: reads k times slower
        need k times as many at once (Little's law). Sized from the faster of the slow
        windows: a pause (a collection, a busy moment) gives one window near nothing and one
        in part as before, where reads that got slower give two alike."""
        was_settled = self._settled or 0.0
        slow = max(list(self._at_level)[-SHIFT_WINDOWS:], default=throughput)
        restore = math.ceil(self.concurrency * was_settled / slow) if slow > 0 else 0
        while len(self._at_level) > SHIFT_WINDOWS:  # the level's windows before the shift
            self._at_level.popleft()
            self._allows_at_level.popleft()
        self._ceiling = None
        self._settled, self._explored = None, False
        self._allowed_before.clear()
        return restore, was_settled

    def step_before_a_batch(
        self, seconds: float, waiting: float, cores: float, idle: float | None
    ) -> bool:
        """No batch yet, `seconds` into a fresh search (the consumer waited `waiting` of the
        time since the last look; the readers used `cores`, and `idle` sat idle): readers
        that wait take a long step now, rather than after their first batches, which take
        seconds where batches are slow. What the level before the first step gave is not
        known until its first batch (`measured_before`), which judges the steps with the
        others. A look after a step weighs the readers it added: a waiting reader's CPU is
        measured dearer where few run (at 2, 2.5 times what each of 64 uses here)."""
        if self.history and not self._unmeasured:
            return False  # a batch came, or a search resumed: windows decide
        if waiting < WAITING or cores >= WAITING_READERS * self.concurrency:
            return False  # (readers that use cores are left to their first window)
        allows = self._allows(cores, idle)
        wanted = int(min(self.maximum, _bold_growth(waiting, allows) * self.concurrency))
        if wanted <= self.concurrency or allows < needed_gain(wanted / self.concurrency - 1, 1):
            return False
        if not self._unmeasured:  # the first step: the level it leaves is judged with it
            self._trial, self._unmeasured = (self.concurrency, 0.0, waiting), True
        self._set(
            wanted,
            f"no batch yet after {seconds:.2g} s with {self.concurrency} at once, which used "
            f"{cores:.2f} of {self.budget:g} cores while the loop waited: trying {wanted}",
        )
        return True

    def measured_before(self, throughput: float) -> None:
        """What the level before a step taken before any batch gave, known from its first
        batch: the step's trial is judged against it."""
        if self._unmeasured and self._trial is not None:
            before, _, waited = self._trial
            self._trial, self._unmeasured = (before, throughput, waited), False

    def ramp_up(self, reason: str) -> bool:
        """Double, as one of the stages that `Autotuner` steps together; False at the maximum."""
        wanted = min(self.maximum, 2 * self.concurrency)
        if wanted == self.concurrency:
            return False
        self._set(wanted, f"{reason}: trying {wanted}")
        return True

    def ramp_kept(self, throughput: float) -> None:
        """The stages' step together raised throughput: it settles here for now."""
        self._settled, self._explored = throughput, True

    def ramp_refused(self, before: int, baseline: float, throughput: float) -> None:
        """The stages' step together did not help: back to `before`, and the level tried is a
        ceiling (one stage alone at it could not do better than all of them)."""
        self._ceiling, self._at_ceiling, self._settled = self.concurrency, 0, baseline
        self._may_step_down = not self._explored and before > 1  # work that holds the GIL?
        self._set(
            before,
            f"{self.concurrency} at once, with the other stages stepped up, gave "
            f"{throughput:,.0f} samples/s, not more than {before} ({baseline:,.0f}): back to "
            f"{before}",
        )

    def _try_fewer(self, throughput: float, waiting: float, why: str) -> None:
        """Put half as many on trial, once (`_judge_step_down` keeps them if they lose
        nothing)."""
        self._explored = True
        self._trial = (self.concurrency, self._level_throughput(), waiting)
        self._set(max(1, self.concurrency // 2), f"{why}: trying fewer")

    def _judge_step_down(
        self, before: int, baseline: float, throughput: float, halfway: bool = False
    ) -> None:
        """After a step down from `before` (at `baseline` samples/s): stay if throughput held
        (the same with fewer threads: less contention, less memory), else go back up. Halfway
        back from a step up that was kept, clearly more than `before` gave means no plateau:
        `before` was measured while its new reads started (a window holds few batches when
        each takes long), so back to it, and the climb goes on."""
        if halfway and throughput > baseline * (1 + GAIN_SHARE):
            self._settled = throughput
            self._set(
                before,
                f"{self.concurrency} at once gave {throughput:,.0f} samples/s, more than "
                f"{before} did as its reads started ({baseline:,.0f}): back to {before}, "
                "climbing on",
            )
            return
        if throughput >= baseline * (1 - GAIN):
            self._ceiling, self._at_ceiling = before, 0
            self._settled = throughput
            self._set(
                self.concurrency,
                f"{self.concurrency} at once gave {throughput:,.0f} samples/s, as much as "
                f"{before} ({baseline:,.0f}): staying at {self.concurrency}",
            )
            return
        self._settled = baseline
        flattening = ""
        if halfway and (self._ceiling is None or self._ceiling > 2 * before):
            # `before` gained little over the level below it, and fewer lose a little: the
            # plateau is near. Doubling again would be judged on one noisy window (a busy
            # machine's vary by a sixth), so the next steps go halfway to twice `before`.
            self._ceiling, self._at_ceiling = 2 * before, 0
            flattening = f"; gains flatten, next steps go halfway to {2 * before}"
        self._set(
            before,
            f"{self.concurrency} at once gave {throughput:,.0f} samples/s, less than {before} "
            f"({baseline:,.0f}): back to {before}{flattening}",
        )

    def _allows(self, cores: float, idle: float | None, loop: float | None = None) -> float:
        """The most that more readers could multiply throughput by: the room the budget's
        cores leave (a busy machine's idle cores, but at least `SHARED_ROOM`) over the cores
        used, and where one thread runs every read (`loop`: its share of a core), the room
        that thread's core leaves over its share."""
        room = self.budget - cores
        if idle is not None:  # a busy machine still shares a little with more readers
            room = min(room, max(idle, SHARED_ROOM))
        allows = room / cores if cores > 0 else float("inf")
        if loop is not None and loop > 0:
            allows = min(allows, (1 - loop) / loop)
        return allows

    def _level_throughput(self) -> float:
        """The throughput of the current level, to judge a step from: the mean of its last
        windows (one window of a few batches is noisy, and a step tried after a slow one
        would be kept for nothing), leaving out the first, which ran partly at the level
        before, where there are others."""
        windows = self._at_level or [self._first_at_level or 0.0]
        return sum(windows) / len(windows)

    def _set(self, concurrency: int, reason: str) -> None:
        if self._allows_at_level:
            self._allowed_before[self.concurrency] = min(self._allows_at_level)
        self._came_down = concurrency < self.concurrency
        self._first_at_level = None
        self._at_level.clear()
        self._allows_at_level.clear()
        self.concurrency = concurrency
        seconds = time.perf_counter() - self._began
        self.history.append(Decision(seconds, concurrency, reason))
        logger.debug("aload: %s='auto': %s", self.knob, reason)


@dataclass(frozen=True)
class TunedStage:
    """One stage's knob in an epoch: its tuner; how a concurrency is put in force (returning
    the epoch's bound on batches in flight); the seconds the stage has been busy so far in
    the epoch, summed over its workers; and whether each worker takes a whole batch (threads:
    its busy seconds a batch are how long a new worker takes to show), not one item (reads
    awaited at once)."""

    tuner: ConcurrencyTuner
    put_in_force: Callable[[int], int]
    busy_seconds: Callable[[], float]
    whole_batches: bool = True
    # The CPU seconds its workers' threads have used, by their own clocks (None: unreadable
    # here, or not threads): the look before a first batch weighs readers by it.
    cpu_seconds: Callable[[], float] | None = None
    # The CPU seconds of the one thread that runs all its reads, aload's loop (None: not
    # such a stage, or its clock is unreadable here): a step asks no more of it than a core.
    loop_seconds: Callable[[], float | None] | None = None


class _Edge(NamedTuple):
    """A window's edge: when, the process's CPU seconds, the idle cores' seconds, the
    consumer's seconds waited, samples and batches delivered, each stage's busy seconds, the
    garbage collector's pauses, and each stage's loop thread's CPU seconds, all so far."""

    at: float
    cpu: float
    idle: float | None
    waited: float
    samples: int
    batches: int
    busy: list[float]
    paused: float
    loops: list[float | None]


class Autotuner:
    """The tuned stages of one epoch (an async dataset's reads and the workers that finish
    its batches; or thread workers' reads), told of each batch the consumer receives.

    It measures a window at a time (a tenth of a second and a few batches, and `READ_TIMES`
    of a batch's busy seconds in a stage whose workers take whole batches). The first window
    begins with the first batch, so that the workers' start is not in it; where that batch
    took a window's time already (slow batches), with the epoch. A fresh search
    of several stages begins with a ramp: while the loop waits nearly all the time, the
    bottleneck doubles, and with it every stage busy enough to hold back twice the
    throughput, all judged as one step; the ramp ends at the first step that gains less
    than half its share (or none: then each stage that moved goes back, and has a ceiling).
    Searched one after the other, each stage's doubling would mostly show what the other
    stage allows, and take a window of its own.

    After the ramp, each window goes to one stage's tuner: the one with a step on trial,
    which judges it, else the bottleneck. Only the bottleneck climbs: the last stage in the
    pipeline that was busy (`SATURATED` of its workers' time: in steady state the stages
    before it wait for room), else the busiest. One stage moves at a time, and a window
    after a step of one stage only judges it, so each step is judged on its own (the window
    after a kept step also drains what queued before the faster stage: too rosy a baseline
    for another stage's step).
    """

    def __init__(self, stages: Sequence[TunedStage]) -> None:
        self._stages = stages
        self._window: _Edge | None = None  # where the window under way began
        # Stages that start their search together ramp up together (not a resumed search).
        self._ramping = len(stages) > 1 and not any(stage.tuner.history for stage in stages)
        self._ramp_trial: tuple[list[int], float, float] | None = None  # levels, samples/s, wait
        self._read_time = 0.0  # a batch's busy seconds in the slowest whole-batch stage, lately
        # The window as it stood when the epoch started (nothing delivered or waited yet).
        self._opened: _Edge | None = None
        # The edge of the last look before the first batch (the epoch's start, before the
        # first), and the readers' CPU seconds then; looks go on while each one steps up.
        self._looked_at: _Edge | None = None
        self._readers_cpu = 0.0
        self._looks_over = False  # a batch came, or a look did not step: windows decide
        self._stepped_from = 0  # readers before the first look's step, until their first batch

    def start(self) -> int:
        """Put each stage's concurrency in force; the epoch's bound on batches in flight."""
        if self._opened is None:  # the epoch starts: a window may begin here (`observe`)
            self._opened = self._looked_at = self._mark(time.perf_counter(), 0.0, 0, 0)
            self._readers_cpu = self._readers_cpu_seconds() or 0.0
        bound = 0
        for stage in self._stages:
            bound = stage.put_in_force(stage.tuner.concurrency)
        return bound

    def observe(self, samples: int, batches: int, wait_seconds: float) -> int | None:
        """The consumer got a batch (`samples`, `batches`, `wait_seconds`: the epoch's
        totals). Returns the epoch's new bound on batches in flight if a stage moved."""
        now = time.perf_counter()
        window = self._window
        self._looks_over = True
        if self._stepped_from and self._opened is not None:
            # The level a step before the first batch left: each of its readers delivered
            # about a batch in the time this first one took.
            per_batch = samples / max(batches, 1)
            rate = per_batch * self._stepped_from / max(now - self._opened.at, 1e-9)
            self._stages[0].tuner.measured_before(rate)
            self._stepped_from = 0
        if window is None:
            opened = self._opened
            if opened is not None and now - opened.at >= WINDOW_SECONDS:
                # A first batch that took a window's time: the first window began with the
                # epoch (waiting for 4 more batches from the first readers would take long).
                window = self._window = opened
            else:  # it begins with the first batch: the workers' start-up is not in it
                self._window = self._mark(now, wait_seconds, samples, batches)
                return None
        wall = now - window.at
        # The window's time without the collector's pauses: one of 100 ms halves a tenth of a
        # second's throughput, at any concurrency (levels are compared as the readers give).
        unpaused = wall - (paused_seconds() - window.paused)
        seconds = RAMP_WINDOW_SECONDS if self._ramping else WINDOW_SECONDS
        seconds = max(seconds, READ_TIMES * self._read_time)
        if unpaused < seconds or batches - window.batches < WINDOW_BATCHES:
            return None
        self._window = mark = self._mark(now, wait_seconds, samples, batches)
        cpu, busy, busy_before = mark.cpu - window.cpu, mark.busy, window.busy
        self._read_time = max(
            (
                (busy[i] - busy_before[i]) / (batches - window.batches)
                for i, stage in enumerate(self._stages)
                if stage.whole_batches
            ),
            default=0.0,
        )
        idle = _idle_cores(window.idle, mark.idle, wall)
        throughput = (samples - window.samples) / unpaused
        # (a wait that began before the window may end in it: at most all of it)
        waiting = min(1.0, (wait_seconds - window.waited) / wall)
        shares = [
            (busy[i] - busy_before[i]) / (stage.tuner.concurrency * wall)
            for i, stage in enumerate(self._stages)
        ]
        if self._ramping:
            return self._ramp(throughput, waiting, cpu / wall, shares)
        bottleneck = self._bottleneck(shares)
        stage = next((stage for stage in self._stages if stage.tuner.trying), bottleneck)
        before = stage.tuner.concurrency
        long_windows = READ_TIMES * self._read_time > WINDOW_SECONDS
        bold = long_windows and stage.whole_batches
        i = self._stages.index(stage)
        began, ended = window.loops[i], mark.loops[i]
        loop = None if began is None or ended is None else (ended - began) / wall
        stage.tuner.decide(throughput, waiting, cpu / wall, stage is bottleneck, idle, bold, loop)
        if stage.tuner.concurrency == before:
            return None
        return stage.put_in_force(stage.tuner.concurrency)

    def look_due(self) -> float | None:
        """When (a `time.perf_counter()`) the epoch should `look` at its readers if no batch
        has come by then; None: no look (a batch came, or a look did not step, or the search
        is not a fresh one of thread readers that each read a whole batch)."""
        looked_at = self._looked_at
        if looked_at is None or self._looks_over or len(self._stages) > 1:
            return None
        stage = self._stages[0]
        if not stage.whole_batches or (stage.tuner.history and not self._stepped_from):
            return None
        return looked_at.at + FIRST_LOOK_SECONDS

    def look(self, wait_seconds: float, finished: int = 0) -> int | None:
        """No batch has come `FIRST_LOOK_SECONDS` into the epoch, or after the last look
        (the consumer waited `wait_seconds` in all, and `finished` batches wait behind the
        first, read in order): readers that wait, and have finished nothing, step up now
        (`step_before_a_batch`), and the next window begins with the step; a tenth of a
        second later, still without a batch, the tuner looks again at the readers it added.
        They are weighed by their threads' own CPU where it can be read: the consumer's start
        of the epoch is in the process's (a tenth of it, where readers wait, and enough to
        stop a step short). Returns the epoch's new bound if they did."""
        looked_at, opened = self._looked_at, self._opened
        if looked_at is None or opened is None or self.look_due() is None:
            return None
        self._looks_over = True
        if finished:
            return None  # one slow batch holds the others back: the first window decides
        (stage,) = self._stages
        now = time.perf_counter()
        mark = self._mark(now, wait_seconds, 0, 0)
        wall = max(now - looked_at.at, 1e-9)
        idle = _idle_cores(looked_at.idle, mark.idle, wall)
        before = stage.tuner.concurrency
        readers_cpu = self._readers_cpu_seconds()
        if readers_cpu is None:
            used = mark.cpu - looked_at.cpu
        else:
            used, self._readers_cpu = readers_cpu - self._readers_cpu, readers_cpu
        cores, waiting = used / wall, min(1.0, (wait_seconds - looked_at.waited) / wall)
        if not stage.tuner.step_before_a_batch(now - opened.at, waiting, cores, idle):
            return None
        self._window = self._looked_at = mark
        self._stepped_from = self._stepped_from or before
        self._looks_over = False
        return stage.put_in_force(stage.tuner.concurrency)

    def _readers_cpu_seconds(self) -> float | None:
        """The CPU seconds the one stage's readers have used, by their threads' own clocks;
        None where they cannot be read (then the process's CPU stands in for theirs)."""
        (stage, *others) = self._stages
        if others or stage.cpu_seconds is None:
            return None
        return stage.cpu_seconds()

    def _ramp(
        self, throughput: float, waiting: float, cores: float, shares: list[float]
    ) -> int | None:
        """A window of the ramp: judge the stages' step together, then step again or end."""
        stages = self._stages
        if self._ramp_trial is not None:
            levels, baseline, waited = self._ramp_trial
            self._ramp_trial = None
            moved = [
                (s, level)
                for s, level in zip(stages, levels, strict=True)
                if s.tuner.concurrency != level
            ]
            if throughput <= baseline * (1 + needed_gain(1.0, waited)):
                self._ramping = False
                for stage, level in moved:
                    stage.tuner.ramp_refused(level, baseline, throughput)
                return self.start()
            for stage, _ in moved:
                stage.tuner.ramp_kept(throughput)
            if throughput < baseline * (1 + HALF_SHARE):
                self._ramping = False  # flattening: each stage's own search from here
                return None
        budget = min(stage.tuner.budget for stage in stages)
        if waiting < RAMP_WAITING or cores >= budget * 0.95:
            self._ramping = False
            return None
        bottleneck = self._bottleneck(shares)
        reason = (
            f"the loop waited {waiting:.0%} of the time at {throughput:,.0f} samples/s, on "
            f"{cores:.1f} of {budget:g} cores, with this stage busy"
        )
        levels = [stage.tuner.concurrency for stage in stages]
        stepped = [
            stage.tuner.ramp_up(f"{reason} {share:.0%} of its time")
            for stage, share in zip(stages, shares, strict=True)
            if stage is bottleneck or share > HEADROOM
        ]
        if not any(stepped):
            self._ramping = False
            return None
        self._ramp_trial = (levels, throughput, waiting)
        return self.start()

    def _mark(self, now: float, waited: float, samples: int, batches: int) -> _Edge:
        """A window's edge `now`, the consumer having `waited` and received `samples` in
        `batches`."""
        cpu, idle, busy = time.process_time(), idle_seconds(), self._busy()
        loops = [stage.loop_seconds() if stage.loop_seconds else None for stage in self._stages]
        return _Edge(now, cpu, idle, waited, samples, batches, busy, paused_seconds(), loops)

    def _busy(self) -> list[float]:
        """Each stage's busy seconds so far (read at a window's edges, not per batch)."""
        return [stage.busy_seconds() for stage in self._stages]

    def _bottleneck(self, shares: list[float]) -> TunedStage:
        """The stage that holds the others back in a window in which each stage's workers
        were busy `shares` of their time."""
        stages = self._stages
        saturated = [i for i, share in enumerate(shares) if share >= SATURATED]
        return stages[
            saturated[-1] if saturated else max(range(len(stages)), key=shares.__getitem__)
        ]
