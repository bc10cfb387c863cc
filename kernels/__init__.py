"""Triton kernels of fastvit_style (installed as `fastvit_style.kernels`; importing it imports triton).

Launchers only: validation, allocation, block choice, launch. The torch.library ops that wrap them
live in `fastvit_style.ops`.
"""

from ._common import INTERPRET

if INTERPRET:
    from ._interpreter import fix_bf16_rounding, fix_scalar_index

    fix_scalar_index()
    fix_bf16_rounding()

from .shared_attention_bwd import shared_attention_bwd
from .shared_attention_fwd import shared_attention_fwd

__all__ = ["INTERPRET", "shared_attention_bwd", "shared_attention_fwd"]
