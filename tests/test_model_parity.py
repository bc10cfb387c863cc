"""Every backend and schedule path against a float64 evaluation of the reference (shared doc section 8)."""

import copy

import pytest
import torch
from helpers import TOLERANCE, assert_close_rel, images, randomize_

from fastvit_style import StylizingViT
from fastvit_style.configs import LOSS_WEIGHTS

FP32 = TOLERANCE[torch.float32]
CPU_BACKENDS = ["reference", "torch"]


def make_pair(backbone, train=False, **kw):
    """(float64 reference model, float32 copy) with the same random weights."""
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


def loss_outputs(model, backend, x, x_style, weights=LOSS_WEIGHTS):
    """Loss terms, x_recon and every trainable parameter's gradient of the weighted loss."""
    model.zero_grad(set_to_none=True)
    loss, x_recon = run(model, backend, x, x_style)
    loss.total(weights).backward()
    grads = {
        n: p.grad if p.grad is not None else torch.zeros_like(p)
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    return loss, x_recon.detach(), grads


def grad_errors(grads, grads_ref):
    """Per-tensor max-norm relative errors; a tensor whose true gradient is ~0 (k_proj.bias: softmax
    cancels it exactly) is judged against the largest gradient instead of its own."""
    floor = 1e-3 * max(g.abs().max() for g in grads_ref.values())
    return {
        n: ((g.double() - grads_ref[n]).abs().max() / max(grads_ref[n].abs().max(), floor)).item()
        for n, g in grads.items()
    }


def global_grad_error(grads, grads_ref) -> float:
    diff = torch.cat([(g.double() - grads_ref[n]).flatten() for n, g in grads.items()])
    return (diff.norm() / torch.cat([g.flatten() for g in grads_ref.values()]).norm()).item()


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
    loss_ref, recon_ref, grads_ref = loss_outputs(truth, "reference", x, x_style)
    loss, recon, grads = loss_outputs(fast, "torch", x, x_style)
    for name, term, term_ref in zip(loss._fields, loss, loss_ref):
        assert_close_rel(term, term_ref, 1e-12, f"loss {name}")
    assert_close_rel(recon, recon_ref, 1e-12, "x_recon")
    worst = max(grad_errors(grads, grads_ref).items(), key=lambda kv: kv[1])
    assert worst[1] <= 1e-10, f"gradient of {worst[0]}: relative error {worst[1]:.3e}"


@pytest.mark.parametrize("backbone,batch", [("tiny", 2), ("small", 2)])
@pytest.mark.parametrize("rolled", [False, True], ids=["explicit-style", "roll"])
def test_training_float32(backbone, batch, rolled):
    """float32 against float64: losses and x_recon within 1e-5. Gradients of the perceptual losses go
    back through 16 ReLU layers whose masks flip under float32 rounding, so even the official
    computation in float32 misses its float64 gradients by up to ~1e-3; the fast path must do as well
    as the float32 reference (within 1e-5, or 1.5x the reference's own float32 error)."""
    truth, model = make_pair(backbone, train=True, input_size=64)
    x = images(batch, size=64, seed=3)
    x_style = None if rolled else images(batch, size=64, seed=4)
    loss_ref, recon_ref, grads_ref = loss_outputs(
        truth, "reference", x.double(), None if rolled else x_style.double()
    )
    errors = {}
    for backend in CPU_BACKENDS:
        loss, recon, grads = loss_outputs(model, backend, x, x_style)
        for name, term, term_ref in zip(loss._fields, loss, loss_ref):
            assert_close_rel(term, term_ref, FP32, f"{backend} loss {name}")
        assert_close_rel(recon, recon_ref, FP32, f"{backend} x_recon")
        errors[backend] = global_grad_error(grads, grads_ref)
    assert errors["torch"] <= max(FP32, 1.5 * errors["reference"]), errors


@pytest.mark.interpret
@pytest.mark.parametrize("rolled", [False, True], ids=["explicit-style", "roll"])
def test_triton_backend_through_interpreter(rolled):
    """The model on backend='triton' (kernels run by the Triton interpreter on CPU)."""
    check_small_model("triton", rolled)


@pytest.mark.parametrize("rolled", [False, True], ids=["explicit-style", "roll"])
def test_xformers_backend_wiring(rolled, fake_xformers):
    """The model on backend='xformers', with the CPU stand-in of memory_efficient_attention."""
    check_small_model("xformers", rolled)


def check_small_model(backend, rolled):
    """Eval and training on `backend` against float64; a small config keeps the Triton interpreter's
    per-program cost affordable. Gradients are checked at 1e-5 through the identity loss, which
    reaches every encoder weight through every attention call without the ReLU-mask noise of the VGG
    terms (see test_training_float32)."""
    truth, model = make_pair("tiny", train=True, input_size=32, encoder_depth=2)
    x = images(2, size=32, seed=7)
    x_style = None if rolled else images(2, size=32, seed=8)
    x64 = (x.double(), None if rolled else x_style.double())
    loss_ref, recon_ref, grads_ref = loss_outputs(truth, "reference", *x64, weights=(1, 0, 0, 0))
    loss, recon, grads = loss_outputs(model, backend, x, x_style, weights=(1, 0, 0, 0))
    for name, term, term_ref in zip(loss._fields, loss, loss_ref):
        assert_close_rel(term, term_ref, FP32, f"loss {name}")
    assert_close_rel(recon, recon_ref, FP32, "x_recon")
    assert global_grad_error(grads, grads_ref) <= FP32
    truth.training_mode = model.training_mode = False  # the same weights, eval forward
    with torch.no_grad():
        expected = run(truth, "reference", *x64)
        assert_close_rel(run(model, backend, x, x_style), expected, FP32, "eval output")
