"""Fixes for Triton's interpreter (TRITON_INTERPRET=1), applied only where the installed Triton needs them.

- Scalars: the interpreter holds every scalar as a one-element array and gives it `__index__` as
  `int(handle.data)`, which NumPy >= 2.4 refuses for arrays of ndim > 0 (and NumPy 1.25 to 2.3
  deprecates): a kernel's `range(0, Tk, BLOCK_N)` then raises "only 0-dimensional arrays can be
  converted to Python scalars". Triton fixed it upstream (issue 9171, pull request 9172, January
  2026); Triton 3.6, which the GPU machines carry beside NumPy 2.5, does not have the fix.
- bf16 rounding: the interpreter converts fp32 to bf16 by truncation (toward zero), the GPU to the
  nearest (cvt.rn.bf16.f32), as torch does. Every bf16 store of the kernels (out, dq, dk, dv) was a
  truncation on CPU, and the backward's rowsum(dO * O) read a truncated O: the bf16 tests held the
  kernels to other numbers than the GPU's (Triton 3.6 and 3.9 alike).
Each check is by behaviour, not by version, and anything it does not recognise is left alone.
"""

import operator
import warnings
from types import SimpleNamespace

import numpy as np


def _index(tensor) -> int:
    return int(tensor.handle.data.squeeze())  # upstream's fix


def _has_the_bug(interpreter) -> bool:
    """Whether the interpreter's tensor patch gives a scalar held as a (1,) array an `__index__` that
    NumPy refuses or warns about. False for a patch laid out otherwise (other names, arguments or
    attributes): the fix is for Triton 3.6's layout only."""

    class Probe:
        pass

    try:
        scope = interpreter._LangPatchScope()
        interpreter._patch_lang_tensor(Probe, scope)
        try:
            if "__index__" not in vars(Probe):
                return False
            probe = Probe.__new__(Probe)
            probe.handle = SimpleNamespace(data=np.array([3]))
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)
                try:
                    return operator.index(probe) != 3
                except (TypeError, DeprecationWarning):
                    return True
        finally:
            scope.restore()
    except Exception:
        return False


def fix_scalar_index(interpreter=None) -> None:
    """Make interpreted kernels' scalars usable as Python ints (`range` bounds) on any NumPy, where the
    interpreter has the bug; otherwise (or if the fix does not take) leave it as it is.
    interpreter: the module to fix (default: triton.runtime.interpreter)."""
    if interpreter is None:
        from triton.runtime import interpreter
    if not _has_the_bug(interpreter):
        return
    patch = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope, *args, **kwargs):
        patch(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", _index)

    interpreter._patch_lang_tensor = patch_lang_tensor
    if _has_the_bug(interpreter):
        interpreter._patch_lang_tensor = patch


# 1 + 2^-8 + 2^-10: above the midpoint of bf16's 1 and 1 + 2^-7, so nearest gives 0x3F81, truncation 0x3F80.
_PROBE, _NEAREST, _TRUNCATED = 1 + 2**-8 + 2**-10, 0x3F81, 0x3F80


def round_to_bf16(data) -> np.ndarray:
    """fp32 values -> bf16 bit patterns (uint16), rounded to the nearest (ties to even) as on the GPU;
    a NaN becomes the GPU's canonical NaN (0x7FFF), overflow becomes inf."""
    a = np.asarray(data, dtype=np.float32)
    bits = np.ascontiguousarray(a).view(np.uint32).reshape(a.shape).astype(np.uint64)
    nearest = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.where(np.isnan(a), 0x7FFF, nearest).astype(np.uint16)


def _bf16_bits_of_probe(builder) -> int | None:
    """The bits the interpreter's fp32 -> bf16 cast gives the probe, or None when it cannot be asked."""
    import triton.language as tl

    try:
        probe = builder.TensorHandle(np.array([_PROBE], dtype=np.float32), tl.float32)
        out = builder.InterpreterBuilder.cast_impl(None, probe, tl.bfloat16)
        return int(np.asarray(out.data).view(np.uint16).reshape(-1)[0])
    except Exception:
        return None


def fix_bf16_rounding(interpreter=None) -> None:
    """Make the interpreter's fp32 -> bf16 casts round to the nearest, where they truncate; otherwise
    (or if the fix does not take) leave them as they are. interpreter: the module to fix (default:
    triton.runtime.interpreter)."""
    if interpreter is None:
        from triton.runtime import interpreter
    import triton.language as tl

    if _bf16_bits_of_probe(interpreter) != _TRUNCATED:
        return
    builder = interpreter.InterpreterBuilder
    cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(round_to_bf16(src.data), dst_type.scalar)
        return cast(self, src, dst_type)

    builder.cast_impl = cast_impl
    if _bf16_bits_of_probe(interpreter) != _NEAREST:
        builder.cast_impl = cast
