"""fastvit_style.ops.shared_attention: numbers and gradients on every backend, validation, backend
choice, torch.library.opcheck, torch.compile(fullgraph=True) and autocast.

The Triton backend runs on CPU through the interpreter (TRITON_INTERPRET=1, set in conftest).
"""

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TOLERANCE

from fastvit_style.ops import _torch_impl, shared_attention
from fastvit_style.ops._torch_impl import shared_attention_torch

# The package exports the function under the module's name: reach the module itself.
op_module = importlib.import_module("fastvit_style.ops.shared_attention")


def make_inputs(Sq, Skv, Tq, Tk, H, d, kv_index, dtype=torch.float32, device="cpu", seed=0):
    """q: a (Sq, Tq, H, d) view of a Q projection slice; k, v: (Skv, Tk, H, d) views of one K/V
    projection, as the model passes them; kv_index int32. All leaves of autograd."""
    gen = torch.Generator().manual_seed(seed)
    q_proj = torch.randn(Sq, Tq, 3 * H * d, generator=gen).to(dtype=dtype, device=device).requires_grad_()
    kv_proj = torch.randn(Skv, Tk, 2, H, d, generator=gen).to(dtype=dtype, device=device).requires_grad_()
    q = q_proj[..., : H * d].view(Sq, Tq, H, d)
    k, v = kv_proj.unbind(2)
    return q, k, v, torch.tensor(kv_index, dtype=torch.int32, device=device)


def reference(q, k, v, kv_index, do, scale=None):
    """Float64 output and (dq, dk, dv) of the PyTorch path."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = shared_attention_torch(q, k, v, kv_index, q.shape[-1] ** -0.5 if scale is None else scale)
    return out, torch.autograd.grad(out, (q, k, v), do.double())


def rel_err(actual, expected):
    """Max-norm error relative to max(largest expected value, 1): inputs are standard normal."""
    return (actual.double() - expected).abs().max().item() / max(expected.abs().max().item(), 1.0)


# Skv, kv_index (its length is Sq), Tq, Tk, H, d
CASES = [
    pytest.param(3, [0, 1, 2], 7, 7, 2, 32, id="S3-T7-H2-d32-identity"),
    pytest.param(
        4, [0, 1, 2, 3, 2, 3], 20, 21, 3, 64, id="S6-Tq20-Tk21-H3-d64-model"
    ),  # K/V 0, 1 read once, 2, 3 twice
    pytest.param(3, [2, 2], 33, 33, 1, 80, id="S2-T33-H1-d80-all_to_one"),  # K/V 0, 1 unused
    pytest.param(2, [1, 0, 1], 5, 6, 1, 128, id="S3-Tq5-Tk6-H1-d128-roll"),  # the Triton kernels' widest d
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("Skv, kv_index, Tq, Tk, H, d", CASES)
def test_matches_reference(Skv, kv_index, Tq, Tk, H, d, dtype, backend_device):
    backend, device = backend_device
    q, k, v, kv_index = make_inputs(len(kv_index), Skv, Tq, Tk, H, d, kv_index, dtype, device)
    out = shared_attention(q, k, v, kv_index, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype=dtype, device=device)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_out, ref_grads = reference(q, k, v, kv_index, do)
    own_out = shared_attention_torch(q, k, v, kv_index, d**-0.5)
    own = (own_out, *torch.autograd.grad(own_out, (q, k, v), do))
    for name, a, e, o in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), own):
        assert a.dtype == dtype
        # Or within twice PyTorch's own error in this dtype (FlashAttention's test rule).
        tol = max(TOLERANCE[dtype], 2 * rel_err(o, e))
        assert rel_err(a, e) <= tol, f"{name}: relative error {rel_err(a, e):.2e} > {tol:.1e}"


def test_sum_backward_and_explicit_scale(backend_device):
    """out.sum() hands the backward an all-stride-0 dO; a non-default scale reaches every term."""
    backend, device = backend_device
    q, k, v, kv_index = make_inputs(3, 2, 9, 9, 2, 32, [1, 0, 1], device=device)
    out = shared_attention(q, k, v, kv_index, scale=0.3, backend=backend)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_out, ref_grads = reference(q, k, v, kv_index, torch.ones_like(out), scale=0.3)
    for a, e in zip((out, *grads), (ref_out, *ref_grads)):
        assert rel_err(a, e) <= TOLERANCE[torch.float32]


def test_torch_path_is_the_formula():
    """The PyTorch path, which the other backends are tested against, against softmax(q k^T scale) v
    written out (float64): a scale it dropped would go unseen through `reference`."""
    q, k, v, kv_index = make_inputs(3, 2, 5, 6, 2, 8, [1, 0, 1], dtype=torch.float64)
    logits = torch.einsum("sqhd,skhd->shqk", q, k[kv_index.long()]) * 0.3
    expected = torch.einsum("shqk,skhd->sqhd", logits.softmax(-1), v[kv_index.long()])
    torch.testing.assert_close(
        shared_attention_torch(q, k, v, kv_index, 0.3), expected, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("needs_grad", ["q", "k", "v"])
def test_one_input_needs_a_gradient(needs_grad, backend_device):
    """Only one of q, k, v requires a gradient (frozen projections, a fixed style bank): it still gets it."""
    backend, device = backend_device
    q, k, v, kv_index = make_inputs(3, 2, 9, 10, 2, 32, [1, 0, 1], device=device)
    inputs = {name: t.detach().requires_grad_(name == needs_grad) for name, t in zip("qkv", (q, k, v))}
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device)
    out = shared_attention(**inputs, kv_index=kv_index, backend=backend)
    (grad,) = torch.autograd.grad(out, inputs[needs_grad], do)
    _, ref_grads = reference(q, k, v, kv_index, do)
    assert rel_err(grad, ref_grads["qkv".index(needs_grad)]) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_huge_logits(backend_device, dtype):
    backend, device = backend_device
    q, k, v, kv_index = make_inputs(2, 2, 16, 16, 1, 32, [1, 1], dtype=dtype, device=device)
    q = q.detach() * 1e4
    out = shared_attention(q, k, v, kv_index, backend=backend)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference(q, k, v, kv_index, torch.zeros_like(out))[0]) <= TOLERANCE[dtype]


@pytest.mark.parametrize("grad_mode", [True, False], ids=["autograd", "no-grad"])
def test_a_nan_stays_in_its_query_row(backend_device, grad_mode):
    """A NaN in one query row gives NaN in that output row only, as the formula does (SDPA's CPU
    kernels alone would give zeros there), in and out of autograd."""
    backend, device = backend_device
    q, k, v, kv_index = make_inputs(3, 2, 7, 9, 2, 32, [1, 0, 1], device=device)
    q = q.detach().clone()
    q[1, 4, 0, 5] = float("nan")
    with torch.set_grad_enabled(grad_mode):
        out = shared_attention(q, k, v, kv_index, backend=backend).detach()
    nan_rows = out.isnan().any(-1)
    assert nan_rows[1, 4, 0] and nan_rows.sum() == 1
    q[1, 4, 0, 5] = 0.0
    clean = shared_attention(q, k, v, kv_index, backend=backend).detach()
    assert torch.equal(out[~nan_rows], clean[~nan_rows])


def test_a_large_finite_half_row_stays_finite():
    """fp16 rows whose sum overflows (64 x 1100 > 65504) are finite inputs: no NaN carried."""
    q, k, v, kv_index = make_inputs(2, 2, 4, 4, 2, 64, [1, 0])
    q = torch.full(q.shape, 1100.0, dtype=torch.float16)
    out = shared_attention(q, k.detach().half(), v.detach().half(), kv_index, backend="torch")
    assert out.isfinite().all()


@pytest.mark.parametrize(
    "poison", [float("inf"), -float("inf"), 3e38], ids=["inf", "-inf", "fp32-sum-overflows"]
)
def test_nonfinite_or_overflowing_query_rows(poison):
    """The CPU path skips the NaN carrier when the sum of q is finite: an infinity must still give its
    row NaN, and finite values whose sum overflows must still leave every row finite."""
    q, k, v, kv_index = (t.detach() for t in make_inputs(3, 2, 5, 5, 2, 32, [1, 0, 1]))
    q = q.clone()
    if poison == 3e38:
        q.fill_(poison)  # the total overflows to inf; every logit is 3e38 * 0
        k = torch.zeros_like(k)
    else:
        q[2, 3, 1, 0] = poison
    with torch.no_grad():
        out = shared_attention(q, k, v, kv_index, backend="torch")
    nan_rows = out.isnan().any(-1)
    assert nan_rows.sum() == (0 if poison == 3e38 else 1)
    assert poison == 3e38 or nan_rows[2, 3, 1]


@pytest.mark.parametrize("grad_mode", [True, False], ids=["autograd", "no-grad"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_keys_without_a_finite_logit(backend_device, poison, grad_mode):
    """Finite queries over a K/V sequence whose every key holds a NaN or an infinity (in one head): each
    logit of the rows reading it is NaN or +-inf, so the formula gives NaN there, never a finite row.
    SDPA's CPU kernels give zeros where no logit is finite or +inf (they read the row as masked); the
    other rows keep their values."""
    backend, device = backend_device
    q, k, v, kv_index = (t.detach().clone() for t in make_inputs(3, 2, 5, 6, 2, 32, [1, 0, 1], device=device))
    q[:, :, 0, 0] = 1.0  # -inf keys then give -inf logits throughout, the masked-looking row
    clean = shared_attention(q, k, v, kv_index, backend=backend)
    k[1, :, 0, 0] = poison  # every key of K/V sequence 1, head 0: query sequences 0 and 2 read it
    with torch.set_grad_enabled(grad_mode):
        out = shared_attention(q, k, v, kv_index, backend=backend)
    expected = torch.zeros(out.shape[:-1], dtype=torch.bool, device=device)
    expected[[0, 2], :, 0] = True
    assert torch.equal(~out.isfinite().all(-1), expected)
    assert torch.equal(out[~expected], clean[~expected])


# (Skv, kv_index): the model's maps at B = 3 (roll; explicit styles: [X; S; A] against [X; S]; all
# styled by one image), a map of more runs than the sliced path takes, and a map onto the last K/V.
SLICED_MAPS = [
    pytest.param(3, [0, 1, 2, 1, 2, 0], id="roll"),
    pytest.param(6, [0, 1, 2, 3, 4, 5, 3, 4, 5], id="explicit"),
    pytest.param(2, [1, 1, 1], id="all_to_one"),
    pytest.param(4, [3, 0, 2, 1], id="four-runs"),
    pytest.param(4, [3, 3], id="last"),
    pytest.param(3, [0, 1, 2], id="identity"),
]


@pytest.mark.parametrize("grad_mode", [True, False], ids=["autograd", "no-grad"])
@pytest.mark.parametrize("Skv, kv_index", SLICED_MAPS)
def test_sliced_path_matches_the_gather(Skv, kv_index, grad_mode, monkeypatch):
    """The CPU backend reads K/V runs in place (shared_attention_sliced): the same output and gradients
    as gathering K/V, and no gather where it takes the runs (no autograd and at most 3 runs; under
    autograd one run)."""
    q, k, v, kv_index = make_inputs(len(kv_index), Skv, 6, 7, 2, 32, kv_index)
    gather = shared_attention_torch(q, k, v, kv_index, 0.2)
    do = torch.randn(gather.shape, generator=torch.Generator().manual_seed(1))
    expected = (gather, *torch.autograd.grad(gather, (q, k, v), do))
    if _torch_impl._consecutive_runs(kv_index.tolist(), Skv, 1 if grad_mode else _torch_impl._MAX_RUNS):
        monkeypatch.setattr(_torch_impl, "shared_attention_torch", None)  # a gather would fail
    with torch.set_grad_enabled(grad_mode):
        out = shared_attention(q, k, v, kv_index, scale=0.2, backend="torch")
    torch.testing.assert_close(out, gather)
    if grad_mode:
        for got, want in zip(torch.autograd.grad(out, (q, k, v), do), expected[1:]):
            torch.testing.assert_close(got, want)


def test_sliced_path_reads_no_long_map(monkeypatch):
    """A map longer than _MAX_READ is not read on the host (a Python loop over it): the gather runs."""
    q, k, v, kv_index = make_inputs(3, 3, 4, 4, 1, 32, [0, 1, 2])
    gathers = []
    real = _torch_impl.shared_attention_torch
    monkeypatch.setattr(_torch_impl, "shared_attention_torch", lambda *a: gathers.append(1) or real(*a))
    monkeypatch.setattr(_torch_impl, "_MAX_READ", 2)
    with torch.no_grad():
        shared_attention(q, k, v, kv_index, backend="torch")
    assert gathers == [1]


def test_sliced_path_leaves_a_bad_map_to_the_gather():
    """An out-of-range entry (the model's schedule skips the range check) fails as the gather does,
    never as a short slice read as a shorter K/V batch."""
    q, k, v, _ = make_inputs(2, 2, 4, 4, 1, 32, [0, 1])
    with pytest.raises(IndexError), torch.no_grad():
        shared_attention(q, k, v, torch.tensor([1, 2], dtype=torch.int32), backend="torch", check_index=False)


@pytest.mark.parametrize("Sq, Skv", [(0, 0), (0, 2)], ids=["Skv0", "Skv2"])
def test_empty_batch(Sq, Skv, backend_device):
    backend, device = backend_device
    q, k, v, kv_index = make_inputs(Sq, Skv, 5, 5, 2, 32, [], device=device)
    out = shared_attention(q, k, v, kv_index, backend=backend)
    assert out.shape == (0, 5, 2, 32)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert dq.shape == q.shape and dk.shape == dv.shape == k.shape
    assert (dk == 0).all() and (dv == 0).all()


def test_meta_and_fake_tensors_give_shapes():
    """Shape propagation on the meta device (no autocast there), under FakeTensorMode and make_fx, as for
    any torch op: the range check, which needs values, is skipped rather than failing."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    q, k, v = (torch.empty(3, 7, 2, 32, device="meta") for _ in range(3))
    kv_index = torch.empty(3, dtype=torch.int32, device="meta")
    out = shared_attention(q, k[:2], v[:2], kv_index, backend="torch")
    assert out.shape == (3, 7, 2, 32) and out.device.type == "meta"
    with FakeTensorMode():
        q, k, v = (torch.empty(3, 7, 2, 32) for _ in range(3))
        assert shared_attention(q, k[:2], v[:2], torch.zeros(3, dtype=torch.int32)).shape == (3, 7, 2, 32)
    q, k, v, kv_index = make_inputs(2, 2, 5, 5, 1, 16, [1, 0])
    q, k, v = (t.detach() for t in (q, k, v))
    graph = make_fx(lambda q, k, v, i: shared_attention(q, k, v, i), tracing_mode="fake")(q, k, v, kv_index)
    torch.testing.assert_close(graph(q, k, v, kv_index), shared_attention(q, k, v, kv_index))


def test_autocast(backend_device):
    """fp32 inputs under autocast are cast to the autocast dtype first, as SDPA does."""
    backend, device = backend_device
    q, k, v, kv_index = make_inputs(3, 2, 12, 12, 2, 32, [0, 1, 1], device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = shared_attention(q, k, v, kv_index, backend=backend)
    assert out.dtype == torch.bfloat16
    dq, dk, dv = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    assert dq.dtype == dk.dtype == dv.dtype == torch.float32
    ref_out = reference(q, k, v, kv_index, torch.zeros_like(out))[0]
    assert rel_err(out, ref_out) <= TOLERANCE[torch.bfloat16]


def test_autocast_casts_every_lower_precision_input(backend_device):
    """fp16 inputs under bf16 autocast are cast too (autocast casts every float dtype but float64), not
    only fp32 ones: the result is the op on the bf16 inputs, in bf16. (SDPA casts them itself; the
    Triton kernels would run in fp16.)"""
    backend, device = backend_device
    q, k, v, kv_index = make_inputs(3, 2, 12, 12, 2, 32, [1, 0, 1], dtype=torch.float16, device=device)
    with torch.no_grad():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = shared_attention(q, k, v, kv_index, backend=backend)
        expected = shared_attention(*(t.bfloat16() for t in (q, k, v)), kv_index, backend=backend)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "backend_device",
    [
        pytest.param(("triton", "cpu"), id="triton-cpu"),
        pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
    ],
    indirect=True,
)
@pytest.mark.parametrize(
    "one_launch, dtype",
    [(None, torch.float32), (0, torch.float32), (None, torch.bfloat16)],
    ids=["bwd_two_launches", "bwd_one_launch", "bwd_two_launches-bf16"],
)
def test_opcheck(backend_device, one_launch, dtype, monkeypatch):
    """Schema, fake tensors, autograd registration and AOT dispatch of both custom ops (Triton backend),
    with either backward. q is head-major (dense, not contiguous): the fake outputs must have the real
    ones' dtype and (contiguous) strides, whatever the inputs' layout."""
    from fastvit_style.kernels import _common

    _, device = backend_device
    monkeypatch.setattr(_common, "ONE_LAUNCH_BACKWARD_MIN_PROGRAMS", one_launch)
    q, k, v, kv_index = make_inputs(3, 2, 10, 12, 2, 32, [1, 0, 1], dtype, device)
    q = q.detach().transpose(1, 2).contiguous().transpose(1, 2)
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(op_module.shared_attention_fwd_op, (q, k, v, kv_index, 0.2))
    out, lse = op_module.shared_attention_fwd_op(q, k, v, kv_index, 0.2)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, kv_index, 0.2)
    torch.library.opcheck(op_module.shared_attention_bwd_op, args)


def test_compile_fullgraph(backend_device):
    """Inductor, forward and backward in one graph, no break, same numbers as eager."""
    backend, device = backend_device
    q, k, v, kv_index = make_inputs(6, 4, 13, 14, 2, 32, [0, 1, 2, 3, 2, 3], device=device)
    weight = torch.randn(q.shape, device=device)

    def loss(q, k, v):
        return (shared_attention(q, k, v, kv_index, backend=backend) * weight).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    value = compiled(q, k, v)
    grads = torch.autograd.grad(value, (q, k, v))
    eager_value = loss(q, k, v)
    eager_grads = torch.autograd.grad(eager_value, (q, k, v))
    assert rel_err(value, eager_value) <= 1e-5
    for a, e in zip(grads, eager_grads):
        assert rel_err(a, e) <= 1e-5


def test_compiled_graphs_run_the_custom_ops():
    """Compiled with fullgraph=True, the forward graph calls the forward custom op and the backward
    graph the backward one, with no copy of their inputs: the Triton kernels run compiled, forward and
    backward. (test_compile_fullgraph compares numbers with eager only, which the PyTorch path would
    match as well.)"""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    codes = {}

    def recorder(kind):
        def compiler(gm, example_inputs):
            codes[kind] = gm.code
            return make_boxed_func(gm.forward)

        return compiler

    q, k, v, kv_index = make_inputs(3, 2, 9, 10, 2, 32, [1, 1, 0])
    torch._dynamo.reset()
    loss = torch.compile(
        lambda q, k, v: shared_attention(q, k, v, kv_index, backend="triton").square().sum(),
        backend=aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward")),
        fullgraph=True,
    )
    torch.autograd.grad(loss(q, k, v), (q, k, v))
    assert "torch.ops.fastvit_style.shared_attention_fwd.default(" in codes["forward"]
    assert "torch.ops.fastvit_style.shared_attention_bwd.default(" in codes["backward"]
    for code in codes.values():
        assert "clone" not in code and "contiguous" not in code, code


@pytest.mark.parametrize("path", ["eager", "custom_op", "compiled"])
def test_launchers_get_the_callers_views(path, monkeypatch):
    """Strides are handled inside the kernels, never by a copy in the autograd formula: the launchers
    get q, k, v as the caller's projection views (and, outside AOT autograd, which makes tangents
    dense, dO as given), forward and backward, on the eager Function, through the custom ops'
    registered autograd, and compiled (where only the strides can be compared)."""
    from fastvit_style import kernels

    q, k, v, kv_index = make_inputs(3, 2, 9, 10, 2, 32, [1, 1, 0])
    do = torch.randn(3, 2, 9, 32, generator=torch.Generator().manual_seed(1)).transpose(1, 2)
    seen = {}

    def spy(name, real, positions):
        def launcher(*args):
            seen[name] = [(args[i].data_ptr(), args[i].stride()) for i in positions]
            return real(*args)

        monkeypatch.setattr(kernels, name, launcher)

    spy("shared_attention_fwd", kernels.shared_attention_fwd, (0, 1, 2))  # q, k, v
    spy("shared_attention_bwd", kernels.shared_attention_bwd, (1, 2, 3, 0))  # q, k, v, do
    if path == "eager":
        out = shared_attention(q, k, v, kv_index, scale=0.2, backend="triton")
    elif path == "custom_op":
        out = op_module.shared_attention_fwd_op(q, k, v, kv_index, 0.2)[0]
    else:
        torch._dynamo.reset()
        attend = torch.compile(
            lambda q, k, v: shared_attention(q, k, v, kv_index, scale=0.2, backend="triton"),
            backend="aot_eager",
            fullgraph=True,
        )
        out = attend(q, k, v)
    torch.autograd.grad(out, (q, k, v), do)
    views = [(t.data_ptr(), t.stride()) for t in (q, k, v, do)]
    assert not any(t.is_contiguous() for t in (q, k, v, do))
    if path == "compiled":
        assert [s for _, s in seen["shared_attention_fwd"]] == [s for _, s in views[:3]]
        assert [s for _, s in seen["shared_attention_bwd"][:3]] == [s for _, s in views[:3]]
    else:
        assert seen["shared_attention_fwd"] == views[:3] and seen["shared_attention_bwd"] == views


@pytest.mark.parametrize(
    "backend_device",
    [
        pytest.param(("triton", "cpu"), id="triton-cpu"),
        pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
    ],
    indirect=True,
)
def test_compiled_path_clamps_an_out_of_range_map(backend_device):
    """Compiled, the map's values are not checked (a data-dependent check would break the graph): an
    out-of-range entry reads a clamped K/V sequence, forward and backward, never memory outside K/V."""
    backend, device = backend_device
    q, k, v, _ = make_inputs(3, 2, 7, 9, 2, 32, [0, 0, 0], device=device)
    bad, clamped = (torch.tensor(m, dtype=torch.int32, device=device) for m in ([5, -3, 1], [1, 0, 1]))

    def loss(q, k, v, kv_index):
        return shared_attention(q, k, v, kv_index, backend=backend).square().sum()

    torch._dynamo.reset()
    value = torch.compile(loss, backend="aot_eager", fullgraph=True)(q, k, v, bad)
    grads = torch.autograd.grad(value, (q, k, v))
    expected = loss(q, k, v, clamped)
    assert rel_err(value, expected) <= 1e-5
    for a, e in zip(grads, torch.autograd.grad(expected, (q, k, v))):
        assert rel_err(a, e) <= 1e-5
    with pytest.raises(ValueError, match="kv_index values must lie in"):  # eager mode checks
        loss(q, k, v, bad)


@pytest.mark.parametrize(
    "backend_device",
    [
        pytest.param(("triton", "cpu"), id="triton-cpu"),
        pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
    ],
    indirect=True,
)
def test_eager_path_skips_the_custom_ops_and_matches_them(backend_device, monkeypatch):
    """Eager calls on plain tensors run the same launchers without the custom ops' dispatch (host
    time); the numbers are those of the custom ops, bit for bit. A double backward raises, as it does
    through the custom ops (never a silent None)."""
    _, device = backend_device
    q, k, v, kv_index = make_inputs(6, 4, 13, 14, 2, 32, [0, 1, 2, 3, 2, 3], device=device)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device)
    # A scale other than the default d**-0.5: the custom ops' backward must use the forward's.
    via_op = op_module.shared_attention_fwd_op(q, k, v, kv_index, 0.3)[0]
    expected = (via_op, *torch.autograd.grad(via_op, (q, k, v), do))

    def no_custom_op(*args):
        raise AssertionError("the eager path called the custom op")

    with monkeypatch.context() as patch:
        patch.setattr(op_module, "shared_attention_fwd_op", no_custom_op)
        patch.setattr(op_module, "shared_attention_bwd_op", no_custom_op)
        out = shared_attention(q, k, v, kv_index, scale=0.3, backend="triton")
        for a, e in zip((out, *torch.autograd.grad(out, (q, k, v), do)), expected):
            assert torch.equal(a, e)
    for do_requires_grad in (False, True):
        out = shared_attention(q, k, v, kv_index, backend="triton")
        dq = torch.autograd.grad(out, q, do.requires_grad_(do_requires_grad), create_graph=True)[0]
        with pytest.raises(RuntimeError, match="no autograd formula was registered"):
            torch.autograd.grad(dq.sum(), q, allow_unused=True)


@pytest.mark.gpu
def test_cuda_graph_replay_reads_the_current_map():
    """Eager calls captured in a CUDA graph: nothing derived from kv_index before the capture (range
    check, inverse map) is reused, so a replay after the map is edited in place follows the new map."""
    from fastvit_style.kernels import INTERPRET

    if not torch.cuda.is_available() or INTERPRET:
        pytest.skip("needs a CUDA device and TRITON_INTERPRET unset")
    q, k, v, kv_index = make_inputs(4, 3, 20, 20, 2, 32, [0, 1, 2, 2], device="cuda")
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    do = torch.randn(q.shape, device="cuda")

    def step():
        out = shared_attention(q, k, v, kv_index, backend="triton")
        return (out, *torch.autograd.grad(out, (q, k, v), do))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph asks
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    kv_index.copy_(torch.tensor([2, 2, 0, 1], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    for a, e in zip(captured, step()):
        assert torch.equal(a, e)


def test_tracing_sees_the_custom_op():
    """Under a dispatch mode (fake tensors here; make_fx and export alike) the call must be the custom
    op, whose fake implementation gives the shapes: the eager path would launch on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(3, 9, 2, 32), torch.empty(2, 10, 2, 32), torch.empty(2, 10, 2, 32)
        out = shared_attention(
            q, k, v, torch.zeros(3, dtype=torch.int32), backend="triton", check_index=False
        )
    assert out.shape == (3, 9, 2, 32)


def test_a_real_make_fx_trace_records_the_custom_op():
    """make_fx on real tensors (a dispatch mode over plain tensors with storage) must record the custom
    op: the eager path's kernel launch would leave no node that runs it again."""
    from torch.fx.experimental.proxy_tensor import make_fx

    q, k, v, kv_index = make_inputs(2, 2, 5, 5, 1, 16, [1, 0])
    q, k, v = (t.detach() for t in (q, k, v))

    def attend(q, k, v, i):
        return shared_attention(q, k, v, i, backend="triton")

    graph = make_fx(attend, tracing_mode="real")(q, k, v, kv_index)
    assert "fastvit_style.shared_attention_fwd" in graph.code
    torch.testing.assert_close(graph(q.flip(0), k, v, kv_index), attend(q.flip(0), k, v, kv_index))


def test_a_tensor_subclass_counts_as_traced():
    """A subclass (with storage: its __torch_function__ may rewrite the call) never takes the eager path."""
    from fastvit_style.tracing import traced

    class Tagged(torch.Tensor):
        pass

    q = torch.zeros(2)
    assert not traced(q, torch.nn.Parameter(q)) and traced(q, q.as_subclass(Tagged))


def test_transforms_and_tracers_see_the_custom_op():
    """vmap (the custom op's loop fallback) and torch.jit.trace worked through the custom op: the
    eager path must not take those calls."""
    q, k, v, kv_index = make_inputs(2, 2, 9, 9, 1, 32, [1, 0])
    q, k, v = (t.detach() for t in (q, k, v))
    batched = torch.stack([q, q.flip(0)])

    def attend(q):
        return shared_attention(q, k, v, kv_index, backend="triton")

    mapped = torch.func.vmap(attend)(batched)
    for i in range(2):
        assert rel_err(mapped[i], reference(batched[i], k, v, kv_index, torch.zeros_like(q))[0]) <= 1e-5
    traced = torch.jit.trace(attend, (q,), check_trace=False)
    assert "fastvit_style::shared_attention_fwd" in str(traced.graph)
    assert torch.equal(traced(q.flip(0)), attend(q.flip(0)))


def test_batched_gradients():
    """is_grads_batched (the legacy vmap over the backward, as autograd.functional.jacobian uses) meets
    batched gradients that have no storage: the eager backward must hand them to the custom op."""
    q, k, v, kv_index = make_inputs(2, 2, 5, 5, 1, 16, [1, 1])
    out = shared_attention(q, k, v, kv_index, backend="triton")
    cotangents = torch.randn(3, *out.shape, generator=torch.Generator().manual_seed(3))
    (batched,) = torch.autograd.grad(out, q, cotangents, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        (expected,) = torch.autograd.grad(out, q, cotangents[i], retain_graph=True)
        assert rel_err(batched[i], expected.double()) <= 1e-6


def test_forward_mode_ad_runs_the_torch_path_or_is_refused():
    """The PyTorch path carries tangents (torch.func.jvp, dual tensors) through SDPA's math kernel, the
    fused SDPA kernels having no forward formula: against central differences in float64. The Triton
    path has none either: it raises (the custom op alone would carry a zero tangent silently)."""
    import torch.autograd.forward_ad as fwAD

    def attend(kv_index, backend="torch"):
        return lambda q, k, v: shared_attention(q, k, v, kv_index, backend=backend)

    for kv_map in ([1, 0], [2, 2, 0]):  # the sliced path's runs, and the gather
        *qkv, kv_index = make_inputs(len(kv_map), 3, 5, 5, 2, 16, kv_map, dtype=torch.float64)
        primals = tuple(t.detach() for t in qkv)
        tangents = tuple(torch.randn_like(t) for t in primals)
        eps = 1e-6
        ahead, behind = (
            attend(kv_index)(*(p + sign * eps * t for p, t in zip(primals, tangents))) for sign in (1, -1)
        )
        expected = (ahead - behind) / (2 * eps)
        for backend in ("torch", "auto"):
            out, tangent = torch.func.jvp(attend(kv_index, backend), primals, tangents)
            assert rel_err(out, attend(kv_index)(*primals)) <= 1e-12 and rel_err(tangent, expected) <= 1e-8
        with fwAD.dual_level():
            dual = shared_attention(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)), kv_index)
            assert rel_err(fwAD.unpack_dual(dual).tangent, expected) <= 1e-8
    q, k, v, kv_index = make_inputs(2, 2, 5, 5, 1, 16, [1, 0])
    q, k, v = (t.detach() for t in (q, k, v))
    with pytest.raises(NotImplementedError, match="forward-mode AD.*backend='torch'"):
        torch.func.jvp(lambda q: shared_attention(q, k, v, kv_index, backend="triton"), (q,), (q,))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="dual tensors.*backend='torch'"):
        shared_attention(fwAD.make_dual(q, q), k, v, kv_index, backend="triton")


def test_dual_tensors_on_cuda_take_the_torch_path_with_auto(monkeypatch):
    """'auto' picks Triton for CUDA tensors, except under forward-mode AD, torch.func.jvp's or dual
    tensors' (fake CUDA tensors stand in for real ones; Triton said to be able to run them)."""
    import torch.autograd.forward_ad as fwAD
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(op_module, "triton_unavailable_reason", lambda *args: None)
    with FakeTensorMode():
        q = torch.empty(2, 5, 1, 32, device="cuda")
    assert op_module._resolve_backend("auto", q) == "triton"
    with fwAD.dual_level():
        assert op_module._resolve_backend("auto", q) == "torch"
        with pytest.raises(NotImplementedError, match="dual tensors"):
            op_module._resolve_backend("triton", q)


def test_torch_func_gradients_take_the_torch_path_or_are_refused():
    """torch.func.grad/vjp/jacrev cannot differentiate the custom ops (upstream: their generated
    autograd.Function has no setup_context): "auto" runs the PyTorch path, "triton" says so; vmap runs."""
    q, k, v, kv_index = make_inputs(2, 2, 5, 5, 1, 16, [1, 0])
    q, k, v = (t.detach() for t in (q, k, v))

    def loss(backend):
        return lambda q: shared_attention(q, k, v, kv_index, backend=backend).pow(2).sum()

    q_leaf = q.clone().requires_grad_()
    (expected,) = torch.autograd.grad(loss("triton")(q_leaf), q_leaf)
    assert rel_err(torch.func.grad(loss("auto"))(q), expected.double()) <= 1e-6
    for transform in (torch.func.grad, torch.func.jacrev):
        with pytest.raises(NotImplementedError, match="torch.func.grad, vjp and jacrev.*backend='torch'"):
            transform(loss("triton"))(q)
    batched = torch.func.vmap(lambda q: shared_attention(q, k, v, kv_index, backend="triton"))(q[None])
    torch.testing.assert_close(batched[0], shared_attention(q, k, v, kv_index, backend="triton"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inference_mode_keys_and_values_with_trainable_queries(backend):
    """K/V made under inference_mode (a style bank) read by queries that need a gradient: the Triton
    path saves copies for its backward (inference tensors cannot be saved)."""
    q, k, v, kv_index = make_inputs(2, 2, 5, 5, 1, 16, [1, 0])
    with torch.inference_mode():
        k_inf, v_inf, index_inf = k.detach().clone(), v.detach().clone(), kv_index.clone()
    do = torch.randn(2, 5, 1, 16)
    out = shared_attention(q, k_inf, v_inf, index_inf, backend=backend)
    (dq,) = torch.autograd.grad(out, q, do)
    ref_out, (ref_dq, _, _) = reference(q, k, v, kv_index, do)
    assert rel_err(out, ref_out) <= 1e-6 and rel_err(dq, ref_dq) <= 1e-6


def test_compiled_autograd_over_an_eager_forward():
    """Compiled autograd traces the eager Function's backward: it must meet the custom op there."""
    from torch._dynamo import compiled_autograd

    q, k, v, kv_index = make_inputs(4, 3, 9, 9, 1, 32, [2, 0, 2, 1])
    out = shared_attention(q, k, v, kv_index, backend="triton")
    expected = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    out = shared_attention(q, k, v, kv_index, backend="triton")
    torch._dynamo.reset()
    with compiled_autograd._enable(torch.compile(backend="aot_eager", fullgraph=True)):
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for a, e in zip(grads, expected):
        assert rel_err(a, e) <= 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inference_mode(backend):
    """Inference tensors have no version counter: the once-per-map range check must not need one."""
    q, k, v, kv_index = make_inputs(3, 2, 9, 9, 2, 32, [1, 0, 1])
    expected = shared_attention(q, k, v, kv_index, backend=backend)
    with torch.inference_mode():
        inference_index = kv_index.clone()
        out = shared_attention(q, k, v, inference_index, backend=backend)
        with pytest.raises(ValueError, match=r"\[0, Skv=2\), got min 1 and max 2"):
            shared_attention(q, k, v, inference_index + 1, backend=backend)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_each_backend_runs_its_path(backend, monkeypatch):
    """backend="triton" runs the kernels (CPU tensors: through the interpreter), forward and backward,
    and never the PyTorch path; backend="torch" runs the PyTorch path and never a kernel."""
    from fastvit_style import kernels

    calls = []

    def spy(module, name):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args: calls.append(name) or real(*args))

    spy(kernels, "shared_attention_fwd")
    spy(kernels, "shared_attention_bwd")
    spy(op_module, "shared_attention_sliced")
    q, k, v, kv_index = make_inputs(3, 2, 5, 6, 1, 32, [1, 0, 1])
    out = shared_attention(q, k, v, kv_index, backend=backend)
    torch.autograd.grad(out.sum(), (q, k, v))
    if backend == "triton":
        assert calls == ["shared_attention_fwd", "shared_attention_bwd"]
    else:
        assert calls == ["shared_attention_sliced"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_backend_on_cpu_is_torch(monkeypatch, dtype):
    """'auto' never runs Triton on CPU tensors, interpreter or not (fp32, which Triton could run
    there); it also takes float64."""
    monkeypatch.setattr(op_module, "_triton_attention", None)
    q, k, v, kv_index = make_inputs(2, 2, 5, 5, 1, 32, [1, 0], dtype=dtype)
    assert torch.equal(
        shared_attention(q, k, v, kv_index), shared_attention_torch(q, k, v, kv_index, 32**-0.5)
    )


def test_auto_backend_on_cuda_falls_back_with_one_warning(monkeypatch):
    """On CUDA tensors the Triton kernels cannot take (triton missing, a dtype or head dim they lack),
    'auto' runs the PyTorch path with one warning per reason, shared with the model's own fallback
    warning; on CPU tensors it stays silent (PyTorch is its choice there, not a fallback). Fake CUDA
    tensors stand in for real ones."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastvit_style import backends

    monkeypatch.setattr(op_module, "_fallbacks_warned", set())
    monkeypatch.setattr(op_module, "triton_unavailable_reason", lambda *args: "no Triton in this test")
    monkeypatch.setattr(backends, "triton_unavailable_reason", lambda *args, **kw: "no Triton in this test")
    message = "backend='auto' falls back to the PyTorch path: no Triton in this test"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # CPU tensors: PyTorch without a word
        q, k, v, kv_index = make_inputs(2, 2, 5, 5, 1, 32, [1, 0])
        shared_attention(q, k, v, kv_index)
    with FakeTensorMode():
        q, k, v = (torch.empty(2, 5, 1, 32, device="cuda") for _ in range(3))
        kv_index = torch.zeros(2, dtype=torch.int32, device="cuda")
        with pytest.warns(UserWarning, match=message) as record:
            assert shared_attention(q, k, v, kv_index).shape == q.shape
        assert len(record) == 1 and record[0].filename == __file__  # names the caller's line
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the same reason again, from the op or the model: silent
            shared_attention(q, k, v, kv_index)
            assert backends.resolve_backend("auto", torch.device("cuda")) == "torch"


@pytest.mark.gpu
def test_auto_backend_on_cuda_is_triton(monkeypatch):
    from fastvit_style.kernels import INTERPRET

    if not torch.cuda.is_available() or INTERPRET:
        pytest.skip("needs CUDA and TRITON_INTERPRET unset")
    monkeypatch.setattr(op_module, "shared_attention_torch", None)
    q, k, v, kv_index = make_inputs(2, 2, 5, 5, 1, 32, [1, 0], device="cuda")
    assert shared_attention(q, k, v, kv_index).shape == q.shape


def _valid(**changes):
    q, k, v, kv_index = make_inputs(2, 2, 5, 6, 2, 32, [1, 0])
    return {"q": q, "k": k, "v": v, "kv_index": kv_index, "backend": "torch", **changes}


@pytest.mark.parametrize(
    "changes, message",
    [
        (lambda t: {"q": t["q"].detach().numpy()}, r"q must be a torch.Tensor, got ndarray"),
        (lambda t: {"k": t["k"][0]}, r"k must be 4-D \(S, T, H, d\), got shape \(6, 2, 32\)"),
        (lambda t: {"q": t["q"].int(), "k": t["k"].int(), "v": t["v"].int()}, r"q must have dtype in"),
        (lambda t: {"v": t["v"].double()}, r"q, k and v must share one dtype"),
        (lambda t: {"v": t["v"][:, :5]}, r"k and v must have the same shape"),
        (
            lambda t: {"q": t["q"][..., :1, :]},
            r"same heads and head dim \(H, d\), got \(1, 32\) and \(2, 32\)",
        ),
        (
            lambda t: {"q": t["q"][..., :16]},
            r"same heads and head dim \(H, d\), got \(2, 16\) and \(2, 32\)",
        ),
        (lambda t: {"kv_index": t["kv_index"][:1]}, r"kv_index must have shape \(2,\)"),
        (lambda t: {"kv_index": t["kv_index"][None]}, r"kv_index must have shape \(2,\)"),
        (lambda t: {"kv_index": t["kv_index"].float()}, r"kv_index must have an integer dtype"),
        (lambda t: {"kv_index": t["kv_index"].to("meta")}, r"kv_index must be on the same device as q"),
        (
            lambda t: {"k": t["k"][:, :0], "v": t["v"][:, :0]},
            r"\(Skv, Tk >= 1\) when Sq > 0, got Skv=2, Tk=0",
        ),
        (lambda t: {"k": t["k"][:0], "v": t["v"][:0]}, r"\(Skv, Tk >= 1\) when Sq > 0, got Skv=0, Tk=6"),
        (
            lambda t: {"kv_index": t["kv_index"] + 1},
            r"kv_index values must lie in \[0, Skv=2\), got min 1 and max 2",
        ),
        (lambda t: {"kv_index": t["kv_index"] - 1}, r"kv_index values must lie in \[0, Skv=2\), got min -1"),
        (lambda t: {"backend": "flash"}, r"backend must be one of \('auto', 'torch', 'triton', 'xformers'\)"),
        (lambda t: {"scale": float("nan")}, r"scale must be a finite real number .*got nan"),
        (lambda t: {"scale": float("-inf")}, r"scale must be a finite real number .*got -inf"),
        (lambda t: {"scale": [0.5]}, r"scale must be a finite real number .*got \[0.5\]"),
        (lambda t: {"scale": torch.tensor(0.5)}, r"scale must be .*not a tensor.*got tensor\(0.5000\)"),
        (lambda t: {"scale": "0.5"}, r"scale must be a finite real number .*got '0.5'"),
        (lambda t: {"scale": True}, r"scale must be a finite real number .*got True"),
        (lambda t: {"scale": 1e39}, r"scale must be a finite real number of at most 2.36e\+38 .*got 1e\+39"),
        (
            lambda t: {"q": t["q"][..., :0], "k": t["k"][..., :0], "v": t["v"][..., :0]},
            r"head dim d of q, k and v must be at least 1",
        ),
        (lambda t: {"check_index": "no"}, r"check_index must be True or False, got 'no'"),
    ],
    ids=[
        "not-tensor",
        "k-3d",
        "int-dtype",
        "mixed-dtype",
        "kv-shape",
        "heads",
        "head-dim",
        "index-length",
        "index-2d",
        "index-dtype",
        "index-device",
        "Tk0",
        "Skv0",
        "index-too-large",
        "index-negative",
        "backend-name",
        "scale-nan",
        "scale-inf",
        "scale-list",
        "scale-tensor",
        "scale-str",
        "scale-bool",
        "scale-overflows-fp32",
        "d0",
        "check-index-str",
    ],
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_errors(changes, message, backend):
    inputs = _valid(backend=backend)
    inputs.update(changes(inputs))
    with pytest.raises(ValueError, match=message):
        shared_attention(**inputs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_and_expanded_maps(backend):
    """A map is its values, whatever its strides: the kernels get a contiguous copy (they read it as an
    array), and the backward inverts the same values the forward read."""
    q, k, v, _ = make_inputs(3, 3, 9, 9, 1, 16, [0, 0, 0])
    do = torch.randn(3, 9, 1, 16)
    maps = [
        torch.tensor([2, 9, 0, 9, 1, 9], dtype=torch.int32)[::2],
        torch.tensor([0, 1, 1, 1])[:1].expand(3),
    ]
    for kv_index in maps:
        out = shared_attention(q, k, v, kv_index, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), do)
        expected, expected_grads = reference(q, k, v, kv_index.contiguous(), do)
        assert rel_err(out, expected) < 1e-5
        for name, g, e in zip("qkv", grads, expected_grads):
            assert rel_err(g, e) < 1e-5, name


@pytest.mark.parametrize("backend", ["torch", "xformers"])
def test_sequence_chunks(backend, monkeypatch, request):
    """Where the library kernels cap the sequences of one call (65535 on CUDA), the torch and xformers
    paths run in chunks of sequences: same output and gradients as one call (here chunks of 2 on CPU)."""
    # The module, not the function of the same name that the package exports.
    module = importlib.import_module("fastvit_style.ops.shared_attention")
    if backend == "xformers":
        request.getfixturevalue("fake_xformers")
    q, k, v, kv_index = make_inputs(5, 3, 9, 11, 2, 16, [2, 0, 2, 1, 0], dtype=torch.float64)
    do = torch.randn(5, 9, 2, 16, dtype=torch.float64)
    calls = []
    monkeypatch.setattr(module, "_MAX_SEQUENCES_PER_CALL", 2)
    monkeypatch.setattr(module, "_CHUNKED_DEVICES", ("cpu",))
    name = {"torch": "shared_attention_sliced", "xformers": "shared_attention_xformers"}[backend]
    real = getattr(module, name)
    spy = lambda q, *args: calls.append(q.shape[0]) or real(q, *args)
    monkeypatch.setattr(module, name, spy)
    if backend == "xformers":  # the xformers backend refuses float64
        q, k, v, do = (t.detach().float().requires_grad_() for t in (q, k, v, do))
    out = shared_attention(q, k, v, kv_index, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), do)
    assert calls == [2, 2, 1]
    expected, expected_grads = reference(q, k, v, kv_index, do)
    tol = 1e-12 if backend == "torch" else 1e-5
    assert rel_err(out, expected) < tol
    for name, g, e in zip("qkv", grads, expected_grads):
        assert rel_err(g, e) < tol, name


def test_index_range_checked_once_per_map(monkeypatch):
    """The eager range check (a device sync) runs again only for a new map or one edited in place."""
    q, k, v, kv_index = make_inputs(2, 2, 5, 5, 1, 32, [1, 0])
    calls = []
    stack = torch.stack
    monkeypatch.setattr(torch, "stack", lambda *a, **kw: calls.append(1) or stack(*a, **kw))
    shared_attention(q, k, v, kv_index, backend="torch")
    shared_attention(q, k, v, kv_index, backend="torch")
    assert len(calls) == 1
    with pytest.raises(ValueError, match=r"\[0, Skv=1\), got min 0 and max 1"):
        shared_attention(q, k[:1], v[:1], kv_index, backend="torch")
    kv_index[0] = 2
    with pytest.raises(ValueError, match=r"\[0, Skv=2\), got min 0 and max 2"):
        shared_attention(q, k, v, kv_index, backend="torch")


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            lambda t: {"q": t["q"].double(), "k": t["k"].double(), "v": t["v"].double()},
            r"dtype torch.float64 unsupported by the Triton backend",
        ),
        (
            lambda t: {"q": t["q"][..., :8], "k": t["k"][..., :8], "v": t["v"][..., :8]},
            r"head dim d=8 unsupported",
        ),
    ],
    ids=["float64", "d8"],
)
def test_triton_errors(changes, message):
    inputs = _valid(backend="triton")
    inputs.update(changes(inputs))
    with pytest.raises(ValueError, match=message):
        shared_attention(**inputs)


def test_triton_on_cpu_outside_interpreter(monkeypatch):
    from fastvit_style.kernels import _common

    monkeypatch.setattr(_common, "INTERPRET", False)
    with pytest.raises(ValueError, match="CPU tensors given to the Triton backend outside interpreter mode"):
        shared_attention(**_valid(backend="triton"))


def test_xformers_errors(monkeypatch, fake_xformers):
    """backend='xformers' names what is missing: the package, CUDA tensors, a supported dtype."""
    from fastvit_style.ops import _xformers_impl

    inputs = _valid(backend="xformers")
    double = {name: inputs[name].double() for name in ("q", "k", "v")}
    with pytest.raises(ValueError, match="dtype torch.float64 unsupported by the xformers backend"):
        shared_attention(**{**inputs, **double})
    monkeypatch.setattr(_xformers_impl, "DEVICES", ("cuda",))
    with pytest.raises(ValueError, match=r"backend='xformers' cannot run here: .* has no cpu kernels"):
        shared_attention(**inputs)
    monkeypatch.setitem(sys.modules, "xformers", None)  # makes the import fail as for a missing package
    with pytest.raises(ValueError, match="the xformers package is not installed"):
        shared_attention(**inputs)


def test_import_does_not_import_triton():
    """Triton is imported only when its backend runs (TRITON_INTERPRET must be set before that);
    xformers (slow to import, and often broken against another torch) only when its backend is asked for."""
    code = "import sys, fastvit_style, fastvit_style.ops; sys.exit('triton' in sys.modules or 'xformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_benchmark_dry_run(monkeypatch):
    """bench/sweep_shared_attention.py parses its arguments, counts FLOPs and lists its tile configs
    without a GPU."""
    from fastvit_style.kernels import _common

    path = Path(__file__).parents[2] / "bench" / "sweep_shared_attention.py"
    spec = importlib.util.spec_from_file_location("sweep_shared_attention", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    # B=1: 3 query sequences over 2 K/V sequences; 2 matmuls of 2*T*T*d FLOPs per sequence and head.
    assert sweep.model_kv_index(2).tolist() == [0, 1, 2, 3, 2, 3]
    assert sweep.attention_flops(3, 2, 197, 196, 64, backward=False) == 4 * 3 * 2 * 197 * 196 * 64
    assert sweep.attention_flops(3, 2, 197, 196, 64, backward=True) == 3.5 * 4 * 3 * 2 * 197 * 196 * 64
    args = sweep.parse_args(["--dry-run", "--heads", "12", "--batches", "8", "32"])
    assert sweep.plan(args) == [(8, 12), (32, 12)]
    assert sweep.main(["--dry-run", "--heads", "3", "--batches", "8"]) == 0
    # The block rows start at the GPU defaults and never time one config twice.
    monkeypatch.setattr(_common, "INTERPRET", False)
    configs = sweep.block_configs()
    defaults = tuple(
        _common.attention_blocks(k, 197, 197, 64, torch.bfloat16) for k in ("fwd", "bwd_dkdv", "bwd_dq")
    )
    assert configs[0] == defaults
    assert len(set(configs)) == len(configs) == 15
    one_launch = sweep.one_launch_block_configs()
    assert one_launch[0] == _common.attention_blocks("bwd_fused", 197, 197, 64, torch.bfloat16)
    assert len(set(one_launch)) == len(one_launch) == 4
    # Every config covers T = 197 keys in at most three parts (or the sweep would time the two launches).
    from fastvit_style.kernels.shared_attention_bwd_fused import key_parts

    assert all(key_parts(197, b.block_n) for b in one_launch)
    assert [m[0] for m in sweep.methods(sweep.parse_args([]), 8, 3)][:3] == [
        "fused",
        "fused-api",
        "fused-1launch",
    ]


def test_sweep_bookkeeping_without_gpu(monkeypatch, tmp_path):
    """bench/sweep_shared_attention.py's main, with timing stubbed out: every method and tile row
    runs under the backward it names (one launch for fused-1launch and the one-launch tile rows, two
    otherwise, the default restored after), and the JSON is written. A GPU session runs this script
    once; a slip here would lose its rows."""
    from fastvit_style.kernels import _common

    path = Path(__file__).parents[2] / "bench" / "sweep_shared_attention.py"
    spec = importlib.util.spec_from_file_location("sweep_shared_attention", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    seen = []

    def fake_run_method(problem, builder, args, graph=True):
        blocks = _common.attention_blocks("bwd_fused", 197, 197, 64, torch.bfloat16)
        seen.append((_common.ONE_LAUNCH_BACKWARD_MIN_PROGRAMS, blocks))
        return {
            **{f"{k}_{f}": 1.0 for k in ("fwd", "fwd_bwd") for f in ("ms", "ms_p20", "ms_p80", "tflops")},
            "err_out": 0.0,
            "err_grad": 0.0,
            "matches_reference": True,
        }

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(
        sweep, "environment", lambda: {"device": "fake GPU", "xformers": "-", "torch": "-", "triton": "-"}
    )
    monkeypatch.setattr(sweep, "Problem", lambda B, H: object())
    monkeypatch.setattr(sweep, "run_method", fake_run_method)
    monkeypatch.setattr(_common, "ONE_LAUNCH_BACKWARD_MIN_PROGRAMS", 1234)
    argv = ["--out", str(tmp_path), "--heads", "3", "--batches", "8", "--flex-heads", "3", "--tune-blocks"]
    assert sweep.main(argv) == 0
    assert _common.ONE_LAUNCH_BACKWARD_MIN_PROGRAMS == 1234
    (written,) = tmp_path.glob("*_fake-GPU_shared_attention.json")
    data = json.loads(written.read_text())
    methods = {r["method"]: r["status"] for r in data["rows"]}
    assert methods["fused"] == methods["fused-1launch"] == "ok"
    # Method rows: fused, fused-api, fused-1launch, then the other methods (xformers skipped here), then
    # FlexAttention's phase; the tile rows come last (a faulting tile config cannot spoil flex rows).
    ran = [r["method"] for r in data["rows"] if r["status"] == "ok"]
    assert ran[-1] == "flex" and "flex" not in ran[:-1]
    assert [knob for knob, _ in seen[: len(ran)]] == [0 if m == "fused-1launch" else 1234 for m in ran]
    # Tile rows: the two-launch configs, then the one-launch ones under their own blocks.
    tiles = seen[len(ran) :]
    configs, one_launch = sweep.block_configs(), sweep.one_launch_block_configs()
    assert [knob for knob, _ in tiles] == [None] * len(configs) + [0] * len(one_launch)
    assert [tuple(b) for _, b in tiles[len(configs) :]] == [tuple(b) for b in one_launch]
    assert [r.get("one_launch_blocks") for r in data["block_sweep"][len(configs) :]] == [
        list(b) for b in one_launch
    ]
    assert all(r["status"] == "ok" for r in data["block_sweep"])


def test_sweep_one_launch_threshold():
    """The sweep's suggestion for ONE_LAUNCH_BACKWARD_MIN_PROGRAMS: the smallest Skv * H from which
    the one-launch backward wins at every larger measured size (ties and wrong rows do not count)."""
    path = Path(__file__).parents[2] / "bench" / "sweep_shared_attention.py"
    spec = importlib.util.spec_from_file_location("sweep_shared_attention", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)

    def rows(times):  # {(B, H): (two launches, one launch)} -> sweep rows; Skv = 2B
        return [
            {
                "B": B,
                "H": H,
                "Skv": 2 * B,
                "method": m,
                "status": "ok",
                "matches_reference": True,
                "fwd_bwd_ms": t,
            }
            for (B, H), pair in times.items()
            for m, t in zip(("fused", "fused-1launch"), pair)
        ]

    # Skv * H: 48 (B=8, H=3), 192 (B=32, H=3), 768 (B=32, H=12), 3072 (B=128, H=12).
    sizes = {(8, 3): (1.0, 2.0), (32, 3): (1.0, 0.9), (32, 12): (1.0, 1.1), (128, 12): (1.0, 0.8)}
    assert sweep.one_launch_threshold(rows(sizes))["min_programs"] == 3072
    sizes[(32, 12)] = (1.0, 0.95)
    assert sweep.one_launch_threshold(rows(sizes))["min_programs"] == 192
    sizes[(128, 12)] = (1.0, 1.0)
    assert sweep.one_launch_threshold(rows(sizes))["min_programs"] is None
    wrong = rows({(8, 3): (1.0, 0.5)})
    wrong[1]["matches_reference"] = False
    assert sweep.one_launch_threshold(wrong) == {
        "min_programs": None,
        "evidence": "no size with both methods measured",
    }


def test_sweep_baselines_rates_and_check_on_cpu(monkeypatch, fake_xformers, one_thread):
    """bench/sweep_shared_attention.py's run_method on the CPU, do_bench stubbed (SDPA's math backend,
    xformers faked): each baseline matches the reference, output and gradients; the dup rows take K/V
    already duplicated per query sequence (neither the copy nor the sum of dK/dV is timed), the gather
    rows the K/V sequences themselves, reached through the timed calls (gather, then index_add of
    dK/dV in the backward); the forward is timed without autograd; TFLOP/s from the median in ms."""
    pytest.importorskip("triton")
    import triton.testing

    path = Path(__file__).parents[2] / "bench" / "sweep_shared_attention.py"
    spec = importlib.util.spec_from_file_location("sweep_shared_attention", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    B, H, T, D = 2, 2, sweep.T, sweep.D
    p = sweep.Problem.__new__(sweep.Problem)  # its constructor draws on CUDA
    gen = torch.Generator().manual_seed(0)
    p.B, p.H, p.Sq, p.Skv, p.scale, p.kv_index = B, H, 3 * B, 2 * B, D**-0.5, sweep.model_kv_index(B)
    p.q, p.k, p.v, p.do = (torch.randn(n, T, H, D, generator=gen) for n in (3 * B, 2 * B, 2 * B, 3 * B))
    q, k, v = (t.clone().requires_grad_() for t in (p.q, p.k, p.v))
    out = shared_attention_torch(q, k, v, p.kv_index, p.scale)
    p.ref_grads, p.ref_out = torch.autograd.grad(out, (q, k, v), p.do), out.detach()

    grad_modes, timed_grads = [], []

    def do_bench(step, warmup, rep, grad_to_none, return_mode):
        assert return_mode == "all"  # the raw samples, kept in the row
        grad_modes.append([])
        for _ in range(3):  # do_bench's calls, gradients reset in between
            for leaf in grad_to_none:
                leaf.grad = None
            step()
        timed_grads.append([leaf.grad for leaf in grad_to_none])
        return [1.0, 1.0, 2.0, 4.0, 4.0]  # p20 1.0, median 2.0, p80 4.0

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)

    def recorded(builder):  # records the grad mode of every call, and the leaves
        def build(problem):
            fn, leaves, grads = builder(problem)
            built.append(leaves)

            def call():
                (grad_modes[-1] if grad_modes else []).append(torch.is_grad_enabled())
                return fn()

            return call, leaves, grads

        return build

    args = sweep.parse_args([])
    for name, builder, duplicated in (
        ("sdpa-dup-math", lambda p: sweep.sdpa_dup(p, "math"), True),
        ("sdpa-gather-math", lambda p: sweep.sdpa_gather(p, "math"), False),
        ("xformers-dup", lambda p: sweep.xformers_attention(p, gather=False), True),
        ("xformers-gather", lambda p: sweep.xformers_attention(p, gather=True), False),
    ):
        grad_modes.clear(), timed_grads.clear()
        built = []
        row = sweep.run_method(p, recorded(builder), args)
        assert row["matches_reference"] and max(row["err_out"], row["err_grad"]) < 1e-5, (name, row)
        (_, k_leaf, v_leaf), rows = built[0], p.Sq if duplicated else p.Skv
        assert k_leaf.shape[0] == v_leaf.shape[0] == rows, name
        assert grad_modes == [[False] * 3, [True] * 3], name  # forward under no_grad, then fwd+bwd
        dk = timed_grads[1][1]  # what the last timed backward left on the K leaf
        assert dk is not None and dk.shape[0] == rows, name
        for key, backward in (("fwd", False), ("fwd_bwd", True)):
            assert (row[f"{key}_ms"], row[f"{key}_ms_p20"], row[f"{key}_ms_p80"]) == (2.0, 1.0, 4.0)
            assert row[f"{key}_ms_samples"] == [1.0, 1.0, 2.0, 4.0, 4.0]
            flop = sweep.attention_flops(p.Sq, H, T, T, D, backward)
            assert row[f"{key}_tflops"] == pytest.approx(flop / 2e-3 / 1e12)

    def wrong_dk(problem):
        fn, leaves, grads = sweep.sdpa_gather(problem, "math")
        return fn, leaves, lambda: tuple(g * s for g, s in zip(grads(), (1, 2, 1)))

    assert not sweep.run_method(p, wrong_dk, args)["matches_reference"]
