"""Backbone table, dataset ids and the official defaults (shared doc, sections 1.1, 2.3 and 3.1)."""

from __future__ import annotations

import functools
import json
import math
import numbers
import warnings
from dataclasses import asdict, dataclass

import numpy as np

_POSITIVE_INTS = ("patch_size", "embed_dim", "depth", "num_heads", "in_channel",
                  "post_process_conv_kernel_size")  # fmt: skip
_BOOLS = ("qkv_bias", "bottleneck_bias", "post_process_conv_bias")


def is_int(value) -> bool:
    """Whether value is an integer (Python's or NumPy's), a bool not counting as one."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_flag(name: str, value):
    """`value`, NumPy's bool and None (officially false) as Python's bool; ValueError unless it is True or
    False (0 and 1 too, as officially): the official code only tests these flags' truth, so a JSON "false"
    would mean True."""
    if value is None or isinstance(value, np.bool_):
        return bool(value)
    if not (isinstance(value, numbers.Integral) and value in (0, 1)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelConfig:
    """Every number that fixes the architecture; two models with equal configs share a state_dict layout."""

    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    input_size: int = 224
    in_channel: int = 3
    bottleneck_mlp_ratio: float = 4.0
    bottleneck_bias: bool = True
    post_process_conv_kernel_size: int = 5
    post_process_conv_padding: int = 2
    post_process_conv_bias: bool = False
    # Of every LayerNorm (official `encoder_norm_layer`: partial(nn.LayerNorm, eps=1e-6)).
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1

    @property
    def rank(self) -> int:
        """K of the per-patch product (shared doc 1.5): L / (2 C P)."""
        return self.embed_dim // (2 * self.in_channel * self.patch_size)

    def to_dict(self) -> dict:
        """The fields as JSON writes them: a NumPy (or other) float as Python's, the same value."""
        return {
            k: float(v) if isinstance(v, numbers.Real) and not isinstance(v, (int, float)) else v
            for k, v in asdict(self).items()
        }

    def validate(self) -> None:
        """Raise ValueError for configurations the official code crashes on inside forward."""
        for name in _POSITIVE_INTS + ("post_process_conv_padding",):
            value, least = getattr(self, name), int(name in _POSITIVE_INTS)
            if not is_int(value) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        for name in ("mlp_ratio", "bottleneck_mlp_ratio", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite positive number, got {value!r}")
        for name in _BOOLS:  # nn.Linear/nn.Conv2d `bias`
            check_flag(name, getattr(self, name))
        L, C, P = self.embed_dim, self.in_channel, self.patch_size
        for name in ("mlp_ratio", "bottleneck_mlp_ratio"):
            ratio = getattr(self, name)
            if int(L * ratio) < 1:  # the width the layers round it to; at 0 an MLP outputs its bias alone
                raise ValueError(
                    f"{name} {ratio!r} leaves int({L} * {ratio!r}) = 0 hidden units in the MLP: it needs at "
                    f"least 1 (a ratio >= 1/{L})"
                )
        if L % self.num_heads:
            raise ValueError(f"embed_dim {L} is not divisible by num_heads {self.num_heads}")
        if L % 4:
            raise ValueError(
                "embed_dim must be a multiple of 4 (the 2-D sin-cos position embedding gives the patch column "
                f"and row L/2 channels each, as sin-cos pairs), got {L}"
            )
        size = self.input_size
        if not is_int(size) or size < P or size % P:
            raise ValueError(
                f"input_size must be a positive multiple of patch_size {P}, got {self.input_size!r}"
            )
        k, p = self.post_process_conv_kernel_size, self.post_process_conv_padding
        if k > size + 2 * p:
            raise ValueError(
                f"post_process_conv_kernel_size {k} is larger than the {size + 2 * p} px of input_size {size} "
                f"padded by {p} on each side (post_process_conv_padding): the post conv has nothing to slide over"
            )
        if (L // 2) % (C * P):
            raise ValueError(
                f"embed_dim {L} is unsupported with patch_size {P} and {C} channels: the reconstruction "
                f"head views each half of the bottleneck output (L/2 = {L // 2} values) as a "
                f"{C}x{P}xK matrix, so L/2 must be divisible by C*P = {C * P} (the official 'large' and "
                f"'huge' backbones fail this and crash in the official code too)"
            )


_TINY = {"embed_dim": 192, "depth": 12, "num_heads": 3}
_SMALL = {"embed_dim": 384, "depth": 12, "num_heads": 6}
_BASE = {"embed_dim": 768, "depth": 12, "num_heads": 12}
_LARGE = {"embed_dim": 1024, "depth": 24, "num_heads": 16}
_HUGE = {"embed_dim": 1280, "depth": 32, "num_heads": 16, "patch_size": 14}

BACKBONES: dict[str, dict] = {
    "tiny": _TINY, "vit_tiny": _TINY, "vit_tiny_patch16_224": _TINY,
    "small": _SMALL, "vit_small": _SMALL, "vit_small_patch16_224": _SMALL,
    "base": _BASE, "vit_base": _BASE, "vit_base_patch16_224": _BASE,
    "large": _LARGE, "vit_large": _LARGE, "vit_large_patch16_224": _LARGE,
    "huge": _HUGE, "vit_huge": _HUGE, "vit_huge_patch14_224": _HUGE,
}  # fmt: skip

# Official keyword overrides for a custom backbone (any name not in BACKBONES), mapped to config fields.
_ENCODER_KWARGS = {
    "encoder_patch_size": "patch_size",
    "encoder_embed_dim": "embed_dim",
    "encoder_depth": "depth",
    "encoder_num_heads": "num_heads",
    "encoder_mlp_ratio": "mlp_ratio",
    "encoder_qkv_bias": "qkv_bias",
}
_MODEL_KWARGS = (
    "input_size", "in_channel", "bottleneck_mlp_ratio", "bottleneck_bias",
    "post_process_conv_kernel_size", "post_process_conv_padding", "post_process_conv_bias",
)  # fmt: skip
# Official kwargs that only accept their default here (the layers are fixed: GELU, no dropout).
_FIXED_KWARGS = ("bottleneck_drop", "bottleneck_act_layer")


def config_property(field: str) -> property:
    """A read-only attribute of a module with a `config` (ModelConfig): the official modules' plain
    attributes, which the weights' shapes fix here."""
    return property(lambda self: getattr(self.config, field), doc=f"config.{field} (read-only)")


def make_config(backbone: str = "base", **kwargs) -> ModelConfig:
    """Config for an official backbone name or alias; any other name is a custom ViT (base defaults),
    with a warning when no encoder_* keyword makes it one (a misspelt name would train base)."""
    if not isinstance(backbone, str):
        raise TypeError(f"backbone must be a str (an official name, or a custom ViT's), got {backbone!r}")
    if (message := unknown_backbone(backbone, kwargs)) is not None:
        warnings.warn(message, stacklevel=3)
    fields: dict = dict(BACKBONES.get(backbone, {}))
    for key, value in kwargs.items():
        if key in _ENCODER_KWARGS:
            fields[_ENCODER_KWARGS[key]] = value
        elif key in _MODEL_KWARGS:
            fields[key] = value
        elif key == "encoder_norm_layer":
            fields["norm_eps"] = _layernorm_eps(value)
        elif key in _FIXED_KWARGS:
            if not _is_official_default(key, value):
                raise ValueError(
                    f"{key}={value!r} is not supported: only the official default is implemented"
                )
        else:
            raise TypeError(f"unexpected keyword argument {key!r}")
    for name in _BOOLS:
        if name in fields:
            fields[name] = check_flag(name, fields[name])
    if isinstance(fields.get("post_process_conv_padding"), str):
        fields["post_process_conv_padding"] = _conv_padding(
            fields["post_process_conv_padding"],
            fields.get("post_process_conv_kernel_size", ModelConfig.post_process_conv_kernel_size),
        )
    config = ModelConfig(**{key: _python_number(value) for key, value in fields.items()})
    config.validate()
    return config


def _conv_padding(mode: str, kernel) -> int:
    """nn.Conv2d's padding modes, which the official post conv takes, as the padding they give: 'valid'
    none, 'same' (k - 1) / 2 on each side for an odd kernel k."""
    if mode == "valid":
        return 0
    if mode == "same" and is_int(kernel) and kernel % 2:
        return (kernel - 1) // 2
    raise ValueError(
        f"post_process_conv_padding={mode!r} is not supported: an integer, 'valid', or 'same' with an odd "
        f"post_process_conv_kernel_size (an even one pads unevenly), got kernel size {kernel!r}"
    )


def _python_number(value):
    """Python's int for NumPy's (exact; JSON, a StyleBank's metadata, writes no NumPy number); other values
    as they are, for `validate` to judge. A float of another type is kept: the layers' widths
    int(L * ratio) are computed in its arithmetic, as officially (np.float32 rounds L * ratio in float32,
    which can give one unit more); `to_dict` writes it as Python's float."""
    return int(value) if is_int(value) and not isinstance(value, int) else value


def unknown_backbone(backbone, kwargs: dict) -> str | None:
    """Why `backbone` looks misspelt, or None: an official name in another case ('Tiny'), or no
    official name or alias and no encoder_* keyword in kwargs to make it a custom ViT (it would then
    be base exactly)."""
    if backbone in BACKBONES:
        return None
    lower = backbone.lower() if isinstance(backbone, str) else None
    custom = isinstance(kwargs, dict) and any(
        k in _ENCODER_KWARGS or k == "encoder_norm_layer" for k in kwargs
    )
    if custom and lower not in BACKBONES:
        return None
    hint = f" (did you mean {lower!r}?)" if lower in BACKBONES else ""
    return (
        f"backbone {backbone!r} is no official name{hint}: those are tiny, small, base, large and huge "
        "(or vit_tiny, vit_small, ...); another name builds a custom ViT from encoder_* keywords, with "
        "base defaults for the rest (with none, base)"
    )


def check_backbone(backbone, kwargs: dict) -> None:
    """ValueError for a backbone name that `unknown_backbone` finds misspelt: the commands' --backbone
    (the API warns); an empty one, which the API takes for a custom ViT's name."""
    if backbone == "":  # an unset shell variable: base, or a custom ViT named '' with encoder_* keywords
        raise ValueError("--backbone is empty: name tiny, small, base, large or huge (or vit_tiny, ...)")
    if (message := unknown_backbone(backbone, kwargs)) is not None:
        raise ValueError(message)


def parse_model_kwargs(name: str, text: str) -> dict:
    """The JSON object of a command's `name` option (--model-kwargs), or a ValueError naming it."""
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} is not valid JSON ({e})") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"{name} must be a JSON object, got {text!r}")
    return kwargs


def check_model_kwargs(name: str, backbone: str, kwargs: dict, **fixed) -> ModelConfig:
    """make_config(backbone, **fixed, **kwargs), or a ValueError naming `name` (the option that gave
    `kwargs`): an unknown keyword (a TypeError there, as Python raises for the constructor) becomes a
    ValueError, a bad value is one already."""
    try:
        return make_config(backbone, **fixed, **kwargs)
    except TypeError as e:
        raise ValueError(f"{name} {kwargs!r}: {e}") from None


def _is_official_default(key: str, value) -> bool:
    from torch import nn

    if key == "bottleneck_drop":
        return value == 0
    return value is nn.GELU  # bottleneck_act_layer


def _layernorm_eps(norm_layer) -> float:
    """The eps of an official `encoder_norm_layer`: "nn.LayerNorm" (which the official code reads as its
    default, partial(nn.LayerNorm, eps=1e-6)), nn.LayerNorm itself (torch's eps, 1e-5) or a partial of it
    that sets nothing but eps (and the affine defaults). Other norm layers are not implemented."""
    from torch import nn

    if isinstance(norm_layer, str) and norm_layer == "nn.LayerNorm":
        return 1e-6
    if norm_layer is nn.LayerNorm:
        return 1e-5
    if (
        isinstance(norm_layer, functools.partial)
        and norm_layer.func is nn.LayerNorm
        and not norm_layer.args
        and all(norm_layer.keywords.get(k, True) is True for k in ("elementwise_affine", "bias"))
        and set(norm_layer.keywords) <= {"eps", "elementwise_affine", "bias"}
        and isinstance(norm_layer.keywords.get("eps", 1e-5), numbers.Real)
    ):
        return float(norm_layer.keywords.get("eps", 1e-5))
    raise ValueError(
        f"encoder_norm_layer={norm_layer!r} is not supported: only nn.LayerNorm with affine weights, "
        "as a class, a functools.partial setting eps (a number), or 'nn.LayerNorm'"
    )


# Dataset ids of the official checkpoints (shared doc 2.3); the bare names are aliases.
DATASET_IDS = (
    "camelyon17wilds", "cholec80", "epistr", "ddi_12_34_56", "ddi_65_43_21",
    "fitzpatrick17k_12_34_56", "fitzpatrick17k_65_43_21",
)  # fmt: skip
DATASET_ALIASES = {"ddi": "ddi_12_34_56", "fitzpatrick17k": "fitzpatrick17k_12_34_56"}
DEFAULT_DATASET = "camelyon17wilds"


def canonical_size(backbone: str) -> str:
    """'tiny', 'small' or 'base' for a named backbone, for hub repo ids."""
    for size, dims in (("tiny", _TINY), ("small", _SMALL), ("base", _BASE)):
        if BACKBONES.get(backbone) is dims:
            return size
    raise ValueError(f"official weights exist only for tiny, small and base, not for backbone {backbone!r}")


def official_dataset(name: str) -> str | None:
    """The dataset id of the official weights `name` names (an id or an alias), else None."""
    if name in DATASET_IDS or name in DATASET_ALIASES:
        return DATASET_ALIASES.get(name, name)
    return None


def weights_dataset(name: str) -> str | None:
    """The dataset id of the official weights `name` names, as a dataset id, an alias or an official hub
    repo id (`sdoerrich97/stylizing_vit_<size>_<dataset>`), else None."""
    prefix = "sdoerrich97/stylizing_vit_"
    if name.startswith(prefix) and name.count("_") >= 3:
        size, _, name = name[len(prefix) :].partition("_")
        if size not in ("tiny", "small", "base"):
            return None
    return official_dataset(name)


def hub_repo_id(backbone: str, dataset: str) -> str:
    dataset = DATASET_ALIASES.get(dataset, dataset)
    return f"sdoerrich97/stylizing_vit_{canonical_size(backbone)}_{dataset}"


# Per-dataset normalization (shared doc 3.1): inputs and outputs live in this normalized space.
NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "camelyon17wilds": ((0.7440, 0.5895, 0.7214), (0.1787, 0.2131, 0.1721)),
    "epistr": ((0.7360, 0.5158, 0.8072), (0.1948, 0.2434, 0.1438)),
    "fitzpatrick17k": ((0.6219, 0.4917, 0.4478), (0.2279, 0.1982, 0.1991)),
    "fitzpatrick17k_12_34_56": ((0.6219, 0.4917, 0.4478), (0.2279, 0.1982, 0.1991)),
}

# The least image side the losses take: VGG19's five 2x2 max-pools leave 1 px of 32.
VGG_MIN_SIZE = 32


def untrainable(cfg: ModelConfig, *, post_conv: bool = True, vgg: bool = True) -> str | None:
    """Why a train=True model of `cfg` cannot run its losses, or None: the official code accepts such a
    config and crashes inside the losses with a shape error that names neither cause nor remedy. post_conv
    and vgg: whether the config's own post conv and VGG19 are used (a replaced one takes what it takes)."""
    k, p = cfg.post_process_conv_kernel_size, cfg.post_process_conv_padding
    if post_conv and k != 2 * p + 1:  # a stride-1 conv keeps the size only then
        return (
            f"post_process_conv_kernel_size={k} with post_process_conv_padding={p} makes the reconstruction "
            f"{cfg.input_size + 2 * p - k + 1} px wide, not input_size {cfg.input_size}: the losses compare it "
            "with the image and need kernel_size = 2 * padding + 1"
        )
    if vgg and cfg.in_channel != 3:
        return f"in_channel={cfg.in_channel}: the VGG19 loss network takes 3 channels (RGB)"
    if vgg and cfg.input_size < VGG_MIN_SIZE:
        return (
            f"input_size={cfg.input_size}: the VGG19 loss network halves the image five times and needs at "
            f"least {VGG_MIN_SIZE} px"
        )
    return None


# Official loss weights (PretrainingConfiguration): identity, consistency, anatomical, style.
LOSS_WEIGHTS = (70.0, 1.0, 7.0, 10.0)
