"""The stream schedule of the fast path: the one place that decides which block calls run, and batched how.

Per layer i the official code makes four block calls (shared doc 1.4):
    X' = f(X, X);  S' = f(S, S);  Y = f(A, S);  A' = f(X', Y)
The first three share weights and are independent, and Y reads the very K/V of S: they run as one
block call over queries [X; S; A] and contexts [X; S] (kv_index [0..B, B..2B, B..2B]). The
re-anchor A' is the second call. The last layer skips what no output reads: A' always, and X', S'
unless the content outputs are wanted (training). When the style batch is the content batch rolled
(x_style None), S^i = roll(X^i) exactly: the style stream is not computed, the stylized queries read
the content K/V of the next sample through kv_index, and z_s (= roll(z)) is not returned: the losses
roll what they need themselves. In the last layer the CLS query rows are dropped (only patch rows reach
the head); CLS stays in the keys/values.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .block import block_forward


class EncoderOutputs(NamedTuple):
    """Final-normed patch rows (B, N, L): stylized z_t; content z when asked for, and style z_s when asked
    for with an explicit style batch; else None."""

    z_t: torch.Tensor
    z: torch.Tensor | None
    z_s: torch.Tensor | None


def encode(enc, x: torch.Tensor, x_style: torch.Tensor | None, attend, keep_content: bool) -> EncoderOutputs:
    """x, x_style: (B, C, H, W); x_style None means roll(x, -1) along the batch."""
    B = x.shape[0]
    rolled = x_style is None
    own = torch.arange(B, device=x.device, dtype=torch.int32)
    nxt = (own + 1) % B  # roll(-1): sample b is styled by sample b+1
    # `content` holds the streams that attend to themselves: [X] when rolled, else [X; S] (one tensor).
    if rolled:
        content = enc.embed(x)
        self_index, style_index = own, nxt
    else:
        content = enc.embed(torch.cat([x, x_style]))
        self_index, style_index = torch.arange(2 * B, device=x.device, dtype=torch.int32), own + B
    A = content[:B]
    # One map object for every layer: the attention op inverts each map once, not once per layer.
    layer_index = torch.cat([self_index, style_index])

    depth = len(enc.blocks)
    for i, blk in enumerate(enc.blocks):
        last = i == depth - 1
        if last and not keep_content:  # only Y^{D-1} is read: stylized queries against the style context
            ctx, q_in, index = content[-B:], A, nxt if rolled else own
        else:
            ctx, q_in, index = content, torch.cat([content, A]), layer_index
        if last:
            q_in = q_in[:, 1:]
        out = block_forward(blk, q_in, ctx, index, attend)
        Y = out[-B:]
        if not last:
            A = block_forward(blk, out[:B], Y, own, attend)
        content = out[:-B]

    def norm(t):
        return F.layer_norm(t, t.shape[-1:], enc.norm.weight, enc.norm.bias, enc.norm.eps)

    if not keep_content:
        return EncoderOutputs(norm(Y), None, None)
    z = norm(content[:B])
    return EncoderOutputs(norm(Y), z, None if rolled else norm(content[B:]))
