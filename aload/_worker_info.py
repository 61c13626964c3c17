"""Who am I? `get_worker_info()` for thread workers, their own dataset replica, and their seeds.

torch keeps its worker info in one process-wide global, which cannot tell two threads apart.
aload keeps it per thread and teaches torch's own `get_worker_info` to look there first, so a
dataset that shards with `torch.utils.data.get_worker_info()` (Hugging Face `datasets`,
webdataset, torch's documented recipe) sees each thread worker's id, as it would in a process.
"""

from __future__ import annotations

import copy
import random
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.random  # eager: numpy loads it lazily, which would land in the first worker
import torch
import torch.utils.data._utils.worker as torch_worker

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
        dataset: this worker's dataset: in a thread, its own shallow replica of the loader's
            (attributes it sets are its own; the objects they refer to are shared); in a
            process, its own copy.
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

    The same as `torch.utils.data.get_worker_info()`, which answers the same inside aload's
    thread workers; in a worker process it is torch's info (with `dataset` that process's copy).
    """
    return torch_worker.get_worker_info()


def _thread_aware_get_worker_info() -> Any:  # pragma: no cover - runs as torch's function
    # Both names are globals of torch's worker module, where this code runs.
    info = getattr(_aload_thread_worker, "info", None)  # type: ignore[name-defined]  # noqa: F821
    return _worker_info if info is None else info  # type: ignore[name-defined]  # noqa: F821


def _teach_torch_about_threads() -> None:
    """Give torch's `get_worker_info` this module's per-thread lookup.

    The function's code is replaced rather than the module attribute, so a name bound earlier
    (`from torch.utils.data import get_worker_info`) answers per thread too; outside aload's
    thread workers it returns torch's global exactly as before.
    """
    torch_worker._aload_thread_worker = _local  # type: ignore[attr-defined]
    torch_worker.get_worker_info.__code__ = _thread_aware_get_worker_info.__code__


_teach_torch_about_threads()


def collate_in_thread(collate_fn: Callable[[Any], Any], samples: Any) -> Any:
    """`collate_fn(samples)` with the calling thread's worker info hidden.

    torch's `default_collate` writes a batch straight into shared memory when it sees worker
    info, which saves a process worker a copy; in a thread it would make every batch a shared
    memory file (an open file descriptor each, and slower). A worker process still has
    torch's own info, so its batches still go to shared memory.
    """
    info = getattr(_local, "info", None)
    if info is None:
        return collate_fn(samples)
    _local.info = None
    try:
        return collate_fn(samples)
    finally:
        _local.info = info


def worker_dataset() -> Any | None:
    """The calling thread worker's dataset replica, or None outside a thread worker."""
    info = getattr(_local, "info", None)
    return None if info is None else info.dataset


def replica(dataset: Any) -> Any:
    """A thread worker's own view of `dataset`: a shallow copy of its attributes, so what a
    worker sets on it (a file handle opened lazily, a narrowed range from `worker_init_fn`)
    stays that worker's, while the data it refers to (arrays, tables, lists) is shared.

    Containers, tensors, arrays and one-shot iterators are shared as they are; so is an object
    that cannot be copied. A class's own `__copy__` is honoured; pickling hooks are not used
    (nothing crosses a process).
    """
    kind = type(dataset)
    if (
        kind.__module__ == "builtins"
        or isinstance(dataset, torch.Tensor | np.ndarray)
        or one_shot(dataset)
        or not hasattr(dataset, "__dict__")
    ):
        return dataset
    if hasattr(kind, "__copy__"):
        try:
            return copy.copy(dataset)
        except Exception:
            return dataset
    twin = object.__new__(kind)
    twin.__dict__.update(dataset.__dict__)
    return twin


def one_shot(dataset: Any) -> bool:
    """An iterator that is not a torch Dataset (a generator, a file): it cannot be copied per
    worker, so thread workers share it. A Dataset that is its own iterator is copied, as each
    of torch's worker processes gets its own."""
    return isinstance(dataset, Iterator) and not isinstance(dataset, torch.utils.data.Dataset)


def in_worker_process() -> bool:
    """Whether this is a worker with a process of its own (a process worker, a Ray actor):
    its RNGs are its own, where thread workers share the caller's."""
    info = get_worker_info()
    return info is not None and getattr(info, "mode", "thread") != "thread"


def draw_base_seed(generator: torch.Generator | None) -> int:
    """Draw the workers' base seed as torch does when it starts workers: from `generator`, or
    from torch's global RNG when there is none."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


def worker_setup(
    num_workers: int,
    base_seed: int,
    dataset: Any,
    worker_init_fn: Callable[[int], None] | None,
    *,
    replicate: bool = True,
) -> Callable[[int], None]:
    """Return what each worker thread runs once at start: publish its info (with its own
    dataset replica when `replicate`), then call `worker_init_fn`."""

    def setup(worker_id: int) -> None:
        own = replica(dataset) if replicate else dataset
        _local.info = WorkerInfo(worker_id, num_workers, base_seed + worker_id, own)
        if worker_init_fn is not None:
            with _warning_if_reseeded(worker_init_fn):
                worker_init_fn(worker_id)

    return setup


@contextmanager
def _warning_if_reseeded(fn: Callable[[int], None]) -> Iterator[None]:
    """Warn when `worker_init_fn` reseeds a process-wide RNG from a thread worker: there, it
    reseeds the training loop's RNG too (dropout, initialisation), not a worker's own."""
    torch_seed, python, numpy_before = torch.initial_seed(), random.getstate(), _numpy_state()
    yield
    reseeded = []
    if torch.initial_seed() != torch_seed:
        reseeded.append("torch.manual_seed")
    # A freshly seeded Mersenne Twister stands at position 624 (draws move it on), so a
    # concurrent draw elsewhere is not taken for a reseed.
    python_after = random.getstate()
    if python_after != python and python_after[1][-1] == 624:
        reseeded.append("random.seed")
    numpy_after = _numpy_state()
    if numpy_after[2] == 624 and not np.array_equal(numpy_after[1], numpy_before[1]):
        reseeded.append("numpy.random.seed")
    if reseeded:
        name = getattr(fn, "__qualname__", repr(fn))
        warnings.warn(
            f"worker_init_fn {name} called {', '.join(reseeded)} in a thread worker: thread "
            "workers share the process's random generators with the training loop, so this "
            "reseeds the training loop too. Draw from the worker's own generators instead "
            "(get_worker_info().torch_generator, .numpy_rng, .rng, seeded with "
            "get_worker_info().seed), or use worker_mode='process'",
            RuntimeWarning,
            stacklevel=3,
        )


def _numpy_state() -> Any:
    return np.random.get_state(legacy=True)
