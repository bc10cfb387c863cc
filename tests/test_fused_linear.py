"""The block's linear layers: oneDNN's fused GEMM epilogues (CPU inference) and oneDNN GEMMs under
autograd (CPU training) against their torch twins."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel
from torch.autograd import forward_ad
from torch.utils.flop_counter import FlopCounterMode

from fastvit_style.layers import fused_linear
from fastvit_style.layers.attention_block import CrossAttentionBlock

needs_onednn = pytest.mark.skipif(fused_linear._ONEDNN_LINEAR is None, reason="torch without oneDNN (mkldnn)")


def operands(seed: int, dtype=torch.float32):
    """x (3, 17, 48) sliced off a wider map (not contiguous), weight (40, 48), bias (40,), residual
    (3, 17, 40) not contiguous either: the layouts the schedule hands over (CLS rows dropped)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return randn(3, 18, 48)[:, 1:], randn(40, 48) / 7, randn(40), randn(3, 17, 80)[..., ::2]


def plain_gelu(x, weight, bias):
    return F.gelu(F.linear(x, weight, bias))


def twins(x, weight, bias, residual):
    """(what the fused functions return, what plain torch ops give) for the three of them."""
    fused = (
        fused_linear.linear(x, weight, bias),
        fused_linear.linear_gelu(x, weight, bias),
        fused_linear.linear_add(x, weight, bias, residual),
    )
    plain = (
        F.linear(x, weight, bias),
        plain_gelu(x, weight, bias),
        residual + F.linear(x, weight, bias),
    )
    return fused, plain


@needs_onednn
@pytest.mark.parametrize("with_bias", [True, False])
def test_onednn_epilogues_match_torch(with_bias, monkeypatch):
    x, weight, bias, residual = operands(seed=1)
    bias = bias if with_bias else None
    calls = []
    op = fused_linear._ONEDNN_LINEAR
    monkeypatch.setattr(fused_linear, "_ONEDNN_LINEAR", _Counting(op, calls))
    with torch.no_grad():
        fused, plain = twins(x, weight, bias, residual)
    assert calls == ["none", "gelu", "add"]  # every one took the fused kernel
    # Grad mode on with no operand requiring a gradient (a model run without torch.no_grad): the same.
    assert all(torch.equal(a, b) for a, b in zip(twins(x, weight, bias, residual)[0], fused))
    assert calls == ["none", "gelu", "add"] * 2
    for got, want, name in zip(fused, plain, ("linear", "linear_gelu", "linear_add")):
        assert got.shape == want.shape and got.dtype == torch.float32
        assert_close_rel(got, want, 1e-5, name)


@needs_onednn
def test_shapes_and_dtypes_beyond_the_op_take_the_torch_ops():
    """Broadcast residuals and biases, which F.linear and + accept and the oneDNN op cannot read, give
    the torch ops' results; mismatched widths and dtypes fail with torch's own errors."""
    x, weight, bias, residual = operands(seed=5)
    with torch.no_grad():
        for r in (residual[0], residual[:, :1], residual[0, 0]):  # (17, 40), (3, 1, 40), (40,)
            assert torch.equal(fused_linear.linear_add(x, weight, bias, r), r + F.linear(x, weight, bias))
        b = bias[:1]  # one value for every output
        assert torch.equal(fused_linear.linear(x, weight, b), F.linear(x, weight, b))
        assert torch.equal(fused_linear.linear_gelu(x, weight, b), F.gelu(F.linear(x, weight, b)))
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            fused_linear.linear(x[0, :, 1:].contiguous(), weight, bias)  # (17, 47) @ (47 != 48)
        with pytest.raises(RuntimeError, match="same dtype|expected scalar type"):
            fused_linear.linear_gelu(x, weight.double(), bias.double())
        # No input features (K = 0): the bias alone, which oneDNN has no primitive for.
        empty, no_weight = x[..., :0], weight[:, :0]
        assert torch.equal(fused_linear.linear(empty, no_weight, bias), F.linear(empty, no_weight, bias))
        assert torch.equal(fused_linear.linear_add(empty, no_weight, bias, residual), residual + bias)


@needs_onednn
def test_strided_biases_give_the_torch_results():
    """The oneDNN op reads its bias as dense, whatever its strides: a strided bias (a view, as
    load_state_dict(assign=True) or a hand-set Parameter keeps it) gave wrong numbers, an expanded one
    read past its storage. Such biases take the torch ops."""
    x, weight, _, residual = operands(seed=6)
    strided = torch.randn(80, generator=torch.Generator().manual_seed(7))[::2]
    with torch.no_grad():
        for b in (strided, strided[:1].expand(40)):
            fused, plain = twins(x, weight, b, residual)
            for got, want, name in zip(fused, plain, ("linear", "linear_gelu", "linear_add")):
                assert_close_rel(got, want, 1e-5, name)


@needs_onednn
@pytest.mark.parametrize("with_bias", [True, False])
def test_onednn_under_autograd_matches_torch(with_bias, monkeypatch):
    """Under autograd the forward and the input gradient run as oneDNN matmuls (no epilogue: GELU and the
    add stay torch ops, which autograd records): outputs and the gradients of x, weight, bias and
    residual as the torch ops give them, also a double backward (create_graph=True)."""
    x, weight, bias, residual = operands(seed=5)
    bias = bias if with_bias else None
    calls = []
    monkeypatch.setattr(fused_linear, "_ONEDNN_LINEAR", _Counting(fused_linear._ONEDNN_LINEAR, calls))
    leaves = [t.requires_grad_() for t in (x, weight, residual, bias) if t is not None]
    fused, plain = twins(x, weight, bias, residual)
    assert calls == ["none"] * 3  # every forward took the op
    gen = torch.Generator().manual_seed(6)
    for got, want, name in zip(fused, plain, ("linear", "linear_gelu", "linear_add")):
        assert_close_rel(got, want, 1e-5, name)
        g = torch.randn(got.shape, generator=gen)
        for a, b in zip(*(torch.autograd.grad(out, leaves, g, allow_unused=True) for out in (got, want))):
            assert (a is None) == (b is None)
            if a is not None:
                assert_close_rel(a, b, 1e-5, f"{name} gradient")
    assert calls.count("none") > 3  # the input gradients took it too
    second = []
    for out in (twins(x, weight, bias, residual)[0][1], plain_gelu(x, weight, bias)):
        # a gradient penalty: the norm of the input gradient, differentiated
        (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        second.append(torch.autograd.grad(gx.square().sum(), (x, weight)))
    for a, b in zip(*second):
        assert_close_rel(a, b, 1e-5, "double backward")


@needs_onednn
def test_onednn_under_autograd_saves_what_torch_saves():
    """Like F.linear, the op keeps x only for the weight gradient and the weight only for the input
    gradient: an inference tensor as x before a frozen weight and a trained bias, and an in-place change
    of x after the call (frozen weight) or of the weight (x without gradient), are no errors."""
    x, weight, bias, _ = operands(seed=7)
    with torch.inference_mode():
        frozen_x = x.clone()
    for f in (fused_linear.linear, F.linear):
        trained_bias = bias.clone().requires_grad_()
        f(frozen_x, weight, trained_bias).sum().backward()
        assert torch.equal(trained_bias.grad, torch.full_like(bias, 51.0))
    grads = []
    for f in (fused_linear.linear, F.linear):
        leaf = x.clone().requires_grad_()
        h = leaf * 1
        out = f(h, weight, bias)
        h.add_(1)
        out.sum().backward()
        trained_weight = weight.clone().requires_grad_()
        out = f(x, trained_weight, bias)
        with torch.no_grad():
            trained_weight.add_(1)
        out.sum().backward()
        grads.append((leaf.grad, trained_weight.grad))
    for a, b in zip(*grads):
        assert_close_rel(a, b, 1e-5, "gradient")


@pytest.mark.parametrize(
    "setting",
    ["float64", "autocast", "no-onednn"],
)
def test_torch_ops_where_onednn_does_not_apply(setting, monkeypatch):
    """In float64 (unsupported), under autocast (whose casts the op would bypass) and without oneDNN, the
    plain torch ops run, with or without autograd: gradients flow, dtypes are autocast's."""
    x, weight, bias, residual = operands(
        seed=2, dtype=torch.float64 if setting == "float64" else torch.float32
    )
    calls = []
    if fused_linear._ONEDNN_LINEAR is not None:
        monkeypatch.setattr(fused_linear, "_ONEDNN_LINEAR", _Counting(fused_linear._ONEDNN_LINEAR, calls))
    if setting == "no-onednn":
        monkeypatch.setattr(fused_linear, "_ONEDNN_LINEAR", None)
    x.requires_grad_()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting == "autocast")
    with autocast:
        with torch.no_grad():
            fused, plain = twins(x, weight, bias, residual)
        for got, want in zip(fused, plain):
            assert got.dtype == want.dtype and torch.equal(got, want)
        fused, plain = twins(x, weight, bias, residual)
    assert calls == []
    for got, want in zip(fused, plain):
        assert got.dtype == want.dtype and torch.equal(got, want)
    if setting != "autocast":
        residual.requires_grad_()
        sum(t.sum() for t in fused[:2]).backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        g = torch.randn(fused[2].shape, generator=torch.Generator().manual_seed(9))
        got = torch.autograd.grad(fused_linear.linear_add(x, weight, bias, residual), (x, residual), g)
        want = torch.autograd.grad(residual + F.linear(x, weight, bias), (x, residual), g)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])  # the residual's too


@needs_onednn
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # from mkldnn.flags()
def test_transforms_and_modes_see_the_torch_ops(monkeypatch):
    """Without autograd still, forward-mode AD (torch.func.jvp, and autograd.forward_ad, which no
    functorch check sees) and dispatch modes (FLOP counters, make_fx) must see the torch ops: the oneDNN
    op has no forward derivative (the tangent would be dropped, silently) and is no aten.linear to
    count. So must a run with oneDNN switched off."""
    x, weight, bias, residual = operands(seed=3)
    calls = []
    monkeypatch.setattr(fused_linear, "_ONEDNN_LINEAR", _Counting(fused_linear._ONEDNN_LINEAR, calls))
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for fn, expected in (
            (lambda t: fused_linear.linear(t, weight, bias), F.linear(tangent, weight)),
            (lambda t: fused_linear.linear_add(t, weight, bias, residual), F.linear(tangent, weight)),
        ):
            _, jvp = torch.func.jvp(fn, (x,), (tangent,))
            assert_close_rel(jvp, expected, 1e-5, "jvp tangent")
            with forward_ad.dual_level():  # plain forward-mode AD, no functorch transform active
                out = fn(forward_ad.make_dual(x, tangent))
                assert_close_rel(forward_ad.unpack_dual(out).tangent, expected, 1e-5, "forward_ad tangent")
        with FlopCounterMode(display=False) as counter:
            twins(x, weight, bias, residual)
        assert counter.get_total_flops() == 6 * 2 * x[..., 0].numel() * weight.numel()
        with torch.backends.mkldnn.flags(enabled=False):
            twins(x, weight, bias, residual)
    assert calls == []


@needs_onednn
def test_packed_weights_follow_every_change_of_their_weights():
    """The packed copy of a weight is reused while the weight is unchanged and rebuilt after every kind
    of write: in place through the version counter (optimizer steps, load_state_dict), behind it
    (`.data`: EMA updates, hand-written loaders; numpy aliases), and a new tensor under the same
    Parameter. A stack (the K and V projections) follows each of its parts."""
    x, weight, bias, _ = operands(seed=11)
    gen = torch.Generator().manual_seed(12)
    w = torch.nn.Parameter(weight.clone())
    k, v = (torch.nn.Parameter(torch.randn(n, 48, generator=gen) / 7) for n in (24, 16))
    b_kv = torch.randn(40, generator=gen)

    def check(what):
        assert_close_rel(fused_linear.linear(x, w, bias), F.linear(x, w, bias), 1e-5, what)
        stacked = F.linear(x, torch.cat([k, v]), b_kv)
        assert_close_rel(fused_linear.linear(x, (k, v), b_kv), stacked, 1e-5, what + " (stack)")

    with torch.no_grad():
        check("first call")
        packed = fused_linear._packed_of[w][1], fused_linear._packed_of[k][1]
        check("unchanged")
        assert (fused_linear._packed_of[w][1], fused_linear._packed_of[k][1]) == packed  # the same objects
        w.mul_(2), v.add_(0.5)
        check("in place")
        w.data.mul_(1.5), v.data.mul_(-1)
        check("through .data")
        w.detach().numpy()[:] = torch.randn(w.shape, generator=gen).numpy()
        k.detach().numpy()[:] *= 3
        check("through a numpy alias")
        w.data = torch.randn(w.shape, generator=gen)
        k.data = torch.randn(k.shape, generator=gen)
        check("a new tensor under the Parameter")


@needs_onednn
@pytest.mark.parametrize("optimizer", [torch.optim.AdamW, torch.optim.SGD])
def test_packed_weights_follow_fused_optimizer_steps(optimizer):
    """A fused optimizer step (fused=True) writes the weights without raising their version counters:
    the packed copy follows it through the sample (every element moves)."""
    x, weight, bias, _ = operands(seed=15)
    w = torch.nn.Parameter(weight.clone())
    opt = optimizer([w], lr=0.1, fused=True)
    with torch.no_grad():
        fused_linear.linear(x, w, bias)
    w.grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(16))
    version = w._version
    opt.step()
    assert w._version == version  # what the sample is there for
    with torch.no_grad():
        assert_close_rel(fused_linear.linear(x, w, bias), F.linear(x, w, bias), 1e-5, "after a fused step")


@needs_onednn
def test_packed_weights_of_inference_tensors():
    """Weights built under torch.inference_mode have no version counter: their packed copies follow
    them through the sample all the same."""
    x, weight, bias, _ = operands(seed=13)
    with torch.inference_mode():
        w = weight.clone()
        assert_close_rel(fused_linear.linear(x, w, bias), F.linear(x, w, bias), 1e-5, "first call")
        w.mul_(-2)
        assert_close_rel(fused_linear.linear(x, w, bias), F.linear(x, w, bias), 1e-5, "after a write")
    with torch.no_grad():  # and outside inference mode
        assert_close_rel(fused_linear.linear(x, w, bias), F.linear(x, w, bias), 1e-5, "no_grad")


@needs_onednn
def test_packed_weights_are_neither_pickled_nor_kept_past_a_cast():
    """Kept beside the weights, not on them: a pickle or deepcopy of a block carries none, and a cast
    or move drops them."""
    blk = CrossAttentionBlock(48, 4)
    x = torch.randn(2, 5, 48)
    size = len(pickle.dumps(blk))
    with torch.no_grad():
        fused_linear.linear(x, blk.attn.q_proj.weight, blk.attn.q_proj.bias)
        fused_linear.linear(x, (blk.attn.k_proj.weight, blk.attn.v_proj.weight), None)
    firsts = (blk.attn.q_proj.weight, blk.attn.k_proj.weight)
    assert all(p in fused_linear._packed_of for p in firsts)
    assert len(pickle.dumps(blk)) == size
    assert not any(p in fused_linear._packed_of for p in copy.deepcopy(blk).parameters())
    blk.double()
    assert not any(p in fused_linear._packed_of for p in firsts)


@needs_onednn
def test_packed_weights_are_not_kept_past_a_cast_of_part_of_a_block():
    """A cast or move of the block's attention or MLP alone (a model split between devices below the
    block) drops their packed copies too: kept, they would hold the old fp32 weights' memory, unused."""
    blk = CrossAttentionBlock(48, 4)
    x = torch.randn(2, 5, 48)
    attn, mlp = blk.attn, blk.mlp
    with torch.no_grad():
        fused_linear.linear(x, attn.q_proj.weight, attn.q_proj.bias)
        fused_linear.linear(x, (attn.k_proj.weight, attn.v_proj.weight), None)
        fused_linear.linear_gelu(x, mlp.fc1.weight, mlp.fc1.bias)
    mlp.half()
    assert mlp.fc1.weight not in fused_linear._packed_of
    assert attn.q_proj.weight in fused_linear._packed_of  # the rest of the block is untouched
    attn.double()
    assert not any(p in fused_linear._packed_of for p in (attn.q_proj.weight, attn.k_proj.weight))


@needs_onednn
def test_no_output_features_give_the_torch_results():
    """N = 0 (a weight with no rows, a stack of empty parts): F.linear gives an empty map; oneDNN has no
    primitive for it, and packing such a weight raised where the op given the plain weight had not."""
    x, weight, bias, residual = operands(seed=14)
    none, no_bias, empty = weight[:0], bias[:0], residual[..., :0]
    with torch.no_grad():
        assert torch.equal(fused_linear.linear(x, none, no_bias), F.linear(x, none, no_bias))
        assert torch.equal(fused_linear.linear(x, (none, none), None), F.linear(x, none))
        assert torch.equal(fused_linear.linear_gelu(x, none, no_bias), F.linear(x, none, no_bias))
        assert torch.equal(fused_linear.linear_add(x, none, no_bias, empty), empty)


class _Counting:
    """The oneDNN op, recording the epilogue of each call."""

    def __init__(self, op, calls: list):
        self.op, self.calls = op, calls

    def __call__(self, x, weight, bias, attr, scalars, algorithm):
        self.calls.append(attr)
        return self.op(x, weight, bias, attr, scalars, algorithm)

    def binary(self, x, other, weight, bias, attr):
        self.calls.append(attr)
        return self.op.binary(x, other, weight, bias, attr)
