"""Stylizing ViT as a training augmentation for a downstream classifier (shared doc 4.1).

Officially, per classifier batch: n = max(1, int(p*B)) indices from torch.randperm, x_sel = x[idx],
x[idx] = stylizer(x_sel, x_sel.roll(-1)): the styles are other images of the same subset, of any
class, in normalized space and not clamped. `references` replaces that roll by styles drawn at
random from a fixed set (e.g. a few images per target domain).
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from .devices import generator_from_state, generator_state, to_device_async
from .style_bank import describe_value, find_stylizer
from .weights import wrappers


class StyleAugment:
    """augment(x) -> (x_out, idx) for a batch x (B, C, H, W) in the stylizer's normalized space.

    stylizer: a frozen StylizingViT built with train=False (any callable (content, style) -> image;
    the rolled subset as the style, None for a StylizingViT, also one wrapped by torch.compile or DDP:
    its exact shortcut for that roll, which a function around the model would forgo; not through
    DataParallel, whose replicas would each roll only their own slice of the subset).
    p in (0, 1]: the fraction of the batch replaced; n = max(1, int(p*B)) images at indices idx
    (int64, on x's device, in randperm order). references: optional (R, C, H, W) style set; each
    selected image gets a style drawn uniformly (with replacement) from it. generator: a CPU
    torch.Generator for the index/reference draws (default: the global RNG, which DataLoader seeds
    apart in each worker; a generator given is copied into every worker, whose draws then repeat:
    there, reseed it per worker in worker_init_fn or leave it out).
    x_out is a new tensor (x is not modified): rows not in idx equal x, and keep its autograd graph
    (a learnable transform before the augmentation still gets their gradient); rows idx are the
    stylized images cast to x.dtype, constants to autograd. The stylizer runs under no_grad, in
    whatever precision the caller runs it (so under the caller's torch.autocast, if any).
    """

    def __init__(self, stylizer, p: float = 0.33, references: torch.Tensor | None = None, generator=None):
        if not callable(stylizer):  # else the first batch fails with "'NoneType' object is not callable"
            raise TypeError(
                "stylizer must be a StylizingViT or a callable (content, style) -> images, got "
                f"{describe_value(stylizer)}"
            )
        if references is not None and not isinstance(references, torch.Tensor):
            raise TypeError(f"references must be a torch.Tensor, got {type(references).__name__}")
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
            raise ValueError(
                f"p is the fraction of each batch to stylize and must be a number in (0, 1], got {describe_value(p)}"
            )
        if references is not None and (references.dim() != 4 or references.shape[0] == 0):
            raise ValueError(
                f"references must be a non-empty (R, C, H, W) batch, got {tuple(references.shape)}"
            )
        if references is not None and references.device.type == "meta":  # each batch draws from them
            raise ValueError("references must be images with values, got a tensor on the meta device")
        if references is not None and not references.is_floating_point():
            raise ValueError(
                f"references must be floating-point images normalized as the stylizer's inputs, got "
                f"{references.dtype} (e.g. image.float() / 255, then the dataset's normalization)"
            )
        if generator is not None and (
            not isinstance(generator, torch.Generator) or generator.device.type != "cpu"
        ):
            raise TypeError(
                "generator must be a CPU torch.Generator or None (the draws are made on the host, as "
                f"officially), got {generator!r:.60}"
            )
        # the StylizingViT also inside DataParallel/DDP, whose attributes hide the model's
        inner = find_stylizer(stylizer) or stylizer
        if getattr(inner, "training_mode", False):
            raise ValueError(
                "StyleAugment needs a stylizer built with train=False (a train=True model returns its "
                "losses, not images): create_model(backbone, weights=...) or StylizingViT(..., train=False)"
            )
        config = getattr(inner, "config", None)
        if references is not None and config is not None:
            expected = (config.in_channel, config.input_size, config.input_size)
            if tuple(references.shape[1:]) != expected:
                raise ValueError(
                    f"references must have shape (R, {', '.join(map(str, expected))}) (images resized and "
                    f"normalized as the stylizer's inputs), got {tuple(references.shape)}"
                )
        self.stylizer = stylizer
        self.p = p
        self.references = references
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty (B, C, H, W) batch, got {tuple(x.shape)}")
        model = find_stylizer(self.stylizer)
        if model is not None:  # the whole batch, before a subset is drawn
            model._check_inputs(x, None)
        B = x.shape[0]
        n = max(1, int(self.p * B))
        # Drawn on the host (a CPU generator, as officially), sent without a sync.
        idx = to_device_async(torch.randperm(B, generator=self.generator)[:n], x.device)
        x_sel = x[idx]
        if self.references is None:  # a StylizingViT's own roll(x_sel, -1) skips the style stream (exact)
            style = None if model is not None and not _scatters(self.stylizer) else x_sel.roll(-1, 0)
        else:
            pick = torch.randint(self.references.shape[0], (n,), generator=self.generator)
            style = self.references[to_device_async(pick, self.references.device)]
            style = to_device_async(style, x.device).to(x.dtype)
        with torch.no_grad():
            stylized = self.stylizer(x_sel, style)
        # Checked: a batch of another size would broadcast into out[idx] (one image over all n rows).
        if not isinstance(stylized, torch.Tensor):
            raise TypeError(
                f"the stylizer must return the stylized images, a tensor of shape {tuple(x_sel.shape)}, got "
                f"{describe_value(stylized)} (a train=True model returns its losses)"
            )
        if stylized.shape != x_sel.shape:
            raise ValueError(
                f"the stylizer must return one image per content image, shape {tuple(x_sel.shape)}, got "
                f"{tuple(stylized.shape)}"
            )
        out = x.clone()
        out[idx] = stylized.to(x.dtype)
        return out, idx

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)  # the generator as bytes: see generator_state
        if self.generator is not None:
            state["generator"] = generator_state(self.generator)
        return state

    def __setstate__(self, state: dict) -> None:
        # Older pickles hold the CPU state's bare bytes, or (before __getstate__) the Generator itself.
        generator = state["generator"]
        if isinstance(generator, bytes):
            generator = ("cpu", generator)
        if isinstance(generator, tuple):
            state = {**state, "generator": generator_from_state(generator)}
        self.__dict__.update(state)


def _scatters(stylizer) -> bool:
    """Whether a DataParallel is among stylizer's wrappers: it splits the batch over its GPUs and gives
    each replica a style of None, which would roll that replica's slice alone."""
    return any(isinstance(m, nn.DataParallel) for m in wrappers(stylizer))
