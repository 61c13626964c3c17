"""Throughput against worker count: one workload swept over `workers`, one line per loader."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

from aload.bench.memory import TreeMemory
from aload.bench.runner import Result, measure
from aload.bench.workloads import Settings, Workload


def sweep(
    build: Callable[[Settings], Workload],
    workers: Sequence[int],
    scale: float,
    repeats: int,
    memory: TreeMemory,
) -> list[Result]:
    """Every loader of the workload at each worker count (each count replaces the workload's)."""
    results: list[Result] = []
    for count in workers:
        results += measure(build(Settings(scale=scale, workers=count)), repeats, memory)
    return results


def draw(results: list[Result], title: str, path: str) -> None:
    """Write a PNG: samples/s (median) against workers, a line per loader family."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'aload[bench]'") from None
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in results:
        if r.error is None:
            label = r.loader.replace(f" workers={r.workers}", "")
            lines[label].append((r.workers, r.throughput))
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, points in lines.items():
        xs, ys = zip(*sorted(points), strict=True)
        axes.plot(xs, ys, marker="o", label=label)
    axes.set_xscale("symlog", base=2, linthresh=1)
    axes.set_xticks(sorted({r.workers for r in results}))
    axes.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes.set_xlabel("workers (threads or processes)")
    axes.set_ylabel("samples/s (median)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
