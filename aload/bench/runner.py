"""Runs a workload's loaders, interleaved, and keeps each run's throughput, latency and memory."""

from __future__ import annotations

import gc
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import aload
from aload._retry import NO_RETRY
from aload._stats import StatsKeeper
from aload.bench.contenders import Contender
from aload.bench.memory import TreeMemory
from aload.bench.workloads import MIN_RUN_S, Workload


@dataclass
class Result:
    """One loader's runs on one workload; the figures shown are medians over the runs."""

    workload: str
    loader: str
    family: str
    workers: int
    samples_per_s: list[float] = field(default_factory=list)
    first_batch_ms: list[float] = field(default_factory=list)
    peak_mib: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def throughput(self) -> float:
        return statistics.median(self.samples_per_s) if self.samples_per_s else 0.0

    @property
    def first_batch(self) -> float:
        return statistics.median(self.first_batch_ms) if self.first_batch_ms else 0.0

    @property
    def memory(self) -> float | None:
        return statistics.median(self.peak_mib) if self.peak_mib else None

    @property
    def step(self) -> float | None:
        """The median training step (ms) where the loop body is one, else None."""
        return statistics.median(self.step_ms) if self.step_ms else None


def prepare() -> None:
    """Once before anything is timed: start the fork server that the forkserver contenders
    use (a one-off cost per program, ~1 s here, that would otherwise land on whichever run
    came first; the fresh-process cases measure it), and silence torch's advice against more
    worker processes than cores, which the I/O workloads want."""
    server: aload.DataLoader[Any] = aload.DataLoader(
        range(2),
        batch_size=2,
        num_workers=1,
        worker_mode="process",
        multiprocessing_context="forkserver",
    )
    for _ in server:
        pass
    warnings.filterwarnings("ignore", message="This DataLoader will create")


def run_once(
    contender: Contender, memory: TreeMemory, result: Result, min_run_s: float = MIN_RUN_S
) -> None:
    """One run: build the loader and drain it, again until `min_run_s` have passed; record
    samples/s over the run, the first epoch's first batch, peak memory and the median step."""
    gc.collect()
    memory.start()
    passes = [contender.drive(contender.make)]
    elapsed = passes[0].elapsed_s
    while 0 < elapsed < min_run_s:  # (a pass that took no time will not add any)
        passes.append(contender.drive(contender.make))
        elapsed += passes[-1].elapsed_s
    peak = memory.stop()
    measured_there = [p.peak_mib for p in passes if p.peak_mib is not None]
    if measured_there:  # measured where it ran (a fresh process)
        peak = max(measured_there)
    result.samples_per_s.append(sum(p.samples for p in passes) / elapsed)
    result.first_batch_ms.append(passes[0].first_batch_s * 1000)
    if peak is not None:
        result.peak_mib.append(peak)
    steps = [p.step_s for p in passes if p.step_s is not None]
    if steps:
        result.step_ms.append(statistics.median(steps) * 1000)


def progress(line: str) -> None:
    """Which run is on, on one line of a terminal's stderr (not in logs or pipes)."""
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[K{line}")
        sys.stderr.flush()


def measure(workload: Workload, repeats: int, memory: TreeMemory) -> list[Result]:
    """Every contender `repeats` times, interleaved so that drift on a shared machine hits all
    alike. A loader that raises is reported with its error and left out of later rounds."""
    results = [Result(workload.name, c.name, c.family, c.workers) for c in workload.contenders]
    for repeat in range(repeats):
        for contender, result in zip(workload.contenders, results, strict=True):
            if result.error is not None:
                continue
            progress(f"{workload.name}: {contender.name}, run {repeat + 1} of {repeats}")
            try:
                run_once(contender, memory, result, workload.min_run_s)
            except Exception as exc:
                memory.stop()
                result.error = f"{type(exc).__name__}: {exc}"
    progress("")
    return results


def best_torch(results: list[Result]) -> float | None:
    """The highest median samples/s among torch's DataLoader runs: the ratios' reference."""
    torch_runs = [r.throughput for r in results if r.family == "torch" and r.error is None]
    return max(torch_runs) if torch_runs else None


def stats_cost_us(batches: int = 100_000) -> float:
    """Microseconds that `loader.stats` bookkeeping adds to each batch: the calls the
    scheduler makes per batch, timed alone (it is always on, so no run can leave it out)."""
    meter = StatsKeeper().new_epoch(0, NO_RETRY, 0)
    started = time.perf_counter()
    for _ in range(batches):
        asked_at = meter.asked()
        meter.delivered(256, 2, 4)
        meter.handed_over(asked_at)
    return (time.perf_counter() - started) / batches * 1e6


def _limit_row(results: list[Result]) -> Result | None:
    """The workload's limit (its work done by hand, no loader), where it ran."""
    return next((r for r in results if r.family == "limit" and r.error is None), None)


def step_alone(results: list[Result]) -> float | None:
    """The limit's median training step (ms): the steps over batches already in memory."""
    limit = _limit_row(results)
    return None if limit is None else limit.step


def step_inflation(result: Result, alone: float | None) -> float | None:
    """How much longer the median step took beside this loader than alone (0.1: 10%)."""
    if alone is None or result.step is None or result.error is not None:
        return None
    return result.step / alone - 1


def limit_of(results: list[Result]) -> float | None:
    """The median samples/s of the workload's limit (its work done by hand, no loader)."""
    limit = _limit_row(results)
    return None if limit is None else limit.throughput
