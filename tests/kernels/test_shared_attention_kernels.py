"""The shared-attention launchers against a float64 evaluation of the PyTorch path.

On CPU the kernels run through the Triton interpreter (TRITON_INTERPRET=1, set in conftest), which
computes in fp32 even for bf16 inputs; on CUDA (mark gpu, TRITON_INTERPRET unset) on the hardware,
where fp32 dots are exact under torch's default (no TF32, `_common.dot_precision`), so that fp32 is
held to the fp32 tolerance. Outputs are NaN-poisoned (conftest), so an element no program writes fails.
"""

import contextlib
import importlib
import math
from pathlib import Path

import pytest
import torch
from fastvit_style.kernels import (
    _common,
    shared_attention_bwd,
    shared_attention_bwd_fused,
    shared_attention_fwd,
)
from helpers import TOLERANCE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastvit_style.ops._index_maps import inverse_kv_map
from fastvit_style.ops._torch_impl import shared_attention_torch

LAYOUTS = ("projection", "contiguous", "transposed", "mixed")
_DEFAULT_BLOCKS = _common.attention_blocks


@pytest.fixture(params=["two_launches", "one_launch"])
def backward(request, monkeypatch):
    """The backward as two launches (dq, then dk/dv) or as one (`shared_attention_bwd_fused`, where it
    applies: on a GPU not in fp32 nor at d > 64, which then run the two launches again)."""
    one_launch = 0 if request.param == "one_launch" else None
    monkeypatch.setattr(_common, "ONE_LAUNCH_BACKWARD_MIN_PROGRAMS", one_launch)
    return request.param


def make_inputs(Sq, Skv, Tq, Tk, H, d, kv_index, dtype, device, layout="projection", seed=0):
    """q (Sq, Tq, H, d), k/v (Skv, Tk, H, d), kv_index (Sq,) int32, dO (Sq, Tq, H, d) in `layout`.

    projection: q is a view of a (Sq, Tq, 3*H*d) projection slice, k/v unbind a (Skv, Tk, 2, H, d)
    K/V projection, as the model passes them; transposed: head-major memory (S, H, T, d); mixed: each
    tensor its own strides (q contiguous, k a K/V projection slice, v and dO head-major), so that a
    kernel reading one tensor with another's strides fails.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    if layout == "projection":
        q = randn(Sq, Tq, 3 * H * d)[..., H * d : 2 * H * d].view(Sq, Tq, H, d)
        k, v = randn(Skv, Tk, 2, H, d).unbind(2)
    elif layout == "contiguous":
        q, k, v = randn(Sq, Tq, H, d), randn(Skv, Tk, H, d), randn(Skv, Tk, H, d)
    elif layout == "transposed":
        q, k, v = (randn(S, H, T, d).transpose(1, 2) for S, T in ((Sq, Tq), (Skv, Tk), (Skv, Tk)))
    else:
        q, k, v = randn(Sq, Tq, H, d), randn(Skv, Tk, 2, H, d)[:, :, 0], randn(Skv, H, Tk, d).transpose(1, 2)
    do = randn(Sq, H, Tq, d).transpose(1, 2) if layout == "mixed" else randn(Sq, Tq, H, d)
    return q, k, v, torch.tensor(kv_index, dtype=torch.int32, device=device), do


def reference(q, k, v, kv_index, do, scale):
    """Float64 out (Sq, Tq, H, d), lse (Sq, H, Tq) in base 2, dq, dk, dv from the PyTorch path."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = shared_attention_torch(q, k, v, kv_index, scale)
    grads = torch.autograd.grad(out, (q, k, v), do.double())
    logits = torch.einsum("sqhd,skhd->shqk", q, k.index_select(0, kv_index)) * scale
    return (out, logits.logsumexp(-1) / math.log(2), *grads)


def run_kernels(q, k, v, kv_index, do, scale):
    out, lse = shared_attention_fwd(q, k, v, kv_index, scale)
    kv_offsets, kv_queries = inverse_kv_map(kv_index, k.shape[0])
    return (out, lse, *shared_attention_bwd(do, q, k, v, out, lse, kv_index, kv_offsets, kv_queries, scale))


def rel_err(actual, expected):
    """Max-norm error relative to max(largest expected value, 1).

    The inputs are standard normal, so 1 is the natural size of every output and gradient; the
    floor holds a reference that is mathematically zero (dq, dk with a single key, where float64
    leaves 1e-17) to an absolute tolerance instead of a relative one against rounding noise.
    """
    return (actual.double() - expected).abs().max().item() / max(expected.abs().max().item(), 1.0)


def assert_matches(actual, expected, tols):
    """actual, expected: (out, lse, dq, dk, dv) or a prefix; tols: one tolerance or one per tensor."""
    tols = tols if isinstance(tols, (list, tuple)) else [tols] * len(actual)
    for name, a, e, tol in zip(("out", "lse", "dq", "dk", "dv"), actual, expected, tols):
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert torch.isfinite(a).all(), f"{name}: {(~torch.isfinite(a)).sum().item()} non-finite elements"
        assert rel_err(a, e) <= tol, f"{name}: relative error {rel_err(a, e):.2e} > {tol:.1e}"


def check(Sq, Skv, Tq, Tk, H, d, kv_index, dtype, device, layout="projection", scale=None, seed=0):
    if (
        device.type == "cuda"
        and _common.ONE_LAUNCH_BACKWARD_MIN_PROGRAMS == 0
        and not shared_attention_bwd_fused.kernel_configs(Tq, Tk, d, dtype)
    ):
        pytest.skip("the one-launch backward does not apply on a GPU in fp32 or at d > 64 (two launches do)")
    q, k, v, kv_index, do = make_inputs(Sq, Skv, Tq, Tk, H, d, kv_index, dtype, device, layout, seed)
    scale = d**-0.5 if scale is None else scale
    actual = run_kernels(q, k, v, kv_index, do, scale)
    assert actual[0].dtype == dtype and actual[1].dtype == torch.float32
    assert all(g.dtype == dtype for g in actual[2:])
    expected = reference(q, k, v, kv_index, do, scale)
    tols = [TOLERANCE[dtype]] * 5
    if dtype != torch.float32:
        # Half precision on the GPU may also be as far off as twice PyTorch's own error in that
        # dtype (FlashAttention's test rule); lse is fp32 and keeps the table's tolerance.
        qh, kh, vh = (t.detach().requires_grad_() for t in (q, k, v))
        out_h = shared_attention_torch(qh, kh, vh, kv_index, scale)
        own = (out_h, *torch.autograd.grad(out_h, (qh, kh, vh), do))
        for i, t in zip((0, 2, 3, 4), own):
            tols[i] = max(tols[i], 2 * rel_err(t, expected[i]))
    assert_matches(actual, expected, tols)


# Skv, kv_index (its length is Sq), Tq, Tk, H, d
CASES = [
    pytest.param(1, [0], 1, 1, 1, 32, id="S1-T1-H1-d32-identity"),  # one key: softmax is exactly 1
    pytest.param(4, [1, 2, 3, 0], 7, 7, 2, 32, id="S4-T7-H2-d32-roll"),
    pytest.param(3, [2, 2, 2, 2], 6, 7, 3, 80, id="S4-Tq6-Tk7-H3-d80-all_to_one"),  # K/V 0, 1 unused
    pytest.param(4, [3, 0, 3, 3, 1], 64, 64, 2, 64, id="S5-T64-H2-d64-random"),  # repeats, K/V 2 unused
    pytest.param(4, [0, 1, 2, 3, 2, 3], 64, 64, 1, 64, id="S6-T64-H1-d64-model"),  # [x; s; a] -> [x, s, s]
    pytest.param(3, [0, 2, 1], 37, 50, 1, 80, id="S3-Tq37-Tk50-H1-d80-perm"),  # neither a multiple of 16
    pytest.param(2, [1, 0, 1], 9, 12, 2, 128, id="S3-Tq9-Tk12-H2-d128-roll"),  # MAX_HEAD_DIM
]
T197 = [
    pytest.param(2, [1, 0], 197, 197, 1, 64, id="S2-T197-H1-d64-roll"),
    # The last layer drops the CLS query row.
    pytest.param(2, [0, 1, 1], 196, 197, 1, 64, id="S3-Tq196-Tk197-H1-d64-model"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("Skv, kv_index, Tq, Tk, H, d", CASES)
def test_matches_reference(Skv, kv_index, Tq, Tk, H, d, dtype, device, backward):
    check(len(kv_index), Skv, Tq, Tk, H, d, kv_index, dtype, device)


@pytest.mark.parametrize("Skv, kv_index, Tq, Tk, H, d", T197)
def test_released_length(Skv, kv_index, Tq, Tk, H, d, device, backward):
    check(len(kv_index), Skv, Tq, Tk, H, d, kv_index, torch.float32, device)


def test_released_length_bf16(device, backward):
    check(3, 2, 196, 197, 1, 64, [0, 1, 1], torch.bfloat16, device)


def test_tail_wider_than_16(device, backward):
    """84 = 64 + 20: the last tile of each side (owned and streamed) is 32 wide, not the usual 16."""
    check(3, 2, 84, 84, 1, 32, [1, 0, 1], torch.float32, device)


def test_fp16(device, backward):
    check(3, 2, 33, 33, 2, 64, [1, 0, 0], torch.float16, device)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(layout, device, backward):
    check(3, 2, 20, 24, 2, 32, [1, 1, 0], torch.float32, device, layout)


@pytest.mark.parametrize(
    "narrow_streamed, narrow_owned",
    [(True, True), (False, True), (True, False), (False, False)],
    ids=["narrow", "full_streamed", "full_owned", "full"],
)
@pytest.mark.parametrize("block_m, block_n", [(16, 16), (16, 32), (32, 16), (16, 64)], ids=lambda b: f"{b}")
def test_forced_blocks(block_m, block_n, narrow_streamed, narrow_owned, monkeypatch, device):
    """Several tiles per sequence with a partial last one, on both sides and in every kernel; the
    partial tiles narrowed (at 32-row tiles, 37 = 32 + 5 and 40 = 32 + 8 end in a 16-row tile) or run
    at full width, on the streamed side and the owned side (the last program's rows). On a GPU one tile
    shape, in bf16: the interpreter covers the index logic of the others, and each fp32 config there is
    a compile of several seconds (exact dots in these 4-warp tiles spill), out of the GPU tests' cap."""
    dtype = torch.float32
    if device.type == "cuda":
        if (block_m, block_n) != (16, 32):
            pytest.skip("one tile shape on a GPU (the interpreter runs every one)")
        dtype = torch.bfloat16
    blocks = _common.Blocks(block_m, block_n, 4, 1, narrow_streamed, narrow_owned)
    monkeypatch.setattr(_common, "attention_blocks", lambda *args: blocks)
    check(3, 2, 37, 40, 2, 80, [1, 0, 1], dtype, device)


@pytest.mark.parametrize("d", [64, 80])
def test_exact_fp32_blocks(d, monkeypatch, device):
    """The tiles that fp32 runs with exact dots on a GPU (`_common._EXACT_FP32_BLOCKS`), with several
    tiles and a partial last one on each side (100 = 96 + 4 queries, 90 = 64 + 26 keys). On the
    interpreter only: on a GPU every fp32 test runs them (TF32 is off by default)."""
    if device.type == "cuda":
        pytest.skip("the GPU's fp32 tests run these tiles through the default heuristic")
    monkeypatch.setattr(
        _common,
        "attention_blocks",
        lambda kernel, tq, tk, head_dim, dtype: _common._fit(
            _common._EXACT_FP32_BLOCKS[kernel, head_dim > 64], tq, tk
        ),
    )
    check(3, 2, 100, 90, 2, d, [1, 0, 1], torch.float32, device)


@pytest.mark.parametrize("heads_outer", [True, False], ids=["heads_outer", "heads_inner"])
def test_program_order(heads_outer, monkeypatch, device, backward):
    """Both program orders of `_common.launch_grid`, with several tiles, sequences and heads, so that
    a wrong (tile, sequence, head) decomposition in any kernel reads or writes the wrong rows. On the
    interpreter only: the index arithmetic is the same on a GPU, where the sweep checks every row
    it times (both orders) against the reference, and six more compiles would cost the GPU tests'
    time budget (bench/gpu_check.sh)."""
    if device.type == "cuda":
        pytest.skip("index arithmetic: checked on the interpreter, and by the sweep on a GPU")
    # 37 = 32 + 5 queries, 40 = 32 + 8 keys: narrow 16-row last tiles on both sides.
    blocks = _common.Blocks(32, 32, 4, 1, heads_outer=heads_outer)
    monkeypatch.setattr(_common, "attention_blocks", lambda *args: blocks)
    check(4, 3, 37, 40, 3, 32, [1, 0, 2, 1], torch.float32, device)


def test_launch_device():
    """The launchers launch on q's GPU, whatever the current CUDA device (Triton uses the current one)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert isinstance(_common.on_device(torch.empty(1)), contextlib.nullcontext)
    with FakeTensorMode():  # a cuda:1 tensor without a GPU
        q = torch.empty(1, device="cuda:1")
    guard = _common.on_device(q)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


def test_second_gpu(device):
    """Inputs on cuda:1 while cuda:0 is the current device: same results as on cuda:0."""
    if device.type == "cpu" or torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    inputs = make_inputs(3, 2, 20, 20, 2, 32, [1, 0, 1], torch.bfloat16, torch.device("cuda:1"))
    on_second = run_kernels(*inputs, 0.2)
    on_first = run_kernels(*(t.to("cuda:0") for t in inputs), 0.2)
    for a, b in zip(on_second, on_first):
        assert a.device == torch.device("cuda:1") and torch.equal(a.cpu(), b.cpu())


def test_launch_grid():
    """Sequences go on the grid's first axis (limit 2**31 - 1), never on an axis limited to 65535."""
    assert _common.launch_grid(True, 197, 64, 5462, 12) == (4 * 5462, 12)
    assert _common.launch_grid(False, 197, 64, 5462, 12) == (4 * 5462 * 12,)
    assert _common.launch_grid(False, 1, 16, 1, 70000) == (70000,)
    with pytest.raises(ValueError, match="too many programs for a CUDA grid: 1 on the first axis and 70000"):
        _common.launch_grid(True, 1, 16, 1, 70000)
    with pytest.raises(ValueError, match="too many programs for a CUDA grid"):
        _common.launch_grid(True, 197, 16, 2**28, 1)


def test_one_launch_backward_grid_limit():
    """The one-launch backward's grid, one program per K/V sequence and head, is checked like the others:
    2**30 sequences at 2 heads raise before any launch (expanded tensors: no memory)."""
    q = torch.empty(1, 1, 2, 16)
    k = torch.empty(1, 1, 2, 16).expand(2**30, 1, 2, 16)
    with pytest.raises(ValueError, match="too many programs for a CUDA grid: 2147483648 on the first axis"):
        shared_attention_bwd_fused.launch_fused(
            None, q, k, k, None, None, None, None, None, None, None, 1.0, {}
        )


def test_many_sequences(device):
    """Sq * H and Skv * H above 65535 (CUDA's limit on a grid's second axis): 5462 sequences at 12 heads."""
    if device.type == "cpu":
        pytest.skip("65544 programs per kernel: minutes in the interpreter")
    S = 5462
    check(S, S, 16, 16, 12, 16, [(s + 1) % S for s in range(S)], torch.float32, device)


def test_int32_addressable():
    """A layout whose offsets within a sequence pass 2**31 is copied contiguous; a small one is kept;
    a sequence too large even contiguous is refused. (Meta tensors: nothing is allocated.)"""
    small = torch.empty(4, 197, 12, 64, device="meta")
    assert _common.int32_addressable("q", small) is small
    # (T, S, H, d) memory viewed as (S, T, H, d): the row stride is S * H * d.
    big = torch.empty(197, 684_785, 1, 16, device="meta").transpose(0, 1)
    copy = _common.int32_addressable("q", big)
    assert copy.shape == big.shape and copy.is_contiguous()
    with pytest.raises(
        ValueError, match=r"q: one sequence of \(197, 2048, 5400\) \(T, H, d\) holds too many"
    ):
        _common.int32_addressable("q", torch.empty(1, 197, 2048, 5400, device="meta"))
    # Expanded (stride 0) rows are addressable, but the outputs, contiguous, would not be.
    with pytest.raises(ValueError, match=r"do: one sequence of \(2097154, 16, 64\)"):
        _common.int32_addressable("do", torch.empty(1, 1, 16, 64, device="meta").expand(1, 2**21 + 2, 16, 64))


def test_launchers_check_every_input_layout(monkeypatch):
    """Every tensor a launcher passes to a kernel with the caller's strides goes through
    int32_addressable (the one-launch backward is called after the check)."""
    seen = []
    real = _common.int32_addressable
    monkeypatch.setattr(_common, "int32_addressable", lambda name, t: seen.append(name) or real(name, t))
    q, k, v, kv_index, do = make_inputs(2, 2, 5, 6, 1, 32, [1, 0], torch.float32, torch.device("cpu"))
    run_kernels(q, k, v, kv_index, do, 0.2)
    assert seen == ["q", "k", "v", "do", "q", "k", "v", "out"]


def test_offsets_past_int32(device):
    """q and dO laid out (T, S, H, d) with T * S * H * d > 2**31 (4.3 GB in bf16): the kernels see a
    contiguous copy, so the results equal those of contiguous inputs (32-bit row offsets would wrap)."""
    if device.type == "cpu":
        pytest.skip("2**31 elements per tensor: too much for the interpreter")
    S, T, H, d = 684_785, 197, 1, 16  # 196 rows x S * H * d elements >= 2**31
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.bfloat16)

    if torch.cuda.mem_get_info(device)[0] < 32 * 2**30:
        pytest.skip("needs about 28 GB of free GPU memory")
    q, do = (randn(T, S, H, d).transpose(0, 1) for _ in range(2))
    assert (T - 1) * q.stride(1) >= 2**31
    k, v = randn(64, T, H, d), randn(64, T, H, d)
    kv_index = torch.arange(S, device=device, dtype=torch.int32) % 64
    strided = run_kernels(q, k, v, kv_index, do, 0.25)
    q, do = q.contiguous(), do.contiguous()  # the strided inputs are freed
    contiguous = run_kernels(q, k, v, kv_index, do, 0.25)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), strided, contiguous):
        assert torch.equal(a, b), name


def assert_views_match_contiguous(q, k, v, o, do, kv_index):
    """Forward and backward of the views q, k, v (the output written into the view o, dO read from the
    view do) equal those of contiguous copies, bit for bit, and are finite."""
    inverse = inverse_kv_map(kv_index, k.shape[0])
    out, lse = shared_attention_fwd(q, k, v, kv_index, 0.25)
    o.copy_(out)
    strided = (out, lse, *shared_attention_bwd(do, q, k, v, o, lse, kv_index, *inverse, 0.25))
    q, k, v, do = (t.contiguous() for t in (q, k, v, do))
    out, lse = shared_attention_fwd(q, k, v, kv_index, 0.25)
    contiguous = (out, lse, *shared_attention_bwd(do, q, k, v, out, lse, kv_index, *inverse, 0.25))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), strided, contiguous):
        assert torch.isfinite(a).all() and torch.equal(a, b), name


def test_sequence_offsets_past_int32(device, backward):
    """q, k, v, out and dO 2**30 elements apart per sequence: views of one fp16 storage of 2**31 + a few
    elements (4 GiB of address space, of which the kernels touch a few pages, so that it runs under the
    interpreter too). Sequence 2 then starts 2**31 elements in, where a 32-bit product of the sequence
    index and its stride wraps to -2**31, on the GPU as in the interpreter: the kernels take sequence
    offsets in 64 bits (program ids, kv_index and kv_queries entries widened before the product), so
    the results equal those of contiguous copies, bit for bit."""
    S, T, H, d, stride = 3, 20, 2, 16, 2**30
    chunk = T * H * d
    if device.type == "cuda" and torch.cuda.mem_get_info(device)[0] < 6 * 2**30:
        pytest.skip("needs about 4 GB of free GPU memory")
    storage = torch.UntypedStorage(2 * (2 * stride + 5 * chunk), device=device)  # fp16: 2 bytes each

    def view(i):  # (S, T, H, d), sequence stride 2**30, the i-th of five disjoint views
        return torch.tensor([], dtype=torch.float16, device=device).set_(
            storage, i * chunk, (S, T, H, d), (stride, H * d, d, 1)
        )

    gen = torch.Generator().manual_seed(0)
    q, k, v, o, do = (view(i).copy_(torch.randn(S, T, H, d, generator=gen)) for i in range(5))
    assert (S - 1) * q.stride(0) == 2**31
    kv_index = torch.tensor([2, 0, 2], dtype=torch.int32, device=device)  # K/V 2 from two queries, 1 unused
    assert_views_match_contiguous(q, k, v, o, do, kv_index)


@pytest.mark.parametrize("stride", [2**30, 2**30 - 16], ids=["at_2**31", "below_2**31"])
def test_row_and_head_offsets_near_int32(stride, device, backward):
    """Row and head offsets within a sequence are 32-bit products in the kernels: q, k and v with a row
    stride, out and dO with a head stride, of `stride`, at 3 rows and 3 heads, views of one fp16 storage
    (4 GiB of address space, a few pages touched). At 2**30 the last row or head starts 2**31 elements
    in, past int32: the launchers hand the kernels contiguous copies; 32 elements less, they pass the
    views as they are. Either way the results equal those of contiguous inputs, bit for bit (a wrapped
    offset reads 4 GiB below the storage: a segfault here, an illegal address on a GPU)."""
    S, T, H, d = 2, 3, 3, 16
    small = S * max(H, T) * d  # what a view spans besides its one large stride
    if device.type == "cuda" and torch.cuda.mem_get_info(device)[0] < 6 * 2**30:
        pytest.skip("needs about 4 GB of free GPU memory")
    storage = torch.UntypedStorage(2 * (2 * stride + 5 * small), device=device)  # fp16: 2 bytes each

    def view(i, strides):  # the i-th of five disjoint (S, T, H, d) views
        return torch.tensor([], dtype=torch.float16, device=device).set_(
            storage, i * small, (S, T, H, d), strides
        )

    rows_far, heads_far = (H * d, stride, d, 1), (T * d, d, stride, 1)
    gen = torch.Generator().manual_seed(0)
    q, k, v, o, do = (
        view(i, rows_far if i < 3 else heads_far).copy_(torch.randn(S, T, H, d, generator=gen))
        for i in range(5)
    )
    assert max((T - 1) * q.stride(1), (H - 1) * do.stride(2)) == 2 * stride
    kv_index = torch.tensor([1, 1], dtype=torch.int32, device=device)  # K/V 0 unused
    assert_views_match_contiguous(q, k, v, o, do, kv_index)


@pytest.mark.parametrize(
    "length, block, narrow, expected",
    [
        (197, 64, True, 16),
        (197, 32, True, 16),
        (196, 64, True, 16),
        (128, 64, True, 0),
        (50, 32, True, 32),
        (7, 16, True, 16),
        (37, 64, True, 64),
        (197, 64, False, 64),
        (192, 64, False, 0),
    ],
)
def test_tail_width(length, block, narrow, expected):
    assert _common.tail_width(length, block, narrow) == expected


def test_fit_keeps_tiles_at_least_16():
    """Short sequences shrink the tiles to their next power of two, never below 16 (the smallest tl.dot
    side: the interpreter runs narrower dots, a GPU does not compile them)."""
    blocks = _common.Blocks(64, 64, 4, 1)
    assert _common._fit(blocks, 1, 5)[:2] == (16, 16)
    assert _common._fit(blocks, 20, 197)[:2] == (32, 64)


def test_configs_memoized_per_dtype(monkeypatch):
    """The launchers' memoized configs are kept per dtype: fp32 and bf16 at one shape and one dot
    precision (TF32 allowed) get their own blocks (on a GPU they differ, and fp32 has no one-launch
    backward)."""
    fwd = importlib.import_module("fastvit_style.kernels.shared_attention_fwd")
    blocks = lambda kernel, tq, tk, d, dtype: _common.Blocks(16 if dtype == torch.float32 else 32, 32, 4, 1)
    monkeypatch.setattr(_common, "attention_blocks", blocks)
    monkeypatch.setattr(_common, "_tf32_matmuls", lambda: True)
    configs = [fwd.kernel_configs(40, 40, 64, dtype)["fwd"][1] for dtype in (torch.float32, torch.bfloat16)]
    assert [meta["BLOCK_M"] for meta in configs] == [16, 32]


@pytest.mark.parametrize("owns_keys", [False, True])
def test_launch_meta_tails(owns_keys):
    """The owned and streamed flags reach the right axis: queries are owned unless owns_keys (dk/dv)."""
    blocks = _common.Blocks(64, 32, 4, 2, narrow_streamed=False, narrow_owned=True)
    meta = _common.launch_meta(blocks, 64, 197, 197, torch.bfloat16, owns_keys=owns_keys)
    # 197 = 3 x 64 + 5 (queries) = 6 x 32 + 5 (keys): a narrow tail is 16 wide, a full one a block.
    assert (meta["TAIL_M"], meta["TAIL_N"]) == ((64, 16) if owns_keys else (16, 32))


def test_fp32_dots_follow_torchs_tf32_setting():
    """Exact fp32 dots unless torch allows TF32 for fp32 matmuls, as the official attention's matmul does;
    the launchers' memoized configs follow a change of the setting."""
    fwd = importlib.import_module("fastvit_style.kernels.shared_attention_fwd")
    bwd = importlib.import_module("fastvit_style.kernels.shared_attention_bwd")

    def dots(dtype):
        configs = [
            fwd.kernel_configs(197, 197, 64, dtype)["fwd"],
            *bwd.kernel_configs(197, 197, 64, dtype).values(),
        ]
        return {meta["DOT"] for _, meta in configs}

    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision switches")
    matmul, backends = torch.backends.cuda.matmul, torch.backends
    saved = matmul.fp32_precision, backends.fp32_precision
    try:
        for legacy in (False, True):  # torch.backends.cuda.matmul.allow_tf32, set_float32_matmul_precision
            torch.set_float32_matmul_precision("high" if legacy else "highest")
            assert dots(torch.float32) == {"tf32" if legacy else "ieee"} and dots(torch.bfloat16) == {"tf32"}
        # torch >= 2.9's switches, after which reading allow_tf32 raises: a global one, then the matmuls'.
        matmul.fp32_precision, backends.fp32_precision = "none", "tf32"
        assert dots(torch.float32) == {"tf32"}
        matmul.fp32_precision = "ieee"
        assert dots(torch.float32) == {"ieee"}
    finally:
        matmul.fp32_precision, backends.fp32_precision = saved


def test_stride0_grad(device, backward):
    """dO of out.sum() is an expand with all strides 0."""
    q, k, v, kv_index, _ = make_inputs(2, 2, 9, 9, 2, 32, [1, 1], torch.float32, device)
    do = torch.ones((), device=device).expand(q.shape)
    assert_matches(run_kernels(q, k, v, kv_index, do, 0.2), reference(q, k, v, kv_index, do, 0.2), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_huge_logits(device, backward, dtype):
    """Logits near 1e4 (q scaled by 1e4): the forward stays finite and exact. The softmax is then
    one-hot, so the true dq and dk vanish; what the kernels give instead is rounding (P rebuilt in
    the backward carries an ulp of the logit; in bf16, D = rowsum(dO * O) reads the rounded O),
    judged against the size dq and dk have when the softmax is not saturated: scale * |k| (resp.
    |q|) * |dO| * |v|. In bf16 the logits of the (rounded) inputs are exact products summed in fp32,
    so the float64 reference of the same inputs holds at bf16's tolerance."""
    q, k, v, kv_index, do = make_inputs(3, 2, 20, 20, 1, 32, [0, 1, 1], dtype, device)
    q, scale, tol = q * 1e4, 32**-0.5, TOLERANCE[dtype]
    out, lse, dq, dk, dv = run_kernels(q, k, v, kv_index, do, scale)
    expected = reference(q, k, v, kv_index, do, scale)
    assert_matches((out, lse), expected[:2], tol)
    assert_matches((dv,), expected[4:], max(tol, 1e-2))
    size = scale * do.abs().max().double() * v.abs().max().double()
    assert (dq.double() - expected[2]).abs().max() <= tol * size * k.abs().max().double()
    assert (dk.double() - expected[3]).abs().max() <= tol * size * q.abs().max().double()


def test_bf16_probabilities_round_as_on_the_gpu(device, backward):
    """In bf16 the GPU rounds P to bf16 before the P V and P^T dO dots; the interpreter, whose dots run
    in fp32, must round it the same way (`_tiles.gpu_rounded`) for its bf16 numbers to be the GPU's.
    Two keys whose values cancel (-1000, +1000) and a logit gap of 2^-12 (in base 2): P = [1, 0.99983]
    before normalization rounds to [1, 1] and the output row is exactly 0, where exact arithmetic
    gives -0.087; in the backward, P = [0.50004, 0.49996] rounds to [0.5, 0.5], and dO rows of +1000
    and -1000 give dv exactly 0 (exact: +-0.043)."""
    q = torch.zeros(1, 2, 1, 16)
    q[0, 0, 0, 0] = 1.0  # row 1 stays 0: equal logits
    k = torch.zeros(1, 2, 1, 16)
    k[0, 1, 0, 0] = -1.0
    v = torch.tensor([-1000.0, 1000.0])[None, :, None, None].expand(1, 2, 1, 16)
    do = torch.tensor([1000.0, -1000.0])[None, :, None, None].expand(1, 2, 1, 16)
    q, k, v, do = (t.to(device=device, dtype=torch.bfloat16) for t in (q, k, v, do))
    kv_index = torch.zeros(1, dtype=torch.int32, device=device)
    scale = 2**-12 / math.log2(math.e)
    out, _, _, _, dv = run_kernels(q, k, v, kv_index, do, scale)
    expected = reference(q, k, v, kv_index, do, scale)
    assert expected[0][0, 0].abs().min() > 0.08 and expected[4].abs().min() > 0.04  # exact: not 0
    assert (out == 0).all(), out[0, 0, 0]
    assert (dv == 0).all(), dv[0, :, 0]


def test_negative_logits(device, backward):
    """Every logit below -88 (k shifted to +4, q to -5), so that lse < -128 in base 2: exp2 of a
    padded key's logit (0: its row is zeroed) overflows to inf in the backward, and only the key mask
    keeps it from dq (inf * 0 = NaN). The softmax itself is far from one-hot (each row spans 18)."""
    q, k, v, kv_index, do = make_inputs(3, 2, 20, 20, 1, 32, [0, 1, 1], torch.float32, device)
    q, k, scale = q - 5, k + 4, 32**-0.5
    expected = reference(q, k, v, kv_index, do, scale)
    assert expected[1].max() < -128
    assert_matches(run_kernels(q, k, v, kv_index, do, scale), expected, TOLERANCE[torch.float32])


def test_keys_at_minus_infinity(device, backward):
    """Keys whose logit is -inf (a -inf in k against a positive q) get no weight; the row is finite
    while any key is. Every key of the first tiles is such a key: the online softmax then has no
    finite running max to rescale by, and exp2(-inf - -inf) made the whole row NaN. dq is left out:
    the formula's own dq is NaN there (0 * -inf)."""
    q, k, v, kv_index, do = make_inputs(3, 2, 20, 90, 1, 32, [0, 1, 1], torch.float32, device)
    q = q.abs() + 0.1
    k[:, :-3, :, 0] = float("-inf")  # 3 finite keys per sequence, in the last tile whatever its width
    out, lse, _, dk, dv = run_kernels(q, k, v, kv_index, do, 32**-0.5)
    expected = reference(q, k, v, kv_index, do, 32**-0.5)
    assert_matches((out, lse), expected[:2], TOLERANCE[torch.float32])
    assert_matches((dk[:, -3:], dv), (expected[3][:, -3:], expected[4]), TOLERANCE[torch.float32])
    assert (dk[:, :-3] == 0).all()


def test_backward_deterministic(device, backward):
    q, k, v, kv_index, do = make_inputs(6, 2, 40, 40, 2, 64, [0, 1, 1, 0, 1, 1], torch.bfloat16, device)
    first, second = run_kernels(q, k, v, kv_index, do, 0.125), run_kernels(q, k, v, kv_index, do, 0.125)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_no_atomics():
    """The backward sums dk/dv of a K/V sequence in the one program that owns the tile (inverse map),
    so no kernel needs an atomic: none may appear in the kernels' code. (Determinism is tested above,
    but the interpreter runs programs one by one, where float atomics would be deterministic too.)"""
    sources = sorted(Path(_common.__file__).parent.glob("*.py"))
    assert {p.name for p in sources} >= {"shared_attention_fwd.py", "shared_attention_bwd.py", "_tiles.py"}
    for path in sources:
        assert "atomic_" not in path.read_text(), path  # tl.atomic_add, atomic_cas, ...


def test_outputs_start_as_nan(monkeypatch, device, backward):
    """Every output the launchers return (out, lse, dq, dk, dv) is a tensor the NaN-poisoning
    torch.empty of conftest made, so that the tests here catch an element no program writes."""
    made = []
    empty = torch.empty  # conftest's poisoned one
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: made.append(empty(*a, **kw)) or made[-1])
    q, k, v, kv_index, do = make_inputs(3, 2, 9, 9, 2, 32, [1, 0, 1], torch.float32, device)
    outputs = run_kernels(q, k, v, kv_index, do, 0.2)
    for name, t in zip(("out", "lse", "dq", "dk", "dv"), outputs):
        assert any(t is m for m in made), f"{name} was not allocated by torch.empty"
    assert torch.empty(2, device=device).isnan().all()


@pytest.mark.parametrize("Sq, Skv, Tq, Tk", [(0, 0, 5, 5), (0, 2, 5, 5), (2, 2, 0, 5)], ids=str)
def test_empty(Sq, Skv, Tq, Tk, device, backward):
    """No query sequence (or no query row): empty outputs, and K/V that nothing reads get zero grads."""
    q, k, v, kv_index, do = make_inputs(Sq, Skv, Tq, Tk, 2, 32, [0] * Sq, torch.float32, device)
    out, lse, dq, dk, dv = run_kernels(q, k, v, kv_index, do, 0.2)
    assert out.shape == (Sq, Tq, 2, 32) and lse.shape == (Sq, 2, Tq) and dq.shape == q.shape
    assert dk.shape == dv.shape == k.shape
    assert (dk == 0).all() and (dv == 0).all()


def _property_example(data, monkeypatch, device, min_length=1):
    Sq, Skv = data.draw(st.integers(1, 4), "Sq"), data.draw(st.integers(1, 3), "Skv")
    kv_index = data.draw(st.lists(st.integers(0, Skv - 1), min_size=Sq, max_size=Sq), "kv_index")
    Tq, Tk = (data.draw(st.integers(min_length, 40), name) for name in ("Tq", "Tk"))
    H, d = data.draw(st.integers(1, 2), "H"), data.draw(st.sampled_from([24, 32, 64, 80, 100, 128]), "d")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), "dtype")
    layout = data.draw(st.sampled_from(LAYOUTS), "layout")
    blocks = data.draw(st.sampled_from([None, (16, 16), (16, 32), (32, 16)]), "blocks")
    # The one-launch backward on CPU only: on a GPU every drawn shape would be a compile of its own.
    one_launch = device.type == "cpu" and data.draw(st.booleans(), "one_launch")
    # Set for every example: the monkeypatch fixture undoes its changes after the test, not between examples.
    monkeypatch.setattr(_common, "ONE_LAUNCH_BACKWARD_MIN_PROGRAMS", 0 if one_launch else None)
    heuristic = _DEFAULT_BLOCKS if blocks is None else lambda *args: _common.Blocks(*blocks, 4, 1)
    monkeypatch.setattr(_common, "attention_blocks", heuristic)
    check(Sq, Skv, Tq, Tk, H, d, kv_index, dtype, device, layout, seed=data.draw(st.integers(0, 99), "seed"))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property(data, monkeypatch, device):
    if device.type == "cuda":
        pytest.skip("on a GPU: test_property_gpu, fewer examples (each one compiles)")
    _property_example(data, monkeypatch, device)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_gpu(data, monkeypatch, device):
    """test_property's examples on a GPU: three, each a compile of its own shapes and tiles, with
    lengths past one 16-row tile (hypothesis' first, minimal example would repeat a fixed test)."""
    if device.type != "cuda":
        pytest.skip("on the interpreter: test_property")
    _property_example(data, monkeypatch, device, min_length=17)


def _valid(device, **changes):
    q, k, v, kv_index, _ = make_inputs(2, 2, 5, 6, 2, 32, [1, 0], torch.float32, device, "contiguous")
    return {"q": q, "k": k, "v": v, "kv_index": kv_index, **changes}


@pytest.mark.parametrize(
    "changes, message",
    [
        (lambda t: {"q": t["q"][0]}, r"q must be 4-D"),
        (lambda t: {"k": t["k"].half()}, r"k must have dtype in \(torch.float32,\), got torch.float16"),
        (lambda t: {"q": t["q"].double(), "k": t["k"].double(), "v": t["v"].double()}, r"q must have dtype"),
        (lambda t: {"v": t["v"][:, :5]}, r"v must have shape \(2, 6, 2, 32\), got \(2, 5, 2, 32\)"),
        (lambda t: {"k": t["k"][..., :1, :]}, r"k must have shape \(2, 6, 2, 32\)"),
        (lambda t: {"kv_index": t["kv_index"][:1]}, r"kv_index must have shape \(2,\), got \(1,\)"),
        (lambda t: {"kv_index": t["kv_index"].float()}, r"kv_index must have dtype"),
        (
            lambda t: {"kv_index": t["kv_index"].repeat_interleave(2)[::2]},
            r"kv_index must be contiguous \(stride 1\), got stride 2",
        ),
        (
            lambda t: {"q": t["q"][..., :8], "k": t["k"][..., :8], "v": t["v"][..., :8]},
            r"head dim d=8 unsupported",
        ),
        (
            lambda t: {"k": t["k"][:, :0], "v": t["v"][:, :0]},
            r"\(Skv, Tk >= 1\) when Sq > 0, got Skv=2, Tk=0",
        ),
        (lambda t: {"k": t["k"][:0], "v": t["v"][:0]}, r"\(Skv, Tk >= 1\) when Sq > 0, got Skv=0, Tk=6"),
    ],
    ids=[
        "q-3d",
        "k-dtype",
        "float64",
        "v-shape",
        "k-heads",
        "index-length",
        "index-dtype",
        "index-strided",
        "d8",
        "Tk0",
        "Skv0",
    ],
)
def test_launcher_errors(changes, message, device):
    inputs = _valid(device)
    inputs.update(changes(inputs))
    with pytest.raises(ValueError, match=message):
        shared_attention_fwd(scale=0.2, **inputs)


@pytest.mark.parametrize("scale", [None, float("nan"), torch.tensor(0.3), True, 1e300])
def test_launchers_take_a_finite_number_as_scale(scale):
    """1e300: finite in float64, but scale * log2(e) is the kernels' fp32 argument (inf there: all NaN)."""
    with pytest.raises(ValueError, match="scale must be a finite real number of at most 2.36e"):
        shared_attention_fwd(scale=scale, **_valid(torch.device("cpu")))


def test_launchers_take_a_numpy_scale():
    """A NumPy scalar is a real number: passed on as a Python float (the interpreter refuses NumPy)."""
    import numpy as np

    inputs = _valid(torch.device("cpu"))
    out, _ = shared_attention_fwd(scale=np.float32(0.5), **inputs)
    assert torch.equal(out, shared_attention_fwd(scale=0.5, **inputs)[0])


def test_backward_launcher_errors(device):
    q, k, v, kv_index, do = make_inputs(2, 2, 5, 6, 2, 32, [1, 0], torch.float32, device)
    out, lse = shared_attention_fwd(q, k, v, kv_index, 0.2)
    kv_offsets, kv_queries = inverse_kv_map(kv_index, 2)
    with pytest.raises(ValueError, match=r"lse must have shape \(2, 2, 5\), got \(2, 5, 2\)"):
        shared_attention_bwd(do, q, k, v, out, lse.transpose(1, 2), kv_index, kv_offsets, kv_queries, 0.2)
    with pytest.raises(ValueError, match=r"kv_offsets must have shape \(3,\)"):
        shared_attention_bwd(do, q, k, v, out, lse, kv_index, kv_offsets[:2], kv_queries, 0.2)
    with pytest.raises(ValueError, match=r"do must have dtype"):
        shared_attention_bwd(do.bfloat16(), q, k, v, out, lse, kv_index, kv_offsets, kv_queries, 0.2)


def test_backward_lse_any_strides(device):
    """The backward launcher takes lse in any layout (the kernels read a contiguous copy): a strided one
    gives the gradients of the forward's own, bit for bit."""
    q, k, v, kv_index, do = make_inputs(3, 2, 20, 24, 2, 32, [1, 1, 0], torch.float32, device)
    out, lse = shared_attention_fwd(q, k, v, kv_index, 0.2)
    inverse = inverse_kv_map(kv_index, 2)
    strided = lse.transpose(1, 2).contiguous().transpose(1, 2)
    for a, b in zip(
        shared_attention_bwd(do, q, k, v, out, strided, kv_index, *inverse, 0.2),
        shared_attention_bwd(do, q, k, v, out, lse, kv_index, *inverse, 0.2),
    ):
        assert torch.equal(a, b)


def test_backward_inverse_map_any_strides(device, backward):
    """The backward launcher takes the inverse map (kv_offsets, kv_queries) in any layout, as it takes
    lse: the kernels read contiguous copies. A strided one was read as a plain array, offsets and query
    ids of other entries: a segfault under the interpreter (an illegal address on a GPU)."""
    q, k, v, kv_index, do = make_inputs(3, 2, 5, 6, 1, 16, [1, 0, 1], torch.float32, device)
    out, lse = shared_attention_fwd(q, k, v, kv_index, 0.2)
    kv_offsets, kv_queries = inverse_kv_map(kv_index, 2)
    # Every other entry of a (n, 2) tensor whose second column holds out-of-range values.
    strided = [torch.stack([t, torch.full_like(t, 7)], 1)[:, 0] for t in (kv_offsets, kv_queries)]
    expected = shared_attention_bwd(do, q, k, v, out, lse, kv_index, kv_offsets, kv_queries, 0.2)
    for inverse in ((strided[0], kv_queries), (kv_offsets, strided[1])):
        for a, b in zip(shared_attention_bwd(do, q, k, v, out, lse, kv_index, *inverse, 0.2), expected):
            assert torch.equal(a, b)


def test_cpu_outside_interpreter(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRET", False)
    with pytest.raises(ValueError, match="CPU tensors given to the Triton backend outside interpreter mode"):
        shared_attention_fwd(scale=0.2, **_valid(torch.device("cpu")))


def test_out_of_range_index_stays_in_memory(device, backward):
    """The launchers do not read kv_index (that would sync the device); an unchecked out-of-range entry,
    possible on the compiled path, is clamped into [0, Skv) by the kernels and the inverse map: a wrong
    K/V sequence, never a read outside K/V (which the interpreter would report, and the GPU as an
    illegal address), nor a dq row left unwritten."""
    q, k, v, kv_index, do = make_inputs(3, 2, 7, 9, 2, 32, [5, -3, 1], torch.float32, device)
    clamped = torch.tensor([1, 0, 1], dtype=torch.int32, device=device)
    expected = reference(q, k, v, clamped, do, 0.2)
    assert_matches(run_kernels(q, k, v, kv_index, do, 0.2), expected, TOLERANCE[torch.float32])


@pytest.mark.parametrize("min_programs, launches", [(None, 2), (0, 1), (4, 1), (5, 2)])
def test_one_launch_dispatch(min_programs, launches, monkeypatch, device):
    """The backward is one launch from ONE_LAUNCH_BACKWARD_MIN_PROGRAMS programs (Skv * H) on."""
    # The module, not the launcher of the same name that the package exports.
    bwd_module = importlib.import_module("fastvit_style.kernels.shared_attention_bwd")
    monkeypatch.setattr(_common, "ONE_LAUNCH_BACKWARD_MIN_PROGRAMS", min_programs)
    calls = []
    real = bwd_module.launch_fused
    monkeypatch.setattr(bwd_module, "launch_fused", lambda *args: calls.append(1) or real(*args))
    # 2 x 2 programs; bf16 at d = 32, where the kernel applies on a GPU too.
    check(3, 2, 9, 9, 2, 32, [1, 0, 1], torch.bfloat16, device)
    assert len(calls) == (1 if launches == 1 else 0)


@pytest.mark.parametrize("block_m, widest", [(16, 16), (32, 16), (32, 32), (16, 128), (64, 64)], ids=str)
def test_one_launch_forced_blocks(block_m, widest, monkeypatch, device):
    """The one-launch backward with several query tiles, the last one partial (37 = 2 x 16 + 5 =
    32 + 5), or one partial tile (64 > 37), and keys in one to three parts (40 = 16 + 16 + 16,
    32 + 16, 64)."""
    monkeypatch.setattr(_common, "ONE_LAUNCH_BACKWARD_MIN_PROGRAMS", 0)
    default = _common.attention_blocks
    fused = _common.Blocks(block_m, widest, 4, 1)
    monkeypatch.setattr(
        _common,
        "attention_blocks",
        lambda kernel, *args: fused if kernel == "bwd_fused" else default(kernel, *args),
    )
    check(3, 2, 37, 40, 2, 64, [1, 0, 1], torch.float32, device)


@pytest.mark.parametrize(
    "tk, widest, parts",
    [
        (1, 128, (16, 0, 0)),
        (16, 128, (16, 0, 0)),
        (20, 128, (16, 16, 0)),
        (100, 128, (64, 32, 16)),
        (128, 128, (128, 0, 0)),
        (196, 128, (128, 64, 16)),
        (197, 128, (128, 64, 16)),
        (250, 128, (128, 64, 64)),
        (256, 128, (128, 128, 0)),
        (257, 128, None),
        (197, 64, None),
        (40, 16, (16, 16, 16)),
    ],
)
def test_key_parts(tk, widest, parts):
    """Up to three power-of-two parts, all full but the last, padding 197 keys to 208 (not 256)."""
    assert shared_attention_bwd_fused.key_parts(tk, widest) == parts
