"""A training loop fed by a plan with two executors: reads that wait, a decode that computes.

Each sample is a JSON record in a store that answers after 2 ms. Reading it waits (on the
network, on a disk), decoding it is pure Python that holds the GIL: the plan overlaps the
reads, many at once, and decodes on 2 worker processes, then jitters each batch.

    python examples/decode_pipeline.py                   # reads awaited on aload's loop
    python examples/decode_pipeline.py --reads threads   # blocking reads on 16 threads

It prints the plan, the loss of each epoch, and each stage of the last epoch: where it ran
and how busy it was.
"""

from __future__ import annotations

import argparse
import json
import time

import anyio
import torch

import aload

FEATURES = 8
WEIGHTS = torch.arange(1.0, FEATURES + 1)


def record(index: int) -> bytes:
    """Sample `index` as a stored record: 8 features and a target, as JSON."""
    gen = torch.Generator().manual_seed(index)
    x = torch.randn(FEATURES, generator=gen)
    return json.dumps({"x": x.tolist(), "y": float(x @ WEIGHTS)}).encode()


class RemoteRecords:
    """Records behind a store that answers after 2 ms, awaited (an async HTTP client)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> bytes:
        await anyio.sleep(0.002)
        return record(index)


class FileRecords(torch.utils.data.Dataset):
    """The same records behind a blocking read (a file on a network share)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> bytes:
        time.sleep(0.002)
        return record(index)


def decode(raw: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure Python: parse the JSON, build the tensors (holds the GIL)."""
    fields = json.loads(raw)
    return torch.tensor(fields["x"]), torch.tensor([fields["y"]])


def jitter(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    """Once per batch, after collate: a little noise on the features, drawn from the batch's
    own generator (`aload.sample_random()`: the same noise for the same seed and epoch,
    whichever worker draws it)."""
    x, y = batch
    noise = torch.randn(x.shape, generator=aload.sample_random().torch_generator)
    return [x + 0.01 * noise, y]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", choices=["loop", "threads"], default="loop")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2048)
    args = parser.parse_args()

    if args.reads == "loop":
        plan = aload.Plan(RemoteRecords(args.samples), batch_size=64, shuffle=True)
        plan = plan.read(aload.loop(64))
    else:
        plan = aload.Plan(FileRecords(args.samples), batch_size=64, shuffle=True)
        plan = plan.read(aload.threads(16))
    plan = plan.map(decode, aload.processes(2)).map_batch(jitter)
    print(plan)

    model = torch.nn.Linear(FEATURES, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with plan.loader(persistent_workers=True) as loader:
        for epoch in range(args.epochs):
            total, batches = 0.0, 0
            for x, y in loader:
                loss = torch.nn.functional.mse_loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total, batches = total + loss.item(), batches + 1
            stats = loader.stats.epoch
            print(
                f"epoch {epoch}: loss {total / batches:.3f}, "
                f"{stats.samples_per_second:,.0f} samples/s, bottleneck: {stats.bottleneck}"
            )
        for stage in loader.stats.epoch.stages:
            print(
                f"  {stage.name}: {stage.concurrency} at once on {stage.where}, "
                f"{stage.busy_fraction:.0%} busy"
            )


if __name__ == "__main__":
    main()
