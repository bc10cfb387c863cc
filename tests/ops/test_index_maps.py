"""fastvit_style.ops._index_maps: the inverse of kv_index, and what is kept of it per map."""

import pytest
import torch

from fastvit_style.ops import _index_maps
from fastvit_style.ops._index_maps import cached_inverse_kv_map, inverse_kv_map


@pytest.mark.parametrize(
    "kv_index, num_kv",
    [([0, 1, 2], 3), ([1, 2, 0], 3), ([2, 2, 2, 2], 4), ([3, 0, 3, 1, 0, 3], 5), ([], 2)],
    ids=["identity", "roll", "all-to-one", "repeats-unused", "empty"],
)
def test_inverse_kv_map(kv_index, num_kv):
    index = torch.tensor(kv_index, dtype=torch.int32)
    offsets, queries = inverse_kv_map(index, num_kv)
    assert offsets.dtype == queries.dtype == torch.int64
    assert offsets.shape == (num_kv + 1,) and queries.shape == (len(kv_index),)
    for j in range(num_kv):
        readers = queries[offsets[j] : offsets[j + 1]].tolist()
        assert readers == [s for s, jj in enumerate(kv_index) if jj == j]


@pytest.fixture
def count_inversions(monkeypatch):
    """A list that grows by one per inverse actually computed."""
    calls = []
    monkeypatch.setattr(_index_maps, "_inverses", _index_maps._PerMapCache(4))
    monkeypatch.setattr(_index_maps, "inverse_kv_map", lambda *a: calls.append(1) or inverse_kv_map(*a))
    return calls


def test_cached_once_per_map(count_inversions):
    """The layers of a model pass two maps, alternately in the backward: each is inverted once."""
    layers, own = torch.tensor([0, 1, 1], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)
    for _ in range(12):
        assert cached_inverse_kv_map(layers, 2)[1].tolist() == [0, 1, 2]
        assert cached_inverse_kv_map(own, 2)[1].tolist() == [0, 1]
    assert len(count_inversions) == 2
    cached_inverse_kv_map(layers, 3)  # another number of K/V sequences: another inverse
    assert len(count_inversions) == 3


def test_cache_sees_edits_and_copies(count_inversions):
    index = torch.tensor([0, 1, 1], dtype=torch.int32)
    cached_inverse_kv_map(index, 2)
    index[0] = 1  # in place: the version counter moves
    offsets, queries = cached_inverse_kv_map(index, 2)
    assert offsets.tolist() == [0, 0, 3] and queries.tolist() == [0, 1, 2]
    cached_inverse_kv_map(index.clone(), 2)  # equal values, another tensor
    assert len(count_inversions) == 3


def test_nothing_kept_while_capturing_or_for_inference_tensors(count_inversions, monkeypatch):
    """A CUDA graph capture must record the inversion (a replay reads the map's current values), and
    inference tensors have no version counter to tell an edit."""
    index = torch.tensor([1, 0], dtype=torch.int32)
    with torch.inference_mode():
        inference_index = index.clone()
        cached_inverse_kv_map(inference_index, 2)
        cached_inverse_kv_map(inference_index, 2)
    assert len(count_inversions) == 2
    monkeypatch.setattr(_index_maps, "_capturing", lambda t: True)
    cached_inverse_kv_map(index, 2)
    cached_inverse_kv_map(index, 2)
    assert len(count_inversions) == 4
    monkeypatch.setattr(_index_maps, "_capturing", lambda t: False)
    cached_inverse_kv_map(index, 2)
    cached_inverse_kv_map(index, 2)
    assert len(count_inversions) == 5
