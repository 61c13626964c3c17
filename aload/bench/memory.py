"""Peak memory of this process and its worker processes, without disturbing the run measured.

The figure is what the process tree held at once, at its peak, above what it held at `start`:
this process's RSS plus each descendant's private memory (USS: pages no other process maps),
sampled together, and never less than this process's own peak RSS (the kernel's high-water
mark, reset at `start`, exact between samples). Private memory is what a worker adds: its own
allocations and the pages it copied from its parent (copy-on-read), but not the pages it still
shares, which a sum of RSS would count once per worker. Peaks of different processes at
different times are not added up: memory a loader freed before its workers started (a first
epoch on threads, say) was never held beside theirs.

Descendants are sampled by a helper process that runs this file alone (standard library only),
so sampling never holds the measured process's GIL. Reading a process's private memory walks
its page tables (~6 ms for a process that imported torch) and would stall the measured process's
own `mmap` calls, so the measured process itself is never walked (its RSS, read from
`/proc/<pid>/status`, costs no walk), and the helper keeps its duty cycle under a tenth. Linux
only; elsewhere `TreeMemory.available` is False.
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
        """The tree's peak since `start` above the baseline, in MiB (None where unavailable):
        the helper's last sample taken now, so a run shorter than its interval is seen too."""
        if self._helper is None:
            return None
        own = max(0, status_kib(os.getpid(), "VmHWM") - self._baseline_rss)
        return max(own, self._ask("peak")) / 1024

    def close(self) -> None:
        if self._helper is not None:
            self._helper.communicate("")
            self._helper = None

    def __enter__(self) -> TreeMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Tree:
    """The helper's record: the root's RSS and each descendant's private memory at reset, and
    the most the tree held above them at once since."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.root_baseline = 0
        self.baseline: dict[int, int] = {}
        self.peak = 0

    def sample(self) -> float:
        """Read the root's RSS and every descendant once; return how long that took, in
        seconds."""
        started = time.perf_counter()
        try:
            held = status_kib(self.root, "VmRSS") - self.root_baseline
        except OSError:  # the run is gone
            return time.perf_counter() - started
        for pid in descendants(self.root, exclude=os.getpid()):
            held += max(0, private_kib(pid) - self.baseline.get(pid, 0))
        self.peak = max(self.peak, held)
        return time.perf_counter() - started

    def reset(self) -> None:
        self.root_baseline = status_kib(self.root, "VmRSS")
        self.baseline = {pid: private_kib(pid) for pid in descendants(self.root, os.getpid())}
        self.peak = 0


def _serve(root: int, interval: float) -> None:
    """The helper's loop: sample the tree, answer `reset` and `peak` on stdin."""
    tree = _Tree(root)
    pause = interval
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], pause)
        # At most a tenth of the time sampling: a worker forked from a torch process has large
        # page tables to walk, and it competes with the run for the CPU.
        pause = max(interval, 9 * tree.sample())
        if not ready:
            if not os.path.exists(f"/proc/{root}"):  # the run was killed: no one will ask
                return
            continue
        command = sys.stdin.readline().strip()
        if not command:
            return
        if command == "reset":
            tree.reset()
            print(0, flush=True)
        else:  # (sampled just now, as the command arrived)
            print(tree.peak, flush=True)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), float(sys.argv[2]))
