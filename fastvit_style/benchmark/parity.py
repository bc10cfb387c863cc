"""The parity gate of every benchmarked variant: how its first outputs are compared with the official
computation's, and how far they may be off."""

import contextlib
import math

import torch

# Parity: relative error allowed against the official computation in fp32 (eager, reference backend).
# Outputs: max |err| / max |ref|. On CUDA the fp32 paths have TF32 in them (cuDNN convolutions by
# default; the Triton dots too where torch allows TF32 for matmuls), hence the looser floor there.
TOLERANCE = {("fp32", "cpu"): 1e-4, ("fp32", "cuda"): 2e-3, ("bf16", "cpu"): 5e-2, ("bf16", "cuda"): 5e-2}
# Parameter gradients ("grads" outputs): relative L2 norm over all of them. The official losses divide
# VGG features by per-channel stds clamped at sqrt(1e-5), which amplifies rounding: on CPU with random
# VGG weights the fp32 gradient of the anatomical loss is 4e-2 (max norm) off a float64 evaluation at
# 224 px, and fast vs reference differ by up to 2e-3 in fp32 though they agree to 1e-14 in float64. On
# an H100 (TF32 convolutions) fp32 fast vs reference differed by 2e-2 to 5e-2. Backward bugs give
# errors of order one.
GRAD_TOLERANCE = {
    ("fp32", "cpu"): 1e-2,
    ("fp32", "cuda"): 1e-1,
    ("bf16", "cpu"): 1e-1,
    ("bf16", "cuda"): 1e-1,
}
# Above these floors a variant may be off by twice what the official computation itself moves under
# the same precision change (flash-attention's rule), measured on the same inputs: its "twin" runs
# under bf16 autocast for bf16, and with TF32 off for fp32 on CUDA. The row records it (official_own_err).


@contextlib.contextmanager
def no_tf32():
    """TF32 off for cuBLAS matmuls and cuDNN convolutions: through `fp32_precision` (torch >= 2.9, whose
    legacy allow_tf32 flags raise once it has been used), else those flags."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        switches = (
            (torch.backends.cuda.matmul, "fp32_precision", "ieee"),
            (torch.backends.cudnn.conv, "fp32_precision", "ieee"),
        )
    else:
        switches = (
            (torch.backends.cuda.matmul, "allow_tf32", False),
            (torch.backends.cudnn, "allow_tf32", False),
        )
    saved = [getattr(owner, name) for owner, name, _ in switches]
    for owner, name, off in switches:
        setattr(owner, name, off)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(switches, saved):
            setattr(owner, name, value)


def _flat(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def compare(got: dict, expected: dict) -> dict[str, tuple[float, float]]:
    """{output: (max abs error, relative error)} over the keys of `expected`. Relative is max-norm,
    except for "grads" (a list of tensors): L2 norm over all of them. Non-finite outputs give inf, on
    either side (a NaN in the reference would vanish from the max-norm and pass any output); a shape
    mismatch raises."""
    errors = {}
    for key, exp in expected.items():
        gs, es = _flat(got[key]), _flat(exp)
        max_abs = max_ref = sq_err = sq_ref = 0.0
        for g, e in zip(gs, es, strict=True):
            if g.shape != e.shape:
                raise ValueError(f"output {key!r} has shape {tuple(g.shape)}, the reference {tuple(e.shape)}")
            g, e = g.detach().double(), e.detach().double()
            if not (torch.isfinite(g).all() and torch.isfinite(e).all()):
                max_abs = sq_err = math.inf
                break
            d = g - e
            max_abs, max_ref = max(max_abs, d.abs().max().item()), max(max_ref, e.abs().max().item())
            sq_err, sq_ref = sq_err + d.square().sum().item(), sq_ref + e.square().sum().item()
        rel = math.sqrt(sq_err / max(sq_ref, 1e-300)) if key == "grads" else max_abs / max(max_ref, 1e-30)
        errors[key] = (max_abs, rel)
    return errors
