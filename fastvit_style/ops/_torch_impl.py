"""PyTorch path of shared_attention: gather K/V per query sequence, then SDPA.

Plain torch ops only, so autocast, autograd and torch.compile(fullgraph=True) see through it. It is
the CPU path and, evaluated in float64, the reference the Triton kernels are tested against.
"""

import torch
import torch.nn.functional as F

from ..tracing import traced


def shared_attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor, scale: float
) -> torch.Tensor:
    """q: (Sq, Tq, H, d); k, v: (Skv, Tk, H, d); kv_index: (Sq,) int32/int64 -> (Sq, Tq, H, d) in q's dtype.

    K/V are duplicated per query sequence (Sq x Tk x H x d each); their gradients are summed back
    by index_select's backward.
    """
    k = k.index_select(0, kv_index)
    v = v.index_select(0, kv_index)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return carry_nan_rows(out.transpose(1, 2), q)


def carry_nan_rows(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """out (S, T, H, d), a fused kernel's fresh output, with NaN in every row whose query row holds a
    NaN or inf, as the formula gives (and the Triton kernels): SDPA's CPU kernels give zeros there
    (their running max skips NaN). Zero times the row's largest magnitude carries it (a sum could
    overflow a finite fp16 row, and CUDA autocast would widen it); in place where autograd does not
    need the kernel's output (there about 4% of a CPU attention call, 9% out of place)."""
    carrier = q.abs().amax(-1, keepdim=True) * 0  # amax's backward reads its output: not in place
    # Traced, one op whatever the grad mode: torch.jit.trace checks its graph by tracing again under no_grad.
    return out + carrier if torch.is_grad_enabled() or traced(out) else out.add_(carrier)
