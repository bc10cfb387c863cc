"""The fast block call: one layer's weights applied to many query streams over shared keys/values."""

import torch
import torch.nn.functional as F

from .layers.fused_linear import linear, linear_add, linear_gelu


def project_kv(blk, kv_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LN_ctx and the K/V projections of context tokens kv_in (Skv, Tk, L) -> k, v (Skv, Tk, H, d) views.

    The k_proj bias is left out: it adds q.b_k, constant along the key axis, which softmax cancels
    (shared doc 1.3). It stays in the state_dict, and in the graph with weight 0: its gradient is an
    exact zero tensor, as the official one is up to rounding, not None, which DDP's reducer would wait
    for and AdamW would not decay.
    """
    Skv, Tk, L = kv_in.shape
    attn, ln_ctx = blk.attn, blk.norm_context
    H = attn.num_heads
    cn = F.layer_norm(kv_in, (L,), ln_ctx.weight, ln_ctx.bias, ln_ctx.eps)
    w_kv = (attn.k_proj.weight, attn.v_proj.weight)  # one GEMM
    k_bias, v_bias = attn.k_proj.bias, attn.v_proj.bias
    if k_bias is None and v_bias is None:
        b_kv = None
    else:  # a bias a layer lost (surgery) is zeros; no zeros are built when both are there
        some = v_bias if k_bias is None else k_bias
        k_part = some.new_zeros(L) if k_bias is None else k_bias * 0
        b_kv = torch.cat([k_part, some.new_zeros(L) if v_bias is None else v_bias])
    k, v = linear(cn, w_kv, b_kv).view(Skv, Tk, 2, H, L // H).unbind(2)
    return k, v


def project_q(blk, q_in: torch.Tensor) -> torch.Tensor:
    """LN_in and the query projection of query tokens q_in (Sq, Tq, L) -> q (Sq, Tq, H, d)."""
    Sq, Tq, L = q_in.shape
    attn, ln_in = blk.attn, blk.norm_input
    qn = F.layer_norm(q_in, (L,), ln_in.weight, ln_in.bias, ln_in.eps)
    return linear(qn, attn.q_proj.weight, attn.q_proj.bias).view(Sq, Tq, attn.num_heads, L // attn.num_heads)


def block_with_kv(
    blk, q_in: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor, attend, q=None
):
    """f_i for query tokens q_in (Sq, Tq, L) against already projected k, v (Skv, Tk, H, d).

    kv_index: (Sq,) int32, the context sequence of each query sequence. attend(q, k, v, kv_index) is the
    shared-attention op on (S, T, H, d) views. q: `project_q(blk, q_in)` when the caller already has it
    (query rows repeated over several contexts). Returns (Sq, Tq, L) in the compute dtype.
    """
    Sq, Tq, L = q_in.shape
    attn, ln_in, mlp = blk.attn, blk.norm_input, blk.mlp
    if q is None:
        q = project_q(blk, q_in)
    o = attend(q, k, v, kv_index).reshape(Sq, Tq, L)
    u = linear_add(o, attn.out_proj.weight, attn.out_proj.bias, q_in)
    h = F.layer_norm(u, (L,), ln_in.weight, ln_in.bias, ln_in.eps)
    hidden = linear_gelu(h, mlp.fc1.weight, mlp.fc1.bias)
    return linear_add(hidden, mlp.fc2.weight, mlp.fc2.bias, u)


def block_forward(
    blk, q_in: torch.Tensor, kv_in: torch.Tensor, kv_index: torch.Tensor, attend
) -> torch.Tensor:
    """f_i for Sq query sequences at once, each attending to the context sequence kv_index[s].

    q_in: (Sq, Tq, L); kv_in: (Skv, Tk, L). LN_ctx and the K/V projections run once per context
    sequence, however many query sequences read it. Returns (Sq, Tq, L).
    """
    k, v = project_kv(blk, kv_in)
    return block_with_kv(blk, q_in, k, v, kv_index, attend)
