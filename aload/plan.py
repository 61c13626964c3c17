"""A loader's plan: the stages a batch goes through, each with where it runs.

`DataLoader(...)` compiles torch's arguments to a plan (`loader.plan` shows it), and a plan
composed stage by stage builds the same loader (`plan.loader()`), for what reads better as a
pipeline than as a list of arguments:

    loader = (
        aload.Plan(dataset, batch_size=32, shuffle=True)
        .read(aload.loop(256))                  # an async dataset: 256 reads awaited at once
        .map(decode, aload.processes(2))        # per sample, on 2 worker processes
        .collate()                              # torch's default_collate
        .map_batch(mix_up)                      # per batch, on the same workers
        .to("cuda")                             # pinned, copied ahead on a side stream
        .loader()
    )

Every stage after the read runs on the map's workers (the read's, for a dataset read by
workers), in that order; the loader's promises (each sample once per epoch, `in_order`,
resume, bounded memory, errors with their indices) hold as they do for `DataLoader`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from ._async_fetch import is_async_map_style
from ._checkpoint import has_state
from ._config import is_iterable_style
from ._threaded_reads import ThreadedReads

if TYPE_CHECKING:
    from ._config import LoaderConfig
    from ._device import ToDevice
    from ._retry import Retry
    from .loader import DataLoader

ExecutorKind = Literal["consumer", "threads", "processes", "ray", "loop"]


@dataclass(frozen=True)
class Executor:
    """Where a stage runs and how many of its calls run at once: build one with `threads`,
    `processes`, `ray_actors` or `loop`; `CONSUMER` is the training loop's own thread."""

    kind: ExecutorKind
    count: int | Literal["auto"] = 0
    context: Any = None  # processes: a multiprocessing context or its name
    options: Mapping[str, Any] = field(default_factory=dict)  # Ray actors' options

    def __str__(self) -> str:
        count = self.count
        if self.kind == "consumer":
            return "the consumer"
        if self.kind == "loop":
            return f"aload's loop ({count} at once)"
        names = {"threads": "worker threads", "processes": "worker processes", "ray": "Ray actors"}
        return f"{count} {names[self.kind]}"


CONSUMER = Executor("consumer")


def threads(count: int | Literal["auto"]) -> Executor:
    """`count` worker threads (they share the dataset and start at once); "auto": as many as
    raise throughput, found while the epoch runs (a map-style dataset's reads)."""
    return Executor("threads", _count("threads", count, auto=True))


def processes(count: int | Literal["auto"], context: Any = None) -> Executor:
    """`count` worker processes, for Python code that holds the GIL ("auto": one per core
    this process may use, for a map-style dataset's reads);
    `context`: "fork", "spawn", "forkserver" or a multiprocessing context (by default,
    torch's: Python's default start method)."""
    return Executor("processes", _count("processes", count, auto=True), context)


def ray_actors(count: int, **options: Any) -> Executor:
    """`count` actors on the Ray cluster this process is connected to, with Ray's actor
    `options` (`num_cpus=`, `resources=`, ...)."""
    return Executor("ray", _count("ray_actors", count), options=dict(options))


def loop(concurrency: int | Literal["auto"] = 64) -> Executor:
    """aload's event loop: `concurrency` awaited reads of an async dataset at once ("auto":
    found while the epoch runs); for a map, the loop's own thread."""
    return Executor("loop", _count("loop", concurrency, auto=True))


def _count(name: str, count: object, auto: bool = False) -> Any:
    if auto and count == "auto":
        return count
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        expected = "a positive int or 'auto'" if auto else "a positive int"
        raise ValueError(f"{name}() takes {expected}, got {count!r}")
    return count


@dataclass(frozen=True)
class Stage:
    """One step of a plan: `name` ("read", "map", "collate", "map_batch", "pin", "to"),
    what it calls (`fn`: a sample's map, the collate function, ...) and where it runs."""

    name: str
    fn: Any = None
    on: Executor | None = None  # None: on the workers of the stage before it

    def __str__(self) -> str:
        what = "" if self.fn is None else f" {_name_of(self.fn)}"
        where = "" if self.on is None else f" on {self.on}"
        return f"{self.name}{what}{where}"


def _name_of(fn: Any) -> str:
    if isinstance(fn, torch.device):
        return str(fn)
    return getattr(fn, "__qualname__", None) or type(fn).__name__


_ORDER = ("read", "map", "collate", "map_batch", "pin", "to")

# torch's arguments that choose the samples and their batches: the plan's source.
_BATCHING = ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last", "generator")


@dataclass(frozen=True)
class Plan:
    """The stages an epoch's batches go through, in order, from `dataset`: which samples and
    batches (torch's `batch_size`, `shuffle`, `sampler`, `batch_sampler`, `drop_last`,
    `generator`, and aload's `distributed`), then read → map → collate → map_batch → pin →
    to. Frozen: each method returns a new plan with that stage set.

    A new plan reads on the consumer's thread (an async dataset: on aload's loop, 64 reads
    at once) and collates with torch's `default_collate`.
    """

    dataset: Any
    batching: Mapping[str, Any] = field(default_factory=dict)
    stages: tuple[Stage, ...] = ()
    # Arguments of a stage that are not its function or its workers (retries, devices).
    extras: Mapping[str, Any] = field(default_factory=dict)

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Any = None,
        batch_sampler: Any = None,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
        *,
        distributed: bool = False,
    ) -> None:
        batching = {
            "batch_size": batch_size,
            "shuffle": shuffle,
            "sampler": sampler,
            "batch_sampler": batch_sampler,
            "drop_last": drop_last,
            "generator": generator,
            "distributed": distributed,
        }
        first = loop() if is_async_map_style(dataset) else CONSUMER
        stages = (Stage("read", on=first), Stage("collate"))
        # The read's and the device's other arguments, as `DataLoader` defaults them.
        extras = {"retry": None, "max_skipped": 0, "to_device": None, "device_transform": None}
        self._assemble(dataset, batching, stages, extras)

    def _assemble(
        self,
        dataset: Any,
        batching: Mapping[str, Any],
        stages: tuple[Stage, ...],
        extras: Mapping[str, Any],
    ) -> None:
        """Set the fields of this (frozen) plan."""
        for name, value in (
            ("dataset", dataset),
            ("batching", batching),
            ("stages", stages),
            ("extras", extras),
        ):
            object.__setattr__(self, name, value)

    def read(self, on: Executor, *, retry: Retry | None = None, max_skipped: int = 0) -> Plan:
        """Read samples `on` these workers (`threads(n)`, `processes(n)`, `ray_actors(n)`;
        `loop(c)` for an async dataset), retrying and skipping as `DataLoader` does."""
        _check_executor("read", on)
        return self._with(Stage("read", on=on), retry=retry, max_skipped=max_skipped)

    def map(self, fn: Callable[[Any], Any], on: Executor | None = None) -> Plan:
        """Call `fn` on each sample before collate. For an async dataset `on` is where (and
        so where the later stages run): `threads(n)`, `processes(n)`, or `loop()` (aload's
        loop itself); for others the read's workers run it."""
        _check_fn("map", fn)
        if on is not None:
            _check_executor("map", on)
        return self._with(Stage("map", fn, on))

    def collate(self, fn: Callable[[Any], Any] | None = None) -> Plan:
        """Merge a batch's samples with `fn` (torch's `default_collate` when None)."""
        if fn is not None:
            _check_fn("collate", fn)
        return self._with(Stage("collate", fn))

    def map_batch(self, fn: Callable[[Any], Any]) -> Plan:
        """Call `fn` on each collated batch, on the workers that collate it."""
        _check_fn("map_batch", fn)
        return self._with(Stage("map_batch", fn))

    def pin(self) -> Plan:
        """Put each batch in pinned memory (needs CUDA; warns and ignores otherwise)."""
        return self._with(Stage("pin"))

    def to(
        self,
        device: str | int | torch.device,
        *,
        to_device: ToDevice | None = None,
        transform: Callable[[Any], Any] | None = None,
    ) -> Plan:
        """Deliver batches on `device`, copied ahead on a side CUDA stream from pinned
        memory; `transform` runs on each batch there (as `DataLoader`'s `device_transform`)."""
        return self._with(Stage("to", device), to_device=to_device, device_transform=transform)

    def loader(self, **options: Any) -> DataLoader:
        """A `DataLoader` that runs this plan (`async for` and `for`, `state_dict()`, stats),
        with `DataLoader`'s other keyword arguments (`prefetch_factor`, `persistent_workers`,
        `in_order`, `timeout`, `worker_init_fn`, `progress`, ...)."""
        from .loader import DataLoader

        arguments = self.arguments()
        taken = sorted(set(options) & set(arguments))
        if taken:
            raise TypeError(
                f"loader() got {', '.join(taken)}, which the plan sets: give them to its stages"
            )
        return DataLoader(**arguments, **options)

    def arguments(self) -> dict[str, Any]:
        """`DataLoader`'s arguments for this plan."""
        stages = {stage.name: stage for stage in self.stages}
        read_on = stages["read"].on
        assert read_on is not None
        args: dict[str, Any] = {"dataset": self.dataset, **self.batching, **self.extras}
        map_on = stages["map"].on if "map" in stages else None
        workers = read_on
        if read_on.kind == "loop":  # an async dataset: the map's workers finish its batches
            args["max_concurrency"] = read_on.count
            workers = CONSUMER if map_on is None or map_on.kind == "loop" else map_on
        elif map_on is not None and map_on != read_on:
            args["dataset"] = _threaded_reads(self.dataset, read_on, map_on)
            args["max_concurrency"] = read_on.count
            workers = map_on
        args.update(_workers_arguments(workers))
        if "map" in stages:
            args["transform"] = stages["map"].fn
        args["collate_fn"] = stages["collate"].fn
        if "map_batch" in stages:
            args["batch_transform"] = stages["map_batch"].fn
        if "pin" in stages:
            args["pin_memory"] = True
        if "to" in stages:
            args["device"] = stages["to"].fn
        return args

    def __str__(self) -> str:
        return " -> ".join(str(stage) for stage in self.stages)

    def _with(self, stage: Stage, **extras: Any) -> Plan:
        """This plan with `stage` set (replacing its own), in plan order."""
        kept = [s for s in self.stages if s.name != stage.name]
        stages = sorted([*kept, stage], key=lambda s: _ORDER.index(s.name))
        changed = object.__new__(Plan)
        changed._assemble(self.dataset, self.batching, tuple(stages), {**self.extras, **extras})
        return changed


def _threaded_reads(dataset: Any, read_on: Executor, map_on: Executor) -> ThreadedReads:
    """A plain map-style dataset read on threads and mapped on processes: its reads run on
    `read_on`'s threads, awaited on aload's loop, and the samples go to the processes as an
    async dataset's do. Any other pair of executors is refused, saying why."""
    if read_on.kind != "threads" or map_on.kind != "processes" or read_on.count == "auto":
        raise ValueError(
            f"map() on {map_on} after a read on {read_on}: a dataset read by workers is mapped "
            "where it is read (give map() no executor), but for reads on threads(n) (a "
            "number) mapped on processes(n); an async dataset read on loop() maps anywhere"
        )
    if is_iterable_style(dataset) or has_state(dataset):
        raise ValueError(
            "reads on threads() mapped on processes() take a map-style dataset without a "
            f"state_dict() (its reads run on threads of aload's loop), got "
            f"{type(dataset).__name__}"
        )
    return ThreadedReads(dataset, read_on.count)


def _workers_arguments(workers: Executor) -> dict[str, Any]:
    """`DataLoader`'s worker arguments for the workers that read (or finish) batches."""
    if workers.kind == "consumer":
        return {"num_workers": 0}
    arguments: dict[str, Any] = {"num_workers": workers.count}
    arguments["worker_mode"] = {"threads": "thread", "processes": "process"}.get(
        workers.kind, workers.kind
    )
    if workers.context is not None:
        arguments["multiprocessing_context"] = workers.context
    if workers.kind == "ray":
        arguments["ray_options"] = dict(workers.options)
    return arguments


def _check_executor(stage: str, on: object) -> None:
    if not isinstance(on, Executor):
        raise TypeError(
            f"{stage}() runs on an executor: aload.threads(n), aload.processes(n), "
            f"aload.ray_actors(n) or aload.loop(c), got {type(on).__name__}"
        )


def _check_fn(stage: str, fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"{stage}() takes a callable, got {type(fn).__name__}")


def plan_of(config: LoaderConfig, arguments: Mapping[str, Any]) -> Plan:
    """The plan `DataLoader`'s checked arguments (`config`) compile to; the samples and
    batches as the caller gave them (`arguments`), so that `plan.loader()` builds them alike."""
    workers = _executor_of(config)
    dataset, read_on = config.dataset, workers
    if isinstance(dataset, ThreadedReads):  # a plain dataset's reads on threads
        dataset, read_on = dataset.dataset, threads(dataset.threads)
    elif config.asynchronous:
        read_on = loop("auto" if config.reads_tuned else config.max_concurrency)
    batching: dict[str, Any] = {name: arguments.get(name) for name in (*_BATCHING, "distributed")}
    plan = Plan(dataset, **batching).read(
        read_on, retry=arguments.get("retry"), max_skipped=config.max_skipped
    )
    if config.transform is not None:
        plan = plan.map(config.transform, workers if config.asynchronous else None)
    plan = plan.collate(config.collate_fn)
    if config.batch_transform is not None:
        plan = plan.map_batch(config.batch_transform)
    if config.pin_memory:
        plan = plan.pin()
    if config.device is not None:
        plan = plan.to(config.device, to_device=config.to_device, transform=config.device_transform)
    return plan


def _executor_of(config: LoaderConfig) -> Executor:
    """The workers `num_workers` and `worker_mode` name."""
    if config.num_workers == 0:
        return loop(config.max_concurrency) if config.asynchronous else CONSUMER
    count: Any = "auto" if config.workers_tuned else config.num_workers
    if config.worker_mode == "process":
        return Executor("processes", count, config.multiprocessing_context)
    if config.worker_mode == "ray":
        return Executor("ray", count, options=dict(config.ray_options))
    return Executor("threads", count)


def stage_names(config: LoaderConfig, workers_pin: bool) -> tuple[str, ...]:
    """The timed stages of an epoch of `config`: "pin" where its workers pin batches."""
    names = ["read"]
    if config.transform is not None:
        names.append("map")
    names.append("collate")
    if config.batch_transform is not None:
        names.append("map_batch")
    if workers_pin:
        names.append("pin")
    return tuple(names)
