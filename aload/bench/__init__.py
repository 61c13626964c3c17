"""aload's benchmark suite: run it with `python -m aload.bench` (see `--help`).

`datasets` holds the workloads' data, `contenders` the loaders under test, `workloads` the suite,
`runner` the timing, `memory` the process-tree memory sampler, `report` the tables and JSON, and
`plot` the sweep over worker counts.
"""
