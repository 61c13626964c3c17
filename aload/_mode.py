"""`worker_mode="auto"`: thread workers, unless their reads are seen holding the GIL.

Workers start as threads: no copy of the dataset, an instant start. While an epoch reads on
threads, it is judged window by window (the first `MIN_SECONDS` long, each next twice as
long, up to `LONGEST_WINDOW`; what is left of it at its end too): in a window in which the
consumer waited for data, the CPU time of the loading (the worker threads' own clocks, and
the helper threads they keep busy: BLAS, OpenMP; the consumer's thread left out) is set
against the window's wall time. Worker threads that kept computing (at least `BUSY` of a
core together) while the loading never used much more than one core (`ONE_CORE`), though at
least two workers could run at once, were taking turns on the GIL: the epoch's remaining
batches go to processes at once where it can move (a map-style dataset without a state of
its own), else the next epoch runs on them. Reads that wait (storage, network) use little
CPU, and work that releases the GIL (numpy, torch, decoders in C) spreads over the cores:
both stay on threads, where processes would only add start-up time and memory. A window in
which the consumer did not wait stays on threads too: data does not hold training back; but
for one worker thread taking turns on the GIL with a consumer that computes (below), which
holds the training step back instead.
Worker threads that hand much of their work to other threads of the process (`TEAMS`: a
BLAS team runs each matrix product on every core), while the consumer computes little, go
to processes too: each worker process runs one BLAS thread (`_intra_op`), so products run
side by side instead of every team fighting for every core, and a wrong guess is caught by
the processes' own judgement below.

Beside a training step, the consumer's thread counts too: one worker thread and the step
compute on one core between them when they take turns on the GIL (a worker process would
run beside the step; the step waits for the GIL whether or not the loop waits for data),
and a step on several intra-op threads keeps its team busy, so where the team and the
workers fit the cores, the workers are judged by their own threads' CPU.

Processes are judged once: those that took over an epoch, over a window of it after their
start (`ProcessesWatch`; a window that finds them slower is confirmed over one twice as long,
as windows a few tenths of a second long on a busy machine can be a fifth off either way),
and those an epoch started with, over the whole of it: if they delivered fewer samples a
second than the threads' last window, the workers go back to threads for good (the rest of the
epoch too, where they took it over); else they stay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ._tuner import cpu_budget, idle_seconds

if TYPE_CHECKING:
    from ._stats import EpochMeter
    from ._tuner import ConcurrencyTuner

logger = logging.getLogger("aload")

# The threads computed for at least this share of one core, together (not more: on a busy
# machine a thread that wants a core gets a share of one; a wrong guess costs one epoch on
# processes, which are judged by their speed).
BUSY = 0.3
# ... one worker thread beside a step that holds the GIL (the two on one core) gets what the
# step leaves it: a step three times as long as the worker's batch leaves it a quarter.
BESIDE_A_STEP_BUSY = 0.15
ONE_CORE = 1.3  # ... and used at most this many cores together: one at a time,
SATURATED = 0.8  # ... and at least this share of what one core, or the idle cores, allowed
WAITING = 0.1  # the consumer waited at least this share of the epoch: data held it back
MIN_SECONDS = 0.1  # a window (or epoch) shorter than this says too little to move on
LONGEST_WINDOW = 5.0  # the windows an epoch on threads is judged in double up to this
SLOWER = 0.05  # processes this much slower than threads: back to threads
# Threads other than the workers' and the consumer's computed at least this share of what the
# worker threads did (and at least BUSY of a core): the workers keep a team busy (the BLAS).
TEAMS = 0.5
PROCESSES_START = 0.25  # seconds processes that took over an epoch get to start (> MIN_SECONDS)
TEAM_LEFT_OUT = " (the loop's intra-op threads left out)"


@dataclass(frozen=True)
class ModeChoice:
    """One epoch's verdict: which workers the next epochs use, and why."""

    epoch: int
    worker_mode: str
    reason: str


@dataclass(frozen=True)
class WorkerModeTuning:
    """What `worker_mode="auto"` chose: the workers in use now ("thread" or "process") and
    its verdicts, oldest first: the first, each that changed the workers, and the final one."""

    worker_mode: str
    history: tuple[ModeChoice, ...]


class ModeChooser:
    """Judges the epochs of `workers` workers; `worker_mode` is the choice in force, and
    `settled` says it is final."""

    def __init__(self, workers: int, budget: float | None = None, asked_for: Any = None) -> None:
        self.workers = workers
        self.asked_for = workers if asked_for is None else asked_for  # num_workers as given
        self.budget = cpu_budget() if budget is None else budget
        self.worker_mode = "thread"
        self.settled = False
        self.history: list[ModeChoice] = []
        self._threads_rate = 0.0  # samples/s of the last epoch judged on threads

    def snapshot(self) -> WorkerModeTuning:
        return WorkerModeTuning(self.worker_mode, tuple(self.history))

    def resume(self, worker_mode: str) -> None:
        """Start with the workers a saved run had chosen, as final."""
        self.settled = True
        if worker_mode != self.worker_mode:
            self._choose(-1, worker_mode, "resumed from a state")

    def judge_threads(
        self,
        epoch: int,
        seconds: float,
        samples: int,
        waited: float,
        workers_cpu: float,
        helpers_cpu: float,
        idle: float = 0.0,
        consumer_cpu: float = 0.0,
        consumer_team: int = 1,
        tuned_readers: int | None = None,
        fewest_readers: int | None = None,
    ) -> None:
        """Epoch `epoch` ran on threads for `seconds` (a window of it), delivering `samples`;
        the consumer waited for data `waited` of it; the worker threads computed
        `workers_cpu` seconds, the consumer's thread `consumer_cpu` and other threads of the
        process `helpers_cpu`; the cores this process may use sat idle `idle` seconds in all.

        One worker thread is judged with the consumer's thread (a training step): the two
        take turns on the GIL when they compute on one core between them, and a worker
        process would run beside the step. A consumer that computes with `consumer_team`
        intra-op threads keeps other threads busy too (its step's team, spinning between
        ops): where the team and the workers fit the cores, the workers are then judged by
        their own threads' CPU alone.

        `tuned_readers`: with `num_workers="auto"`, the threads reading at once, which the
        tuner only adds while each step up pays: more than twice the cores, the reads wait
        (threads taking turns on the GIL gain nothing past one or two), whatever their CPU,
        and processes (one a core) would read fewer at once. `fewest_readers`: the fewest it
        read with during the window (it tries fewer too): a window in which one thread read
        for a while shows cores idle whatever the GIL does."""
        if self.settled or self.worker_mode != "thread" or seconds < MIN_SECONDS:
            return
        self._threads_rate = samples / seconds
        consumer = consumer_cpu / seconds
        # The other threads are its step's team too; where the team and the workers want
        # more cores than there are, shares of a core cannot tell the GIL from the crowd.
        readers = self.workers if tuned_readers is None else tuned_readers
        stepping = consumer >= BUSY and consumer_team > 1 and consumer_team + readers <= self.budget
        workers = workers_cpu / seconds
        loading = workers if stepping else (workers_cpu + helpers_cpu) / seconds
        # The other threads' CPU, where no step of the consumer's can be theirs: the workers'.
        team = 0.0 if stepping or consumer >= BUSY else helpers_cpu / seconds
        fewest = self.workers if fewest_readers is None else min(self.workers, fewest_readers)
        beside_one = fewest == 1 and consumer >= BUSY  # one worker beside the step
        parallel = min(fewest + beside_one, self.budget)
        if beside_one:
            loading += consumer
        busy = BESIDE_A_STEP_BUSY if beside_one else BUSY  # the workers compute from this
        # Threads taking turns on the GIL use one core, or what the machine leaves them of
        # one: less than that, with cores idle, the GIL had room to spare.
        allowed = min(1.0, loading + idle / seconds)
        measured = (
            f"over {seconds:.2f} s, the worker threads computed on {workers:.2f} cores, the "
            f"loading on {loading:.2f} of {self.budget:g}"
            f"{' with the loop' if beside_one else ''}"
            f"{TEAM_LEFT_OUT if stepping else ''}"
            f" ({idle / seconds:.2f} idle), and the "
            f"loop waited {waited:.0%} of it"
        )
        if waited < WAITING and not beside_one:
            self._choose(epoch, "thread", f"{measured}: data does not hold training back")
        elif tuned_readers is not None and tuned_readers > 2 * self.budget:
            why = f"{tuned_readers} threads read at once, each step up having paid: they wait"
            self._choose(epoch, "thread", f"{measured}: {why}")
        elif parallel < 2 and fewest < self.workers:
            why = f"the tuner read with {fewest} thread for a while: idle cores tell nothing"
            self._choose(epoch, "thread", f"{measured}: {why}")
        elif parallel < 2:
            self._choose(epoch, "thread", f"{measured}: no two workers can run at once")
        elif workers < busy or loading < SATURATED * allowed:
            self._choose(epoch, "thread", f"{measured}: the reads wait more than they compute")
        elif team >= max(BUSY, TEAMS * workers):
            why = "the reads keep other threads busy (a BLAS team): processes run one each"
            self._choose(epoch, "process", f"{measured}: {why}")
        elif loading > ONE_CORE:
            self._choose(epoch, "thread", f"{measured}: the reads run in parallel")
        elif waited < WAITING:  # (one worker beside the step: the GIL holds the step back)
            why = "the reads and the loop take turns on the GIL: the step waits for them"
            self._choose(epoch, "process", f"{measured}: {why}")
        else:
            self._choose(epoch, "process", f"{measured}: the reads hold the GIL")

    def judge_processes(self, epoch: int, seconds: float, samples: int) -> None:
        """The processes' first `seconds` (of epoch `epoch`): keep them if they delivered at
        least as fast as the threads did, else go back to threads; either way, for good."""
        if self.settled or self.worker_mode != "process" or seconds <= 0:
            return
        self.settled = True
        rate = samples / seconds
        measured = f"{rate:,.0f} samples/s on processes, {self._threads_rate:,.0f} on threads"
        if self.slower_than_threads(seconds, samples):
            self._choose(epoch, "thread", f"{measured}: back to threads")
        else:
            self._choose(epoch, "process", f"{measured}: staying on processes")

    def slower_than_threads(self, seconds: float, samples: int) -> bool:
        """Whether processes that delivered `samples` in `seconds` were slower than the
        threads' last window."""
        return samples / seconds < self._threads_rate * (1 - SLOWER)

    def cannot_judge(self, why: str) -> None:
        """Nothing here can tell GIL-bound reads: threads, for good."""
        self.settled = True
        self._choose(-1, "thread", why)

    def refused(self, worker_mode: str, why: str) -> None:
        """The chosen workers cannot take the loader's arguments: stay on `worker_mode`."""
        self.settled = True
        self._choose(-1, worker_mode, f"{self.worker_mode} workers cannot run it: {why}")

    def _choose(self, epoch: int, worker_mode: str, reason: str) -> None:
        """Put `worker_mode` in force; the history keeps the first verdict, each change and
        the final one (every verdict is logged)."""
        if not self.history or self.settled or worker_mode != self.worker_mode:
            self.history.append(ModeChoice(epoch, worker_mode, reason))
        self.worker_mode = worker_mode
        logger.debug("aload: worker_mode='auto': epoch %d: %s -> %s", epoch, reason, worker_mode)


class ThreadsWatch:
    """Judges an epoch on thread workers while it runs, window by window, from the CPU time
    the loading takes (`workers_cpu()`: the worker threads' clocks; the process's clock for
    the rest), and what is left of it when it ends. Built, and then asked, on the consumer's
    thread. A verdict for processes calls `move()` once: what it returns (the epoch's
    remaining batches on processes) is the epoch's to put in force. `tuner`: the one
    `num_workers="auto"` sets the threads that read at once with (None: a number was
    given)."""

    def __init__(
        self,
        chooser: ModeChooser,
        epoch: int,
        meter: EpochMeter,
        workers_cpu: Callable[[], float],
        move: Callable[[], Any] | None = None,
        tuner: ConcurrencyTuner | None = None,
    ) -> None:
        self._chooser, self._epoch, self._meter = chooser, epoch, meter
        self._workers_cpu, self._move = workers_cpu, move
        self._tuner = tuner
        self._window = MIN_SECONDS
        self._mark()

    def _mark(self) -> None:
        """Begin a window: where the clocks and counts stand now."""
        self._since = time.perf_counter()
        self._due = self._since + self._window
        self._samples, self._wait = self._meter.samples, self._meter.waited()
        self._workers = self._workers_cpu()
        self._consumer, self._process = time.thread_time(), time.process_time()
        self._team = torch.get_num_threads()  # the consumer's intra-op threads
        self._idle = idle_seconds() or 0.0  # (0 where unreadable: as if none were idle)

    def after_batch(self) -> Any:
        """A batch was delivered: judge the window if it is over; the move to processes
        when the verdict is theirs, else None."""
        if time.perf_counter() < self._due:
            return None
        return self._judge()

    def ended(self) -> None:
        """The epoch ran out: judge what is left of its window, if long enough to say."""
        if time.perf_counter() - self._since >= MIN_SECONDS:
            self._judge(moving=False)

    def _judge(self, moving: bool = True) -> Any:
        chooser = self._chooser
        if chooser.worker_mode != "thread" or chooser.settled:
            self._due = float("inf")  # decided: nothing more to watch
            return None
        seconds = time.perf_counter() - self._since
        workers = self._workers_cpu() - self._workers
        consumer = time.thread_time() - self._consumer
        helpers = max(0.0, time.process_time() - self._process - workers - consumer)
        waited = min(1.0, (self._meter.waited() - self._wait) / seconds) if seconds > 0 else 0.0
        samples = self._meter.samples - self._samples
        idle = max(0.0, (idle_seconds() or 0.0) - self._idle)
        tuner = self._tuner
        chooser.judge_threads(
            self._epoch,
            seconds,
            samples,
            waited,
            workers,
            helpers,
            idle,
            consumer_cpu=consumer,
            consumer_team=self._team,
            tuned_readers=None if tuner is None else tuner.concurrency,
            fewest_readers=None if tuner is None else tuner.fewest_since(self._since),
        )
        if chooser.worker_mode == "thread":
            self._window = min(2 * self._window, LONGEST_WINDOW)
            self._mark()
            return None
        self._due = float("inf")
        return self._move() if moving and self._move is not None else None


class ProcessesWatch:
    """Judges the processes that took over an epoch while it runs: after `PROCESSES_START`
    seconds to start up, over a window as long again, or twice as long where the first half
    found them slower (one short window is too noisy to move back on). A verdict for
    threads calls `move()` once: what it returns (the epoch's remaining batches back on
    threads) is the epoch's to put in force. Asked on the consumer's thread."""

    def __init__(
        self, chooser: ModeChooser, epoch: int, meter: EpochMeter, move: Callable[[], Any]
    ) -> None:
        self._chooser, self._epoch, self._meter, self._move = chooser, epoch, meter, move
        self._since: float | None = None
        self._samples = 0
        self._due = time.perf_counter() + PROCESSES_START
        self._confirming = False  # the window's first half found them slower

    def after_batch(self) -> Any:
        """A batch was delivered: start the window once the processes had their start, judge
        it once it is over; the move back to threads when the verdict is theirs."""
        now = time.perf_counter()
        if now < self._due:
            return None
        if self._since is None:
            self._since, self._samples = now, self._meter.samples
            self._due = now + PROCESSES_START
            return None
        chooser = self._chooser
        seconds, samples = now - self._since, self._meter.samples - self._samples
        if not self._confirming and chooser.slower_than_threads(seconds, samples):
            self._confirming = True
            self._due = now + PROCESSES_START
            return None
        self._due = float("inf")  # judged once
        chooser.judge_processes(self._epoch, seconds, samples)
        return self._move() if chooser.worker_mode == "thread" else None
