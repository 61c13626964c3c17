"""Does the copy to the GPU hide behind the training step? Step time per batch, side by side.

A training step of about `--step-ms` of GPU work (matrix products that read the batch) runs on
batches of `--batch-size` x 3 x 224 x 224 float32 images:

- data already on the GPU: the limit, no copy at all;
- torch's DataLoader(pin_memory=True), then `.to("cuda", non_blocking=True)` in the loop;
- aload with pin_memory=True and the same `.to()` in the loop;
- aload with device="cuda": pinned by the workers, copied ahead on a side stream.

Each loader runs a warm-up epoch, then `--repeats` timed epochs (persistent workers), and the
median milliseconds per step are reported with the ratio to the on-GPU limit. Needs CUDA.

    python benchmarks/gpu_overlap.py
    python benchmarks/gpu_overlap.py --step-ms 10 --workers 8 --batches 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.utils.data as tud

import aload


class Step:
    """About `ms` milliseconds of GPU work that reads the batch: a reduction of the images,
    then a chain of matrix products seeded by it."""

    def __init__(self, ms: float, device: torch.device) -> None:
        self.weights = torch.randn(2048, 2048, device=device) / 2048**0.5
        self.rounds = 1
        probe = torch.zeros(1, 3, 8, 8, device=device)
        self.rounds = max(1, round(ms / self.time_ms(probe)))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        state = images.mean(dim=(1, 2, 3)).sum() + self.weights
        for _ in range(self.rounds):
            state = torch.tanh(state @ self.weights)
        return state.sum()

    def time_ms(self, images: torch.Tensor, repeats: int = 20) -> float:
        self(images)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            self(images)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeats


def epoch_ms(batches: Iterable[Any], step: Step, move: Callable[[Any], torch.Tensor]) -> float:
    """Milliseconds per step over one epoch, the GPU drained at both ends."""
    torch.cuda.synchronize()
    started, count = time.perf_counter(), 0
    for batch in batches:
        step(move(batch))
        count += 1
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000 / count


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--step-ms", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=24, help="batches per epoch")
    parser.add_argument("--pool", type=int, default=1024, help="distinct images held in memory")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_overlap.py needs a CUDA device (torch.cuda.is_available() is False)")

    device = torch.device("cuda")
    step = Step(args.step_ms, device)
    images = torch.randn(args.pool, 3, 224, 224)
    data = tud.TensorDataset(images)
    sampler = tud.RandomSampler(
        data,
        replacement=True,
        num_samples=args.batches * args.batch_size,
        generator=torch.Generator().manual_seed(0),
    )
    common: dict[str, Any] = {
        "batch_size": args.batch_size,
        "sampler": sampler,
        "num_workers": args.workers,
        "persistent_workers": True,
    }
    on_gpu = [images[: args.batch_size].to(device) for _ in range(args.batches)]

    def to_gpu(batch: Any) -> torch.Tensor:
        return batch[0].to(device, non_blocking=True)

    contenders: dict[str, tuple[Iterable[Any], Callable[[Any], torch.Tensor]]] = {
        "data already on the GPU (the limit)": (on_gpu, lambda x: x),
        "torch pin_memory=True + .to(non_blocking)": (
            tud.DataLoader(data, pin_memory=True, **common),
            to_gpu,
        ),
        "aload pin_memory=True + .to(non_blocking)": (
            aload.DataLoader(data, pin_memory=True, **common),
            to_gpu,
        ),
        'aload device="cuda"': (aload.DataLoader(data, device=device, **common), lambda b: b[0]),
    }
    timings: dict[str, list[float]] = {name: [] for name in contenders}
    for batches, move in contenders.values():
        epoch_ms(batches, step, move)  # warm-up: worker start, allocator, pinned-memory cache
    for _ in range(args.repeats):
        for name, (batches, move) in contenders.items():
            timings[name].append(epoch_ms(batches, step, move))

    limit = statistics.median(timings["data already on the GPU (the limit)"])
    print(
        f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}; step "
        f"{step.time_ms(on_gpu[0]):.1f} ms on a batch of {args.batch_size} x 3 x 224 x 224 "
        f"float32 ({on_gpu[0].nbytes / 2**20:.0f} MiB); {args.workers} workers; "
        f"median of {args.repeats} epochs of {args.batches} steps\n"
    )
    print("| loader | ms per step | vs data on the GPU |\n| --- | ---: | ---: |")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {median / limit:.2f}x |")


if __name__ == "__main__":
    main()
