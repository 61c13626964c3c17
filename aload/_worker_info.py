"""Who am I? `get_worker_info()` for thread workers, and the per-epoch seeds behind it.

torch keeps its worker info in one process-wide global, which cannot tell two threads apart;
aload keeps it per thread, so every worker thread sees its own id, seed and random generators.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.utils.data

_local = threading.local()


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker knows about itself, as in `torch.utils.data.get_worker_info()`.

    Thread workers share the process-wide `random`, `numpy` and `torch` generators, so seeding
    those per worker would race; each worker gets its own generators here instead, seeded from
    `seed`. Draw augmentation randomness from them to make a thread worker reproducible.

    Attributes:
        id: this worker's index, 0 to `num_workers - 1`.
        num_workers: how many workers load this epoch.
        seed: this worker's seed: the epoch's base seed (drawn from the loader's `generator`)
            plus `id`, as torch computes it.
        dataset: the dataset object this worker reads (shared by all thread workers).
        mode: how the worker runs: "thread" or "process".
        rng: a `random.Random` seeded with `seed`.
        torch_generator: a `torch.Generator` seeded with `seed`.
        numpy_rng: a `numpy.random.Generator` seeded with `seed`.
    """

    id: int
    num_workers: int
    seed: int
    dataset: Any
    mode: str = "thread"
    rng: random.Random = field(init=False, repr=False, compare=False)
    torch_generator: torch.Generator = field(init=False, repr=False, compare=False)
    numpy_rng: np.random.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rng", random.Random(self.seed))
        object.__setattr__(self, "torch_generator", torch.Generator().manual_seed(self.seed))
        object.__setattr__(self, "numpy_rng", np.random.default_rng(self.seed))


def get_worker_info() -> WorkerInfo | Any | None:
    """Return the calling worker's `WorkerInfo`, or None outside a worker.

    Works in aload's thread workers, and in torch's worker processes (where it returns torch's
    own info). An `IterableDataset` calls it in `__iter__` to pick its shard.
    """
    info = getattr(_local, "info", None)
    return info if info is not None else torch.utils.data.get_worker_info()


def set_worker_info(info: WorkerInfo) -> None:
    """Publish `info` as the calling thread's (in a worker process: its main thread's)."""
    _local.info = info


def draw_base_seed(generator: torch.Generator | None) -> int:
    """Draw an epoch's base seed exactly as torch does, so a seeded `generator` gives torch's
    shuffle too (torch draws this before the sampler's first permutation)."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


def worker_setup(
    num_workers: int,
    base_seed: int,
    dataset: Any,
    worker_init_fn: Callable[[int], None] | None,
) -> Callable[[int], None]:
    """Return what each worker thread runs once at start: publish its info, call the hook."""

    def setup(worker_id: int) -> None:
        set_worker_info(WorkerInfo(worker_id, num_workers, base_seed + worker_id, dataset))
        if worker_init_fn is not None:
            worker_init_fn(worker_id)

    return setup
