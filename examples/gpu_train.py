"""A small image classifier trained with batches that arrive already on the GPU.

`device="cuda"` makes aload's workers pin each batch and copy it to the GPU on a side stream,
ahead of the loop body, so the copy of the next batch runs while this one trains.
`device_transform` normalizes the images on the GPU, on that same stream. The loop body is
only the step:

    async for images, labels in loader:     # CUDA tensors, ready for the current stream
        loss = F.cross_entropy(model(images), labels)

The images are synthetic: a class is a bright square in one of four corners. Run it with
`python examples/gpu_train.py` (it picks CUDA when there is one; `--device cpu` forces the CPU).
"""

from __future__ import annotations

import argparse

import anyio
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import aload


def make_dataset(n: int, size: int = 32) -> TensorDataset:
    """Images of noise with a bright square in the corner their label names (0..3)."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (n,), generator=gen)
    images = torch.rand(n, 3, size, size, generator=gen) * 127
    half = size // 2
    for corner in range(4):
        rows = slice(0, half) if corner < 2 else slice(half, size)
        cols = slice(0, half) if corner % 2 == 0 else slice(half, size)
        images[labels == corner, :, rows, cols] += 128
    return TensorDataset(images.to(torch.uint8), labels)


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(128, 4),
    )


def normalize(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    """uint8 images to floats around 0, on the device: a quarter of the bytes cross the bus."""
    images, labels = batch
    return [images.float().sub_(127.5).div_(127.5), labels]


async def train(device: torch.device, epochs: int, samples: int) -> None:
    dataset = make_dataset(samples)
    loader = aload.DataLoader(
        dataset,
        batch_size=128,
        shuffle=True,
        num_workers=2,
        device=device,
        device_transform=normalize,
        generator=torch.Generator().manual_seed(0),
    )
    torch.manual_seed(0)
    model = make_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(1, epochs + 1):
        total, correct = 0.0, 0
        async for images, labels in loader:
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(labels)  # stays on the device: no sync per step
            correct += int((logits.argmax(1) == labels).sum()) if epoch == epochs else 0
        print(f"epoch {epoch}: loss {total.item() / samples:.4f} on {images.device.type}")
    print(f"accuracy in the last epoch: {correct / samples:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="An image classifier fed on the GPU by aload.")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--device", help="cuda (the default where there is a GPU) or cpu")
    args = parser.parse_args()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cpu":
            print("no CUDA device (torch.cuda.is_available() is False): training on the CPU")
    anyio.run(train, torch.device(args.device), args.epochs, args.samples)
