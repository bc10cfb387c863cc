"""The official package (`stylizing-vit` 1.0.0) as a benchmark backend, "official".

Every speed ratio is taken against backend="reference", our transcription of the official code
(shared doc 1-3); rows of the official package itself, in the same run on the same weights and
inputs, show that the transcription runs at the official code's speed (and, through the run's
parity check, computes its numbers). Registered by `bench/cpu_speed.py --official`.
"""

from __future__ import annotations

import contextlib
from functools import partial

from torch import nn

from ..configs import _ENCODER_KWARGS, _MODEL_KWARGS
from ..reference.losses import Loss


def unavailable_reason() -> str | None:
    """Why the official package cannot run here, or None."""
    try:
        import stylizing_vit  # noqa: F401
    except Exception as exc:  # a broken install is as unusable as a missing one
        return f"the official package cannot be imported ({type(exc).__name__}: {exc}): pip install stylizing-vit==1.0.0"
    return None


def official_kwargs(config) -> dict:
    """The official constructor's keyword arguments for a ModelConfig (the inverse of make_config)."""
    kwargs = {official: getattr(config, field) for official, field in _ENCODER_KWARGS.items()}
    kwargs.update({name: getattr(config, name) for name in _MODEL_KWARGS})
    kwargs["encoder_norm_layer"] = partial(nn.LayerNorm, eps=config.norm_eps)
    return kwargs


@contextlib.contextmanager
def offline_vgg():
    """Build the official train=True model without its download: its constructor asks timm for the
    ImageNet VGG19 weights, which the weights loaded next replace anyway."""
    import timm

    create = timm.create_model
    timm.create_model = lambda *args, **kwargs: create(*args, **{**kwargs, "pretrained": False})
    try:
        yield
    finally:
        timm.create_model = create


class _TrainingForward(nn.Module):
    """The official train=True model, its loss terms returned as our Loss (whose total() applies the
    official weights, as the official training script does)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, x_style=None):
        loss, x_recon = self.model(x, x_style)  # loss: the official Loss dataclass
        return Loss(loss.identity, loss.consistency, loss.anatomical, loss.style), x_recon


def factory(model) -> nn.Module:
    """The official StylizingViT with `model`'s architecture, mode, device and weights (strict load)."""
    from stylizing_vit import StylizingViT

    train = model.training_mode
    with offline_vgg() if train else contextlib.nullcontext():
        official = StylizingViT(model.backbone, train=train, **official_kwargs(model.config))
    official.load_state_dict(model.state_dict())
    official.to(next(model.parameters()).device)
    return _TrainingForward(official) if train else official
