"""Where awaited reads lose to a bare event loop: the CPU each thread spends, per item.

    python benchmarks/awaited_cost.py               # 5 rounds of 65,536 reads, batch 32
    python benchmarks/awaited_cost.py --rounds 9 --items 32768 --batch-size 128

Each round reads the same async dataset (2 ms awaited reads, batch 32) three ways, one after
another in this process: the bench's limit (a bare loop of 256 tasks on aload's kind of loop,
no loader), aload with `for` and aload with `async for` (the caller's loop: asyncio), both at
`max_concurrency=256`. It prints medians over the rounds: samples/s, the CPU time each thread
used (the consumer's and aload's loop thread, from /proc, so Linux only) per item and per
batch, and each thread's context switches per batch. Python runs one thread at a time, so the
CPU of both threads adds up against one core: what aload's loop spends beyond the bare loop,
and what the consumer spends per batch, bound the fraction of the bare loop it can reach.

Last, beside a thread that spins in Python, it times torch ops a loader runs (200 calls each):
one that releases the GIL may wait until the spinning thread lets go of it (the switch
interval, 5 ms).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import torch

import aload
from aload.bench.contenders import limit_asyncio
from aload.bench.datasets import AwaitingDataset

CONCURRENCY = 256
TICKS = os.sysconf("SC_CLK_TCK")
Threads = dict[int, tuple[float, int]]  # thread id: (CPU seconds, context switches)


def threads() -> Threads:
    """Each live thread of this process: its CPU time and context switches so far."""
    found: Threads = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            status = (task / "status").read_text()
        except FileNotFoundError:  # it ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        switches = sum(
            int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line
        )
        found[int(task.name)] = ((int(fields[11]) + int(fields[12])) / TICKS, switches)
    return found


def figures(items: int, wall: float, before: Threads, after: Threads) -> dict[str, float]:
    """samples/s, and each busy thread's CPU seconds and switches between the two looks."""
    row = {"samples/s": items / wall}
    for tid, (cpu, switches) in after.items():
        cpu_before, switches_before = before.get(tid, (0.0, 0))
        consumer = tid == os.getpid()
        if not consumer and cpu - cpu_before < 0.02:  # idle threads (torch's helpers)
            continue
        who = "consumer" if consumer else "aload's loop"
        row[f"{who} cpu"] = cpu - cpu_before
        row[f"{who} switches"] = switches - switches_before
    return row


class Tally:
    """One pass's samples, timed, with the threads' clocks before it and a batch before its
    end (then aload's loop thread is still there)."""

    def __init__(self, items: int, batch_size: int) -> None:
        self.last_look = items - batch_size
        self.seen = 0
        self.before, self.after = threads(), {}
        self.started = time.perf_counter()

    def add(self, batch: Any) -> None:
        self.seen += len(batch)
        if self.seen == self.last_look:
            self.after = threads()

    def figures(self) -> dict[str, float]:
        return figures(self.seen, time.perf_counter() - self.started, self.before, self.after)


def bare(data: AwaitingDataset, batch_size: int) -> dict[str, float]:
    limit = limit_asyncio(data, CONCURRENCY)
    before, started = threads(), time.perf_counter()
    drained = limit.drive(limit.make)
    return figures(drained.samples, time.perf_counter() - started, before, threads())


def plain(data: AwaitingDataset, batch_size: int) -> dict[str, float]:
    loader = aload.DataLoader(data, batch_size=batch_size, max_concurrency=CONCURRENCY)
    tally = Tally(len(data), batch_size)
    for batch in loader:
        tally.add(batch)
    return tally.figures()


def awaited(data: AwaitingDataset, batch_size: int) -> dict[str, float]:
    async def run() -> dict[str, float]:
        loader = aload.DataLoader(data, batch_size=batch_size, max_concurrency=CONCURRENCY)
        tally = Tally(len(data), batch_size)
        async for batch in loader:
            tally.add(batch)
        return tally.figures()

    return anyio.run(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--items", type=int, default=65536)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    data = AwaitingDataset(args.items, 0.002)
    ways: dict[str, Callable[[AwaitingDataset, int], dict[str, float]]] = {
        "bare loop, 256 tasks": bare,
        "aload, for": plain,
        "aload, async for": awaited,
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, way in ways.items():
            runs[name].append(way(data, args.batch_size))
    batch = args.batch_size
    batches = args.items / batch
    print("| reads | samples/s | thread | CPU µs an item | a batch | switches a batch |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for name, rows in runs.items():
        median = {key: statistics.median(row.get(key, 0.0) for row in rows) for key in rows[0]}
        for who in ("consumer", "aload's loop"):
            if f"{who} cpu" not in median:
                continue
            per_item = median[f"{who} cpu"] / args.items * 1e6
            print(
                f"| {name} | {median['samples/s']:,.0f} | {who} | {per_item:.1f} "
                f"| {per_item * batch:.0f} | {median[f'{who} switches'] / batches:.1f} |"
            )
    beside_a_spinning_thread()


def beside_a_spinning_thread() -> None:
    """Time torch ops while another thread runs Python: those that release the GIL wait."""
    small, order = torch.arange(32), torch.randperm(65536)
    ops: dict[str, Callable[[], object]] = {
        "torch.stack of two 32-element tensors": lambda: torch.stack([small, small]),
        "torch.index_select of 32 rows": lambda: torch.index_select(order, 0, small),
        "torch.full of 16 elements": lambda: torch.full((16,), 1.0),
        "tolist of 32 elements": small.tolist,
    }
    spinning = True

    def spin() -> None:
        while spinning:
            pass

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        print("\nbeside a thread spinning in Python (200 calls each):")
        for name, op in ops.items():
            took = []
            for _ in range(200):
                started = time.perf_counter()
                op()
                took.append(time.perf_counter() - started)
            waited = sum(seconds > 0.001 for seconds in took)
            print(
                f"- {name}: {statistics.mean(took) * 1e6:,.1f} µs on average "
                f"(median {statistics.median(took) * 1e6:,.1f}), {waited} calls over 1 ms"
            )
    finally:
        spinning = False
        spinner.join()


if __name__ == "__main__":
    main()
