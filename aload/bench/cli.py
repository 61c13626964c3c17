"""`python -m aload.bench`: aload against torch's DataLoader (and torchdata nodes and SPDL, when
installed), side by side in one process on the same data.

Each workload runs every loader `--repeats` times, interleaved, and prints a Markdown table of
median samples/s, the ratio to the best torch configuration, the time to the first batch and the
peak memory of the whole process tree (workers included) above what it held before. The
fresh-process cases (startup, python-epoch, records, loop: `aload.bench.fresh`) run each loader
in a new Python process, as a user's script meets it.

    python -m aload.bench                            # the whole suite, 3 repeats
    python -m aload.bench --workloads tensor io --repeats 5 --json results.json
    python -m aload.bench --workloads memory --scale 2
    python -m aload.bench --workloads tensor --busy  # while other processes take every core
    python -m aload.bench --workloads startup records loop # only fresh-process cases
    python -m aload.bench --workloads --plot workers.png   # only the sweep over worker counts
    python -m aload.bench --workloads --grid         # only the grids: static settings and auto
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict

from aload.bench.fresh import CASES, fresh_table, measure_fresh
from aload.bench.grid import (
    GRID,
    HEAD_TO_HEAD_EXTRA_RUNS,
    grid_workload,
    head_to_head,
    judged_again,
    summary,
    verdict,
)
from aload.bench.memory import TreeMemory
from aload.bench.plot import draw, sweep
from aload.bench.report import document, environment, table
from aload.bench.runner import Result, measure, prepare, stats_cost_us
from aload.bench.workloads import WORKLOADS, Settings, Workload

# Spins while the bench that started it (argv[1]) is its parent: a bench killed without its
# cleanup, even before the spinner's Python is up, leaves no spinner behind.
SPIN = (
    "import os, sys\nparent = int(sys.argv[1])\nwhile os.getppid() == parent: pass  # aload --busy"
)


@contextlib.contextmanager
def busy_cores(count: int) -> Iterator[None]:
    """`count` other processes spinning on the CPU for as long as the block runs."""
    command = [sys.executable, "-c", SPIN, str(os.getpid())]
    spinners = [subprocess.Popen(command) for _ in range(count)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def _workloads_help() -> str:
    lines = ["workloads (in one process, every loader side by side):"]
    lines += [f"  {name:<13} {build.__doc__}" for name, build in WORKLOADS.items()]
    lines.append("cases run in a fresh Python process each (start-up, memory, the caller's loop):")
    lines += [f"  {name:<13} {case.description}" for name, case in CASES.items()]
    lines += [
        "columns:",
        "  samples/s        median over the runs, building the loader included; a run drains a",
        "                   fresh loader, again until 0.3 s have passed (short epochs are noise)",
        "  vs best torch    that, over the fastest torch configuration in the same table",
        "  of the limit     that, over the workload's limit: its work done by hand with no",
        "                   loader (the `limit` row; the train-* limit: the steps alone)",
        "  first batch      milliseconds from building the loader to holding its first batch",
        "  step             train-*: the median training step (ms) beside the loader",
        "  step inflation   that, over the median step alone (the limit): what the loader takes",
        "                   from the step's cores and its turns on the GIL",
        "  peak memory      MiB the run added: this process's peak RSS, plus each worker's peak",
        "                   private memory (USS); peak PSS: the whole process tree's, sampled",
        "  loop pause       the longest a 5 ms heartbeat task on the caller's loop was late",
    ]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m aload.bench",
        description=__doc__,
        epilog=_workloads_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    names = [*WORKLOADS, *CASES]
    parser.add_argument("--workloads", nargs="*", default=names, choices=names)
    parser.add_argument("--repeats", type=int, default=3, help="runs per loader (median kept)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every item count")
    parser.add_argument(
        "--workers", type=int, help="one worker count for every loader (default: per workload)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write every run as JSON ('-': stdout)")
    parser.add_argument(
        "--busy",
        action="store_true",
        help="keep every core busy with another process while the suite runs (a machine "
        "that trains)",
    )
    parser.add_argument(
        "--grid",
        nargs="*",
        choices=list(GRID),
        metavar="WORKLOAD",
        help="also run a grid of static settings against auto on these workloads' data (none "
        f"named: all of {', '.join(GRID)})",
    )
    parser.add_argument(
        "--plot", metavar="FILE.png", help="sweep worker counts on --plot-workload and draw it"
    )
    parser.add_argument("--plot-workload", default="io", choices=list(WORKLOADS))
    parser.add_argument("--plot-workers", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument(
        "--plot-scale", type=float, default=0.5, help="item-count scale for the sweep's runs"
    )
    args = parser.parse_args(argv)
    for name in ("repeats", "workers"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "repeats" else 0):
            parser.error(f"--{name} must be {'positive' if name == 'repeats' else 'non-negative'}")
    if args.scale <= 0 or args.plot_scale <= 0:
        parser.error("--scale and --plot-scale must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    # The tables go to stdout; with `--json -` they go to stderr so that stdout stays JSON.
    out = sys.stderr if args.json == "-" else sys.stdout
    settings = Settings(scale=args.scale, workers=args.workers)
    env = {**environment(args.repeats), "busy": args.busy}
    busy = f", every core kept busy by {env['cpus']} other processes" if args.busy else ""
    print(f"{env['versions']}, {env['cpus']} CPUs, {args.repeats} repeats, medians{busy}", file=out)
    suites: list[tuple[Workload, list[Result]]] = []
    swept: list[Result] | None = None
    started = time.perf_counter()
    prepare()
    with busy_cores(env["cpus"] if args.busy else 0), TreeMemory() as memory:
        for name in [name for name in args.workloads if name in WORKLOADS]:
            workload = WORKLOADS[name](settings)
            results = measure(workload, args.repeats, memory)
            suites.append((workload, results))
            print(table(workload, results), file=out, flush=True)
        if args.grid is not None:
            verdicts = []
            for name in args.grid or list(GRID):
                workload = grid_workload(name, settings)
                results = measure(workload, args.repeats, memory)
                suites.append((workload, results))
                print(table(workload, results), file=out, flush=True)
                if (judged := verdict(name, results)) is not None:
                    again = head_to_head(workload, judged, settings)
                    runs = args.repeats + HEAD_TO_HEAD_EXTRA_RUNS
                    rerun = measure(again, runs, memory)
                    suites.append((again, rerun))
                    print(table(again, rerun), file=out, flush=True)
                    verdicts.append(judged_again(judged, rerun))
            print(summary(verdicts), file=out, flush=True)
        fresh_cases = [name for name in args.workloads if name in CASES]
        fresh = measure_fresh(fresh_cases, args.repeats, args.scale)
        for name in fresh_cases:
            print(fresh_table(CASES[name], fresh), file=out, flush=True)
        suite_seconds = time.perf_counter() - started
        if args.plot:
            build = WORKLOADS[args.plot_workload]
            swept = sweep(build, args.plot_workers, args.plot_scale, args.repeats, memory)
            title = build(Settings(scale=args.plot_scale)).description
            draw(swept, title, args.plot)
            print(f"\nwrote {args.plot}", file=out)
    stats_cost = stats_cost_us()
    print(f"\nloader.stats costs {stats_cost:.2f} us a batch (always on)", file=out)
    total = time.perf_counter() - started
    print(f"{suite_seconds:.0f} s for the suite, {total:.0f} s in all", file=out)
    if args.json:
        report = document(env, suites, swept)
        report["fresh"] = [asdict(result) for result in fresh]
        report["stats_cost_us_per_batch"] = stats_cost
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as file:
                file.write(text + "\n")
