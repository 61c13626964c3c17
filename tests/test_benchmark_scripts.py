"""The diagnostic scripts in benchmarks/ run, at their smallest, and print what their docs
quote (the bench itself, `python -m aload.bench`, has tests/test_bench.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_script(name: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="reads each thread's clock from /proc")
def test_awaited_cost_prints_each_threads_cpu_for_the_bare_loop_and_both_loops():
    # Enough reads that aload's loop thread shows over the clock's 10 ms ticks.
    out = run_script("awaited_cost.py", "--rounds", "1", "--items", "8192")
    rows = re.findall(r"^\| ([^|]+) \| ([\d,]+) \| ([^|]+) \| ([\d.]+) \|", out, re.M)
    readers = [(reads.strip(), thread.strip()) for reads, _, thread, _ in rows]
    assert readers == [
        ("bare loop, 256 tasks", "consumer"),
        ("aload, for", "consumer"),
        ("aload, for", "aload's loop"),
        ("aload, async for", "consumer"),
        ("aload, async for", "aload's loop"),
    ]
    assert all(float(cpu) > 0 for _, _, thread, cpu in rows if thread.strip() == "aload's loop")
    ops = re.findall(r"^- (torch\.\w+|tolist)[^:]*: [\d,.]+ µs on average", out, re.M)
    assert ops == ["torch.stack", "torch.index_select", "torch.full", "tolist"]


def test_worker_mode_beside_a_step_counts_the_epochs_left_on_threads_and_says_why():
    out = run_script("worker_mode_beside_a_step.py", "--loaders", "2")
    summary, *verdicts = out.strip().splitlines()
    assert re.search(r"stayed on threads in [012] of 2 epochs, median [\d,]+ samples/s", summary)
    assert len(verdicts) == 2
    assert all(line.startswith("- over ") for line in verdicts)
