"""`python -m fastvit_style.info`: versions, device and each backend's availability (or why not)."""

import os
import platform
import sys

import torch

from . import __version__
from .backends import BACKENDS, unavailable_reason


def report() -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = {
        "fastvit_style": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
    }
    # numpy: Triton's interpreter runs on it (and Triton 3.6's needs a fix with NumPy >= 2.4).
    for module in ("triton", "numpy", "xformers", "safetensors", "huggingface_hub"):
        try:
            info[module] = __import__(module).__version__
        except Exception as exc:
            info[module] = f"unavailable ({type(exc).__name__})"
    for backend in BACKENDS[1:]:
        info[f"backend {backend}"] = unavailable_reason(backend, device) or f"available on {device.type}"
    return info


def add_arguments(parser) -> None:
    pass


def run(args=None) -> int:
    for key, value in report().items():
        print(f"{key:>20}: {value}")
    return 0


# `python -m fastvit_style.info`: the `fastvit-style info` command, --help included.
if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["info", *sys.argv[1:]]))
