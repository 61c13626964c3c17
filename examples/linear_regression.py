"""The classic training loop, fed by aload.

The loop people write first slices tensors by hand:

    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        ...

Here the same linear regression takes its batches from `aload.DataLoader` instead: shuffled
every epoch, loaded by worker threads while the step runs, and awaited with `async for` so the
event loop stays free. Run it with `python examples/linear_regression.py` (add `--sync` for
the plain `for` loop); it prints the loss after every epoch.
"""

from __future__ import annotations

import argparse

import anyio
import torch
from torch.utils.data import TensorDataset

import aload


def make_dataset(n: int = 4096, features: int = 8) -> TensorDataset:
    """y = x @ w + b + noise, with a fixed w and b for the model to find."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=gen)
    w = torch.arange(1.0, features + 1).unsqueeze(1)
    y = x @ w + 0.5 + 0.1 * torch.randn(n, 1, generator=gen)
    return TensorDataset(x, y)


def make_loader(dataset: TensorDataset) -> aload.DataLoader:
    return aload.DataLoader(
        dataset,
        batch_size=64,
        shuffle=True,
        num_workers=2,
        generator=torch.Generator().manual_seed(0),
    )


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, xb, yb) -> float:
    loss = torch.nn.functional.mse_loss(model(xb), yb)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item() * len(xb)


def setup() -> tuple[TensorDataset, aload.DataLoader, torch.nn.Module, torch.optim.Optimizer]:
    dataset = make_dataset()
    model = torch.nn.Linear(dataset.tensors[0].shape[1], 1)
    return dataset, make_loader(dataset), model, torch.optim.SGD(model.parameters(), lr=0.05)


async def train_async(epochs: int) -> None:
    dataset, loader, model, optimizer = setup()
    for epoch in range(1, epochs + 1):
        total = 0.0
        async for xb, yb in loader:
            total += step(model, optimizer, xb, yb)
        print(f"epoch {epoch}: loss {total / len(dataset):.4f}")


def train_sync(epochs: int) -> None:
    dataset, loader, model, optimizer = setup()
    for epoch in range(1, epochs + 1):
        total = 0.0
        for xb, yb in loader:
            total += step(model, optimizer, xb, yb)
        print(f"epoch {epoch}: loss {total / len(dataset):.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Linear regression trained from aload.")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--sync", action="store_true", help="use a plain for loop")
    args = parser.parse_args()
    if args.sync:
        train_sync(args.epochs)
    else:
        anyio.run(train_async, args.epochs)
