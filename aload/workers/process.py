"""Process workers, for datasets whose Python code holds the GIL (parsing, tokenizing).

Each worker process gets the dataset once, at start, and builds its reader from a small plan
sent at each epoch; jobs then carry only indices. Batches come back through torch's
shared-memory reductions, not as pickled bytes. One pipe each way per worker: sends pickle
at once, so a dataset or collate_fn that cannot be pickled fails at the call that sent it, not
in a background thread. A collector thread waits on every result pipe and every process
sentinel together, so a worker that dies (killed, out of memory) fails its batches at once.
Only the collector looks at a process's state (a forkserver child's exit code is read from a
pipe, once: two threads polling it race, and the loser is told 255); others read what it
recorded.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import pickle
import random
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np
import torch
import torch.multiprocessing  # registers the reductions that send tensors via shared memory
import torch.utils.data._utils.worker as torch_worker

from .._cuda import pin_batch
from .._fetch import Abandoned
from .._plans import ReaderPlan
from .._worker_info import WorkerInfo
from . import Job
from ._exit import stop_at_exit

_GRACE_SECONDS = 5.0  # how long a worker may finish its task after shutdown before it is killed


def resolve_context(context: Any) -> multiprocessing.context.BaseContext:
    """A multiprocessing context from a start method name, a context, or None (the default).

    The default is "forkserver" where the platform has it: a parent that runs an event loop
    and thread pools must not be forked bare; the fork server is, instead, a clean process that
    forks workers quickly once it has imported aload (the first start pays for that import).
    """
    if context is None:
        methods = multiprocessing.get_all_start_methods()
        context = "forkserver" if "forkserver" in methods else "spawn"
    if isinstance(context, str):
        if context not in multiprocessing.get_all_start_methods():
            raise ValueError(
                "multiprocessing_context option should specify a valid start method in "
                f"{multiprocessing.get_all_start_methods()!r}, but got "
                f"multiprocessing_context={context!r}"
            )
        context = multiprocessing.get_context(context)
        if context.get_start_method() == "forkserver":
            context.set_forkserver_preload(["aload"])
    if not isinstance(context, multiprocessing.context.BaseContext):
        raise TypeError(
            "multiprocessing_context option should be a valid context object or a string "
            f"specifying the start method, but got multiprocessing_context={context}"
        )
    return context


class ProcessPool:
    """`num_workers` processes reading batches; jobs carry a `ReaderPlan` as their `read`.

    Raises:
        TypeError: at start, when the dataset or worker_init_fn cannot be sent to a process.
    """

    def __init__(
        self,
        num_workers: int,
        context: multiprocessing.context.BaseContext,
        dataset: Any,
        worker_init_fn: Callable[[int], None] | None,
        base_seed: int,
        pin: bool = False,
    ) -> None:
        self._pin = pin
        self._lock = threading.Lock()
        self._closed = False
        self._outstanding: list[dict[int, Any]] = [{} for _ in range(num_workers)]
        self._dead: dict[int, int | None] = {}  # worker -> exit code, recorded by the collector
        self._failure: BaseException | None = None  # why the collector gave up, if it did
        self._stopped_late: set[int] = set()  # workers stopped because a batch timed out
        self._plans: list[Any] = [None] * num_workers
        self._next = 0
        self._tasks: list[Connection] = []
        self._results: list[Connection] = []
        self._processes: list[Any] = []
        # Set at shutdown: workers drop what is queued and stop between two items, so none
        # is killed in the middle of writing a batch to shared memory. A plain shared byte:
        # workers read it once per item, without a lock.
        self._abandon = context.Value("b", 0, lock=False)
        try:
            for worker_id in range(num_workers):
                task_reader, task_writer = context.Pipe(duplex=False)
                result_reader, result_writer = context.Pipe(duplex=False)
                process = context.Process(  # type: ignore[attr-defined] # every context has it
                    target=_work,
                    args=(
                        worker_id,
                        num_workers,
                        base_seed,
                        dataset,
                        worker_init_fn,
                        task_reader,
                        result_writer,
                        self._abandon,
                    ),
                    name=f"aload-worker-{worker_id}",
                    daemon=True,
                )
                process.start()
                task_reader.close()
                result_writer.close()
                self._tasks.append(task_writer)
                self._results.append(result_reader)
                self._processes.append(process)
        except (pickle.PicklingError, TypeError, AttributeError) as error:
            self._terminate()
            raise TypeError(
                "worker_mode='process' sends the dataset and worker_init_fn to each worker "
                f"process, but they could not be pickled ({error}); define them at module "
                "level, or use worker_mode='thread'"
            ) from error
        self._collector = threading.Thread(
            target=self._collect, name="aload-worker-collector", daemon=True
        )
        self._collector.start()
        stop_at_exit(pool=self, thread=self._collector)

    def submit(self, job: Job, worker: int | None = None) -> None:
        plan: ReaderPlan = job.read  # type: ignore[attr-defined]
        with self._lock:
            if self._closed:
                job.fail(RuntimeError("aload worker processes were shut down before this batch"))
                return
            if self._failure is not None:
                job.fail(_pool_failed(self._failure))
                return
            if worker is None:
                worker = self._least_busy()
            if worker in self._dead:
                job.fail(self._death(worker, job))
                return
            try:
                if self._plans[worker] is not plan:
                    self._tasks[worker].send_bytes(_dumps(plan, "collate_fn and transform"))
                    self._plans[worker] = plan
                self._outstanding[worker][id(job)] = job
                self._tasks[worker].send((id(job), job.indices))  # type: ignore[attr-defined]
            except (BrokenPipeError, OSError):
                self._outstanding[worker].pop(id(job), None)
                job.fail(self._death(worker, job))

    def shutdown(self) -> None:
        """Stop the workers after the item each is reading (queued work is dropped), as
        torch's workers stop; one still busy `_GRACE_SECONDS` later is killed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._closed_at = time.monotonic()
            self._abandon.value = 1
            for worker, tasks in enumerate(self._tasks):
                with contextlib.suppress(BrokenPipeError, OSError):
                    tasks.send(None)
                self._outstanding[worker].clear()

    def join(self, timeout: float | None = None) -> bool:
        self._collector.join(timeout)
        return not self.alive

    @property
    def broken(self) -> bool:
        """Whether a worker process has died (been killed, run out of memory), or the pool
        can no longer talk to its workers."""
        failed = self._dead or self._stopped_late or self._failure is not None
        return not self._closed and bool(failed)

    @property
    def alive(self) -> bool:
        """Whether anything of the pool runs: the collector ends after reaping every worker."""
        return self._collector.is_alive()

    @property
    def alive_workers(self) -> int:
        with self._lock:
            return len(self._processes) - len(self._dead)

    def timed_out(self, job: Job) -> None:
        """Stop the worker that holds `job`: it is stuck, and every batch sent to it would
        wait behind it. The pool then counts as broken, so a persistent one is replaced."""
        with self._lock:
            for worker, outstanding in enumerate(self._outstanding):
                if id(job) in outstanding and worker not in self._dead:
                    self._stopped_late.add(worker)
                    self._processes[worker].kill()

    def __del__(self) -> None:
        if hasattr(self, "_collector"):
            self.shutdown()

    def _least_busy(self) -> int:
        live = [w for w in range(len(self._processes)) if w not in self._dead] or [0]
        worker = min(live, key=lambda w: (len(self._outstanding[w]), (w - self._next) % len(live)))
        self._next = worker + 1
        return worker

    def _collect(self) -> None:
        """Hand results to their jobs; fail the jobs of a worker that died; reap at the end.

        Should this thread fail (a result that cannot be received: too many open files),
        every job waiting on the pool fails with the reason and the workers are stopped:
        the consumer gets an error, never a wait without end.
        """
        try:
            self._collect_until_reaped()
        except BaseException as error:
            self._give_up(_explain_receive_error(error))

    def _give_up(self, error: BaseException) -> None:
        with self._lock:
            self._failure = error
            jobs = [job for outstanding in self._outstanding for job in outstanding.values()]
            for outstanding in self._outstanding:
                outstanding.clear()
        for job in jobs:
            job.fail(_pool_failed(error))
        for process in self._processes:
            with contextlib.suppress(Exception):
                process.kill()
                process.join(_GRACE_SECONDS)

    def _collect_until_reaped(self) -> None:
        open_results = dict(enumerate(self._results))
        worker_of = {connection: w for w, connection in enumerate(self._results)}
        sentinels = {p.sentinel: w for w, p in enumerate(self._processes)}
        while sentinels:  # until every worker process has ended
            ready = wait(list(open_results.values()) + list(sentinels), timeout=0.5)
            if self._closed and time.monotonic() - self._closed_at > _GRACE_SECONDS:
                for worker in sentinels.values():  # still busy after shutdown: stop it now
                    self._processes[worker].kill()
            for item in ready:
                if item in sentinels:
                    worker = sentinels.pop(item)
                    self._processes[worker].join()  # reaped here, by this thread only
                    with self._lock:
                        self._dead[worker] = self._processes[worker].exitcode
                    self._drain(worker, open_results)
                    open_results.pop(worker, None)
                    self._fail_outstanding(worker)
                elif worker_of[item] in open_results:  # type: ignore[index]
                    self._receive(worker_of[item], open_results)  # type: ignore[index]

    def _drain(self, worker: int, open_results: dict[int, Connection]) -> None:
        results = open_results.get(worker)
        while results is not None and worker in open_results and results.poll():
            self._receive(worker, open_results)

    def _receive(self, worker: int, open_results: dict[int, Connection]) -> None:
        try:
            key, ok, payload = self._results[worker].recv()
        except OSError as error:
            if error.errno == errno.EMFILE:  # the pipe is fine; this process is out of files
                raise
            open_results.pop(worker, None)
            return
        except EOFError:
            open_results.pop(worker, None)
            return
        with self._lock:
            job = self._outstanding[worker].pop(key, None)
        if job is None:
            return
        if ok:
            job.deliver(pin_batch(payload) if self._pin else payload)
        else:
            job.fail(_rebuild_error(payload, worker, self._processes[worker].pid))

    def _fail_outstanding(self, worker: int) -> None:
        with self._lock:
            jobs = list(self._outstanding[worker].values())
            self._outstanding[worker].clear()
        if self._closed:
            return
        for job in jobs:
            job.fail(self._death(worker, job))

    def _death(self, worker: int, job: Any) -> RuntimeError:
        """torch's words for a worker that died, then which batch it took with it."""
        pid = self._processes[worker].pid
        code = self._dead.get(worker)
        if worker in self._stopped_late:
            what = f"DataLoader worker (pid {pid}) was stopped: a batch it held timed out."
        elif code is not None and code < 0:
            what = f"DataLoader worker (pid {pid}) is killed by signal: {_signal_name(-code)}."
        else:
            what = f"DataLoader worker (pid {pid}) exited unexpectedly with exit code {code}."
        return RuntimeError(f"{what} It was aload worker {worker}, loading {job.describe()}")

    def _terminate(self) -> None:
        for process in self._processes:
            process.kill()
            process.join()


def _signal_name(number: int) -> str:
    try:
        return signal.strsignal(number) or f"signal {number}"
    except ValueError:
        return f"signal {number}"


_TOO_MANY_FILES = (
    "Too many open files. Communication with the workers is no longer possible. Please "
    "increase the limit using `ulimit -n` in the shell or change the sharing strategy by "
    "calling `torch.multiprocessing.set_sharing_strategy('file_system')` at the beginning of "
    "your code"
)


def _explain_receive_error(error: BaseException) -> BaseException:
    """torch's message where the cause is the open-files limit (tensors arrive as file
    descriptors, one each); any other error as it is."""
    out_of_files = (isinstance(error, OSError) and error.errno == errno.EMFILE) or (
        isinstance(error, RuntimeError) and "ancdata" in str(error)
    )
    if out_of_files:
        explained = RuntimeError(_TOO_MANY_FILES)
        explained.__cause__ = error
        return explained
    return error


def _pool_failed(error: BaseException) -> RuntimeError:
    """A fresh error for each job that the pool's failure took down (each gets its own
    notes), caused by that failure."""
    failed = RuntimeError(f"aload worker processes stopped: {error}")
    failed.__cause__ = error
    return failed


def _dumps(value: Any, what: str) -> bytes:
    try:
        return bytes(multiprocessing.reduction.ForkingPickler.dumps(value))
    except (pickle.PicklingError, TypeError, AttributeError) as error:
        raise TypeError(
            f"worker_mode='process' sends {what} to each worker process, but they could not "
            f"be pickled ({error}); define them at module level, or use worker_mode='thread'"
        ) from error


class _Task:
    """What a reader sees of a job, inside a worker process."""

    __slots__ = ("_abandon", "indices", "worker")

    def __init__(self, indices: Any, worker: int, abandon: Any) -> None:
        self.indices = indices
        self.worker = worker
        self._abandon = abandon

    @property
    def cancelled(self) -> bool:
        """The pool is shutting down: readers stop between two items."""
        return bool(self._abandon.value)


def _work(
    worker_id: int,
    num_workers: int,
    base_seed: int,
    dataset: Any,
    worker_init_fn: Callable[[int], None] | None,
    tasks: Connection,
    results: Connection,
    abandon: Any,
) -> None:
    """A worker process: seed as torch does, then read batches until told to stop (once
    `abandon` is set, queued batches are skipped and the one being read stops early)."""
    seed = base_seed + worker_id
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(torch_worker._generate_state(base_seed, worker_id))
    torch.set_num_threads(1)
    # One info, in torch's own slot: torch's get_worker_info and aload's both return it.
    info = WorkerInfo(worker_id, num_workers, seed, dataset, mode="process")
    torch_worker._worker_info = info  # type: ignore[assignment] # same fields, and more
    init_error = None
    if worker_init_fn is not None:
        try:
            worker_init_fn(worker_id)
        except BaseException as error:
            init_error = error
    reader = None
    while True:
        try:
            message = tasks.recv_bytes()
        except (EOFError, OSError):  # the parent is gone: so are we
            return
        task = pickle.loads(message)
        if task is None:
            return
        if isinstance(task, ReaderPlan):
            reader = task.build(dataset)
            continue
        key, indices = task
        if abandon.value:
            continue
        try:
            if init_error is not None:
                raise init_error
            batch = reader(_Task(indices, worker_id, abandon))  # type: ignore[misc]
            results.send((key, True, batch))
        except Abandoned:
            continue
        except BaseException as error:
            results.send((key, False, _wire_error(error)))


def _wire_error(error: BaseException) -> tuple[Any, str]:
    """The error, or a stand-in when it cannot be pickled, with the worker's traceback text."""
    text = "".join(traceback.format_exception(error))
    try:
        pickle.dumps(error)
        return error, text
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}"), text


def _rebuild_error(payload: tuple[BaseException, str], worker: int, pid: int) -> BaseException:
    error, text = payload
    error.add_note(f"aload worker process {worker} (pid {pid}) raised:\n{text}")
    return error
