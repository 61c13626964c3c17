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


ELASTIC_N = 50  # not a multiple of any world size times the batch: ranks pad, as torch's do


def elastic_loader(num_workers: int = 2) -> aload.DataLoader:
    return aload.DataLoader(
        TensorDataset(torch.arange(ELASTIC_N)),
        batch_size=BATCH,
        shuffle=True,
        num_workers=num_workers,
        distributed=True,
        generator=torch.Generator().manual_seed(7),
    )


def samples(batches) -> list[int]:
    return [int(i) for batch in batches for i in batch[0]]


def in_group(world: int, rank: int, port: int, body) -> None:
    """Run `body()` as `rank` of a gloo group of `world` ranks, then leave the group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        body()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_elastic(rank: int, worlds: list[int], ports: list[int], barrier, out: str) -> None:
    """Each world in `worlds` saves an epoch two batches in (and one rank goes a batch
    further), through DCP too; then each world resumes every saved state."""
    import torch.distributed.checkpoint as dcp

    results: dict[str, object] = {}
    for n, port in zip(worlds, ports[: len(worlds)], strict=True):
        if rank < n:

            def save(n=n):
                loader = elastic_loader()
                it = iter(loader)
                stop = 3 if rank == n - 1 else 2
                head = samples(next(it) for _ in range(stop))
                state = loader.state_dict()  # every rank's part, gathered
                dcp.save({"loader": loader}, checkpoint_id=str(Path(out, f"dcp{n}")))
                rest = samples(it)
                fresh = elastic_loader(num_workers=0)
                dcp.load({"loader": fresh}, checkpoint_id=str(Path(out, f"dcp{n}")))
                results[f"saved{n}"] = {"head": head, "rest": rest, "dcp": samples(fresh)}
                if rank == 0:
                    torch.save(state, Path(out, f"state{n}.pt"))

            in_group(n, rank, port, save)
        barrier.wait()
    for m, port in zip(worlds, ports[len(worlds) : -1], strict=True):
        if rank < m:

            def resume(m=m):
                for n in worlds:
                    loader = elastic_loader()
                    loader.load_state_dict(torch.load(Path(out, f"state{n}.pt")))
                    tail = [batch[0].tolist() for batch in loader]
                    results[f"{n}to{m}"] = {"tail": tail, "next": samples(loader)}
                results[f"epoch1_{m}"] = samples(elastic_loader_at_epoch(1))
                if m == 2:  # resumed 3 -> 2, saved again one batch in: resumed below on 4
                    loader = elastic_loader()
                    loader.load_state_dict(torch.load(Path(out, "state3.pt")))
                    it = iter(loader)
                    results["chain_head"] = samples([next(it)])
                    state = loader.state_dict()
                    if rank == 0:
                        torch.save(state, Path(out, "chain.pt"))

            in_group(m, rank, port, resume)
        barrier.wait()

    def resume_chain():
        loader = elastic_loader()
        loader.load_state_dict(torch.load(Path(out, "chain.pt")))
        results["chain_tail"] = samples(loader)

    in_group(4, rank, ports[-1], resume_chain)
    Path(out, f"elastic{rank}.json").write_text(json.dumps(results))


def padding(read: list[int], expected: list[int]) -> list[int]:
    """What `read` holds beyond `expected` (each of which it must hold): repeats of expected
    samples only, as torch's DistributedSampler pads an epoch."""
    extra = list(read)
    for i in expected:
        extra.remove(i)  # raises if one is missing
    assert set(extra) <= set(expected)
    return extra


def elastic_loader_at_epoch(epoch: int) -> list:
    loader = elastic_loader()
    for _ in range(epoch):
        list(loader)
    return list(loader)


@pytest.mark.timeout(240)
def test_a_state_saved_by_n_ranks_resumes_on_m_ranks_and_through_dcp(tmp_path):
    worlds = [1, 2, 3, 4]
    ports = [free_port() for _ in range(2 * len(worlds) + 1)]
    barrier = mp.get_context("spawn").Barrier(max(worlds))
    mp.start_processes(
        run_elastic,
        args=(worlds, ports, barrier, str(tmp_path)),
        nprocs=max(worlds),
        start_method="spawn",
    )
    results = [json.loads((tmp_path / f"elastic{r}.json").read_text()) for r in range(4)]
    for n in worlds:
        saved = [results[r][f"saved{n}"] for r in range(n)]
        for part in saved:  # through DCP, each rank resumes its own rest exactly
            assert part["dcp"] == part["rest"]
        epoch = sorted(i for part in saved for i in part["head"] + part["rest"])
        heads = [i for part in saved for i in part["head"]]
        for m in worlds:
            tails = [results[r][f"{n}to{m}"]["tail"] for r in range(m)]
            if m != n:  # re-split: the same batch count on each rank (one rank was ahead)
                assert len({len(tail) for tail in tails}) == 1
            resumed = [i for tail in tails for batch in tail for i in batch]
            remaining = list(epoch)
            for i in heads:
                remaining.remove(i)
            # Every remaining sample once; the padding torch's sampler adds repeats fewer than m
            assert len(padding(resumed, remaining)) < m
            if m == n:  # the same world: each rank's own rest, as if never stopped
                for r in range(m):
                    assert [i for b in tails[r] for i in b] == saved[r]["rest"]
            for r in range(m):  # and the epoch after is the new world's own next epoch
                assert results[r][f"{n}to{m}"]["next"] == results[r][f"epoch1_{m}"]
    # Saved by 3 ranks, resumed on 2, saved again, resumed on 4: still each sample once.
    chain = [i for r in range(3) for i in results[r]["saved3"]["head"]]
    chain += [i for r in range(2) for i in results[r]["chain_head"]]
    chain += [i for r in range(4) for i in results[r]["chain_tail"]]
    whole = sorted(
        i for r in range(3) for part in [results[r]["saved3"]] for i in part["head"] + part["rest"]
    )
    assert len(padding(chain, whole)) < 2 + 4
