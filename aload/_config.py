"""The loader's arguments, checked once with torch's rules and compiled into a frozen plan.

`resolve_config` is the only place that reads what the user passed (`DataLoader`'s arguments,
or those an `aload.Plan` composed); everything after it works from a `LoaderConfig`, so a
running epoch never sees an argument that was not validated. A `LoaderConfig` is the plan in
the form the engine runs: each stage's function and workers as fields (`plan_of` shows it as
stages).
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
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
    """Validated loader arguments, with default samplers and collate function filled in: the
    compiled plan the engine runs."""

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


def resolve_config(arguments: Mapping[str, Any]) -> LoaderConfig:
    """Check `DataLoader`'s `arguments` (all of them, by name: its signature declares them and
    their defaults) as `torch.utils.data.DataLoader` does, and fill in the defaults.

    The exception type is torch's wherever torch raises for the same value (at construction
    or, for some, only once iterating); values torch lets through silently (`timeout=nan`,
    `pin_memory="no"`, `sampler=5`) are refused here, naming the argument.

    Raises:
        ValueError: for conflicting or out-of-range arguments, with torch's messages.
        TypeError: for arguments of the wrong type, naming the argument and what was expected.
    """
    # Each check replaces a given value with the checked one; the config takes its fields.
    args = SimpleNamespace(**arguments)
    args.workers_tuned, args.reads_tuned = args.num_workers == AUTO, args.max_concurrency == AUTO
    if args.workers_tuned:
        args.num_workers = _auto_workers(args.dataset, args.worker_mode)
    else:
        args.num_workers = _check_int("num_workers", args.num_workers, or_auto=True)
    if args.reads_tuned:
        args.max_concurrency = _auto_concurrency(args.dataset)
    if args.num_workers < 0:
        raise ValueError(
            "num_workers option should be non-negative; "
            "use num_workers=0 to disable multiprocessing."
        )
    args.timeout = _check_timeout(args.timeout)
    for name in ("pin_memory", "persistent_workers", "in_order", "distributed"):
        flag = getattr(args, name)
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if not isinstance(args.drop_last, bool):
        raise ValueError(f"drop_last should be a boolean value, but got drop_last={args.drop_last}")
    if args.persistent_workers and args.num_workers == 0:
        raise ValueError("persistent_workers option needs num_workers > 0")
    chooses_mode = args.worker_mode == AUTO
    if chooses_mode:  # threads to begin with: the loader moves them (`_mode`)
        args.worker_mode = "thread"
    if args.worker_mode not in WORKER_MODES:
        raise ValueError(
            f"worker_mode must be one of {(*WORKER_MODES, AUTO)}, got {args.worker_mode!r}"
        )
    _check_batching(args)
    if not isinstance(args.pin_memory_device, str):
        raise TypeError(f"pin_memory_device must be a str, got {args.pin_memory_device!r}")
    for name in _CALLABLES:
        fn = getattr(args, name)
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    if args.retry is not None and not isinstance(args.retry, Retry):
        raise TypeError(f"retry must be an aload.Retry, got {type(args.retry).__name__}")
    args.retry = args.retry or NO_RETRY
    _check_int("max_skipped", args.max_skipped)
    if args.max_skipped < 0:
        raise ValueError(f"max_skipped should be non-negative, got {args.max_skipped}")
    if args.memory_budget is not None:
        _check_int("memory_budget", args.memory_budget)
        if args.memory_budget <= 0:
            raise ValueError(
                f"memory_budget should be a positive number of bytes, got {args.memory_budget}"
            )
    args.max_concurrency = _check_int("max_concurrency", args.max_concurrency, or_auto=True)
    if args.max_concurrency < 1:
        raise ValueError(f"max_concurrency should be positive, got {args.max_concurrency}")
    if args.multiprocessing_context is not None:
        if args.num_workers == 0:
            raise ValueError(
                "multiprocessing_context can only be used with multi-process loading "
                f"(num_workers > 0), but got num_workers={args.num_workers}"
            )
        # Thread workers accept (and ignore) it, so torch code that names one runs as it is.
        args.multiprocessing_context = resolve_context(args.multiprocessing_context)

    args.iterable = iterable = is_iterable_style(args.dataset)
    args.asynchronous = is_async_map_style(args.dataset) or (
        iterable and hasattr(args.dataset, "__aiter__")
    )
    if chooses_mode:
        _check_auto_mode(args.asynchronous, args.ray_options)
    _check_ray(args.worker_mode, args.num_workers, args.asynchronous, args.ray_options)
    args.ray_options = dict(args.ray_options or {})
    # An async dataset reads on aload's loop whatever num_workers is: it may always prefetch.
    prefetching = args.num_workers > 0 or args.asynchronous
    args.read_ahead_tuned = args.prefetch_factor == AUTO  # tuned from torch's 2 (`_read_ahead`)
    args.prefetch_factor = _check_prefetch_factor(args.prefetch_factor, prefetching)
    uses_processes = args.worker_mode == "process" and args.num_workers > 0
    if uses_processes and sends_by_pickle(args.multiprocessing_context or resolve_context(None)):
        # Forked workers inherit these; the other start methods pickle them.
        check_picklable(
            {
                # An async dataset is read on aload's loop: its workers never get it.
                "the dataset": None if args.asynchronous else args.dataset,
                **{name: getattr(args, name) for name in _SENT_TO_PROCESSES},
            }
        )
    _default_samplers(args)

    args.device = resolve_device(args.device)
    if args.device is None and (args.to_device is not None or args.device_transform is not None):
        raise ValueError("to_device and device_transform need a device= to move batches to")

    batched = args.batch_size is not None if iterable else args.batch_sampler is not None
    if args.collate_fn is None:
        args.collate_fn = default_collate if batched else default_convert
    return LoaderConfig(**{name: getattr(args, name) for name in _FIELDS})


# The arguments that must be callable, and those that worker processes started by pickling get.
_CALLABLES = (
    "collate_fn",
    "worker_init_fn",
    "transform",
    "batch_transform",
    "to_device",
    "device_transform",
)
_SENT_TO_PROCESSES = ("collate_fn", "worker_init_fn", "transform", "batch_transform")
_FIELDS = tuple(field.name for field in dataclasses.fields(LoaderConfig))


def _check_batching(args: SimpleNamespace) -> None:
    """The types of the arguments that choose the samples and their batches."""
    batch_size = args.batch_size
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0
    ):
        raise ValueError(
            f"batch_size should be a positive integer value, but got batch_size={batch_size}"
        )
    if args.shuffle is not None and not isinstance(args.shuffle, bool):
        raise TypeError(f"shuffle must be True, False or None, got {args.shuffle!r}")
    generator = args.generator
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    for name in ("sampler", "batch_sampler"):
        order = getattr(args, name)
        if order is not None and not hasattr(order, "__iter__"):
            raise TypeError(f"{name} must be an iterable of indices, got {type(order).__name__}")


def _default_samplers(args: SimpleNamespace) -> None:
    """torch's rules for the samplers and batches, and its defaults: a random or sequential
    sampler (a `DistributedSampler` with `distributed`), in batches of `batch_size`."""
    if args.distributed:
        _check_distributed(args.iterable, args.sampler, args.batch_sampler)
    # Every rank must shuffle alike: the seed comes from the user's generator, or is torch's 0.
    generator = args.generator
    distributed_seed = generator.initial_seed() if generator is not None else 0
    if args.iterable:
        for name in ("shuffle", "sampler", "batch_sampler"):
            value = getattr(args, name)
            if value is not None and value is not False:  # shuffle=False is torch's default
                raise ValueError(
                    f"DataLoader with IterableDataset: expected unspecified {name} option, "
                    f"but got {name}={value}"
                )
    else:
        args.shuffle = shuffle = bool(args.shuffle)
        if args.sampler is not None and shuffle:
            raise ValueError("sampler option is mutually exclusive with shuffle")
        if args.batch_sampler is not None:
            if args.batch_size != 1 or shuffle or args.sampler is not None or args.drop_last:
                raise ValueError(
                    "batch_sampler option is mutually exclusive "
                    "with batch_size, shuffle, sampler, and drop_last"
                )
            args.batch_size = None
        if args.distributed:
            args.sampler = DistributedSampler(
                args.dataset, shuffle=shuffle, seed=distributed_seed, drop_last=args.drop_last
            )
        if args.sampler is None:
            if shuffle:
                args.sampler = RandomSampler(args.dataset, generator=generator)
            else:
                args.sampler = SequentialSampler(args.dataset)
        if args.batch_size is not None and args.batch_sampler is None:
            args.batch_sampler = BatchSampler(args.sampler, args.batch_size, args.drop_last)
    if args.batch_size is None and args.drop_last:
        raise ValueError(
            "batch_size=None option disables auto-batching and is mutually exclusive with drop_last"
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
