"""Per-channel statistics of the perceptual losses, with a hand-written backward.

The anatomical and style losses normalize every VGG level per (sample, channel) and compare it
with a target: (f - mu) / sigma with sigma = sqrt(clamp(biased var, 1e-5)) (shared doc 3.3). As
plain autograd ops that is about a dozen full passes over each feature map, forward and backward,
each allocating a map-sized tensor. `normalized_mse` computes the same numbers with three map-sized
tensors forward and two backward; its twin is `reference.losses` (`normalized`, `channel_mean_std`, mse),
which tests compare it against.

This is an eager-mode saving. Under torch.compile both entry points (`normalized_stats`,
`normalized_mse`) run the twin's ops, which inductor fuses by itself: with these reductions over
flattened VGG maps in the graph, inductor's layout optimization (channels_last for conv graphs; torch
2.13, CPU) got the consistency loss's gradient wrong by 60% in float64, while eager, aot_eager and
inductor with `torch._inductor.config.layout_optimization = False` were exact. tests/test_compile.py
guards it.
"""

import torch
import torch.nn.functional as F

from .reference.losses import channel_mean_std, normalized
from .tracing import forward_ad_active, traced

VAR_EPS = 1e-5  # the official clamp on the variance


def widen_half(t: torch.Tensor) -> torch.Tensor:
    """t in float32 where it is fp16 or bf16, else t itself: the statistics of half maps accumulate and are
    kept in float32 (in fp16 a std above 256 has an inf variance)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def normalized_stats(feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """feat (B, C, H, W) -> normalized (B, C, H, W), mean (B, C), std (B, C), for maps that need no
    gradient (the losses' targets); float32 for half inputs, else feat's dtype."""
    if torch.compiler.is_compiling():
        return _official_stats(feat)
    y, mean, std, _ = channel_stats(feat)
    return y.view(feat.shape), mean, std


def _official_stats(feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The twin's ops, differentiable: what compiled graphs run (see the module docstring); on float32
    maps for half ones, as `channel_stats`."""
    feat = widen_half(feat)
    mean, std = channel_mean_std(feat)
    return normalized(feat), mean, std


def channel_stats(feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """feat (B, C, H, W) -> normalized (B, C, H*W), mean, std, biased var (B, C); all float32 or wider.

    The variance is taken of the centred values (two passes), as accurate as torch.var.
    """
    f = widen_half(feat.flatten(2))
    mean = f.mean(dim=2)
    centred = f - mean[..., None]
    var = _channel_dot(centred, centred) / f.shape[2]
    std = var.clamp(min=VAR_EPS).sqrt()
    return centred.div_(std[..., None]), mean, std, var


def _channel_dot(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, N) x2 -> (B, C) per-channel dot products, summed by torch's cascade reduction: BLAS dots
    and vector_norm accumulate too sequentially to keep 1e-5 on maps of 50k elements."""
    return torch.mul(a, b, out=out).sum(dim=2)


class _NormalizedMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat, target):
        target = target.flatten(2)
        y, mean, std, var = channel_stats(feat)
        diff = y - target
        loss = diff.square_().sum() / diff.numel()
        ctx.save_for_backward(y, target, std, var)  # diff is recomputed: one map fewer kept alive
        ctx.feat_shape, ctx.feat_dtype = feat.shape, feat.dtype
        return loss, mean, std

    @staticmethod
    def backward(ctx, g_loss, g_mean, g_std):
        if torch.is_grad_enabled():  # create_graph=True: this backward records no graph of its own
            raise RuntimeError(
                "the fast VGG losses give first-order gradients only (create_graph=True was asked): "
                "build the model with backend='reference' for higher-order gradients"
            )
        y, target, std, var = ctx.saved_tensors
        N = y.shape[2]
        # The normalization backward, (gy - mean(gy) - y mean(gy y)) / sigma, plus the mean and std
        # outputs' terms g_mean / N and g_std y / N; the var terms vanish where the clamp holds (clamp
        # passes gradient where var >= eps). Unused outputs arrive as zeros (materialized grads).
        diff = y - target
        grad = torch.empty_like(diff)
        live = (var >= VAR_EPS).to(y.dtype)
        scale = 2 * g_loss / diff.numel()  # d loss / d y = scale * diff
        coef_diff = scale / std
        coef_y = live * (g_std / N - _channel_dot(diff, y, out=grad) * scale / (N * std))
        const = g_mean / N - diff.sum(dim=2) * (coef_diff / N)
        torch.addcmul(const[..., None], diff, coef_diff[..., None], out=grad)
        grad.addcmul_(y, coef_y[..., None])
        return grad.view(ctx.feat_shape).to(ctx.feat_dtype), None


def normalized_mse(
    feat: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MSE(normalized(feat), target) and feat's per-channel mean and std.

    feat: (B, C, H, W), differentiable; target: (B, C, H, W), an already normalized map (no gradient).
    Returns (loss 0-d, mean (B, C), std (B, C)), float32 for half inputs, else feat's dtype. Equal
    within rounding to F.mse_loss(normalized(feat), target) and channel_mean_std(feat). First-order
    gradients only in eager mode (the losses of backend="reference" also take create_graph=True).
    """
    # Compiled graphs fuse by themselves; torch.func cannot run the Function, nor dual tensors (forward-mode
    # AD: it has no forward derivative).
    if traced(feat, target) or forward_ad_active():
        y, mean, std = _official_stats(feat)
        return F.mse_loss(y, target), mean, std
    return _NormalizedMSE.apply(feat, target)
