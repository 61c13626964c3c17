"""Peak memory of a process and all its descendants, sampled from /proc by a helper process.

The total is the sum of each process's proportional set size (PSS): a page shared by k
processes counts 1/k in each, so forked workers that only share the parent's pages add little,
and pages they copy (copy-on-read) count in full. Summing plain RSS would count every shared
page once per process. A helper process does the sampling so that it never holds the GIL of
the process being measured; it runs this file alone (standard library only, no torch import).
Linux only; elsewhere `TreeMemory.available` is False.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
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
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    return children


def _process_kib(pid: int) -> int:
    """PSS in KiB (RSS where the kernel has no smaps_rollup); 0 for a process that is gone."""
    try:
        for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    except OSError:
        return 0
    try:
        resident_pages = int((PROC / str(pid) / "statm").read_text().split()[1])
    except OSError:
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024


def tree_kib(root: int, exclude: int | None = None) -> int:
    """Total PSS in KiB of `root` and its descendants (leaving out the process `exclude`)."""
    children = _children_by_parent()
    total, pending = 0, [root]
    while pending:
        pid = pending.pop()
        if pid == exclude:
            continue
        total += _process_kib(pid)
        pending.extend(children.get(pid, ()))
    return total


class TreeMemory:
    """Measures the peak memory of this process tree above a baseline, between start and stop.

    Both calls block for one sample (a few milliseconds). Not thread-safe.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.available = (PROC / str(os.getpid()) / "stat").exists()
        self._helper: subprocess.Popen[str] | None = None
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
        """Take the baseline: what the tree holds now."""
        if self._helper is not None:
            self._ask("reset")

    def stop(self) -> float | None:
        """The peak since `start` above the baseline, in MiB (None where unavailable)."""
        if self._helper is None:
            return None
        return self._ask("peak") / 1024

    def close(self) -> None:
        if self._helper is not None:
            self._helper.communicate("")
            self._helper = None

    def __enter__(self) -> TreeMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _sample(root: int, interval: float) -> None:
    """The helper's loop: sample every `interval` seconds, answer `reset` and `peak` on stdin."""
    baseline = peak = tree_kib(root, exclude=os.getpid())
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], interval)
        now = tree_kib(root, exclude=os.getpid())
        peak = max(peak, now)
        if not ready:
            continue
        command = sys.stdin.readline().strip()
        if not command:
            return
        if command == "reset":
            baseline = peak = now
            print(baseline, flush=True)
        else:
            print(max(0, peak - baseline), flush=True)


if __name__ == "__main__":
    _sample(int(sys.argv[1]), float(sys.argv[2]))
