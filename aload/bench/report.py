"""Presents results: a Markdown table per workload, and a JSON document of every run."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict
from typing import Any

import torch

import aload
from aload.bench.runner import Result, best_torch, limit_of
from aload.bench.workloads import Workload


def table(workload: Workload, results: list[Result]) -> str:
    reference, limit = best_torch(results), limit_of(results)
    lines = [
        f"\n**{workload.name}**: {workload.description}",
        "",
        "| loader | samples/s | vs best torch | of the limit | first batch (ms) "
        "| peak memory (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if r.error is not None:
            lines.append(f"| {r.loader} | failed: {r.error} | | | | |")
            continue
        ratio = f"{r.throughput / reference:.2f}x" if reference else "n/a"
        share = f"{r.throughput / limit:.2f}" if limit else ""
        memory = "n/a" if r.memory is None else f"{r.memory:,.0f}"
        lines.append(
            f"| {r.loader} | {r.throughput:,.0f} | {ratio} | {share} | {r.first_batch:,.1f} "
            f"| {memory} |"
        )
    return "\n".join(lines)


def environment(repeats: int) -> dict[str, Any]:
    versions = {"torch": torch.__version__, "aload": aload.__version__}
    for peer in ("torchdata", "spdl"):
        try:
            module = __import__(peer)
            versions[peer] = getattr(module, "__version__", "installed")
        except ImportError:
            continue
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "repeats": repeats,
        "versions": versions,
    }


def document(
    env: dict[str, Any],
    suites: list[tuple[Workload, list[Result]]],
    sweep: list[Result] | None = None,
) -> dict[str, Any]:
    """Everything measured, with medians and ratios beside the raw runs."""

    def row(r: Result, reference: float | None, limit: float | None = None) -> dict[str, Any]:
        ratio = r.throughput / reference if reference and r.error is None else None
        return {
            **asdict(r),
            "median_samples_per_s": r.throughput,
            "median_first_batch_ms": r.first_batch,
            "median_peak_mib": r.memory,
            "vs_best_torch": ratio,
            "of_the_limit": r.throughput / limit if limit and r.error is None else None,
        }

    return {
        "environment": env,
        "workloads": [
            {
                "name": w.name,
                "description": w.description,
                "results": [row(r, best_torch(results), limit_of(results)) for r in results],
            }
            for w, results in suites
        ],
        "sweep": [row(r, None) for r in sweep or []],
    }
