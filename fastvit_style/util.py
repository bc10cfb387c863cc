"""The official package's utilities (`stylizing_vit.util`; `resize_image` is also exported at the top),
under their official names and arguments, for code written against the official package."""

from __future__ import annotations

import operator

import numpy as np
import torch

from .imageio import denormalize, normalize, resize_pad


def resize_image(inpt, size: int, fill: float = 0) -> torch.Tensor:
    """The official aspect-preserving resize: the longer side to `size`, the other to
    int(size * short / long), centred on `fill` (bilinear, antialiased; a square image is resized
    alone, one of the right size returned as it is).

    inpt: a (..., C, H, W) tensor, or a PIL image (a (C, H, W) uint8 tensor, as torchvision's to_image
    gives). Integer tensors are resized in float32 and rounded back: pixels can differ by 1 from
    torchvision's uint8 kernel, which the official code uses."""
    if not isinstance(inpt, torch.Tensor):
        inpt = torch.from_numpy(np.array(inpt, copy=True))
        inpt = inpt.permute(2, 0, 1) if inpt.dim() == 3 else inpt[None]
    if inpt.dim() < 3:
        raise ValueError(f"resize_image needs a (..., C, H, W) image, got shape {tuple(inpt.shape)}")
    # Each failed inside: interpolate, int(size * w / h), a reshape, torch.iinfo.
    try:
        side = None if isinstance(size, bool) else operator.index(size)  # NumPy's, a 0-d int tensor
    except TypeError:
        side = None
    if side is None or side < 1:
        raise ValueError(f"resize_image: size must be a positive int, got {size!r}")
    size = side
    if 0 in inpt.shape[-2:]:
        raise ValueError(f"resize_image needs an image of at least 1x1 pixels, got shape {tuple(inpt.shape)}")
    if inpt.is_complex():
        raise ValueError(f"resize_image needs a real-valued image, got {inpt.dtype}")
    if tuple(inpt.shape[-2:]) == (size, size):
        return inpt
    exact = inpt.dtype in (torch.float32, torch.float64)  # CPU antialiasing knows no half precision
    out = resize_pad(inpt if exact else inpt.float(), size, fill)
    if exact or inpt.is_floating_point():
        return out.to(inpt.dtype)
    if inpt.dtype == torch.bool:
        return out > 0.5
    info = torch.iinfo(inpt.dtype)
    return out.round_().clamp_(info.min, info.max).to(inpt.dtype)


# float32 constants, as officially: an integer image promotes to float32, a float64 one stays float64.
def normalize_image(image: torch.Tensor, mean, std) -> torch.Tensor:
    """(C, H, W) or (B, C, H, W), any dtype -> (image - mean) / std per channel, at least float32."""
    return normalize(image, mean, std, constants_dtype=torch.float32)


def denormalize_image(image: torch.Tensor, mean, std) -> torch.Tensor:
    """(C, H, W) or (B, C, H, W), any dtype -> image * std + mean per channel, at least float32."""
    return denormalize(image, mean, std, constants_dtype=torch.float32)


def patchify_image(X: torch.Tensor, in_channel: int, patch_size: int) -> torch.Tensor:
    """(B, C, H, H) images -> (B, N, P*P*C) patches, row-major over the grid, (p, q, c) within a patch."""
    if X.dim() != 4 or X.shape[2] != X.shape[3] or X.shape[2] % patch_size:
        raise ValueError(
            f"patchify_image needs square (B, C, H, H) images with H a multiple of {patch_size}, "
            f"got {tuple(X.shape)}"
        )
    B, g = X.shape[0], X.shape[2] // patch_size
    X = X.reshape(B, in_channel, g, patch_size, g, patch_size).permute(0, 2, 4, 3, 5, 1)
    return X.reshape(B, g * g, patch_size**2 * in_channel)


def unpatchify_image(X: torch.Tensor, patch_size: int, in_channel: int) -> torch.Tensor:
    """(B, N, P*P*C) or (B, N, C, P, P) patches -> (B, C, H, W) images.

    A (B, N, C, P, P) input is reinterpreted, not permuted, as (B, N, P, P, C): the official quirk the
    model's head depends on (shared doc 1.5)."""
    g = int(X.shape[1] ** 0.5)
    if X.dim() not in (3, 5) or g * g != X.shape[1]:
        raise ValueError(
            f"unpatchify_image needs (B, N, L) or (B, N, C, P, P), N a square, got {tuple(X.shape)}"
        )
    X = X.reshape(X.shape[0], g, g, patch_size, patch_size, in_channel)
    return X.permute(0, 5, 1, 3, 2, 4).reshape(X.shape[0], in_channel, g * patch_size, g * patch_size)
