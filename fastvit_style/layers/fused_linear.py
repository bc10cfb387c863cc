"""The block's linear layers, with their epilogue (bias, GELU, residual add) inside one oneDNN GEMM
for CPU inference, and plain torch ops everywhere else (their twins, which tests compare them with).

torch's CPU addmm first writes the broadcast bias into its output, then runs an MKL GEMM over it;
GELU and the residual add are one more pass each over a map. oneDNN's matmul applies all three in
its epilogue (`torch.ops.mkldnn._linear_pointwise`, the op inductor's CPU backend emits): measured on
one AVX-512 core at tiny's shapes, a plain linear 6-15% faster, fc1 + GELU 10-25%, fc2 + residual
about 15%, the same results to the last bit or within 1e-6 (bench/results/README.md, session 14).
The op has no derivative, runs fp32 (not float64) and bypasses autocast's casts: it is taken only
without autograd, in fp32, outside autocast, in eager mode (compiled graphs get inductor's own
fusion) and outside tracing.
"""

import torch
import torch.nn.functional as F

_ONEDNN_LINEAR = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
)


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        _ONEDNN_LINEAR is not None
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T + bias (N,) -> (..., N), as F.linear."""
    if _onednn(x, weight):
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """GELU(F.linear(x, weight, bias)), the exact (erf) GELU of nn.GELU."""
    if _onednn(x, weight):
        return _ONEDNN_LINEAR(x, weight, bias, "gelu", [], "none")
    hidden = F.linear(x, weight, bias)
    # Without autograd GELU overwrites its input: one map of 4L per token fewer to allocate, which on
    # CPU is a fresh mmap and its page faults each time (measured 3% of an eval call).
    return F.gelu(hidden) if torch.is_grad_enabled() else torch.ops.aten.gelu_(hidden)


def linear_add(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """residual + F.linear(x, weight, bias); residual has the output's shape."""
    if _onednn(x, weight) and residual.dtype == torch.float32:
        return _ONEDNN_LINEAR.binary(x, residual, weight, bias, "add")
    return residual + F.linear(x, weight, bias)
