"""Counters a loader keeps over its life, and the frozen snapshot users read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._retry import Reads, Retry


@dataclass(frozen=True)
class LoaderStats:
    """What happened to reads so far, over every epoch of one loader.

    Attributes:
        retries: reads that raised a transient error and were tried again.
        skipped: samples dropped from their batch after their last retry failed.
        skipped_indices: the indices of those samples, in the order they were skipped.
    """

    retries: int
    skipped: int
    skipped_indices: tuple[Any, ...]


class StatsKeeper:
    """Holds each epoch's read accounting and sums them on request."""

    def __init__(self) -> None:
        self._epochs: list[Reads] = []

    def new_epoch(self, retry: Retry, max_skipped: int) -> Reads:
        reads = Reads(retry, max_skipped)
        self._epochs.append(reads)
        return reads

    def snapshot(self) -> LoaderStats:
        skipped = tuple(index for reads in self._epochs for index in reads.skipped)
        return LoaderStats(sum(r.retries for r in self._epochs), len(skipped), skipped)
