import os

# Before anything imports triton (the root conftest sets it too; this keeps the folder runnable alone).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _nan_poisoned_empty(monkeypatch):
    """torch.empty gives NaN-filled floating tensors: an output element no kernel writes fails."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """CPU runs the kernels through the Triton interpreter, CUDA on the hardware: each needs its mode."""
    from fastvit_style.kernels import INTERPRET

    if request.param == "cpu" and not INTERPRET:
        pytest.skip("CPU tensors run the Triton kernels only with TRITON_INTERPRET=1")
    if request.param == "cuda" and (INTERPRET or not torch.cuda.is_available()):
        pytest.skip("hardware kernels need CUDA and TRITON_INTERPRET unset")
    return torch.device(request.param)
