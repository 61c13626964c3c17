"""Presents results: a Markdown table per workload, and a JSON document of every run."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict
from typing import Any

import torch

import aload
from aload.bench.runner import Result, best_torch, limit_of, step_alone, step_inflation
from aload.bench.workloads import Workload


def table(workload: Workload, results: list[Result]) -> str:
    reference, limit = best_torch(results), limit_of(results)
    alone = step_alone(results)
    stepped = alone is not None
    lines = [
        f"\n**{workload.name}**: {workload.description}",
        "",
        "| loader | samples/s | vs best torch | of the limit | first batch (ms) "
        "| peak memory (MiB) |" + (" step (ms) | step inflation |" if stepped else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if stepped else ""),
    ]
    for r in results:
        if r.error is not None:
            blanks = " | | | |" if stepped else " | |"
            lines.append(f"| {r.loader} | failed: {r.error} | | |{blanks}")
            continue
        ratio = f"{r.throughput / reference:.2f}x" if reference else "n/a"
        share = f"{r.throughput / limit:.2f}" if limit else ""
        memory = "n/a" if r.memory is None else f"{r.memory:,.0f}"
        line = (
            f"| {r.loader} | {r.throughput:,.0f} | {ratio} | {share} | {r.first_batch:,.1f} "
            f"| {memory} |"
        )
        if stepped:
            step, inflation = r.step, step_inflation(r, alone)
            line += f" {step:.2f} |" if step is not None else " |"
            line += f" {inflation:+.0%} |" if inflation is not None else " |"
        lines.append(line)
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

    def row(
        r: Result, reference: float | None, limit: float | None = None, alone: float | None = None
    ) -> dict[str, Any]:
        ratio = r.throughput / reference if reference and r.error is None else None
        return {
            **asdict(r),
            "median_samples_per_s": r.throughput,
            "median_first_batch_ms": r.first_batch,
            "median_peak_mib": r.memory,
            "vs_best_torch": ratio,
            "of_the_limit": r.throughput / limit if limit and r.error is None else None,
            "median_step_ms": r.step,
            "step_inflation": step_inflation(r, alone),
        }

    return {
        "environment": env,
        "workloads": [
            {
                "name": w.name,
                "description": w.description,
                "results": [
                    row(r, best_torch(results), limit_of(results), step_alone(results))
                    for r in results
                ],
            }
            for w, results in suites
        ],
        "sweep": [row(r, None) for r in sweep or []],
    }
