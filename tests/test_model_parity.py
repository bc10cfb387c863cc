"""Every backend and schedule path against a float64 evaluation of the reference (shared doc section 8)."""

import copy
import sys

import pytest
import torch
from helpers import (
    GRAD_FP32_NOISE,
    LOSS_FIELDS,
    TOLERANCE,
    assert_close_rel,
    global_grad_error,
    images,
    linear_functional,
    param_grads,
    randomize_,
    rel_err,
    stylized_outputs,
    train_outputs,
)

from fastvit_style import StylizingViT, backends
from fastvit_style import model as fast_model
from fastvit_style.layers import Mlp, vgg19
from fastvit_style.reference import model as reference_model
from fastvit_style.reference.losses import Loss

FP32 = TOLERANCE[torch.float32]
CPU_BACKENDS = ["reference", "torch"]


def make_pair(backbone, train=False, **kw):
    """(float64 reference model, float32 copy) with the same random weights, whatever ran before."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        truth = randomize_(StylizingViT(backbone, train=train, backend="reference", **kw)).double()
    return truth, copy.deepcopy(truth).float()


def run(model, backend, x, x_style):
    model.backend = backend
    return model(x, x_style)


EVAL_CASES = [("tiny", 1, False), ("tiny", 1, True), ("tiny", 5, False), ("tiny", 5, True),
              ("small", 2, False), ("small", 2, True), ("base", 2, False), ("base", 1, True)]  # fmt: skip


@pytest.mark.parametrize("backbone,batch,rolled", EVAL_CASES)
def test_eval_output(backbone, batch, rolled):
    truth, model = make_pair(backbone)
    x = images(batch, seed=1)
    x_style = None if rolled else images(batch, seed=2)
    with torch.no_grad():
        expected = run(truth, "reference", x.double(), None if rolled else x_style.double())
        for backend in CPU_BACKENDS:
            assert_close_rel(run(model, backend, x, x_style), expected, FP32, backend)


def outputs(model, backend, x, x_style):
    """helpers.train_outputs of a train=True model, helpers.stylized_outputs of an eval one."""
    model.backend = backend
    return (train_outputs if model.training_mode else stylized_outputs)(model, x, x_style)


def grad_errors(grads, grads_ref):
    """Per-tensor max-norm relative errors; a tensor whose true gradient is ~0 (k_proj.bias: softmax
    cancels it exactly) is judged against the largest gradient instead of its own."""
    floor = 1e-3 * max(g.abs().max() for g in grads_ref.values())
    return {
        n: ((g - grads_ref[n]).abs().max() / max(grads_ref[n].abs().max(), floor)).item()
        for n, g in grads.items()
    }


def assert_exact(got, want):
    """float64 training outputs of the fast path against the reference's: every term, x_recon and
    every gradient."""
    (terms, recon, grads, _), (terms_ref, recon_ref, grads_ref, _) = got, want
    for name, term, term_ref in zip(LOSS_FIELDS, terms, terms_ref):
        assert_close_rel(term, term_ref, 1e-12, f"loss {name}")
    assert_close_rel(recon, recon_ref, 1e-12, "x_recon")
    worst = max(grad_errors(grads, grads_ref).items(), key=lambda kv: kv[1])
    assert worst[1] <= 1e-10, f"gradient of {worst[0]}: relative error {worst[1]:.3e}"


# Training parity at small inputs (32 px in float64, 64 px in float32): the VGG19 perceptual loss makes
# 224 px slow on 2 cores, and nothing in the schedule or the losses depends on the image side.
TRAIN_CASES = [("tiny", 1), ("tiny", 2), ("tiny", 5), ("small", 2), ("base", 2)]


@pytest.mark.parametrize("backbone,batch", TRAIN_CASES)
@pytest.mark.parametrize("rolled", [False, True], ids=["explicit-style", "roll"])
def test_training_float64_exact(backbone, batch, rolled):
    """In float64 the fast schedule must reproduce the reference's losses, x_recon and every gradient."""
    truth, _ = make_pair(backbone, train=True, input_size=32)
    fast = copy.deepcopy(truth)
    x = images(batch, size=32, seed=3, dtype=torch.float64)
    x_style = None if rolled else images(batch, size=32, seed=4, dtype=torch.float64)
    assert_exact(outputs(fast, "torch", x, x_style), outputs(truth, "reference", x, x_style))


@pytest.mark.parametrize("rolled", [False, True], ids=["explicit-style", "roll"])
def test_shallow_encoder_exact_in_float64(rolled):
    """Two layers, float64: an error in the first layer's streams reaches the output undamped. Through
    12 layers the re-anchors (A^{i+1} = f(X^{i+1}, Y^i) keeps X's residual) damp it below float32 noise:
    A^0 = S^0 instead of X^0 moves the tiny eval output by 8e-6 relative there, by 0.5 here. (Gradient
    errors are caught through 12 layers too: the training tests compare them in float64.)"""
    truth, _ = make_pair("tiny", input_size=32, encoder_depth=2)
    fast = copy.deepcopy(truth)
    x = images(3, size=32, seed=7, dtype=torch.float64)
    x_style = None if rolled else images(3, size=32, seed=8, dtype=torch.float64)
    (out, grads), (out_ref, grads_ref) = (
        outputs(fast, "torch", x, x_style),
        outputs(truth, "reference", x, x_style),
    )
    assert_close_rel(out, out_ref, 1e-12, "eval output")
    worst = max(grad_errors(grads, grads_ref).items(), key=lambda kv: kv[1])
    assert worst[1] <= 1e-10, f"gradient of {worst[0]}: relative error {worst[1]:.3e}"


@pytest.mark.parametrize(
    "dtype,autocast", [(torch.bfloat16, False), (torch.float16, False), (torch.float32, True)]
)
def test_loss_terms_have_the_official_dtypes(dtype, autocast):
    """A half model's terms are half, as officially (stacking them must work), although the fast
    statistics run in float32; under autocast all four are float32 on both paths."""
    model = StylizingViT("tiny", train=True, input_size=32, encoder_depth=1).to(dtype)
    model.vgg_encoder.warn_if_random = False
    x = images(2, size=32, seed=3, dtype=dtype)
    dtypes = {}
    for backend in CPU_BACKENDS:
        model.backend = backend
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            dtypes[backend] = [t.dtype for t in model(x)[0]]
    assert dtypes["torch"] == dtypes["reference"] == [torch.float32 if autocast else dtype] * 4


def test_torch_func_grad_of_the_training_objective():
    """torch.func.grad over functional_call (per-sample gradients, meta-learning): the fast losses give
    way to plain ops where the transforms cannot run theirs, with the reference's numbers (float64)."""
    from torch.func import functional_call, grad

    truth, _ = make_pair("tiny", train=True, input_size=32, encoder_depth=2)
    fast = copy.deepcopy(truth)
    fast.backend = "torch"
    params = {n: p.detach() for n, p in truth.named_parameters() if p.requires_grad}
    x = images(2, size=32, seed=3, dtype=torch.float64)

    def objective(model):
        return lambda p: functional_call(model, p, (x,))[0].total()

    assert global_grad_error(grad(objective(fast))(params), grad(objective(truth))(params)) <= 1e-12


@pytest.mark.parametrize("train", [False, True], ids=["eval", "training"])
def test_torch_func_jvp_over_the_parameters(train):
    """Forward-mode AD (torch.func.jvp over functional_call, and dual tensors): the torch backend's
    attention carries the tangents through SDPA's math kernel, with the reference's numbers (float64)."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call, jvp

    truth, _ = make_pair("tiny", train=train, input_size=32, encoder_depth=2)
    fast = copy.deepcopy(truth)
    fast.backend = "torch"
    params = {n: p.detach() for n, p in truth.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(4)
    tangents = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}
    x = images(2, size=32, seed=3, dtype=torch.float64)

    def outputs(model):
        def run(p):
            out = functional_call(model, p, (x,))
            return torch.stack(list(out[0])) if train else out  # the four loss terms, or the image

        return run

    (value, tangent), (expected_value, expected) = (
        jvp(outputs(m), (params,), (tangents,)) for m in (fast, truth)
    )
    assert rel_err(value, expected_value) <= 1e-12 and rel_err(tangent, expected) <= 1e-12
    # Dual tensors too, which no torch.func transform announces: in training the fast losses' VGG19
    # (Winograd at its 512-channel convs) and statistics run their plain ops, their Functions having no
    # forward derivative.
    with fwAD.dual_level():
        dual = {n: fwAD.make_dual(p, tangents[n]) for n, p in params.items()}
        value, tangent = fwAD.unpack_dual(outputs(fast)(dual))
    assert rel_err(value, expected_value) <= 1e-12 and rel_err(tangent, expected) <= 1e-12


@pytest.mark.parametrize("rolled", [False, True], ids=["explicit-style", "roll"])
def test_training_float64_nchw_vgg(rolled, monkeypatch):
    """The fast losses run VGG19 on channels-last maps (the default of the other tests); NCHW maps,
    which compiled graphs may choose, reach the per-channel statistics and their hand-written backward
    with other strides, and the numbers must not move."""
    monkeypatch.setattr(vgg19, "use_channels_last", lambda x: False)
    truth, _ = make_pair("tiny", train=True, input_size=32)
    fast = copy.deepcopy(truth)
    x = images(2, size=32, seed=3, dtype=torch.float64)
    assert fast.vgg_encoder(x, fast=True)[0].is_contiguous()  # Winograd's deep maps are NHWC either way
    x_style = None if rolled else images(2, size=32, seed=4, dtype=torch.float64)
    assert_exact(outputs(fast, "torch", x, x_style), outputs(truth, "reference", x, x_style))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("rolled", [False, True], ids=["explicit-style", "roll"])
def test_schedule_skips_what_no_output_reads(train, rolled, monkeypatch):
    """The attention calls of the fast schedule (shared doc 1.4, 3.6), as (query sequences, query rows):
    per layer but the last, one batched call over [X; S; A] ([X; A] when the style is the roll) and the
    re-anchor over A; in the last, patch rows only, and in eval only the stylized queries. Computing
    what is skipped (the style stream of the roll, the last layer's content in eval) changes no number,
    only the cost, so only this sees it."""
    shapes = []

    def recording(q, k, v, kv_index, **kw):
        shapes.append(tuple(q.shape[:2]))
        return attention(q, k, v, kv_index, **kw)

    attention = backends.shared_attention
    monkeypatch.setattr(backends, "shared_attention", recording)
    B, D, T = 3, 3, 5  # input_size 32: 4 patches + CLS
    model = StylizingViT("tiny", train=train, backend="torch", input_size=32, encoder_depth=D)
    x = images(B, size=32, seed=5)
    with torch.no_grad():
        model(x, None if rolled else images(B, size=32, seed=6))
    streams = 2 if rolled else 3  # [X; A] or [X; S; A]
    last = (streams * B if train else B, T - 1)
    assert shapes == [(streams * B, T), (B, T)] * (D - 1) + [last]


@pytest.mark.parametrize("rolled", [False, True], ids=["explicit-style", "roll"])
def test_training_roll_skips_the_style_recon_and_two_vgg_passes(rolled, monkeypatch):
    """Shared doc 3.6: with the rolled style the training forward reconstructs 2 image batches, not 3
    (x_style_recon = roll(x_recon)), and runs VGG19 on 3 batches, not 5 (phi(x_style) = roll(phi(x)),
    phi(x_style_recon) = roll(phi(x_recon))); with an explicit style all of them run. The numbers would
    be the same either way (test_training_float64_exact), so only counting the calls sees it."""
    vgg_images, head_rows = [], []
    vgg_forward, mlp_forward = vgg19.VGG19Features.forward, Mlp.forward

    def counting_vgg(self, x, *args, **kw):
        vgg_images.append(x.shape[0])
        return vgg_forward(self, x, *args, **kw)

    def counting_mlp(self, x):
        head_rows.append(x.shape[0])  # the bottleneck is the only Mlp the fast path calls as a module
        return mlp_forward(self, x)

    monkeypatch.setattr(vgg19.VGG19Features, "forward", counting_vgg)
    monkeypatch.setattr(Mlp, "forward", counting_mlp)
    B = 3
    model = StylizingViT("tiny", train=True, backend="torch", input_size=32, encoder_depth=2)
    model.vgg_encoder.warn_if_random = False
    with torch.no_grad():
        model(images(B, size=32, seed=5), None if rolled else images(B, size=32, seed=6))
    assert vgg_images == [B] * (3 if rolled else 5)
    assert head_rows == [(2 if rolled else 3) * B]


def test_key_bias_is_skipped_in_compute_and_kept_in_the_state_dict():
    """The k_proj bias adds q.b_k, constant along the keys, which softmax cancels (shared doc 1.3): the
    fast path leaves it out of its numbers (a huge one changes no bit of the output, where the
    reference's float32 logits lose digits to it), and it stays in the state_dict as it was loaded."""
    model = randomize_(StylizingViT("tiny", backend="torch", input_size=32, encoder_depth=2))
    x = images(2, size=32, seed=13)
    with torch.no_grad():
        before = model(x)
        for blk in model.encoder.blocks:
            blk.attn.k_proj.bias.fill_(1e4)
        after = model(x)
    assert torch.equal(after, before)
    keys = model.state_dict()
    assert all(
        torch.equal(keys[f"encoder.blocks.{i}.attn.k_proj.bias"], torch.full((192,), 1e4)) for i in (0, 1)
    )


def training_stylized_grads(model, backend, x, x_style):
    """Gradients of a linear functional of the training forward's x_stylized, which only the VGG terms
    read: the losses are stubbed out (no VGG), the stylized stream's backward is what runs."""
    stylized = []

    def capture(vgg, x, x_style, x_stylized, *recons):
        stylized.append(x_stylized)
        return Loss(*(x_stylized.sum() * 0,) * 4)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fast_model, "compute_loss", capture)
        patch.setattr(reference_model, "compute_loss", capture)
        model.backend = backend
        model(x, x_style)
    return param_grads(model, linear_functional(stylized[0]))


def check_float32(truth, model, backend, x, x_style):
    """Training and eval of a float32 model on `backend` against its float64 twin `truth` on the
    reference: losses, x_recon, the eval output and the well-conditioned gradients within 1e-5, the
    whole objective's gradient within GRAD_FP32_NOISE (see helpers)."""
    x64 = (x.double(), None if x_style is None else x_style.double())
    terms_ref, recon_ref, total_ref, identity_ref = outputs(truth, "reference", *x64)
    terms, recon, total, identity = outputs(model, backend, x, x_style)
    for name, term, term_ref in zip(LOSS_FIELDS, terms, terms_ref):
        assert_close_rel(term, term_ref, FP32, f"{backend} loss {name}")
    assert_close_rel(recon, recon_ref, FP32, f"{backend} x_recon")
    assert global_grad_error(identity, identity_ref) <= FP32, f"{backend}: identity-term gradient"
    stylized_ref = training_stylized_grads(truth, "reference", *x64)
    stylized = training_stylized_grads(model, backend, x, x_style)
    assert global_grad_error(stylized, stylized_ref) <= FP32, f"{backend}: training x_stylized gradient"
    err = global_grad_error(total, total_ref)
    assert err <= GRAD_FP32_NOISE, f"{backend}: gradient of the objective, error {err:.3e}"
    truth.training_mode = model.training_mode = False  # the same weights, eval forward
    out_ref, grads_ref = outputs(truth, "reference", *x64)
    out, grads = outputs(model, backend, x, x_style)
    assert_close_rel(out, out_ref, FP32, f"{backend} eval output")
    assert global_grad_error(grads, grads_ref) <= FP32, f"{backend}: stylized-output gradient"
    truth.training_mode = model.training_mode = True


@pytest.mark.parametrize("backbone,batch", [("tiny", 2), ("small", 2)])
@pytest.mark.parametrize("rolled", [False, True], ids=["explicit-style", "roll"])
def test_training_float32(backbone, batch, rolled):
    """float32 against float64 at 64 px, every CPU backend (the bounds: helpers.GRAD_FP32_NOISE)."""
    truth, model = make_pair(backbone, train=True, input_size=64)
    x = images(batch, size=64, seed=3)
    x_style = None if rolled else images(batch, size=64, seed=4)
    for backend in CPU_BACKENDS:
        check_float32(truth, model, backend, x, x_style)


@pytest.mark.interpret
@pytest.mark.parametrize("one_launch", [None, 0], ids=["bwd_two_launches", "bwd_one_launch"])
@pytest.mark.parametrize("rolled", [False, True], ids=["explicit-style", "roll"])
def test_triton_backend_through_interpreter(rolled, one_launch, monkeypatch):
    """The model on backend='triton' (kernels run by the Triton interpreter on CPU), with either
    attention backward (`_common.ONE_LAUNCH_BACKWARD_MIN_PROGRAMS`)."""
    from fastvit_style.kernels import _common

    monkeypatch.setattr(_common, "ONE_LAUNCH_BACKWARD_MIN_PROGRAMS", one_launch)
    check_small_model("triton", rolled)


@pytest.mark.parametrize("rolled", [False, True], ids=["explicit-style", "roll"])
def test_xformers_backend_wiring(rolled, fake_xformers, monkeypatch):
    """The model on backend='xformers', with the CPU stand-in of memory_efficient_attention, which it
    must reach (the numbers alone would pass on any backend's op)."""
    ops, calls = sys.modules["xformers.ops"], []
    stand_in = ops.memory_efficient_attention
    monkeypatch.setattr(
        ops, "memory_efficient_attention", lambda *a, **kw: calls.append(1) or stand_in(*a, **kw)
    )
    check_small_model("xformers", rolled)
    assert calls, "backend='xformers' never called memory_efficient_attention"


def check_small_model(backend, rolled, backbone="tiny", batch=2):
    """check_float32 on `backend`; a small config keeps the Triton interpreter's per-program cost
    affordable."""
    truth, model = make_pair(backbone, train=True, input_size=32, encoder_depth=2)
    x = images(batch, size=32, seed=7)
    x_style = None if rolled else images(batch, size=32, seed=8)
    check_float32(truth, model, backend, x, x_style)


# The batch sizes and width the tests above leave out for the fused backends: batch 1 (the rolled
# style is the image itself: one K/V sequence read by every query stream), an odd batch of 5, small.
OTHER_SHAPES = [("tiny", 1, True), ("tiny", 5, True), ("tiny", 5, False), ("small", 2, True)]


@pytest.mark.interpret
@pytest.mark.parametrize("backbone,batch,rolled", OTHER_SHAPES)
def test_triton_backend_other_shapes(backbone, batch, rolled):
    check_small_model("triton", rolled, backbone, batch)


@pytest.mark.parametrize("backbone,batch,rolled", OTHER_SHAPES)
def test_xformers_backend_other_shapes(backbone, batch, rolled, fake_xformers):
    check_small_model("xformers", rolled, backbone, batch)


def relaid(t: torch.Tensor) -> torch.Tensor:
    """t's values in a layout no layer is written for: the last two dims transposed in memory, a 1-D
    tensor every other element of a wider buffer."""
    if t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if t.dim() == 1:
        wide = torch.zeros(2 * t.numel(), dtype=t.dtype)
        wide[::2] = t
        return wide[::2]
    return t.clone()


@pytest.mark.parametrize("rolled", [False, True], ids=["explicit-style", "roll"])
def test_parameters_in_any_layout(rolled):
    """Weights loaded with load_state_dict(assign=True) keep the layout they come in: every fast path
    (oneDNN's fused linear in no_grad eval, Winograd's cached transforms, the joined K/V projection)
    must read them by their strides, in eval and in training (the fused linear once read a strided
    bias as dense)."""
    truth, model = make_pair("tiny", train=True, input_size=32, encoder_depth=2)
    model.load_state_dict({k: relaid(v) for k, v in model.state_dict().items()}, assign=True)
    assert not model.encoder.blocks[0].mlp.fc1.bias.is_contiguous()
    assert not model.vgg_encoder.features_28.weight.is_contiguous()
    x = images(2, size=32, seed=9)
    x_style = None if rolled else images(2, size=32, seed=10)
    check_float32(truth, model, "torch", x, x_style)
    truth.training_mode = model.training_mode = False
    with torch.no_grad():
        expected = run(truth, "reference", x.double(), None if rolled else x_style.double())
        assert_close_rel(run(model, "torch", x, x_style), expected, FP32, "no_grad eval")


INPUT_LAYOUTS = {
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "crop_view": lambda x: torch.nn.functional.pad(x, (3, 1, 2, 2))[..., 2:-2, 3:-1],  # offset, wide rows
    "expanded": lambda x: x[:1].expand_as(x),  # one image seen B times, stride 0 on the batch
}


@pytest.mark.parametrize("layout", INPUT_LAYOUTS)
def test_inputs_in_any_layout(layout):
    """Images in any layout (channels-last batches, crops that are views, an expanded batch) give what
    their contiguous copies give: eval with either style, the training losses and x_recon, and a style
    bank's stylization."""
    from fastvit_style.style_bank import StyleBank
    from fastvit_style.tta import stylize

    _, model = make_pair("tiny", train=True, input_size=32, encoder_depth=2)
    x, x_style = (INPUT_LAYOUTS[layout](images(3, size=32, seed=s)) for s in (11, 12))
    assert not x.is_contiguous()
    dense = lambda t: t.contiguous()
    model.backend = "torch"
    with torch.no_grad():
        loss, recon = model(x)
        loss_ref, recon_ref = model(dense(x))
        for name in LOSS_FIELDS:
            assert_close_rel(getattr(loss, name), getattr(loss_ref, name), FP32, f"loss {name}")
        assert_close_rel(recon, recon_ref, FP32, "x_recon")
        model.training_mode = False
        for style in (x_style, None):
            got = model(x, style)
            assert_close_rel(got, model(dense(x), None if style is None else dense(style)), FP32, "eval")
        bank = StyleBank.from_images(model, x_style)
        expected = stylize(model, dense(x), StyleBank.from_images(model, dense(x_style)))
        assert_close_rel(stylize(model, x, bank), expected, FP32, "style bank")


def test_eval_follows_changed_weights():
    """CPU eval keeps oneDNN-packed copies of the block weights between calls (layers/fused_linear):
    after the weights change, by an optimizer-like step, load_state_dict or behind the version
    counters (`.data`), the next call computes with the new ones."""
    truth, model = make_pair("tiny", input_size=32, encoder_depth=2)
    x = images(2, size=32, seed=11)

    def check(what):
        with torch.no_grad():
            expected = run(truth, "reference", x.double(), None)
            assert_close_rel(run(model, "torch", x, None), expected, FP32, what)

    check("first call")
    randomize_(truth, seed=1)
    with torch.no_grad():
        for p_truth, p in zip(truth.parameters(), model.parameters()):
            p.copy_(p_truth)
    check("after in-place writes")
    truth.load_state_dict(randomize_(copy.deepcopy(truth), seed=2).state_dict())
    model.load_state_dict(truth.state_dict())
    check("after load_state_dict")
    for p_truth, p in zip(truth.parameters(), model.parameters()):
        p_truth.data.mul_(-1)
        p.data.mul_(-1)
    check("after writes through .data")
