"""The block's linear layers, with their epilogue (bias, GELU, residual add) inside one oneDNN GEMM
for CPU inference, through oneDNN GEMMs with autograd for CPU training, and plain torch ops everywhere
else (their twins, which tests compare them with).

torch's CPU addmm first writes the broadcast bias into its output, then runs an MKL GEMM over it;
GELU and the residual add are one more pass each over a map. oneDNN's matmul applies all three in
its epilogue (`torch.ops.mkldnn._linear_pointwise`, the op inductor's CPU backend emits): measured on
one AVX-512 core at tiny's shapes, a plain linear 6-15% faster, fc1 + GELU 10-25%, fc2 + residual
about 15%, the same results to the last bit or within 1e-6 (bench/results/README.md, session 14).
The op has no derivative of either kind, runs fp32 (not float64), bypasses autocast's casts and is
invisible to dispatch modes as aten.linear: it is taken only for plain fp32 CPU tensors of matching
shapes, without forward-mode AD or torch.func transforms, outside autocast, dispatch modes (FLOP
counters, make_fx), compiled graphs (inductor fuses by itself) and tracing, and while
torch.backends.mkldnn.enabled; with its epilogues where no operand needs a gradient, under autograd
without them (below).

Given a plain weight, the op reorders it into oneDNN's blocked layout on every call (about 0.12 ms
for a 768x192 weight); the packed weight is therefore kept beside the weight until it changes
(`weight_stamp`): 5-10% off each GEMM at tiny's shapes, 2.5-3% off a CPU eval call with the roll
(bench/results/README.md, session 25). Results are bit-identical for two rows or more; a single row
(M = 1, another oneDNN kernel) differs by up to about 2e-6. The packed copies hold as much memory as
the block weights they come from, while those live on the CPU; `forget_packed` drops them.

In training (autograd, the same conditions otherwise) the forward and the input gradient run as oneDNN
matmuls too, the weight gradient as torch's mm (`_OneDNNLinear`): where MKL runs its GEMMs at under
half of oneDNN's speed (an AMD EPYC with Zen 5 flags, 2026-12-02, 2 threads), the training step of
tiny at 224 px took 2.49 s against 2.66 s by median (6 alternating steps, in one process; session 31).
The weights change at every step, so they go to the op unpacked.
"""

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from ..tracing import forward_ad_active, traced
from .weight_stamp import weight_stamp

_ONEDNN_LINEAR = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
)


def onednn_enabled() -> bool:
    """Whether torch has oneDNN's matmul op and it is switched on (torch.backends.mkldnn.enabled)."""
    return _ONEDNN_LINEAR is not None and torch.backends.mkldnn.enabled


# first weight of a stack -> (the stack's stamps, packed weight). Beside the weights, not on them: a
# pickle, deepcopy or torch.save of the model carries none.
_packed_of = WeakIdKeyDictionary()


def _stack(weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The weights stacked along the output features; a single one as it is (no copy)."""
    return torch.cat(weights) if len(weights) > 1 else weights[0]


def _packed(weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """_stack(weights) in oneDNN's layout, built again only when one of them has changed."""
    stamps = tuple(weight_stamp(w) for w in weights)
    cached = _packed_of.get(weights[0])
    if cached is None or cached[0] != stamps:
        packed = torch.ops.mkldnn._reorder_linear_weight(_stack(weights).detach().contiguous(), None)
        cached = _packed_of[weights[0]] = (stamps, packed)
    return cached[1]


def forget_packed(module: torch.nn.Module) -> None:
    """Drop the packed copies of `module`'s weights (its weights are being moved or cast)."""
    for p in module.parameters():
        _packed_of.pop(p, None)


class HoldsPackedWeights(torch.nn.Module):
    """A module whose weights the functions here pack (the block's Attention and Mlp): a cast or move
    (.to(), .half(), .cuda()) of it, or of a module above it, drops the packed CPU copies of its old
    weights, which would otherwise stay alive, unused."""

    def _apply(self, fn, recurse=True):
        forget_packed(self)
        return super()._apply(fn, recurse)


def _onednn(
    x: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    bias: torch.Tensor | None,
    out_like=None,
    grad: bool = False,
) -> bool:
    """Whether the oneDNN op may replace the torch ops here; weights: stacked along the output features;
    out_like: a residual, which must have the output's shape. grad: asked for a call that autograd must
    differentiate (`_OneDNNLinear`), else for one that needs no gradient (grad mode off, or no operand
    requiring one: a model run without torch.no_grad takes the packed epilogues all the same)."""
    operands = weights + (() if bias is None else (bias,)) + (() if out_like is None else (out_like,))
    n_out = sum(w.shape[0] for w in weights if w.dim() == 2)
    return (
        not traced(*operands)  # first: under dynamo it ends the checks as a constant
        and onednn_enabled()
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (x,) + operands)
        and all(w.dim() == 2 and x.shape[-1:] == w.shape[1:] for w in weights)
        and x.shape[-1] > 0  # K = 0: F.linear gives the bias, the op has no primitive for it
        and n_out > 0  # N = 0: nor for no outputs (given a plain weight it coped; a packed one fails)
        # the op reads its bias as dense, whatever its strides
        and (bias is None or (bias.shape == (n_out,) and bias.is_contiguous()))
        and (out_like is None or out_like.shape == x.shape[:-1] + (n_out,))
        and (torch.is_grad_enabled() and any(t.requires_grad for t in (x,) + operands)) == grad
        and not forward_ad_active()
        and not torch.is_autocast_enabled("cpu")
    )


class _OneDNNLinear(torch.autograd.Function):
    """F.linear(x, weight, bias) with its forward and input gradient as oneDNN matmuls, its weight
    gradient as torch's mm (oneDNN would need both operands transposed into copies first)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        # as F.linear: x only for the weight gradient, the weight only for x's; saving both would fail
        # on an inference tensor and on an in-place change that F.linear allows, and keep x alive
        need_x, need_w, _ = ctx.needs_input_grad
        ctx.save_for_backward(x if need_w else None, weight if need_x else None)
        ctx.has_bias = bias is not None
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: ops that autograd records
            dx = grad @ weight if need_x else None
        else:
            dx = (
                _ONEDNN_LINEAR(grad.contiguous(), weight.t().contiguous(), None, "none", [], "")
                if need_x
                else None
            )
        rows = grad.reshape(-1, grad.shape[-1])
        dw = rows.t() @ x.reshape(-1, x.shape[-1]) if need_w else None
        db = rows.sum(0) if ctx.has_bias and need_b else None
        return dx, dw, db


def _linear(x: torch.Tensor, weights: tuple[torch.Tensor, ...], bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear with the stacked weights, its GEMMs through oneDNN under autograd where it applies."""
    if _onednn(x, weights, bias, grad=True):
        return _OneDNNLinear.apply(x, _stack(weights), bias)
    return F.linear(x, _stack(weights), bias)


def linear(
    x: torch.Tensor, weight: torch.Tensor | tuple[torch.Tensor, ...], bias: torch.Tensor | None
) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T + bias (N,) -> (..., N), as F.linear. weight may be a tuple of
    (N_i, K) weights, stacked along N (one GEMM for the K and V projections of the same tokens)."""
    weights = weight if isinstance(weight, tuple) else (weight,)
    if _onednn(x, weights, bias):
        return _ONEDNN_LINEAR(x, _packed(weights), bias, "none", [], "")
    return _linear(x, weights, bias)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """GELU(F.linear(x, weight, bias)), the exact (erf) GELU of nn.GELU."""
    if _onednn(x, (weight,), bias):
        return _ONEDNN_LINEAR(x, _packed((weight,)), bias, "gelu", [], "none")
    hidden = _linear(x, (weight,), bias)
    # Without autograd GELU overwrites its input: one map of 4L per token fewer to allocate, which on
    # CPU is a fresh mmap and its page faults each time (measured 3% of an eval call). Traced, one op
    # whatever the grad mode: torch.jit.trace checks its graph by tracing again under no_grad.
    in_place = not torch.is_grad_enabled() and not traced(hidden)
    return torch.ops.aten.gelu_(hidden) if in_place else F.gelu(hidden)


def linear_add(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """residual + F.linear(x, weight, bias); residual has the output's shape."""
    if _onednn(x, (weight,), bias, residual):
        return _ONEDNN_LINEAR.binary(x, residual, _packed((weight,)), bias, "add")
    return residual + _linear(x, (weight,), bias)
