"""Which start method process workers use, and what it asks of the user's code.

The default is Python's, as torch's DataLoader takes it. A start method that pickles
(forkserver, spawn) needs the dataset and functions to be picklable, checked when the loader is
built, and runs the user's main module again in each worker, which a script without a main
guard turns into a loader started inside a worker: that worker exits with a code of its own,
which the pool explains in one paragraph.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
from typing import Any


def resolve_context(context: Any) -> multiprocessing.context.BaseContext:
    """A multiprocessing context from a start method name, a context, or None: the default
    start method, as torch's DataLoader uses it (`multiprocessing.set_start_method`'s, else
    the platform's: fork on Linux up to Python 3.13, forkserver from 3.14, spawn on macOS)."""
    if context is None:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_start_method(allow_none=True) or methods[0]
    if isinstance(context, str):
        if context not in multiprocessing.get_all_start_methods():
            raise ValueError(
                "multiprocessing_context option should specify a valid start method in "
                f"{multiprocessing.get_all_start_methods()!r}, but got "
                f"multiprocessing_context={context!r}"
            )
        context = multiprocessing.get_context(context)
        if context.get_start_method() == "forkserver":
            # The server imports aload (so torch) once; each worker is then a fork of it.
            context.set_forkserver_preload(["aload"])
    if not isinstance(context, multiprocessing.context.BaseContext):
        raise TypeError(
            "multiprocessing_context option should be a valid context object or a string "
            f"specifying the start method, but got multiprocessing_context={context}"
        )
    return context


def sends_by_pickle(context: multiprocessing.context.BaseContext) -> bool:
    """Whether workers of this context get the dataset pickled (spawn, forkserver), rather
    than inherited by fork."""
    return context.get_start_method() != "fork"


def check_picklable(what: dict[str, Any]) -> None:
    """Pickle each value into a sink that keeps nothing, so that one that cannot travel to a
    worker process is named when the loader is built, not when its first epoch starts.

    Raises:
        TypeError: naming the argument that cannot be pickled.
    """
    for name, value in what.items():
        try:
            multiprocessing.reduction.ForkingPickler(_Discard(), pickle.HIGHEST_PROTOCOL).dump(
                value
            )
        except (pickle.PicklingError, TypeError, AttributeError) as error:
            raise TypeError(
                f"worker_mode='process' with a start method that pickles sends {name} to each "
                f"worker process, but it could not be pickled ({error}); define it at module "
                "level, use multiprocessing_context='fork' (Linux), or worker_mode='thread'"
            ) from error


class _Discard:
    """A file that drops what is written to it: pickling for the check alone."""

    def write(self, data: bytes | pickle.PickleBuffer) -> int:
        # Large buffers (a numpy array's data) come as a `PickleBuffer`, which has no len().
        return memoryview(data).nbytes


# A worker process that found itself started while its parent's main module was being run
# again (spawn, forkserver: no `if __name__ == "__main__":` guard) exits with this code.
NO_MAIN_GUARD_EXIT = 86


def main_guard_help(method: str) -> str:
    """What a user whose script has no main guard reads, in one paragraph."""
    return (
        f"aload's worker processes could not start: with the {method!r} start method each "
        "worker runs your main module again, and the module started the loader again instead "
        "of returning. Put the code that iterates the loader (and everything that runs when "
        'the script runs) under `if __name__ == "__main__":`, or use '
        "multiprocessing_context='fork' (Linux), which needs no guard"
    )


def refuse_start_in_bootstrap() -> None:
    """Called where a pool would start: in a worker process that is still importing its
    parent's main module (a script without a main guard), exit quietly with a code the parent
    explains, rather than multiprocessing's long traceback in every worker."""
    if getattr(multiprocessing.process.current_process(), "_inheriting", False):
        os._exit(NO_MAIN_GUARD_EXIT)
