"""Elastic resume: the rest of an epoch saved by N training ranks, split over M ranks.

torch's `DistributedSampler` deals an epoch's order to the ranks in turn: rank r's k-th sample
is the epoch's sample at position k * N + r. A state saved mid-epoch says which batches each
rank delivered; the samples of the other batches, in their epoch positions, are the rest of the
epoch. That rest is dealt to the new ranks by a `DistributedSampler` over it (no shuffle: it is
already in the epoch's order), so the new ranks pad or truncate it as torch pads or truncates
an epoch (`drop_last`), and so each gets the same number of batches.

A resumed epoch can be saved and resumed again on yet another number of ranks: each resume
adds a stage (the world that ran it and what its ranks delivered), and the split is replayed
stage by stage from the epoch's start.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data.distributed import DistributedSampler

from ._checkpoint import Delivered

Stage = dict[str, Any]
"""One world that ran part of an epoch: `{"world": N, "delivered": [each rank's Delivered]}`."""


def resplit_indices(
    sampler: DistributedSampler,
    epoch: int,
    stages: Sequence[Stage],
    batch_size: int,
    drop_last: bool,
) -> list[int]:
    """The sample indices `sampler`'s rank reads for the rest of epoch `epoch`, after the
    `stages` that ran its start (the first one as torch's sampler split it)."""
    first = stages[0]["world"]
    ranks = [_torch_split(sampler, epoch, first, rank) for rank in range(first)]
    for at, stage in enumerate(stages):
        delivered = [Delivered.from_dict(d, streams=False) for d in stage["delivered"]]
        rest = _rest(ranks, delivered, batch_size, drop_last)
        world = stages[at + 1]["world"] if at + 1 < len(stages) else sampler.num_replicas
        ranks = [_deal(rest, world, rank, sampler.drop_last) for rank in range(world)]
    return ranks[sampler.rank]


def _torch_split(sampler: DistributedSampler, epoch: int, world: int, rank: int) -> list[int]:
    """What torch's sampler, as configured, gives `rank` of `world` ranks in `epoch`."""
    twin: DistributedSampler[int] = DistributedSampler(
        sampler.dataset,
        num_replicas=world,
        rank=rank,
        shuffle=sampler.shuffle,
        seed=sampler.seed,
        drop_last=sampler.drop_last,
    )
    twin.set_epoch(epoch)
    return list(twin)


def _rest(
    ranks: list[list[int]], delivered: list[Any], batch_size: int, drop_last: bool
) -> list[int]:
    """The samples of the batches no rank delivered, in their epoch positions' order (a last
    partial batch that `drop_last` leaves out is not part of the epoch)."""
    world = len(ranks)
    positioned: list[tuple[int, int]] = []
    for rank, (indices, done) in enumerate(zip(ranks, delivered, strict=True)):
        for seq, begin in enumerate(range(0, len(indices), batch_size)):
            batch = indices[begin : begin + batch_size]
            if seq in done or (drop_last and len(batch) < batch_size):
                continue
            positioned.extend(((begin + k) * world + rank, index) for k, index in enumerate(batch))
    positioned.sort()
    return [index for _, index in positioned]


def _deal(rest: list[int], world: int, rank: int, drop_last: bool) -> list[int]:
    """`rank`'s share of `rest` over `world` ranks, padded or truncated as torch does."""
    share: DistributedSampler[int] = DistributedSampler(
        range(len(rest)),  # type: ignore[arg-type]  # a sized sequence is all it reads
        num_replicas=world,
        rank=rank,
        shuffle=False,
        drop_last=drop_last,
    )
    return [rest[position] for position in share]
