"""`num_workers="auto"`: the tuner's decisions on modelled stages whose best concurrency is
known, then on real loaders."""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import os
import random
import threading
import time

import anyio
import anyio.lowlevel
import pytest
import torch
import torch.utils.data as tud
from conftest import Computes, Indexed, compute_for, wait_for_no_workers
from loop_pauses import best_pause

import aload
from aload import _history, _tuner
from aload._tuner import (
    FIRST_LOOK_SECONDS,
    REPROBE_WINDOWS,
    Autotuner,
    ConcurrencyTuner,
    TunedStage,
)


def run(tuner: ConcurrencyTuner, produce, demand: float = 1e9, windows: int = 40, cores=None):
    """Feed `tuner` `windows` windows of a modelled stage: `produce(c)` samples/s at
    concurrency c, a consumer that could take `demand` samples/s, `cores(c)` cores used.
    The concurrency after each window."""
    path = []
    for _ in range(windows):
        c = tuner.concurrency
        throughput = min(produce(c), demand)
        waiting = max(0.0, 1 - produce(c) / demand)
        tuner.decide(throughput, waiting, cores(c) if cores else 0.1)
        path.append(tuner.concurrency)
    return path


def test_a_stage_that_grows_to_8_then_flattens_settles_at_8_or_just_above():
    tuner = ConcurrencyTuner(maximum=32, budget=64)
    path = run(tuner, lambda c: 100.0 * min(c, 8))
    assert 8 <= path[-1] <= 9
    assert max(path) <= 16  # one step past the plateau at most, then back
    assert all(d.reason for d in tuner.history)


def test_a_gil_bound_stage_settles_on_one_thread():
    """Throughput that does not grow with concurrency (the GIL): the first step up is taken
    back, half as many are tried (after a window at 2: the first ran partly at 4), and one
    thread that reads as fast is kept."""
    tuner = ConcurrencyTuner(maximum=32, budget=64, start=2)
    path = run(tuner, lambda c: 500.0 if c == 1 else 480.0)
    assert path[:4] == [4, 2, 2, 1]
    assert path[-1] == 1
    assert max(path) == 4
    assert "staying at 1" in tuner.history[3].reason


def test_a_stage_that_needs_its_two_threads_keeps_them():
    """Two slots: 4 at once does not help, 1 loses half: back to 2, and no more tries down."""
    tuner = ConcurrencyTuner(maximum=32, budget=64, start=2)
    path = run(tuner, lambda c: 100.0 * min(c, 2))
    assert path[:5] == [4, 2, 2, 1, 2]
    assert path[-1] == 2
    assert min(path[5:]) == 2  # fewer are tried once


def test_a_step_up_that_takes_a_good_share_of_what_the_wait_left_is_kept():
    """The consumer waits a third of the time at 2 at once, so data can make it at most 1.5x
    as fast: 4 at once giving 1.24x is most of that, and is kept. Being less than half of a
    doubling's share, halfway back (3) is tried, which loses it: the gains flatten, so the
    next step goes halfway to 8 (6), which adds almost nothing."""
    tuner = ConcurrencyTuner(maximum=32, budget=64, start=2)
    path = run(tuner, lambda c: 2000.0 if c < 4 else 2480.0 + c, demand=3000.0)
    assert path[:4] == [4, 3, 4, 6]
    assert "24% more than 2: trying 3" in tuner.history[1].reason
    assert "back to 4; gains flatten, next steps go halfway to 8" in tuner.history[2].reason
    assert path[-1] == 4
    assert max(path[:REPROBE_WINDOWS]) == 6  # (8 is probed again after that)


def test_window_noise_does_not_carry_the_climb_far_past_a_plateau():
    """A store that serves 64 reads at once, measured in windows a sixth off either way (a
    busy machine's): over the first dozen windows (an epoch of 12,000 such reads), the
    tuner may keep a step to 128 on a lucky window, but does not double on past 256."""
    for seed in range(500):
        noise = random.Random(seed)
        tuner = ConcurrencyTuner(maximum=1024, budget=64, start=32)
        path = []
        for _ in range(12):
            level = 12_800 * min(tuner.concurrency, 64) / 64
            tuner.decide(level * (1 + noise.uniform(-0.15, 0.15)), 0.99, 0.4)
            path.append(tuner.concurrency)
        assert path[-1] >= 48, (seed, path)
        assert max(path) <= 256, (seed, path)


def test_past_the_plateau_a_step_that_gained_little_is_taken_halfway_back():
    """Throughput grows to 20 at once: 16 -> 32 gains only a quarter, so 24 is tried and
    kept (as fast as 32, with fewer threads and batches in flight). It stays there: a step
    to 28 is too small for one window to judge, and only the ceiling's probes go back up."""
    tuner = ConcurrencyTuner(maximum=32, budget=64, start=2)
    path = run(tuner, lambda c: 100.0 * min(c, 20))
    assert path[:4] == [4, 8, 16, 32]
    assert path[4] == 24
    settled = [level for level in path[5:] if level != 32]  # (32: the ceiling probed again)
    assert set(settled) == {24}
    assert path[5:].count(32) <= 40 // REPROBE_WINDOWS


def test_a_step_measured_while_its_reads_start_does_not_stop_the_climb():
    """Reads that take long (a batch of 2 ms reads: 64 ms), so that the window after a step
    sees the new readers' first batches only at its end: it measures the level before, and
    under half of the step. Throughput grows to 32 at once; halfway back from 4 (3) gives
    more than 4 did in its first window, so the climb goes on, rather than staying at 3 as
    at a plateau."""
    tuner = ConcurrencyTuner(maximum=32, budget=64, start=2)
    path, level = [], tuner.concurrency
    for _ in range(12):
        c = tuner.concurrency
        tuner.decide(50.0 * (level + 0.45 * (c - level)), 1.0, 0.1)  # the consumer waits
        level = c
        path.append(tuner.concurrency)
    assert path[:3] == [4, 3, 4]
    assert "climbing on" in tuner.history[2].reason
    assert path[-1] == 32


def test_a_gil_bound_stage_beside_a_training_step_still_settles_low():
    """The consumer waits half the time, and more threads read no faster: not kept."""
    tuner = ConcurrencyTuner(maximum=32, budget=64, start=2)
    path = run(tuner, lambda c: 500.0 if c == 1 else 480.0, demand=1000.0)
    assert path[-1] == 1
    assert max(path) == 4


def test_it_holds_while_training_is_the_bottleneck():
    """The consumer never waits: more reads would only queue batches."""
    tuner = ConcurrencyTuner(maximum=32, budget=64)
    path = run(tuner, lambda c: 100.0 * c, demand=150.0)
    assert path[-1] == 2
    assert list(tuner.history) == []


def test_it_never_passes_its_cpu_budget():
    """Each concurrent read keeps half a core busy; a budget of 2 cores stops it at 4."""
    tuner = ConcurrencyTuner(maximum=32, budget=2)
    path = run(tuner, lambda c: 100.0 * c, cores=lambda c: 0.5 * c)
    assert max(path) <= 4
    assert path[-1] == 4


def test_no_step_is_tried_that_the_idle_cores_could_not_pay_for():
    """Two readers keep 1.8 of 2 cores busy: a doubling could gain at most 11%, less than the
    15% it must show, so it is not tried (a trial would only cost time and memory)."""
    tuner = ConcurrencyTuner(maximum=32, budget=2, start=2)
    path = run(tuner, lambda c: 1000.0 * min(c, 2), cores=lambda c: 0.9 * min(c, 2))
    assert set(path) == {2}
    assert list(tuner.history) == []


def test_on_a_busy_machine_the_cores_left_idle_bound_a_step():
    """Two readers use one of 2 cores, but other processes take the other: a doubling could
    gain 5% at most, so it is not tried; on an idle machine it is."""
    busy = ConcurrencyTuner(maximum=32, budget=2, start=2)
    for _ in range(5):
        busy.decide(1000.0, 1.0, 1.0, idle=0.05)
    assert (busy.concurrency, list(busy.history)) == (2, [])
    idle = ConcurrencyTuner(maximum=32, budget=2, start=2)
    idle.decide(1000.0, 1.0, 1.0, idle=1.0)
    assert idle.concurrency == 4


def test_on_a_busy_machine_readers_that_wait_still_step_up():
    """Two readers that wait on storage use a hundredth of a core, on a machine whose cores
    other processes keep busy: a doubling needs another hundredth, which the machine's
    scheduler still gives, so it is tried (with idle cores alone as the bound, the tuner
    stayed at 2 on a busy machine, however long the reads waited)."""
    tuner = ConcurrencyTuner(maximum=32, budget=2, start=2)
    tuner.decide(1000.0, 1.0, 0.01, idle=0.0)
    assert tuner.concurrency == 4


def test_a_step_is_judged_against_the_levels_mean_not_one_slow_window():
    """Windows of a few batches are noisy: a step up tried after a slow window, that reads
    no faster than the level did on average, is taken back."""
    tuner = ConcurrencyTuner(maximum=32, budget=64, start=2)
    for _ in range(3):
        tuner.decide(4000.0, 0.0, 0.1)  # training holds the loop: no step
    tuner.decide(3000.0, 1.0, 0.1)  # a slow window in which the loop waited: try 4
    assert tuner.concurrency == 4
    tuner.decide(3700.0, 1.0, 0.1)  # +23% on the slow window, -8% on the level's mean
    assert tuner.concurrency == 2
    assert "not more than 2 (3,667)" in tuner.history[-1].reason


def test_one_slow_window_is_not_a_change_of_the_datas_cost():
    """Settled where throughput flattens, one window at half speed leaves the search as it
    was; two in a row mean the cost changed, and it climbs again."""
    tuner = ConcurrencyTuner(maximum=32, budget=64)
    run(tuner, lambda c: 1000.0 * min(c, 4), windows=12)
    settled, decisions = tuner.concurrency, len(tuner.history)
    tuner.decide(2000.0, 1.0, 0.1)  # one slow window
    tuner.decide(4000.0, 1.0, 0.1)
    assert (tuner.concurrency, len(tuner.history)) == (settled, decisions)
    tuner.decide(2000.0, 1.0, 0.1)
    tuner.decide(2000.0, 1.0, 0.1)  # two: the ceiling is forgotten, and a doubling tried
    assert tuner.concurrency == 2 * settled


def test_after_a_shift_a_step_toward_the_old_ceiling_does_not_settle_it_there():
    """Reads that got 10x slower while steps toward a ceiling were still being tried: the
    slow windows first confirm the change, then the climb goes past the old ceiling (a
    small step kept on the slow level had made that level the settled one, and the old
    ceiling held for 16 windows)."""
    tuner = ConcurrencyTuner(maximum=512, budget=64, start=2)
    run(tuner, lambda c: 1000.0 * min(c, 16), windows=8)  # ceiling above 16, a step to try
    path = run(tuner, lambda c: 100.0 * min(c, 160), windows=12)
    assert max(path) >= 64


def test_readers_that_take_every_core_from_the_start_are_halved_once():
    """Each read runs the BLAS on both cores: two readers take each other's cores, and one
    reads faster. Kept; and readers that do need both cores get them back."""
    tuner = ConcurrencyTuner(maximum=32, budget=2, start=2)
    path = run(tuner, lambda c: 4500.0 if c == 1 else 3300.0, cores=lambda c: 2.0)
    assert path[0] == 1
    assert "trying fewer" in tuner.history[0].reason
    assert path[-1] == 1
    both = ConcurrencyTuner(maximum=32, budget=2, start=2)
    path = run(both, lambda c: 500.0 * min(c, 2), cores=lambda c: float(min(c, 2)))
    assert path[:2] == [1, 2]
    assert path[-1] == 2


def test_when_the_datas_cost_shifts_it_moves():
    """Reads that got 10x slower (a cache gone cold, another store) but overlap 10x further:
    throughput falls, the ceiling found before is forgotten, and it climbs again."""
    tuner = ConcurrencyTuner(maximum=32, budget=64)
    fast = run(tuner, lambda c: 1000.0 * min(c, 4))
    assert 4 <= fast[-1] <= 5
    slow = run(tuner, lambda c: 100.0 * min(c, 20), windows=60)
    assert 20 <= slow[-1] <= 25  # on the plateau, not far past its start


def test_reads_that_got_ten_times_slower_get_ten_times_as_many_at_once_in_one_step():
    """A store that serves 8,000 reads a second: 1 ms reads settle at 8 at once. Once they
    take 10 ms, 8 at once give 800 a second, and 80 would give 8,000 again (Little's law):
    after the two windows that confirm the shift, one step goes there, not a doubling a
    window (8 -> 16 -> 32 -> 64 -> 128 took four windows at a fraction of the rate)."""
    tuner = ConcurrencyTuner(maximum=1024, budget=64, start=2)
    fast = run(tuner, lambda c: min(c / 0.001, 8000.0), windows=20)
    assert fast[-1] == 8
    slow = run(tuner, lambda c: min(c / 0.010, 8000.0), windows=12)
    assert slow[:2] == [8, 80]
    restore = next(d for d in tuner.history if d.concurrency == 80)
    assert "down from 8,000, the reads got slower: trying 80" in restore.reason
    assert 80 <= slow[-1] <= 90  # probes past it by halves, and stays


def test_a_pause_is_not_taken_for_reads_that_got_slower():
    """Two slow windows that are not alike (a pause that began halfway through one window
    and filled the next) are no reason to multiply the reads at once by twenty: the step
    goes from the faster of the two, a doubling."""
    tuner = ConcurrencyTuner(maximum=1024, budget=64, start=2)
    run(tuner, lambda c: min(c / 0.001, 8000.0), windows=20)
    assert tuner.concurrency == 8
    tuner.decide(4000.0, 1.0, 0.1)  # half of it in the pause
    tuner.decide(400.0, 1.0, 0.1)  # the pause
    assert tuner.concurrency == 16


def test_after_a_shift_the_first_step_tries_as_many_as_its_gain_needs():
    """Reads that got 10x slower but whose store now serves 20 at once: the step that
    would restore the old throughput (4 -> 32) gains 5x, so 20 are tried, and kept."""
    tuner = ConcurrencyTuner(maximum=32, budget=64)
    run(tuner, lambda c: 1000.0 * min(c, 4))
    slow = run(tuner, lambda c: 100.0 * min(c, 20), windows=8)
    assert slow[:4] == [4, 32, 20, 20]
    fewer = next(d for d in tuner.history if d.concurrency == 20)
    assert "32 at once gave 2,000 samples/s, 5.0x 4 (400): trying 20" in fewer.reason


def test_a_ceiling_is_probed_again_after_a_while():
    tuner = ConcurrencyTuner(maximum=32, budget=64)
    run(tuner, lambda c: 100.0 * min(c, 8))
    settled = tuner.concurrency
    path = run(tuner, lambda c: 100.0 * min(c, 16), windows=REPROBE_WINDOWS + 30)
    assert path[-1] > settled  # the stage now scales further: found by the probe


def test_a_stage_with_a_step_down_to_try_leaves_the_windows_to_the_bottleneck(monkeypatch):
    """Its first step up did not help; while another stage holds it back, that stage climbs."""
    monkeypatch.setattr(_tuner, "WINDOW_SECONDS", 0.0)
    monkeypatch.setattr(_tuner, "WINDOW_BATCHES", 1)
    reads = ConcurrencyTuner(maximum=64, budget=64, start=8)
    finishers = ConcurrencyTuner(maximum=8, budget=64, start=2)
    finishers.decide(100.0, 1.0, 0.1)  # 2 -> 4
    finishers.decide(100.0, 1.0, 0.1)  # no gain: back to 2, fewer to try
    assert finishers.concurrency == 2
    busy = {"reads": 0.0}  # the reads are saturated, the finishers idle
    tuning = Autotuner(
        [
            TunedStage(reads, lambda c: c, lambda: busy["reads"]),
            TunedStage(finishers, lambda c: c, lambda: 0.0),
        ]
    )
    samples = 0
    for window in range(6):
        busy["reads"] += 1e6
        samples += 100 * reads.concurrency  # the reads hold throughput back
        tuning.observe(samples=samples, batches=10 * window, wait_seconds=1e6 * window)
        time.sleep(0.01)
    assert reads.concurrency > 8
    assert finishers.concurrency == 2


class Clock:
    """A model's time for the tuner: wall seconds set by the model, no CPU used."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def process_time(self) -> float:
        return 0.0


def run_pipeline(
    monkeypatch,
    starts,
    capacities,
    limit=float("inf"),
    windows=30,
    pauses=(),
    pause=0.1,
    loop_cost=None,
):
    """One or more modelled stages in a row, tuned together from `starts`: stage i at
    concurrency c serves `capacities[i](c)` samples/s, the pipeline the least of them (and of
    `limit`, the cores), and the loop waits all the time; in the windows numbered in
    `pauses`, a collection stops the process for `pause` seconds besides; with `loop_cost`,
    each sample costs aload's loop thread that many CPU seconds (its clock is the first
    stage's). The concurrencies after each window."""
    clock = Clock()
    paused, loop = [0.0], [0.0]
    monkeypatch.setattr(_tuner, "time", clock)
    monkeypatch.setattr(_tuner, "idle_seconds", lambda: None)  # the model's cores only
    monkeypatch.setattr(_tuner, "paused_seconds", lambda: paused[0])
    tuners = [ConcurrencyTuner(maximum=1024, budget=64, start=start) for start in starts]
    busy = [0.0] * len(tuners)
    # The first stage is an async dataset's reads, awaited at once (no worker takes a whole
    # batch); the others are threads that finish batches, as the loader builds them.
    stages = [
        TunedStage(tuner, lambda c: c, lambda i=i: busy[i], whole_batches=i > 0)
        for i, tuner in enumerate(tuners)
    ]
    if loop_cost is not None:
        stages[0] = dataclasses.replace(stages[0], loop_seconds=lambda: loop[0])
    tuning = Autotuner(stages)
    samples = batches = 0.0
    tuning.observe(0, 0, 0.0)  # the first batch opens the first window
    path = []
    for window in range(windows):
        levels = [tuner.concurrency for tuner in tuners]
        served = [capacity(c) for capacity, c in zip(capacities, levels, strict=True)]
        throughput = min(limit, *served)
        if window in pauses:  # nothing is read while the collector runs
            clock.now += pause
            paused[0] += pause
        clock.now += _tuner.WINDOW_SECONDS
        for i, rate in enumerate(served):  # busy this share of its workers' time
            busy[i] += throughput / rate * levels[i] * _tuner.WINDOW_SECONDS
        samples += throughput * _tuner.WINDOW_SECONDS
        loop[0] += throughput * _tuner.WINDOW_SECONDS * (loop_cost or 0.0)
        batches += 100
        tuning.observe(int(samples), int(batches), wait_seconds=clock.now)
        path.append(tuple(tuner.concurrency for tuner in tuners))
    return path, tuners


def test_the_collectors_pauses_do_not_move_the_tuner(monkeypatch):
    """Awaited reads whose throughput grows to 320 at once and flattens, on a loop that a
    full collection of Python's heap stops for 100 ms now and then (every second or so
    where hundreds of reads are in flight and torch is imported: a tenth of a second's
    window then reads half). With those pauses taken out of its windows, the tuner moves as
    it does without them. Counted in, a pause in the window that judged the step to 256
    stopped the climb at 192, and one in each of two windows in a row read as reads that
    got slower."""

    def reads(c):
        return 150.0 * min(c, 320)

    calm, _ = run_pipeline(monkeypatch, (32,), (reads,), windows=40)
    paused, (tuner,) = run_pipeline(
        monkeypatch, (32,), (reads,), windows=40, pauses={4, 17, 18, 30}
    )
    assert paused == calm
    assert calm[-1][0] >= 320
    assert not [d for d in tuner.history if "got slower" in d.reason]


def test_awaited_reads_are_not_stepped_past_what_the_loop_thread_can_run(monkeypatch):
    """Awaited reads of 3.3 ms, each costing aload's loop thread 10 us: 300 at once keep it
    busy 90% of a core, and more cannot read faster (`limit`). The climb finds the plateau,
    then probes the ceiling again every `REPROBE_WINDOWS` windows; a doubling that the
    loop's last tenth of a core could not give its 15% is not tried, so reads in flight
    never pass 512 (the first doubling past 256, when the loop still had a quarter of a core
    to spare). Weighed by the process's cores alone (the model's use none), the probes
    doubled the plateau's level: 768 reads in flight at once, each holding memory, for a
    window that read no faster."""

    def reads(c):
        return 300.0 * c

    path, _ = run_pipeline(monkeypatch, (32,), (reads,), limit=90_000.0, windows=60, loop_cost=1e-5)
    levels = [c for (c,) in path]
    assert max(levels) <= 512
    assert levels[-1] >= 300  # on the plateau: 256 read 77,000 a second


def test_the_collectors_pauses_are_counted_as_python_makes_them():
    """The seconds the tuner takes out of its windows are the collections' own: a full
    collection of a heap of a million objects adds about its time."""
    from aload._collector_pauses import paused_seconds

    paused_seconds()  # counting starts
    heap = [[i] for i in range(1_000_000)]
    before, started = paused_seconds(), time.perf_counter()
    gc.collect()
    took = time.perf_counter() - started
    counted = paused_seconds() - before
    assert took / 2 <= counted <= took
    del heap


def slow_batches(
    monkeypatch,
    slots=None,
    seconds=20.0,
    core_share=0.01,
    epoch_start_cores=0.0,
    readers_clock=False,
):
    """Thread readers that take 0.5 s a batch (256 items of 2 ms each), 64 at most, each
    using `core_share` of one of 2 cores (or `core_share(readers)`); `slots`: a store that
    serves that many reads at once (the others queue). The consumer, starting the epoch,
    uses `epoch_start_cores` for its first tenth of a second; `readers_clock`: the readers'
    threads' own CPU can be read (else only the process's). While no batch has come, the
    tuner looks when it asks to, as the epoch has it look. The tuner, its concurrency at
    each of its decisions, and when."""
    clock = Clock()
    cpu = [0.0]
    readers_cpu = [0.0]
    clock.process_time = lambda: cpu[0]
    monkeypatch.setattr(_tuner, "time", clock)
    monkeypatch.setattr(_tuner, "idle_seconds", lambda: None)
    tuner = ConcurrencyTuner(maximum=64, budget=2, start=2)
    busy = 0.0
    own_clock = (lambda: readers_cpu[0]) if readers_clock else None
    tuning = Autotuner([TunedStage(tuner, lambda c: c, lambda: busy, True, own_clock)])
    due: dict[int, float] = {}  # each reading thread: when its batch is done
    batches, tick = 0, 0.01
    tuning.start()  # the epoch starts; the consumer waits for its first batch
    while clock.now < seconds:
        threads = tuner.concurrency
        read_time = 0.5 * max(1.0, threads / (slots or threads))
        for thread in range(threads):
            due.setdefault(thread, clock.now + read_time)
        for thread in [t for t in due if t >= threads]:
            del due[thread]  # taken back: its batch goes to another
        delivered = batches
        for thread, when in due.items():
            if when <= clock.now:
                batches += 1
                due[thread] = when + read_time
        busy += threads * tick
        share = core_share(threads) if callable(core_share) else core_share
        readers_cpu[0] += share * threads * tick
        cpu[0] += share * threads * tick + (epoch_start_cores * tick if clock.now < 0.1 else 0)
        clock.now += tick
        look_at = tuning.look_due()
        if not batches and look_at is not None and clock.now >= look_at:
            tuning.look(wait_seconds=clock.now)
        if batches > delivered:  # the consumer got a batch (or more)
            tuning.observe(samples=256 * batches, batches=batches, wait_seconds=clock.now)
    return tuner


def test_a_step_is_judged_once_the_threads_it_added_could_deliver_a_batch(monkeypatch):
    """Slow batches: threads added by a step deliver their first batch 0.5 s after it.
    Judged in a tenth of a second, every step up showed nothing and was taken back (the
    tuner stayed at 4, a tenth of the speed of 64). Judged over two read times, each step
    shows; a step that long goes as far as the idle cores allow (2 threads used 2% of the
    cores: 64 at once), and is judged on the window after the one its threads started in.
    Readers that wait take it before their first batch, at the look 0.1 s in (it came with
    the fourth batch, at 1 s, before; 4 batches after the first, 1.5 s, before that); the
    level they left is measured by its first batch, and the step is kept."""
    tuner = slow_batches(monkeypatch)
    assert tuner.concurrency == 64
    assert [d.concurrency for d in tuner.history] == [64]
    assert tuner.history[0].seconds <= FIRST_LOOK_SECONDS + 0.05
    assert "no batch yet" in tuner.history[0].reason


def test_the_look_before_a_batch_weighs_the_readers_by_their_own_clocks(monkeypatch):
    """2 readers of slow batches, each using 3% of a core (2 ms reads, cold at so low a
    rate), while the consumer spends 2% of a core starting the epoch (the run of
    `python -m aload.bench --workloads auto-batches` it models: 0.07 of 2 cores for the
    process, 0.06 for the readers). Weighed by the process's CPU, the look's step
    stopped at about 50 readers: 118 batches then take three rounds of half a second, not
    two.
    By the readers' own clocks, the step is to as many as the cores allow, 64."""
    by_process = slow_batches(monkeypatch, seconds=0.15, core_share=0.03, epoch_start_cores=0.02)
    (step,) = by_process.history
    assert step.concurrency < 59  # (about 50): 118 batches take three rounds, not two
    by_readers = slow_batches(
        monkeypatch, seconds=0.15, core_share=0.03, epoch_start_cores=0.02, readers_clock=True
    )
    assert [d.concurrency for d in by_readers.history] == [64]
    assert "used 0.06 of 2 cores" in by_readers.history[0].reason


def test_a_second_look_before_a_batch_weighs_the_readers_the_first_added(monkeypatch):
    """Waiting readers use less CPU each the more of them run (2 ms sleeps, measured by
    their threads' clocks: 3.1% of a core each at 2 readers, 1.2% at 64), so the look's
    estimate from 2 readers (two of them at 0.07 of a core: 57 would take the other 1.93
    cores) stopped the step short of 64 in the bench's runs, and 118 batches took three
    rounds of half a second, not two. Still without a batch a tenth of a second after the
    step, the tuner looks again at the readers it added, and steps to 64; the level the
    first step left is the one their first batch judges, and the steps are kept."""

    def cheaper_when_many(readers):
        return 0.035 * (2 / readers) ** 0.27

    monkeypatch.setattr(_tuner, "idle_seconds", lambda: None)
    tuner = slow_batches(monkeypatch, seconds=1.5, core_share=cheaper_when_many)
    levels = [d.concurrency for d in tuner.history]
    assert levels[0] < 59
    assert levels[1:] == [64]
    assert "no batch yet after 0.2" in tuner.history[1].reason
    assert tuner.history[1].seconds < 0.5  # before the first batch


def test_readers_that_use_their_cores_are_not_stepped_up_before_a_batch(monkeypatch):
    """Slow batches of CPU work (each reader uses half a core): no step at the look (more
    readers would take cores, not overlap waits); the first window, from the epoch's start
    to the fourth batch, decides as before."""
    tuner = slow_batches(monkeypatch, seconds=1.2, core_share=0.5)
    assert tuner.history
    assert tuner.history[0].seconds >= 1.0
    assert "no batch yet" not in tuner.history[0].reason


def test_a_long_step_that_gained_less_than_its_share_tries_as_many_as_gave_the_gain(
    monkeypatch,
):
    """Slow batches from a store that serves 8 reads at once: 2 -> 64 gives 4x, far less
    than 32 times as many readers should, so as many as gave that gain, 8, are tried: as
    fast, and kept: a probe above them is taken back to them."""
    tuner = slow_batches(monkeypatch, slots=8, seconds=35)
    levels = [d.concurrency for d in tuner.history]
    assert levels == [64, 8, 36, 8]
    assert "x 2 (1,0" in tuner.history[1].reason  # 64 gave about 4x 2 (1,014 samples/s)
    assert "not more than 8" in tuner.history[3].reason


def test_two_stages_that_hold_each_other_back_ramp_up_together(monkeypatch):
    """Reads from a store of 64 slots (5 ms each: 200/s a read at once) and a 1 ms call per
    sample on threads (1,000/s a thread), on cores that serve 10,000/s. Searched one after
    the other, each stage's doubling mostly shows what the other allows; stepped together
    (each stage busy enough to hold back a doubled throughput), the pipeline reaches the
    cores' limit in three windows. The reads, idle enough at first, wait for the threads."""
    reads, finishers = (lambda c: 200.0 * min(c, 64)), (lambda c: 1000.0 * c)
    path, _ = run_pipeline(monkeypatch, (32, 2), (reads, finishers), limit=10_000.0)
    assert path[:3] == [(32, 4), (64, 8), (128, 16)]
    assert all(min(10_000.0, reads(r), finishers(f)) == 10_000.0 for r, f in path[2:])
    assert max(r for r, _ in path) <= 256
    assert max(f for _, f in path) <= 32


def test_a_ramp_step_that_does_not_help_is_taken_back(monkeypatch):
    """Finishing work that holds the GIL: 500 samples/s however many threads, reads to spare.
    The threads' doubling gains nothing: back to 2 with 4 as a ceiling, then one thread, as
    fast, is kept; the reads never move."""
    reads, finishers = (lambda c: 200.0 * c), (lambda c: 500.0)
    path, (read_tuner, finish_tuner) = run_pipeline(monkeypatch, (32, 2), (reads, finishers))
    assert path[:2] == [(32, 4), (32, 2)]
    assert path.index((32, 1)) <= 5  # (after the windows that ran partly at 4)
    assert path[-1] == (32, 1)
    assert max(f for _, f in path) == 4
    assert list(read_tuner.history) == []
    assert "with the other stages stepped up" in finish_tuner.history[1].reason


class Limited(torch.utils.data.Dataset):
    """Each read holds one of 8 slots for 4 ms (a store that serves 8 requests at once):
    throughput grows with concurrency up to 8, then flattens."""

    def __init__(self, n: int = 1600) -> None:
        self.n = n
        self.slots = threading.Semaphore(8)

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        with self.slots:
            time.sleep(0.004)
        return index


@pytest.mark.timeout(120)
def test_auto_finds_the_stores_limit_and_delivers_every_sample_once():
    """Its throughput against static settings is the bench's to show (`python -m aload.bench
    --workloads auto`); here: the search finds the store's 8 and loses nothing."""
    loader = aload.DataLoader(Limited(), batch_size=4, num_workers="auto")
    samples = sorted(int(i) for batch in loader for i in batch)
    assert samples == list(range(1600))
    tuning = loader.stats.tuning
    # 8, or somewhat more: with more threads than slots, a waiting thread takes a freed slot
    # at once (up to ~15% more reads); a trial of 24 may be open when the epoch ends.
    assert 6 <= tuning.concurrency <= 24
    assert tuning.history[0].concurrency == 4  # from 2, while the loop waits
    assert "waited" in tuning.history[0].reason


def sequential_batches(n: int, size: int) -> list[list[int]]:
    """The batches torch's default sampler gives a map-style dataset of `n`, unshuffled."""
    return [list(b) for b in tud.BatchSampler(tud.SequentialSampler(range(n)), size, False)]


def test_readers_of_slow_batches_step_up_before_their_first_batch():
    """2 readers take a quarter of a second for a batch: the tuner looks before one comes,
    steps up then, and the epoch delivers torch's batches, each once, in order."""
    loader = aload.DataLoader(Indexed(3072, 0.002), batch_size=128, num_workers="auto")
    started = time.perf_counter()
    epoch = iter(loader)
    batches = [next(epoch).tolist()]
    first_batch = time.perf_counter() - started
    batches += [batch.tolist() for batch in epoch]
    assert batches == sequential_batches(3072, 128)
    first = loader.stats.tuning.history[0]
    assert "no batch yet" in first.reason
    assert first.seconds < first_batch
    assert first.concurrency >= 8


class SlowToDraw:
    """torch's batches of a dataset of `n`, each costing the consumer `seconds` of Python to
    draw (a sampler that weighs its indices): CPU of the process, none of the readers'."""

    def __init__(self, n: int, size: int, seconds: float) -> None:
        self.batches = sequential_batches(n, size)
        self.seconds = seconds

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            compute_for(self.seconds)
            yield batch


def test_the_look_before_a_batch_leaves_the_consumers_cpu_out_of_the_readers():
    """The consumer draws its first batches (4 of them, 30 ms of Python each) while 2
    readers wait on 2 ms reads: in the process's CPU, the readers looked as if they used
    at least a quarter of a core each, as readers that compute, and were not stepped up before
    their first batch (the first window then took them to 12). By their own clocks they
    use a few hundredths of one, and step up at the look, as far as the cores the consumer
    leaves idle allow (60 to 64 here; 9 to 22 beside a process that keeps a core busy); the
    epoch gives torch's batches."""
    sampler = SlowToDraw(3072, 128, 0.03)
    loader = aload.DataLoader(Indexed(3072, 0.002), batch_sampler=sampler, num_workers="auto")
    batches = [batch.tolist() for batch in loader]
    expected = tud.DataLoader(Indexed(3072), batch_sampler=sampler)
    assert batches == [batch.tolist() for batch in expected]
    first = loader.stats.tuning.history[0]
    assert "no batch yet" in first.reason
    assert first.concurrency > 2


def test_the_look_before_the_first_batch_keeps_the_timeout():
    """A timeout shorter than a batch's read: the look at 0.1 s steps up, and the wait goes
    on to the timeout, which is raised as without the look (torch's error type)."""
    slow = Indexed(3072, 0.002)  # 2 ms reads, a quarter of a second a batch of 128
    loader = aload.DataLoader(slow, batch_size=128, num_workers="auto", timeout=0.15)
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"timed out after 0\.15 seconds"):
        next(iter(loader))
    assert 0.15 <= time.perf_counter() - started < 0.25
    assert "no batch yet" in loader.stats.tuning.history[0].reason


class OneSlowRead(tud.Dataset):
    """Fast reads (0.2 ms), but the first waits 0.3 s: one slow batch, not slow batches."""

    def __len__(self):
        return 800

    def __getitem__(self, index):
        time.sleep(0.3 if index == 0 else 0.0002)
        return index


def test_one_slow_first_batch_is_not_taken_for_slow_readers():
    """The batches after the first are finished, held back behind it (in order): the look
    takes no step, and the first window decides."""
    loader = aload.DataLoader(OneSlowRead(), batch_size=8, num_workers="auto")
    assert [batch.tolist() for batch in loader] == sequential_batches(800, 8)
    assert not any("no batch yet" in d.reason for d in loader.stats.tuning.history)


@pytest.mark.anyio
async def test_the_look_before_the_first_batch_keeps_the_callers_loop_running(anyio_backend):
    async def epoch():
        loader = aload.DataLoader(Indexed(3072, 0.002), batch_size=128, num_workers="auto")
        batches = [batch.tolist() async for batch in loader]
        assert batches == sequential_batches(3072, 128)
        assert "no batch yet" in loader.stats.tuning.history[0].reason

    assert await pause_while(epoch) < 0.05


async def pause_while(run) -> float:
    """The caller's loop's longest pause while `await run()` runs, the best of three tries:
    a collection of this process's heap (garbage from other tests, freed on whichever
    thread allocates) holds the GIL for up to ~100 ms now and then, whatever aload does.
    And the caller's thread waits for the GIL behind aload's loop, busy with thousands of
    reads a second: 4-33 ms alone on an idle 2-core machine, 58 ms twice in the suite."""
    gc.collect()
    return await best_pause(run, 0.05, tries=3)


@pytest.mark.anyio
async def test_auto_under_async_for_keeps_the_loop_running(anyio_backend):
    async def epoch():
        loader = aload.DataLoader(Limited(800), batch_size=4, num_workers="auto")
        samples = sorted(int(i) for batch in [b async for b in loader] for i in batch)
        assert samples == list(range(800))
        assert loader.stats.tuning.concurrency > 2

    assert await pause_while(epoch) < 0.05


class AsyncStore:
    """An async dataset whose store serves 64 reads at once, 5 ms each."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.slots = None  # made on aload's loop, where the reads run

    def __len__(self):
        return self.n

    async def __getitem__(self, index):
        if self.slots is None:
            self.slots = anyio.Semaphore(64)
        async with self.slots:
            await anyio.sleep(0.005)
        return index


@pytest.mark.anyio
async def test_max_concurrency_auto_finds_an_async_stores_limit(anyio_backend):
    async def epoch():
        loader = aload.DataLoader(AsyncStore(12_000), batch_size=16, max_concurrency="auto")
        batches = [b async for b in loader]
        assert sorted(int(i) for batch in batches for i in batch) == list(range(12_000))
        tuning = loader.stats.tuning
        # Past the store's 64 slots more reads only wait, so a step to 128 may be kept on
        # noise, and a probe above it (144, 192) may be on trial when the epoch ends; the
        # tuner must not run away towards its maximum of 1,024.
        assert 48 <= tuning.concurrency <= 256
        assert tuning.history[0].concurrency == 64  # from 32, while the loop waits
        assert loader.stats.epoch.read_concurrency == tuning.concurrency

    assert await pause_while(epoch) < 0.05


class CountsReads:
    """An async dataset that records how many of its reads are in flight as each starts."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.in_flight = 0
        self.starts: list[tuple[float, int]] = []

    def __len__(self):
        return self.n

    async def __getitem__(self, index):
        self.in_flight += 1
        self.starts.append((time.perf_counter(), self.in_flight))
        await anyio.sleep(0.002)
        self.in_flight -= 1
        return index


def test_fewer_reads_at_once_retire_fetchers_without_dropping_a_read():
    """The tuner asks for 32 reads at once, then 4: every sample still arrives once, and
    once the busy fetchers have finished their reads, no more than 4 run."""
    data = CountsReads(3000)
    loader = aload.DataLoader(data, batch_size=8, max_concurrency="auto")
    tuner = loader._engine._tuner
    switched: list[float] = []

    def decide(*measures):  # 32 at once, then 4
        if not switched:
            switched.append(time.perf_counter())
            tuner.concurrency = 4

    tuner.decide = decide
    assert sorted(int(i) for batch in loader for i in batch) == list(range(3000))
    before = [n for at, n in data.starts if at < switched[0]]
    after = [n for at, n in data.starts if at > switched[0] + 0.05]
    assert max(before) > 16
    assert after
    assert max(after) <= 4


def test_auto_process_workers_are_one_per_core_and_give_torchs_batches():
    cores = len(os.sched_getaffinity(0))
    kwargs = {"batch_size": 8, "shuffle": True}
    loader = aload.DataLoader(
        Computes(400, 0.0003),
        num_workers="auto",
        worker_mode="process",
        generator=torch.Generator().manual_seed(1),
        **kwargs,
    )
    assert loader.num_workers == cores
    expected = tud.DataLoader(
        Computes(400, 0.0003),
        num_workers=cores,
        generator=torch.Generator().manual_seed(1),
        **kwargs,
    )
    for _ in range(2):
        assert [b.tolist() for b in loader] == [b.tolist() for b in expected]
    # One process per core, torch's read-ahead: fewer in flight would save no time.
    assert loader.stats.tuning is None


def test_auto_is_refused_where_it_cannot_tune_yet():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(4))

    with pytest.raises(ValueError, match=r"num_workers='auto'.*map-style"):
        aload.DataLoader(Stream(), num_workers="auto")
    with pytest.raises(ValueError, match=r"num_workers='auto'.*worker_mode='ray'"):
        aload.DataLoader(list(range(4)), num_workers="auto", worker_mode="ray")
    with pytest.raises(TypeError):  # torch's type for the same value
        tud.DataLoader(list(range(4)), num_workers="many")
    with pytest.raises(TypeError, match="num_workers must be an int or 'auto'"):
        aload.DataLoader(list(range(4)), num_workers="many")
    with pytest.raises(ValueError, match=r"max_concurrency='auto'.*async def __getitem__"):
        aload.DataLoader(list(range(4)), max_concurrency="auto")
    with pytest.raises(ValueError, match=r"num_workers='auto'.*worker_mode='ray'"):
        aload.DataLoader(AsyncStore(4), num_workers="auto", worker_mode="ray")


class InstantReads:
    """An async dataset whose reads are at once: what comes after them is the work."""

    def __len__(self):
        return 800

    async def __getitem__(self, index):
        await anyio.lowlevel.checkpoint()
        return index


def waits_on_a_service(sample):
    """A per-sample step that waits 2 ms and releases the GIL (a service call, numpy)."""
    time.sleep(0.002)
    return sample


def test_a_slow_finish_stage_gets_more_threads_and_the_reads_stay():
    """The better of two epochs: on CI's busy cores a window once showed the reads' stage
    busy 53% of its time, and the reads were stepped up once."""
    for _ in range(2):
        gc.collect()  # other tests' garbage, collected mid-epoch, would stall a window
        plan = aload.Plan(InstantReads(), batch_size=4).read(aload.loop("auto"))
        loader = plan.map(waits_on_a_service, aload.threads("auto")).loader()
        assert sorted(int(i) for batch in loader for i in batch) == list(range(800))
        workers, reads = loader.stats.workers_tuning, loader.stats.tuning
        if reads.history == ():
            break
    assert workers.maximum == loader.num_workers
    assert workers.concurrency >= 4
    assert "waited" in workers.history[0].reason
    assert reads.history == ()  # the busy stage moved, not the reads
    assert loader.stats.epoch.workers == workers.concurrency


def test_persistent_finishing_threads_keep_what_the_tuner_found():
    """The second epoch starts where the first one's search settled. (How far the search
    climbs is the modelled tests' to check: on CI's busy cores a window at 4 threads once
    read 1,249 samples/s where 1,800 is usual, and 3 were kept as reading as much.)"""
    gc.collect()  # other tests' garbage, collected mid-epoch, would stall a window
    loader = aload.DataLoader(
        InstantReads(),
        batch_size=4,
        num_workers="auto",
        transform=waits_on_a_service,
        persistent_workers=True,
    )
    try:
        for _ in range(2):
            assert sorted(int(i) for batch in loader for i in batch) == list(range(800))
        workers = loader.stats.workers_tuning
        assert workers.concurrency > 2  # it climbed from its start
        assert loader.stats.epoch.workers == workers.concurrency  # the second epoch began there
    finally:
        loader.close()  # persistent threads: a failed assertion must not leave them running


@pytest.mark.anyio
async def test_slow_reads_get_more_at_once_and_the_finishing_threads_stay(anyio_backend):
    async def epoch():
        loader = aload.DataLoader(
            AsyncStore(6000), batch_size=16, num_workers="auto", max_concurrency="auto"
        )
        batches = [b async for b in loader]
        assert sorted(int(i) for batch in batches for i in batch) == list(range(6000))
        reads, workers = loader.stats.tuning, loader.stats.workers_tuning
        assert reads.concurrency >= 48
        assert workers.history == ()
        state = loader.state_dict()
        assert state["tuning"] == {"concurrency": reads.concurrency, "workers": 2}

    assert await pause_while(epoch) < 0.05


@pytest.mark.parametrize("dataset", [Limited, AsyncStore])
def test_leaving_an_auto_epoch_early_leaves_no_thread(dataset):
    """However many threads (or fetchers on aload's loop) the tuner had started."""
    loader = aload.DataLoader(
        dataset(1600),
        batch_size=4,
        **({"max_concurrency": "auto"} if dataset is AsyncStore else {"num_workers": "auto"}),
    )
    for seen, _ in enumerate(loader):
        if seen == 150:  # past the first steps up
            break
    assert loader.stats.tuning.concurrency > 2
    wait_for_no_workers()


def test_leaving_an_epoch_of_tuned_finishing_threads_early_leaves_no_thread():
    loader = aload.DataLoader(
        InstantReads(), batch_size=4, num_workers="auto", transform=waits_on_a_service
    )
    for seen, _ in enumerate(loader):
        if seen == 120:  # past the first steps up
            break
    assert loader.stats.workers_tuning.concurrency > 2
    wait_for_no_workers()


def test_the_settled_concurrency_resumes_with_the_state():
    loader = aload.DataLoader(Limited(400), batch_size=4, num_workers="auto")
    list(loader)
    settled = loader.stats.tuning.concurrency
    state = loader.state_dict()
    resumed = aload.DataLoader(Limited(400), batch_size=4, num_workers="auto")
    resumed.load_state_dict(state)
    assert resumed.stats.tuning.concurrency == settled
    loader.timeout = 30  # another argument, checked again: what was found stays
    assert loader.stats.tuning.concurrency == settled


class SharedReadCount(torch.utils.data.Dataset):
    """Counts its reads in shared memory: those of torch's worker processes too."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = multiprocessing.Value("i", 0)

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        with self.count.get_lock():
            self.count.value += 1
        return index


def test_tuned_readers_keep_prefetch_factor_batches_in_flight_each_as_torchs_workers_do():
    """While training holds the loop (it never waits), the tuner stays at 2 readers, and they
    read ahead what torch's 2 workers read ahead: 2 x prefetch_factor batches, no more."""
    reads = {}
    for name, loader_class, workers in [
        ("torch", tud.DataLoader, 2),
        ("auto", aload.DataLoader, "auto"),
    ]:
        dataset = SharedReadCount(400)
        iterator = iter(loader_class(dataset, batch_size=4, num_workers=workers, prefetch_factor=3))
        next(iterator)
        time.sleep(0.5)  # a long training step: the readers fill what the bound allows
        reads[name] = dataset.count.value
        del iterator
    assert reads["auto"] == reads["torch"] == (1 + 2 * 3) * 4


class _Tracked:
    """A job that notes how many jobs of its pool run at once, and when it started."""

    def __init__(self, log: list, running: list, lock: threading.Lock) -> None:
        self.log, self.running, self.lock = log, running, lock

    def run(self) -> None:
        with self.lock:
            self.running[0] += 1
            self.log.append((id(self), self.running[0]))
        time.sleep(0.01)
        with self.lock:
            self.running[0] -= 1

    def fail(self, error: BaseException) -> None:
        raise AssertionError(f"a job failed: {error!r}")


def test_a_tuned_thread_pool_runs_at_most_its_readers():
    from aload.workers.thread import ThreadPool

    pool = ThreadPool(8, readers=2)
    log: list = []
    running, lock = [0], threading.Lock()

    def run_all(count: int) -> list:
        """How many jobs ran at once as each started (in the order they started)."""
        jobs = [_Tracked(log, running, lock) for _ in range(count)]
        log.clear()
        for job in jobs:
            pool.submit(job)
        deadline = time.monotonic() + 10
        while (len(log) < count or running[0]) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert sorted(started for started, _ in log) == sorted(id(job) for job in jobs)
        return [at_once for _, at_once in log]

    try:
        assert max(run_all(8)) == 2
        pool.limit_readers(4)  # starts the threads it lets read
        assert max(run_all(16)) == 4
        pool.limit_readers(1)
        # The 4 readers that waited for a job run one more each; then one at a time.
        assert max(run_all(12)[4:]) == 1
        assert max(run_all(6)) == 1
    finally:
        pool.shutdown()  # threads held back by the limit end too
        assert pool.join(timeout=5)


def test_a_tuner_that_watches_for_a_long_run_keeps_its_first_and_latest_decisions():
    """A tuner probes its ceiling again every few windows for as long as the loader runs:
    its history keeps the search (the first decisions) and where it stands (the latest),
    counts those left out between, and so stays the same size however long the run."""
    tuner = ConcurrencyTuner(maximum=32, budget=64)
    run(tuner, lambda c: 100.0 * min(c, 8), windows=40)
    search = list(tuner.history)
    run(tuner, lambda c: 100.0 * min(c, 8), windows=20_000)
    tuning = tuner.snapshot()
    assert tuning.dropped > 0
    assert len(tuning.history) == _history.FIRST + _history.LATEST
    assert list(tuning.history[: len(search)]) == search
    # The latest decisions are the run's last ones: one more lands at the end.
    run(tuner, lambda c: 100.0 * min(c, 8), windows=100)
    assert tuner.snapshot().history[-1] == tuner.history[-1]
    assert tuner.snapshot().history[-1].seconds >= tuning.history[-1].seconds
    assert tuner.snapshot().dropped > tuning.dropped
    assert 8 <= tuner.concurrency <= 9
