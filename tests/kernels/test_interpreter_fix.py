"""kernels/_interpreter.py: Triton 3.6's interpreter (the GPU machines' Triton) cannot run a kernel's
`range(0, Tk, BLOCK_N)` with NumPy >= 2.4 (triton issue 9171); importing the kernels fixes that, and
leaves any interpreter it does not recognise alone."""

import operator
import types

import numpy as np
import pytest
from fastvit_style.kernels import INTERPRET
from fastvit_style.kernels._interpreter import _has_the_bug, fix_scalar_index
from triton.runtime import interpreter as triton_interpreter

# The real scope class (it restores what a patch set); a Triton without it needs no fix.
_LangPatchScope = getattr(triton_interpreter, "_LangPatchScope", None)
pytestmark = pytest.mark.skipif(
    _LangPatchScope is None, reason="this Triton's interpreter has no _LangPatchScope"
)


def _strict_int(data) -> int:
    if data.ndim:  # what NumPy >= 2.4 does, whatever NumPy runs the test
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
    return int(data)


def _triton36_index(self) -> int:
    return _strict_int(self.handle.data)


def _interpreter(patch_lang_tensor):
    """A stand-in for triton.runtime.interpreter: the real scope class, the given tensor patch."""
    return types.SimpleNamespace(_LangPatchScope=_LangPatchScope, _patch_lang_tensor=patch_lang_tensor)


def _triton36(tensor, scope):
    scope.set_attr(tensor, "__index__", _triton36_index)
    scope.set_attr(tensor, "__repr__", lambda self: "scalar")


def _patched_class(interpreter, *args):
    class Tensor:
        def __init__(self, value):
            self.handle = types.SimpleNamespace(data=np.array([value]))

    interpreter._patch_lang_tensor(Tensor, _LangPatchScope(), *args)
    return Tensor


def test_an_interpreter_with_the_bug_is_fixed():
    interpreter = _interpreter(_triton36)
    with pytest.raises(TypeError):
        operator.index(_patched_class(interpreter)(5))
    fix_scalar_index(interpreter)
    scalar = _patched_class(interpreter)(5)
    assert list(range(0, scalar, 2)) == [0, 2, 4] and repr(scalar) == "scalar"  # the rest of the patch kept
    fixed = interpreter._patch_lang_tensor
    fix_scalar_index(interpreter)  # twice: nothing more
    assert interpreter._patch_lang_tensor is fixed


def test_the_fix_passes_on_further_arguments():
    seen = []

    def optional_builder(tensor, scope, builder=None):
        seen.append(builder)
        _triton36(tensor, scope)

    interpreter = _interpreter(optional_builder)
    fix_scalar_index(interpreter)
    assert list(range(_patched_class(interpreter, "builder")(2))) == [0, 1] and seen[-1] == "builder"


def _fixed_upstream(tensor, scope):
    scope.set_attr(tensor, "__index__", lambda self: _strict_int(self.handle.data.squeeze()))


def _needs_a_builder(tensor, scope, builder):
    _triton36(tensor, scope)


def _raises(tensor, scope):
    raise AttributeError("a layout of another Triton")


def _no_index(tensor, scope):
    scope.set_attr(tensor, "__repr__", lambda self: "scalar")


@pytest.mark.parametrize(
    "interpreter",
    [
        _interpreter(_fixed_upstream),
        _interpreter(_needs_a_builder),
        _interpreter(_raises),
        _interpreter(_no_index),
        types.SimpleNamespace(_patch_lang_tensor=_triton36),  # no scope class
        types.SimpleNamespace(),
    ],
    ids=["fixed-upstream", "other-arguments", "patch-raises", "no-index", "no-scope", "no-names"],
)
def test_other_interpreters_are_left_alone(interpreter):
    before = dict(vars(interpreter))
    fix_scalar_index(interpreter)
    assert vars(interpreter) == before


@pytest.mark.skipif(not INTERPRET, reason="the fix applies under TRITON_INTERPRET=1 only")
def test_the_installed_interpreter_indexes_scalars():
    assert not _has_the_bug(triton_interpreter)  # Triton 3.6: fixed at import; later ones: never broken
