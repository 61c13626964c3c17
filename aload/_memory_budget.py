"""`memory_budget=`: how many batches may be in flight within a number of bytes.

A batch costs more than its own bytes while it exists: the loop holds the last one while it
asks for the next, and a batch collated from samples in this process holds its samples and
the batch they become at once (`default_collate` stacks them into a new tensor). Counting
only the batches' bytes let a 37 MiB-batch loader under an 80 MiB budget grow by 197 MiB.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def batch_nbytes(batch: Any) -> int:
    """The bytes of a batch's tensors, arrays and bytes, in sequences and mappings at any
    depth (other Python objects are not counted)."""
    if isinstance(batch, torch.Tensor | np.ndarray):
        return int(batch.nbytes)
    if isinstance(batch, bytes | bytearray | memoryview):
        return len(batch)
    if isinstance(batch, Mapping):
        return sum(batch_nbytes(value) for value in batch.values())
    if isinstance(batch, list | tuple):
        return sum(batch_nbytes(value) for value in batch)
    return 0


@dataclass(frozen=True)
class MemoryBudget:
    """The bytes a loader's batches may take in this process, and how a batch weighs.

    `samples_here`: batches are collated from samples in this process (thread workers, an
    async dataset's reads), so a batch being built weighs twice its bytes; a one-operation
    gather, or a batch built in a worker process (whose own memory is measured apart),
    weighs its bytes once."""

    limit: int
    samples_here: bool = True

    def needs(self, batch: int) -> int:
        """The bytes one batch in flight needs: the batch the loop holds, and this one being
        built."""
        return batch + self.building(batch)

    def fits(self, batch: int, taken: int = 0) -> bool:
        """Whether one batch in flight fits, with `taken` bytes gone."""
        return self.limit - taken >= self.needs(batch)

    def building(self, batch: int) -> int:
        """The bytes a batch of `batch` bytes takes while it is built."""
        return 2 * batch if self.samples_here else batch

    def batches(self, batch: int, taken: int, builders: int) -> int:
        """How many batches of `batch` bytes may be in flight, at least one, with `taken`
        bytes gone (what worker processes hold of their own) and the loop holding one batch.
        Up to `builders` (the workers, at least one) may be built at once, and a consumer
        faster than the workers leaves every batch in flight being built; past that, the
        rest wait finished."""
        if batch <= 0:
            return 1  # nothing said yet how large they are: one, to find out
        left = self.limit - taken - batch
        building = self.building(batch)
        built_at_once = left // building
        if built_at_once <= builders:
            return max(1, built_at_once)
        return builders + (left - builders * building) // batch
