"""The block's linear layers, with their epilogue (bias, GELU, residual add) inside one oneDNN GEMM
for CPU inference, and plain torch ops everywhere else (their twins, which tests compare them with).

torch's CPU addmm first writes the broadcast bias into its output, then runs an MKL GEMM over it;
GELU and the residual add are one more pass each over a map. oneDNN's matmul applies all three in
its epilogue (`torch.ops.mkldnn._linear_pointwise`, the op inductor's CPU backend emits): measured on
one AVX-512 core at tiny's shapes, a plain linear 6-15% faster, fc1 + GELU 10-25%, fc2 + residual
about 15%, the same results to the last bit or within 1e-6 (bench/results/README.md, session 14).
The op has no derivative of either kind, runs fp32 (not float64), bypasses autocast's casts and is
invisible to dispatch modes as aten.linear: it is taken only for plain fp32 CPU tensors of matching
shapes, without autograd, forward-mode AD or torch.func transforms, outside autocast, dispatch modes
(FLOP counters, make_fx), compiled graphs (inductor fuses by itself) and tracing, and while
torch.backends.mkldnn.enabled.
"""

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from ..tracing import traced

_ONEDNN_LINEAR = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
)


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_like=None) -> bool:
    """Whether the oneDNN op may replace the torch ops here; out_like: a residual, which must have the
    output's shape."""
    operands = (x, weight) + (() if bias is None else (bias,)) + (() if out_like is None else (out_like,))
    return (
        _ONEDNN_LINEAR is not None
        and not traced(*operands)  # first: under dynamo it ends the checks as a constant
        and torch.backends.mkldnn.enabled
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in operands)
        and weight.dim() == 2
        and x.shape[-1:] == weight.shape[1:]
        and weight.shape[1] > 0  # K = 0: F.linear gives the bias, the op has no primitive for it
        # the op reads its bias as dense, whatever its strides
        and (bias is None or (bias.shape == weight.shape[:1] and bias.is_contiguous()))
        and (out_like is None or out_like.shape == x.shape[:-1] + weight.shape[:1])
        and not torch.is_grad_enabled()
        and forward_ad._current_level < 0
        and not torch.is_autocast_enabled("cpu")
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T + bias (N,) -> (..., N), as F.linear."""
    if _onednn(x, weight, bias):
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """GELU(F.linear(x, weight, bias)), the exact (erf) GELU of nn.GELU."""
    if _onednn(x, weight, bias):
        return _ONEDNN_LINEAR(x, weight, bias, "gelu", [], "none")
    hidden = F.linear(x, weight, bias)
    # Without autograd GELU overwrites its input: one map of 4L per token fewer to allocate, which on
    # CPU is a fresh mmap and its page faults each time (measured 3% of an eval call). Traced, one op
    # whatever the grad mode: torch.jit.trace checks its graph by tracing again under no_grad.
    in_place = not torch.is_grad_enabled() and not traced(hidden)
    return torch.ops.aten.gelu_(hidden) if in_place else F.gelu(hidden)


def linear_add(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """residual + F.linear(x, weight, bias); residual has the output's shape."""
    if _onednn(x, weight, bias, residual):
        return _ONEDNN_LINEAR.binary(x, residual, weight, bias, "add")
    return residual + F.linear(x, weight, bias)
