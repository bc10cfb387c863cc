"""`fastvit-style bench`: flags, device-dependent defaults, progress and output files."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from ..backends import unavailable_reason
from ..cli import importable_cwd
from ..configs import check_backbone, check_model_kwargs, parse_model_kwargs
from ..devices import resolve_device
from . import report
from .plan import DTYPES, FAST_BACKENDS, WORKLOADS, BenchConfig, get_backend, plan_size
from .runner import run_benchmark

# Batch sizes per workload when --batch-sizes is not given. For augment the batch is the classifier's
# (64 in the paper: 21 images stylized at p=0.33); for tta it is test images, each with K references.
DEFAULT_BATCHES = {
    "cuda": {"stylize": [8, 32, 64], "stylize-roll": [32], "augment": [64], "tta": [8], "train": [8, 32]},
    # On a CPU a few minutes in all: tiny at small batches.
    "cpu": {"stylize": [2], "stylize-roll": [2], "augment": [8], "tta": [1], "train": [1]},
}
QUICK_BATCHES = {"stylize": [2], "stylize-roll": [2], "augment": [8], "tta": [1], "train": [2]}


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _listed(flag: str, value: str | None, default: str) -> list[str]:
    """The names of the comma list option `flag`, `default`'s when it is left out (None); ValueError when
    it names none: an empty value (an unset shell variable) asks for nothing, not for the default."""
    if value is None:
        return _csv(default)
    if not (names := _csv(value)):
        raise ValueError(f"{flag} names none, got {value!r}")
    return names


def parse_batch_sizes(text: str, workloads: list[str]) -> dict[str, list[int]]:
    """--batch-sizes: a comma list of N (for every workload without sizes of its own) and W=N (for
    workload W; repeat W=N for several). Returns the sizes of the workloads it gives any to, in order.
    ValueError for a size below 1 or a workload outside `workloads`."""
    shared, own = [], {}
    for item in _csv(text):
        name, _, size = item.rpartition("=")
        if not (size.isdigit() and int(size) >= 1):
            raise ValueError(f"--batch-sizes must all be at least 1, got {text!r}")
        if name and name not in workloads:
            raise ValueError(
                f"--batch-sizes names {name!r}, which is not in --workloads ({', '.join(workloads)})"
            )
        (own.setdefault(name, []) if name else shared).append(int(size))
    if not shared and not own:
        raise ValueError(f"--batch-sizes must all be at least 1, got {text!r}")
    return {w: own.get(w, shared) for w in workloads if own.get(w, shared)}


def add_arguments(p) -> None:
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--backbones", help="comma list (default: base on CUDA, tiny on CPU)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument(
        "--batch-sizes",
        help="comma list of sizes for every workload (8,32) and/or per workload (train=4,stylize=8,stylize=64); "
        "workloads given none take the table per device",
    )
    p.add_argument("--dtypes", help="fp32,bf16 (default: both on CUDA, fp32 on CPU); bf16 = autocast")
    p.add_argument(
        "--backends",
        help="comma list: reference, torch, triton, xformers, or module:factory (default: reference and "
        "every fast backend that can run here; on CPU, triton only when named, and with TRITON_INTERPRET=1 "
        "set: its interpreter times numpy, not the kernels)",
    )
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="also time torch.compile variants, at the largest batch of each workload (default: on CUDA "
        "yes unless --quick, on CPU no: compiling is slow there)",
    )  # fmt: skip
    p.add_argument(
        "--compile-every-size",
        action="store_true",
        help="compiled variants at every batch size, not the largest only",
    )
    p.add_argument(
        "--compile-backends", help="comma list of the backends to compile (default: all timed ones)"
    )
    p.add_argument("--compile-dtypes", help="dtypes to compile in (default: bf16 when timed, else all)")
    p.add_argument("--repeats", type=int, help="timed calls per variant (default: 10 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed calls after the first (default: 2 on CUDA, 0 on CPU)")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="time the variants of a case round-robin (default: on CPU, where other load is noise)")  # fmt: skip
    p.add_argument(
        "--quick", action="store_true", help="one small size per workload, few repeats, no compile"
    )
    p.add_argument(
        "--budget", type=float, help="seconds; variants that would start later are recorded as skipped"
    )
    p.add_argument(
        "--model-kwargs", default="{}", help="JSON kwargs for StylizingViT, e.g. '{\"input_size\": 32}'"
    )
    p.add_argument("--tta-k", type=int, default=8, help="style references per test image (tta)")
    p.add_argument("--augment-p", type=float, default=0.33, help="fraction of the classifier batch stylized")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default="bench/results",
        help="folder for the JSON file and the PNG plot (default: bench/results under the current folder)",
    )


def _check_values(args) -> None:
    """ValueError for option values no variant could run with (each would otherwise fail or mislead)."""
    problems = [
        f"{flag} must be {what}, got {value}"
        for flag, value, ok, what in (
            ("--repeats", args.repeats, lambda n: n >= 1, "at least 1"),
            ("--warmup", args.warmup, lambda n: n >= 0, "at least 0"),
            ("--threads", args.threads, lambda n: n >= 1, "at least 1"),
            ("--budget", args.budget, lambda s: s >= 0, "at least 0 seconds"),
            ("--tta-k", args.tta_k, lambda n: n >= 1, "at least 1"),
            ("--augment-p", args.augment_p, lambda p: 0 < p <= 1, "in (0, 1]"),
        )
        if value is not None and not ok(value)
    ]
    if problems:
        raise ValueError("; ".join(problems))


def config_from_args(args) -> BenchConfig:
    _check_values(args)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    workloads = _csv(args.workloads)
    unknown = set(workloads) - set(WORKLOADS)
    if unknown or not workloads:
        raise ValueError(
            f"--workloads: unknown or none {sorted(unknown)}: choose from {', '.join(WORKLOADS)}"
        )
    dtypes = _listed("--dtypes", args.dtypes, "fp32,bf16" if cuda else "fp32")
    if not set(dtypes) <= set(DTYPES):
        raise ValueError(f"--dtypes must be a comma list of {', '.join(DTYPES)}, got {args.dtypes!r}")
    backbones = _listed("--backbones", args.backbones, "base" if cuda else "tiny")
    model_kwargs = parse_model_kwargs("--model-kwargs", args.model_kwargs)
    for backbone in backbones:
        check_backbone(backbone, model_kwargs)  # make_config would take 'Tiny' or a typo for a custom ViT
        check_model_kwargs("--model-kwargs", backbone, model_kwargs)
    table = QUICK_BATCHES if args.quick else DEFAULT_BATCHES[device.type]
    batches = {w: table[w] for w in workloads}
    if args.batch_sizes is not None:
        _listed("--batch-sizes", args.batch_sizes, "")
        batches.update(parse_batch_sizes(args.batch_sizes, workloads))
    if args.backends is not None:
        backends = _listed("--backends", args.backends, "")
        importable_cwd()  # a module:factory in the current folder
        for name in backends:
            get_backend(name)  # ValueError for an unknown name, before any file is made
    else:  # the interpreter would time numpy, not the kernels: Triton on CPU only when asked for
        fast = [b for b in FAST_BACKENDS if unavailable_reason(b, device) is None and (cuda or b != "triton")]
        backends = ["reference", *fast]
    compile_ = (cuda and not args.quick) if args.compile is None else args.compile
    compile_only = [
        flag
        for flag, value in (
            ("--compile-backends", args.compile_backends),
            ("--compile-dtypes", args.compile_dtypes),
            ("--compile-every-size", args.compile_every_size),
        )
        if value not in (None, False)
    ]
    if compile_only and not compile_:  # they would be dropped, silently
        raise ValueError(
            f"{', '.join(compile_only)} {'acts' if len(compile_only) == 1 else 'act'} only on compiled variants, "
            "which are off "
            f"({'--no-compile' if args.compile is False else 'the default on CPU and with --quick'}): add --compile"
        )
    compile_backends = (
        _listed("--compile-backends", args.compile_backends, ",".join(backends)) if compile_ else []
    )
    compile_dtypes = _listed(
        "--compile-dtypes", args.compile_dtypes, "bf16" if "bf16" in dtypes else ",".join(dtypes)
    )
    # Names outside the timed sets would compile nothing, silently.
    for flag, names, timed in (
        ("--compile-backends", compile_backends, backends),
        ("--compile-dtypes", compile_dtypes if compile_ else [], dtypes),
    ):
        if not set(names) <= set(timed):
            raise ValueError(
                f"{flag} {sorted(set(names) - set(timed))} are not timed: choose from {', '.join(timed)}"
            )
    default_repeats, default_warmup = (
        ((5, 1) if args.quick else (10, 2)) if cuda else ((2, 0) if args.quick else (3, 0))
    )
    return BenchConfig(
        device=str(device),
        backbones=tuple(backbones),
        workloads=tuple(workloads),
        batch_sizes=batches,
        dtypes=tuple(dtypes),
        backends=tuple(backends),
        compile_backends=tuple(compile_backends),
        compile_dtypes=tuple(compile_dtypes),
        compile_every_size=args.compile_every_size,
        repeats=default_repeats if args.repeats is None else args.repeats,
        warmup=default_warmup if args.warmup is None else args.warmup,
        interleave=not cuda if args.interleave is None else args.interleave,
        budget_s=args.budget,
        model_kwargs=model_kwargs,
        tta_k=args.tta_k,
        augment_p=args.augment_p,
        seed=args.seed,
    )


def _progress(total: int):
    """(advance(row), close()): a tqdm bar when installed, else one printed line per row."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    bar = tqdm(total=total, unit="variant", file=sys.stderr) if tqdm else None

    def advance(row):
        line = "  ".join(report.table_row(row)[:9])
        if bar:
            bar.write(line)
            bar.update(1)
        else:
            print(line, flush=True)

    return advance, (bar.close if bar else (lambda: None))


def run(args) -> int:
    cfg = config_from_args(args)
    if args.threads:  # on a shared machine, fewer threads than cores avoid oversubscription stalls
        torch.set_num_threads(args.threads)
    env = report.environment()
    stem = report.output_stem(args.out, report.describe_device(torch.device(cfg.device)))
    json_path, png_path = stem + ".json", stem + ".png"
    print(f"fastvit-style bench on {cfg.device}: {plan_size(cfg)} variants "
          f"({', '.join(cfg.backbones)} x {', '.join(cfg.workloads)} x {', '.join(cfg.backends)} x "
          f"{', '.join(cfg.dtypes)}{' + compiled ' + ', '.join(cfg.compile_backends) if cfg.compile_backends else ''})", flush=True)  # fmt: skip
    advance, close = _progress(plan_size(cfg))

    def on_result(row, partial):
        if row is not None:
            advance(row)
        # Rewritten per row and variant: a killed run keeps its rows and names the variant it was in.
        report.write_json(json_path, partial, env)

    result = run_benchmark(cfg, on_result)
    close()
    note = report.plot(png_path, result["results"])
    result["plot"] = note or os.path.basename(png_path)
    report.write_json(json_path, result, env)
    print("\n" + report.table(result["results"]))
    print(f"\nJSON: {json_path}\nplot: {note or png_path}")
    return 0
