from torch import nn

from ..configs import LAYERNORM_EPS
from .mlp import Mlp


class Attention(nn.Module):
    """Parameters of one multi-head attention: separate q/k/v/out projections, as in the official checkpoints."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)


class CrossAttentionBlock(nn.Module):
    """One layer f_i(Q_in, KV_in) (shared doc 1.3); its weights serve every stream of the layer.

    Only two LayerNorms: `norm_input` normalises the queries and, again, the MLP input;
    `norm_context` normalises the keys/values. The math lives in `reference.attention` (the
    specification) and `fast_block` (the batched fast path); this class only holds parameters.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm_input = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.norm_context = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
