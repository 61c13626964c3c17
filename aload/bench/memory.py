"""Peak memory of this process and its worker processes, without disturbing the run measured.

The figure is this process's peak RSS (the kernel's own high-water mark, reset at `start`, so
it costs nothing to track) above its RSS at `start`, plus each descendant process's peak
private memory (USS: pages no other process maps) above what it held at `start`. Private
memory is what a worker adds: its own allocations and the pages it copied from its parent
(copy-on-read), but not the pages it still shares, which a sum of RSS would count once per
worker.

Descendants are sampled by a helper process that runs this file alone (standard library only),
so sampling never holds the measured process's GIL. Reading a process's private memory walks
its page tables (~6 ms for a process that imported torch) and would stall the measured process's
own `mmap` calls, so the measured process itself is never walked, and the helper keeps its
duty cycle under a tenth. Linux only; elsewhere `TreeMemory.available` is False.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

PROC = Path("/proc")


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
        state, parent = stat.rpartition(")")[2].split()[:2]
        if state != "Z":  # a zombie has exited: it holds no memory and runs nothing
            children.setdefault(int(parent), []).append(int(entry.name))
    return children


def descendants(root: int, exclude: int = -1) -> list[int]:
    """Every live process below `root`, leaving out `exclude` (the helper itself)."""
    children = _children_by_parent()
    found, pending = [], list(children.get(root, ()))
    while pending:
        pid = pending.pop()
        if pid != exclude:
            found.append(pid)
            pending.extend(children.get(pid, ()))
    return found


def rollup_kib(pid: int, prefix: str) -> int:
    """The sum of a process's `smaps_rollup` lines that start with `prefix`, in KiB (walks
    its page tables); 0 for a process that is gone."""
    try:
        text = (PROC / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return 0
    return sum(int(line.split()[1]) for line in text.splitlines() if line.startswith(prefix))


def private_kib(pid: int) -> int:
    """A process's private memory (USS) in KiB; 0 for a process that is gone."""
    return rollup_kib(pid, "Private_")


def status_kib(pid: int, field: str) -> int:
    """A `/proc/<pid>/status` figure in KiB (`VmRSS`, `VmHWM`); cheap, no page-table walk."""
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class TreeMemory:
    """Measures the peak memory of this process and its workers between `start` and `stop`.

    Both calls block for one sample of the workers (milliseconds). Not thread-safe.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.available = (PROC / "self" / "clear_refs").exists()
        self._helper: subprocess.Popen[str] | None = None
        self._baseline_rss = 0
        if self.available:
            self._helper = subprocess.Popen(
                [sys.executable, __file__, str(os.getpid()), str(interval)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )

    def _ask(self, command: str) -> int:
        helper = self._helper
        assert helper is not None
        assert helper.stdin is not None
        assert helper.stdout is not None
        helper.stdin.write(command + "\n")
        helper.stdin.flush()
        return int(helper.stdout.readline())

    def start(self) -> None:
        """Take the baseline: reset this process's peak RSS, and note what workers hold now."""
        if self._helper is None:
            return
        try:
            with open(PROC / "self" / "clear_refs", "w") as refs:
                refs.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
        except OSError:  # a kernel or sandbox that refuses: report no memory figures
            self.close()
            self.available = False
            return
        self._baseline_rss = status_kib(os.getpid(), "VmRSS")
        self._ask("reset")

    def stop(self) -> float | None:
        """The peak since `start` above the baseline, in MiB (None where unavailable)."""
        if self._helper is None:
            return None
        own = max(0, status_kib(os.getpid(), "VmHWM") - self._baseline_rss)
        return (own + self._ask("peak")) / 1024

    def close(self) -> None:
        if self._helper is not None:
            self._helper.communicate("")
            self._helper = None

    def __enter__(self) -> TreeMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Workers:
    """The helper's record: each descendant's private memory at reset, and its peak since."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.baseline: dict[int, int] = {}
        self.peak: dict[int, int] = {}

    def sample(self) -> float:
        """Read every descendant once; return how long that took, in seconds."""
        started = time.perf_counter()
        for pid in descendants(self.root, exclude=os.getpid()):
            used = private_kib(pid) - self.baseline.get(pid, 0)
            self.peak[pid] = max(self.peak.get(pid, 0), used)
        return time.perf_counter() - started

    def reset(self) -> None:
        self.baseline = {pid: private_kib(pid) for pid in descendants(self.root, os.getpid())}
        self.peak = {}

    def total(self) -> int:
        return sum(self.peak.values())


def _serve(root: int, interval: float) -> None:
    """The helper's loop: sample the workers, answer `reset` and `peak` on stdin."""
    workers = _Workers(root)
    pause = interval
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], pause)
        # At most a tenth of the time sampling: a worker forked from a torch process has large
        # page tables to walk, and it competes with the run for the CPU.
        pause = max(interval, 9 * workers.sample())
        if not ready:
            if not os.path.exists(f"/proc/{root}"):  # the run was killed: no one will ask
                return
            continue
        command = sys.stdin.readline().strip()
        if not command:
            return
        if command == "reset":
            workers.reset()
            print(0, flush=True)
        else:
            print(workers.total(), flush=True)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), float(sys.argv[2]))
