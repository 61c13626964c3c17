"""aload inside Ray Train: a run stopped mid-epoch resumes exactly.

Each of Ray Train's `TorchTrainer` workers is a training rank (Ray Train sets up
torch.distributed), and each reads its share of the data with an aload loader
(`distributed=True`). Every few steps each rank reports a checkpoint holding its model, its
optimizer and the loader's `state_dict()`. The first attempt fails in the middle of its first
epoch (as a lost node would); Ray Train starts the workers again from the last checkpoint,
and the loaders go on from the batch after it. At the end, every sample has been trained on
once per epoch: none twice (the batches after the checkpoint were dropped with the model's
steps on them) and none lost.

    pip install 'aload[ray]' 'ray[train]'
    python examples/ray_train.py
"""

from __future__ import annotations

import os
import tempfile

import ray
import ray.train
import torch
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_model
from torch.utils.data import TensorDataset

import aload

SAMPLES = 512
BATCH_SIZE = 16
EPOCHS = 2
CHECKPOINT_EVERY = 6  # steps
FAIL_AT = 10  # the first attempt fails at this step of its first epoch


def dataset() -> TensorDataset:
    """Each sample: its index, features, a target."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(SAMPLES, 8, generator=generator)
    return TensorDataset(torch.arange(SAMPLES), features, features.sum(1, keepdim=True))


def train_loop(config: dict) -> None:
    """One rank's training: resumed from Ray Train's last checkpoint when there is one."""
    rank = ray.train.get_context().get_world_rank()
    model = prepare_model(torch.nn.Linear(8, 1))  # DistributedDataParallel over gloo
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = aload.DataLoader(
        dataset(),
        batch_size=BATCH_SIZE,
        shuffle=True,
        num_workers=2,
        worker_mode="ray",  # each rank's batches read by 2 Ray actors, anywhere on the cluster
        distributed=True,  # this rank's share, as torch's DistributedSampler deals it
        generator=torch.Generator().manual_seed(config["seed"]),
    )
    trained: list[list[int]] = [[] for _ in range(EPOCHS)]  # sample indices, per epoch
    epoch, resumed = 0, False
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = torch.load(os.path.join(folder, f"rank{rank}.pt"))
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        loader.load_state_dict(saved["loader"])
        trained, epoch, resumed = saved["trained"], saved["epoch"], True

    while epoch < EPOCHS:
        for step, (indices, x, y) in enumerate(loader):
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            trained[epoch] += indices.tolist()
            if checkpoint is None and epoch == 0 and step == FAIL_AT:
                raise RuntimeError("a node was lost (simulated)")
            if (step + 1) % CHECKPOINT_EVERY == 0:
                report(rank, epoch, loss, model, optimizer, loader, trained, resumed)
        epoch += 1
        report(rank, epoch, loss, model, optimizer, loader, trained, resumed)


def report(rank, epoch, loss, model, optimizer, loader, trained, resumed) -> None:
    """Every rank reports (Ray Train's report is collective), each with its own file."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "loader": loader.state_dict(),  # where this rank's share of the epoch stands
        "trained": trained,
        "epoch": epoch,
        "resumed": resumed,
    }
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, os.path.join(folder, f"rank{rank}.pt"))
        metrics = {"loss": float(loss), "epoch": epoch}
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


def main() -> None:
    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"seed": 7},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
            run_config=RunConfig(
                storage_path=storage, name="aload", failure_config=FailureConfig(max_failures=1)
            ),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as folder:
            ranks = [torch.load(os.path.join(folder, f"rank{rank}.pt")) for rank in range(2)]
    assert all(rank["resumed"] for rank in ranks), "the run was not stopped and resumed"
    for epoch in range(EPOCHS):
        seen = sorted(ranks[0]["trained"][epoch] + ranks[1]["trained"][epoch])
        assert seen == list(range(SAMPLES)), f"epoch {epoch}: a sample was lost or repeated"
    print(
        f"{EPOCHS} epochs of {SAMPLES} samples on 2 ranks, resumed after a failure at step "
        f"{FAIL_AT}: every sample trained on once per epoch (loss {result.metrics['loss']:.4f})"
    )


if __name__ == "__main__":
    # 2 CPUs for the ranks, 4 for their loaders' actors (here, on this machine's cores).
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    main()
    ray.shutdown()
