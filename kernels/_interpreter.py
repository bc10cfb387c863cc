"""A fix for Triton's interpreter (TRITON_INTERPRET=1), applied only where the installed Triton needs it.

The interpreter holds every scalar as a one-element array and gives it `__index__` as
`int(handle.data)`, which NumPy >= 2.4 refuses for arrays of ndim > 0 (and NumPy 1.25 to 2.3
deprecates): a kernel's `range(0, Tk, BLOCK_N)` then raises "only 0-dimensional arrays can be
converted to Python scalars". Triton fixed it upstream (issue 9171, pull request 9172, January 2026);
Triton 3.6, which the GPU machines carry beside NumPy 2.5, does not have the fix. The check is by
behaviour, not by version, and anything it does not recognise is left alone.
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
