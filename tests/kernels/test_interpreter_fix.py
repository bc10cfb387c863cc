"""kernels/_interpreter.py: Triton 3.6's interpreter (the GPU machines' Triton) cannot run a kernel's
`range(0, Tk, BLOCK_N)` with NumPy >= 2.4 (triton issue 9171); importing the kernels fixes that."""

import operator
import types

import numpy as np
import pytest
from fastvit_style.kernels import INTERPRET
from fastvit_style.kernels._interpreter import _indexes_one_element_arrays, fix_scalar_index


class _Scope:
    """The interface of the interpreter's _LangPatchScope: set attributes, put them back."""

    def __init__(self):
        self.changes = []

    def set_attr(self, obj, name, value):
        self.changes.append((obj, name, obj.__dict__.get(name)))
        setattr(obj, name, value)

    def restore(self):
        for obj, name, old in reversed(self.changes):
            if old is None:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


def _strict_int(data) -> int:
    if data.ndim:  # what NumPy >= 2.4 does, whatever NumPy runs the test
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
    return int(data)


def _interpreter(index):
    def patch_lang_tensor(tensor, scope):
        scope.set_attr(tensor, "__index__", index)

    return types.SimpleNamespace(_LangPatchScope=_Scope, _patch_lang_tensor=patch_lang_tensor)


def _tensor_class(interpreter):
    class Tensor:
        def __init__(self, value):
            self.handle = types.SimpleNamespace(data=np.array([value]))

    interpreter._patch_lang_tensor(Tensor, interpreter._LangPatchScope())
    return Tensor


def test_an_interpreter_with_the_bug_is_fixed():
    interpreter = _interpreter(lambda self: _strict_int(self.handle.data))  # Triton 3.6's
    with pytest.raises(TypeError):
        operator.index(_tensor_class(interpreter)(5))
    fix_scalar_index(interpreter)
    assert list(range(0, _tensor_class(interpreter)(5), 2)) == [0, 2, 4]
    fixed = interpreter._patch_lang_tensor
    fix_scalar_index(interpreter)  # twice: nothing more
    assert interpreter._patch_lang_tensor is fixed


@pytest.mark.parametrize(
    "interpreter",
    [
        _interpreter(lambda self: _strict_int(self.handle.data.squeeze())),  # upstream's fixed one
        types.SimpleNamespace(),  # laid out otherwise
    ],
)
def test_other_interpreters_are_left_alone(interpreter):
    before = dict(vars(interpreter))
    fix_scalar_index(interpreter)
    assert vars(interpreter) == before


@pytest.mark.skipif(not INTERPRET, reason="the fix applies under TRITON_INTERPRET=1 only")
def test_the_installed_interpreter_indexes_scalars():
    from triton.runtime import interpreter

    assert _indexes_one_element_arrays(interpreter)
