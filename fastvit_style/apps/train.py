"""`fastvit-style train`: the command line of fastvit_style.train (whose docstring gives the recipe)."""

import argparse
import dataclasses
import os
import sys
import time

from .. import train as training
from ..configs import check_backbone, parse_model_kwargs
from ..devices import dist_env
from ..train_config import TrainConfig
from .common import BACKBONE_HELP


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig(data="", out="")
    p.add_argument("--data", required=True, help="folder of training images (recursive)")
    p.add_argument(
        "--val-data", default=None, help="folder of validation images: per-epoch loss/PSNR, best.safetensors"
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder: config.json, last.pt and last.safetensors (at each checkpoint), "
        "metrics.jsonl (a line per finished epoch), best.safetensors (with --val-data)",
    )
    p.add_argument(
        "--backbone",
        default=d.backbone,
        help=BACKBONE_HELP + " (default: %(default)s)",
    )
    p.add_argument("--model-kwargs", type=_json_object, default={}, metavar="JSON",
                   help='official StylizingViT keyword overrides, e.g. \'{"encoder_depth": 6}\'')  # fmt: skip

    def number(flag: str, kind: type, what: str = "") -> None:
        default = getattr(d, flag[2:].replace("-", "_"))
        p.add_argument(flag, type=kind, default=default, help=f"{what} (default: %(default)s)".lstrip())

    number("--epochs", int)
    number("--batch-size", int, "micro-batch per process, one roll group")
    number("--accumulate", int, "micro-batches per optimizer step")
    number("--lr", float, "AdamW learning rate, cosine decay")
    number("--weight-decay", float)
    norm = p.add_mutually_exclusive_group()
    norm.add_argument(
        "--dataset", default=None, help="normalization constants of this dataset (default: camelyon17wilds)"
    )
    norm.add_argument("--mean", type=float, nargs=3, metavar="M", help="per-channel mean (with --std)")
    p.add_argument("--std", type=float, nargs=3, metavar="S", help="per-channel std (with --mean)")
    number("--input-size", int, "image side in pixels")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (the official run is fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--backend",
        default=d.backend,
        help="attention backend: auto, torch, triton, xformers, reference (default: %(default)s)",
    )
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    p.add_argument(
        "--vgg-weights", default=None, help="ImageNet VGG19 file (timm vgg19.tv_in1k or torchvision)"
    )
    p.add_argument("--init-weights", default=None, help="start from these Stylizing ViT weights")
    p.add_argument(
        "--random-vgg",
        action="store_true",
        help="allow a randomly initialized VGG19 when no VGG weights are given (smoke runs only)",
    )
    p.add_argument("--resume", default=None, metavar="PATH", help="continue from a last.pt checkpoint")
    number("--seed", int)
    p.add_argument(
        "--workers",
        type=int,
        default=min(d.workers, _usable_cpus()),  # more than the cores: torch warns, nothing gained
        help="DataLoader worker processes (default: %(default)s, at most the usable cores)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop at this total number of optimizer steps (checkpoint written)",
    )
    number("--checkpoint-every", int, "steps between mid-epoch checkpoints")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out: its checkpoints, weights and metrics are deleted when this "
        "run saves its first file (one that stops before leaves them)",
    )


def _json_object(text: str) -> dict:
    try:
        return parse_model_kwargs("the value", text)
    except ValueError as e:  # argparse names the option and shows this message as it is
        raise argparse.ArgumentTypeError(str(e)) from None


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def run(args: argparse.Namespace) -> int:
    check_backbone(args.backbone, args.model_kwargs)  # here, not in TrainConfig: old runs' names resume
    cfg = config_from_args(args)
    started, found = time.time(), _identity(os.path.join(cfg.out, "last.pt"))
    try:
        training.train(cfg, given=args._given)
    except KeyboardInterrupt:
        if (resume := _resume_after_interrupt(cfg, started, found)) and dist_env()[0] == 0:
            print(f"--resume {resume!r} continues from its last checkpoint", file=sys.stderr)
        raise
    return 0


def _identity(path: str) -> tuple | None:
    """What tells a file at `path` from one written in its place since (an atomic write is a new file);
    None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _resume_after_interrupt(cfg: TrainConfig, started: float, found: tuple | None) -> str | None:
    """The checkpoint that continues a run interrupted now: the one it wrote (atomically: whole), else
    the one it resumed from; None when there is none. An --out's last.pt that is still the file `found`
    (`_identity`) at the start is not this run's: a run that --overwrite made replaces the old run's files
    only at its first save, and the old last.pt may be seconds old."""
    last = os.path.join(cfg.out, "last.pt")
    if (
        os.path.isfile(last)
        and os.path.getmtime(last) >= started - 2  # FAT keeps 2-second times
        and _identity(last) != found
    ):
        return last
    return cfg.resume
