"""Ops where kernels meet torch. Importing this package imports neither triton nor xformers."""

from ._xformers_impl import xformers_unavailable_reason
from .shared_attention import BACKENDS, shared_attention, triton_unavailable_reason

__all__ = ["BACKENDS", "shared_attention", "triton_unavailable_reason", "xformers_unavailable_reason"]
