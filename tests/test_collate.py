"""`pad_collate`: variable-length sequences padded to the longest in the batch."""

from __future__ import annotations

import collections
import functools

import numpy as np
import torch

import aload


def test_token_lists_are_padded_with_lengths_and_mask():
    batch = aload.pad_collate([[5, 6, 7], [8], [9, 10]])
    assert isinstance(batch, aload.Padded)
    assert batch.values.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert batch.lengths.tolist() == [3, 1, 2]
    assert batch.mask.tolist() == [[True, True, True], [True, False, False], [True, True, False]]


def test_padding_value_is_configurable():
    collate = functools.partial(aload.pad_collate, padding_value=-100)
    assert collate([torch.tensor([1, 2]), torch.tensor([3])]).values.tolist() == [[1, 2], [3, -100]]


def test_tuples_are_structure_and_labels_are_stacked():
    tokens, labels = aload.pad_collate([(torch.tensor([1, 2, 3]), 0), (torch.tensor([4]), 1)])
    assert tokens.values.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert labels.tolist() == [0, 1]


def test_dicts_and_named_tuples_keep_their_keys():
    Pair = collections.namedtuple("Pair", "ids label")
    batch = aload.pad_collate(
        [
            {"pair": Pair(np.array([1, 2]), 3.0), "name": "a"},
            {"pair": Pair(np.array([4, 5, 6]), 4.0), "name": "b"},
        ]
    )
    assert isinstance(batch["pair"], Pair)
    assert batch["pair"].ids.values.tolist() == [[1, 2, 0], [4, 5, 6]]
    assert batch["pair"].label.dtype == torch.float64
    assert batch["name"] == ["a", "b"]


def test_empty_sequence_takes_the_batch_dtype():
    batch = aload.pad_collate([[], [1, 2]])
    assert batch.values.dtype == torch.int64
    assert batch.lengths.tolist() == [0, 2]


def test_images_are_stacked_not_padded():
    images = [torch.zeros(3, 4, 4), torch.ones(3, 4, 4)]
    assert aload.pad_collate(images).shape == (2, 3, 4, 4)


def test_pad_collate_in_a_loader_of_sentences():
    sentences = [[1] * n for n in (3, 1, 4, 1, 5)]
    loader = aload.DataLoader(sentences, batch_size=2, collate_fn=aload.pad_collate, num_workers=2)
    shapes = [tuple(batch.values.shape) for batch in loader]
    assert shapes == [(2, 3), (2, 4), (1, 5)]
