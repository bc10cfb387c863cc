"""fastvit_style: a fast, weight-compatible Stylizing ViT (Doerrich et al., ISBI 2026).

Not Apple's FastViT (timm's `fastvit_*` models): the name is "fast Stylizing ViT".
"""

from ._version import __version__
from .augment import StyleAugment
from .configs import ModelConfig
from .model import StylizingViT, create_model
from .reference.losses import Loss
from .style_bank import StyleBank
from .tta import TTAClassifier
from .util import resize_image


def __getattr__(name):
    # Lazy so that `import fastvit_style` never imports triton or safetensors by itself.
    if name == "load_pretrained_weights":
        from .weights import load_pretrained_weights

        return load_pretrained_weights
    if name == "shared_attention":
        from .ops import shared_attention

        return shared_attention
    raise AttributeError(f"module 'fastvit_style' has no attribute {name!r}")


__all__ = [
    "Loss",
    "ModelConfig",
    "StyleAugment",
    "StyleBank",
    "StylizingViT",
    "TTAClassifier",
    "__version__",
    "create_model",
    "load_pretrained_weights",
    "resize_image",
    "shared_attention",
]
