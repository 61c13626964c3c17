"""`worker_mode="auto"` with one worker beside a training step: how often does it move?

    python benchmarks/worker_mode_beside_a_step.py              # 10 loaders, step = a batch
    python benchmarks/worker_mode_beside_a_step.py --loaders 20 --step-scale 2.5

The bench's `train-python-split` setting: items of ~0.2 ms of pure Python (they hold the GIL),
one worker, and a training step (an MLP's forward, backward and SGD step) on one intra-op
thread, calibrated to `--step-scale` times what the worker takes for a batch. Each of
`--loaders` fresh loaders trains one epoch of 2,048 items with `worker_mode="auto"`; it prints
in how many epochs the workers stayed on threads throughout (the worker and the step take turns
on the GIL: a process would run beside the step), the median samples/s, and each epoch's first
verdict.
"""

from __future__ import annotations

import argparse
import statistics
import time

import aload
from aload.bench import training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loaders", type=int, default=10)
    parser.add_argument("--step-scale", type=float, default=1.0)
    args = parser.parse_args()
    data = training.Featurized(training.python_work(2048, 0.0002))
    batch_seconds = training.batch_seconds(data, 1)
    with training.intra_op_threads(1):
        step = training.step_for(batch_seconds * args.step_scale)
        stayed, rates, verdicts = 0, [], []
        for _ in range(args.loaders):
            loader = aload.DataLoader(
                data, batch_size=training.BATCH, num_workers=1, worker_mode="auto"
            )
            started = time.perf_counter()
            for batch in loader:
                step(batch)
            rates.append(len(data) / (time.perf_counter() - started))
            tuning = loader.stats.worker_mode
            assert tuning is not None
            moved = [choice for choice in tuning.history if choice.worker_mode == "process"]
            stayed += not moved
            verdicts.append((moved or list(tuning.history))[0].reason)
    print(
        f"a batch {batch_seconds * 1000:.1f} ms on one worker, the step {args.step_scale:g}x: "
        f"stayed on threads in {stayed} of {args.loaders} epochs, "
        f"median {statistics.median(rates):,.0f} samples/s"
    )
    for reason in verdicts:
        print(f"- {reason}")


if __name__ == "__main__":
    main()
