"""What the stylize and tta commands share: model/normalization arguments, output names, progress."""

from __future__ import annotations

import argparse
import os
import sys
import unicodedata

import torch

from ..atomic import (
    NAME_MAX,
    atomic_path,
    folder_problem,
    folds_case,
    remove_temporaries_of,
    temporaries,
    writable_problem,
)
from ..configs import (
    DEFAULT_DATASET,
    NORMALIZATION,
    ModelConfig,
    check_backbone,
    check_model_kwargs,
    parse_model_kwargs,
    weights_dataset,
)
from ..devices import resolve_device
from ..imageio import IMAGE_KINDS, list_images, normalization, require_pil, save_png
from ..weights import read_normalization

BACKBONE_HELP = (
    "tiny, small, base, large or huge (or vit_tiny, ...), or a custom ViT's name with encoder_* keywords "
    "in --model-kwargs"
)


def add_model_arguments(parser) -> None:
    parser.add_argument(
        "--weights",
        required=True,
        type=non_empty("name a weight file (.safetensors/.pth), an official dataset id or a hub repo id"),
        help="weight file (.safetensors/.pth) or official dataset id",
    )
    parser.add_argument("--backbone", default="base", help=BACKBONE_HELP + " (default: base)")
    parser.add_argument(
        "--model-kwargs",
        default=None,
        metavar="JSON",
        help="StylizingViT keyword overrides for a custom model, e.g. '{\"encoder_depth\": 6}'",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        help="content images loaded and stylized at a time (default: 8; the references are all loaded at once)",
    )
    parser.add_argument("--seed", type=seed_int, default=0, help="seed of the random reference draws (--k)")
    norm = parser.add_mutually_exclusive_group()
    norm.add_argument(
        "--dataset",
        default=None,
        help=f"normalization constants of this dataset (default: those --weights names: an official "
        f"dataset id or hub repo id, or a training export's recorded constants; else {DEFAULT_DATASET})",
    )
    norm.add_argument("--mean", type=float, nargs=3, metavar="M", help="per-channel mean (with --std)")
    parser.add_argument("--std", type=float, nargs=3, metavar="S", help="per-channel std (with --mean)")


def device(args) -> torch.device:
    return resolve_device(args.device)


def non_empty(what: str):
    """An argparse type: the text, unless empty (an unset shell variable), which the API takes for none
    (weights="" loads none, officially: a run on random weights)."""

    def check(text: str) -> str:
        if not text:
            raise argparse.ArgumentTypeError(f"is empty: {what}")
        return text

    return check


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, least: int) -> int:
    value = int(text)
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def seed_int(text: str) -> int:
    """An integer torch.Generator.manual_seed accepts: -2**63 .. 2**64 - 1."""
    value = int(text)
    if not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must lie in -2**63 .. 2**64-1, got {value}")
    return value


# In every folder the commands write images to: an input folder's listing leaves out a subfolder that
# holds one, so a run never reads an earlier run's outputs as its inputs.
OUTPUTS_MARKER = ".fastvit-style-outputs"


def check_output_folder(path: str, flag: str) -> None:
    """Before any work: an output folder must be a folder or not exist yet, and take files."""
    if problem := folder_problem(path, flag) or writable_problem(path, flag):
        raise SystemExit(f"error: {problem}")


def check_file_folder(path: str, flag: str) -> None:
    """Before any work: a file can be written at `path` (its folder is created when it is written)."""
    check_output_folder(os.path.dirname(os.path.abspath(path)), f"{flag} {path!r}: the folder")


def make_output_folder(path: str) -> dict[str, list[str]]:
    """Create the output folder `path` of images, marked as holding outputs (OUTPUTS_MARKER). Returns the
    temporaries a killed earlier run left there (`atomic.temporaries`), for `save_output_png`."""
    os.makedirs(path, exist_ok=True)
    marker = os.path.join(path, OUTPUTS_MARKER)
    if not os.path.exists(marker):
        with atomic_path(marker) as tmp, open(tmp, "w") as f:
            f.write(
                "fastvit-style stylize/tta images: left out where this folder lies below an input folder\n"
            )
    return temporaries(path)


def save_output_png(image: torch.Tensor, folder: str, name: str, leftovers: dict[str, list[str]]) -> None:
    """image (3, H, W) float in [0, 1] to folder/name, and away with the temporary a killed earlier run
    left for that very file (leftovers: `make_output_folder`'s)."""
    remove_temporaries_of(leftovers, name)
    save_png(image, os.path.join(folder, name))


def existing_outputs(folder: str):
    """Whether an earlier run wrote the image `name` to the output folder `folder`, as of this call: a
    regular file of that name (a run writes no links) in a folder marked as a run's (OUTPUTS_MARKER;
    `pair_names` refuses a user's file at an output name elsewhere). Its existence proves it whole:
    writes are atomic. One listing of the folder; names compared as its file system does (`folds_case`)."""
    if not os.path.isfile(os.path.join(folder, OUTPUTS_MARKER)):
        return lambda name: False
    key = _fold if folds_case(folder) else str
    with os.scandir(folder) as entries:
        found = {key(entry.name) for entry in entries if entry.is_file(follow_symlinks=False)}
    return lambda name: key(name) in found


def stylizer_config(args) -> tuple[ModelConfig, dict]:
    """The config of the model --backbone and --model-kwargs describe, and those kwargs; no weights read."""
    try:
        kwargs = parse_model_kwargs("--model-kwargs", args.model_kwargs) if args.model_kwargs else {}
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    check_backbone(args.backbone, kwargs)
    config = check_model_kwargs("--model-kwargs", args.backbone, kwargs)
    if config.in_channel != 3:
        raise ValueError(
            f"--model-kwargs in_channel={config.in_channel}: the commands read images as RGB (3 channels); "
            "for other channel counts use the Python API"
        )
    return config, kwargs


def load_stylizer(args, note: str | None = None):
    """The frozen StylizingViT of --backbone/--weights on --device, in eval mode; `note` (from `mean_std`)
    goes to stderr once it has loaded, after any error the weights or the device raise."""
    from ..model import create_model

    _, kwargs = stylizer_config(args)
    model = create_model(args.backbone, weights=args.weights, **kwargs)
    model = model.to(device(args)).eval().requires_grad_(False)
    if note:
        print(note, file=sys.stderr)
    return model


def find_images(*named_folders: tuple[str, str], output: tuple[str, str] | None = None) -> list[list[str]]:
    """The images under each (what, folder) pair; exits with a message when Pillow is missing or a folder
    holds no image. `output` (flag, folder): where the run writes images, flat. What an input folder
    reaches of it (as a subfolder, or through a linked folder) is left out of that folder's images (a note
    says how many), else the next run would read this one's outputs as inputs; the input folder itself
    is refused as the output folder, for the same reason."""
    try:
        require_pil()
    except ImportError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        found = [list_images(folder, f"{what} folder") for what, folder in named_folders]
    except (FileNotFoundError, NotADirectoryError) as e:
        raise SystemExit(f"error: {e}") from None
    if output is not None:
        flag, out = output[0], os.path.realpath(output[1])
        for i, (what, folder) in enumerate(named_folders):
            real = os.path.realpath(folder)
            if out == real:
                raise SystemExit(
                    f"error: {flag} {output[1]!r} is the {what} folder: the outputs would be read as {what} "
                    "images next time; give another folder or a subfolder"
                )
            # An input folder below the output folder (`--out .`) is read, except for the outputs' own files.
            below_out = real.startswith(os.path.join(out, ""))

            def is_output(p, below_out=below_out):
                p = os.path.realpath(p)
                return os.path.dirname(p) == out or (not below_out and p.startswith(os.path.join(out, "")))

            kept = [p for p in found[i] if not is_output(p)]
            # Said where no earlier run marked the folder: those are the user's own images, not outputs.
            if len(kept) < len(found[i]) and not os.path.isfile(os.path.join(out, OUTPUTS_MARKER)):
                print(
                    f"note: left out {len(found[i]) - len(kept)} {what} images in {output[1]!r}, the {flag} "
                    "folder: a run never reads the images where it writes (move them out to use them)",
                    file=sys.stderr,
                )
            found[i] = kept
    found = [_without_earlier_outputs(paths, folder) for (_, folder), paths in zip(named_folders, found)]
    for (what, folder), paths in zip(named_folders, found):
        if not paths:
            raise SystemExit(f"error: no {what} images ({IMAGE_KINDS}) under {folder!r}")
    return found


def _without_earlier_outputs(paths: list[str], root: str) -> list[str]:
    """`paths` (images below `root`) less those in a subfolder that an earlier run marked as its output
    folder (OUTPUTS_MARKER), each such folder named on stderr."""
    marked: dict[str, bool] = {}

    def under_marked(path: str) -> str | None:
        folder = os.path.dirname(path)
        while os.path.relpath(folder, root) != os.curdir:
            if folder not in marked:
                marked[folder] = os.path.isfile(os.path.join(folder, OUTPUTS_MARKER))
            if marked[folder]:
                return folder
            folder = os.path.dirname(folder)
        return None

    kept, skipped = [], {}
    for path in paths:
        if (folder := under_marked(path)) is None:
            kept.append(path)
        else:
            skipped[folder] = skipped.get(folder, 0) + 1
    for folder, n in skipped.items():
        print(
            f"note: left out {n} images under {folder!r}: an earlier run's output folder (remove its "
            f"{OUTPUTS_MARKER} file to read them as inputs)",
            file=sys.stderr,
        )
    return kept


def mean_std(args) -> tuple[tuple, tuple, str | None]:
    """--mean/--std, else the constants of --dataset, else those a weight file records (training
    exports), else those of the dataset whose official weights --weights names, else of DEFAULT_DATASET.
    Also a note to print once the weights have loaded, in that last case (weights trained on other
    images need --dataset or --mean/--std), else None."""
    dataset, mean, std, note = args.dataset, args.mean, args.std, None
    if dataset is not None and std is not None:  # argparse refuses --dataset with --mean
        raise SystemExit("error: --dataset and --std both give normalization constants: give one")
    if dataset is None and mean is None:
        is_file = os.path.isfile(args.weights)
        try:
            recorded = read_normalization(args.weights) if is_file else None
        except ValueError as e:
            raise SystemExit(f"error: --weights: {e}; give --dataset or --mean/--std") from None
        official = None if is_file else weights_dataset(args.weights)
        if recorded is not None:
            mean, std = recorded
        elif official is not None:
            if official not in NORMALIZATION:
                raise SystemExit(
                    f"error: no normalization constants are known for the {official} weights (the official "
                    "code has none either): give --mean and --std of the images they were trained on "
                    "(fastvit_style.data.compute_normalization(folder) computes them), or --dataset"
                )
            dataset = official
        else:
            note = (
                f"note: normalizing with the {DEFAULT_DATASET} constants, the default for weights that do "
                "not name their dataset: give --dataset or --mean/--std for weights trained on other images"
            )
    try:
        return (*normalization(dataset, mean, std), note)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


_CASE_NOTE = " (the output folder's file system takes them for one name: it ignores case)"


def _fold(name: str) -> str:
    """`name` as a file system that ignores case compares it, approximately: composed (APFS ignores how
    accents are encoded), each character by its one-character upper case (NTFS and FAT's simple
    mapping: `ß` stays, as `straße` and `strasse` stay two files)."""
    return "".join(u if len(u := c.upper()) == 1 else c for c in unicodedata.normalize("NFC", name))


def output_names(paths: list[str], root: str, fold_case: bool = False) -> list[str]:
    """File-name stems for outputs: the path below `root` without suffix, folders joined by '_'.
    `fold_case`: names that differ only in case count as the same."""
    names = [os.path.splitext(os.path.relpath(p, root))[0].replace(os.sep, "_") for p in paths]
    seen: dict[str, str] = {}
    for name, path in zip(names, paths):
        key = _fold(name) if fold_case else name
        if key in seen:
            raise SystemExit(
                f"error: {seen[key]!r} and {path!r} give the same output name {name!r}"
                f"{_CASE_NOTE if fold_case else ''}: rename one"
            )
        seen[key] = path
    return names


def _bytes(name: str) -> int:
    return len(name.encode(errors="surrogateescape"))


def pair_names(
    contents: list[str], content_root: str, styles: list[str], style_root: str, output: tuple[str, str]
):
    """Output stems of the content and style images, such that every `<content>__<style>` is unique in the
    output folder (output: its option and path), also where its file system takes names that differ
    only in case for one (`folds_case`), and no folder there holds the name of an output.

    Pairs (shorter, s1) and (shorter + t, s2) collide when `__` + s1 == t + `__` + s2, which needs t to
    be `_` or to start with `__` (`a` + `b__c` and `a__b` + `c`; `a` + `_b` and `a_` + `b`): found from
    the content names that extend another, so a run refuses before one output overwrites another.
    """
    fold_case = folds_case(output[1])
    content_names = output_names(contents, content_root, fold_case)
    style_names = output_names(styles, style_root, fold_case)
    longest = max(content_names, key=_bytes) + "__" + max(style_names, key=_bytes) + ".png"
    if _bytes(longest) > NAME_MAX:
        raise SystemExit(
            f"error: the output name {longest!r} would be longer than the {NAME_MAX} bytes file systems "
            "allow: shorten the file names (or folder names below the input folders) of that pair"
        )
    key = _fold if fold_case else str
    content_of = {key(n): (n, p) for n, p in zip(content_names, contents)}
    style_of = {key(n): (n, p) for n, p in zip(style_names, styles)}
    for longer in content_of:
        for cut in range(1, len(longer)):
            shorter, t = longer[:cut], longer[cut:]
            if shorter not in content_of or not (t == "_" or t.startswith("__")):
                continue
            for style in style_of:
                clash = (t + "__" + style)[2:]
                if clash in style_of:
                    raise SystemExit(
                        f"error: content {content_of[shorter][1]!r} with style {style_of[clash][1]!r} and "
                        f"content {content_of[longer][1]!r} with style {style_of[style][1]!r} would both be "
                        f"written to {content_of[longer][0]}__{style_of[style][0]}.png"
                        f"{_CASE_NOTE if fold_case else ''}: rename one"
                    )
    _check_outputs_replaceable(output, content_of, style_of, key)
    return content_names, style_names


def _check_outputs_replaceable(output: tuple[str, str], content_of: dict, style_of: dict, key) -> None:
    """SystemExit where a folder in the output folder has the name of an output `<content>__<style>.png`
    (content_of, style_of: keyed by key(stem)), which a run would meet at that write, after its work; or
    a file has, in a folder without OUTPUTS_MARKER: no run wrote it, it is the user's. A file in a marked
    folder is replaced, as an earlier run's output is. Reads the folder once, not once per pair."""
    flag, folder = output
    if not os.path.isdir(folder):
        return
    marked = os.path.isfile(os.path.join(folder, OUTPUTS_MARKER))
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, suffix = os.path.splitext(entry.name)
            is_dir = entry.is_dir(follow_symlinks=False)
            if key(suffix) != key(".png") or (marked and not is_dir):
                continue
            stem = key(stem)
            kind, why, other = ("folder", "", "") if is_dir else (
                "file", f" that no earlier run marked as its output (the folder has no {OUTPUTS_MARKER})",
                f", or choose another {flag} (or create {OUTPUTS_MARKER} there, if its images are outputs)",
            )  # fmt: skip
            for cut in range(1, len(stem) - 2):
                if stem[cut : cut + 2] == "__" and stem[:cut] in content_of and stem[cut + 2 :] in style_of:
                    raise SystemExit(
                        f"error: {flag} {folder!r} holds a {kind} {entry.name!r}{why}, the name of the output of "
                        f"content {content_of[stem[:cut]][1]!r} with style {style_of[stem[cut + 2 :]][1]!r}: move "
                        f"or rename that {kind}{other}"
                    )


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
