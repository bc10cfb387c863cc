"""CPU speed of the fast path (backend="torch") against the official computation, tiny at 224 px (issue 5).

    python bench/cpu_speed.py --repeats 5 --threads 1    # about 10 min on 2 busy cores
    python bench/cpu_speed.py --out bench/results        # torch's thread count, 3 repeats
    python bench/cpu_speed.py --official                 # also the official package (stylizing-vit 1.0.0)

Both run in this process on the same weights and inputs; the outputs are checked against each
other first. Calls alternate (reference, fast, reference, fast, ...) and the ratio is of medians, so
that load from other processes falls on both alike. Targets: eval with explicit styles at B=8
>= 1.15x, eval with the roll (x_style None) at B=8 >= 1.5x, training step (forward, losses,
backward, AdamW) at B=4 >= 1.9x. The ratios are taken against backend="reference", the official
computation transcribed; --official adds rows of the official package itself, to show that the
transcription runs at its speed.
"""

import argparse
import sys

import torch

from fastvit_style.apps.common import positive_int
from fastvit_style.benchmark import BenchConfig, official, register_backend, report, run_benchmark

# (workload, batch, target speedup, what it is)
TARGETS = (
    ("stylize", 8, 1.15, "eval, explicit styles"),
    ("stylize-roll", 8, 1.5, "eval, roll (x_style None)"),
    ("train", 4, 1.9, "training step"),
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=positive_int, default=3, help="timed calls of each path, interleaved")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", help="also write the JSON file into this folder")
    p.add_argument(
        "--official",
        action="store_true",
        help="also time the official package (stylizing-vit 1.0.0, installed)",
    )
    args = p.parse_args(argv)
    backends = ("reference", "torch")
    if args.official:
        if reason := official.unavailable_reason():
            p.error(f"--official: {reason}")
        register_backend("official", official.factory, official=True)
        backends = ("reference", "official", "torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = BenchConfig(
        device="cpu",
        backbones=("tiny",),
        workloads=tuple(w for w, *_ in TARGETS),
        batch_sizes={w: [b] for w, b, *_ in TARGETS},
        backends=backends,
        repeats=args.repeats,
        warmup=0,  # the first call of each (the parity check) is the warm-up
        interleave=True,
    )
    print(f"tiny, 224 px, {torch.get_num_threads()} threads, {args.repeats} interleaved repeats", flush=True)

    def done(row, _run):
        if row is not None:  # None: the run's start, or a variant starting
            print("  done:", " ".join(report.table_row(row)[:8]), flush=True)

    run = run_benchmark(cfg, on_result=done)
    print("\n" + report.table(run["results"]) + "\n")
    ok = True
    print("speedup of the fast path: ratio of medians (of minimums, the least disturbed by other load)")
    for workload, batch, target, what in TARGETS:
        ref, fast = (next(r for r in run["results"] if r["workload"] == workload and r["backend"] == b)
                     for b in ("reference", "torch"))  # fmt: skip
        ratio = fast["speedup_vs_reference"]
        passed = ratio is not None and ratio >= target
        ok &= passed
        shown = (
            f"{ratio:.2f}x ({ref['min_ms'] / fast['min_ms']:.2f}x)" if ratio is not None else fast["status"]
        )
        print(f"{what:<28} B={batch}: {shown:>14}  target >= {target}x: {'PASS' if passed else 'MISS'}")
    if args.official:
        print("\nthe reference's time over the official package's (above 1, the speedups overstate by that)")
        for workload, batch, _, what in TARGETS:
            row = next(r for r in run["results"] if r["workload"] == workload and r["backend"] == "official")
            ratio = row["speedup_vs_reference"]
            print(f"{what:<28} B={batch}: " + (f"{ratio:.2f}" if ratio else row["status"]))
    if args.out:
        path = report.output_stem(args.out, run["device"], "cpu_speed") + ".json"
        report.write_json(path, run, report.environment())
        print(f"JSON: {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
