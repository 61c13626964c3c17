"""Process workers, for datasets whose Python code holds the GIL (parsing, tokenizing).

Workers start as torch's do: with Python's default start method (fork on Linux up to Python
3.13), so a forked worker shares the parent's dataset copy-on-write and starts in milliseconds;
`multiprocessing_context` picks another. Each worker gets the dataset and its pool's reader
plan once, at start (inherited under fork, pickled otherwise); an epoch then sends only what
changes (where a resumed epoch starts), and jobs carry only indices. Batches come back through
torch's shared-memory reductions, not as pickled bytes, with the worker's retries and skips,
which the parent counts against the epoch's one budget. One pipe each way per worker. A
collector thread, started after the workers, waits on every result pipe and every process
sentinel together, so a worker that dies (killed, out of memory) fails its batches at once.
Only the collector looks at a process's state (a forkserver child's exit code is read from a
pipe, once: two threads polling it race, and the loser is told 255); others read what it
recorded. For `async for`, the workers start on the collector thread, so the caller's event
loop never waits for a start (a fork server's first start imports torch: about a second).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import multiprocessing
import multiprocessing.heap  # imported here, not on a caller's loop at the first start
import multiprocessing.popen_fork
import multiprocessing.sharedctypes
import os
import pickle
import random
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import torch
import torch.multiprocessing  # registers the reductions that send tensors via shared memory
import torch.utils.data._utils.worker as torch_worker

from .._cuda import pin_batch
from .._fetch import Abandoned, timed_call
from .._intra_op import BlasTeamWatch
from .._plans import ProcessRead, ReaderPlan
from .._retry import Reads
from .._worker_info import WorkerInfo
from . import Job
from ._exit import stop_at_exit
from .memory import WATCH_SECONDS, private_bytes
from .start_method import NO_MAIN_GUARD_EXIT, main_guard_help, refuse_start_in_bootstrap

_GRACE_SECONDS = 5.0  # how long a worker may finish its task after shutdown before it is killed
_PARENT_CHECK_SECONDS = 1.0  # how often an idle worker checks that its parent still lives


class ProcessPool:
    """`num_workers` processes reading batches; jobs carry a `ProcessRead` as their `read`.

    Args:
        plan: how workers read; the pool's epochs differ only in their plan's `skip`.
        background: start the processes on the collector thread, queueing jobs until they
            run, so that the caller (an event loop) never waits for a start.
        fork_after: with `background` and the fork start method: a wait, given a timeout in
            seconds, that says whether the process may fork now (thread workers that an
            epoch moves from must first finish their reads: `ThreadPool.wait_finished`).

    Raises:
        TypeError: at start, when the dataset or worker_init_fn cannot be sent to a process
            (with `background`, each job fails with it instead).
    """

    where = "worker processes"  # what runs its jobs, for the stats' stages

    def __init__(
        self,
        num_workers: int,
        context: multiprocessing.context.BaseContext,
        dataset: Any,
        worker_init_fn: Callable[[int], None] | None,
        base_seed: int,
        plan: ReaderPlan,
        pin: bool = False,
        background: bool = False,
        fork_after: Callable[[float], bool] | None = None,
    ) -> None:
        refuse_start_in_bootstrap()
        forks = context.get_start_method() == "fork"
        self._fork_after = fork_after if forks else None
        self._num_workers = num_workers
        self._context = context
        self._pin = pin
        self._lock = threading.Lock()
        self._closed = False
        # Jobs submitted before the workers run; None once they do.
        self._waiting: list[tuple[Job, int | None]] | None = []
        self._outstanding: list[dict[int, Any]] = [{} for _ in range(num_workers)]
        self._dead: dict[int, int | None] = {}  # worker -> exit code, recorded by the collector
        self._failure: BaseException | None = None  # why the pool gave up, if it did
        self._stopped_late: set[int] = set()  # workers stopped because a batch timed out
        self._plans: list[ReaderPlan] = [plan] * num_workers
        self._next = 0
        self._tasks: list[Connection] = []
        self._results: list[Connection] = []
        self._processes: list[Any] = []
        # The workers' own memory in bytes, read by the collector once watched (`watch_memory`).
        self.private_memory = 0
        self._memory_watched = False
        # Set at shutdown: workers drop what is queued and stop between two items, so none
        # is killed in the middle of writing a batch to shared memory. A plain shared byte:
        # workers read it once per item, without a lock.
        self._abandon = context.Value("b", 0, lock=False)
        self._worker_args = (num_workers, base_seed, dataset, worker_init_fn, plan, self._abandon)
        # A background start waits for the consumer's first wait (`begin`): a fork holds the
        # GIL, and forking while the caller's thread still sets up its epoch would stall it.
        self._begun = threading.Event()
        if not background:
            self._begun.set()
            self._start()
        self._collector = threading.Thread(
            target=self._run, args=(background,), name="aload-worker-collector", daemon=True
        )
        self._collector.start()
        stop_at_exit(pool=self, thread=self._collector)

    def _start(self, background: bool = False) -> None:
        """Start the worker processes (on the caller's thread, or the collector's)."""
        try:
            self._start_workers(background)
        except (pickle.PicklingError, TypeError, AttributeError) as error:
            self._terminate()
            raise TypeError(
                "worker_mode='process' sends the dataset and worker_init_fn to each worker "
                f"process, but they could not be pickled ({error}); define them at module "
                "level, or use worker_mode='thread'"
            ) from error
        except (BrokenPipeError, ConnectionError, EOFError) as error:
            self._terminate()
            if self._context.get_start_method() != "forkserver":
                raise
            # The fork server died as it started: it runs the main module first, and a script
            # without a main guard starts the loader again in it (which then exits).
            raise RuntimeError(
                "aload's fork server stopped as it started. The most common cause: "
                + main_guard_help("forkserver")
            ) from error
        except BaseException:
            self._terminate()
            raise
        finally:
            del self._worker_args  # the parent's references to the dataset stay its own
        with self._lock:
            waiting, self._waiting = self._waiting or [], None
            if self._closed:
                self._stop_workers()
        for job, worker in waiting:
            self.submit(job, worker)

    def _start_workers(self, background: bool) -> None:
        """Fork (or spawn) each worker, with its two pipes."""
        for worker_id in range(self._num_workers):
            if self._closed:
                break
            task_reader, task_writer = self._context.Pipe(duplex=False)
            result_reader, result_writer = self._context.Pipe(duplex=False)
            process = self._context.Process(  # type: ignore[attr-defined] # all have it
                target=_work,
                args=(worker_id, *self._worker_args, task_reader, result_writer),
                name=f"aload-worker-{worker_id}",
                daemon=True,
            )
            process.start()
            task_reader.close()
            result_writer.close()
            if background:
                # A fork holds the GIL while it copies the page tables (milliseconds for
                # a large parent): let the caller's loop run between two of them.
                time.sleep(0.001)
            self._tasks.append(task_writer)
            self._results.append(result_reader)
            self._processes.append(process)

    def _run(self, start: bool) -> None:
        """The collector thread: start the workers if asked, then collect until they end."""
        if start:
            self._begun.wait()
            while self._fork_after is not None and not self._fork_after(0.05):
                if self._closed:  # stopped before it could start: `_start` forks nothing
                    break
            try:
                self._start(background=True)
            except BaseException as error:
                self._give_up(error)
                return
        self._collect()

    def begin(self) -> None:
        self._begun.set()

    def watch_memory(self) -> None:
        """From now on, keep `private_memory` (the bytes the live workers hold of their own)
        up to date, every `WATCH_SECONDS` (for `memory_budget`)."""
        self._memory_watched = True

    def submit(self, job: Job, worker: int | None = None) -> None:
        read: ProcessRead = job.read  # type: ignore[attr-defined]
        with self._lock:
            if self._closed:
                job.fail(RuntimeError("aload worker processes were shut down before this batch"))
                return
            if self._failure is not None:
                job.fail(_pool_failed(self._failure))
                return
            if self._waiting is not None:
                self._waiting.append((job, worker))
                return
            if worker is None:
                worker = self._least_busy()
            if worker in self._dead:
                job.fail(self._death(worker, job))
                return
            try:
                if self._plans[worker] is not read.plan:  # a new epoch: where it starts
                    message = ("epoch", read.plan.for_epoch())
                    self._tasks[worker].send_bytes(pickle.dumps(message))
                    self._plans[worker] = read.plan
                self._outstanding[worker][id(job)] = job
                self._tasks[worker].send_bytes(wire_bytes((id(job), job.indices)))  # type: ignore[attr-defined]
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
            self._begun.set()  # a start not begun yet ends at once
            waiting = self._waiting
            if waiting is None:  # started; else the start stops them as soon as it ends
                self._stop_workers()
            else:
                self._waiting = []
        for job, _ in waiting or []:
            job.fail(RuntimeError("aload worker processes were shut down before this batch"))

    def _stop_workers(self) -> None:
        """Tell every worker to stop (called under the lock, once started and closed)."""
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
            jobs += [job for job, _ in self._waiting or []]
            self._waiting = None
            for outstanding in self._outstanding:
                outstanding.clear()
        for job in jobs:
            job.fail(_pool_failed(error))
        self._terminate(_GRACE_SECONDS)

    def _collect_until_reaped(self) -> None:
        open_results = dict(enumerate(self._results))
        worker_of = {connection: w for w, connection in enumerate(self._results)}
        sentinels = {p.sentinel: w for w, p in enumerate(self._processes)}
        next_look = 0.0  # when to read the workers' memory next, if watched
        while sentinels:  # until every worker process has ended
            if self._memory_watched and time.monotonic() >= next_look:
                live = [self._processes[worker].pid for worker in sentinels.values()]
                self.private_memory = sum(private_bytes(pid) for pid in live)
                next_look = time.monotonic() + WATCH_SECONDS
            ready = wait(list(open_results.values()) + list(sentinels), timeout=WATCH_SECONDS)
            if self._closed and time.monotonic() - self._closed_at > _GRACE_SECONDS:
                for worker in sentinels.values():  # still busy after shutdown: stop it now
                    self._processes[worker].kill()
            for item in ready:
                if item in sentinels:
                    worker = sentinels.pop(item)
                    process = self._processes[worker]
                    process.join()  # reaped here, by this thread only
                    if process.exitcode:  # killed, or crashed, maybe inside a tensor's start
                        remove_left_shared_memory(process.pid)
                    with self._lock:
                        self._dead[worker] = process.exitcode
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
            key, reply = self._results[worker].recv()
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
        pid = self._processes[worker].pid
        hand_over(job, reply, self._pin, lambda error: _rebuild_error(error, worker, pid))

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
        method = self._context.get_start_method()
        if code == NO_MAIN_GUARD_EXIT:
            return RuntimeError(main_guard_help(method))
        if code is None and method == "forkserver":  # the server died: no child's code is read
            return RuntimeError(
                "aload's fork server stopped, and with it the worker processes. The most "
                "common cause: " + main_guard_help(method)
            )
        if worker in self._stopped_late:
            what = f"DataLoader worker (pid {pid}) was stopped: a batch it held timed out."
        elif code is not None and code < 0:
            what = f"DataLoader worker (pid {pid}) is killed by signal: {_signal_name(-code)}."
        else:
            what = f"DataLoader worker (pid {pid}) exited unexpectedly with exit code {code}."
        return RuntimeError(f"{what} It was aload worker {worker}, loading {job.describe()}")

    def _terminate(self, timeout: float | None = None) -> None:
        """Kill every worker, wait for it (up to `timeout` each) and remove what it left."""
        for process in self._processes:
            with contextlib.suppress(Exception):
                process.kill()
                process.join(timeout)
                remove_left_shared_memory(process.pid)


def remove_left_shared_memory(pid: int | None) -> None:
    """Remove the shared-memory files a dead worker left named. torch names each file
    `torch_<pid>_...` and removes the name as soon as it holds the file open (its default
    `file_descriptor` strategy), so a name left after the worker died is one it was killed
    between the two: nobody can open it, and it would stay in /dev/shm until reboot."""
    if pid is None or torch.multiprocessing.get_sharing_strategy() != "file_descriptor":
        return
    for path in glob.glob(f"/dev/shm/torch_{pid}_*"):
        with contextlib.suppress(OSError):
            os.unlink(path)


# Tensors up to this size cross between the parent and a worker by value; larger ones as torch
# sends them, through shared memory (a file descriptor each, passed at ~0.2 ms a tensor: more
# than copying this).
_BY_VALUE_BYTES = 256 * 1024
_NUMPY_DTYPES = frozenset(
    {
        torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
        torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    }
)  # fmt: skip


class _WirePickler(ForkingPickler):
    """torch's pickler for worker processes, but small CPU tensors (the samples an async
    dataset's CPU stage sends, a batch of 32 at a time; the batches workers send back) go by
    value, as numpy arrays: 32 tensors of 16 floats took 6.4 ms to send through shared
    memory, and take ~0.1 ms so."""

    def reducer_override(self, obj: Any) -> Any:
        if (
            type(obj) is torch.Tensor
            and obj.device.type == "cpu"
            and obj.layout is torch.strided
            and obj.dtype in _NUMPY_DTYPES
            and not obj.requires_grad
            and not (obj.is_conj() or obj.is_neg())
            and obj.numel() * obj.element_size() <= _BY_VALUE_BYTES
        ):
            return torch.from_numpy, (obj.numpy(),)
        return NotImplemented


def wire_bytes(message: Any) -> memoryview:
    """A message for the pipe between the parent and a worker (indices or samples to
    finish one way, batches the other), its small tensors by value."""
    return _WirePickler.dumps(message, pickle.HIGHEST_PROTOCOL)


def hand_over(
    job: Any,
    reply: tuple[bool, Any, Any, Any, Any],
    pin: bool,
    rebuild: Callable[[Any], BaseException],
) -> None:
    """A worker's reply to `job` (a process's or a Ray actor's): `(ok, batch or wired error,
    retries and skips, the worker's state, its timing)`. The epoch's budget takes the retries
    and skips; then the job gets its batch (pinned here when asked) or the rebuilt error."""
    ok, payload, report, state, timing = reply
    try:
        if report is not None:  # retries and skips: one budget for the whole epoch
            job.read.reads.absorb(report)
    except BaseException as error:
        job.fail(error)
        return
    if ok:
        job.state, job.timing = state, timing
        job.deliver(pin_batch(payload) if pin else payload)
    else:
        job.fail(rebuild(payload))


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


class _Task:
    """What a reader sees of a job, inside a worker process."""

    __slots__ = ("_abandon", "indices", "state", "worker")

    def __init__(self, indices: Any, worker: int, abandon: Any) -> None:
        self.indices = indices
        self.worker = worker
        self._abandon = abandon
        self.state: Any = None

    @property
    def cancelled(self) -> bool:
        """The pool is shutting down: readers stop between two items."""
        return bool(self._abandon.value)


def start_worker(
    worker_id: int,
    num_workers: int,
    base_seed: int,
    dataset: Any,
    worker_init_fn: Callable[[int], None] | None,
    mode: str = "process",
) -> BaseException | None:
    """Make this process a worker as torch's are made: seeded (`random`, torch, numpy), one
    intra-op thread, its info in torch's slot, then `worker_init_fn`; its error, if it raised
    (each batch then fails with it, as in torch)."""
    seed = base_seed + worker_id
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(torch_worker._generate_state(base_seed, worker_id))
    torch.set_num_threads(1)
    # One info, in torch's own slot: torch's get_worker_info and aload's both return it.
    info = WorkerInfo(worker_id, num_workers, seed, dataset, mode=mode)
    torch_worker._worker_info = info  # type: ignore[assignment] # same fields, and more
    if worker_init_fn is not None:
        try:
            worker_init_fn(worker_id)
        except BaseException as error:
            return error
    return None


def epoch_reader(
    plan: ReaderPlan, dataset: Any, base_seed: int, init_error: BaseException | None
) -> tuple[Reads, Callable[[Any], Any] | None]:
    """A worker's budget and reader for an epoch (no reader when its start failed: each
    batch fails with that error, as in torch)."""
    reads = Reads(plan.retry, plan.max_skipped, in_worker_process=True)
    return reads, None if init_error else plan.build(dataset, reads, base_seed)


def _work(
    worker_id: int,
    num_workers: int,
    base_seed: int,
    dataset: Any,
    worker_init_fn: Callable[[int], None] | None,
    plan: ReaderPlan,
    abandon: Any,
    tasks: Connection,
    results: Connection,
) -> None:
    """A worker process: seed as torch does, then read batches until told to stop (once
    `abandon` is set, queued batches are skipped and the one being read stops early)."""
    init_error = start_worker(worker_id, num_workers, base_seed, dataset, worker_init_fn)
    reads, reader = epoch_reader(plan, dataset, base_seed, init_error)
    parent = os.getppid()
    blas = BlasTeamWatch()  # a BLAS team per worker would take turns on the cores
    while True:
        try:
            # A parent killed outright (SIGKILL, the OOM killer) closes no pipe while a
            # sibling, forked with copies of its ends, lives: so look at who the parent is.
            if not tasks.poll(_PARENT_CHECK_SECONDS):
                if os.getppid() != parent:
                    return
                continue
            message = tasks.recv_bytes()
        except (EOFError, OSError):  # the parent is gone: so are we
            return
        task = pickle.loads(message)
        if task is None:
            return
        if task[0] == "epoch":  # the next epoch: a fresh budget, and where it starts
            plan = dataclasses.replace(plan, **task[1])
            reads, reader = epoch_reader(plan, dataset, base_seed, init_error)
            continue
        key, indices = task
        if abandon.value:
            continue
        try:
            if init_error is not None:
                raise init_error
            task = _Task(indices, worker_id, abandon)
            batch, timing = timed_call(reader, task)  # type: ignore[arg-type]
            reply = (True, batch, _wire_report(reads), task.state, timing)
            results.send_bytes(wire_bytes((key, reply)))
            blas.batch_done()
        except Abandoned:
            continue
        except BaseException as error:
            results.send((key, (False, _wire_error(error), _wire_report(reads), None, None)))


def _wire_report(reads: Reads) -> Any:
    """The worker's retries and skips since its last batch, each skip's error made
    picklable; None when there were none."""
    report = reads.report()
    if report is None:
        return None
    retries, skipped = report
    return retries, [(index, _picklable(error)) for index, error in skipped]


def _picklable(error: BaseException) -> BaseException:
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _wire_error(error: BaseException) -> tuple[Any, str]:
    """The error, or a stand-in when it cannot be pickled, with the worker's traceback text."""
    return _picklable(error), "".join(traceback.format_exception(error))


def _rebuild_error(payload: tuple[BaseException, str], worker: int, pid: int) -> BaseException:
    error, text = payload
    error.add_note(f"aload worker process {worker} (pid {pid}) raised:\n{text}")
    return error
