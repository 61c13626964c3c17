"""`python -m aload.bench`: its tables, JSON, plot and memory figures, at small sizes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from aload.bench.cli import parse
from aload.bench.contenders import Contender, Drained, torch_loader
from aload.bench.memory import TreeMemory
from aload.bench.report import table
from aload.bench.runner import Result, measure, run_once
from aload.bench.workloads import MIN_RUN_S, Workload

linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="/proc")


def bench(*args: str, cwd) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aload.bench", *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=cwd,
        check=False,
    )


def bench_report(*args: str, tmp_path) -> tuple[str, dict]:
    """Run `python -m aload.bench` with `--json`; its table and its JSON report."""
    done = bench(*args, "--json", "out.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return done.stdout, json.loads((tmp_path / "out.json").read_text())


@linux_only
def test_tree_memory_sees_a_child_process_allocate():
    allocate = "import time; block = bytearray(96 * 2**20); time.sleep(0.5)"
    with TreeMemory() as memory:
        memory.start()
        subprocess.run([sys.executable, "-c", allocate], check=True)
        grown = memory.stop()
        memory.start()
        idle = memory.stop()
    assert grown is not None
    assert grown > 80
    assert idle is not None
    assert idle < 16


@linux_only
def test_tree_memory_counts_what_the_tree_held_at_once_not_each_processs_peak():
    """Two children that each hold 96 MiB for half a second: one after the other, the tree
    never held more than one block; side by side, it held both."""
    allocate = [sys.executable, "-c", "import time; b = bytearray(96 * 2**20); time.sleep(0.5)"]
    with TreeMemory() as memory:
        memory.start()
        for _ in range(2):
            subprocess.run(allocate, check=True)
        one_after_the_other = memory.stop()
        memory.start()
        children = [subprocess.Popen(allocate) for _ in range(2)]
        assert [child.wait() for child in children] == [0, 0]
        side_by_side = memory.stop()
    assert one_after_the_other is not None
    assert side_by_side is not None
    assert 80 < one_after_the_other < 150
    assert side_by_side > 170


@linux_only
def test_the_two_executor_workload_measures_its_limit_and_every_loader(tmp_path):
    _, report = bench_report(
        "--workloads", "remote-decode", "--repeats", "1", "--scale", "0.05", tmp_path=tmp_path
    )  # fmt: skip
    (workload,) = report["workloads"]
    rows = workload["results"]
    # the limit, torch, aload four ways (two plans among them: reads on aload's loop, reads
    # on threads), and torch and the two plans with persistent workers
    assert len(rows) == 9
    assert sum(row["family"] == "aload plan" for row in rows) == 4
    for row in rows:
        assert row["error"] is None, row
        assert row["median_samples_per_s"] > 0
        assert row["of_the_limit"] > 0
    (limit,) = [row for row in rows if row["family"] == "limit"]
    assert limit["of_the_limit"] == pytest.approx(1.0)


@linux_only
def test_suite_writes_tables_and_json_with_every_loader(tmp_path):
    stdout, report = bench_report(
        "--workloads", "tensor", "memory", "--repeats", "2", "--scale", "0.4", tmp_path=tmp_path
    )  # fmt: skip
    assert "| torch workers=2 |" in stdout
    assert "| aload thread workers=2, async for |" in stdout
    assert report["environment"]["repeats"] == 2
    assert 0 < report["stats_cost_us_per_batch"] < 50
    by_workload = {w["name"]: w["results"] for w in report["workloads"]}
    assert set(by_workload) == {"tensor", "memory"}
    for results in by_workload.values():
        for row in results:
            assert row["error"] is None, row
            assert len(row["samples_per_s"]) == 2
            assert row["median_samples_per_s"] > 0
            assert row["median_first_batch_ms"] > 0
            assert row["vs_best_torch"] > 0
        best_torch = [r["vs_best_torch"] for r in results if r["family"] == "torch"]
        assert max(best_torch) == pytest.approx(1.0)
    # The tensor workload's limit is its work by hand; the memory workload has none.
    limit = [r for r in by_workload["tensor"] if r["family"] == "limit"]
    assert len(limit) == 1
    assert limit[0]["of_the_limit"] == pytest.approx(1.0)
    assert all(r["of_the_limit"] > 0 for r in by_workload["tensor"])
    assert all(r["of_the_limit"] is None for r in by_workload["memory"])
    memory = {r["loader"]: r["median_peak_mib"] for r in by_workload["memory"]}
    # 400,000 records read by forked workers are copied into them; threads share them.
    assert memory["torch workers=2"] > 30
    assert memory["aload thread workers=2, for"] < memory["torch workers=2"] / 3


def test_plot_sweeps_worker_counts(tmp_path):
    pytest.importorskip("matplotlib")
    done = bench(
        "--workloads", "--plot", "sweep.png", "--plot-workload", "io", "--plot-workers", "1", "4",
        "--plot-scale", "0.02", "--repeats", "1", "--json", "-", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # with --json -, stdout is the JSON alone
    assert report["workloads"] == []
    points = {(r["family"], r["workers"]) for r in report["sweep"]}
    assert {("torch", 1), ("torch", 4), ("aload thread", 1), ("aload thread", 4)} <= points
    assert (tmp_path / "sweep.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repeats", "0"], "--repeats must be positive"),
        (["--workers", "-1"], "--workers must be non-negative"),
        (["--scale", "0"], "--scale and --plot-scale must be positive"),
        (["--workloads", "nope"], "invalid choice: 'nope'"),
    ],
)
def test_bad_options_are_refused_by_name(args, message, capsys):
    with pytest.raises(SystemExit) as exited:
        parse(args)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_run_drains_fresh_loaders_until_it_has_lasted_long_enough_to_time():
    epochs = []

    def drive(make):
        epochs.append(make())
        return Drained(samples=100, first_batch_s=0.001 * len(epochs), elapsed_s=0.05)

    result = Result("w", "short epochs", "aload thread", 0)
    with TreeMemory() as memory:
        run_once(Contender("aload thread", 0, object, drive), memory, result)
    assert len(epochs) == round(MIN_RUN_S / 0.05)
    assert len({id(e) for e in epochs}) == len(epochs)  # a new loader each time
    assert result.samples_per_s == [pytest.approx(100 / 0.05)]
    assert result.first_batch_ms == [pytest.approx(1.0)]  # the first epoch's
    assert result.step_ms == []  # no training step in the loop


def test_a_failing_loader_is_reported_and_the_others_still_run():
    def broken():
        raise OSError("disk gone")

    workload = Workload(
        "w", "d", [torch_loader(range(64), 0, batch_size=8), Contender("peer", 1, broken)]
    )
    with TreeMemory() as memory:
        ok, failed = measure(workload, 2, memory)
    assert ok.error is None
    assert len(ok.samples_per_s) == 2
    assert failed.error == "OSError: disk gone"
    assert failed.samples_per_s == []
    assert "| peer workers=1 | failed: OSError: disk gone |" in table(workload, [ok, failed])


@linux_only
def test_fresh_process_cases_report_each_loader_from_its_own_process(tmp_path):
    stdout, report = bench_report(
        "--workloads", "records", "loop", "--repeats", "1", "--scale", "0.05", tmp_path=tmp_path
    )  # fmt: skip
    assert "**records** (fresh processes)" in stdout
    assert "| aload processes, forkserver |" in stdout
    fresh = {(r["case"], r["loader"]): r for r in report["fresh"]}
    assert {case for case, _ in fresh} == {"records", "loop"}
    for result in fresh.values():
        assert result["error"] is None, result
        (run,) = result["runs"]
        assert run["first_batch_ms"] > 0
    records = {loader: r["runs"][0] for (case, loader), r in fresh.items() if case == "records"}
    # 100,000 records (a few tens of MiB) held once by threads, copied in part by each of 4 workers.
    assert records["aload threads"]["peak_pss_mib"] > 100  # the process itself: torch and all
    assert records["torch"]["peak_pss_mib"] > records["aload threads"]["peak_pss_mib"]
    loop = [r["runs"][0] for (case, _), r in fresh.items() if case == "loop"]
    assert all(run["loop_gap_ms"] >= 0 for run in loop)
    assert len(loop) == 4


def test_the_auto_workloads_set_auto_beside_every_static_setting(tmp_path):
    _, report = bench_report(
        "--workloads", "auto", "auto-batches", "auto-gil", "auto-async", "auto-train", "auto-shift",
        "auto-tail",
        "--repeats", "1",
        "--scale", "0.05",
        tmp_path=tmp_path,
    )  # fmt: skip
    for workload in report["workloads"]:
        loaders = [row["loader"] for row in workload["results"]]
        assert loaders[0].startswith("torch workers=")
        tuned = [name for name in loaders if "workers=auto" in name or "auto" in name[-8:]]
        assert tuned
        assert len(loaders) >= len(tuned) + 4  # torch, static settings, auto
        for row in workload["results"]:
            assert row["error"] is None, row
            assert row["median_samples_per_s"] > 0


def test_the_worker_mode_workloads_time_auto_over_epochs_beside_both_modes(tmp_path):
    _, report = bench_report(
        "--workloads", "auto-mode-gil", "auto-mode-numpy", "--repeats", "1", "--scale", "0.1",
        tmp_path=tmp_path,
    )  # fmt: skip
    for workload in report["workloads"]:
        loaders = [row["loader"] for row in workload["results"]]
        assert loaders == [
            "torch workers=2",
            "aload thread workers=2, for",
            "aload process workers=2, for",
            "aload auto workers=2, for",
        ]
        for row in workload["results"]:
            assert row["error"] is None, row
            assert row["median_samples_per_s"] > 0


# 17 rows and 12 runs again, each a fresh interpreter that imports torch: about a minute and a
# half on an idle 2-core machine.
@pytest.mark.timeout(300)
def test_the_grid_runs_every_static_setting_and_auto_and_sets_them_side_by_side(tmp_path):
    from aload.bench.grid import CONCURRENCY, HEAD_TO_HEAD_EXTRA_RUNS, PROCESSES, THREADS

    out, report = bench_report(
        "--workloads", "--grid", "io", "async", "--repeats", "1", "--scale", "0.005",
        tmp_path=tmp_path,
    )  # fmt: skip
    grids = {workload["name"]: workload["results"] for workload in report["workloads"]}
    assert list(grids) == [
        "grid-io",
        "grid-io-head-to-head",
        "grid-async",
        "grid-async-head-to-head",
    ]
    io = [row["loader"] for row in grids["grid-io"]]
    assert io == [
        *(f"aload thread workers={w}, for" for w in THREADS),
        *(f"aload process workers={w}, for" for w in PROCESSES),
        "aload auto workers=auto, for, num_workers='auto', worker_mode='auto'",
    ]
    assert [row["loader"] for row in grids["grid-async"]] == [
        *(f"aload thread workers=0, for, max_concurrency={c}" for c in CONCURRENCY),
        "aload auto workers=0, for, max_concurrency='auto'",
    ]
    for rows in grids.values():
        assert all(row["error"] is None and row["median_samples_per_s"] > 0 for row in rows)
    # Each grid's fastest static row and auto run again, side by side; the summary sets them
    # against each other from those runs, with the grid's own ratio beside.
    summary = out[out.index("**grid**") :].splitlines()
    for name in ("grid-io", "grid-async"):
        rows = grids[name]
        best = max(rows[:-1], key=lambda row: row["median_samples_per_s"])
        again = grids[f"{name}-head-to-head"]
        assert [row["loader"] for row in again] == [best["loader"], rows[-1]["loader"]]
        # ... more times than the grid's rows: their medians decide
        assert all(len(row["samples_per_s"]) == 1 + HEAD_TO_HEAD_EXTRA_RUNS for row in again)
        ratio = again[1]["median_samples_per_s"] / again[0]["median_samples_per_s"]
        in_the_grid = rows[-1]["median_samples_per_s"] / best["median_samples_per_s"]
        (line,) = [line for line in summary if line.startswith(f"| {name.removeprefix('grid-')} |")]
        assert best["loader"] in line
        assert line.endswith(f"| {ratio:.2f}x | {in_the_grid:.2f}x |")


def test_the_head_to_head_reads_the_whole_epoch_where_the_grids_static_runs_stop(monkeypatch):
    """A grid's static runs stop after `STATIC_SECONDS`; run again beside auto, which reads
    the whole epoch, the best one reads it all too, so that both peaks of memory are over
    the same reads (numpy's 2 threads peaked at 54-95 MiB over three seconds, and at 115-121
    over the whole epoch, as auto did at 94-120 without ever reading with more threads)."""
    from aload.bench import grid
    from aload.bench.workloads import Settings

    monkeypatch.setattr(grid, "STATIC_SECONDS", 0.0)  # stop after the first batch
    settings = Settings(scale=0.005)
    stopped = grid.run_row("io", 1, settings)  # 2 threads, 400 items in batches of 32
    whole = grid.run_row("io", 1, settings, whole=True)
    assert stopped.samples == 32
    assert whole.samples == 400


def test_a_grids_fresh_processes_read_items_as_costly_as_the_parent_calibrated_them(
    monkeypatch,
):
    """Calibrated in each fresh process, the pure-Python items of the grid's rows cost what
    the machine gave each calibration: one run of 4 processes read 8,369 items a second where
    the same setting read 3,631 and 3,849 (the most 2 cores give 0.5 ms items is 4,000).
    The parent calibrates once; each row's process builds its items from that size, and does
    not calibrate its own."""
    from aload.bench import datasets as ds
    from aload.bench import grid

    monkeypatch.setattr(ds, "python_rounds_for", lambda seconds: 1234)  # the parent's
    workload = grid.grid_workload("python", grid.Settings(scale=0.001))
    commands = []

    def fresh_process(command, **_):
        commands.append(command)
        figures = Drained(samples=1, first_batch_s=0.1, elapsed_s=0.1, peak_mib=1.0, step_s=None)
        return subprocess.CompletedProcess(command, 0, json.dumps(dataclasses.asdict(figures)))

    monkeypatch.setattr(grid.subprocess, "run", fresh_process)
    auto = workload.contenders[-1]
    auto.drive(auto.make)
    (command,) = commands
    assert command[3:5] == ["python", str(len(workload.contenders) - 1)]

    def calibrates(seconds):
        raise AssertionError("a row's process calibrated its items again")

    monkeypatch.setattr(ds, "python_rounds_for", calibrates)
    child = grid.given_settings(command[5])
    assert child.scale == 0.001
    dataset = grid.GRID["python"].dataset(child)
    assert dataset.rounds == 1234


def test_a_fresh_cases_process_reads_items_as_costly_as_the_parent_calibrated_them(
    monkeypatch,
):
    """The fresh cases that set loaders' pure-Python epochs side by side build each loader's
    items from one calibration, the parent's: calibrated in each process, torch's and
    aload's items differed by up to 1.6x in cost (4,364 to 6,871 rounds in 20 calibrations)."""
    from aload.bench import datasets as ds
    from aload.bench import fresh

    built = []

    class Items(ds.PythonDataset):
        def __init__(self, n, rounds):
            super().__init__(n, rounds)
            built.append(rounds)

    def calibrates(seconds):
        raise AssertionError("the fresh process calibrated its items again")

    monkeypatch.setattr(ds, "PythonDataset", Items)
    monkeypatch.setattr(ds, "python_rounds_for", calibrates)
    figures = fresh.child("python-epoch", "aload threads", 0.01, 77)
    assert figures["samples_per_s"] > 0
    assert built == [77]


def test_help_explains_every_workload_and_column(tmp_path):
    from aload.bench.fresh import CASES
    from aload.bench.workloads import WORKLOADS

    done = bench("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for name in [*WORKLOADS, *CASES]:
        assert f"\n  {name} " in done.stdout, name
    columns = ("samples/s", "vs best torch", "first batch", "peak memory", "loop pause", "step")
    for column in (*columns, "step inflation"):
        assert f"\n  {column} " in done.stdout, column


def spinners() -> list[int]:
    """Processes spinning for the --busy option."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"aload --busy" in cmdline.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


@linux_only
def test_busy_runs_a_training_step_workload_beside_spinning_processes(tmp_path):
    before = spinners()
    stdout, report = bench_report(
        "--workloads", "train-numpy", "--busy", "--repeats", "1", "--scale", "0.1",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert "every core kept busy" in stdout
    assert report["environment"]["busy"] is True
    (workload,) = report["workloads"]
    families = [r["family"] for r in workload["results"]]
    assert families == [
        "limit", "torch", "aload thread", "aload process", "aload auto", "torch", "aload thread"
    ]  # fmt: skip
    # The last two: torch's workers and aload's at a lower priority than the step.
    lowered = [r["loader"].endswith("nice 10") for r in workload["results"]]
    assert lowered == [False] * 5 + [True] * 2
    assert all(r["error"] is None and r["of_the_limit"] > 0 for r in workload["results"])
    # The step is timed beside every loader, and set against the steps alone.
    assert all(r["median_step_ms"] > 0 for r in workload["results"])
    assert workload["results"][0]["step_inflation"] == pytest.approx(0.0)
    assert all(r["step_inflation"] > -1 for r in workload["results"])
    assert "| step (ms) | step inflation |" in stdout
    assert spinners() == before  # the busy processes end with the run


@linux_only
def test_a_killed_busy_bench_leaves_no_spinner_behind(tmp_path):
    before = spinners()
    bench_process = subprocess.Popen(
        [sys.executable, "-m", "aload.bench", "--workloads", "tensor", "--busy"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # its fork server's socket dies with it
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while len(spinners()) <= len(before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(spinners()) > len(before)
    bench_process.kill()  # no cleanup runs
    bench_process.wait()
    deadline = time.monotonic() + 5
    while spinners() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert spinners() == before


def test_the_rate_limited_store_counts_refused_requests_so_a_retry_storm_keeps_it_refusing():
    """What makes too much concurrency cost in `auto-shift`: past the rate, refusals drain
    the same budget, so a client that retries without waiting is refused on."""
    from aload.bench.datasets import RateLimit

    limit = RateLimit(100, burst=0.1)  # bursts of 10
    assert [limit.admit() for _ in range(10)] == [True] * 10
    assert not any(limit.admit() for _ in range(10))  # refused, and counted: 10 in debt
    time.sleep(0.05)  # 5 requests' worth of time: half the debt paid, still refused
    assert not limit.admit()
    time.sleep(0.3)  # 30 more: the debt paid, and served again
    assert limit.admit()
