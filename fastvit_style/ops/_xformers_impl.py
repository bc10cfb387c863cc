"""xformers path of shared_attention: gather K/V per query sequence, then memory_efficient_attention.

The op's (S, T, H, d) layout is xformers' own BMHK, so the projections' views go in as they are. Like
the PyTorch path it duplicates K/V per query sequence (index_select, whose backward sums dK/dV back):
xformers has no map from query to K/V sequences. It exists for users who standardise on xformers and
as a baseline; the Triton kernels read shared K/V in place.
"""

import torch

from ._torch_impl import carry_nan_rows

# Where xformers' memory_efficient_attention has kernels. The tests widen it to run a stand-in on CPU.
DEVICES = ("cuda",)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def xformers_unavailable_reason(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why the xformers path cannot run on `device` (and for `dtype` when given), or None."""
    try:
        import xformers.ops  # noqa: F401  (found in sys.modules after the first success)
    except ModuleNotFoundError:
        return "the xformers package is not installed (pip install xformers, a build matching your torch)"
    except Exception as exc:  # a broken install is as unusable as a missing one
        return f"xformers cannot be imported ({type(exc).__name__}: {exc})"
    if device.type not in DEVICES:
        return f"xformers' memory_efficient_attention has no {device.type} kernels (it runs on {DEVICES})"
    if dtype is not None and dtype not in _DTYPES:
        return f"dtype {dtype} unsupported by the xformers backend (fp32, fp16, bf16 only)"
    return None


def shared_attention_xformers(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor, scale: float
) -> torch.Tensor:
    """q: (Sq, Tq, H, d); k, v: (Skv, Tk, H, d); kv_index: (Sq,) int32/int64 -> (Sq, Tq, H, d) in q's dtype."""
    import xformers.ops as xops

    # xformers reads each head's d values as one contiguous row; the projections' views already are.
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = xops.memory_efficient_attention(
        q, k.index_select(0, kv_index), v.index_select(0, kv_index), scale=scale
    )
    return carry_nan_rows(out, q, k, kv_index)
