"""Image files <-> tensors: the official preprocessing (shared doc 3.1), normalization and PNG output.

Reading decodes with Pillow, an optional dependency (the `images` extra). Writing PNG
needs nothing beyond zlib, so outputs can be written where Pillow is missing.
"""

from __future__ import annotations

import math
import os
import struct
import warnings
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_path
from .configs import DEFAULT_DATASET, NORMALIZATION, official_dataset

# torchvision's IMG_EXTENSIONS, whose ImageFolder the official datasets read through.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".ppm", ".pgm", ".webp")
IMAGE_KINDS = "/".join(suffix[1:] for suffix in IMAGE_SUFFIXES)  # for messages
PIL_HINT = "reading images needs Pillow: pip install pillow (from a checkout: pip install '.[images]')"


def require_pil():
    """The PIL.Image module, or ImportError saying how to install it."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(PIL_HINT) from None
    return Image


def list_images(folder, name: str = "image folder") -> list[str]:
    """Image files under `folder`, recursively (IMAGE_SUFFIXES, any case), sorted by path;
    FileNotFoundError or NotADirectoryError, calling the folder `name`, where there is no such folder.

    Linked folders are followed (as torchvision's ImageFolder does), each real folder once: a link
    cycle ends, and two links to one folder do not list its images twice. Hidden files and folders are
    left out, and so are pipes, sockets and devices. A subfolder that cannot be listed is skipped with a
    warning (os.walk, torchvision's, skips it silently); the folder itself raises its OSError's type with
    a message that names it."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        if not os.path.exists(folder):
            raise FileNotFoundError(f"{name} {folder!r} does not exist")
        what = "is a file" if os.path.isfile(folder) else "exists"
        raise NotADirectoryError(f"{name} {folder!r} {what}, not a folder")
    found, seen = [], set()

    def walk(root: str) -> None:  # depth first, in name order, as os.walk top-down
        real = os.path.realpath(root)
        if real in seen:
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError as e:
            if root == folder:  # else "no images" would hide why
                raise type(e)(f"{name} {folder!r} cannot be listed ({e.strerror or e})") from e
            # Its images would be missing from a dataset or a TTA run with no word.
            warnings.warn(f"skipping unreadable folder {root!r} ({type(e).__name__}: {e})")
            return
        # The entries' types come with the listing: no stat per file but for links.
        # A pipe, socket or device could block a read forever; a broken link stays, to be reported
        # when it is read.
        found.extend(
            e.path
            for e in entries
            if not e.name.startswith(".")
            and e.name.lower().endswith(IMAGE_SUFFIXES)
            and (e.is_file() or (e.is_symlink() and not os.path.exists(e.path)))
        )
        for e in entries:  # .ipynb_checkpoints, .Trash-1000 and other hidden folders left out
            if not e.name.startswith(".") and e.is_dir():
                walk(e.path)

    walk(folder)
    return sorted(found)


def resize_pad(x: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """(..., C, h, w) float -> (..., C, size, size): the longer side to `size`, the other to
    int(size*short/long) (bilinear, antialiased), centred on `fill` (the extra pixel of an odd margin
    goes right/bottom)."""
    h, w = x.shape[-2:]
    nh, nw = (size, max(1, int(size * w / h))) if h >= w else (max(1, int(size * h / w)), size)
    if (nh, nw) != (h, w):
        flat = x.reshape(-1, *x.shape[-3:])
        resized = F.interpolate(flat, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        x = resized.reshape(*x.shape[:-2], nh, nw)
    top, left = (size - nh) // 2, (size - nw) // 2
    return F.pad(x, (left, size - nw - left, top, size - nh - top), value=fill)


def read_rgb(path) -> torch.Tensor:
    """An image file as RGB (3, h, w) float32 in [0, 1], at its own size.

    8-bit images (and every mode Pillow converts to RGB) are divided by 255. Wide greys, which Pillow's
    convert("RGB") would clip to 0..255 (a 16-bit scan turns black and white), are scaled instead:
    16- and 32-bit integer greys by 65535 (ValueError for values outside 0..65535), a TIFF's 12-bit ones
    by 4095, float greys taken as they are (ValueError unless all lie in [0, 1]); the grey is repeated
    on the 3 channels. A TIFF's min-is-white greys (PhotometricInterpretation 0, as of MONOCHROME1
    X-rays) are inverted, as Pillow inverts those of 8 bits or fewer but not wide ones.
    """
    Image = require_pil()
    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
            wide = mode in ("I", "F") or mode.startswith("I;16")
            # Only 16-bit and float min-is-white TIFFs open (Pillow knows no 32-bit integer ones), and
            # 12-bit ones as 'I;16' with their values as stored (0..4095).
            tags = im.tag_v2 if wide and im.format == "TIFF" else {}
            min_is_white, white = tags.get(262) == 0, 4095 if tags.get(258) == (12,) else 65535
            pixels = np.array(im if wide else im.convert("RGB"))
    except MemoryError:
        raise
    except OSError as e:  # most damaged files; Pillow's message ("image file is truncated") names none
        if e.filename is not None:  # the OS's own errors (missing file, permission) name it already
            raise
        if e.errno is not None:  # the OS's error while reading (EIO, ESTALE): keep its errno for callers
            raise OSError(e.errno, f"{e.strerror} while reading image", path) from e
        raise OSError(f"cannot decode image {path!r} ({e})") from e
    except Exception as e:  # DecompressionBombError (an absurd size) and odder failures on damaged files
        raise ValueError(f"cannot decode image {path!r} ({type(e).__name__}: {e})") from e
    if wide:
        return _wide_grey(pixels, mode, path, white, min_is_white).expand(3, -1, -1).contiguous()
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255)


def _wide_grey(pixels: np.ndarray, mode: str, path: str, white: int, min_is_white: bool) -> torch.Tensor:
    """(h, w) integer or float pixels of a Pillow 'I;16*', 'I' or 'F' image -> (1, h, w) float32 in [0, 1].
    white: the intensity of white of integer pixels (65535; 4095 for 12 bits); min_is_white: 0 is white."""
    values = pixels.astype(np.float64)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == "F":
        if not (np.isfinite(values).all() and 0 <= lo and hi <= 1):
            raise ValueError(
                f"{path}: float image with values in [{lo:g}, {hi:g}]: expected intensities in [0, 1] "
                "(rescale it, or save it as 8- or 16-bit)"
            )
    else:
        if lo < 0 or hi > 65535:
            raise ValueError(
                f"{path}: {mode} image with values in [{lo:g}, {hi:g}]: expected 16-bit intensities in 0..65535"
            )
        values /= white
    if min_is_white:
        values = 1 - values
    return torch.from_numpy(values.astype(np.float32))[None]


def load_image(path, size: int) -> torch.Tensor:
    """An image file as RGB (3, size, size) float32 in [0, 1], preprocessed as in training.

    The resize runs on float values, where torchvision resized the uint8 PIL image: pixels can differ
    by the uint8 rounding (at most 1/255)."""
    return resize_pad(read_rgb(path), size)


def _stats(mean, std, like: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"constants_dtype must be a floating-point dtype, got {dtype}")
    if dtype is None and not like.dtype.is_floating_point:  # integer constants: a std of 0, inf everywhere
        raise TypeError(
            f"expected a floating-point image in [0, 1], got {like.dtype}: convert it first "
            "(for 8-bit pixels, image.float() / 255)"
        )

    def col(v):
        return torch.as_tensor(v, dtype=dtype or like.dtype, device=like.device).view(-1, 1, 1)

    return col(mean), col(std)


def normalize(x: torch.Tensor, mean, std, constants_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(..., C, H, W) in [0, 1] -> (x - mean) / std per channel. The constants take x's dtype unless
    `constants_dtype` is given (then the result is of the promoted dtype)."""
    m, s = _stats(mean, std, x, constants_dtype)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean, std, constants_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of `normalize`: (..., C, H, W) -> x * std + mean (not clamped)."""
    m, s = _stats(mean, std, x, constants_dtype)
    return x * s + m


def load_batch(paths, size: int, mean, std) -> torch.Tensor:
    """Image files -> normalized (N, 3, size, size) float32, ready for the model."""
    return torch.stack([normalize(load_image(p, size), mean, std) for p in paths])


# Constants for images in [0, 1]: a std below this turns a 1/255 step into over 39 (float32 still fits,
# but no dataset is that flat), one above 1 or a mean outside [0, 1] is on another scale (0-255).
_MIN_STD = 1e-4


def normalization(dataset: str | None = None, mean=None, std=None) -> tuple[tuple, tuple]:
    """(mean, std) from explicit values (both), else the dataset's training constants (default
    camelyon17wilds). Explicit values are per channel, for images in [0, 1]: ValueError for others."""
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None:
        if (
            len(mean) != 3
            or len(std) != 3
            or not all(math.isfinite(v) for v in (*mean, *std))
            or min(std) <= 0
        ):
            raise ValueError(f"mean and std need 3 finite values each (std > 0), got {mean} and {std}")
        if not (all(0 <= m <= 1 for m in mean) and all(_MIN_STD <= s <= 1 for s in std)):
            # Only values above 1 look like 0-255 ones: dividing a tiny std or a negative mean helps nothing.
            hint = " (constants on the 0-255 scale: divide them by 255)" if max(*mean, *std) > 1 else ""
            raise ValueError(
                f"mean and std are for images in [0, 1]: each mean in [0, 1] and each std in "
                f"[{_MIN_STD:g}, 1], got {mean} and {std}{hint}"
            )
        return tuple(mean), tuple(std)
    if dataset == "":
        raise ValueError(f"the dataset name is empty: use one of {sorted(NORMALIZATION)}, or mean and std")
    key = (dataset or DEFAULT_DATASET).replace("-", "_")
    if key not in NORMALIZATION:
        if official := official_dataset(key):  # a dataset of official weights whose code records none
            named = "" if official == dataset else f" ({official})"
            raise ValueError(
                f"no normalization constants are known for dataset {dataset!r}{named}, and the official code has "
                "none either: give the mean and std of its images (fastvit_style.data.compute_normalization"
                "(folder) computes them)"
            )
        raise ValueError(
            f"no normalization constants for dataset {dataset!r}: use one of {sorted(NORMALIZATION)} or mean/std"
        )
    return NORMALIZATION[key]


def to_uint8(x01: torch.Tensor) -> np.ndarray:
    """(C, H, W) float, clamped to [0, 1] -> (H, W, C) uint8, rounded (x*255 + 0.5, floored)."""
    return (x01.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def png_bytes(pixels: np.ndarray) -> bytes:
    """(H, W, C) uint8, C = 1 (grey) or 3 (RGB) -> an 8-bit PNG file's bytes (no row filters)."""
    h, w, c = pixels.shape
    if pixels.dtype != np.uint8 or c not in (1, 3):
        raise ValueError(f"PNG pixels must be (H, W, 1 or 3) uint8, got {pixels.shape} {pixels.dtype}")
    rows = np.concatenate([np.zeros((h, 1), np.uint8), pixels.reshape(h, w * c)], axis=1)  # filter byte 0

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2 if c == 3 else 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def save_png(x01: torch.Tensor, path) -> str:
    """Write a (C, H, W) image in [0, 1] (C = 1 or 3; clamped) as an 8-bit PNG, atomically; creates folders."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = png_bytes(to_uint8(x01))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path
