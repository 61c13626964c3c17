"""aload's benchmark suite: run it with `python -m aload.bench` (see `--help`).

`datasets` holds the workloads' data, `contenders` the loaders under test, `workloads` the suite,
`training` its training-step workloads, `grid` the static settings against "auto" (each run in
a fresh process), `fresh` the other fresh-process cases, `runner` the timing, `memory` the
process-tree memory sampler, `report` the tables and JSON, `plot` the sweep over worker
counts, and `cli` the command line.
"""
