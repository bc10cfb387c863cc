"""fastvit_style.layers.weight_stamp: taken on every call of a layer that keeps values derived from its
weight, so it must not copy the weight."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastvit_style.layers.weight_stamp import weight_stamp


class _Ops(TorchDispatchMode):
    """The aten ops run within, by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "layout",
    [
        lambda w: w,
        lambda w: w.contiguous(memory_format=torch.channels_last),  # model.to(memory_format=...)
        lambda w: w.transpose(0, 1),
    ],
    ids=["contiguous", "channels_last", "transposed"],
)
def test_the_stamp_of_a_dense_weight_copies_nothing_and_sees_a_rewrite(layout):
    w = layout(torch.randn(64, 32, 3, 3))
    with _Ops() as ops:
        stamp = weight_stamp(w)
    assert not {"aten.clone.default", "aten.copy_.default"} & set(ops.names), ops.names
    w.data.mul_(2)  # bypasses the version counter: seen through the sample
    assert weight_stamp(w) != stamp


def test_the_stamp_of_a_sliced_weight_still_sees_a_rewrite():
    w = torch.randn(64, 32, 3, 3)[:, ::2]
    stamp = weight_stamp(w)
    w.data.add_(1)
    assert weight_stamp(w) != stamp
