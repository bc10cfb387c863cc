"""StylizingViT: the official constructor, forward and state_dict, on the fast schedule."""

from __future__ import annotations

import torch
from torch import nn

from . import reference, schedule
from .backends import attention_for, check_backend
from .configs import DEFAULT_DATASET, VGG_MIN_SIZE, check_flag, config_property, make_config, untrainable
from .devices import check_input_dtype
from .layers import Mlp, VGG19Features, ViTEncoder
from .layers.unmodified import check_unmodified
from .losses import check_loss_images, compute_loss
from .reference.losses import Loss
from .tta import stylize
from .util import unpatchify_image


class StylizingViT(nn.Module):
    """Drop-in for `stylizing_vit.StylizingViT`: same kwargs, forward and state_dict keys.

    forward(x, x_style=None): x, x_style (B, 3, 224, 224) in dataset-normalized space, float dtype of
    the model. x_style None styles sample i by sample (i+1) mod B. Returns the stylized batch
    (B, 3, 224, 224), or with train=True the tuple (Loss, x_recon); `.train()`/`.eval()` change nothing.

    backend: 'auto' (Triton on CUDA, else PyTorch), 'torch', 'triton', 'xformers', or 'reference'
    (the official computation, unoptimised, for tests and comparisons).

    allow_global_hooks: False refuses the fast path while a global module hook is registered
    (`layers.unmodified`); True lets such hooks through, for those not meant for this model's layers.
    """

    def __init__(self, backbone: str = "base", train: bool = False, backend: str = "auto", **kwargs):
        super().__init__()
        train = check_flag("train", train)
        self.config = cfg = make_config(backbone, **kwargs)
        self.backbone = backbone
        self.training_mode = train
        self.backend = check_backend(backend, cfg.head_dim)
        self.allow_global_hooks = False
        self.encoder = ViTEncoder(cfg)
        if train:
            self.vgg_encoder = VGG19Features()
        L = cfg.embed_dim
        self.bottleneck = Mlp(L, int(L * cfg.bottleneck_mlp_ratio), bias=cfg.bottleneck_bias)
        self.post_process_conv = nn.Conv2d(
            cfg.in_channel,
            cfg.in_channel,
            kernel_size=cfg.post_process_conv_kernel_size,
            padding=cfg.post_process_conv_padding,
            bias=cfg.post_process_conv_bias,
        )

    def forward(self, x: torch.Tensor, x_style: torch.Tensor | None = None):
        self._check_inputs(x, x_style)
        if self.training_mode:
            self._check_trainable()
            _check_loss_targets(x, x_style)
            self._warn_if_random_vgg(stacklevel=4)  # past nn.Module's two call frames
        if self.backend == "reference":
            return reference.forward(self, x, x_style)
        attend = self._fast_attention(x.device)
        streams = schedule.encode(self.encoder, x, x_style, attend, keep_content=self.training_mode)
        if not self.training_mode:
            return self.reconstruct_patches(streams.z_t)
        B = x.shape[0]
        if x_style is None:
            x_stylized, x_recon = self.reconstruct_patches(torch.cat([streams.z_t, streams.z])).split(B)
            x_style_recon = None
        else:
            z_all = torch.cat([streams.z_t, streams.z, streams.z_s])
            x_stylized, x_recon, x_style_recon = self.reconstruct_patches(z_all).split(B)
        return compute_loss(self.vgg_encoder, x, x_style, x_stylized, x_recon, x_style_recon), x_recon

    def _check_trainable(self) -> None:
        """ValueError where this train=True model's losses cannot run (the trainer refuses them too)."""
        cfg = self.config
        k, p = cfg.post_process_conv_kernel_size, cfg.post_process_conv_padding
        conv = self.post_process_conv  # a replaced one, as a replaced loss network, takes what it takes
        built = isinstance(conv, nn.Conv2d) and conv.kernel_size == (k, k) and conv.padding == (p, p)
        problem = untrainable(cfg, post_conv=built, vgg=isinstance(self.vgg_encoder, VGG19Features))
        if problem:
            raise ValueError(f"this train=True model cannot compute its losses: {problem}")

    def _warn_if_random_vgg(self, stacklevel: int) -> None:
        # Ours only: a replaced loss network is the user's business.
        if isinstance(self.vgg_encoder, VGG19Features):
            self.vgg_encoder.warn_once_if_random(stacklevel + 1)

    def _fast_attention(self, device: torch.device):
        """attend(q, k, v, kv_index) of the fast path (schedule, style bank, TTA) on `device`, once the
        encoder's layers are found unmodified (ValueError naming a replaced or hooked one)."""
        if self.backend == "reference":  # style banks and TTA: no path that calls the layers
            remedy = (
                "style banks and TTA cannot honour it (they batch the layers' work their own way); remove it"
            )
        else:
            remedy = (
                "the fast path reads the layers' weights and skips their modules; build the model with "
                "backend='reference', which calls every layer as the official code does"
            )
        check_unmodified(self, remedy)
        return attention_for(self.backend, device)

    # The official model's attributes and helper methods, for code written against it.
    in_channel = config_property("in_channel")
    patch_size = config_property("patch_size")
    embed_dim = config_property("embed_dim")

    def reconstruct_image(
        self, Z_a: torch.Tensor, Z_s: torch.Tensor, remove_cls: bool = True
    ) -> torch.Tensor:
        """The official head after the bottleneck: anatomy Z_a and style Z_s, each (B, T, L/2) (CLS row
        first unless remove_cls=False: (B, N, L/2)), multiplied per patch -> image (B, C, H, W)."""
        if remove_cls:
            Z_a, Z_s = Z_a[:, 1:], Z_s[:, 1:]
        B, N = Z_a.shape[:2]
        C, P = self.in_channel, self.patch_size
        patches = Z_a.reshape(B, N, C, P, -1) @ Z_s.reshape(B, N, C, -1, P)
        return self.post_process_conv(unpatchify_image(patches, P, C))

    def compute_loss(self, x, x_style, x_stylized, x_recon, x_style_recon) -> Loss:
        """The official four loss terms of a training forward's images (a model built with train=True):
        five (B, 3, H, W) tensors of one shape; x_style and x_style_recon both None stand for
        x.roll(-1, 0) and x_recon.roll(-1, 0), the style of a training forward."""
        if not self.training_mode:
            raise ValueError("compute_loss needs the VGG19 of a model built with train=True")
        check_loss_images(x, x_style, x_stylized, x_recon, x_style_recon)
        # A forward's images have input_size and the model's dtype, which the input checks cover; these are
        # the caller's. A replaced loss network takes what it takes.
        if isinstance(self.vgg_encoder, VGG19Features):
            if min(x.shape[2:]) < VGG_MIN_SIZE:
                raise ValueError(
                    f"the images are {x.shape[2]}x{x.shape[3]} px, but the VGG19 loss network halves them "
                    f"five times and needs at least {VGG_MIN_SIZE} px per side"
                )
            weight = next(self.vgg_encoder.parameters())
            names = ("x", "x_style", "x_stylized", "x_recon", "x_style_recon")
            for name, t in zip(names, (x, x_style, x_stylized, x_recon, x_style_recon)):
                if t is not None:
                    check_input_dtype(name, t, weight, "the VGG19 loss network")
        _check_loss_targets(x, x_style)
        self._warn_if_random_vgg(stacklevel=2)
        if self.backend == "reference":  # the official ops (higher-order gradients too)
            if x_style is None:
                x_style, x_style_recon = x.roll(-1, 0), x_recon.roll(-1, 0)
            return reference.compute_loss(self.vgg_encoder, x, x_style, x_stylized, x_recon, x_style_recon)
        return compute_loss(self.vgg_encoder, x, x_style, x_stylized, x_recon, x_style_recon)

    def stylize(
        self, x: torch.Tensor, bank, refs=None, k=None, generator=None, chunk_size: int = 64
    ) -> torch.Tensor:
        """Each image of x (B, C, H, W) stylized with K references of a `StyleBank` -> (B, K, C, H, W).

        refs: (B, K) bank indices per image; k: draw K per image with `generator`; default: all of them.
        The content stream runs once per image and the bank's cached style K/V are reused (see tta.py);
        at most about chunk_size (image, reference) pairs are in flight at once. The bank's K/V are
        constants to autograd: gradients reach x and the weights of its streams, not the references'.
        """
        return stylize(self, x, bank, refs=refs, k=k, generator=generator, chunk_size=chunk_size)

    def reconstruct_patches(self, z: torch.Tensor) -> torch.Tensor:
        """Head of shared doc 1.5 on final-normed patch rows z (B, N, L) -> image (B, C, H, W): the
        bottleneck, then anatomy (first half) times style (second half) per patch."""
        anatomy, style = self.bottleneck(z).chunk(2, dim=-1)
        return self.reconstruct_image(anatomy, style, remove_cls=False)

    def _check_inputs(self, x, x_style, names: tuple[str, str] = ("x", "x_style")) -> None:
        """The encoder's input check (`ViTEncoder.check_images`), x_style None standing for a rolled x."""
        self.encoder.check_images(x, x_style, names, style_optional=True)


def _check_loss_targets(x: torch.Tensor, x_style: torch.Tensor | None) -> None:
    """ValueError when x or x_style would carry a gradient: the losses take them as fixed targets (their
    VGG19 features run without a graph), so a gradient to them would miss terms. The official losses
    assert that they require no grad."""
    if not torch.is_grad_enabled():
        return
    for name, t in (("x", x), ("x_style", x_style)):
        if t is not None and t.requires_grad:
            raise ValueError(
                f"{name} requires grad, but a train=True model's losses take x and x_style as fixed "
                "targets (their VGG19 features are computed without a graph; the official losses assert "
                f"that they require no grad): pass {name}.detach(), or run under torch.no_grad()"
            )


def create_model(
    backbone: str = "base",
    train: bool = False,
    weights: str | None = None,
    pretrained: bool | str = False,
    **kwargs,
) -> StylizingViT:
    """Official factory: `weights` (or a string `pretrained`) is a dataset id, a local file or a hub repo id;
    pretrained=True means the camelyon17wilds checkpoint."""
    from .weights import load_pretrained_weights, weight_source

    if weights:  # before the build; a falsy one loads nothing, officially
        weight_source(weights, "weights")
    model = StylizingViT(backbone, train=train, **kwargs)
    # The official precedence, to the letter: weights="" loads nothing, nor does a truthy non-bool pretrained.
    if weights is not None:
        source = weights
    elif isinstance(pretrained, str):
        source = pretrained
    else:
        source = DEFAULT_DATASET if pretrained is True else None
    if source:
        load_pretrained_weights(model, backbone, source)
    return model
