"""Ops where kernels meet torch. Importing this package does not import triton."""

from .shared_attention import BACKENDS, shared_attention, triton_unavailable_reason

__all__ = ["BACKENDS", "shared_attention", "triton_unavailable_reason"]
