import os

# Before anything imports triton (the root conftest sets it too; this keeps the folder runnable alone).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

BACKEND_DEVICES = [
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    pytest.param(("triton", "cpu"), id="triton-cpu"),
    pytest.param(("torch", "cuda"), id="torch-cuda", marks=pytest.mark.gpu),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
    pytest.param(("xformers", "cpu"), id="xformers-fake-cpu"),
    pytest.param(("xformers", "cuda"), id="xformers-cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(params=BACKEND_DEVICES)
def backend_device(request):
    """(backend, device): Triton on CPU runs through the interpreter, on CUDA on the hardware;
    xformers on CPU is the `fake_xformers` stand-in, on CUDA the real package when installed."""
    backend, device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if backend == "xformers" and device == "cpu":
        request.getfixturevalue("fake_xformers")
    if backend == "xformers" and device == "cuda":
        from fastvit_style.ops import xformers_unavailable_reason

        reason = xformers_unavailable_reason(torch.device(device))
        if reason:
            pytest.skip(reason)
    if backend == "triton":
        from fastvit_style.kernels import INTERPRET

        if device == "cpu" and not INTERPRET:
            pytest.skip("CPU tensors run the Triton kernels only with TRITON_INTERPRET=1")
        if device == "cuda" and INTERPRET:
            pytest.skip("hardware kernels need TRITON_INTERPRET unset")
    return backend, torch.device(device)
