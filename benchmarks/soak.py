"""Soak: many short epochs per worker mode, watching for anything that grows.

    python benchmarks/soak.py                    # 5,000 epochs per mode
    python benchmarks/soak.py --epochs 500 --modes thread process

Each mode runs in a fresh process (so one mode's leftovers are not another's baseline) over
a small dataset read item by item, 64 KiB a sample, collated into 4 MiB batches in the
workers, with early exits mixed in (every 7th epoch stops after its second batch). Every
`--every` epochs it samples the process's RSS, its threads, its open file descriptors, its
live descendant processes and torch's files in /dev/shm, and it prints the growth per 1,000
epochs from the first sample (taken after a warm-up) to the last: a leak shows as steady
growth, noise as a few MiB either way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

from aload.bench.memory import descendants

MODES = {
    "thread": {"num_workers": 8},
    "thread-persistent": {"num_workers": 8, "persistent_workers": True},
    "process": {"num_workers": 2, "worker_mode": "process"},
    "process-persistent": {"num_workers": 2, "worker_mode": "process", "persistent_workers": True},
    "async-for": {"num_workers": 8, "async": True},
    # torch's DataLoader, for comparison: its workers are processes.
    "torch": {"num_workers": 2, "torch": True},
    "torch-persistent": {"num_workers": 2, "persistent_workers": True, "torch": True},
}


def sample() -> dict[str, float]:
    with open("/proc/self/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
    shm = sum(1 for name in os.listdir("/dev/shm") if name.startswith("torch_"))
    return {
        "rss_mib": rss / 1024,
        "threads": threading.active_count(),
        "fds": len(os.listdir("/proc/self/fd")),
        "processes": len(descendants(os.getpid(), exclude=-1)),
        "shm_files": shm,
    }


class Items:
    """Per-item reads of 64 KiB tensors, collated into 4 MiB batches in the workers: the
    allocation pattern of most real datasets (a TensorDataset is gathered in one operation)."""

    def __len__(self) -> int:
        return 512

    def __getitem__(self, index: int) -> tuple[Any, int]:
        import torch

        return torch.full((16_384,), float(index)), index


def run_mode(mode: str, epochs: int, every: int) -> dict[str, object]:
    """One mode, in this process: the epochs, and the samples taken along the way."""
    import torch.utils.data

    import aload

    kwargs = dict(MODES[mode])
    asynchronous = kwargs.pop("async", False)
    make = torch.utils.data.DataLoader if kwargs.pop("torch", False) else aload.DataLoader
    dataset = Items()
    loader = make(dataset, batch_size=64, shuffle=True, **kwargs)

    def one_epoch(epoch: int) -> None:
        stop_early = epoch % 7 == 0
        if asynchronous:

            async def drain() -> None:
                async for i, _ in aload_enumerate(loader):
                    if stop_early and i == 1:
                        break

            asyncio.run(drain())
        else:
            for i, _ in enumerate(loader):
                if stop_early and i == 1:
                    break

    warm_up = min(every, epochs // 10 or 1)
    for epoch in range(warm_up):
        one_epoch(epoch)
    samples = [(0, sample())]
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        one_epoch(epoch)
        if epoch % every == 0 or epoch == epochs:
            samples.append((epoch, sample()))
    seconds = time.perf_counter() - started
    if isinstance(loader, aload.DataLoader):
        loader.close()
    return {"mode": mode, "epochs": epochs, "seconds": seconds, "samples": samples}


async def aload_enumerate(loader):
    i = 0
    async for batch in loader:
        yield i, batch
        i += 1


def growth_per_thousand(result: dict[str, object]) -> dict[str, float]:
    samples = result["samples"]
    (first_epoch, first), (last_epoch, last) = samples[0], samples[-1]
    span = max(1, last_epoch - first_epoch) / 1000
    return {key: (last[key] - first[key]) / span for key in first}


def report(results: list[dict[str, object]]) -> str:
    keys = ["rss_mib", "threads", "fds", "processes", "shm_files"]
    header = " | ".join(f"{k} per 1k" for k in keys)
    lines = [
        f"| mode | epochs | epochs/s | {header} | RSS at end |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in keys) + " | ---: |",
    ]
    for result in results:
        growth = growth_per_thousand(result)
        rate = result["epochs"] / result["seconds"]
        last = result["samples"][-1][1]
        cells = " | ".join(f"{growth[k]:+.1f}" for k in keys)
        lines.append(
            f"| {result['mode']} | {result['epochs']:,} | {rate:,.0f} | {cells} | "
            f"{last['rss_mib']:.0f} MiB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5000)
    parser.add_argument("--every", type=int, default=250, help="epochs between samples")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--json", help="also write the samples to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_mode(args.one, args.epochs, args.every)))
        return
    results = []
    for mode in args.modes:
        print(f"soaking {mode}: {args.epochs:,} epochs ...", file=sys.stderr, flush=True)
        one_mode = ["--one", mode, "--epochs", str(args.epochs), "--every", str(args.every)]
        out = subprocess.run(
            [sys.executable, __file__, *one_mode],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(report(results))
    if args.json:
        with open(args.json, "w") as sink:
            json.dump(results, sink)


if __name__ == "__main__":
    main()
