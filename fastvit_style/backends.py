"""Which computation a model runs: backend names, availability with reasons, and 'auto' resolution."""

import functools

import torch

from .ops import shared_attention, triton_unavailable_reason, xformers_unavailable_reason
from .ops.shared_attention import warn_auto_fallback

BACKENDS = ("auto", "reference", "torch", "triton", "xformers")


def check_backend(backend: str, head_dim: int | None = None) -> str:
    """`backend`, once it could run on some device of this installation for heads of `head_dim`;
    ValueError saying why not otherwise (a package missing or broken, a head size the kernels lack).

    The device is checked at each forward (`resolve_backend`): a model is usually built on the CPU and
    moved to the GPU afterwards, so a construction-time device check would refuse the common case.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    # CUDA is where both fused backends run: a reason given for it holds for every device.
    if backend == "triton":
        reason = triton_unavailable_reason(torch.device("cuda"), head_dim=head_dim)
    elif backend == "xformers":
        reason = xformers_unavailable_reason(torch.device("cuda"))
    else:
        reason = None
    if reason:
        raise ValueError(f"backend={backend!r} cannot run this model here: {reason}")
    return backend


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device`, or None when it can ('auto' always can: it falls back)."""
    if backend == "triton":
        return triton_unavailable_reason(device)
    if backend == "xformers":
        return xformers_unavailable_reason(device)
    return None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for `device`: an explicit one must be able to run, 'auto' picks and may fall back."""
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        reason = unavailable_reason("triton", device)
        if reason is None:
            return "triton"
        warn_auto_fallback(reason, stacklevel=2)  # once per reason, shared with the op's own fallback
        return "torch"
    reason = unavailable_reason(backend, device)
    if reason:
        raise ValueError(f"backend={backend!r} cannot run here: {reason}")
    return backend


def attention_for(backend: str, device: torch.device):
    """attend(q, k, v, kv_index): the shared-attention op the fast schedule calls for a model backend.

    'auto' stays 'auto' at the op, which also falls back per dtype and head dim; 'reference' (which has
    no fast schedule of its own) maps to the PyTorch op. The schedule builds kv_index itself, so its
    range check, a device sync per call, is skipped.
    """
    resolved = resolve_backend(backend, device)
    op_backend = "auto" if backend == "auto" else "torch" if resolved == "reference" else resolved
    return functools.partial(shared_attention, backend=op_backend, check_index=False)
