"""Cases measured as a user meets them: each run in a fresh Python process.

Start-up, the memory of forked workers and the caller's event loop at epoch start depend on
what the process already holds (a fork server started earlier, modules imported, pages
already copied), so each run here is `python -m aload.bench.fresh CASE LOADER SCALE ROUNDS`
in a new process, which prints its figures as JSON (ROUNDS: the pure-Python items' size,
calibrated once by the parent, so that every loader's process reads the same work; 20 fresh
calibrations gave 4,364 to 6,871 rounds for one item cost). The parent samples the
proportional set size (PSS: shared pages split between the processes that map them) of the
child's whole process tree while it runs, so copy-on-read pages count once per copy and
shared ones once.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aload.bench.memory import descendants, rollup_kib
from aload.bench.runner import progress

ITEM_SECONDS = 0.0003  # a pure-Python item's cost (startup, python-epoch)

# Each loader: its family (torch or aload) and the arguments that make it.
LOADERS: dict[str, dict[str, Any]] = {
    "torch": {},
    "torch forkserver": {"multiprocessing_context": "forkserver"},
    "torch spawn": {"multiprocessing_context": "spawn"},
    "aload processes": {"worker_mode": "process"},
    "aload processes, forkserver": {
        "worker_mode": "process",
        "multiprocessing_context": "forkserver",
    },
    "aload processes, spawn": {"worker_mode": "process", "multiprocessing_context": "spawn"},
    "aload threads": {},
}


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    loaders: tuple[str, ...]
    columns: tuple[str, ...]  # which figures its table shows


CASES = {
    case.name: case
    for case in (
        Case(
            "startup",
            "a fresh process's first batch from pure-Python items (~0.3 ms each), 2 workers, "
            "torch's defaults otherwise (batch_size=1), by start method",
            tuple(LOADERS),
            ("first_batch_ms",),
        ),
        Case(
            "python-epoch",
            "one epoch of 4,096 pure-Python items (~0.3 ms each) in a fresh process, 2 workers, "
            "batch_size=1",
            ("torch", "aload processes", "aload threads"),
            ("samples_per_s", "first_batch_ms"),
        ),
        Case(
            "records",
            "2,000,000 small Python records (4 objects each) in a fresh process, a shuffled "
            "eighth read in batches of 256 by 4 workers; peak PSS of the whole process tree",
            ("torch", "aload processes", "aload processes, forkserver", "aload threads"),
            ("first_batch_ms", "samples_per_s", "peak_pss_mib"),
        ),
        Case(
            "loop",
            "two epochs of `async for` over 300,000 records in a fresh process, 2 workers, "
            "batch 256: the longest pause of a 5 ms heartbeat task on the caller's loop "
            "(torch's loader, iterated in the coroutine, blocks it)",
            ("torch", "aload processes", "aload processes, forkserver", "aload threads"),
            ("loop_gap_ms", "first_batch_ms"),
        ),
    )
}

COLUMN_TITLES = {
    "first_batch_ms": "first batch (ms)",
    "samples_per_s": "samples/s",
    "peak_pss_mib": "peak PSS (MiB)",
    "loop_gap_ms": "longest loop pause (ms)",
}


@dataclass
class FreshResult:
    case: str
    loader: str
    runs: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None

    def median(self, column: str) -> float | None:
        values = [run[column] for run in self.runs if column in run]
        return statistics.median(values) if values else None


# -- the parent: one fresh process per run ---------------------------------------------------


def tree_pss_kib(root: int) -> int:
    """The PSS of `root` and every process below it, in KiB."""
    return sum(rollup_kib(pid, "Pss:") for pid in [root, *descendants(root)])


def child_figures(returncode: int, out: str, err: str) -> dict[str, Any]:
    """What a fresh process printed as JSON on its last line of output.

    Raises:
        RuntimeError: with the child's last line of error output, when it failed.
    """
    if returncode != 0:
        raise RuntimeError(err.strip().splitlines()[-1] if err.strip() else f"exit {returncode}")
    figures: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return figures


def run_fresh(
    case: str, loader: str, scale: float, rounds: int, interval: float = 0.05
) -> dict[str, float]:
    """One run in a new process (its pure-Python items of `rounds`), its tree's PSS sampled
    every `interval` seconds.

    Raises:
        RuntimeError: with the child's error output, when the run fails.
    """
    child = subprocess.Popen(
        [sys.executable, "-m", "aload.bench.fresh", case, loader, str(scale), str(rounds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Reading a process's PSS walks its page tables under its memory-map lock, which stalls
    # the process's own allocations: only the cases that report memory are sampled.
    sampled = "peak_pss_mib" in CASES[case].columns
    peak = 0
    while sampled and child.poll() is None:
        peak = max(peak, tree_pss_kib(child.pid))
        time.sleep(interval)
    out, err = child.communicate()
    figures = child_figures(child.returncode, out, err)
    if sampled:
        figures["peak_pss_mib"] = peak / 1024
    return figures


def measure_fresh(names: Iterable[str], repeats: int, scale: float) -> list[FreshResult]:
    """Every loader of every case `repeats` times, interleaved, each run a new process."""
    from aload.bench.datasets import python_rounds_for

    results = [FreshResult(name, loader) for name in names for loader in CASES[name].loaders]
    rounds = python_rounds_for(ITEM_SECONDS) if results else 0
    for repeat in range(repeats):
        for result in results:
            if result.error is None:
                progress(f"{result.case}: {result.loader}, run {repeat + 1} of {repeats}")
                try:
                    result.runs.append(run_fresh(result.case, result.loader, scale, rounds))
                except Exception as error:
                    result.error = f"{type(error).__name__}: {error}"
    progress("")
    return results


def fresh_table(case: Case, results: list[FreshResult]) -> str:
    titles = [COLUMN_TITLES[column] for column in case.columns]
    lines = [
        f"\n**{case.name}** (fresh processes): {case.description}",
        "",
        "| loader | " + " | ".join(titles) + " |",
        "| --- |" + " ---: |" * len(titles),
    ]
    for result in results:
        if result.case != case.name:
            continue
        if result.error is not None:
            lines.append(f"| {result.loader} | failed: {result.error} |" + " |" * (len(titles) - 1))
            continue
        cells = []
        for column in case.columns:
            value = result.median(column)
            cells.append(
                "n/a" if value is None else f"{value:,.1f}" if value < 100 else f"{value:,.0f}"
            )
        lines.append(f"| {result.loader} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the child: one run --------------------------------------------------------------------


def _make(loader: str, dataset: Any, **kwargs: Any) -> Iterable[Any]:
    import torch.utils.data as tud

    import aload

    if loader.startswith("torch"):
        return tud.DataLoader(dataset, **LOADERS[loader], **kwargs)
    return aload.DataLoader(dataset, **LOADERS[loader], **kwargs)


def _first_and_rest(batches: Iterable[Any], count: Callable[[Any], int]) -> dict[str, float]:
    started = time.perf_counter()
    iterator = iter(batches)
    samples = count(next(iterator))
    first = time.perf_counter() - started
    for batch in iterator:
        samples += count(batch)
    elapsed = time.perf_counter() - started
    return {"first_batch_ms": first * 1000, "samples_per_s": samples / elapsed}


def _python_items(n: int, rounds: int) -> Any:
    from aload.bench.datasets import PythonDataset

    return PythonDataset(n, rounds)


def _records_sampler(n: int) -> list[int]:
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n // 8].tolist()


async def _loop_case(loader: str, dataset: Any) -> dict[str, float]:
    """Two epochs of `async for` (a plain `for` for torch), a 5 ms heartbeat beside them."""
    longest = 0.0
    first = None

    async def beat() -> None:
        nonlocal longest
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            longest = max(longest, now - last - 0.005)
            last = now

    heart = asyncio.create_task(beat())
    await asyncio.sleep(0.05)
    batches = _make(loader, dataset, batch_size=256, num_workers=2)
    for _ in range(2):
        started = time.perf_counter()
        if loader.startswith("torch"):
            for _batch in batches:
                first = first or time.perf_counter() - started
                await asyncio.sleep(0)
        else:
            async for _batch in batches:  # type: ignore[attr-defined]
                first = first or time.perf_counter() - started
    heart.cancel()
    return {"loop_gap_ms": longest * 1000, "first_batch_ms": (first or 0.0) * 1000}


def child(case: str, loader: str, scale: float, rounds: int) -> dict[str, float]:
    """The run itself, in the fresh process (its pure-Python items of `rounds`)."""
    from aload.bench.datasets import RecordsDataset

    if case == "startup":
        batches = _make(loader, _python_items(4096, rounds), num_workers=2)
        started = time.perf_counter()
        next(iter(batches))
        return {"first_batch_ms": (time.perf_counter() - started) * 1000}
    if case == "python-epoch":
        batches = _make(loader, _python_items(int(4096 * scale), rounds), num_workers=2)
        return _first_and_rest(batches, len)
    if case == "records":
        n = int(2_000_000 * scale)
        dataset = RecordsDataset(n)
        batches = _make(loader, dataset, batch_size=256, sampler=_records_sampler(n), num_workers=4)
        return _first_and_rest(batches, lambda batch: len(batch[0]))
    if case == "loop":
        return asyncio.run(_loop_case(loader, RecordsDataset(int(300_000 * scale))))
    raise ValueError(f"no case {case!r}")


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message="This DataLoader will create")
    print(json.dumps(child(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))))
