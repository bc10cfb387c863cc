"""shared_attention: attention of many query sequences over shared K/V sequences, and its backends.

The one module where the Triton kernels meet torch: two `torch.library.custom_op`s (forward,
backward) with fake implementations and an autograd formula, so the Triton path runs in eager,
under the Triton interpreter and inside torch.compile(fullgraph=True). Triton is imported only
when the Triton backend runs.
"""

import importlib.util
import math
import numbers
import warnings

import torch
from torch import Tensor

from ..devices import autocast_dtype
from ..tracing import forward_ad_active, has_values, traced
from ._index_maps import check_index_range, inverse_kv_map, shared_inverse
from ._torch_impl import shared_attention_sliced
from ._xformers_impl import shared_attention_xformers, xformers_unavailable_reason

BACKENDS = ("auto", "torch", "triton", "xformers")
_INDEX_DTYPES = (torch.int32, torch.int64)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPES = (*_TRITON_DTYPES, torch.float64)
# Why triton cannot be imported, or None. A missing package is found without importing anything (and
# without a failed import, which torch.compile cannot trace); a failed import is kept, since Python
# would retry it on every call.
_triton_error = None if importlib.util.find_spec("triton") else "the triton package is not installed"
# The CUDA kernels behind the torch path (SDPA's flash and memory-efficient) and xformers put the query
# sequences on a grid axis that stops at 65535 (pytorch#146704, xformers#845): larger calls run in
# chunks of sequences there (the Triton kernels have no such limit).
_MAX_SEQUENCES_PER_CALL = 65535
_CHUNKED_DEVICES = ("cuda",)
# The kernels multiply the logits by scale * log2(e) in float32: a larger scale overflows there.
_MAX_SCALE = torch.finfo(torch.float32).max / math.log2(math.e)


def shared_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_index: Tensor,
    scale: float | None = None,
    backend: str = "auto",
    *,
    check_index: bool = True,
) -> Tensor:
    """softmax(q[s] k[j]^T * scale) v[j] for every query sequence s, with j = kv_index[s]; no mask.

    q: (Sq, Tq, H, d); k, v: (Skv, Tk, H, d); one dtype among fp32, fp16, bf16 (float64 on the
    torch backend only), any strides (views of projection outputs need no copy). kv_index: (Sq,)
    int32/int64 on the same device, values in [0, Skv); several query sequences may share a K/V
    sequence and some K/V sequences may be unused. Tq may differ from Tk. scale defaults to d**-0.5.
    The range of kv_index is checked in eager mode only (one device sync per new or edited map),
    never under torch.compile or CUDA graph capture: there the Triton kernels clamp an out-of-range
    entry into range (a wrong result, never a read outside K/V), and the PyTorch path's gather fails.
    Under autocast, q/k/v are first cast to the autocast dtype (as SDPA does).

    backend: "triton" (fused kernels; CUDA tensors, or CPU tensors with TRITON_INTERPRET=1),
    "torch" (K/V gathered per query sequence, then SDPA), "xformers" (K/V gathered, then xformers'
    memory_efficient_attention; CUDA, when installed), or "auto" (triton for CUDA tensors when
    triton is installed and supports the dtype and d, else torch; never xformers).
    check_index=False skips the eager range check of kv_index (a device sync): for callers that
    build the map themselves, like the model's schedule.
    Returns (Sq, Tq, H, d) in q's dtype; differentiable in q, k and v (reverse mode; forward mode on the
    PyTorch path only: the Triton backend refuses it). Under the differentiating torch.func transforms
    (grad, vjp, jacrev, jvp), whose derivatives the custom ops cannot take, "auto" runs the PyTorch path
    and "triton" raises NotImplementedError; vmap alone runs either. On the Triton backend, K/V
    made under inference_mode pass a gradient to q in eager mode only: compiled, AOT autograd cannot save
    them for backward ("Inference tensors cannot be saved"); clone them before the compiled call.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("kv_index", kv_index)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(check_index, bool):  # a string "no" would be true
        raise ValueError(f"check_index must be True or False, got {check_index!r}")
    if (dtype := autocast_dtype(q.device.type)) is not None:
        q, k, v = (t.to(dtype) if t.dtype in _TRITON_DTYPES else t for t in (q, k, v))
    _check_inputs(q, k, v, kv_index, check_index)
    backend = _resolve_backend(backend, q)
    scale = q.shape[-1] ** -0.5 if scale is None else _finite_scale(scale)
    if backend == "torch":
        return _in_sequence_chunks(shared_attention_sliced, q, k, v, kv_index, scale)
    if backend == "xformers":
        return _in_sequence_chunks(shared_attention_xformers, q, k, v, kv_index, scale)
    return _triton_attention(q, k, v, kv_index, scale)


def _in_sequence_chunks(attention, q: Tensor, k: Tensor, v: Tensor, kv_index: Tensor, scale: float) -> Tensor:
    """attention(q, k, v, kv_index, scale), over at most _MAX_SEQUENCES_PER_CALL query sequences a call
    on the devices whose kernels need it."""
    n = _MAX_SEQUENCES_PER_CALL
    if q.device.type not in _CHUNKED_DEVICES or q.shape[0] <= n:
        return attention(q, k, v, kv_index, scale)
    return torch.cat(
        [attention(q[i : i + n], k, v, kv_index[i : i + n], scale) for i in range(0, q.shape[0], n)]
    )


def _finite_scale(scale) -> float:
    # A Python (or NumPy) number: a tensor would be read once in eager mode (its gradient dropped) and
    # be a data-dependent guard under torch.compile.
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not abs(scale) <= _MAX_SCALE:
        raise ValueError(
            f"scale must be a finite real number of at most {_MAX_SCALE:.3g} in magnitude (a Python float, "
            f"not a tensor; or None for d**-0.5), got {scale!r}"
        )
    return float(scale)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, kv_index: Tensor, check_index: bool = True) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (S, T, H, d), got shape {tuple(t.shape)}")
    if q.shape[-1] < 1:
        raise ValueError(f"the head dim d of q, k and v must be at least 1, got shape {tuple(q.shape)}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q must have dtype in {_DTYPES}, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[2:] != k.shape[2:]:
        raise ValueError(
            "q and k/v must have the same heads and head dim (H, d), "
            f"got {tuple(q.shape[2:])} and {tuple(k.shape[2:])}"
        )
    Sq, Skv, Tk = q.shape[0], k.shape[0], k.shape[1]
    if kv_index.dim() != 1 or kv_index.shape[0] != Sq:
        raise ValueError(
            f"kv_index must have shape ({Sq},) (one entry per query sequence), got {tuple(kv_index.shape)}"
        )
    if kv_index.dtype not in _INDEX_DTYPES:
        raise ValueError(f"kv_index must have an integer dtype in {_INDEX_DTYPES}, got {kv_index.dtype}")
    for name, t in (("k", k), ("v", v), ("kv_index", kv_index)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on the same device as q ({q.device}), got {t.device}")
    if Sq > 0 and (Skv < 1 or Tk < 1):
        raise ValueError(
            f"k and v need at least one sequence and key (Skv, Tk >= 1) when Sq > 0, got Skv={Skv}, Tk={Tk}"
        )
    # Reading kv_index syncs the device and would break the graph: eager mode, on a map with values.
    if check_index and Sq > 0 and not torch.compiler.is_compiling() and has_values(kv_index):
        check_index_range(kv_index, Skv)


def _resolve_backend(backend: str, q: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    # 'auto' keeps CPU tensors on PyTorch: the Triton interpreter is a testing aid, far slower.
    if backend == "torch" or (backend == "auto" and not q.is_cuda):
        return "torch"
    if backend == "xformers":
        reason = xformers_unavailable_reason(q.device, q.dtype)
        if reason:
            raise ValueError(f"backend='xformers' cannot run here: {reason}")
        return backend
    reason = triton_unavailable_reason(q.device, q.dtype, q.shape[-1])
    if reason is None:
        transform = _differentiating_transform()
        if transform is None:
            return "triton"
        if backend == "auto":
            return "torch"
        what, why = (
            ("forward-mode AD (torch.func.jvp, dual tensors)", "its kernels have no forward derivative")
            if transform == "jvp"
            else ("torch.func.grad, vjp and jacrev", "its custom ops cannot be differentiated inside them")
        )
        raise NotImplementedError(
            f"the Triton backend of shared_attention does not implement {what} ({why}): use backend='torch' "
            "or 'auto'" + ("" if transform == "jvp" else ", or torch.autograd.grad")
        )
    if backend == "auto":
        if not torch.compiler.is_compiling():  # eager calls warn; a compiled graph warns nothing
            warn_auto_fallback(reason, stacklevel=3)  # the caller of shared_attention
        return "torch"
    raise ValueError(f"backend='triton' cannot run here: {reason}")


# The reasons backend='auto' has warned about, the op's and the model's (`backends.resolve_backend`) alike.
_fallbacks_warned: set[str] = set()


def warn_auto_fallback(reason: str, stacklevel: int = 1) -> None:
    """Warn that backend='auto' runs the PyTorch path where the Triton one cannot run, once per reason
    and process. stacklevel as for warnings.warn, counted from the function that calls this one."""
    if reason in _fallbacks_warned:
        return
    _fallbacks_warned.add(reason)
    warnings.warn(f"backend='auto' falls back to the PyTorch path: {reason}", stacklevel=stacklevel + 1)


def _differentiating_transform() -> str | None:
    """'jvp' or 'grad' (grad, vjp, jacrev) when such a torch.func transform wraps this eager call, else None.
    'jvp' too inside torch.autograd.forward_ad.dual_level (dual tensors), whose tangents the Triton
    path cannot carry either."""
    if torch.compiler.is_compiling():
        return None
    if forward_ad_active():
        return "jvp"
    if not torch._C._are_functorch_transforms_active():
        return None
    from torch._C._functorch import TransformType, get_interpreter_stack

    keys = {layer.key() for layer in get_interpreter_stack() or ()}
    if TransformType.Jvp in keys:  # the custom op alone would carry a zero tangent without a word
        return "jvp"
    return "grad" if TransformType.Grad in keys else None


def triton_unavailable_reason(
    device: torch.device, dtype: torch.dtype | None = None, head_dim: int | None = None
) -> str | None:
    """Why the Triton path cannot run on `device` (and for `dtype` and `head_dim` when given), or None.

    The one decision behind both the op's backend and the model's (`fastvit_style.backends`). It reads
    only the device, dtype and shape, never tensor values, so it is safe inside torch.compile.
    """
    global _triton_error
    if _triton_error is None:
        try:
            import triton  # noqa: F401  (once imported, a lookup that torch.compile traces)
        except Exception as exc:  # a broken install is as unusable as a missing one
            _triton_error = f"triton cannot be imported ({type(exc).__name__}: {exc})"
    if _triton_error:
        return _triton_error
    from ..kernels import _common

    if dtype is not None and dtype not in _TRITON_DTYPES:
        return f"dtype {dtype} unsupported by the Triton backend (fp32, fp16, bf16 only)"
    lo, hi = _common.MIN_HEAD_DIM, _common.MAX_HEAD_DIM
    if head_dim is not None and not lo <= head_dim <= hi:
        return f"head dim d={head_dim} unsupported by the Triton kernels (need {lo} <= d <= {hi})"
    # The flag the kernels were defined under, not today's environment: triton reads it once.
    if device.type == "cpu" and not _common.INTERPRET:
        return (
            "CPU tensors given to the Triton backend outside interpreter mode "
            "(set TRITON_INTERPRET=1 before importing triton)"
        )
    if device.type not in ("cpu", "cuda"):
        return (
            f"device {device.type} unsupported by the Triton backend (CUDA, or CPU with TRITON_INTERPRET=1)"
        )
    return None


def _triton_forward(q: Tensor, k: Tensor, v: Tensor, kv_index: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    from ..kernels import shared_attention_fwd

    return shared_attention_fwd(q, k, v, kv_index, scale)


def _triton_backward(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    kv_index: Tensor,
    scale: float,
    inverse: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels import shared_attention_bwd

    kv_offsets, kv_queries = inverse_kv_map(kv_index, k.shape[0]) if inverse is None else inverse
    return shared_attention_bwd(do, q, k, v, out, lse, kv_index, kv_offsets, kv_queries, scale)


@torch.library.custom_op("fastvit_style::shared_attention_fwd", mutates_args=())
def shared_attention_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, kv_index: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Triton forward. Returns out (Sq, Tq, H, d) contiguous in q's dtype and lse (Sq, H, Tq) fp32,
    the row log-sum-exp of the scaled logits in base 2 (log2(e) times the natural one)."""
    return _triton_forward(q, k, v, kv_index, scale)


@shared_attention_fwd_op.register_fake
def _(q, k, v, kv_index, scale):
    Sq, Tq, H, d = q.shape
    return q.new_empty((Sq, Tq, H, d)), q.new_empty((Sq, H, Tq), dtype=torch.float32)


@torch.library.custom_op("fastvit_style::shared_attention_bwd", mutates_args=())
def shared_attention_bwd_op(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kv_index: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward. Returns dq (Sq, Tq, H, d) and dk, dv (Skv, Tk, H, d), contiguous, in q's dtype."""
    return _triton_backward(do, q, k, v, out, lse, kv_index, scale)


@shared_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, kv_index, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_index, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, kv_index, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, kv_index, out, lse = ctx.saved_tensors
    dq, dk, dv = shared_attention_bwd_op(dout, q, k, v, out, lse, kv_index, ctx.scale)
    return dq, dk, dv, None, None


shared_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerTritonAttention(torch.autograd.Function):
    """The custom ops' autograd without their dispatch, for eager calls on plain tensors that need a
    derivative (the others run the launcher alone).

    torch.compile needs the custom ops, but in eager mode their dispatch (the op, its autograd
    wrapper, the backward op) costs more host time than the three kernel launches it wraps; see
    `bench/profile_shared_attention.py --host`. Both run the same launchers.
    """

    # forward(ctx, ...) rather than a separate setup_context: with one, every apply() binds its
    # arguments through inspect.signature, tens of microseconds.
    @staticmethod
    def forward(ctx, q, k, v, kv_index, scale):
        output = _triton_forward(q, k, v, kv_index, scale)
        # Inference tensors cannot be saved for backward (a bank made under inference_mode, read by
        # queries that need a gradient): a copy can.
        k, v, kv_index = (t.clone() if t.is_inference() else t for t in (k, v, kv_index))
        _setup_context(ctx, (q, k, v, kv_index, scale), output)
        ctx.inverse = shared_inverse(kv_index, k.shape[0])  # one inversion for all layers reading the map
        return output

    @staticmethod
    def backward(ctx, dout, _dlse):
        if torch.is_grad_enabled() or traced(dout):
            # create_graph=True: the custom op, whose missing formula makes a second backward raise (as
            # on the compiled path) rather than return nothing; compiled autograd, make_fx, batched
            # gradients (is_grads_batched, jacobian): an op they can trace or batch.
            return _backward(ctx, dout, _dlse)
        q, k, v, kv_index, out, lse = ctx.saved_tensors
        inverse = ctx.inverse.get(kv_index)
        dq, dk, dv = _triton_backward(dout, q, k, v, out, lse, kv_index, ctx.scale, inverse)
        return dq, dk, dv, None, None


def _triton_attention(q: Tensor, k: Tensor, v: Tensor, kv_index: Tensor, scale: float) -> Tensor:
    # The kernels read the map as a plain array (a strided or expanded one would be misread); a
    # contiguous map is returned as it is, so the per-map caches of the model's layers still hit.
    kv_index = kv_index.contiguous()
    if traced(q, k, v, kv_index):  # tracers and transforms must see the custom op, not launches
        return shared_attention_fwd_op(q, k, v, kv_index, scale)[0]
    backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not backward and not forward_ad_active():
        # No derivative can follow (eval, TTA): the launcher alone, without the Function's bookkeeping.
        # Dual tensors (forward-mode AD) still go to the Function, which refuses them.
        return _triton_forward(q, k, v, kv_index, scale)[0]
    return _EagerTritonAttention.apply(q, k, v, kv_index, scale)[0]
