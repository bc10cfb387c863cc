"""kernels/_interpreter.py: the interpreter's fp32 -> bf16 casts truncate; the GPU's (and torch's) round
to the nearest. Importing the kernels under TRITON_INTERPRET=1 makes the interpreter round, so that the
bf16 tests hold the kernels to the GPU's numbers."""

import types

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from fastvit_style.kernels import INTERPRET
from fastvit_style.kernels._interpreter import _NEAREST, _bf16_bits_of_probe, fix_bf16_rounding, round_to_bf16


def test_rounding_is_torchs():
    """Random bit patterns (normals, subnormals, infs, the largest finite values): torch's conversion,
    bit for bit; a NaN stays a NaN."""
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=torch.Generator().manual_seed(0))
    x = torch.cat([bits.int().view(torch.float32), torch.randn(10_000), torch.tensor([3.4e38, -0.0])])
    x = x[~x.isnan()]
    ours = round_to_bf16(x.numpy()).view(np.int16)
    assert np.array_equal(ours, x.to(torch.bfloat16).view(torch.int16).numpy())
    nan = round_to_bf16(np.array([np.nan, -np.nan], dtype=np.float32)).view(np.int16)
    assert torch.from_numpy(nan).view(torch.bfloat16).isnan().all()
    assert round_to_bf16(np.float32(1.5)).shape == ()  # scalars keep their shape


class _Handle:
    def __init__(self, data, dtype):
        self.data, self.dtype = data, dtype


def _stand_in(cast):
    """A stand-in for triton.runtime.interpreter whose builder casts with `cast`."""
    builder = type("InterpreterBuilder", (), {"cast_impl": cast})
    return types.SimpleNamespace(TensorHandle=_Handle, InterpreterBuilder=builder)


def _truncating(self, src, dst_type):
    if dst_type.scalar == tl.bfloat16:
        return _Handle((np.asarray(src.data, np.float32).view(np.uint32) >> 16).astype(np.uint16), dst_type)
    return _Handle(src.data, dst_type)


def _nearest(self, src, dst_type):
    return _Handle(round_to_bf16(src.data), dst_type)


def _raises(self, src, dst_type):
    raise TypeError("a layout of another Triton")


def test_a_truncating_interpreter_is_fixed():
    interpreter = _stand_in(_truncating)
    fix_bf16_rounding(interpreter)
    assert _bf16_bits_of_probe(interpreter) == _NEAREST
    other = interpreter.InterpreterBuilder.cast_impl(None, _Handle(np.float32(2.5), tl.float32), tl.float64)
    assert other.data == 2.5  # other casts as they were
    fixed = interpreter.InterpreterBuilder.cast_impl
    fix_bf16_rounding(interpreter)  # twice: nothing more
    assert interpreter.InterpreterBuilder.cast_impl is fixed


@pytest.mark.parametrize("cast", [_nearest, _raises], ids=["fixed-upstream", "other-layout"])
def test_other_interpreters_are_left_alone(cast):
    interpreter = _stand_in(cast)
    fix_bf16_rounding(interpreter)
    assert interpreter.InterpreterBuilder.cast_impl is cast


@triton.jit
def _store(src, dst, N: tl.constexpr):
    """dst[:N] = src[:N], converted to dst's dtype on the store, as the kernels store their tiles."""
    o = tl.arange(0, N)
    tl.store(dst + o, tl.load(src + o).to(dst.dtype.element_ty))


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's rounding: TRITON_INTERPRET=1 only")
def test_an_interpreted_bf16_store_rounds_to_nearest():
    """What every bf16 store of the kernels (and `_tiles.dot_operand`) does: torch's conversion."""
    x = torch.randn(1024, generator=torch.Generator().manual_seed(0)) * 100
    out = torch.empty(1024, dtype=torch.bfloat16)
    _store[(1,)](x, out, 1024)
    assert torch.equal(out.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
