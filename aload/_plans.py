"""Picklable recipes for a worker's reader, for workers in other processes.

A reader holds closures and per-epoch state, so it cannot travel to a worker process; its
recipe can. A worker process gets its pool's plan when it starts and builds a reader from it
next to its own copy of the dataset, again at each epoch with that epoch's `skip`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._checkpoint import DatasetResume
from ._fetch import Batch, Finish, map_reader
from ._retry import Reads, Retry
from ._sample_random import EpochSeeds
from ._stream import StreamReader, WorkerState


@dataclass(frozen=True)
class ReaderPlan:
    """How one epoch's batches are read: map-style by indices, or from worker streams."""

    finish: Finish
    batched: bool
    retry: Retry
    max_skipped: int
    stream: bool = False
    batch_size: int | None = None
    drop_last: bool = False
    num_streams: int = 1
    skip: dict[int, int] = field(default_factory=dict)
    states: dict[int, WorkerState] = field(default_factory=dict)
    # Jobs carry samples already read (an async dataset's, on aload's loop) and their
    # indices, not indices alone: the workers only transform and collate them.
    finish_only: bool = False
    epoch: int = 0
    # A resumed epoch of a map-style dataset with its own state: where each copy stood.
    dataset_resume: DatasetResume | None = None

    def for_epoch(self) -> dict[str, Any]:
        """What changes from one epoch to the next: sent to running (persistent) workers,
        which `dataclasses.replace` their plan with it."""
        return {
            "skip": self.skip,
            "states": self.states,
            "epoch": self.epoch,
            "dataset_resume": self.dataset_resume,
        }

    def build(self, dataset: Any, reads: Reads, base_seed: int) -> Callable[[Any], Batch]:
        """The reader for this plan, over `dataset`, retrying and skipping through `reads`;
        samples see their `sample_random()` seeded from `base_seed` and the plan's epoch."""
        seeds = EpochSeeds(base_seed, self.epoch)
        if self.finish_only:  # a job's "indices" are its samples and their indices
            finish = self.finish
            if self.batched:
                return lambda job: finish.keyed(job.indices[0], job.indices[1], seeds)
            return lambda job: finish.keyed_sample(job.indices[0], job.indices[1], seeds)
        if self.stream:
            return StreamReader(
                dataset,
                self.batch_size,
                self.drop_last,
                self.finish,
                self.num_streams,
                skip=self.skip,
                states=self.states,
            )
        return map_reader(
            dataset,
            self.finish,
            batched=self.batched,
            reads=reads,
            seeds=seeds,
            resume=self.dataset_resume,
        )


@dataclass(frozen=True)
class ProcessRead:
    """A process epoch's read as the parent holds it: the plan its workers build their reader
    from, and the epoch's retry and skip accounting, which the workers' reports add to."""

    plan: ReaderPlan
    reads: Reads
