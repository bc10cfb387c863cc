"""fastvit_style.ops._index_maps: the inverse of kv_index, the range check, and what is kept of them."""

import gc
import importlib

import pytest
import torch

from fastvit_style.ops import _index_maps, shared_attention
from fastvit_style.ops._index_maps import inverse_kv_map, shared_inverse


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


def test_inverse_kv_map_reads_out_of_range_entries_at_the_nearest_end():
    """An unchecked map's entries outside [0, Skv) count as the kernels read them: every query sequence
    is listed once (the one-launch backward writes dq only for those listed); in increasing order per
    K/V sequence also for a map long enough that an unstable sort would reorder them."""
    offsets, queries = inverse_kv_map(torch.tensor([5, -1, 1, 3], dtype=torch.int32), 3)
    assert offsets.tolist() == [0, 1, 2, 4] and queries.tolist() == [1, 2, 0, 3]
    index = torch.randint(0, 3, (5000,), generator=torch.Generator().manual_seed(0))
    offsets, queries = inverse_kv_map(index, 3)
    for j in range(3):
        assert torch.equal(queries[offsets[j] : offsets[j + 1]], (index == j).nonzero().flatten())


@pytest.fixture
def count_inversions(monkeypatch):
    """A list that grows by one per inverse actually computed."""
    calls = []
    real = _index_maps.inverse_kv_map
    monkeypatch.setattr(_index_maps, "inverse_kv_map", lambda *a: calls.append(1) or real(*a))
    return calls


def test_shared_while_held(count_inversions):
    """Nodes of one graph reading the same map share one inversion; other maps, other Skv or an edited
    map get their own."""
    layers, own = torch.tensor([0, 1, 1], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)
    held = [shared_inverse(layers, 2) for _ in range(12)] + [shared_inverse(own, 2) for _ in range(12)]
    assert len({id(h) for h in held}) == 2
    for h, index in zip(held, [layers] * 12 + [own] * 12):
        h.get(index)
    assert len(count_inversions) == 2
    assert held[0].get(layers)[1].tolist() == [0, 1, 2]
    assert shared_inverse(layers, 3) is not held[0]
    layers[0] = 1  # in place: the version counter moves
    assert shared_inverse(layers, 2) is not held[0]
    assert shared_inverse(layers.clone(), 2) is not held[0]


def test_dropped_with_the_graph(count_inversions):
    """Once no autograd node holds it, the next forward inverts again: nothing outlives a training step,
    so a map rewritten behind the version counter (`.data`) between steps is seen."""
    index = torch.tensor([1, 0, 1], dtype=torch.int32)
    first = shared_inverse(index, 2)
    first.get(index)
    del first
    gc.collect()
    index.data[0] = 0  # no version bump
    assert shared_inverse(index, 2).get(index)[1].tolist() == [0, 1, 2]
    assert len(count_inversions) == 2


def test_not_reused_by_a_later_step(count_inversions):
    """The previous step's graph is often still referenced (through its loss) when the next forward
    runs: a holder a backward has used is not handed out again, so a rewrite of the map behind the
    version counter between steps is seen."""
    index = torch.tensor([1, 0, 1], dtype=torch.int32)
    previous = shared_inverse(index, 2)
    previous.get(index)
    index.data[0] = 0  # no version bump
    current = shared_inverse(index, 2)
    assert current is not previous
    assert current.get(index)[1].tolist() == [0, 1, 2]
    assert shared_inverse(index, 2) is not current


def test_nothing_shared_while_capturing_or_for_inference_tensors(count_inversions, monkeypatch):
    """A CUDA graph capture must record the inversion (a replay reads the map's current values), and
    inference tensors have no version counter to tell an edit."""
    with torch.inference_mode():
        inference_index = torch.tensor([1, 0], dtype=torch.int32)
    assert shared_inverse(inference_index, 2) is not shared_inverse(inference_index, 2)
    index = torch.tensor([1, 0], dtype=torch.int32)
    held = shared_inverse(index, 2)
    held.get(index)
    monkeypatch.setattr(_index_maps, "_capturing", lambda t: True)
    assert shared_inverse(index, 2) is not held
    held.get(index)
    held.get(index)
    assert len(count_inversions) == 3


def test_not_shared_across_streams(count_inversions, monkeypatch):
    """A backward on another stream than the one that inverted the map inverts it again (nothing orders
    the first stream's sort before its read); the first stream keeps the shared one."""
    index = torch.tensor([1, 0, 1], dtype=torch.int32)
    held = shared_inverse(index, 2)
    monkeypatch.setattr(_index_maps, "_stream", lambda t: "first")
    first = held.get(index)
    monkeypatch.setattr(_index_maps, "_stream", lambda t: "second")
    assert held.get(index) is not first
    assert held.get(index)[1].tolist() == [1, 0, 2]
    monkeypatch.setattr(_index_maps, "_stream", lambda t: "first")
    assert held.get(index) is first
    assert len(count_inversions) == 3


@pytest.mark.gpu
def test_backward_on_two_streams():
    """Layers whose forwards ran on two CUDA streams (autograd runs each backward on its forward's
    stream) give the gradients of a single-stream run."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(6, 197, 2, 64, device="cuda", generator=gen, requires_grad=True)
    kv = torch.randn(4, 197, 2, 64, device="cuda", generator=gen, requires_grad=True)
    index = torch.tensor([0, 1, 2, 3, 2, 3], dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()

    def run(streams):
        x = q
        for stream in streams:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                x = shared_attention(x, kv, kv, index, backend="triton")
            torch.cuda.current_stream().wait_stream(stream)
        return torch.autograd.grad(x.square().sum(), (q, kv))

    main = torch.cuda.current_stream()
    expected = run([main] * 4)
    for got, want in zip(run([main, side, main, side]), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_eager_backward_of_a_model_inverts_each_map_once(count_inversions):
    """Twelve layers over one map and their re-anchor calls over another: two inversions per backward,
    and the next step inverts again."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(6, 5, 1, 16, generator=gen, requires_grad=True)
    kv = torch.randn(4, 5, 1, 16, generator=gen, requires_grad=True)
    layers, own = torch.tensor([0, 1, 2, 3, 2, 3], dtype=torch.int32), torch.arange(6, dtype=torch.int32)
    for step in (1, 2):
        x = q
        for _ in range(12):
            x = shared_attention(x, kv, kv, layers, backend="triton", check_index=False)
            x = shared_attention(x, x, x, own, backend="triton", check_index=False)
        x.sum().backward()
        assert len(count_inversions) == 2 * step


def test_range_check_once_per_map(monkeypatch):
    """The eager range check (a device sync) runs again only for a new or edited map, and never during
    a CUDA graph capture."""
    calls = []
    stack = torch.stack
    monkeypatch.setattr(torch, "stack", lambda *a, **kw: calls.append(1) or stack(*a, **kw))
    index = torch.tensor([1, 0], dtype=torch.int32)
    _index_maps.check_index_range(index, 2)
    _index_maps.check_index_range(index, 2)
    assert len(calls) == 1
    with pytest.raises(ValueError, match=r"\[0, Skv=1\), got min 0 and max 1"):
        _index_maps.check_index_range(index, 1)
    index[0] = 2
    with pytest.raises(ValueError, match=r"\[0, Skv=2\), got min 0 and max 2"):
        _index_maps.check_index_range(index, 2)
    monkeypatch.setattr(_index_maps, "_capturing", lambda t: True)
    _index_maps.check_index_range(index, 2)


def test_range_checks_of_four_maps_are_kept(monkeypatch):
    """Two models of two maps each (layers, re-anchor) called in turn: each map is checked once."""
    calls = []
    stack = torch.stack
    monkeypatch.setattr(torch, "stack", lambda *a, **kw: calls.append(1) or stack(*a, **kw))
    monkeypatch.setattr(_index_maps, "_checked", ())
    maps = [torch.tensor([i % 2, 1 - i % 2, i // 2], dtype=torch.int32) for i in range(4)]
    for _ in range(3):
        for index in maps:
            _index_maps.check_index_range(index, 2)
    assert len(calls) == 4


def test_no_holder_without_a_backward(monkeypatch):
    """Eval and TTA calls (no grad mode, or no input needing a gradient) run the launcher alone, with
    the numbers of the autograd path, and skip the per-map lookup."""
    op_module = importlib.import_module("fastvit_style.ops.shared_attention")
    taken = []
    monkeypatch.setattr(op_module, "shared_inverse", lambda *a: taken.append(1) or shared_inverse(*a))
    q, kv = torch.randn(2, 5, 1, 16, requires_grad=True), torch.randn(2, 5, 1, 16)
    index = torch.tensor([1, 0], dtype=torch.int32)
    with torch.no_grad():
        evaluated = shared_attention(q, kv, kv, index, backend="triton")
    detached = shared_attention(q.detach(), kv, kv, index, backend="triton")
    assert not taken
    out = shared_attention(q, kv, kv, index, backend="triton")
    out.sum().backward()
    assert len(taken) == 1
    assert torch.equal(evaluated, out) and torch.equal(detached, out)
