"""f_i(Q_in, KV_in) of the shared doc, section 1.3, written as the official code computes it."""

import torch


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, drop=None) -> torch.Tensor:
    """softmax(q k^T * scale) v over all keys, no mask.  q: (B, nh, Tq, dh); k, v: (B, nh, Tk, dh).
    drop: a module applied to the weights (B, nh, Tq, Tk) first, as the official attn_drop is."""
    weights = (q @ k.transpose(-2, -1) * scale).softmax(dim=-1)
    return (weights if drop is None else drop(weights)) @ v


def cross_attention(attn, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """The official CrossAttention: queries from X, keys/values from Y, both (B, T, L) and already
    normed; returns out_proj of the attention, (B, T, L)."""
    B, T, L = X.shape
    nh = attn.num_heads
    dh = L // nh

    def heads(t):  # (B, T, L) -> (B, nh, T, dh); K/V use the query's (B, T) as in the official code
        return t.reshape(B, T, nh, dh).transpose(1, 2)

    o = attention(
        heads(attn.q_proj(X)), heads(attn.k_proj(Y)), heads(attn.v_proj(Y)), dh**-0.5, attn.attn_drop
    )
    return attn.proj_drop(attn.out_proj(o.transpose(1, 2).reshape(B, T, L)))


def cross_attention_block(blk, q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
    """One block call: queries from q_in, keys/values from kv_in.  Both (B, T, L); returns (B, T, L).

    LN_in normalises the queries and again the MLP input; LN_ctx the keys/values, even when
    q_in is kv_in (self-attention still applies two different norms). Every layer is called as a
    module, as officially (the dropouts and drop_path too): replaced layers and hooks take effect here.
    """
    u = q_in + blk.drop_path(blk.attn(blk.norm_input(q_in), blk.norm_context(kv_in)))
    return u + blk.drop_path(blk.mlp(blk.norm_input(u)))
