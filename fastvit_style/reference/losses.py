"""The four official losses (shared doc 3.3), VGG19 run five times as the official code runs it."""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..configs import LOSS_WEIGHTS


class Loss(NamedTuple):
    """The unweighted official loss terms (0-d tensors)."""

    identity: torch.Tensor
    consistency: torch.Tensor
    anatomical: torch.Tensor
    style: torch.Tensor

    def total(self, weights: tuple[float, float, float, float] = LOSS_WEIGHTS) -> torch.Tensor:
        """lambda_id * identity + lambda_cons * consistency + lambda_anat * anatomical + lambda_style * style.

        weights: 4 numbers (or a tensor of 4), one per term in that order."""
        # zip would stop at the shorter: three weights would drop the style term silently.
        try:
            count = len(weights)
        except TypeError:  # a number, a 0-d tensor
            count = None
        if count != len(self):
            raise ValueError(
                f"weights must be {len(self)} numbers, one per term ({', '.join(self._fields)}), "
                f"got {weights!r:.80}"
            )
        return sum(w * term for w, term in zip(weights, self))


def channel_mean_std(feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, channel) mean and sqrt(clamp(biased var, 1e-5)) over H*W.  feat: (B, C, H, W) -> (B, C) x2."""
    flat = feat.flatten(2)
    mean = flat.mean(dim=2)
    var = flat.var(dim=2, unbiased=False)
    return mean, var.clamp(min=1e-5).sqrt()


def normalized(feat: torch.Tensor) -> torch.Tensor:
    mean, std = channel_mean_std(feat)
    return (feat - mean[..., None, None]) / std[..., None, None]


def compute_loss(vgg, x, x_style, x_stylized, x_recon, x_style_recon) -> Loss:
    """All images (B, 3, H, W) in normalized space; gradients flow through the last three only."""
    with torch.no_grad():
        fx = vgg(x)
        fs = vgg(x_style)
    ft = vgg(x_stylized)
    fr = vgg(x_recon)
    fsr = vgg(x_style_recon)

    identity = F.mse_loss(x_recon, x) + F.mse_loss(x_style_recon, x_style)
    consistency = sum(F.mse_loss(a, b) + F.mse_loss(c, d) for a, b, c, d in zip(fr, fx, fsr, fs))
    anatomical = sum(F.mse_loss(normalized(a), normalized(b)) for a, b in zip(fx, ft))
    style = 0
    for s_j, t_j in zip(fs, ft):
        (mu_s, sd_s), (mu_t, sd_t) = channel_mean_std(s_j), channel_mean_std(t_j)
        style = style + F.mse_loss(mu_t, mu_s) + F.mse_loss(sd_t, sd_s)
    return Loss(identity, consistency, anatomical, style)
