"""torch.compile(fullgraph=True) on CPU with the torch backend: eval and a training step, equal to eager."""

import copy

import pytest
import torch
from helpers import images, randomize_

from fastvit_style import StylizingViT

CFG = dict(input_size=32, encoder_depth=2)
# fullgraph=True is what proves there is no graph break; inductor's CPU code generation costs minutes
# on 2 cores, so only one case runs it and the others stop at AOT autograd (same captured graphs).
CASES = [("inductor", True), ("aot_eager", False)]


@pytest.mark.parametrize("compiler,rolled", CASES, ids=["inductor-roll", "aot_eager-explicit-style"])
def test_compiled_eval_matches_eager(compiler, rolled):
    model = randomize_(StylizingViT("tiny", backend="torch", **CFG)).eval()
    x, x_style = images(2, 32, seed=1), None if rolled else images(2, 32, seed=2)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, x_style), model(x, x_style), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_training_step_matches_eager(compiler):
    # float64: eager runs the deep VGG convs by Winograd, the compiled graph by direct convolution, and
    # float32 gradients through 16 ReLU masks differ by more than 1e-5 between any two conv algorithms.
    model = randomize_(StylizingViT("tiny", train=True, backend="torch", **CFG)).double()
    twin = copy.deepcopy(model)
    x = images(2, 32, seed=3, dtype=torch.float64)

    def step(m):
        loss, recon = m(x)
        loss.total().backward()
        return torch.stack(list(loss)), recon

    # inductor too: its layout optimization once got the loss gradients wrong where aot_eager did not
    # (see feature_stats.py)
    compiled = torch.compile(twin, fullgraph=True, backend=compiler)
    terms, recon = step(compiled)
    terms_ref, recon_ref = step(model)
    torch.testing.assert_close(terms, terms_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(recon, recon_ref, rtol=1e-10, atol=1e-12)
    grads = [
        (p.grad, p_ref.grad)
        for p, p_ref in zip(twin.parameters(), model.parameters())
        if p_ref.grad is not None
    ]
    diff = torch.cat([(g - g_ref).flatten() for g, g_ref in grads]).norm()
    assert diff <= 1e-10 * torch.cat([g_ref.flatten() for _, g_ref in grads]).norm()
