"""The caller's event loop never stalls: a heartbeat task beats on it while `async for` starts
epochs, runs them and ends them, in every way an epoch can run (workers starting, a fork
server's first start, a dataset's `__aenter__`, persistent pools reused, replaced, closed and
left early). They are measured in one fresh process, as a user's script runs (20 ms at most
around epochs, 30 ms as pools end): in this suite's large process a single fork holds the
GIL for up to 40 ms, which says nothing about aload."""

from __future__ import annotations

import json
import multiprocessing
import time

import anyio
import pytest
from conftest import Indexed, flatten, run_fresh
from loop_pauses import BOUND, ENDINGS, ENDINGS_BOUND, MODES  # measured in a fresh process

import aload


@pytest.fixture(scope="module")
def fresh_process_pauses() -> dict[str, float]:
    """Every mode's pause, measured in one fresh process (tests/loop_pauses.py)."""
    return json.loads(run_fresh("loop_pauses.py", timeout=240).strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("mode", list(MODES))
def test_the_callers_loop_pauses_under_20_ms_around_epochs(fresh_process_pauses, backend, mode):
    pause = fresh_process_pauses[f"{backend}: {mode}"]
    assert pause < BOUND, f"{pause * 1000:.1f} ms"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("case", list(ENDINGS))
def test_the_callers_loop_pauses_under_30_ms_as_pools_end(fresh_process_pauses, backend, case):
    """A broken persistent pool replaced, `async with` stopping workers, epochs left early:
    measured in the same fresh process (in this suite's large process one fork takes up to
    40 ms, and the pause is about one fork whatever the bound)."""
    pause = fresh_process_pauses[f"{backend}: {case}"]
    assert pause < ENDINGS_BOUND, f"{pause * 1000:.1f} ms"


@pytest.mark.anyio
@pytest.mark.parametrize("method", [None, "forkserver"])
async def test_leaving_while_the_workers_still_start_leaves_no_process(anyio_backend, method):
    """Cancelled before its processes are up (a fork server's start takes a second): the
    background start stops them as soon as it ends, and nothing is left running."""
    loader = aload.DataLoader(
        Indexed(64),
        batch_size=8,
        num_workers=2,
        worker_mode="process",
        multiprocessing_context=method,
    )
    with anyio.move_on_after(0.005):
        async for _ in loader:
            pass
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:  # noqa: ASYNC110
        await anyio.sleep(0.05)
    assert multiprocessing.active_children() == []
    assert sorted(flatten([b async for b in loader])) == list(range(64))  # and it starts again
