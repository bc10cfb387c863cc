"""nn.Modules that hold the parameters under the official state_dict names (no timm/torchvision)."""

from .attention_block import Attention, CrossAttentionBlock
from .encoder import ViTEncoder
from .mlp import Mlp
from .patch_embed import PatchEmbed
from .vgg19 import VGG19Features

__all__ = ["Attention", "CrossAttentionBlock", "Mlp", "PatchEmbed", "VGG19Features", "ViTEncoder"]
