"""distributed=True on a real process group: gloo over loopback, 2 and 3 ranks."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

import aload

N = 48
BATCH = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(rank: int, world_size: int, port: int, out: str) -> None:
    """One rank: two epochs, a checkpoint in the middle of the second, and its resume."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        dataset = TensorDataset(torch.arange(N))

        def make() -> aload.DataLoader:
            return aload.DataLoader(
                dataset,
                batch_size=BATCH,
                shuffle=True,
                drop_last=True,
                num_workers=2,
                distributed=True,
            )

        loader = make()
        epochs = [[int(i) for b in loader for i in b[0]] for _ in range(2)]
        resumed_loader = make()
        list(resumed_loader)
        it = iter(resumed_loader)
        head = [int(i) for _ in range(2) for i in next(it)[0]]
        state = resumed_loader.state_dict()
        it.close()
        fresh = make()
        fresh.load_state_dict(state)
        tail = [int(i) for b in fresh for i in b[0]]
        result = {"epochs": epochs, "batches": len(loader), "resumed": head + tail}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_cover_the_dataset_once_per_epoch_and_resume(world_size, tmp_path):
    mp.start_processes(
        run_rank,
        args=(world_size, free_port(), str(tmp_path)),
        nprocs=world_size,
        start_method="spawn",
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]
    per_rank = N // world_size // BATCH * BATCH
    assert {r["batches"] for r in results} == {per_rank // BATCH}
    for epoch in range(2):
        seen = [i for r in results for i in r["epochs"][epoch]]
        assert len(seen) == len(set(seen)) == per_rank * world_size
    assert results[0]["epochs"][0] != results[0]["epochs"][1]
    for r in results:
        assert r["resumed"] == r["epochs"][1]


def test_distributed_needs_an_initialized_process_group():
    with pytest.raises(ValueError, match="init_process_group"):
        aload.DataLoader(list(range(10)), distributed=True)


def test_distributed_and_a_sampler_exclude_each_other():
    data = list(range(10))
    with pytest.raises(ValueError, match="either distributed=True or a sampler"):
        aload.DataLoader(data, sampler=torch.utils.data.SequentialSampler(data), distributed=True)
