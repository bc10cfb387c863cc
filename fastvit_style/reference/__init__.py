"""The specification in code: a plain transcription of the official computation, quirks included.

No optimisation lives here. Every fast path is tested against these functions, typically in float64.
"""

from .attention import attention, cross_attention, cross_attention_block
from .losses import Loss, compute_loss
from .model import encode, forward, reconstruct

__all__ = [
    "Loss",
    "attention",
    "compute_loss",
    "cross_attention",
    "cross_attention_block",
    "encode",
    "forward",
    "reconstruct",
]
