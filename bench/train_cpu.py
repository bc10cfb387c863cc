"""Training throughput: images per second of full training steps, fast path against the official computation.

    python bench/train_cpu.py                                                  # tiny, 224 px, B=4, CPU
    python bench/train_cpu.py --input-size 64 --steps 3                        # quicker CPU check
    python bench/train_cpu.py --device cuda --backbone base --bf16 --batch 32 --out train.json
    python bench/train_cpu.py --device cuda --backbone base --bf16 --batch 32 --profile   # where it goes

One step = what the trainer runs per micro-batch and optimizer step (fastvit_style.train): forward
with x_style = roll(x) and the 70/1/7/10 loss (under bf16 autocast with --bf16), backward, clip at
1.0, AdamW. Both paths share the same process, weights and batch (random normalized images): "fast"
is the default backend (the exact shortcuts of shared doc 3.6: VGG on 3 instead of 5 batches, no
style stream), "reference" the official computation. The paths alternate step by step; times are
the median of --steps steps after --warmup. CPU numbers are noisy on shared machines. --profile
then runs two more fast steps under torch.profiler and prints its operators by self time on the
device (by host time on CPU), and the largest kernels: what a faster training step would have to cut.
"""

import argparse
import platform
import statistics
import time

import torch

from fastvit_style import StylizingViT
from fastvit_style.apps.common import non_negative_int, positive_int
from fastvit_style.benchmark.report import check_output_file, git_commit, utc_now
from fastvit_style.benchmark.timing import synchronize


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--batch", type=positive_int, default=4, help="micro-batch B (one roll group)")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 autocast, for both paths (the reference runs under it too)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--steps", type=positive_int, default=3, help="timed steps per path")
    p.add_argument("--warmup", type=non_negative_int, default=1)
    p.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--profile", action="store_true", help="then profile two fast steps (torch.profiler)")
    args = p.parse_args(argv)
    if args.out:
        check_output_file(args.out, ("results", "fast_over_reference"))
    return args


class Stepper:
    """One model with its AdamW; step(x) runs one training step and returns its seconds."""

    def __init__(self, model, args, device):
        self.net = torch.compile(model) if args.compile else model
        self.params = [p for n, p in model.named_parameters() if not n.startswith("vgg_encoder.")]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-3, weight_decay=0.01)
        self.bf16, self.device = args.bf16, device

    def step(self, x) -> float:
        synchronize(self.device)
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss, _ = self.net(x)
            total = loss.total()
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        synchronize(self.device)
        return time.perf_counter() - t0


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x = torch.randn(args.batch, 3, args.input_size, args.input_size, device=device)
    steppers = {}
    for name, backend in (("fast", "auto"), ("reference", "reference")):
        torch.manual_seed(0)  # same initial weights for both paths
        model = StylizingViT(args.backbone, train=True, backend=backend, input_size=args.input_size).to(
            device
        )
        model.vgg_encoder.warn_if_random = False  # timed, not trained: its VGG19's values do not matter
        steppers[name] = Stepper(model, args, device)
    times = {name: [] for name in steppers}
    for i in range(args.warmup + args.steps):
        for name, stepper in steppers.items():  # alternating, so that load changes hit both paths alike
            t = stepper.step(x)
            if i >= args.warmup:
                times[name].append(t)
    results = {}
    for name, ts in times.items():
        t = statistics.median(ts)
        results[name] = {"step_seconds": t, "images_per_s": args.batch / t, "all_step_seconds": ts}
    speedup = results["reference"]["step_seconds"] / results["fast"]["step_seconds"]
    report = {
        "backbone": args.backbone, "device": str(device), "input_size": args.input_size, "batch": args.batch,
        "bf16": args.bf16, "compile": args.compile, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "results": results, "fast_over_reference": speedup,
        "date": utc_now(), "git": git_commit(),
    }  # fmt: skip
    print(f"{args.backbone}, {args.input_size} px, B={args.batch}, {device}, bf16={args.bf16}, "
          f"compile={args.compile}, {report['threads']} threads")  # fmt: skip
    for name, r in results.items():
        print(f"  {name:>9}: {r['images_per_s']:8.3f} images/s ({r['step_seconds']:.3f} s per step)")
    print(f"  fast path: {speedup:.2f}x the reference")
    if args.out:
        from fastvit_style.atomic import write_json

        write_json(args.out, report)
    if args.profile:
        profile_steps(steppers["fast"], x, device)
    return report


def profile_steps(stepper: Stepper, x: torch.Tensor, device: torch.device, steps: int = 2) -> None:
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            stepper.step(x)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"\n{steps} fast steps, operators by {sort}:")
    print(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60))
    if cuda:
        print(f"\n{steps} fast steps, operators by host time (the launch side):")
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
        )


if __name__ == "__main__":
    main()
