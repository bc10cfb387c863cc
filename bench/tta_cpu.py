"""Test-time augmentation throughput: test images per second at K references each.

    python bench/tta_cpu.py                                            # tiny, 224 px, B=2, K=8, CPU
    python bench/tta_cpu.py --device cuda --backbone base --dtype bf16 --batch 32 --out tta.json

Methods, same process and weights (random), each stylizing B test images by K references:
  bank       tta.stylize with a prebuilt StyleBank: content stream once per image, 2 block calls per pair
             and layer (bf16: under autocast, against the fp32 reference)
  fast-fwd   model(x repeated K times, refs) on the fast schedule (no bank: style stream per pair)
  reference  the same call with backend="reference": the official computation, 4 block calls per layer
  reference-K  the naive TTA loop: K official forwards, each of the B images against one reference
The bank build is timed apart (it is paid once per reference set, not per test image). Times are the
median of --repeats rounds after one warm-up (each round's kept in the JSON), the methods taking turns in each round. CPU numbers are
noisy on shared machines.
"""

import argparse
import platform
import statistics
import time

import torch

from fastvit_style import StyleBank, StylizingViT
from fastvit_style.apps.common import positive_int
from fastvit_style.benchmark.report import check_output_file, git_commit, utc_now
from fastvit_style.benchmark.timing import synchronize
from fastvit_style.tta import stylize


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="tiny")
    p.add_argument(
        "--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast for bank and fast-fwd"
    )
    p.add_argument("--batch", type=positive_int, default=2, help="test images B")
    p.add_argument("--k", type=positive_int, default=8, help="references per test image")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    if args.out:
        check_output_file(args.out, ("results", "bank_build_seconds"))
    return args


def timed(fns: dict, device: torch.device, repeats: int) -> tuple[dict, dict]:
    """Seconds of each fn() in each of `repeats` rounds after one warm-up, and its last output. The
    methods take turns within each round, so a load change on a shared machine hits them alike."""
    outs = {name: fn() for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            outs[name] = fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return times, outs


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = StylizingViT(args.backbone).to(device).eval().requires_grad_(False)
    B, K = args.batch, args.k
    x = torch.randn(B, 3, 224, 224, device=device)
    refs = torch.randn(K, 3, 224, 224, device=device)
    x_rep, refs_rep = x.repeat_interleave(K, dim=0), refs.repeat(B, 1, 1, 1)  # pair b*K + j = (x_b, ref_j)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def forward(backend):
        model.backend = backend
        with torch.no_grad():
            return model(x_rep, refs_rep)

    def bank_path():
        model.backend = "auto"  # the other paths switch it: this one times the fast op too
        with torch.no_grad(), amp:
            return stylize(model, x, bank).flatten(0, 1)

    def fast_fwd():
        with amp:
            return forward("auto")

    with torch.no_grad(), amp:
        synchronize(device)
        t0 = time.perf_counter()
        bank = StyleBank.from_images(model, refs)
        synchronize(device)
        bank_build = time.perf_counter() - t0

    def k_forwards():  # the naive TTA loop: one official forward per reference, over the B images
        model.backend = "reference"
        with torch.no_grad():
            views = [model(x, refs[j : j + 1].expand_as(x)) for j in range(K)]
        return torch.stack(views, dim=1).flatten(0, 1)

    fns = {
        "bank": bank_path,
        "fast-fwd": fast_fwd,
        "reference": lambda: forward("reference"),
        "reference-K": k_forwards,
    }
    samples, outs = timed(fns, device, args.repeats)
    seconds = {name: statistics.median(t) for name, t in samples.items()}
    expected = outs["reference"]
    results = {}
    for name, t in seconds.items():
        results[name] = {
            "seconds": t,
            "all_seconds": samples[name],
            "images_per_s": B / t,
            "speedup_vs_reference": seconds["reference"] / t,
            "speedup_vs_k_forwards": seconds["reference-K"] / t,
        }
        if name != "reference":
            results[name]["rel_err"] = (
                (outs[name].float() - expected).abs().max() / expected.abs().max()
            ).item()
    report = {
        "backbone": args.backbone,
        "device": str(device),
        "dtype": args.dtype,
        "batch": B,
        "k": K,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "bank_build_seconds": bank_build,
        "bank_mib": bank.nbytes / 2**20,
        "results": results,
        "date": utc_now(),
        "git": git_commit(),
    }
    print(
        f"{args.backbone}, {device}, {args.dtype}, B={B}, K={K}, {report['threads']} threads; "
        f"bank of {K} refs built in {bank_build:.2f} s ({report['bank_mib']:.1f} MiB)"
    )
    for name, r in results.items():
        print(
            f"  {name:>10}: {r['images_per_s']:8.3f} test images/s ({r['seconds']:.3f} s per batch), "
            f"{r['speedup_vs_reference']:.2f}x the reference, {r['speedup_vs_k_forwards']:.2f}x K forwards"
            + (f", rel err {r['rel_err']:.1e}" if "rel_err" in r else "")
        )
    if args.out:
        from fastvit_style.atomic import write_json

        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
