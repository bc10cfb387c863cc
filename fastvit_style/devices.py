"""The one place where a device named by the user (`--device`, `TrainConfig.device`) is checked."""

import torch


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
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "has no CUDA" if torch.version.cuda is None else "sees no GPU"
            raise ValueError(f"device {name!r}: this torch build ({torch.__version__}) {build}")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device
