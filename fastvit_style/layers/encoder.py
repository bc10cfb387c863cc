import functools

import torch
from torch import nn

from ..configs import ModelConfig, config_property
from ..devices import autocast_dtype, check_input_dtype
from ..reference.model import encode
from .attention_block import CrossAttentionBlock
from .patch_embed import PatchEmbed


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table with a zero CLS row: (grid*grid + 1, dim), float64.

    The first dim/2 channels embed the patch column, the last dim/2 the row (MAE's "w goes first").
    """

    def one_d(pos: torch.Tensor, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    table = torch.cat([one_d(cols, dim // 2), one_d(rows, dim // 2)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table])


class ViTEncoder(nn.Module):
    """The official `ViT` parameters: cls_token, learned pos_embed (CLS slot included), blocks, final norm.

    The model's forward runs them on the fast schedule (`schedule.encode`), not through this module's
    forward, which computes the official one (for code that calls the encoder itself).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        L = config.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, L))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, L))
        self.patch_embed = PatchEmbed(config.patch_size, config.in_channel, L, config.input_size)
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(L, config.num_heads, config.mlp_ratio, config.qkv_bias, config.norm_eps)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(L, eps=config.norm_eps)
        self.grid = config.grid
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official init (shared doc 2.1); only matters when training from scratch."""
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed(self.pos_embed.shape[-1], self.grid).unsqueeze(0))
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        """The official per-module init: xavier-uniform linears with zero biases, unit LayerNorms."""
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, X: torch.Tensor, X_style: torch.Tensor):
        """The official encoder forward: final-normed content, style and stylized tokens, each (B, T, L)."""
        self.check_images(X, X_style)
        return encode(self, X, X_style)

    def check_images(
        self, x, x_style, names: tuple[str, str] = ("X", "X_style"), style_optional: bool = False
    ) -> None:
        """ValueError/TypeError naming the argument (`names`: what the caller calls x and x_style)
        unless both are (B, C, S, S) image batches of the model's dtype and device; with
        style_optional, x_style may be None (the model's forward rolls x into it)."""
        cfg = self.config
        C, S = cfg.in_channel, cfg.input_size
        param = self.pos_embed
        # Under autocast its convolutions cast the images to the autocast dtype, as officially: a float32
        # model, or one in that dtype, takes images in either (check_input_dtype).
        amp = autocast_dtype(param.device.type)
        if amp is not None and param.dtype in (torch.float16, torch.bfloat16) and param.dtype != amp:
            # Autocast casts the weights of its GEMMs and convolutions, not the class token and position
            # embedding: their concatenation with the patch tokens mixes the two half dtypes, which
            # autocast refuses deep inside ("Unexpected floating ScalarType").
            raise ValueError(
                f"the model's parameters are {param.dtype}, which {amp} autocast cannot run (it casts "
                f"only some of them to {amp}): run the model outside autocast, or keep it in float32 "
                "under autocast"
            )
        for name, t in zip(names, (x,) if x_style is None and style_optional else (x, x_style)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4 or t.shape[1] != C or tuple(t.shape[2:]) != (S, S):
                raise ValueError(
                    f"{name} must have shape (B, {C}, {S}, {S}) (a batch of {C}-channel {S}x{S} images, "
                    f"resized and normalized as in training), got {tuple(t.shape)}"
                )
            if t.shape[0] == 0:
                raise ValueError(f"{name} is an empty batch: at least one image is needed")
            if not t.is_floating_point():  # "convert one of them" would invite image.float(), 0-255 values
                raise ValueError(
                    f"{name} has dtype {t.dtype}, but the model takes floating-point images normalized as in "
                    f"training, {param.dtype} (e.g. image.to({param.dtype}) / 255, then the dataset's mean and std)"
                )
            check_input_dtype(name, t, param, "the model")
            if t.device != param.device:
                raise ValueError(f"{name} is on {t.device} but the model is on {param.device}")
        if x_style is not None and x_style.shape != x.shape:
            raise ValueError(
                f"{names[1]} must have the same shape as {names[0]} (one style image per content image), "
                f"got {names[0]} {tuple(x.shape)} and {names[1]} {tuple(x_style.shape)}"
            )

    # The official encoder's attributes, read-only (the weights' shapes fix them), and its getters.
    input_size = config_property("input_size")
    in_channel = config_property("in_channel")
    patch_size = config_property("patch_size")
    embed_dim = config_property("embed_dim")
    depth = config_property("depth")
    num_heads = config_property("num_heads")
    mlp_ratio = config_property("mlp_ratio")
    qkv_bias = config_property("qkv_bias")
    num_patches = config_property("num_patches")

    @property
    def norm_layer(self):
        return functools.partial(nn.LayerNorm, eps=self.config.norm_eps)

    def get_input_size(self) -> int:
        return self.config.input_size

    def get_patch_size(self) -> int:
        return self.config.patch_size

    def get_in_channel(self) -> int:
        return self.config.in_channel

    def get_embed_dim(self) -> int:
        return self.config.embed_dim

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, T, L) tokens: patches, CLS prepended, position embedding added."""
        tokens = self.patch_embed(x)
        # Expanded from (1, L), so its backward is a sum into a fresh tensor at any batch size: expanded
        # in place, a batch of 1 handed cls_token a strided view of the tokens' gradient as its .grad,
        # which DDP warns about at every step (its bucket views take the parameter's strides).
        cls = self.cls_token[0].expand(tokens.shape[0], 1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed
