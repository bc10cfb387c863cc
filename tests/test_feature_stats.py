"""feature_stats (hand-written backward in eager mode, the official ops when compiled) against the
official ops of reference.losses."""

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCE, assert_close_rel

from fastvit_style.feature_stats import VAR_EPS, channel_stats, normalized_mse, normalized_stats
from fastvit_style.reference.losses import channel_mean_std, normalized


def feature_maps(shape, dtype, seed=0):
    """ReLU-like maps with some channels constant (var 0: clamped) and some tiny (var just under eps)."""
    gen = torch.Generator().manual_seed(seed)
    feat = torch.randn(shape, generator=gen, dtype=torch.float64).relu() * 3 + 0.5
    feat[0, 1] = 2.0  # clamped: var 0
    feat[-1, 0] = 1.0 + torch.randn(shape[2:], generator=gen, dtype=torch.float64) * (0.5 * VAR_EPS) ** 0.5
    return feat.to(dtype)


def reference_terms(feat, target, w_mean, w_std):
    mean, std = channel_mean_std(feat)
    return F.mse_loss(normalized(feat), target), (mean * w_mean).sum(), (std * w_std).sum()


def fast_terms(feat, target, w_mean, w_std):
    loss, mean, std = normalized_mse(feat, target)
    return loss, (mean * w_mean).sum(), (std * w_std).sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 4, 1, 1), (1, 2, 16, 16)])
def test_values_and_gradient_match_official_ops(shape, dtype):
    feat = feature_maps(shape, dtype)
    target = normalized(feature_maps(shape, dtype, seed=1))
    gen = torch.Generator().manual_seed(2)
    w_mean, w_std = (torch.randn(shape[:2], generator=gen, dtype=dtype) for _ in range(2))
    grads = []
    for terms in (reference_terms, fast_terms):
        f = feat.clone().requires_grad_()
        out = terms(f, target, w_mean, w_std)
        (3.0 * out[0] + out[1] + out[2]).backward()  # every output carries gradient
        grads.append((out, f.grad))
    (ref, ref_grad), (fast, fast_grad) = grads
    tol = TOLERANCE[dtype]
    for name, a, e in zip(("loss", "mean term", "std term"), fast, ref):
        assert_close_rel(a, e, tol, name)
    assert_close_rel(fast_grad, ref_grad, tol, "d feat")


def test_gradcheck_float64():
    feat = feature_maps((2, 3, 4, 5), torch.float64).requires_grad_()
    target = normalized(feature_maps((2, 3, 4, 5), torch.float64, seed=1))
    assert torch.autograd.gradcheck(lambda f: normalized_mse(f, target), (feat,))


def test_half_inputs_keep_float32_statistics():
    feat = feature_maps((2, 3, 8, 8), torch.float32).bfloat16()
    target = normalized(feature_maps((2, 3, 8, 8), torch.float64, seed=1))
    loss, mean, std = normalized_mse(feat.requires_grad_(), target.float())
    assert loss.dtype == mean.dtype == std.dtype == torch.float32
    # float32 statistics of the bf16 values: float32 accuracy, not bf16 accuracy
    expected = reference_terms(feat.double(), target, torch.ones(2, 3), torch.ones(2, 3))
    for name, a, e in zip(("loss", "mean", "std"), (loss, mean.sum(), std.sum()), expected):
        assert_close_rel(a, e, TOLERANCE[torch.float32], name)
    loss.backward()
    assert feat.grad.dtype == torch.bfloat16


def test_channel_stats_matches_official():
    feat = feature_maps((2, 5, 6, 6), torch.float64)
    y, mean, std, var = channel_stats(feat)
    ref_mean, ref_std = channel_mean_std(feat)
    assert_close_rel(y.view(feat.shape), normalized(feat), 1e-12, "normalized")
    assert_close_rel(mean, ref_mean, 1e-12, "mean")
    assert_close_rel(std, ref_std, 1e-12, "std")
    assert_close_rel(var, feat.flatten(2).var(dim=2, unbiased=False), 1e-12, "var")


def test_normalized_stats_matches_official():
    feat = feature_maps((2, 5, 6, 6), torch.float64)
    y, mean, std = normalized_stats(feat)
    assert y.shape == feat.shape
    for name, a, e in zip(
        ("normalized", "mean", "std"), (y, mean, std), (normalized(feat), *channel_mean_std(feat))
    ):
        assert_close_rel(a, e, 1e-12, name)


def test_compiled_graphs_take_the_official_ops(monkeypatch):
    """Under torch.compile both entry points trace the official ops (see the module's docstring): same
    values and gradient as eager, and neither channel_stats nor the autograd Function in the graph."""
    from fastvit_style import feature_stats

    feat = feature_maps((2, 3, 5, 7), torch.float64)
    target = normalized(feature_maps((2, 3, 5, 7), torch.float64, seed=1))

    def terms(f):
        loss, mean, std = normalized_mse(f, target)
        y, mean_t, std_t = normalized_stats(f.detach())
        return 3.0 * loss + mean.sum() + std.sum() + y.sum() + mean_t.sum() + std_t.sum()

    def value_and_grad(fn):
        f = feat.clone().requires_grad_()
        value = fn(f)
        value.backward()
        return value, f.grad

    value, grad = value_and_grad(terms)
    monkeypatch.setattr(feature_stats, "channel_stats", None)  # the compiled path must not reach it
    value_c, grad_c = value_and_grad(torch.compile(terms, backend="aot_eager", fullgraph=True))
    assert_close_rel(value_c, value, 1e-12, "value")
    assert_close_rel(grad_c, grad, 1e-12, "d feat")


def test_torch_func_transforms_take_the_official_ops():
    """torch.func.grad and vmap cannot run the autograd Function (no setup_context): the official ops
    run under them, with the same values and gradient."""
    feat = feature_maps((2, 3, 5, 7), torch.float64)
    target = normalized(feature_maps((2, 3, 5, 7), torch.float64, seed=1))

    def objective(f):
        loss, mean, std = normalized_mse(f, target)
        return 3.0 * loss + mean.sum() + std.sum()

    f = feat.clone().requires_grad_()
    objective(f).backward()
    assert_close_rel(torch.func.grad(objective)(feat), f.grad, 1e-12, "grad")
    per_sample = torch.func.vmap(lambda f, t: normalized_mse(f[None], t[None])[0])(feat, target)
    expected = torch.stack([normalized_mse(feat[i : i + 1], target[i : i + 1])[0] for i in range(2)])
    assert_close_rel(per_sample, expected, 1e-12, "vmap")


def test_create_graph_is_refused_clearly():
    """The fused backward records no graph: create_graph=True gets an error that says so, never a
    gradient silently left out of a higher-order one."""
    feat = feature_maps((2, 3, 4, 5), torch.float64).requires_grad_()
    target = normalized(feature_maps((2, 3, 4, 5), torch.float64, seed=1))
    loss = normalized_mse(feat, target)[0]
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(loss, feat, create_graph=True)
