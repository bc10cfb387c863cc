"""Devices: the one place where a device named by the user (`--device`, `TrainConfig.device`) is
checked, what dtypes autocast lets layers take, where small host tensors reach a GPU without making the
host wait for it, and where a torch.Generator is pickled."""

import os

import torch


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) otherwise."""
    return tuple(int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """torch.device of `name`; None means cuda:local_rank where CUDA is available, else cpu. A bare
    "cuda" means cuda:local_rank. ValueError for a name torch does not know, or a CUDA device that
    this torch build or machine cannot give."""
    if name is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device {name!r} is not a device name (cpu, cuda, cuda:1, ...): {e}") from None
    if device.type == "meta":
        raise ValueError(f"device {name!r} holds no data (shapes only): use cpu or cuda")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: only cpu and cuda devices are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "has no CUDA" if torch.version.cuda is None else "sees no GPU"
            raise ValueError(f"device {name!r}: this torch build ({torch.__version__}) {build}")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype torch.autocast runs in on `device_type`, or None where it is off (or the type has none).

    is_autocast_enabled raises for device types without autocast (meta). CPU and CUDA always have it
    and are not asked: torch 2.11's dynamo cannot trace is_autocast_available (a graph break)."""
    available = device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type)
    return (
        torch.get_autocast_dtype(device_type)
        if available and torch.is_autocast_enabled(device_type)
        else None
    )


def check_input_dtype(name: str, t: torch.Tensor, param: torch.Tensor, layers: str) -> None:
    """ValueError naming `name` unless the floating-point tensor t may meet parameters like `param` in a
    convolution: their dtype, or under autocast float32 and the autocast dtype where the parameters
    are either (autocast leaves float64 alone). `layers` names their owner ("the model")."""
    dtypes = {param.dtype}
    amp = autocast_dtype(param.device.type)
    if amp is not None and param.dtype in (torch.float32, amp):
        dtypes |= {torch.float32, amp}
    if t.dtype not in dtypes:
        others = "".join(f" (or {d} under autocast)" for d in dtypes - {param.dtype})
        raise ValueError(
            f"{name} has dtype {t.dtype} but {layers}'s parameters are {param.dtype}{others}: convert "
            "one of them (for mixed precision keep the model in float32 and use torch.autocast)"
        )


def to_device_async(t: torch.Tensor, device) -> torch.Tensor:
    """t (any shape and dtype) on `device`; a CPU tensor reaches a CUDA device without a sync.

    A plain `.to("cuda")` from pageable memory synchronizes the stream: the host waits for every queued
    kernel, which empties the GPU's queue once per call (augmentation's draws, TTA's reference
    indices). From pinned memory the copy is queued on the current stream like a kernel, and the
    caching host allocator keeps the pinned buffer until the copy has run; t itself may change at once.
    A traced call (torch.compile) takes the plain copy, which the compiled graph schedules itself.
    """
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu" or torch.compiler.is_compiling():
        return t.to(device)
    # A fresh dense buffer: pin_memory() would return a pinned t itself (whose owner may change it before
    # the queued copy reads it) and keeps t's strides, which an expanded t cannot be copied into.
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
    return staged.to(device, non_blocking=True)


def generator_state(generator: torch.Generator) -> tuple[str, bytes]:
    """(device name, state bytes) of `generator`, for a holder's __getstate__.

    torch.Generator pickles its state as a tensor, which the multiprocessing pickler of spawn and
    forkserver workers (DataLoader's on macOS and Windows) cannot send (pytorch#146828: the worker dies
    with "unable to resize file"); bytes it can."""
    return str(generator.device), generator.get_state().numpy().tobytes()


def generator_from_state(state: tuple[str, bytes]) -> torch.Generator:
    """The torch.Generator that generator_state gave `state` for, on the same device. ValueError naming
    that device where it is absent here: the state is not moved to another device, whose generator draws
    other numbers (a CUDA state is a Philox seed and offset, a CPU one a Mersenne Twister's)."""
    name, data = state
    try:
        device = resolve_device(name)
    except ValueError as e:
        raise ValueError(f"cannot restore a torch.Generator's state: {e}") from None
    generator = torch.Generator(device)
    generator.set_state(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return generator
