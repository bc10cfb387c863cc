"""The official losses with the exact shortcuts of shared doc 3.6: with the rolled style (x_style None)
VGG19 runs on 3 batches, not 5.

When the style batch is the content batch rolled, phi(x_s) = roll(phi(x)) and x_s_hat = roll(x_hat), so
the identity and consistency losses are twice their content term and the style targets are rolls.
The remaining VGG passes: x without a graph, t and x_hat with one. The per-channel statistics run
through `feature_stats` (fewer passes than the official ops in eager mode, same numbers).
"""

import torch
import torch.nn.functional as F

from .devices import autocast_dtype
from .feature_stats import normalized_mse, normalized_stats, widen_half
from .layers.vgg19 import VGG19Features
from .reference.losses import Loss, channel_mean_std
from .tracing import traced


def check_loss_images(x, x_style, x_stylized, x_recon, x_style_recon) -> None:
    """TypeError/ValueError unless the images are floating-point (B, 3, H, W) tensors of one shape, B >= 1,
    x_style and x_style_recon both tensors or both None (the rolled style). Mismatched batches would
    broadcast in the MSEs: wrong numbers with only a warning."""
    if (x_style is None) != (x_style_recon is None):
        raise ValueError(
            "x_style and x_style_recon must both be tensors, or both None (the style is then roll(x), "
            "as in training)"
        )
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"x must be a (B, 3, H, W) image batch, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:  # the MSEs would average no element: four NaN losses
        raise ValueError("x is an empty batch: at least one image is needed")
    _check_floating("x", x)
    images = {
        "x_style": x_style,
        "x_stylized": x_stylized,
        "x_recon": x_recon,
        "x_style_recon": x_style_recon,
    }
    for name, t in images.items():
        if t is None and name in ("x_style", "x_style_recon"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.shape != x.shape:
            raise ValueError(
                f"{name} must be a (B, 3, H, W) image batch of x's shape {tuple(x.shape)}, got {tuple(t.shape)}"
            )
        _check_floating(name, t)


def _check_floating(name: str, t: torch.Tensor) -> None:
    # VGG19's convolutions would refuse it naming no argument ("Input type (unsigned char) and bias ...").
    if not t.is_floating_point():
        raise ValueError(
            f"{name} must hold floating-point images normalized as the model's inputs, got {t.dtype}"
        )


def map_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """F.mse_loss(a, b) of two (B, C, H, W) maps, taken in their memory order: on channels-last maps
    (the fast VGG's) torch's CPU backward of F.mse_loss runs a strided loop, 3.9x slower than over
    the same maps seen as contiguous NHWC tensors (147 vs 38 ms forward + backward at 64 channels,
    224 px, 4 images; torch 2.13); the numbers are the same, and the gradient is channels-last.
    Traced or transformed calls (vmap cannot query a layout) take F.mse_loss as it is."""
    if not traced(a, b) and all(
        t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) for t in (a, b)
    ):
        a, b = a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1)
    return F.mse_loss(a, b)


def compute_loss(vgg, x, x_style, x_stylized, x_recon, x_style_recon) -> Loss:
    """Images (B, 3, H, W) in normalized space; x_style and x_style_recon None mean roll(x) and roll(x_recon).

    vgg: the model's loss network, ours (run the fast way) or one that replaced it (timm's
    features_only VGG19, say: called as officially, x -> its six maps)."""
    rolled = x_style is None

    def features(images):
        return vgg(images, fast=True) if isinstance(vgg, VGG19Features) else vgg(images)

    with torch.no_grad():
        targets = features(x)
        styles = targets if rolled else features(x_style)
    # One VGG call per image batch: slices of a batched call would cost a zero-filled map each in the
    # backward, and a split() its concatenation.
    stylized = features(x_stylized)
    recons = features(x_recon)
    style_recons = recons if rolled else features(x_style_recon)

    identity = F.mse_loss(x_recon, x)
    consistency = 0
    anatomical = 0
    style = 0
    for fx, fs, ft, fr, fsr in zip(targets, styles, stylized, recons, style_recons):
        consistency = consistency + map_mse(fr, fx)
        if not rolled:
            consistency = consistency + map_mse(fsr, fs)
        with torch.no_grad():
            normalized_x, mu_s, sd_s = normalized_stats(fx)
            if rolled:
                mu_s, sd_s = mu_s.roll(-1, 0), sd_s.roll(-1, 0)
            else:  # only the statistics: torch.var's one pass, no normalized map to build and drop
                mu_s, sd_s = channel_mean_std(widen_half(fs))  # float32 for half maps, as the roll's
        anatomical_j, mu_t, sd_t = normalized_mse(ft, normalized_x)
        anatomical = anatomical + anatomical_j
        style = style + F.mse_loss(mu_t, mu_s) + F.mse_loss(sd_t, sd_s)
    if rolled:
        identity, consistency = 2 * identity, 2 * consistency
    else:
        identity = identity + F.mse_loss(x_style_recon, x_style)
    if autocast_dtype(x.device.type) is None:
        # The statistics of half maps are float32 (feature_stats); the official terms have the maps'
        # dtype (float32 under autocast, whose MSE runs in it): so do these, rounded once at the end.
        anatomical, style = anatomical.to(stylized[0].dtype), style.to(stylized[0].dtype)
    return Loss(identity, consistency, anatomical, style)
