"""Worker identity, `worker_init_fn` and per-worker seeds in thread workers."""

from __future__ import annotations

import threading

import torch
from conftest import Indexed

import aload


class Reporting(Indexed):
    """Each sample reports the info of the worker that read it."""

    def __getitem__(self, index):
        info = aload.get_worker_info()
        return {
            "index": index,
            "id": info.id,
            "num_workers": info.num_workers,
            "seed": info.seed,
            "same_dataset": info.dataset is self,
            "thread": threading.get_ident(),
            "draw": info.rng.random(),
        }


def samples(loader):
    return [
        {key: value[i] for key, value in batch.items()}
        for batch in loader
        for i in range(len(batch["index"]))
    ]


def test_main_thread_has_no_worker_info():
    assert aload.get_worker_info() is None


def test_each_thread_worker_sees_its_own_info_seeded_as_torch_seeds_workers():
    expected_base = int(
        torch.empty((), dtype=torch.int64).random_(generator=torch.Generator().manual_seed(5))
    )
    loader = aload.DataLoader(
        Reporting(40), batch_size=2, num_workers=3, generator=torch.Generator().manual_seed(5)
    )
    seen = samples(loader)
    ids = {int(s["id"]) for s in seen}
    assert ids <= {0, 1, 2}
    assert len(ids) >= 2
    for s in seen:
        assert int(s["num_workers"]) == 3
        assert int(s["seed"]) == expected_base + int(s["id"])
        assert bool(s["same_dataset"])
    threads_by_id = {}
    for s in seen:
        threads_by_id.setdefault(int(s["id"]), set()).add(int(s["thread"]))
    assert all(len(threads) == 1 for threads in threads_by_id.values())


def test_seeds_are_reproducible_with_a_generator_and_change_every_epoch():
    def epoch_seeds(loader, record):
        record.clear()
        list(loader)
        return sorted(record)

    def make(record):
        def init(worker_id):
            record.append((worker_id, aload.get_worker_info().seed))

        return aload.DataLoader(
            Indexed(8),
            batch_size=2,
            num_workers=2,
            worker_init_fn=init,
            generator=torch.Generator().manual_seed(1),
        )

    first_record, again_record = [], []
    first, again = make(first_record), make(again_record)
    epoch1 = epoch_seeds(first, first_record)
    assert [worker for worker, _ in epoch1] == [0, 1]
    assert epoch1[1][1] == epoch1[0][1] + 1
    assert epoch1 == epoch_seeds(again, again_record)
    assert epoch_seeds(first, first_record) != epoch1


def test_worker_generators_are_independent_per_worker():
    draws = {}

    def init(worker_id):
        rng = aload.get_worker_info().rng
        draws[worker_id] = [rng.random() for _ in range(20)]

    list(aload.DataLoader(Indexed(6), batch_size=3, num_workers=2, worker_init_fn=init))
    assert sorted(draws) == [0, 1]
    assert not set(draws[0]) & set(draws[1])


def test_worker_init_fn_runs_once_in_each_worker_thread_before_loading():
    calls = []

    def init(worker_id):
        calls.append((worker_id, threading.get_ident(), aload.get_worker_info().id))

    loader = aload.DataLoader(Reporting(20), batch_size=2, num_workers=3, worker_init_fn=init)
    seen = samples(loader)
    assert sorted(c[0] for c in calls) == [0, 1, 2]
    assert all(worker_id == info_id for worker_id, _, info_id in calls)
    thread_of = {worker_id: thread for worker_id, thread, _ in calls}
    assert all(thread_of[int(s["id"])] == int(s["thread"]) for s in seen)


def test_no_worker_info_and_no_init_with_zero_workers():
    calls = []

    class Main(Indexed):
        def __getitem__(self, index):
            assert aload.get_worker_info() is None
            return index

    list(aload.DataLoader(Main(4), batch_size=2, worker_init_fn=calls.append))
    assert calls == []
