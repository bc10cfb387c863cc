import torch
from torch import nn

from ..reference.attention import cross_attention, cross_attention_block
from .fused_linear import HoldsPackedWeights
from .mlp import Mlp
from .placeholders import add_missing, no_dropout


class Attention(HoldsPackedWeights):
    """Parameters of one multi-head attention: separate q/k/v/out projections, as in the official checkpoints."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)
        self.attn_drop = no_dropout()  # official identities (`placeholders`)
        self.proj_drop = no_dropout()

    def __setstate__(self, state):
        super().__setstate__(state)
        add_missing(self, attn_drop=no_dropout, proj_drop=no_dropout)

    @property
    def head_dim(self) -> int:
        return self.q_proj.in_features // self.num_heads

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5

    def forward(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """The official CrossAttention call: X (B, T, L) normed queries, Y (B, T, L) normed keys/values."""
        return cross_attention(self, X, Y)


class CrossAttentionBlock(nn.Module):
    """One layer f_i(Q_in, KV_in) (shared doc 1.3); its weights serve every stream of the layer.

    Only two LayerNorms: `norm_input` normalises the queries and, again, the MLP input;
    `norm_context` normalises the keys/values. The math lives in `reference.attention` (the
    specification) and `block` (the batched fast path). The fast path never calls this module (it
    refuses replaced or hooked layers: `unmodified`); backend='reference' and a direct call do.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, norm_eps: float = 1e-6
    ):
        super().__init__()
        self.norm_input = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_context = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = nn.Identity()  # an official identity (`placeholders`)

    def __setstate__(self, state):
        super().__setstate__(state)
        add_missing(self, drop_path=nn.Identity)

    def forward(self, X: torch.Tensor, Y: torch.Tensor | None = None) -> torch.Tensor:
        """The official block call: X (B, T, L) queries, Y (B, T, L) keys/values; with Y None, X as it is
        (the official quirk)."""
        return X if Y is None else cross_attention_block(self, X, Y)
