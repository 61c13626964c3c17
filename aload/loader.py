"""`DataLoader`: torch's contract, in front of aload's engine.

The loader's signature declares its arguments; `resolve_config` checks them as torch does and
compiles them (`loader.plan` shows the plan), and the `Engine` runs its epochs. What is here
is torch's side of it: the arguments by position and name, the attributes and the rules for
setting them, and the iterator protocols.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, Literal, TypeVar

import torch
import torch.utils.data as tud
from torch.utils.data import Sampler

from ._config import AUTO
from ._device import ToDevice
from ._engine import Engine
from ._retry import Retry
from ._scheduler import EpochIterator
from ._stats import LoaderStats
from .plan import Plan, plan_of

T_co = TypeVar("T_co", covariant=True)

# torch refuses to change these once the loader is built: they decide the batches.
_FIXED = ("batch_size", "batch_sampler", "sampler", "drop_last", "dataset", "persistent_workers")
# aload's too: it builds its own sampler from it.
_FIXED_HERE = ("distributed",)


class _Argument:
    """A loader attribute as torch has one: the argument of that name, as checked (set it
    through the loader, which checks it again)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, loader: DataLoader[Any] | None, owner: type | None = None) -> Any:
        if loader is None:
            return self
        return getattr(loader._engine.config, self.name)


class DataLoader(Generic[T_co]):
    """Batches from a dataset, for `async for` in a coroutine or a plain `for` loop.

    The arguments mean what they mean in `torch.utils.data.DataLoader`, in the same positions,
    with torch's checks, errors and random draws. What differs is the engine: index batches
    from the sampler are jobs on `num_workers` threads (each reads its own shallow replica of
    the dataset, sharing its data: no copy, instant start), at most
    `num_workers * prefetch_factor` batches are in flight however slow the consumer, and
    `async for` never blocks the event loop.

    Args:
        dataset: map-style (`__len__` and `__getitem__`, `__getitems__` used when present)
            or iterable (a torch `IterableDataset` or any iterable).
        batch_size: samples per batch; None disables batching (samples are converted only).
        shuffle: reshuffle every epoch (map-style only).
        sampler: the order of indices (excludes `shuffle`).
        batch_sampler: yields lists of indices (excludes `batch_size`, `shuffle`, `sampler`,
            `drop_last`).
        num_workers: worker threads. 0 loads one batch at a time: on demand in the calling
            thread for `for` (as torch does), in one helper thread for `async for` (the next
            batch loads while the loop body runs). Batches that are one small gather from
            in-memory tensors (at most 256 KiB) are read by the consumer either way: a trip
            to a worker costs more. Workers run torch ops on one intra-op thread, as torch's.
            "auto" (map-style datasets): how many threads read at once (for an async
            dataset: finish its batches) is found while the epoch runs, and kept across
            epochs and in `state_dict()`: more while the loop waits for data and that raises
            throughput, never past the cores this process may use; `loader.stats.tuning`
            (`workers_tuning` for an async dataset's) shows each change and why. Up to 64
            threads (or four times the cores); with processes, one per core.
        collate_fn: merges samples into a batch; torch's `default_collate` by default.
        pin_memory: return batches in pinned memory (needs CUDA; warns and ignores otherwise).
        drop_last: drop the last incomplete batch.
        timeout: seconds to wait for a batch before `LoaderTimeoutError`, a `RuntimeError`
            (as in torch) and a `TimeoutError` (0 or infinity waits forever).
        worker_init_fn: called with the worker id once in each worker, before it loads (a
            thread worker starts when the first batch reaches it).
        generator: seeds the shuffle and the workers' seeds, for reproducible epochs. Without
            one, they are drawn from torch's global RNG when and as torch's loader draws them
            (nothing when built; the workers' base seed and the sampler's seed per epoch).
        prefetch_factor: batches in flight per worker (2 by default; as in torch, only with
            `num_workers > 0`, or for an async dataset). "auto": from 2, read further ahead
            while a slow batch, read in order, holds back those finished after it and the
            workers wait (within `memory_budget`, or 1 GiB; `stats.read_ahead` says why).
        persistent_workers: keep the workers between epochs (until `close()`).
        in_order: yield batches in sampler order; False yields them as they finish, so one slow
            batch does not hold back the others.
        worker_mode: how workers run: "thread" (the default: they share the dataset and start
            at once), or "process", for datasets whose Python code holds the GIL. Process
            workers get the dataset once, at start; batches come back through shared memory.
            "ray": `num_workers` actors on the Ray cluster this process is connected to
            (`ray.init()` first), for more CPUs than this machine has. "auto": threads,
            moved to processes from the next epoch on when an epoch shows the threads'
            reads holding the GIL while training waits; `loader.stats.worker_mode` says why.
        multiprocessing_context: for process workers: "fork", "spawn", "forkserver" or a
            context. The default is torch's: Python's default start method (fork on Linux up
            to Python 3.13, forkserver from 3.14, spawn on macOS). A fork server imports
            aload once, at its first start. Accepted and ignored by thread workers, so torch
            code that names one runs unchanged.
        pin_memory_device: torch's deprecated argument, accepted for compatibility.
        distributed: shard the dataset over the ranks of the initialized `torch.distributed`
            process group with a `DistributedSampler` (padding, or dropping with `drop_last`,
            so that every rank gets as many batches); the loader calls its `set_epoch`.
        transform: called on each sample by the workers, after it is read and before collate
            (for an async dataset: after the await, on a CPU worker, off the event loop).
        batch_transform: called on each batch by the workers, after collate and before
            pinning (augmentation of a whole batch, a tokenizer called on a batch).
        retry: an `aload.Retry` saying how often to re-read a sample that raised a transient
            error; by default a failed read raises at once.
        max_skipped: how many samples per epoch may be dropped from their batch when they
            still fail after retries; each is logged and counted in `stats`. 0 raises instead.
        max_concurrency: for a dataset whose `__getitem__` is a coroutine function: how many
            item reads may be in flight at once, across batches, on aload's event loop
            (uvloop where it is installed: `aload[uvloop]`; `ALOAD_LOOP=asyncio` keeps
            asyncio's own).
            "auto": found while the epoch runs, as `num_workers="auto"` finds threads.
        progress: show a tqdm progress bar for each epoch, with samples/s and the share of
            time spent waiting for data (needs `tqdm`). Off by default.
        device: deliver batches on this device ("cuda", "cuda:1", a `torch.device`). For CUDA,
            workers pin each batch, and up to `prefetch_factor` batches are copied ahead with
            `non_blocking=True` on a side stream; the caller's current stream waits for a copy
            (on the GPU) before its batch is yielded. Without CUDA, "cuda" raises ValueError.
        to_device: `to_device(batch, device)` moves a batch of a type aload cannot see into
            (default: tensors in mappings, sequences, named tuples and dataclasses, and any
            object with a `to()` method). It runs on the copy stream: pass `non_blocking=True`.
        device_transform: called on each batch once it is on `device`, on the copy stream
            (normalization, augmentation on the GPU), so it overlaps the training step too.
        ray_options: for `worker_mode="ray"`: Ray's options for each actor, in Ray's words
            (`num_cpus` (1 by default), `resources`, `scheduling_strategy`, ...).
        memory_budget: bytes that this loader's batches may take: the one the loop holds, and
            those in flight (being built, with the samples they collate from where that
            happens in this process, or ready and waiting for the loop, or staged for the
            device). Fewer batches are read ahead than `num_workers * prefetch_factor` where
            the largest batch so far says so, at least one (one until the first batch says
            how large they are, and a warning once an epoch if one does not fit). Counts the
            tensors, arrays and bytes in a batch, after what worker processes hold of their
            own (on Linux; `stats.epoch.workers_memory`).

    `state_dict()` at any point of an epoch, and `load_state_dict()` on a fresh loader with the
    same arguments, resume with exactly the batches not yet yielded, in the same order.
    """

    _engine: Engine

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Sampler[Any] | Iterable[Any] | None = None,
        batch_sampler: Sampler[list[Any]] | Iterable[list[Any]] | None = None,
        num_workers: int | Literal["auto"] = 0,
        collate_fn: Callable[[Any], Any] | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        generator: torch.Generator | None = None,
        *,
        prefetch_factor: int | str | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        worker_mode: str = "thread",
        distributed: bool = False,
        transform: Callable[[Any], Any] | None = None,
        batch_transform: Callable[[Any], Any] | None = None,
        retry: Retry | None = None,
        max_skipped: int = 0,
        max_concurrency: int | Literal["auto"] = 64,
        progress: bool = False,
        device: str | int | torch.device | None = None,
        to_device: ToDevice | None = None,
        device_transform: Callable[[Any], Any] | None = None,
        ray_options: Mapping[str, Any] | None = None,
        memory_budget: int | None = None,
    ) -> None:
        arguments = dict(locals())  # every argument, kept to check again when one is set
        del arguments["self"], arguments["progress"]
        object.__setattr__(self, "_engine", Engine(arguments, progress))
        if self._engine.config.worker_mode == "process":
            tud.DataLoader.check_worker_number_rationality(self)  # type: ignore[arg-type]

    def __setattr__(self, name: str, value: Any) -> None:
        """Attributes as torch has them: those that decide the batches cannot change (torch's
        ValueError); the other arguments can, checked again and used from the next epoch on
        (persistent workers are restarted with them); any other name is a plain attribute."""
        if name in _FIXED or name in _FIXED_HERE:
            raise ValueError(
                f"{name} attribute should not be set after {type(self).__name__} is initialized"
            )
        engine = self._engine
        if name.startswith("_") or name not in engine.arguments:
            object.__setattr__(self, name, value)
            return
        engine.set_arguments({**engine.arguments, name: value})

    dataset = _Argument()
    batch_size = _Argument()
    sampler = _Argument()
    batch_sampler = _Argument()
    num_workers = _Argument()
    collate_fn = _Argument()
    pin_memory = _Argument()
    drop_last = _Argument()
    timeout = _Argument()
    worker_init_fn = _Argument()
    generator = _Argument()
    persistent_workers = _Argument()
    in_order = _Argument()
    distributed = _Argument()
    transform = _Argument()
    batch_transform = _Argument()
    retry = _Argument()
    max_skipped = _Argument()
    max_concurrency = _Argument()
    multiprocessing_context = _Argument()
    device = _Argument()
    pin_memory_device = _Argument()
    memory_budget = _Argument()

    @property
    def prefetch_factor(self) -> int | str | None:
        """Batches in flight per worker, as torch's; "auto" when tuned (`stats.read_ahead`
        says how far ahead the workers read now)."""
        config = self._engine.config
        return AUTO if config.read_ahead_tuned else config.prefetch_factor

    @property
    def worker_mode(self) -> str:
        """The workers the next epoch runs on ("auto" chooses: `stats.worker_mode` says
        why)."""
        return self._engine.worker_mode

    @property
    def ray_options(self) -> dict[str, Any]:
        """Ray's options for each actor (a copy)."""
        return dict(self._engine.config.ray_options)

    @property
    def plan(self) -> Plan:
        """The stages this loader's batches go through and where each runs, as a `Plan`
        (`plan.loader()` builds a loader like this one)."""
        return plan_of(self._engine.config, self._engine.arguments)

    @property
    def stats(self) -> LoaderStats:
        """What the loader measured: totals over its epochs, and the current epoch's stats
        (batches, samples/s, time waiting for data against time in the loop body, queue
        depth, batches in flight, retries, skipped samples)."""
        return self._engine.stats()

    def __len__(self) -> int:
        """Batches per epoch, as torch counts them (for an iterable, from `len(dataset)`)."""
        return self._engine.length()

    def __aiter__(self) -> EpochIterator:
        """Start an epoch for `async for`: batches arrive without blocking the event loop."""
        return self._engine.epoch(blocking=False)

    def __iter__(self) -> EpochIterator:
        """Start an epoch for a plain `for` loop, as torch's DataLoader does."""
        return self._engine.epoch(blocking=True)

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands: the current epoch's start and the batches yielded so far.

        Counts batches yielded to the consumer, not those prefetched. A small dict of plain
        data: save it with `torch.save` beside the model, or hand the loader itself to
        `torch.distributed.checkpoint` (it is a `Stateful`). Between epochs, it describes the
        next one. With `distributed=True` it holds every rank's part, gathered from the ranks
        (a collective: call it on every rank, as DCP does), so any rank's copy resumes the
        whole job, on this number of ranks or another.
        """
        return self._engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`: the next epoch started continues where it left off.

        With `distributed=True`, a state saved by another number of ranks resumes too: the
        batches no rank delivered are dealt to these ranks as torch's `DistributedSampler`
        deals an epoch.

        An epoch still running ends (its iterator stops, its workers are told to stop), as
        torchdata's `StatefulDataLoader` drops its iterator: the next epoch started resumes,
        on new persistent workers too.

        Raises:
            ValueError: when the state was saved by a loader with another dataset length or
                other arguments, or cannot be replayed.
        """
        self._engine.load_state_dict(state)

    def close(self) -> None:
        """Stop persistent workers and wait for them to end; the loader can start again."""
        self._engine.close()

    async def aclose(self) -> None:
        """`close()` for async code: stop persistent workers and wait for them to end
        without blocking the event loop."""
        await self._engine.aclose()

    async def __aenter__(self) -> DataLoader[T_co]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __enter__(self) -> DataLoader[T_co]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
