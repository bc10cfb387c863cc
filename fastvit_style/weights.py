"""The one place where weight files are read and written (shared doc 2.2, 2.3).

Reading never unpickles arbitrary objects: safetensors files through safetensors, everything else only
through `torch.load(weights_only=True)`; the file's first bytes tell the two apart, its name only where
they do not (a safetensors file named .pth is read as safetensors). Writing is atomic. Files use the
official key names, so the official package loads what we save and we load what it saved.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping

import torch
from torch import nn

from . import configs, imageio
from .atomic import atomic_path, file_path_problem, str_path
from .checkpoint import has_random_vgg, torch_load_reason

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
NORMALIZATION_KEY = "fastvit_style.normalization"  # safetensors metadata: the training images' mean/std
_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel and torch.compile wrappers
_WIDTH_NAMES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}
_CONVERT_HINT = (
    "If you trust its source, convert it once to a plain state dict, e.g. `sd = torch.load(path, "
    "weights_only=False)`, then `fastvit_style.weights.save_state_dict(sd['model'], 'model.safetensors')` "
    "(whichever entry holds the tensors; `sd.state_dict()` for a whole pickled model), and load the "
    ".safetensors file."
)


class WeightsError(RuntimeError):
    """Weights that do not fit the model (missing or unexpected keys, shapes, dtypes) or cannot be
    fetched: a RuntimeError, as torch's load_state_dict raises, that callers can tell from a crash."""


class WeightsNotFetched(WeightsError, ValueError):
    """Weights that cannot be fetched from the hub: also a ValueError, which the official
    load_pretrained_weights raises there (callers may catch it to fall back)."""


class WeightsNotFound(FileNotFoundError, ValueError):
    """A `weights` that names no file, dataset id or repo id: also a ValueError, as officially (the
    official code tries such a string as a repo id and raises ValueError when its download fails)."""


# ----------------------------------------------------------------------------------------------- reading


def read_state_dict(path) -> dict:
    """Read a weight file onto the CPU: {name: Tensor} as stored (a checkpoint may wrap it under
    'model'/'state_dict'; `clean_state_dict` unwraps). Dtypes are kept as stored (official files: fp32)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        if os.path.exists(path) and not os.path.isdir(path):  # reading a pipe could block forever
            raise ValueError(f"weight file {path!r} is not a regular file (a pipe or a device)")
        what = "is a directory, not a weight file" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"weight file {path!r} {what}")
    suffix = os.path.splitext(path)[1].lower()
    # What the bytes are decides before the name does: a safetensors file named .pth is still one.
    kind = _sniff(path)
    if kind == "safetensors" or (kind is None and suffix == SAFETENSORS_SUFFIX):
        sd = _read_safetensors(path)
    elif kind == "torch" or suffix in TORCH_SUFFIXES:
        sd = _read_torch(path)
    else:  # unknown extension and unrecognized start (e.g. a truncated header): try both, safest first
        try:
            sd = _read_safetensors(path)
        except ValueError as st_err:
            try:
                sd = _read_torch(path)
            except ValueError as pt_err:
                if "refused for safety" in str(pt_err):
                    raise
                with open(path, "rb") as f:
                    safetensors_like = f.read(9)[8:] == b"{"  # a header length and '{', not the whole file
                if "is not a weight file" in str(pt_err) and not safetensors_like:
                    raise pt_err from None  # neither format's start: it says how the file starts
                raise ValueError(
                    f"{path!r} is truncated or corrupt, or not a weight file: neither safetensors "
                    f"({str(st_err.__cause__)[:120]}) nor torch.load ({torch_load_reason(pt_err.__cause__)[:120]}) "
                    "can read it"
                ) from None
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path!r} holds a {type(sd).__name__}, not a dict of tensors (a state dict)")
    return dict(sd)


def _read_safetensors(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{path!r} is truncated or corrupt: safetensors could not read it ({e})") from e


def _sniff(path: str) -> str | None:
    """'safetensors', 'torch' or None from the first bytes of the file at `path`. safetensors: an 8-byte
    little-endian header length that fits the file, then '{'; torch: a zip archive (torch.save) or a
    pickle of protocol 2 to 5 (legacy torch.save, pickle.dump)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if (
        len(head) == 9
        and head[8:] == b"{"
        and 8 + int.from_bytes(head[:8], "little") <= os.path.getsize(path)
    ):
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or (
        head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    ):
        return "torch"
    return None


def _read_torch(path: str):
    # Named before torch.load, which would first warn of 'dispatching to torch.jit.load' (it does not).
    if other := _other_archive(path):
        raise ValueError(
            f"{path!r} is not a weight file: it is {other}, then "
            "`fastvit_style.weights.save_state_dict(sd, 'model.safetensors')`, and load that file"
        )
    try:
        with open(path, "rb") as f:  # a file, not a name: torch >= 2.13 reads any *.safetensors name as one
            return torch.load(f, map_location="cpu", weights_only=True)
    except (PermissionError, MemoryError):
        raise
    except Exception as e:
        torch_file = _sniff(path) == "torch"
        written_by, protocol = _pickle_origin(path) if torch_file else (None, None)
        if written_by == "pickle.dump":  # torch.load reads no such file, even with weights_only=False
            raise ValueError(
                f"{path!r} was refused for safety: it is a plain Python pickle (pickle.dump), not a torch.save "
                "or safetensors file, and unpickling it could run code. If you trust its source, convert it "
                "once: `sd = pickle.load(open(path, 'rb'))`, then `fastvit_style.weights.save_state_dict(sd, "
                "'model.safetensors')` (sd['model'] or whichever entry holds the tensors), and load the "
                ".safetensors file."
            ) from e
        if protocol is not None and protocol >= 4 and "Unsupported operand" in str(e):
            raise ValueError(
                f"{path!r} was refused for safety: it was written with pickle protocol {protocol} "
                f"(torch.save(..., pickle_protocol={protocol})), which torch.load(weights_only=True) cannot "
                "read, so its contents cannot be checked. " + _CONVERT_HINT
            ) from e
        # The weights-only unpickler met something other than tensors and containers in a pickle (a
        # torch file, or any pickle naming a global): code could run (a `__reduce__` payload) if we
        # unpickled it, so we never do. A damaged pickle also lands here.
        if isinstance(e, pickle.UnpicklingError) and (torch_file or "GLOBAL" in str(e)):
            raise ValueError(
                f"{path!r} was refused for safety: it contains Python objects other than tensors, which "
                f"torch.load(weights_only=True) does not allow ({torch_load_reason(e)}); it may also be corrupt. "
                + _CONVERT_HINT
            ) from e
        if not torch_file and os.path.getsize(path):  # an empty file is most likely a truncated write
            with open(path, "rb") as f:
                head = f.read(8)
            raise ValueError(
                f"{path!r} is not a weight file: it starts with {head!r}, neither a torch file (a zip "
                "archive or a pickle) nor safetensors (an 8-byte header length, then '{')"
            ) from e
        # torch's own words: were they to change, the file reads as corrupt with them quoted
        newer = re.search(
            r"file with version (\d+), but the maximum supported version for reading is (\d+)", str(e)
        )
        if newer:
            raise ValueError(
                f"{path!r} was written by a newer PyTorch: its format version {newer[1]} is newer than "
                f"{newer[2]}, the newest that torch {torch.__version__} reads; upgrade torch to read it"
            ) from e
        # zip/EOF/struct errors: the bytes are damaged, not dangerous
        raise ValueError(
            f"{path!r} is truncated or corrupt: torch.load could not read it ({type(e).__name__}: {e})"
        ) from e


def _other_archive(path: str) -> str | None:
    """What a zip that is no torch.save archive is, by its member names, and how to get a state dict out of
    it; None for a torch.save archive, a damaged zip or no zip."""
    try:
        with open(path, "rb") as f:  # zipfile would also take a file whose tail looks like a zip's
            if f.read(4) != b"PK\x03\x04":
                return None
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError):
        return None
    records = {name.split("/", 1)[-1] for name in names}  # torch writes its records under one folder
    if "constants.pkl" in records:  # what torch.load itself tells TorchScript by
        return (
            "a TorchScript archive (torch.jit.save); if you trust its source (loading it runs it), "
            "`sd = torch.jit.load(path).state_dict()`"
        )
    # 'archive_format': the pt2 archive of torch >= 2.8; 'serialized_exported_program.json': the older layout
    if records & {"archive_format", "serialized_exported_program.json"}:
        return (
            "a torch.export archive (torch.export.save); if you trust its source (loading it unpickles), "
            "`sd = torch.export.load(path).state_dict`"
        )
    if names and all(name.endswith(".npy") for name in names):
        return (
            "a numpy .npz archive (numpy.savez); its arrays as tensors: "
            "`sd = {k: torch.from_numpy(v) for k, v in numpy.load(path).items()}`"
        )
    return None


# The first pickle of a legacy torch.save file: torch's magic number, 0x1950a86a20f9469cfc6c (LONG1).
_TORCH_MAGIC = b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _pickle_origin(path: str) -> tuple[str | None, int | None]:
    """Who wrote a file that `_sniff` calls 'torch', and its pickle protocol: ('torch.save', p) for a zip
    archive (its data.pkl's) or a legacy torch.save file (which starts with torch's magic number),
    ('pickle.dump', p) for any other pickle; (None, None) where it cannot be told (a damaged archive)."""
    with open(path, "rb") as f:
        head = f.read(32)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
                with archive.open(name) as f:
                    data = f.read(2)
        except (OSError, zipfile.BadZipFile, StopIteration, RuntimeError, ValueError):
            return None, None
        return "torch.save", data[1] if data[:1] == b"\x80" and len(data) == 2 else None
    return ("torch.save" if _TORCH_MAGIC in head else "pickle.dump"), head[1]


# ----------------------------------------------------------------------------------------------- cleaning


def _strip_prefixes(sd: Mapping) -> dict:
    out, source = {}, {}
    for key, value in sd.items():
        if not isinstance(key, str):  # any file may hold any keys; a state dict's are parameter names
            raise ValueError(f"state dict key {key!r} is a {type(key).__name__}, not a parameter name (str)")
        name = key
        while name.startswith(_PREFIXES):
            name = name.split(".", 1)[1]
        if name in source:  # one of the two would silently win
            first, second = sorted((source[name], key), key=len, reverse=True)
            raise ValueError(
                f"state dict keys {first!r} and {second!r} are both {name!r} once the wrapper prefixes "
                f"{' and '.join(map(repr, _PREFIXES))} are stripped; keep one of them"
            )
        out[name], source[name] = value, key
    return out


def _has_vgg(model) -> bool:
    return getattr(model, "vgg_encoder", None) is not None


def is_vgg_key(name: str) -> bool:
    """Whether a state_dict key or parameter name is the loss network's (VGG19, train=True only)."""
    return name.startswith("vgg_encoder.")


def without_vgg(sd: Mapping) -> dict:
    """sd without the loss network's entries: what a train=False model holds."""
    return {k: v for k, v in sd.items() if not is_vgg_key(k)}


def clean_state_dict(sd: Mapping, model: nn.Module | None = None) -> dict:
    """Official cleanup (shared doc 2.3, step 4), a bit wider: unwrap 'model'/'state_dict' (repeatedly),
    strip leading `module.`/`_orig_mod.` (any order, repeated), drop `vgg_encoder.*` when `model` has
    no VGG (train=False). Returns a new flat {name: Tensor}."""
    while True:
        inner = next((sd[k] for k in ("model", "state_dict") if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    sd = _strip_prefixes(sd)
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"state dict entry {bad[0]!r} is a {type(sd[bad[0]]).__name__}, not a tensor")
    if model is not None and not _has_vgg(model):
        sd = without_vgg(sd)
    return sd


# ----------------------------------------------------------------------------------------------- loading


def describe_backbone(sd: Mapping) -> str:
    """'tiny (embed_dim 192, depth 12, patch 16)' from the shapes in a state dict, for error messages."""
    ref = sd.get("encoder.pos_embed", sd.get("encoder.cls_token"))
    if ref is None:
        return "no Stylizing ViT encoder (no encoder.pos_embed)"
    if not isinstance(ref, torch.Tensor) or ref.dim() == 0:  # any file may hold anything under this name
        return "no Stylizing ViT encoder (encoder.pos_embed is not a (1, N, L) tensor)"
    width = ref.shape[-1]
    blocks = {m.group(1) for k in sd if (m := re.match(r"encoder\.blocks\.(\d+)\.", k))}
    proj = sd.get("encoder.patch_embed.proj.weight")
    patch = f", patch {proj.shape[-1]}" if isinstance(proj, torch.Tensor) and proj.dim() else ""
    size = ""
    pos = sd.get("encoder.pos_embed")
    if patch and isinstance(pos, torch.Tensor) and pos.dim() == 3:  # (1, CLS + side^2 patches, L)
        side = math.isqrt(max(pos.shape[1] - 1, 0))
        size = f", input {side * proj.shape[-1]}" if side and side * side == pos.shape[1] - 1 else ""
    return f"{_WIDTH_NAMES.get(width, 'custom')} (embed_dim {width}, depth {len(blocks)}{patch}{size})"


def _first(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def wrappers(model):
    """model, then each module inside its torch.compile, DDP or DataParallel wrappers, outermost first."""
    parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while model is not None:
        yield model
        model = model.module if isinstance(model, parallel) else getattr(model, "_orig_mod", None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside its torch.compile, DDP or DataParallel wrappers (their state dicts prefix the
    official key names)."""
    *_, inner = wrappers(model)
    return inner


def load_state_dict(model: nn.Module, sd_or_path, strict: bool = True) -> nn.Module:
    """Load a state dict or weight file into `model`, checking first so errors name the problem.

    Tensors are copied into the existing parameters (cast to the model's dtype and device); a model
    wrapped by torch.compile, DDP or DataParallel gets them inside (returned as given). The VGG19 of a
    --random-vgg run's training checkpoint is loaded but still counts as random (its losses warn).
    Raises WeightsError (a RuntimeError) on missing/unexpected keys (strict), any shape mismatch, or a
    non-float tensor.
    """
    wrapper, model = model, unwrap(model)
    raw = sd_or_path if isinstance(sd_or_path, Mapping) else read_state_dict(sd_or_path)
    sd = clean_state_dict(raw, model)
    expected = model.state_dict()

    def looks(wrong=()) -> str:  # only for an error: a loadable file need not describe well
        pos, pos_model = sd.get("encoder.pos_embed"), expected.get("encoder.pos_embed")
        # Only the token count differs (CLS + patches): the same backbone built for another input size.
        other_size = (
            len(wrong) == 1
            and isinstance(pos, torch.Tensor)
            and pos.dim() == 3
            and pos.shape[::2] == pos_model.shape[::2]
            and pos.shape != pos_model.shape
        )
        if other_size:
            picks = "input_size sets the token count: in the commands' --model-kwargs, train's --input-size"
        else:
            picks = (
                "the backbone name and encoder_* keywords pick the model: the commands' --backbone and "
                "--model-kwargs"
            )
        described = (
            f"the weights look like {describe_backbone(sd)}, the model is {describe_backbone(expected)}"
        )
        return f"{described} ({picks})"

    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if strict and (missing or unexpected):
        lines = []
        if missing:
            lines.append(f"{len(missing)} missing keys: {_first(missing)}")
            if all(map(is_vgg_key, missing)):
                lines.append(
                    "the weights have no VGG19 loss network: build the model with train=False, "
                    "or load strict=False and then load_vgg_weights(model, vgg19_file)"
                )
        if unexpected:
            lines.append(f"{len(unexpected)} unexpected keys: {_first(unexpected)}")
        lines.append(looks())
        raise WeightsError("cannot load weights: " + "; ".join(lines))
    wrong = [
        f"{k} {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if wrong:
        raise WeightsError(
            f"cannot load weights: {len(wrong)} shape mismatches ({_first(wrong, 3)}); " + looks(wrong)
        )
    not_float = [f"{k} ({sd[k].dtype})" for k in expected if k in sd and not sd[k].is_floating_point()]
    if not_float:
        raise WeightsError(f"cannot load weights: non-floating-point tensors {_first(not_float)}")
    # strict=False loads what fits, as the official experiment scripts do, but not in silence: a
    # missing VGG19 alone is the documented way to a train=False file in a train=True model.
    skipped = [k for k in missing if not is_vgg_key(k)]
    parts = (
        [f"left {len(skipped)} of the model's tensors as they were ({_first(skipped)})"] if skipped else []
    )
    parts += (
        [f"ignored {len(unexpected)} tensors of the weights ({_first(unexpected)})"] if unexpected else []
    )
    if parts:
        warnings.warn("load_state_dict(strict=False) " + " and ".join(parts), stacklevel=2)
    model.load_state_dict(sd, strict=strict)
    if _has_vgg(model) and has_random_vgg(raw):
        # A --random-vgg run's checkpoint holds its VGG19 under the official names: loaded, still random.
        model.vgg_encoder.loaded = False
    return wrapper


# ------------------------------------------------------------------------------------ pretrained / hub


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def load_pretrained_weights(model: nn.Module, backbone: str, dataset: str, map_location=None) -> nn.Module:
    """Official helper: `dataset` is a local file, a dataset id (`configs.DATASET_IDS` or an alias) or a
    Hugging Face repo id. Hub files need the optional `huggingface_hub`; without it, or offline, this
    fails at once with the repo to download by hand. `map_location` is accepted for the official
    signature only: tensors are always read on the CPU and copied onto the model's device."""
    source = weight_source(dataset, "dataset")
    if os.path.isfile(source):
        return load_state_dict(model, source, strict=True)
    if (official := configs.official_dataset(source)) is not None:
        repo = configs.hub_repo_id(backbone, official)
    elif os.path.isdir(source):  # before the repo-id fallback, which a folder's name can match
        raise WeightsNotFound(f"{source!r} is a folder, not a weight file (.safetensors, .pth, .pt)")
    elif os.path.exists(source):  # a pipe or a device, which the repo-id fallback would take too
        raise WeightsNotFound(f"{source!r} is not a regular file (a pipe or a device), not a weight file")
    elif _REPO_ID.match(source) and not source.lower().endswith((SAFETENSORS_SUFFIX, *TORCH_SUFFIXES)):
        repo = source  # the official fallback: any other string is a repo id
    else:
        raise WeightsNotFound(
            f"{source!r} is not an existing weight file, a dataset id ({', '.join(configs.DATASET_IDS)}) "
            f"or a Hugging Face repo id"
        )
    return load_state_dict(model, _download(repo, backbone), strict=True)


def weight_source(value, name: str) -> str:
    """`value` (str or os.PathLike) as a str; TypeError naming the argument `name` otherwise (os.fspath's
    and the repo-id match's own errors name none)."""
    if (source := str_path(value)) is None:
        raise TypeError(
            f"{name} must be a str or os.PathLike (a dataset id, a local weight file or a Hugging Face repo "
            f"id), got {type(value).__name__}"
        )
    return source


def _download(repo: str, backbone: str) -> str:
    def fail(reason: str) -> WeightsError:
        return WeightsNotFetched(
            f"cannot fetch weights from Hugging Face repo '{repo}': {reason}. Download model.safetensors "
            f"from https://huggingface.co/{repo} and pass its local path instead: --weights PATH on the "
            f"command line, create_model('{backbone}', weights=PATH) in Python"
        )

    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise fail("huggingface_hub is not installed (pip install huggingface_hub)") from None
    try:
        # etag_timeout bounds the metadata request; HF_HUB_OFFLINE=1 makes this cache-only and instant.
        return hf_hub_download(repo_id=repo, filename="model.safetensors", etag_timeout=10)
    except Exception as e:
        raise fail(f"download failed ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------------------------------- VGG


_VGG_KEY = re.compile(r"^(?:vgg_encoder\.)?features[._](\d+)\.(weight|bias)$")


def load_vgg_weights(vgg_module_or_model: nn.Module, sd_or_path) -> nn.Module:
    """Load VGG19 convs into a model's `vgg_encoder` (or a VGG19Features itself) from a timm file
    (`features.N.*`, or features_only `features_N.*`) or a torchvision file (`features.N.*`;
    `classifier.*`, `pre_logits.*`, `head.*` ignored). Every conv must be present; a --random-vgg
    training run's checkpoint is refused (WeightsError). Returns the argument."""
    target = unwrap(vgg_module_or_model)
    if hasattr(target, "vgg_encoder") or hasattr(target, "encoder"):
        target = getattr(target, "vgg_encoder", None)
        if target is None:
            raise ValueError("the model has no vgg_encoder: only a model built with train=True has one")
    raw = sd_or_path if isinstance(sd_or_path, Mapping) else read_state_dict(sd_or_path)
    if has_random_vgg(raw):
        raise WeightsError(
            "the weights are a --random-vgg training run's checkpoint: its VGG19 is random, not the "
            "ImageNet one (timm's vgg19.tv_in1k or torchvision's vgg19 file, or an official checkpoint)"
        )
    sd = clean_state_dict(raw)
    mapped = {f"features_{m.group(1)}.{m.group(2)}": v for k, v in sd.items() if (m := _VGG_KEY.match(k))}
    expected = target.state_dict()
    missing = [k for k in expected if k not in mapped]
    extra = [k for k in mapped if k not in expected]
    problems = [f"{len(missing)} convs missing: {_first(missing)}"] if missing else []
    problems += [f"{len(extra)} unexpected feature tensors: {_first(extra)}"] if extra else []
    if problems:
        raise WeightsError("not a plain VGG19 file (vgg19, not vgg19_bn): " + "; ".join(problems))
    wrong = [f"{k} {tuple(mapped[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if mapped[k].shape != v.shape]  # fmt: skip
    if wrong:
        raise WeightsError(f"VGG19 shape mismatches: {_first(wrong, 3)}")
    target.load_state_dict(mapped, strict=True)
    return vgg_module_or_model


# ---------------------------------------------------------------------------------------------- writing


def _plain_state_dict(model_or_sd) -> dict:
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    return _strip_prefixes(sd)  # a compiled/DDP model still exports the official key names


def save_state_dict(model_or_sd, path, normalization=None) -> str:
    """Write the official-format state dict (same keys, dtypes as held) to `.safetensors` or a torch
    pickle (`.pth`/`.pt`/`.bin`/`.ckpt`) atomically: a crash leaves any earlier file at `path` intact.
    normalization: (mean, std) of the images the model was trained on, recorded in a safetensors
    file's metadata (`read_normalization`), where the commands find it. A model whose VGG19 was never
    loaded (random) is saved without it, with a warning: such a file cannot pass for ImageNet weights."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix != SAFETENSORS_SUFFIX and suffix not in TORCH_SUFFIXES:
        raise ValueError(f"cannot save {path!r}: use a .safetensors or .pth file name")
    if problem := file_path_problem(path):
        raise ValueError(f"cannot save {path!r}: {problem}")
    metadata = {"format": "pt"}
    if normalization is not None:
        if suffix != SAFETENSORS_SUFFIX:
            raise ValueError(f"cannot save {path!r} with its normalization: only .safetensors files keep it")
        mean, std = _checked_normalization(normalization, f"cannot save {path!r} with normalization")
        metadata[NORMALIZATION_KEY] = json.dumps({"mean": mean, "std": std})
    # Own CPU copies: contiguous and storage-disjoint (safetensors refuses shared or strided tensors,
    # and torch.save would otherwise write whole shared storages).
    plain = _plain_state_dict(model_or_sd)
    entry = next((k for k, v in plain.items() if not isinstance(v, torch.Tensor)), None)
    if entry is not None:  # a training checkpoint ({"model": ..., "optimizer": ...}), say
        raise ValueError(
            f"cannot save {path!r}: a state dict maps names to tensors, but its entry {entry!r} holds "
            f"{type(plain[entry]).__name__}; pass the model or its state_dict (a checkpoint's 'model' entry)"
        )
    meta = next((k for k, v in plain.items() if v.is_meta), None)
    if meta is not None:  # torch.save would raise NotImplementedError: Cannot copy out of meta tensor
        raise ValueError(
            f"cannot save {path!r}: {meta!r} is on the meta device (shapes only, no values); load or "
            "initialize the weights (model.to_empty(device=...) then load) before saving"
        )
    model = unwrap(model_or_sd) if isinstance(model_or_sd, nn.Module) else None
    if _has_vgg(model) and not getattr(model.vgg_encoder, "loaded", True):
        warnings.warn(
            f"saving {path!r} without the VGG19 of this train=True model, which no weights were loaded "
            "into (random): it cannot pass for the ImageNet one; load the file into a train=False model, "
            "or with strict=False and then load_vgg_weights(model, vgg19_file)",
            stacklevel=2,
        )
        plain = without_vgg(plain)
    sd = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in plain.items()}
    with atomic_path(path, remove_leftovers=True) as tmp:
        if suffix == SAFETENSORS_SUFFIX:
            write_safetensors(sd, tmp, metadata)
        else:
            with open(tmp, "wb") as f:  # a file object: torch keeps its OSError (a full disk) as the context
                torch.save(sd, f)
    return path


def write_safetensors(tensors: dict, tmp: str, metadata: dict) -> None:
    """Write `tensors` (CPU, contiguous) with `metadata` (str -> str) as a .safetensors file at `tmp` (an
    `atomic_path` temporary). Serialized in memory (a copy of the tensors' bytes for the time of the
    write) and written here: safetensors' save_file writes a hidden temporary of its own (`.tmpXXXXXX`)
    that a killed write leaves behind and no later write recognises as a leftover to remove."""
    import safetensors.torch

    with open(tmp, "wb") as f:
        f.write(safetensors.torch.save(tensors, metadata=metadata))


def read_normalization(path) -> tuple[tuple, tuple] | None:
    """(mean, std) that `save_state_dict` recorded in the weight file at `path` (fastvit_style's training
    exports do), else None: other files, and files that cannot be read (loading them says why)."""
    path = os.fspath(path)
    try:
        if _sniff(path) != "safetensors":
            return None
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            raw = (f.metadata() or {}).get(NORMALIZATION_KEY)
    except Exception:  # OSError, SafetensorError: the load that follows reports the file's problem
        return None
    if raw is None:
        return None
    try:
        obj = json.loads(raw)
        pair = obj["mean"], obj["std"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            f"weight file {path!r}: its {NORMALIZATION_KEY!r} metadata is not "
            f'{{"mean": [3 numbers], "std": [3 numbers]}}, got {raw[:80]!r}'
        ) from None
    mean, std = _checked_normalization(pair, f"weight file {path!r}: its {NORMALIZATION_KEY!r} metadata")
    return tuple(mean), tuple(std)


def _checked_normalization(pair, what: str) -> tuple[list[float], list[float]]:
    """(mean, std) of `pair` as lists of floats, checked as the commands' --mean/--std; ValueError that
    starts with `what` otherwise."""
    try:
        mean, std = ([float(v) for v in values] for values in pair)
    except (ValueError, TypeError):
        raise ValueError(
            f"{what}: (mean, std) must be two sequences of 3 numbers, got {pair!r:.200}"
        ) from None
    try:
        imageio.normalization(mean=mean, std=std)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    return mean, std


def weight_fingerprint(model_or_sd) -> str:
    """Short sha256 hex over sorted (key, shape, dtype, bytes) of the stylization weights.

    `vgg_encoder.*` (loss network only) and wrapper prefixes are left out, so a train=True model, a
    train=False model and a compiled model with the same ViT weights share a fingerprint."""
    sd = _plain_state_dict(model_or_sd)
    h = hashlib.sha256()
    for key in sorted(without_vgg(sd)):
        t = sd[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy of the bytes
    return h.hexdigest()[:16]
