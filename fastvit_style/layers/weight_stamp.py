"""The key under which values derived from a frozen CPU weight (Winograd transforms, oneDNN's packed GEMM
weights) are kept between calls: cheap enough to take on every call, and different once the weight is."""

import torch


def weight_stamp(w: torch.Tensor) -> tuple:
    """(address, version, dtype, shape, strides, sum of a strided sample) of w, a CPU tensor (the sample
    is read without a device sync). A change is seen through the version counter (load_state_dict,
    optimizer steps, in-place ops; inference tensors have none) and, for writes that bypass it
    (`.data`, numpy aliases, fused optimizer steps: `fused=True` leaves the counters as they were),
    through the sample: whole-tensor rewrites (loaders, EMA, rescaling, dense updates) are caught, an
    edit of a few elements off the sample is not."""
    sample = _in_memory_order(w.detach())[::61].sum().item()
    version = None if w.is_inference() else w._version
    return (w.data_ptr(), version, w.dtype, tuple(w.shape), w.stride(), sample)


def _in_memory_order(w: torch.Tensor) -> torch.Tensor:
    """w's elements as one row, in the order they lie in memory: a view of a dense tensor in any layout (a
    conv weight of a model moved to channels_last: reshape(-1) would copy it at every call), a copy of
    a sliced one."""
    return w.permute(sorted(range(w.dim()), key=w.stride, reverse=True)).reshape(-1)
