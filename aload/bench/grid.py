"""`python -m aload.bench --grid`: for each of the suite's single-stage workloads, a grid of
static settings against "auto", in one run: does the loader find its own concurrency?

Each workload's data runs with 1 to 64 thread workers (as many as auto may use), 1 to 8
worker processes (more would only take turns on a machine of a few cores), or, for awaited
reads, 8 to 512 reads at once;
then with everything left to the loader: `num_workers="auto", worker_mode="auto"` (an async
dataset: `max_concurrency="auto"`). Every run is a fresh Python process
(`python -m aload.bench.grid WORKLOAD ROW SETTINGS`) that builds the data (its items as
costly as the parent calibrated them), then a loader, and reads one epoch, so auto's
figure includes its search, and each peak memory is what that loader added to a process as
a user's script meets it (in one long process, the heap that earlier rows grew and freed
hides later rows' growth). The epochs take five to six seconds at the best static setting (a
search may take a second or two; the tensor grid's epoch is a tenth of a second, as its
reads need no workers, so its runs read ten), and a static run stops after
`STATIC_SECONDS` (its pace is steady: the slow settings need not read it all).
The summary sets auto against the fastest static setting: its throughput, and its peak
memory against that setting's, from the two run again side by side after the grid, more
times than the grid's rows (the fastest of a dozen noisy medians reads high: its luck is
part of why it was chosen), each reading the whole epoch there (a peak over the first
seconds of an epoch is no peak over all of it).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.data as tud

from aload.bench import datasets as ds
from aload.bench.contenders import Contender, Drained, aload_loader, drain_epochs
from aload.bench.fresh import child_figures
from aload.bench.memory import TreeMemory
from aload.bench.runner import Result
from aload.bench.workloads import Settings, Workload

THREADS = (1, 2, 4, 8, 16, 32, 64)  # up to the most threads auto may use
PROCESSES = (1, 2, 4, 8)
CONCURRENCY = (8, 32, 128, 512)
AUTO = "aload auto"  # the family of the rows that leave the settings to the loader
STATIC_SECONDS = 3.0  # a static setting's run stops after this long
WHOLE = "whole"  # the fresh process's argument for a static run of the whole epoch
# The head-to-head runs each of its two this many more times than the grid's rows: its
# medians decide the verdict, and three runs moved a ratio by 10-15% here (io's auto read
# 22,316 samples/s in the grid and 19,673 side by side, same code, same setting).
HEAD_TO_HEAD_EXTRA_RUNS = 2


@dataclass(frozen=True)
class GridData:
    """One workload's data for the grid: what it is, and how it is batched."""

    description: str
    dataset: Callable[[Settings], Any]
    batch_size: int
    shuffle: bool = False
    awaited: bool = False  # an async dataset: the grid is over max_concurrency
    epochs: int = 1  # epochs a run reads (one loader): enough to time a fast epoch


def _tensor(s: Settings) -> Any:
    n = s.items(1_000_000)
    return tud.TensorDataset(torch.randn(n, 64), torch.randint(0, 10, (n,)))


GRID: dict[str, GridData] = {
    "tensor": GridData(
        "TensorDataset 1,000,000 x 64, shuffled, ten epochs a run (an epoch takes a tenth of "
        "a second: its reads need no workers)",
        _tensor,
        256,
        shuffle=True,
        epochs=10,
    ),
    "io": GridData(
        "a 2 ms blocking read per item, 80,000 items",
        lambda s: ds.SleepDataset(s.items(80_000), 0.002),
        32,
    ),
    "async": GridData(
        "a 2 ms awaited read per item, 400,000 items",
        lambda s: ds.AwaitingDataset(s.items(400_000), 0.002),
        32,
        awaited=True,
    ),
    "numpy": GridData(
        "~2 ms of GIL-releasing numpy work per item, 5,000 items",
        lambda s: ds.NumpyDataset(s.items(5000), s.numpy_size),
        32,
    ),
    "blas": GridData(
        "a numpy product of two 192 x 192 matrices per item, 25,000 items",
        lambda s: ds.MatmulDataset(s.items(25_000), 192),
        16,
    ),
    "python": GridData(
        "~0.5 ms of pure-Python work per item (holds the GIL), 20,000 items",
        lambda s: ds.PythonDataset(s.items(20_000), s.python_rounds),
        32,
    ),
    "images": GridData(
        "image-sized samples 3 x 224 x 224 float32, 20,000 items",
        lambda s: ds.ImageDataset(s.items(20_000)),
        64,
    ),
}


def grid_workload(
    name: str, settings: Settings, fresh: bool = True, whole: bool = False
) -> Workload:
    """The grid of `name`'s data: every static setting, then auto; each run in a fresh
    process (`fresh`), or in this one (in that fresh process). Static runs stop after
    `STATIC_SECONDS` unless `whole`."""
    data = GRID[name]
    dataset = data.dataset(settings)
    kw: dict[str, Any] = {"batch_size": data.batch_size, "shuffle": data.shuffle}
    rows: list[Contender]
    static = drain_epochs(data.epochs, seconds=None if whole else STATIC_SECONDS)
    if data.awaited:
        rows = [
            aload_loader(dataset, 0, detail=f"max_concurrency={c}", max_concurrency=c, **kw)
            for c in CONCURRENCY
        ]
        detail = "max_concurrency='auto'"
        auto = aload_loader(dataset, 0, max_concurrency="auto", detail=detail, **kw)
    else:
        rows = [aload_loader(dataset, w, **kw) for w in THREADS]
        rows += [aload_loader(dataset, w, worker_mode="process", **kw) for w in PROCESSES]
        auto = aload_loader(
            dataset,
            "auto",  # type: ignore[arg-type]
            worker_mode="auto",
            detail="num_workers='auto', worker_mode='auto'",
            **kw,
        )
    auto = Contender(AUTO, auto.workers, auto.make, drain_epochs(data.epochs), auto.detail)
    contenders = [*(dataclasses.replace(row, drive=static) for row in rows), auto]
    if fresh:
        contenders = [
            dataclasses.replace(row, drive=_in_fresh_process(name, index, settings, whole))
            for index, row in enumerate(contenders)
        ]
    return Workload(
        f"grid-{name}",
        f"{data.description}, batch {data.batch_size}: static settings (each run stopped "
        f"after {STATIC_SECONDS:g} s) against auto (its search included), each run in a "
        "fresh process",
        contenders,
        min_run_s=0.0,  # each run lasts seconds on its own
    )


def _in_fresh_process(
    name: str, row: int, settings: Settings, whole: bool
) -> Callable[[Any], Drained]:
    """A drive that runs row `row` of `name`'s grid in a new Python process, with its peak
    memory measured there (this process's loader is never built), its items as costly as
    `settings` calibrated them here."""

    def drive(make: Any) -> Drained:
        given = json.dumps({"scale": settings.scale, **settings.calibrated()})
        command = [sys.executable, "-m", "aload.bench.grid", name, str(row), given]
        command += [WHOLE] if whole else []
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        return Drained(**child_figures(done.returncode, done.stdout, done.stderr))

    return drive


def run_row(name: str, row: int, settings: Settings, whole: bool = False) -> Drained:
    """In the fresh process: build the data, then run the row (a static one for the whole
    epoch if `whole`), with the peak memory of this process and its workers above what they
    held once the data was built."""
    grid = grid_workload(name, settings, fresh=False, whole=whole)
    contender = grid.contenders[row]
    with TreeMemory() as memory:
        gc.collect()
        memory.start()
        drained = contender.drive(contender.make)
        return dataclasses.replace(drained, peak_mib=memory.stop())


@dataclass(frozen=True)
class Verdict:
    """Auto against the fastest static setting of one grid: as the grid measured them, and
    measured again side by side (`head_to_head`), where it ran."""

    workload: str
    best: Result
    auto: Result
    again: tuple[Result, Result] | None = None  # the best static setting's, then auto's

    @property
    def grid_ratio(self) -> float:
        return _ratio(self.auto, self.best)

    @property
    def ratio(self) -> float:
        """Auto over the best static setting, from the runs side by side where there are."""
        return self.grid_ratio if self.again is None else _ratio(self.again[1], self.again[0])


def _ratio(auto: Result, best: Result) -> float:
    return auto.throughput / best.throughput if best.throughput else 0.0


def verdict(workload: str, results: list[Result]) -> Verdict | None:
    """The fastest static row and the auto row of one grid (None if either failed)."""
    static = [r for r in results if r.family != AUTO and r.error is None]
    auto = [r for r in results if r.family == AUTO and r.error is None]
    if not static or not auto:
        return None
    return Verdict(workload, max(static, key=lambda r: r.throughput), auto[0])


def head_to_head(grid: Workload, judged: Verdict, settings: Settings) -> Workload:
    """The grid's fastest static setting and auto, to run again side by side, each in a fresh
    process and over the whole epoch (`settings`: the grid's). The fastest of a dozen
    settings, each a median of a few runs on a noisy machine, is also the one whose runs
    were luckiest: measured again, it reads what that setting gives, as auto's runs do."""
    rows = {contender.name: (row, contender) for row, contender in enumerate(grid.contenders)}
    again = []
    for loader in (judged.best.loader, judged.auto.loader):
        row, contender = rows[loader]
        whole = _in_fresh_process(judged.workload, row, settings, whole=True)
        again.append(dataclasses.replace(contender, drive=whole))
    return Workload(
        f"{grid.name}-head-to-head",
        f"{grid.name}'s fastest static setting and auto, run again, alternated "
        f"({HEAD_TO_HEAD_EXTRA_RUNS} more times than the grid's rows), each over the "
        "whole epoch",
        again,
        min_run_s=0.0,
    )


def judged_again(judged: Verdict, results: list[Result]) -> Verdict:
    """`judged` with the head-to-head's runs (unchanged if either failed there)."""
    if any(result.error is not None for result in results):
        return judged
    best, auto = results
    return dataclasses.replace(judged, again=(best, auto))


def summary(verdicts: list[Verdict]) -> str:
    """A Markdown table: each grid's best static setting beside auto, measured again side by
    side (the grid's own ratio in the last column)."""
    lines = [
        "\n**grid**: auto against the best static setting of each grid, the two run again "
        "side by side",
        "",
        "| workload | best static setting | samples/s | peak MiB | auto samples/s | peak MiB "
        "| auto / best | in the grid |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for v in verdicts:
        best, auto = v.again or (v.best, v.auto)
        lines.append(
            f"| {v.workload} | {v.best.loader} | {best.throughput:,.0f} | {_mib(best)} "
            f"| {auto.throughput:,.0f} | {_mib(auto)} | {v.ratio:.2f}x | {v.grid_ratio:.2f}x |"
        )
    return "\n".join(lines)


def _mib(result: Result) -> str:
    return "n/a" if result.memory is None else f"{result.memory:,.0f}"


def given_settings(argument: str) -> Settings:
    """The fresh process's settings, from its parent's `{"scale": ..., SIZE: ...}`."""
    given = json.loads(argument)
    return Settings(scale=float(given.pop("scale")), given=given)


if __name__ == "__main__":
    whole = sys.argv[4:] == [WHOLE]
    figures = run_row(sys.argv[1], int(sys.argv[2]), given_settings(sys.argv[3]), whole)
    print(json.dumps(dataclasses.asdict(figures)))
