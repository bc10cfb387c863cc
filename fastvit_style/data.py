"""Training data: a folder of images with the official preprocessing (shared doc 3.1), and the
normalization constants for a new dataset.

Corrupt files. A file that cannot be decoded is found lazily, in `__getitem__` (no up-front scan of a
large dataset: a header check would still miss truncated pixel data). It is warned about by path,
marked in a shared-memory flag per file (so DataLoader workers' findings reach `dataset.skipped`),
never read again, and `__getitem__` returns None for it; `collate_images` drops the Nones, so a
micro-batch can come out smaller than asked, or even empty (the trainer handles both).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import sys
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from .imageio import (
    IMAGE_KINDS,
    list_images,
    load_image,
    normalization,
    normalize,
    read_rgb,
    require_pil,
    resize_pad,
)

# What decoding a damaged file raises: PIL's UnidentifiedImageError is an OSError ("truncated"
# too), bad headers raise SyntaxError/ValueError; read_rgb turns the rest (an absurd size's
# DecompressionBombError among them) into ValueError.
_BAD_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)
# The OS's own errors that say this file cannot be read, now or later. Others (too many open files,
# I/O errors on a network filesystem, no memory) may pass: they propagate rather than mark a good
# image unreadable for the rest of the run (the flags are saved in checkpoints).
_PERMANENT_ERRNOS = frozenset(
    (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM)
)


def _unreadable(e: Exception) -> bool:
    """Whether e, one of _BAD_IMAGE_ERRORS, says the file itself cannot be read (damaged, missing)."""
    return not isinstance(e, OSError) or e.errno is None or e.errno in _PERMANENT_ERRNOS


_TORCH_DATA = os.path.dirname(torch.utils.data.__file__) + os.sep


def _warn_skipped(path: str, e: Exception) -> None:
    # The warning names the line that asked for the image (stacklevel 3: whoever called the function
    # that met the file), unless that is a DataLoader's fetch, which would read as torch's own warning:
    # then the line here that met it.
    asker = sys._getframe(2).f_code.co_filename
    level = 2 if asker.startswith(_TORCH_DATA) else 3
    warnings.warn(f"skipping unreadable image {path!r} ({type(e).__name__}: {e})", stacklevel=level)


class ImageFolderDataset(Dataset):
    """Every image (IMAGE_SUFFIXES) under `root` (recursive, sorted by path), no labels.

    Item i: (3, input_size, input_size) float32, aspect-preserving resize, centre zero padding, then
    (x - mean) / std (padding becomes -mean/std, as officially); None when the file is corrupt.
    Normalization: explicit `mean` and `std`, else the constants of `dataset` (default camelyon17wilds).
    """

    def __init__(self, root, input_size: int = 224, mean=None, std=None, dataset: str | None = None):
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
            raise ValueError(f"input_size must be a positive int (the image side), got {input_size!r}")
        self.root = os.fspath(root)
        self.paths = list_images(self.root)
        if not self.paths:
            raise ValueError(f"no images ({IMAGE_KINDS}) found under {self.root!r}")
        require_pil()  # fail at construction, not in the first worker
        self.input_size = input_size
        self.mean, self.std = normalization(dataset, mean, std)
        # One flag per file in shared memory: DataLoader workers (fork or spawn) write the same storage.
        self._bad = torch.zeros(len(self.paths), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor | None:
        if self._bad[index]:
            return None
        path = self.paths[index]
        try:
            image = load_image(path, self.input_size)
        except _BAD_IMAGE_ERRORS as e:
            if not _unreadable(e):
                raise
            self._bad[index] = True
            _warn_skipped(path, e)
            return None
        return normalize(image, self.mean, self.std)

    @property
    def skipped(self) -> int:
        """How many files were found corrupt so far (they are skipped in every later epoch too)."""
        return int(self._bad.sum())

    @property
    def unreadable(self) -> torch.Tensor:
        """(len,) bool: the files found corrupt so far, by this process and its workers (or `mark_unreadable`)."""
        return self._bad

    def mark_unreadable(self, flags: torch.Tensor) -> None:
        """Also skip the files set in `flags` ((len,) bool, any device): found corrupt by another process,
        or by the run a checkpoint resumes. In place, so that DataLoader workers see them."""
        if flags.shape != self._bad.shape:
            raise ValueError(
                f"flags must have shape ({len(self)},) for {self.root!r}, got {tuple(flags.shape)}"
            )
        self._bad |= flags.to("cpu", torch.bool)

    @functools.cached_property
    def names_digest(self) -> str:
        """SHA-1 (hex) of the files' paths below `root`, in order: the same wherever the folder moves,
        another for other files (how a resumed run tells its folder from another with as many)."""
        names = "\n".join(os.path.relpath(p, self.root) for p in self.paths)
        return hashlib.sha1(names.encode(errors="surrogateescape")).hexdigest()

    @property
    def skipped_paths(self) -> list[str]:
        return [self.paths[i] for i in self._bad.nonzero().flatten().tolist()]


def collate_images(items: list[torch.Tensor | None]) -> torch.Tensor:
    """DataLoader collate: stack the readable images -> (n, 3, S, S), 1 <= n <= len(items); shape (0,)
    when none is readable (the size is unknown then: check `.shape[0]`, as the trainer does)."""
    good = [x for x in items if x is not None]
    if not good:
        return torch.empty(0)
    return torch.stack(good)


def micro_batches(
    n: int,
    batch_size: int,
    epoch: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    pad: bool = True,
) -> list[list[int]]:
    """This rank's micro-batches of one epoch, as lists of dataset indices.

    The epoch's order is randperm(n) from a generator seeded with seed + epoch (0..n-1 without
    shuffle), cut into micro-batches of `batch_size` (the last may be shorter). Rank r takes
    micro-batches r, r+W, r+2W, ...: W ranks see exactly the micro-batches that one process with
    W-fold accumulation sees, and each micro-batch is one roll group. When the count is not a multiple
    of W, the first micro-batches are repeated (wrapping around, as DistributedSampler does per sample)
    so that every rank runs the same number of micro-steps; pad=False leaves them out (validation,
    which has no collective per micro-batch and must count each image once). The order is a pure function of
    (seed, epoch), so a resumed run needs no sampler state: it drops the micro-batches already done.
    """
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    else:
        order = list(range(n))
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if pad:
        batches += [batches[i % len(batches)] for i in range(-len(batches) % world_size)]
    return batches[rank::world_size]


def compute_normalization(folder, input_size: int = 224) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of the images under `folder`, for a dataset without official constants.

    Statistics are over every pixel of every image after the official aspect-preserving resize to
    `input_size` but *without* the zero padding (the official constants were "computed on the
    training sets"; padding pixels are not image content, and square images have none anyway).
    std is the population std over all those pixels. Corrupt files are warned about and left out.
    Accumulated in float64: (mean, std), 3 floats each, for values in [0, 1].
    """
    require_pil()  # the install hint up front, before any file is listed
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for path in list_images(folder):
        try:
            raw = read_rgb(path)  # decoded once: load_image's result and the original size, for the mask
            x = resize_pad(raw, input_size).double()
        except _BAD_IMAGE_ERRORS as e:
            if not _unreadable(e):
                raise
            _warn_skipped(path, e)
            continue
        # The image's own pixels: where a resized-and-padded all-ones image is non-zero.
        h, w = raw.shape[-2:]
        inside = resize_pad(torch.ones(1, h, w, dtype=torch.float64), input_size)[0] > 0.5
        pixels = x[:, inside]
        total += pixels.sum(1).numpy()
        total_sq += (pixels**2).sum(1).numpy()
        count += pixels.shape[1]
    if count == 0:
        raise ValueError(f"no readable images under {os.fspath(folder)!r}")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return tuple(mean.tolist()), tuple(std.tolist())
