"""aload against torch.utils.data.DataLoader, side by side in one process, on the same data.

Each workload runs every loader `--repeats` times, interleaved (so drift on a shared machine
hits all of them alike), and reports the median samples/s and aload's ratio to torch.

    python benchmarks/throughput.py                 # all workloads, 5 repeats
    python benchmarks/throughput.py --repeats 3 --workloads tensor io async
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import torch
import torch.utils.data as tud

import aload


class SleepDataset(tud.Dataset):
    """An I/O stand-in: each item blocks for `seconds` (a file read, a network fetch)."""

    def __init__(self, n: int, seconds: float) -> None:
        self.n, self.seconds = n, seconds

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(self.seconds)
        return torch.full((16,), index, dtype=torch.float32)


class AwaitingDataset:
    """The async form of SleepDataset: each item awaits `seconds` (a remote read)."""

    def __init__(self, n: int, seconds: float) -> None:
        self.n, self.seconds = n, seconds

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> torch.Tensor:
        await anyio.sleep(self.seconds)
        return torch.full((16,), index, dtype=torch.float32)


class NumpyDataset(tud.Dataset):
    """CPU work that releases the GIL: a sort and two ufuncs over a float32 array per item."""

    def __init__(self, n: int, size: int) -> None:
        self.n = n
        self.base = np.random.default_rng(0).random(size).astype(np.float32)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> np.ndarray:
        return np.sort(self.base * 1.5 + float(index))[:64]


class PythonDataset(tud.Dataset):
    """Pure-Python work that holds the GIL (a tokenizer, a parser): `rounds` of arithmetic."""

    def __init__(self, n: int, rounds: int) -> None:
        self.n, self.rounds = n, rounds

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        total = index
        for i in range(self.rounds):
            total = (total * 31 + i) % 1_000_003
        return torch.tensor([total, index])


class ImageDataset(tud.Dataset):
    """Image-sized samples, 3 x 224 x 224 float32, copied out of a small in-memory pool."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.pool = torch.randn(8, 3, 224, 224)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.pool[index % 8].clone()


def python_rounds_for(seconds: float) -> int:
    """The loop length whose pure-Python work takes about `seconds` per item here."""
    rounds = 10_000
    for _ in range(3):
        ds = PythonDataset(1, rounds)
        started = time.perf_counter()
        for _ in range(50):
            ds[0]
        rounds = int(rounds * seconds / ((time.perf_counter() - started) / 50))
    return rounds


def numpy_size_for(seconds: float) -> int:
    """The array size whose per-item work takes about `seconds` on this machine."""
    size = 100_000
    for _ in range(3):
        ds = NumpyDataset(1, size)
        started = time.perf_counter()
        for _ in range(50):
            ds[0]
        per_item = (time.perf_counter() - started) / 50
        size = int(size * seconds / per_item)
    return size


def drain(loader: Any) -> int:
    return sum(len(batch[0] if isinstance(batch, list) else batch) for batch in loader)


def drain_async(loader: Any) -> int:
    async def run() -> int:
        count = 0
        async for batch in loader:
            count += len(batch[0] if isinstance(batch, list) else batch)
        return count

    return anyio.run(run)


def first_batch_seconds(loader: Any) -> float:
    started = time.perf_counter()
    it = iter(loader)
    next(it)
    elapsed = time.perf_counter() - started
    del it
    return elapsed


@dataclass
class Contender:
    name: str
    make: Callable[[], Any]
    run: Callable[[Any], int] = drain


@dataclass
class Workload:
    name: str
    description: str
    contenders: list[Contender]
    unit: str = "samples/s"


def workloads(numpy_size: int, python_rounds: int) -> dict[str, Workload]:
    tensors = tud.TensorDataset(torch.randn(200_000, 64), torch.randint(0, 10, (200_000,)))
    sleepy = SleepDataset(4096, 0.002)
    remote_blocking = SleepDataset(8192, 0.002)
    remote = AwaitingDataset(8192, 0.002)
    numeric = NumpyDataset(1024, numpy_size)
    small = tud.TensorDataset(torch.randn(10_000, 64))
    pure_python = PythonDataset(2048, python_rounds)
    images = ImageDataset(1024)

    def torch_loader(ds: Any, workers: int, **kw: Any) -> Contender:
        return Contender(
            f"torch workers={workers}", lambda: tud.DataLoader(ds, num_workers=workers, **kw)
        )

    def modes(ds: Any, workers: int, **kw: Any) -> list[Contender]:
        return [
            Contender(
                f"aload workers={workers}, {mode}",
                lambda mode=mode: aload.DataLoader(ds, num_workers=workers, worker_mode=mode, **kw),
            )
            for mode in ("thread", "process")
        ]

    def startup(name: str, make: Callable[[], Any]) -> Contender:
        return Contender(name, make, first_batch_seconds)

    def aload_loaders(ds: Any, workers: int, **kw: Any) -> list[Contender]:
        def make() -> aload.DataLoader:
            return aload.DataLoader(ds, num_workers=workers, **kw)

        return [
            Contender(f"aload workers={workers}, for", make),
            Contender(f"aload workers={workers}, async for", make, drain_async),
        ]

    return {
        "tensor": Workload(
            "tensor",
            "TensorDataset 200,000 x 64, batch 256, shuffled",
            [
                torch_loader(tensors, 0, batch_size=256, shuffle=True),
                torch_loader(tensors, 2, batch_size=256, shuffle=True),
                *aload_loaders(tensors, 0, batch_size=256, shuffle=True),
                *aload_loaders(tensors, 2, batch_size=256, shuffle=True),
            ],
        ),
        "io": Workload(
            "io",
            "2 ms blocking read per item, 4,096 items, batch 32",
            [torch_loader(sleepy, 8, batch_size=32), *aload_loaders(sleepy, 32, batch_size=32)],
        ),
        "async": Workload(
            "async",
            "2 ms awaited read per item (blocking for torch), 8,192 items, batch 32",
            [
                torch_loader(remote_blocking, 8, batch_size=32),
                *[
                    Contender(
                        f"aload max_concurrency={n}, {label}",
                        lambda n=n: aload.DataLoader(remote, batch_size=32, max_concurrency=n),
                        run,
                    )
                    for n in (64, 256)
                    for label, run in (("for", drain), ("async for", drain_async))
                ],
            ],
        ),
        "numpy": Workload(
            "numpy",
            f"~2 ms of numpy work per item (sort of {numpy_size:,} floats), 1,024 items, batch 32",
            [torch_loader(numeric, 2, batch_size=32), *aload_loaders(numeric, 2, batch_size=32)],
        ),
        "python": Workload(
            "python",
            "~0.5 ms of pure-Python work per item (holds the GIL), 2,048 items, batch 32",
            [torch_loader(pure_python, 2, batch_size=32), *modes(pure_python, 2, batch_size=32)],
        ),
        "images": Workload(
            "images",
            "image-sized samples 3 x 224 x 224 float32, 1,024 items, batch 64, one epoch "
            "including worker start (torch forks by default; aload's default is forkserver)",
            [
                torch_loader(images, 2, batch_size=64),
                *modes(images, 2, batch_size=64),
                Contender(
                    "aload workers=2, process, fork",
                    lambda: aload.DataLoader(
                        images,
                        batch_size=64,
                        num_workers=2,
                        worker_mode="process",
                        multiprocessing_context="fork",
                    ),
                ),
            ],
        ),
        "process-startup": Workload(
            "process-startup",
            "time to the first batch with 2 worker processes, by start method (a fresh pool)",
            [
                *[
                    startup(
                        f"torch {method}",
                        lambda method=method: tud.DataLoader(
                            small, batch_size=256, num_workers=2, multiprocessing_context=method
                        ),
                    )
                    for method in ("fork", "spawn", "forkserver")
                ],
                *[
                    startup(
                        f"aload process, {method}",
                        lambda method=method: aload.DataLoader(
                            small,
                            batch_size=256,
                            num_workers=2,
                            worker_mode="process",
                            multiprocessing_context=method,
                        ),
                    )
                    for method in ("fork", "spawn", "forkserver")
                ],
                startup(
                    "aload thread", lambda: aload.DataLoader(small, batch_size=256, num_workers=2)
                ),
            ],
            unit="ms to first batch",
        ),
        "startup": Workload(
            "startup",
            "time to the first batch of an epoch, batch 256, 2 workers",
            [
                Contender(
                    "torch workers=2",
                    lambda: tud.DataLoader(small, batch_size=256, num_workers=2),
                    first_batch_seconds,
                ),
                Contender(
                    "aload workers=2",
                    lambda: aload.DataLoader(small, batch_size=256, num_workers=2),
                    first_batch_seconds,
                ),
            ],
            unit="ms to first batch",
        ),
    }


def measure(workload: Workload, repeats: int) -> dict[str, float]:
    """Median samples/s (or ms to first batch) per contender, runs interleaved."""
    results: dict[str, list[float]] = {c.name: [] for c in workload.contenders}
    for _ in range(repeats):
        for contender in workload.contenders:
            loader = contender.make()
            started = time.perf_counter()
            outcome = contender.run(loader)
            elapsed = time.perf_counter() - started
            if workload.unit == "samples/s":
                results[contender.name].append(outcome / elapsed)
            else:
                results[contender.name].append(outcome * 1000)
    return {name: statistics.median(values) for name, values in results.items()}


def report(workload: Workload, medians: dict[str, float]) -> str:
    torch_names = [name for name in medians if name.startswith("torch")]
    if workload.unit == "samples/s":
        best_torch = max(medians[name] for name in torch_names)
    else:
        best_torch = min(medians[name] for name in torch_names)
    lines = [f"\n{workload.description}", f"| loader | {workload.unit} | vs best torch |"]
    lines.append("| --- | ---: | ---: |")
    for name, value in medians.items():
        if workload.unit == "samples/s":
            ratio = value / best_torch
            shown = f"{value:,.0f}"
        else:
            ratio = best_torch / value
            shown = f"{value:.1f}"
        lines.append(f"| {name} | {shown} | {ratio:.2f}x |")
    return "\n".join(lines)


WORKLOADS = ["tensor", "io", "async", "numpy", "python", "images", "startup", "process-startup"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per loader (median kept)")
    parser.add_argument(
        "--workloads",
        nargs="+",
        default=WORKLOADS,
        choices=WORKLOADS,
    )
    args = parser.parse_args()
    size = numpy_size_for(0.002) if "numpy" in args.workloads else 0
    rounds = python_rounds_for(0.0005) if "python" in args.workloads else 0
    available = workloads(size, rounds)
    print(f"torch {torch.__version__}, {args.repeats} repeats, medians")
    for name in args.workloads:
        workload = available[name]
        print(report(workload, measure(workload, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
