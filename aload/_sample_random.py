"""Randomness that is a function of the data: one seed per sample, not per worker.

A worker's generators (`get_worker_info().torch_generator`) serve whichever batches the
worker happens to take, so augmentation drawn from them changes with `num_workers`, with
timing and on resume. `sample_random()` instead gives the sample being read generators seeded
from the epoch's seed (drawn as torch draws its workers' base seed, and replayed on resume),
the epoch's number and the sample's index: the same augmented epoch for any worker count,
worker mode or order, and after resume. A batch being collated (or read whole by
`__getitems__`) gets the generators of its indices.

Readers mark what they read with a `Reading` (one per batch, set in the reading thread's or
task's context, its key moved per sample), so the cost is one attribute store per sample; the
generators are made only when asked for.
"""

from __future__ import annotations

import hashlib
import operator
import random
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

_MASK = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class EpochSeeds:
    """What every sample seed of one epoch derives from."""

    base_seed: int
    epoch: int

    def seed_of(self, key: Any) -> int:
        """The 64-bit seed of the sample (or batch) named `key`: its index, or its indices."""
        try:  # an int of any kind (Python's, numpy's, a 0-d tensor) is the same index
            word = operator.index(key) & _MASK
        except TypeError:  # a batch's indices, or a key that is no int: named by its repr
            digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
            word = int.from_bytes(digest, "little")
        return _mix(_mix(_mix(self.base_seed & _MASK) ^ self.epoch) ^ word)


def _mix(value: int) -> int:
    """splitmix64's finalizer: nearby inputs (indices 0, 1, 2...) give unrelated seeds."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


class SampleRandom:
    """The random generators of one sample (or of one batch, while it is collated), each made
    on first use and seeded with `seed`."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    @cached_property
    def torch_generator(self) -> torch.Generator:
        """A `torch.Generator`: `torch.rand(..., generator=...)`, transforms that take one."""
        return torch.Generator().manual_seed(self.seed)

    @cached_property
    def numpy_rng(self) -> np.random.Generator:
        """A `numpy.random.Generator`."""
        return np.random.default_rng(self.seed)

    @cached_property
    def rng(self) -> random.Random:
        """A `random.Random`."""
        return random.Random(self.seed)

    def __repr__(self) -> str:
        return f"SampleRandom(seed={self.seed})"


class Reading:
    """What a reader is reading now: the epoch's seeds and the current sample's key. One per
    batch; `key` moves from sample to sample as the batch is read, transformed, collated."""

    __slots__ = ("_random", "key", "seeds")

    def __init__(self, seeds: EpochSeeds, key: Any = None) -> None:
        self.seeds = seeds
        self.key = key
        self._random: tuple[EpochSeeds, Any, SampleRandom] | None = None

    def random(self) -> SampleRandom:
        cached = self._random
        if cached is not None and cached[0] is self.seeds and cached[1] is self.key:
            return cached[2]
        made = SampleRandom(self.seeds.seed_of(self.key))
        self._random = (self.seeds, self.key, made)
        return made

    def enter(self) -> Token[Reading | None]:
        """Make this the calling thread's (or task's) reading, until `leave(token)`."""
        return _reading.set(self)


def leave(token: Token[Reading | None]) -> None:
    _reading.reset(token)


_reading: ContextVar[Reading | None] = ContextVar("aload_reading", default=None)


@contextmanager
def reading(seeds: EpochSeeds | None, key: Any = None) -> Iterator[Reading | None]:
    """A `Reading` of one batch (at `key`), current in this thread (or task) for the block;
    None, and nothing set, without seeds or with no key to name."""
    if seeds is None:
        yield None
        return
    current = Reading(seeds, key)
    token = current.enter()
    try:
        yield current
    finally:
        leave(token)


def fetcher_reading(seeds: EpochSeeds, key: Any) -> None:
    """Point the calling task's own Reading at `key`, making it the first time: for a task
    that reads one sample after another and lives as long as the epoch's loop (it is never
    unset)."""
    current = _reading.get()
    if current is None:
        Reading(seeds, key).enter()
    else:
        current.seeds, current.key = seeds, key


class BatchKey:
    """The key of a whole batch: its indices, turned into a name only when a seed is asked
    for (most batches never are)."""

    __slots__ = ("indices",)

    def __init__(self, indices: Any) -> None:
        self.indices = indices

    def __repr__(self) -> str:
        indices = self.indices
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        return f"batch{list(indices)!r}"


def sample_random() -> SampleRandom:
    """The random generators of the sample being read, seeded from the loader's seed, the
    epoch and the sample's index, whoever reads it and whenever.

    Call it in a map-style dataset's `__getitem__`, in `transform` or in `collate_fn` (there,
    and in `__getitems__`, it is the batch's, from its indices). The same seed gives the same
    draws for every `num_workers`, thread or process workers, `in_order` either way, and after
    `load_state_dict()`; the next epoch draws afresh.

    Raises:
        RuntimeError: outside a read by an aload DataLoader (an iterable dataset's samples
            have no index to seed from).
    """
    reading = _reading.get()
    if reading is None or reading.key is None:
        raise RuntimeError(
            "aload.sample_random() is set while an aload DataLoader reads a sample of a "
            "map-style dataset (in __getitem__, __getitems__, transform or collate_fn); it "
            "was called outside one"
        )
    return reading.random()
