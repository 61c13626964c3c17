"""The loader's arguments, checked once with torch's rules and frozen.

`resolve_config` is the only place that reads what the user passed; everything after it works
from a `LoaderConfig`, so a running epoch never sees an argument that was not validated.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import (
    BatchSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)
from torch.utils.data._utils.collate import default_collate, default_convert
from torch.utils.data.distributed import DistributedSampler

from ._async_fetch import is_async_map_style
from ._device import ToDevice, resolve_device
from ._fetch import Finish
from ._retry import NO_RETRY, Retry
from ._threaded_reads import ThreadedReads
from ._tuner import cpu_budget
from .workers.start_method import check_picklable, resolve_context, sends_by_pickle

WORKER_MODES = ("thread", "process", "ray")


@dataclass(frozen=True, slots=True)
class LoaderConfig:
    """Validated loader arguments, with default samplers and collate function filled in."""

    dataset: Any
    iterable: bool
    batch_size: int | None
    drop_last: bool
    sampler: Sampler[Any] | Iterable[Any] | None
    batch_sampler: Sampler[list[Any]] | Iterable[list[Any]] | None
    num_workers: int
    collate_fn: Callable[[Any], Any]
    pin_memory: bool
    timeout: float
    worker_init_fn: Callable[[int], None] | None
    generator: torch.Generator | None
    prefetch_factor: int | None
    persistent_workers: bool
    in_order: bool
    worker_mode: str
    distributed: bool
    transform: Callable[[Any], Any] | None
    batch_transform: Callable[[Any], Any] | None
    retry: Retry
    max_skipped: int
    max_concurrency: int
    asynchronous: bool
    multiprocessing_context: Any
    device: torch.device | None
    to_device: ToDevice | None
    device_transform: Callable[[Any], Any] | None
    pin_memory_device: str = ""
    ray_options: Mapping[str, Any] = field(default_factory=dict)
    # num_workers="auto": up to `num_workers` threads read (or finish an async dataset's
    # batches) at once, tuned; processes: one per core.
    workers_tuned: bool = False
    # max_concurrency="auto": up to `max_concurrency` reads on aload's loop, tuned.
    reads_tuned: bool = False
    # prefetch_factor="auto": how far ahead the workers read is tuned (from torch's 2).
    read_ahead_tuned: bool = False
    # Bytes the batches in flight may take (None: no budget).
    memory_budget: int | None = None

    def finish(self, pin: bool) -> Finish:
        """What follows a batch's reads on its worker: map, collate, map the batch, `pin`."""
        return Finish(self.collate_fn, self.transform, pin, self.batch_transform)

    @property
    def process_context(self) -> multiprocessing.context.BaseContext:
        """The context process workers start with: the one given, else the default (torch's)."""
        return self.multiprocessing_context or resolve_context(None)

    @property
    def depth(self) -> int:
        """Batches in flight per worker (torch's `prefetch_factor`, 2 unless given)."""
        return self.prefetch_factor or 2

    @property
    def auto_collation(self) -> bool:
        """Whether samples are grouped into batches (torch: batch_size or batch_sampler set)."""
        if self.iterable:
            return self.batch_size is not None
        return self.batch_sampler is not None

    @property
    def index_sampler(self) -> Iterable[Any] | None:
        """What yields one job's indices: the batch sampler, or the sampler when unbatched."""
        return self.batch_sampler if self.auto_collation else self.sampler

    @property
    def stream_count(self) -> int:
        """Iterable datasets: how many streams are read (one per worker; an async one: one)."""
        return 1 if self.asynchronous else max(1, self.num_workers)

    @property
    def max_in_flight(self) -> int:
        """The bound on batches submitted but not yet yielded: workers x prefetch_factor
        (`num_workers=0` loads in one thread, so as one worker). An async dataset keeps enough
        batches in flight to give `max_concurrency` item reads work, times prefetch_factor."""
        return self.in_flight_for(self.max_concurrency)

    def in_flight_for(self, reads: int) -> int:
        """`max_in_flight` when an async dataset has `reads` item reads at once (a tuned
        `max_concurrency`): enough batches to give them work, at least one per worker."""
        slots = max(1, self.num_workers)
        if self.asynchronous:
            # A plain dataset's reads on threads take a batch each (`ThreadedReads`).
            per_read = 1 if isinstance(self.dataset, ThreadedReads) else self.batch_size or 1
            slots = max(slots, math.ceil(reads / per_read))
        return slots * self.depth


def resolve_config(
    dataset: Any,
    batch_size: int | None,
    shuffle: bool | None,
    sampler: Sampler[Any] | Iterable[Any] | None,
    batch_sampler: Sampler[list[Any]] | Iterable[list[Any]] | None,
    num_workers: int | str,
    collate_fn: Callable[[Any], Any] | None,
    pin_memory: bool,
    drop_last: bool,
    timeout: float,
    worker_init_fn: Callable[[int], None] | None,
    generator: torch.Generator | None,
    prefetch_factor: int | str | None,
    persistent_workers: bool,
    in_order: bool,
    worker_mode: str,
    distributed: bool = False,
    transform: Callable[[Any], Any] | None = None,
    batch_transform: Callable[[Any], Any] | None = None,
    retry: Retry | None = None,
    max_skipped: int = 0,
    max_concurrency: int | str = 64,
    multiprocessing_context: Any = None,
    device: str | int | torch.device | None = None,
    to_device: ToDevice | None = None,
    device_transform: Callable[[Any], Any] | None = None,
    pin_memory_device: str = "",
    ray_options: Mapping[str, Any] | None = None,
    memory_budget: int | None = None,
) -> LoaderConfig:
    """Check the arguments as `torch.utils.data.DataLoader` does and fill in the defaults.

    The exception type is torch's wherever torch raises for the same value (at construction
    or, for some, only once iterating); values torch lets through silently (`timeout=nan`,
    `pin_memory="no"`, `sampler=5`) are refused here, naming the argument.

    Raises:
        ValueError: for conflicting or out-of-range arguments, with torch's messages.
        TypeError: for arguments of the wrong type, naming the argument and what was expected.
    """
    workers_tuned, reads_tuned = num_workers == AUTO, max_concurrency == AUTO
    if num_workers == AUTO:
        num_workers = _auto_workers(dataset, worker_mode)
    else:
        num_workers = _check_int("num_workers", num_workers, or_auto=True)
    if max_concurrency == AUTO:
        max_concurrency = _auto_concurrency(dataset)
    if num_workers < 0:
        raise ValueError(
            "num_workers option should be non-negative; "
            "use num_workers=0 to disable multiprocessing."
        )
    timeout = _check_timeout(timeout)
    for name, flag in (
        ("pin_memory", pin_memory),
        ("persistent_workers", persistent_workers),
        ("in_order", in_order),
        ("distributed", distributed),
    ):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if not isinstance(drop_last, bool):
        raise ValueError(f"drop_last should be a boolean value, but got drop_last={drop_last}")
    if persistent_workers and num_workers == 0:
        raise ValueError("persistent_workers option needs num_workers > 0")
    chooses_mode = worker_mode == AUTO
    if chooses_mode:  # threads to begin with: the loader moves them (`_mode`)
        worker_mode = "thread"
    if worker_mode not in WORKER_MODES:
        raise ValueError(f"worker_mode must be one of {(*WORKER_MODES, AUTO)}, got {worker_mode!r}")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0
    ):
        raise ValueError(
            f"batch_size should be a positive integer value, but got batch_size={batch_size}"
        )
    if shuffle is not None and not isinstance(shuffle, bool):
        raise TypeError(f"shuffle must be True, False or None, got {shuffle!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    for name, order in (("sampler", sampler), ("batch_sampler", batch_sampler)):
        if order is not None and not hasattr(order, "__iter__"):
            raise TypeError(f"{name} must be an iterable of indices, got {type(order).__name__}")
    if not isinstance(pin_memory_device, str):
        raise TypeError(f"pin_memory_device must be a str, got {pin_memory_device!r}")
    for name, fn in (
        ("collate_fn", collate_fn),
        ("worker_init_fn", worker_init_fn),
        ("transform", transform),
        ("batch_transform", batch_transform),
        ("to_device", to_device),
        ("device_transform", device_transform),
    ):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    if retry is not None and not isinstance(retry, Retry):
        raise TypeError(f"retry must be an aload.Retry, got {type(retry).__name__}")
    _check_int("max_skipped", max_skipped)
    if max_skipped < 0:
        raise ValueError(f"max_skipped should be non-negative, got {max_skipped}")
    if memory_budget is not None:
        _check_int("memory_budget", memory_budget)
        if memory_budget <= 0:
            raise ValueError(
                f"memory_budget should be a positive number of bytes, got {memory_budget}"
            )
    max_concurrency = _check_int("max_concurrency", max_concurrency, or_auto=True)
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency should be positive, got {max_concurrency}")
    if multiprocessing_context is not None:
        if num_workers == 0:
            raise ValueError(
                "multiprocessing_context can only be used with multi-process loading "
                f"(num_workers > 0), but got num_workers={num_workers}"
            )
        # Thread workers accept (and ignore) it, so torch code that names one runs as it is.
        multiprocessing_context = resolve_context(multiprocessing_context)

    iterable = is_iterable_style(dataset)
    asynchronous = is_async_map_style(dataset) or (iterable and hasattr(dataset, "__aiter__"))
    if chooses_mode:
        _check_auto_mode(asynchronous, ray_options)
    _check_ray(worker_mode, num_workers, asynchronous, ray_options)
    # An async dataset reads on aload's loop whatever num_workers is: it may always prefetch.
    prefetching = num_workers > 0 or asynchronous
    read_ahead_tuned = prefetch_factor == AUTO  # tuned from torch's 2 (`_read_ahead`)
    prefetch_factor = _check_prefetch_factor(prefetch_factor, prefetching)
    uses_processes = worker_mode == "process" and num_workers > 0
    if uses_processes and sends_by_pickle(multiprocessing_context or resolve_context(None)):
        # Forked workers inherit these; the other start methods pickle them.
        check_picklable(
            {
                # An async dataset is read on aload's loop: its workers never get it.
                "the dataset": None if asynchronous else dataset,
                "collate_fn": collate_fn,
                "worker_init_fn": worker_init_fn,
                "transform": transform,
                "batch_transform": batch_transform,
            }
        )
    if distributed:
        _check_distributed(iterable, sampler, batch_sampler)
    # Every rank must shuffle alike: the seed comes from the user's generator, or is torch's 0.
    distributed_seed = generator.initial_seed() if generator is not None else 0
    if iterable:
        if shuffle not in {False, None}:
            raise ValueError(
                "DataLoader with IterableDataset: expected unspecified shuffle option, "
                f"but got shuffle={shuffle}"
            )
        if sampler is not None:
            raise ValueError(
                "DataLoader with IterableDataset: expected unspecified sampler option, "
                f"but got sampler={sampler}"
            )
        if batch_sampler is not None:
            raise ValueError(
                "DataLoader with IterableDataset: expected unspecified batch_sampler option, "
                f"but got batch_sampler={batch_sampler}"
            )
    else:
        shuffle = bool(shuffle)
        if sampler is not None and shuffle:
            raise ValueError("sampler option is mutually exclusive with shuffle")
        if batch_sampler is not None:
            if batch_size != 1 or shuffle or sampler is not None or drop_last:
                raise ValueError(
                    "batch_sampler option is mutually exclusive "
                    "with batch_size, shuffle, sampler, and drop_last"
                )
            batch_size = None
        if distributed:
            sampler = DistributedSampler(
                dataset, shuffle=shuffle, seed=distributed_seed, drop_last=drop_last
            )
        if sampler is None:
            if shuffle:
                sampler = RandomSampler(dataset, generator=generator)
            else:
                sampler = SequentialSampler(dataset)
        if batch_size is not None and batch_sampler is None:
            batch_sampler = BatchSampler(sampler, batch_size, drop_last)
    if batch_size is None and drop_last:
        raise ValueError(
            "batch_size=None option disables auto-batching and is mutually exclusive with drop_last"
        )

    resolved_device = resolve_device(device)
    if resolved_device is None and (to_device is not None or device_transform is not None):
        raise ValueError("to_device and device_transform need a device= to move batches to")

    batched = batch_size is not None if iterable else batch_sampler is not None
    if collate_fn is None:
        collate_fn = default_collate if batched else default_convert

    return LoaderConfig(
        dataset=dataset,
        iterable=iterable,
        batch_size=batch_size,
        drop_last=drop_last,
        sampler=sampler,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=bool(pin_memory),
        timeout=float(timeout),
        worker_init_fn=worker_init_fn,
        generator=generator,
        prefetch_factor=prefetch_factor,
        persistent_workers=bool(persistent_workers),
        in_order=bool(in_order),
        worker_mode=worker_mode,
        distributed=bool(distributed),
        transform=transform,
        batch_transform=batch_transform,
        retry=retry or NO_RETRY,
        max_skipped=max_skipped,
        max_concurrency=max_concurrency,
        workers_tuned=workers_tuned,
        reads_tuned=reads_tuned,
        read_ahead_tuned=read_ahead_tuned,
        asynchronous=asynchronous,
        multiprocessing_context=multiprocessing_context,
        device=resolved_device,
        ray_options=dict(ray_options or {}),
        to_device=to_device,
        device_transform=device_transform,
        pin_memory_device=pin_memory_device,
        memory_budget=memory_budget,
    )


def _check_timeout(timeout: object) -> float:
    """Seconds to wait for a batch; 0 (or infinity) waits forever."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds, got {timeout!r}")
    if math.isnan(timeout):
        raise ValueError("timeout must be a number of seconds, got nan")
    if timeout < 0:
        raise ValueError("timeout option should be non-negative")
    return 0.0 if math.isinf(timeout) else float(timeout)


def _check_prefetch_factor(prefetch_factor: object, prefetching: bool) -> int | None:
    """torch's rules: only where workers prefetch, 2 by default; here also at least 1 (0
    would never load). "auto" starts at torch's 2."""
    if prefetch_factor is None:
        return 2 if prefetching else None
    factor = (
        None if prefetch_factor == AUTO else _check_int("prefetch_factor", prefetch_factor, True)
    )
    if not prefetching:
        raise ValueError(
            "prefetch_factor option could only be specified in multiprocessing."
            "let num_workers > 0 to enable multiprocessing, otherwise set prefetch_factor to None."
        )
    if factor is None:  # "auto"
        return 2
    if factor < 0:
        raise ValueError("prefetch_factor option should be non-negative")
    if factor == 0:
        raise ValueError("prefetch_factor option should be positive: 0 would never load a batch")
    return factor


def _check_ray(worker_mode: str, num_workers: int, asynchronous: bool, ray_options: Any) -> None:
    if ray_options is not None:
        if worker_mode != "ray":
            raise ValueError(f"ray_options is for worker_mode='ray', got {worker_mode!r}")
        if not isinstance(ray_options, Mapping):
            raise TypeError(
                "ray_options must be a mapping of Ray actor options (num_cpus=, resources=, "
                f"scheduling_strategy=, ...), got {type(ray_options).__name__}"
            )
    if worker_mode != "ray":
        return
    if num_workers == 0:
        raise ValueError("worker_mode='ray' reads on num_workers Ray actors: give num_workers > 0")
    if asynchronous:
        raise ValueError(
            "worker_mode='ray' reads map-style and iterable datasets; an async dataset is read "
            "on aload's event loop: use worker_mode='thread' or 'process'"
        )


def _check_distributed(iterable: bool, sampler: object, batch_sampler: object) -> None:
    if iterable:
        raise ValueError(
            "distributed=True shards map-style datasets; an iterable dataset shards itself "
            "(read torch.distributed.get_rank() in its __iter__)"
        )
    if sampler is not None or batch_sampler is not None:
        raise ValueError(
            "distributed=True builds its own DistributedSampler: pass either distributed=True "
            "or a sampler/batch_sampler, not both"
        )
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "distributed=True needs an initialized process group: call "
            "torch.distributed.init_process_group() before creating the DataLoader"
        )


AUTO = "auto"


def _auto_workers(dataset: Any, worker_mode: str) -> int:
    """The workers `num_workers="auto"` may use; the tuner decides how many run at once.
    Threads (that read, or that finish an async dataset's batches): enough for work that
    waits (on storage, on a service) to overlap, 64 or four times the cores (a thread that
    waits costs little: blocking 2 ms reads kept gaining up to 64); the tuner adds none
    while the process uses its cores. Processes: one per
    core this process may use (each computes; more would only take turns). Refused where it
    cannot tune yet, saying what to pass instead."""
    if worker_mode not in ("thread", "process", AUTO):
        raise ValueError(
            f"num_workers='auto' tunes thread and process workers; with "
            f"worker_mode={worker_mode!r}, give num_workers a number"
        )
    if is_iterable_style(dataset):
        raise ValueError(
            "num_workers='auto' tunes the workers of a map-style dataset (__getitem__, plain "
            "or async); an iterable dataset is split into num_workers streams: give "
            "num_workers a number"
        )
    if worker_mode == "process":
        return max(1, int(cpu_budget()))
    return max(64, 4 * (os.cpu_count() or 1))


def _check_auto_mode(asynchronous: bool, ray_options: Any) -> None:
    """Refuse `worker_mode="auto"` where there is nothing to choose, saying what to pass."""
    if asynchronous:
        raise ValueError(
            "worker_mode='auto' chooses where a dataset's reads run; an async dataset's reads "
            "are awaited on aload's loop: give worker_mode 'thread' or 'process' for the "
            "workers that finish its batches"
        )
    if ray_options is not None:
        raise ValueError("ray_options is for worker_mode='ray', got worker_mode='auto'")


def _auto_concurrency(dataset: Any) -> int:
    """The reads `max_concurrency="auto"` may have in flight on aload's loop (the tuner decides
    how many): only an async dataset's reads are awaited there."""
    if not is_async_map_style(dataset):
        raise ValueError(
            "max_concurrency='auto' tunes how many reads of an async map-style dataset (an "
            "`async def __getitem__`) are awaited at once; for other datasets, "
            "num_workers='auto' tunes a map-style dataset's thread workers"
        )
    return AUTO_MAX_CONCURRENCY


AUTO_MAX_CONCURRENCY = 1024


def _check_int(name: str, value: object, or_auto: bool = False) -> int:
    """`value`, an int (not a bool); `or_auto`: the argument also takes "auto"."""
    if isinstance(value, bool) or not isinstance(value, int):
        expected = "an int or 'auto'" if or_auto else "an int"
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    return value


def is_iterable_style(dataset: object) -> bool:
    """Map-style needs `__len__` and `__getitem__`; anything else that iterates (or iterates
    asynchronously) is a stream."""
    if isinstance(dataset, IterableDataset):
        return True
    if hasattr(type(dataset), "__getitem__") and hasattr(type(dataset), "__len__"):
        return False
    if hasattr(dataset, "__iter__") or hasattr(dataset, "__aiter__"):
        return True
    raise TypeError(
        "dataset must be map-style (with __len__ and __getitem__, plain or async) or iterable "
        f"(with __iter__ or __aiter__), got {type(dataset).__name__}"
    )
