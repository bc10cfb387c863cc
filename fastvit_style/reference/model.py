"""The official StylizingViT forward (shared doc 1.2-1.6), all 4 block calls per layer, nothing skipped."""

import torch

from .losses import compute_loss


def encode(enc, x: torch.Tensor, x_s: torch.Tensor):
    """Stream schedule of shared doc 1.4.  x, x_s: (B, C, H, W).  Returns z, z_s, z_t, each (B, T, L).

    Each block f_i is called as a module (`blk(queries, context)`), as officially."""
    X = enc.embed(x)  # content stream X^i
    S = enc.embed(x_s)  # style stream S^i
    A, K = X, S  # stylized-query stream A^i and its style context K^i
    for f in enc.blocks:
        X = f(X, X)  # X^{i+1}: content self-attention
        S = f(S, S)  # S^{i+1}: style self-attention
        Y = f(A, K)  # Y^i: stylization, K/V from the *pre-block* style stream
        A = f(X, Y)  # A^{i+1}: re-anchor, queries from the *updated* content
        K = S.clone()
    return enc.norm(X), enc.norm(S), enc.norm(Y)


def reconstruct(model, z: torch.Tensor) -> torch.Tensor:
    """Head of shared doc 1.5: (B, T, L) encoder output -> (B, C, H, W) image in normalized space."""
    cfg = model.config
    B, C, P, K, g = z.shape[0], cfg.in_channel, cfg.patch_size, cfg.rank, cfg.grid
    u = model.bottleneck(z)  # applied to all T rows, CLS included
    a, s = u.chunk(2, dim=-1)  # anatomy = first half, style = second half
    a, s = a[:, 1:], s[:, 1:]
    N = a.shape[1]
    m = a.reshape(B, N, C, P, K) @ s.reshape(B, N, C, K, P)  # (B, N, C, P, P): rank-K product per patch
    # Unpatchify quirk: the (C, P, P) buffer is *reshaped* (not permuted) to (P, P, C).
    m = m.reshape(B, g, g, P, P, C)
    img = torch.einsum("nhwpqc->nchpwq", m).reshape(B, C, g * P, g * P)
    return model.post_process_conv(img)


def forward(model, x: torch.Tensor, x_style: torch.Tensor | None = None):
    """StylizingViT.forward.  Returns x_stylized, or (Loss, x_recon) when built with train=True."""
    if x_style is None:
        x_style = x.clone().roll(shifts=-1, dims=0)
    z, z_s, z_t = model.encoder(x, x_style)  # as a module, as officially (its forward is `encode`)
    x_stylized = reconstruct(model, z_t)
    if not model.training_mode:
        return x_stylized
    x_recon = reconstruct(model, z)
    x_style_recon = reconstruct(model, z_s)
    loss = compute_loss(model.vgg_encoder, x, x_style, x_stylized, x_recon, x_style_recon)
    return loss, x_recon
