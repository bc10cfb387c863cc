"""What a training run is (TrainConfig), and the rules for where it writes and how it resumes: a new run
never replaces another's files unasked, and a resumed run keeps the settings it started with."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field

from .atomic import folder_problem, holds_json_keys, writable_problem
from .configs import (
    BACKBONES,
    LOSS_WEIGHTS,
    VGG_MIN_SIZE,
    ModelConfig,
    check_model_kwargs,
    is_int,
    untrainable,
)
from .imageio import normalization

OFFICIAL_SEED = 265017005


@dataclass
class TrainConfig:
    """Everything a run depends on; stored in every checkpoint (as a plain dict)."""

    data: str
    out: str
    val_data: str | None = None
    backbone: str = "base"
    model_kwargs: dict = field(default_factory=dict)  # official StylizingViT kwargs, e.g. encoder_depth
    epochs: int = 50
    batch_size: int = 32  # micro-batch per rank (one roll group)
    accumulate: int = 2  # micro-batches per optimizer step and rank
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_norm: float = 1.0
    loss_weights: tuple[float, float, float, float] = LOSS_WEIGHTS
    dataset: str | None = None  # normalization constants of this dataset, unless mean/std are given
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    input_size: int = 224
    bf16: bool = False
    compile: bool = False
    backend: str = "auto"
    device: str | None = None  # default: cuda:LOCAL_RANK when CUDA is available, else cpu
    vgg_weights: str | None = None
    init_weights: str | None = None
    resume: str | None = None
    seed: int = OFFICIAL_SEED
    workers: int = 4
    max_steps: int | None = None  # stop once the run (resumed parts included) made this many steps
    checkpoint_every: int = 500  # optimizer steps between mid-epoch checkpoints (0: epoch ends only)
    overwrite: bool = False  # replace the run already in `out` (else an error, unless resuming it)
    # The VGG19 is randomly initialized (smoke runs: the losses are meaningless). Asked for by --random-vgg
    # and kept only when no VGG weights are given; a resumed run takes it from its checkpoint.
    random_vgg: bool = False

    def __post_init__(self):
        for name in ("betas", "loss_weights", "mean", "std"):  # argparse/JSON give lists
            if getattr(self, name) is not None:
                setattr(self, name, tuple(getattr(self, name)))
        _check_numbers(self)
        # None leaves one out; an empty one (an unset shell variable) would be taken for none, silently.
        # (val_data '' is meant: a resumed run stops validating.)
        for name, what in (("vgg_weights", "a VGG19 weight file"), ("init_weights", "a weight file"),
                           ("resume", "a last.pt")):  # fmt: skip
            if getattr(self, name) == "":
                raise ValueError(f"--{name.replace('_', '-')} is empty: name {what}, or leave the option out")
        # Epoch e seeds torch generators with seed + e (data order, loader workers): all in torch's range.
        seed, hi = self.seed, 2**64 - self.epochs
        if not is_int(seed) or not -(2**63) <= seed <= hi:
            raise ValueError(
                f"--seed must be an integer from -2**63 to 2**64 - epochs ({hi}): epoch e seeds torch with "
                f"seed + e, got {seed!r}"
            )
        if not isinstance(self.model_kwargs, dict):
            raise ValueError(f"model_kwargs must be a dict (a JSON object), got {self.model_kwargs!r}")
        if "input_size" in self.model_kwargs:
            raise ValueError("give the image side with --input-size, not inside --model-kwargs")
        # Named by its option here; a bad patch size itself is --model-kwargs', reported below.
        default_patch = BACKBONES.get(self.backbone, {}).get("patch_size", ModelConfig.patch_size)
        patch = self.model_kwargs.get("encoder_patch_size", default_patch)
        if is_int(patch) and patch >= 1 and self.input_size % patch:
            raise ValueError(
                f"--input-size must be a positive multiple of the patch size {patch}, got {self.input_size}"
            )
        if is_int(self.input_size) and self.input_size < VGG_MIN_SIZE:
            raise ValueError(
                f"--input-size must be at least {VGG_MIN_SIZE}: the VGG19 of the losses halves the image five "
                f"times, got {self.input_size}"
            )
        # The architecture, checked before any file is read or written.
        model = check_model_kwargs(
            "model_kwargs", self.backbone, self.model_kwargs, input_size=self.input_size
        )
        problem = untrainable(model)
        if problem:
            raise ValueError(f"model_kwargs cannot be trained: {problem}")


# The integer options and their least values.
_INTS = (("epochs", 1), ("batch_size", 1), ("accumulate", 1), ("input_size", 1), ("workers", 0),
         ("checkpoint_every", 0))  # fmt: skip


def _is_finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_numbers(cfg: TrainConfig) -> None:
    """ValueError naming the option (the field, where none sets it) and the range it takes, before any
    model is built; torch's own errors (AdamW's "Invalid learning rate") name neither."""
    for name, least in _INTS:
        value = getattr(cfg, name)
        if not is_int(value) or value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {least}, got {value!r}")
    if cfg.max_steps is not None and not (is_int(cfg.max_steps) and cfg.max_steps >= 1):
        raise ValueError(f"--max-steps must be an integer >= 1 (left out: no limit), got {cfg.max_steps!r}")
    for name, value, ok, what in (
        ("--lr", cfg.lr, lambda v: v >= 0, ">= 0"),
        ("--weight-decay", cfg.weight_decay, lambda v: v >= 0, ">= 0"),
        ("eps", cfg.eps, lambda v: v >= 0, ">= 0"),
    ):
        if not (_is_finite(value) and ok(value)):
            raise ValueError(f"{name} must be a finite number {what}, got {value!r}")
    if not (_is_finite(cfg.clip_norm) or cfg.clip_norm == math.inf) or not cfg.clip_norm > 0:
        raise ValueError(f"clip_norm must be a number > 0 (inf: no clipping), got {cfg.clip_norm!r}")
    for name, values, n, ok, what in (
        ("betas", cfg.betas, 2, lambda v: 0 <= v < 1, "finite numbers in [0, 1)"),
        ("loss_weights", cfg.loss_weights, 4, lambda v: v >= 0, "finite numbers >= 0"),
        ("--mean", cfg.mean, 3, lambda v: True, "finite numbers"),
        ("--std", cfg.std, 3, lambda v: v > 0, "finite numbers > 0"),
    ):
        if values is not None and (len(values) != n or not all(_is_finite(v) and ok(v) for v in values)):
            raise ValueError(f"{name} must be {n} {what}, got {values!r}")
    if (cfg.mean is None) != (cfg.std is None):
        raise ValueError("give --mean and --std together, or neither (the constants of --dataset)")
    if cfg.mean is not None:
        try:
            normalization(None, cfg.mean, cfg.std)
        except ValueError as e:
            raise ValueError(f"--mean/--std: {e}") from None


# What a resumed run may change: where things are and how fast they run. The rest (the math) comes
# from the checkpoint, so `--resume` needs no other option repeated. val_data left out (None) keeps the
# run's: a run that validated goes on validating; given, it names the folder's new place.
RUNTIME_FIELDS = ("data", "val_data", "out", "resume", "max_steps", "workers", "compile", "backend",
                  "device", "checkpoint_every", "overwrite")  # fmt: skip
# What a run leaves in `out` besides config.json (written at its start; where --overwrite replaces a run,
# with the first of these, when the replaced run's go: a run that dies before it saved anything leaves
# that run whole).
RUN_FILES = ("last.pt", "last.safetensors", "best.safetensors", "metrics.jsonl")
# Keys every version's config.json has held (the fields of the first TrainConfig): a JSON object with them
# all is a run's, which a new run may replace. A few generic ones (data, out, epochs, batch_size, seed) would
# take a user's own training config for a run's, and replace it unasked.
RUN_CONFIG_KEYS = ("data", "out", "val_data", "backbone", "model_kwargs", "epochs", "batch_size", "accumulate",
                   "lr", "weight_decay", "betas", "eps", "clip_norm", "loss_weights", "dataset", "mean", "std",
                   "input_size", "bf16", "compile", "backend", "device", "vgg_weights", "init_weights", "resume",
                   "seed", "workers", "max_steps", "checkpoint_every")  # fmt: skip
# What every version's last.pt has held (train_images and the corrupt-file flags came later: optional).
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "batch", "step", "best_val", "world_size", "rng", "config")


def out_problem(cfg: TrainConfig) -> str | None:
    """Why `cfg.out` cannot take a new run (a new run never silently replaces another run's files), or
    None."""
    # Writable found by writing (a read-only file system), before the model and the datasets are built.
    if problem := folder_problem(cfg.out, "--out") or writable_problem(cfg.out, "--out"):
        return problem
    if cfg.resume and not os.path.isfile(cfg.resume):
        if not os.path.isdir(cfg.resume):
            exists = os.path.exists(cfg.resume)  # a pipe or a device
            return f"--resume {cfg.resume!r} {'is not a regular file' if exists else 'does not exist'}"
        last = os.path.join(cfg.resume, "last.pt")  # a run's --out given for its checkpoint
        if os.path.isfile(last):
            return f"--resume {cfg.resume!r} is a folder: pass its checkpoint, {last!r}"
        return f"--resume {cfg.resume!r} is a folder, not a last.pt checkpoint"
    config = os.path.join(cfg.out, "config.json")
    # --overwrite replaces runs, nothing else: a run's config.json is a JSON object with RUN_CONFIG_KEYS.
    if os.path.lexists(config) and not holds_json_keys(config, RUN_CONFIG_KEYS):
        return (
            f"--out {cfg.out!r} holds a config.json that no run wrote, which a run would replace (with "
            "--overwrite too): move that file, or choose another --out"
        )
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(cfg.out, f))]
    if not existing or resumes_in_place(cfg):
        return None
    if not os.path.lexists(config):  # a run writes its config.json before any of these
        return (
            f"--out {cfg.out!r} holds {', '.join(existing)} but no config.json: no run wrote them, so no run "
            "replaces them (with --overwrite neither): move them, or choose another --out"
        )
    last = os.path.join(cfg.out, "last.pt")
    # The run's other files are no training checkpoint; a checkpoint kept beside it (epoch3.pt) may be one.
    other_files = ("config.json", *(f for f in RUN_FILES if f != "last.pt"))
    if (
        cfg.resume
        and os.path.basename(cfg.resume) in other_files
        and _same_folder(cfg.resume, cfg.out)
        and os.path.exists(last)
    ):
        return (
            f"--resume {cfg.resume!r}: the run in --out {cfg.out!r} continues from its training checkpoint, "
            f"pass --resume {last!r}"
        )
    if cfg.overwrite:
        return None
    if cfg.resume:
        return (
            f"--out {cfg.out!r} holds a run ({', '.join(existing)}) whose last.pt is not the --resume checkpoint "
            f"{cfg.resume!r}: --overwrite to replace that run, or another --out"
        )
    resume = f"pass --resume {last!r} to continue it, " if os.path.exists(last) else ""
    return (
        f"--out {cfg.out!r} already holds a run ({', '.join(existing)}): {resume}--overwrite to replace it, "
        "or another --out"
    )


def _same_folder(path: str, folder: str) -> bool:
    """Whether the file `path` lies directly in `folder` (links resolved)."""
    try:
        return os.path.samefile(os.path.dirname(os.path.abspath(path)), folder)
    except OSError:
        return False


def resumes_in_place(cfg: TrainConfig) -> bool:
    """Whether --resume names the checkpoint of the run in --out itself (that run continues there)."""
    try:
        return bool(cfg.resume) and os.path.samefile(cfg.resume, os.path.join(cfg.out, "last.pt"))
    except OSError:  # either file missing
        return False


def resumed_config(cfg: TrainConfig, saved: dict, given=None) -> TrainConfig:
    """The checkpoint's config with `cfg`'s runtime fields (val_data only when given: RUNTIME_FIELDS).
    ValueError naming --resume for a saved config this version cannot use (unknown or missing fields,
    bad values), and for other fields of cfg that differ from it and were asked for (they would not take
    effect): the `given` field names (the command line's options), or where given is None those that
    differ from their defaults."""
    try:
        merged = TrainConfig(**saved)
    except (TypeError, ValueError) as e:  # TypeError: not a dict, an unknown or a missing field
        raise ValueError(
            f"--resume {cfg.resume!r} holds a training config this version cannot use: {e}"
        ) from None
    default = TrainConfig(data="", out="")
    ignored = []
    for f in dataclasses.fields(TrainConfig):
        new = getattr(cfg, f.name)
        if f.name in RUNTIME_FIELDS:
            if new is not None or f.name != "val_data":
                setattr(merged, f.name, new)
        elif f.name == "random_vgg" and (merged.vgg_weights or merged.init_weights):
            continue  # --random-vgg beside VGG weights: the run recorded it as the no-op it was
        elif new != getattr(merged, f.name) and (
            f.name in given if given is not None else new != getattr(default, f.name)
        ):
            ignored.append(f"{f.name}={new!r} (checkpoint: {getattr(merged, f.name)!r})")
    if ignored:
        raise ValueError(
            f"--resume {cfg.resume!r} continues its run with the settings that run started with, and these "
            f"differ: {', '.join(ignored)}. Leave them out to continue that run, or start a new run from "
            "its weights with --init-weights"
        )
    return merged
