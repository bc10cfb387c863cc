"""What the stylize and tta commands share: model/normalization arguments, output names, progress."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from ..configs import DEFAULT_DATASET
from ..devices import resolve_device
from ..imageio import list_images, normalization, require_pil


def add_model_arguments(parser) -> None:
    parser.add_argument(
        "--weights", required=True, help="weight file (.safetensors/.pth) or official dataset id"
    )
    parser.add_argument("--backbone", default="base", help="tiny, small or base (default: base)")
    parser.add_argument(
        "--model-kwargs",
        default=None,
        metavar="JSON",
        help="StylizingViT keyword overrides for a custom model, e.g. '{\"encoder_depth\": 6}'",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument(
        "--batch-size", type=positive_int, default=8, help="images loaded and stylized at a time"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random reference draws (--k)")
    norm = parser.add_mutually_exclusive_group()
    norm.add_argument(
        "--dataset",
        default=None,
        help=f"normalization constants of this dataset (default: {DEFAULT_DATASET})",
    )
    norm.add_argument("--mean", type=float, nargs=3, metavar="M", help="per-channel mean (with --std)")
    parser.add_argument("--std", type=float, nargs=3, metavar="S", help="per-channel std (with --mean)")


def device(args) -> torch.device:
    return resolve_device(args.device)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def check_output_folder(path: str, flag: str) -> None:
    """Before any work: an output folder must be a folder or not exist yet."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(f"error: {flag} {path!r} exists and is not a folder")


def load_stylizer(args):
    """The frozen StylizingViT of --backbone/--weights on --device, in eval mode."""
    from ..model import create_model

    try:
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: --model-kwargs is not valid JSON ({e})") from None
    model = create_model(args.backbone, weights=args.weights, **kwargs).to(device(args)).eval()
    return model.requires_grad_(False)


def find_images(*named_folders: tuple[str, str]) -> list[list[str]]:
    """The images under each (what, folder) pair; exits with a message when Pillow is missing or a folder
    holds no image."""
    try:
        require_pil()
    except ImportError as e:
        raise SystemExit(f"error: {e}") from None
    found = [list_images(folder) for _, folder in named_folders]
    for (what, folder), paths in zip(named_folders, found):
        if not paths:
            raise SystemExit(f"error: no {what} images (png/jpg/jpeg/tif/tiff/bmp) under {folder!r}")
    return found


def mean_std(args) -> tuple[tuple, tuple]:
    try:
        return normalization(args.dataset, args.mean, args.std)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def output_names(paths: list[str], root: str) -> list[str]:
    """File-name stems for outputs: the path below `root` without suffix, folders joined by '_'."""
    names = [os.path.splitext(os.path.relpath(p, root))[0].replace(os.sep, "_") for p in paths]
    seen: dict[str, str] = {}
    for name, path in zip(names, paths):
        if name in seen:
            raise SystemExit(
                f"error: {seen[name]!r} and {path!r} give the same output name {name!r}: rename one"
            )
        seen[name] = path
    return names


def progress(iterable, total: int, desc: str):
    """tqdm when installed, else a counter on stderr."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _counter(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc, unit="batch")


def _counter(iterable, total: int, desc: str):
    for i, item in enumerate(iterable, 1):
        yield item
        print(f"\r{desc}: {i}/{total}", end="\n" if i == total else "", file=sys.stderr, flush=True)
