import os
import sys

# Triton's interpreter must be chosen before triton is imported; CPU tests run every kernel through it.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        # A GPU call's time cap cuts the end: the op and model-level tests first, then the kernels'
        # many small compiles, and last the model compiles (minutes of inductor each; the benchmark's
        # compiled rows exercise the same path).
        items.sort(
            key=lambda item: ("tests/kernels/" in item.nodeid) + 2 * ("test_compile.py" in item.nodeid)
        )
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: extra intra-op threads on a small, shared machine only contend (measured 5-10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fake_xformers(monkeypatch):
    """A stand-in `xformers.ops.memory_efficient_attention` that keeps its input contract (BMHK layout,
    one batch for q, k and v, unit last stride) and runs on any device through SDPA. It lets CPU tests
    check the xformers backend's wiring (gather, layout, scale, gradients); the real package is
    tested on CUDA (mark gpu)."""
    import types

    import torch.nn.functional as F

    from fastvit_style.ops import _xformers_impl

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
        assert attn_bias is None and p == 0.0
        assert query.dim() == key.dim() == value.dim() == 4, "BMHK tensors expected"
        assert key.shape == value.shape and key.shape[0] == query.shape[0], "one batch for q, k and v"
        assert query.shape[2:] == key.shape[2:], "one (H, K) for q, k and v"
        assert all(t.stride(-1) == 1 for t in (query, key, value)), "unit stride along K expected"
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (query, key, value)), scale=scale)
        return out.transpose(1, 2)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    package = types.ModuleType("xformers")
    package.ops, package.__version__ = ops, "fake"
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(_xformers_impl, "DEVICES", ("cuda", "cpu"))
