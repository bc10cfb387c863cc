"""Training checkpoints: everything a resumed run needs to continue bit-identically on CPU.

A checkpoint is a dict of tensors and plain containers (str, int, float, bool, None, list, tuple,
dict) so that it loads with `torch.load(weights_only=True)`: no pickled objects, nothing that runs
code. RNG states are stored in that form too (numpy's key array as an int64 tensor, Python's state
as a list). The data order needs no generator state: it is a function of (seed, epoch), see
`data.micro_batches`. Writing is atomic (temp file, fsync, rename): an interrupted write leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
import random
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch

from .atomic import atomic_path

FORMAT = "fastvit_style.train/1"


def rng_state(device: torch.device | None = None) -> dict:
    """The states of torch (CPU, and the training `device` when it is a GPU), numpy and Python's `random`.

    One CUDA state, the training device's: a list of every visible GPU's could not be restored where
    fewer are visible (a run resumed on a smaller node, or under CUDA_VISIBLE_DEVICES).
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    on_gpu = device is not None and device.type == "cuda"
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if on_gpu else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),  # uint32 arrays are not weights_only-loadable
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": [version, list(internal), gauss_next],
    }


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore what `rng_state` captured; its CUDA state goes to the training `device` when that is a GPU.

    Checkpoints of earlier versions hold every visible GPU's state: the one of the device's index is
    taken where it exists, else the first.
    """
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and device is not None and device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        torch.cuda.set_rng_state(cuda[index] if len(cuda) > 1 and index < len(cuda) else cuda[0], device)
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(state: dict, path) -> str:
    """torch.save `state` (tensors and plain containers only) to `path` atomically.

    Paths (os.PathLike) are stored as str and numpy scalars as Python numbers: torch.load(weights_only=True)
    reads neither (a TrainConfig given a pathlib.Path or a numpy float would write a checkpoint that no
    run can resume). ValueError, before anything replaces `path`, for any other object it could not
    read back; OSError naming `path` where the OS refused the write (a full disk)."""
    path = os.fspath(path)
    plain = _plain({"format": FORMAT, **state})
    with atomic_path(path, remove_leftovers=True) as tmp:
        with open(tmp, "wb") as f:  # a file object: torch keeps its OSError (a full disk) as the context
            torch.save(plain, f)
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(tmp)
        if unsafe:
            raise ValueError(
                f"cannot save the checkpoint {path!r}: it would hold objects that torch.load(weights_only=True) "
                f"cannot read back ({', '.join(unsafe[:5])}); a checkpoint holds tensors, str, numbers, "
                "bool, None and lists, tuples and dicts of them"
            )
    return path


def _plain(obj):
    """obj with its paths as str and its numpy scalars as Python numbers, in new containers (tensors as
    they are)."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):  # an OrderedDict stays one (a state dict); other subclasses become dicts
        items = [(_plain(k), _plain(v)) for k, v in obj.items()]
        return OrderedDict(items) if type(obj) is OrderedDict else dict(items)
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if type(obj) is tuple:  # a namedtuple stays itself: the check after writing names it
        return tuple(_plain(v) for v in obj)
    return obj


def has_random_vgg(state) -> bool:
    """Whether `state` (a weight file as read) is a training checkpoint whose VGG19 was, or may have been,
    random: its config says random_vgg, or predates that field and names no --vgg-weights (runs then
    went on with a random VGG19 after a warning, and one from --init-weights cannot be told apart)."""
    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
        return False
    config = state.get("config")
    if not isinstance(config, dict) or config.get("vgg_weights"):
        return False
    return bool(config.get("random_vgg", True))


def load_checkpoint(path, required: tuple[str, ...] = ()) -> dict:
    """Read a checkpoint written by `save_checkpoint` onto the CPU, with weights_only=True. ValueError for
    a file that is not one (another format, truncated, corrupt) or lacks a key of `required`; OSError for
    one that cannot be read."""
    path = os.fspath(path)
    not_one = f"{path!r} is not a fastvit_style training checkpoint (format {FORMAT})"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # torch.load's unpickling, zip and weights_only errors
        raise ValueError(f"{not_one}: torch.load fails ({type(e).__name__}: {torch_load_reason(e)})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(not_one)
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"{path!r} is in the format {FORMAT} but has no {', '.join(map(repr, missing))}")
    return state


def torch_load_reason(err: Exception) -> str:
    """One line of a torch.load error: torch's weights_only message is a long essay whose first line
    advises weights_only=False (which would run the file's code); keep the line that names the
    offending global or opcode."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    hits = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln or "allowed global" in ln]
    rest = [ln for ln in lines if "weights_only" not in ln]  # torch's essay and its advice
    line = (hits or rest or ["no details"])[0]
    return line.split(". Please", 1)[0][:200]
