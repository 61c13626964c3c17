"""Ray workers: batches read by a pool of Ray actors, on the nodes of the connected cluster.

The dataset goes to the object store once (`ray.put`), and each actor gets it from there with
the pool's reader plan, as a worker process gets them at start; an epoch then sends only what
changes, and a job sends only its indices. Results come back through the object store; each
task's future calls back on Ray's own thread, which hands the batch to the scheduler's mailbox,
so hundreds of batches can be in flight without a thread each.

An actor that dies (its node lost, out of memory, killed) costs no batch: the batches it held
run again on another actor, a new actor takes its place (`loader.stats` counts it), and a batch
that fails on two actors raises, naming both. That is done on one thread of the pool's: Ray's
callback thread must not call Ray. A stream's actor holds where its stream stands: a stream
whose actor dies ends the epoch with an error (resume it from the last `state_dict()`).

`ray.init()` is the caller's: aload joins the cluster the process is connected to.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import queue
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

from .._fetch import Abandoned, timed_call
from .._plans import ProcessRead, ReaderPlan
from . import Job
from ._out_of_band import OutOfBand
from .process import (
    _Task,
    _wire_error,
    _wire_report,
    epoch_reader,
    hand_over,
    start_worker,
)

logger = logging.getLogger("aload")

# How long the actors may take to start before the loader says that they wait for room.
_START_PATIENCE_SECONDS = 10.0

_NEEDS_RAY = (
    "worker_mode='ray' reads batches on a Ray cluster: install it (pip install 'aload[ray]') "
    "and connect this process to one first: ray.init() starts a local cluster, "
    "ray.init(address='auto') joins the one `ray start --head` runs on this machine"
)


_COULD_NOT_START = (
    "aload's Ray actor could not start. An actor gets the dataset (and worker_init_fn, "
    "collate_fn, transform) from the object store and imports their classes by name: their "
    "module must be importable on the cluster's nodes (ray.init(runtime_env={'py_modules': "
    "[...]}) or {'working_dir': ...}), or defined in the script you run"
)


def _ray() -> Any:
    """The `ray` module, connected; else a RuntimeError saying how to connect."""
    try:
        import ray
    except ImportError as error:
        raise RuntimeError(_NEEDS_RAY) from error
    if not ray.is_initialized():
        raise RuntimeError(_NEEDS_RAY)
    return ray


class _NeverAbandoned:
    """An actor reads each task to its end: an abandoned batch's result is dropped instead."""

    value = 0


class RayWorker:
    """One actor: a worker made as torch makes one, reading the batches sent to it."""

    def __init__(
        self,
        dataset: Any,
        worker_id: int,
        num_workers: int,
        base_seed: int,
        worker_init_fn: Callable[[int], None] | None,
        plan: ReaderPlan,
    ) -> None:
        self._init_error = start_worker(
            worker_id, num_workers, base_seed, dataset, worker_init_fn, mode="ray"
        )
        self._id, self._dataset, self._base_seed = worker_id, dataset, base_seed
        self._plan = plan
        self._start_epoch(None)

    def _start_epoch(self, update: dict[str, Any] | None) -> None:
        if update is not None:
            self._plan = dataclasses.replace(self._plan, **update)
        self._reads, self._reader = epoch_reader(
            self._plan, self._dataset, self._base_seed, self._init_error
        )

    def read(self, update: dict[str, Any] | None, indices: Any) -> tuple[Any, ...]:
        """One batch: `(ok, batch or error, retries and skips, the worker's state, (seconds
        reading, seconds collating))`;
        `update`: the first batch of an epoch brings where that epoch starts."""
        if update is not None:
            self._start_epoch(update)
        if self._init_error is not None:
            return False, _wire_error(self._init_error), None, None, None
        task = _Task(indices, self._id, _NeverAbandoned)
        try:
            batch, timing = timed_call(self._reader, task)  # type: ignore[arg-type] # started
        except Abandoned:  # pragma: no cover - nothing abandons an actor's task
            return False, _wire_error(RuntimeError("abandoned")), None, None, None
        except BaseException as error:
            return False, _wire_error(error), _wire_report(self._reads), None, None
        return True, batch, _wire_report(self._reads), task.state, timing

    def node(self) -> str:
        """Where this actor runs, for errors that name it."""
        import ray

        return str(ray.get_runtime_context().get_node_id())


@dataclasses.dataclass
class _Sent:
    """A job on its way: the actor it went to, and the actors it failed on before."""

    job: Any
    worker: int
    failed_on: tuple[str, ...] = ()


class RayPool:
    """`num_workers` Ray actors reading batches; jobs carry a `ProcessRead` as their `read`.

    Args:
        options: passed to Ray's `.options()` for each actor, in Ray's own words
            (`num_cpus`, `resources`, `scheduling_strategy`, `label_selector`, ...).
    """

    where = "Ray actors"  # what runs its jobs, for the stats' stages

    def __init__(
        self,
        num_workers: int,
        dataset: Any,
        worker_init_fn: Callable[[int], None] | None,
        base_seed: int,
        plan: ReaderPlan,
        options: dict[str, Any],
        pin: bool = False,
        background: bool = False,
    ) -> None:
        ray = _ray()
        self._ray = ray
        self._pin = pin
        # Two locks, for Ray's callback thread must never wait on a thread that waits on
        # Ray (a kill, even a submit, may wait for that thread): `_sending` orders the calls
        # to Ray that send and replace (an epoch's start reaches an actor before its
        # batches); `_lock` guards the books, is held only briefly, never across a Ray call,
        # and is the only one the callback takes.
        self._sending = threading.RLock()
        self._lock = threading.Lock()
        self._closed = False
        self._failure: BaseException | None = None  # why the actors could not start
        self._asks = {"num_cpus": 1, **options}
        self._actor_class = ray.remote(RayWorker).options(**self._asks)
        self._started: list[Any] = []  # each actor's first call: it answers once it runs
        self._actors: list[Any] = []
        self._stopping: list[Any] = []  # the actors a shutdown took, for the keeper to stop
        self._plans: list[ReaderPlan | None] = [plan] * num_workers
        self._outstanding: list[dict[int, _Sent]] = [{} for _ in range(num_workers)]
        self.replaced = 0
        # Jobs submitted before the actors exist; None once they do.
        self._waiting: list[tuple[Job, int | None]] | None = []
        # Batches whose actor died, handled on a thread of the pool's own (Ray's callback
        # thread must not call Ray); None stops it.
        self._deaths: queue.SimpleQueue[tuple[_Sent, Any, Any] | None] = queue.SimpleQueue()
        # Putting the dataset in the object store pickles it (a pause as long as the dataset
        # is large): for `async for`, the keeper does it once the consumer waits (`begin`).
        self._begun = threading.Event()
        setup: tuple[Any, ...] | None = (dataset, num_workers, base_seed, worker_init_fn, plan)
        if not background:
            self._begun.set()
            self._start_actors(dataset, num_workers, base_seed, worker_init_fn, plan)
            setup = None
        self._keeper = threading.Thread(
            target=self._keep_actors, args=(setup,), name="aload-ray-keeper", daemon=True
        )
        self._keeper.start()

    def _start_actors(
        self,
        dataset: Any,
        num_workers: int,
        base_seed: int,
        worker_init_fn: Callable[[int], None] | None,
        plan: ReaderPlan,
    ) -> None:
        """Put the dataset in the object store, start the actors, send the jobs that waited."""
        actors: list[Any] = []
        with self._sending:
            if not self._closed:
                self._start_args = (
                    _put(self._ray, dataset),
                    num_workers,
                    base_seed,
                    worker_init_fn,
                    plan,
                )
                actors = [self._start(worker) for worker in range(num_workers)]
                self._started = [actor.node.remote() for actor in actors]
            with self._lock:
                shut = self._closed  # while the actors started
                if not shut:
                    self._actors = actors
                waiting, self._waiting = self._waiting or [], None
        for actor in actors if shut else []:
            self._ray.kill(actor, no_restart=True)
        for job, worker in waiting:
            self.submit(job, worker)

    def _keep_actors(self, setup: tuple[Any, ...] | None) -> None:
        if setup is not None:
            self._begun.wait()
            try:
                self._start_actors(*setup)
            except BaseException as error:  # each job hears of it
                with self._lock:
                    waiting, self._waiting = self._waiting or [], None
                    self._failure = error
                for job, _ in waiting:
                    job.fail(error)
            del setup
        self._say_if_actors_wait()
        while (death := self._deaths.get()) is not None:
            try:
                self._actor_died(*death)
            except BaseException as error:  # the batch must hear of it, not wait forever
                death[0].job.fail(error)
        for actor in self._stopping:  # here, not on the consumer's thread (or loop)
            self._ray.kill(actor, no_restart=True)

    def _say_if_actors_wait(self) -> None:
        """Log a warning when actors have not started after `_START_PATIENCE_SECONDS`: Ray
        holds an actor until the cluster has room for what it asks, so the epoch would wait
        without a word (often for the actors of another loader's persistent pool)."""
        started, self._started = self._started, []
        if not started:
            return
        _, waiting = self._ray.wait(
            started, num_returns=len(started), timeout=_START_PATIENCE_SECONDS
        )
        if waiting and not self._closed:
            free = self._ray.available_resources()
            logger.warning(
                "%d of aload's %d Ray actors have not started after %g s: the cluster has no "
                "room for them yet (each asks for %s; free now: %s CPUs, %s GPUs). Another "
                "loader's persistent actors may hold it: close() that loader, or ask for less "
                "(fewer num_workers, ray_options={'num_cpus': ...})",
                len(waiting),
                len(started),
                _START_PATIENCE_SECONDS,
                self._asks,
                free.get("CPU", 0),
                free.get("GPU", 0),
            )

    def _start(self, worker: int) -> Any:
        dataset, num_workers, base_seed, worker_init_fn, plan = self._start_args
        return self._actor_class.remote(
            dataset, worker, num_workers, base_seed, worker_init_fn, plan
        )

    def begin(self) -> None:
        self._begun.set()

    def submit(self, job: Job, worker: int | None = None) -> None:
        with self._sending:
            with self._lock:
                if self._closed:
                    job.fail(RuntimeError("aload's Ray actors were shut down before this batch"))
                    return
                if self._failure is not None:
                    job.fail(self._failure)
                    return
                if self._waiting is not None:
                    self._waiting.append((job, worker))
                    return
                if worker is None and not self._closed:
                    worker = self._least_busy()
            sent = self._send(_Sent(job, worker or 0))
        if sent is not None:
            self._when_done(*sent)

    def _least_busy(self, besides: int | None = None) -> int:
        others = [w for w in range(len(self._actors)) if w != besides] or [besides or 0]
        return min(others, key=lambda w: len(self._outstanding[w]))

    def _send(self, sent: _Sent) -> tuple[_Sent, Any, Any] | None:
        """Send a job to its actor (holding `_sending`), with its epoch's start if that
        actor has not had it; the task's reference, for `_when_done`."""
        read: ProcessRead = sent.job.read
        update = None
        with self._lock:
            if self._closed:
                sent.job.fail(RuntimeError("aload's Ray actors were shut down before this batch"))
                return None
            if self._plans[sent.worker] is not read.plan:
                update = read.plan.for_epoch()
                self._plans[sent.worker] = read.plan
            actor = self._actors[sent.worker]
            self._outstanding[sent.worker][id(sent.job)] = sent
        return sent, actor, actor.read.remote(update, sent.job.indices)

    def _when_done(self, sent: _Sent, actor: Any, reference: Any) -> None:
        """Have the result handed over when it comes (out of the lock: a task already done
        calls back at once, on this thread)."""
        reference.future().add_done_callback(partial(self._finished, sent, actor))

    def _finished(self, sent: _Sent, actor: Any, future: Any) -> None:
        """On Ray's thread: hand the batch (or its error) to the job."""
        with self._lock:
            self._outstanding[sent.worker].pop(id(sent.job), None)
        try:
            reply = future.result()
        except self._ray.exceptions.RayActorError as error:
            # Not here: Ray's callback thread must not call Ray (a kill waits on it).
            self._deaths.put((sent, actor, error))
            return
        except BaseException as error:  # Ray could not run the task
            sent.job.fail(error)
            return
        hand_over(sent.job, reply, self._pin, partial(_rebuild_actor_error, worker=sent.worker))

    def _actor_died(self, sent: _Sent, actor: Any, error: Any) -> None:
        """Replace the dead actor, and run its batch again elsewhere: once."""
        if error.actor_init_failed:  # another actor would fail the same way
            failed = RuntimeError(_COULD_NOT_START + f" ({error})")
            failed.__cause__ = error
            sent.job.fail(failed)
            return
        first_line = str(error).strip().splitlines()[0]  # Ray's whole message is the cause's
        where = f"aload Ray actor {sent.worker} ({type(error).__name__}: {first_line})"
        with self._sending:
            with self._lock:
                if self._closed:
                    return
                first_to_hear = self._actors[sent.worker] is actor
            if first_to_hear:  # the first of its batches to hear of it replaces it
                self._ray.kill(actor, no_restart=True)  # one that is only unreachable, too
                replacement = self._start(sent.worker)
                with self._lock:
                    shut = self._closed  # while the replacement started
                    if not shut:
                        self._actors[sent.worker] = replacement
                        self._plans[sent.worker] = None
                        self.replaced += 1
                if shut:
                    self._ray.kill(replacement, no_restart=True)
                    return
                sent.job.read.reads.count_replaced()
            failed_on = (*sent.failed_on, where)
            if sent.job.worker is not None:
                sent.job.fail(
                    RuntimeError(
                        f"{where} died while reading its stream, which it held: resume the "
                        "epoch from the loader's last state_dict()"
                    )
                )
                return
            if len(failed_on) >= 2:
                failed = RuntimeError(
                    f"{sent.job.describe()} failed on two actors: " + "; ".join(failed_on)
                )
                failed.__cause__ = error
                sent.job.fail(failed)
                return
            with self._lock:
                again = self._least_busy(besides=sent.worker)
            resent = self._send(_Sent(sent.job, again, failed_on))
        if resent is not None:
            self._when_done(*resent)

    def shutdown(self) -> None:
        """Stop the actors (on the keeper: a kill waits on Ray); batches they hold are
        dropped. Does not wait."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stopping, self._actors = self._actors, []
            waiting, self._waiting = self._waiting or [], None
        self._begun.set()  # a start not begun yet ends at once
        for job, _ in waiting:
            job.fail(RuntimeError("aload's Ray actors were shut down before this batch"))
        self._deaths.put(None)  # the keeper stops the actors, and ends

    def join(self, timeout: float | None = None) -> bool:
        self._keeper.join(timeout)
        return not self._keeper.is_alive()

    @property
    def alive(self) -> bool:
        """Until shut down and the keeper has stopped every actor."""
        return self._keeper.is_alive()

    @property
    def alive_workers(self) -> int:
        return 0 if self._closed else len(self._actors)

    def timed_out(self, job: Job) -> None:
        """Stop the actor holding the late batch (a new one takes its place)."""
        with self._lock:
            late = [
                self._actors[worker]
                for worker, outstanding in enumerate(self._outstanding)
                if id(job) in outstanding and not self._closed
            ]
        for actor in late:
            self._ray.kill(actor, no_restart=True)


def _put(ray: Any, dataset: Any) -> Any:
    """The dataset in the object store, once for every actor, its tensors out of band; a
    clear error if it cannot go."""
    try:
        return ray.put(OutOfBand(dataset))
    except (pickle.PicklingError, TypeError, AttributeError) as error:
        reason = error.__cause__ or error  # Ray's own message is a page long
        raise TypeError(
            "worker_mode='ray' sends the dataset to Ray's object store, but it could not be "
            f"pickled ({reason}); give it only what pickles (open files and connections in "
            "worker_init_fn or on first use), or use worker_mode='thread'"
        ) from error


def _rebuild_actor_error(payload: tuple[BaseException, str], worker: int) -> BaseException:
    error, text = payload
    error.add_note(f"aload Ray actor {worker} raised:\n{text}")
    return error
