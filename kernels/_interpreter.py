"""A fix for Triton's interpreter (TRITON_INTERPRET=1), applied only where the installed Triton needs it.

The interpreter holds every scalar as a one-element array and gives it `__index__` as
`int(handle.data)`, which NumPy >= 2.4 refuses for arrays of ndim > 0: a kernel's
`range(0, Tk, BLOCK_N)` then raises "only 0-dimensional arrays can be converted to Python scalars".
Triton fixed it upstream (issue 9171, pull request 9172, January 2026); Triton 3.6, which the GPU
machines carry beside NumPy 2.5, does not have the fix. The check is by behaviour, not by version.
"""

import operator
from types import SimpleNamespace

import numpy as np


def _index(tensor) -> int:
    return int(tensor.handle.data.squeeze())  # upstream's fix


def _indexes_one_element_arrays(interpreter) -> bool:
    """Whether the interpreter's tensor patch gives a scalar held as a (1,) array a working __index__."""

    class Probe:
        pass

    scope = interpreter._LangPatchScope()
    try:
        interpreter._patch_lang_tensor(Probe, scope)
        probe = Probe()
        probe.handle = SimpleNamespace(data=np.array([3]))
        return operator.index(probe) == 3
    except TypeError:
        return False
    finally:
        scope.restore()


def fix_scalar_index(interpreter=None) -> None:
    """Make interpreted kernels' scalars usable as Python ints (`range` bounds) on any NumPy; a no-op
    where the interpreter already does that, or is laid out differently than Triton 3.6's.
    interpreter: the module to fix (default: triton.runtime.interpreter)."""
    if interpreter is None:
        from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if (
        patch is None
        or not hasattr(interpreter, "_LangPatchScope")
        or _indexes_one_element_arrays(interpreter)
    ):
        return

    def patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    interpreter._patch_lang_tensor = patch_lang_tensor
