"""Checkpoints: replay an epoch from its start and skip the batches already delivered.

An epoch's batches are decided before its first batch: by the generators' states (the
loader's `generator`, or torch's global RNG when it has none), the samplers' own state, the
dataset's own state (iterable datasets) and the epoch number. A checkpoint holds that start and
which batches reached the consumer, counted when they are yielded (never when prefetched).
Resuming restores the start and skips the delivered batches, so head + resumed tail is exactly
one uninterrupted epoch. Draws from the global RNG are replayed from the recorded state and the
caller's RNG is then put back: resuming neither consumes nor changes it.

The state has one part per training rank (one part without `distributed=True`), gathered from
every rank when it is saved, so that each rank's state is the same whole: it is what
`torch.distributed.checkpoint` keeps once, and what a resume on another number of ranks
re-splits (`_elastic`). Its keys never depend on progress: the parts are one tuple, a value DCP
stores whole, so a fresh loader's `state_dict()` is the template DCP loads into.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from ._version import VERSION
from ._worker_info import draw_base_seed

if TYPE_CHECKING:  # the config's module reads datasets: it imports the readers, which use this
    from ._config import LoaderConfig

FORMAT = 2
"""The state format this aload writes; it reads this one and 1 (one rank's part, unwrapped)."""


def has_state(obj: Any) -> bool:
    """Whether a checkpoint resumes `obj`'s own state (it has `state_dict()` and
    `load_state_dict()`); a dataset that is an `nn.Module` is not asked: that is its weights."""
    return (
        callable(getattr(obj, "state_dict", None))
        and callable(getattr(obj, "load_state_dict", None))
        and not isinstance(obj, torch.nn.Module)
    )


@dataclass(frozen=True)
class DatasetResume:
    """Where a resumed epoch's copies of a map-style dataset stood: each worker's state
    (`{"dataset": ...}`) after its last delivered batch, or before its first. A worker with
    none starts from its new copy, made from the caller's dataset as the epoch started."""

    workers: dict[int, Any]

    def state_for(self, worker: int) -> Any:
        own = self.workers.get(worker)
        return None if own is None else own.get("dataset")

    def rng_for(self, worker: int) -> Any:
        """Where a persistent worker process's RNGs stood when its last epoch ended (its
        `END_REPORT`), if this epoch is the one after it."""
        own = self.workers.get(worker)
        return None if own is None else own.get(RNGS)


END_REPORT = "aload: end of epoch"
"""The indices of the job that asks a persistent worker process, once its epoch's batches are
sent, where its RNGs and its dataset copy's state stand: where its next epoch starts from."""


def end_report(dataset: Any) -> dict[str, Any]:
    """A worker process's answer to `END_REPORT`."""
    report: dict[str, Any] = {RNGS: process_rngs()}
    if has_state(dataset):
        report["dataset"] = dataset.state_dict()
    return report


RNGS = "rng"
"""The key of a worker process's RNGs in its state (`process_rngs()`), reported at the end of
its epoch: where a persistent worker's next epoch draws from."""

ENDED = "ended"
"""Set in a stream worker's state once its stream ended: a resume reads nothing more from it."""

WORKER_START = "start"
"""The key under which a worker's first batch brings the worker's state before it: where to
resume a worker none of whose batches was delivered."""


@dataclass
class Delivered:
    """Which batches of an epoch reached the consumer.

    Map-style batches are named by their position in the sampler's order: every position
    below `prefix`, plus those in `beyond` (batches that finished out of order). Iterable
    datasets count per worker stream, since each worker reads its own stream in order, and
    `next_turn` says which worker's stream comes next. `states`: each worker's dataset state
    (and a stream's iterator's) after its last delivered batch.
    """

    prefix: int = 0
    beyond: set[int] = field(default_factory=set)
    per_worker: dict[int, int] = field(default_factory=dict)
    next_turn: int = 0
    complete: bool = False
    states: dict[int, Any] = field(default_factory=dict)

    def add(self, seq: int, worker: int | None, counted: bool) -> None:
        """Record batch `seq` as yielded (`counted`: it held samples, not an empty stream)."""
        if seq == self.prefix and not self.beyond:  # in order: the usual case
            self.prefix += 1
        else:
            self.beyond.add(seq)
            while self.prefix in self.beyond:
                self.beyond.remove(self.prefix)
                self.prefix += 1
        if worker is not None:
            self.next_turn = worker + 1
            if counted:
                self.per_worker[worker] = self.per_worker.get(worker, 0) + 1

    def keep(self, worker: int | None, state: Any) -> None:
        """Keep the state a delivered batch's worker stands at after it."""
        worker, state = _owner(worker, state)
        self.states[worker] = state

    def arrived(self, worker: int | None, state: Any) -> None:
        """A batch with a worker state came back (not yet delivered). A worker's first brings,
        under `WORKER_START`, its state before the batch: where to resume that worker from
        until one of its batches is delivered (`iter()`'s for a stream)."""
        worker, state = _owner(worker, state)
        start = state.pop(WORKER_START, None)
        if start is not None:
            self.states.setdefault(worker, start)

    def __contains__(self, seq: int) -> bool:
        return seq < self.prefix or seq in self.beyond

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "beyond": sorted(self.beyond),
            "per_worker": dict(self.per_worker),
            "next_turn": self.next_turn,
            "states": dict(self.states),
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any], *, streams: bool) -> Delivered:
        """Restore; for streams only the per-worker counts carry over (batch numbers restart)."""
        per_worker = {int(k): v for k, v in state["per_worker"].items()}
        states = {int(k): v for k, v in state.get("states", {}).items()}
        if streams:
            return cls(per_worker=per_worker, next_turn=state["next_turn"], states=states)
        return cls(state["prefix"], set(state["beyond"]), states=states)


def as_text(rng_state: torch.Tensor) -> str:
    """A generator's state as text (base64), so that a state is plain data: JSON, YAML or a
    DCP leaf hold it as well as `torch.save` does."""
    return base64.b64encode(rng_state.numpy().tobytes()).decode("ascii")


def as_tensor(rng_state: str | torch.Tensor) -> torch.Tensor:
    """A generator's state from `as_text` (or as format 1 kept it: a tensor)."""
    if isinstance(rng_state, torch.Tensor):
        return rng_state
    return torch.frombuffer(bytearray(base64.b64decode(rng_state)), dtype=torch.uint8)


def process_rngs() -> dict[str, Any]:
    """This process's own random generators (torch's, numpy's, Python's), as plain data: a
    worker process keeps drawing from them from one epoch to the next when it persists."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "torch": as_text(torch.get_rng_state()),
        "random": [version, list(internal), gauss],
        "numpy": [kind, np.asarray(keys).tolist(), position, has_gauss, cached],
    }


def restore_process_rngs(states: dict[str, Any]) -> None:
    """Put this process's random generators where `process_rngs()` found them."""
    torch.set_rng_state(as_tensor(states["torch"]))
    version, internal, gauss = states["random"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))


def _owner(worker: int | None, state: Any) -> tuple[int, Any]:
    """The worker a batch's state is of: a stream batch's own; a map-style batch has no worker
    until read, and its state names the one that read it, `(worker, state)`."""
    if worker is None:
        return state
    return worker, state


def _samplers(config: LoaderConfig) -> Iterator[Any]:
    """The sampler objects whose state decides the order, outermost first, each once."""
    seen: set[int] = set()
    for candidate in (
        config.batch_sampler,
        getattr(config.batch_sampler, "sampler", None),
        config.sampler,
    ):
        if candidate is not None and id(candidate) not in seen:
            seen.add(id(candidate))
            yield candidate


def capture_start(config: LoaderConfig, epoch: int, *, starting: bool) -> dict[str, Any]:
    """Snapshot what decides the batches of epoch `epoch`.

    `starting`: the epoch starts now, so the global RNG it will draw from is recorded too;
    otherwise (a state saved between epochs) the next epoch draws afresh when it starts.
    `base_seed` and `drew_base_seed` are filled in once the epoch has its workers. The
    generators' states are kept as tensors (copies) until a state is saved (`plain_start`).
    """
    samplers = []
    for sampler in _samplers(config):
        generator = getattr(sampler, "generator", None)
        if hasattr(sampler, "state_dict") and hasattr(sampler, "load_state_dict"):
            samplers.append({"state_dict": sampler.state_dict()})
        elif isinstance(generator, torch.Generator):
            samplers.append({"generator": generator.get_state()})
        elif generator is not None:
            samplers.append({"unreplayable": type(sampler).__name__})
        else:
            samplers.append({})
    dataset = config.dataset
    dataset_state = None
    # What workers copy their dataset from (a worker none of whose batches is delivered
    # resumes from it). A state made by `__iter__` does not exist yet: nothing to keep. A
    # starting map-style epoch takes it once its draws are made (the loader's `_epoch`).
    if has_state(dataset) and (config.iterable or not starting):
        with suppress(AttributeError):
            dataset_state = dataset.state_dict()
    own = config.generator
    return {
        "epoch": epoch,
        "generator": None if own is None else own.get_state(),
        "global_rng": torch.get_rng_state() if own is None and starting else None,
        "samplers": samplers,
        "dataset": dataset_state,
        "base_seed": None,
        "drew_base_seed": True,
    }


def plain_start(start: dict[str, Any]) -> dict[str, Any]:
    """`start` as plain data, for a saved state: its generators' states as text (`as_text`),
    encoded only now, not at every epoch's start."""

    def text(rng_state: Any) -> Any:
        return as_text(rng_state) if isinstance(rng_state, torch.Tensor) else rng_state

    samplers = [
        {**saved, "generator": text(saved["generator"])} if "generator" in saved else saved
        for saved in start["samplers"]
    ]
    return {
        **start,
        "generator": text(start["generator"]),
        "global_rng": text(start["global_rng"]),
        "samplers": samplers,
    }


def restore_start(config: LoaderConfig, start: dict[str, Any]) -> None:
    """Put the generators, samplers and dataset back as they were when the epoch started
    (the global RNG is replayed separately, by `replaying_draws`)."""
    if start["generator"] is not None and config.generator is not None:
        config.generator.set_state(as_tensor(start["generator"]))
    for sampler, saved in zip(_samplers(config), start["samplers"], strict=True):
        if "state_dict" in saved:
            sampler.load_state_dict(saved["state_dict"])
        elif "generator" in saved:
            sampler.generator.set_state(as_tensor(saved["generator"]))
    if start["dataset"] is not None:
        config.dataset.load_state_dict(start["dataset"])


@contextmanager
def replaying_draws(start: dict[str, Any] | None) -> Iterator[None]:
    """Inside: torch's global RNG stands where it stood when the resumed epoch started, so
    its draws (the workers' base seed, the sampler's seed) repeat; after: the caller's RNG
    is as it was before, unless it stands where the saved epoch's stood once its base seed
    was drawn (a dataset that checkpoints torch's RNG, saved before a single-process epoch
    started its sampler): then it moves on by the sampler's draws, as that epoch's did."""
    recorded = None if start is None else start.get("global_rng")
    if recorded is None:
        yield
        return
    callers = torch.get_rng_state()
    torch.set_rng_state(as_tensor(recorded))
    try:
        yield
    finally:
        if not torch.equal(callers, _after_base_seed(start)):  # type: ignore[arg-type]
            torch.set_rng_state(callers)


def _after_base_seed(start: dict[str, Any]) -> torch.Tensor:
    """The global RNG of a saved epoch once it drew its workers' base seed (from the global
    RNG when the loader has no generator), before its sampler drew."""
    replay = torch.Generator()
    replay.set_state(as_tensor(start["global_rng"]))
    if start["generator"] is None and start["drew_base_seed"]:
        draw_base_seed(replay)
    return replay.get_state()


def fingerprint(config: LoaderConfig) -> dict[str, Any]:
    """What a state must agree with to describe this loader's epochs (with
    `distributed=True`, the same on every rank: each rank's part is found by its rank)."""
    index_sampler = config.index_sampler
    sampler = config.sampler
    replicas = None
    if not config.distributed:  # a DistributedSampler of the caller's: one rank's state
        replicas = [getattr(sampler, "num_replicas", None), getattr(sampler, "rank", None)]
    return {
        "dataset_length": None if config.iterable else len(config.dataset),
        "batch_size": config.batch_size,
        "drop_last": config.drop_last,
        "sampler": None if sampler is None else type(sampler).__name__,
        "batches_per_epoch": _length(index_sampler),
        "stream_workers": config.stream_count if config.iterable else None,
        "replicas": replicas,
    }


def whole_state(config: LoaderConfig, part: dict[str, Any]) -> dict[str, Any]:
    """The state of the loader whose own part (start, delivered) is `part`: with
    `distributed=True`, every rank's part, gathered (a collective: every rank calls it)."""
    parts: list[dict[str, Any] | None] = [part]
    if config.distributed and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, part)
    return {
        "format": FORMAT,
        "aload": VERSION,
        "fingerprint": fingerprint(config),
        "ranks": tuple(parts),  # DCP keeps a tuple whole: the keys stay those of any state
    }


def readable(state: Any, config: LoaderConfig) -> dict[str, Any]:
    """`state` in this aload's format, or a ValueError saying why it cannot be read."""
    if not isinstance(state, dict) or "format" not in state:
        raise ValueError("state must be a dict returned by aload's DataLoader.state_dict()")
    if state["format"] == 1:  # one rank's part, unwrapped
        part = {"start": state["start"], "delivered": state["delivered"]}
        saved = dict(state["fingerprint"])
        parts: list[dict[str, Any] | None] = [part]
        if config.distributed and saved["replicas"][0] is not None:
            world, rank = saved["replicas"]
            parts = [None] * world
            parts[rank] = part
            saved["replicas"] = None
        return {**state, "format": FORMAT, "fingerprint": saved, "ranks": tuple(parts)}
    if state["format"] != FORMAT:
        saved_by = f" by aload {state['aload']}" if "aload" in state else ""
        raise ValueError(
            f"cannot resume: the state was saved{saved_by} in state format "
            f"{state['format']!r}, and this aload reads formats 1 and {FORMAT}: resume with "
            "the aload version that saved it"
        )
    return state


def rank_part(state: dict[str, Any], config: LoaderConfig) -> dict[str, Any]:
    """This rank's part of a whole state: its own, or, saved by another number of ranks, the
    rest of the epoch re-split over this world (a `resplit` stage added to its start)."""
    parts = state["ranks"]
    if not config.distributed:
        return parts[0]
    sampler = config.sampler
    world, rank = sampler.num_replicas, sampler.rank  # type: ignore[union-attr]
    if len(parts) == world:
        if parts[rank] is None:
            raise ValueError(
                f"cannot resume rank {rank}: the state (aload's format 1) holds another "
                "rank's part only; load each rank's own state"
            )
        return parts[rank]
    if any(part is None for part in parts):
        raise ValueError(
            f"cannot resume on {world} ranks: the state (aload's format 1) holds one rank's "
            f"part of {len(parts)}; resume on {len(parts)} ranks"
        )
    if not any(part["delivered"]["prefix"] or part["delivered"]["beyond"] for part in parts):
        return {"start": parts[0]["start"], "delivered": Delivered().to_dict()}
    start = dict(parts[rank % len(parts)]["start"])
    stage = {"world": len(parts), "delivered": [part["delivered"] for part in parts]}
    start["resplit"] = [*parts[0]["start"].get("resplit", []), stage]
    return {"start": start, "delivered": Delivered().to_dict()}


def check_resumable(state: dict[str, Any], config: LoaderConfig) -> None:
    """Raise ValueError if `state` was saved by a loader of other settings, or cannot replay."""
    saved = state["fingerprint"]
    world = len(state["ranks"])
    elastic = config.distributed and world != config.sampler.num_replicas  # type: ignore[union-attr]
    for key, value in fingerprint(config).items():
        if elastic and key == "batches_per_epoch":  # a rank's share: re-split on resume
            continue
        if saved.get(key) != value:
            raise ValueError(
                f"cannot resume: the state was saved with {key}={saved.get(key)!r}, "
                f"but this DataLoader has {key}={value!r}"
            )
    for part in state["ranks"]:
        for sampler in [] if part is None else part["start"]["samplers"]:
            if "unreplayable" in sampler:
                raise ValueError(
                    f"cannot resume: the {sampler['unreplayable']} draws from a generator that "
                    "is not a torch.Generator, so its order cannot be replayed; give it a "
                    "torch.Generator or state_dict()/load_state_dict() methods"
                )


def _length(sized: Any) -> int | None:
    try:
        return len(sized)
    except TypeError:
        return None
