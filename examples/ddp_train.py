"""Data-parallel training on the CPU, each rank fed its own shard by aload.

    torchrun --nproc_per_node=2 examples/ddp_train.py
    torchrun --nproc_per_node=2 examples/ddp_train.py --stop-after 5   # "preempted" mid-epoch
    torchrun --nproc_per_node=2 examples/ddp_train.py --resume         # carries on from there

`distributed=True` gives every rank its own part of the data (the same number of batches on
each), a new shuffle each epoch, and a per-rank checkpoint that resumes mid-epoch without
repeating or skipping a sample.
"""

from __future__ import annotations

import argparse
import gc
import os
from pathlib import Path

import anyio
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

import aload


def make_dataset(n: int = 4096, features: int = 8) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=gen)
    y = x @ torch.arange(1.0, features + 1).unsqueeze(1) + 0.1 * torch.randn(n, 1, generator=gen)
    return TensorDataset(x, y)


async def train(args: argparse.Namespace) -> None:
    rank = dist.get_rank()
    checkpoint = Path(args.checkpoint_dir, f"rank{rank}.pt")
    dataset = make_dataset()
    loader = aload.DataLoader(
        dataset, batch_size=32, shuffle=True, drop_last=True, num_workers=2, distributed=True
    )
    model = DistributedDataParallel(torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    first_epoch = 1
    if args.resume:
        saved = torch.load(checkpoint)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        loader.load_state_dict(saved["loader"])
        first_epoch = saved["epoch"]  # the loader resumes inside it: so does the count
    steps = 0
    for epoch in range(first_epoch, args.epochs + 1):
        total, seen = 0.0, 0
        batches = aiter(loader)
        try:
            async for x, y in batches:
                loss = torch.nn.functional.mse_loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total, seen, steps = total + loss.item() * len(x), seen + len(x), steps + 1
                if steps == args.stop_after:
                    checkpoint.parent.mkdir(parents=True, exist_ok=True)
                    state = {
                        "epoch": epoch,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "loader": loader.state_dict(),
                    }
                    torch.save(state, checkpoint)
                    print(f"rank {rank}: preempted after {steps} steps, checkpoint in {checkpoint}")
                    return
        finally:
            # Leaving mid-epoch: wait for the workers to end before the process group goes.
            await batches.aclose()
        print(f"rank {rank}: epoch {epoch} loss {total / max(seen, 1):.4f} over {seen} samples")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--stop-after", type=int, default=0, help="save and stop after N steps")
    parser.add_argument("--resume", action="store_true", help="carry on from the checkpoint")
    parser.add_argument("--checkpoint-dir", default="checkpoints")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    try:
        anyio.run(train, args)
    finally:
        # DistributedDataParallel keeps itself in a reference cycle: collect it while the
        # process group and the interpreter are alive, or gloo may abort the exit (SIGABRT,
        # "terminate called without an active exception"), with or without a loader.
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
