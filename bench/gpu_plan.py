"""The steps of one `bench/gpu_check.sh` call, per part: their order, time caps and expected durations.

    python3 bench/gpu_plan.py PART                                      # name, cap, least: one step a line
    python3 bench/gpu_plan.py PART --command NAME --limit S --out DIR   # that step's argv, NUL-ended
    python3 bench/gpu_plan.py PART --table                              # the time plan, in seconds

Parts (each one device call of at most 600 s; gpu_check.sh keeps to GPU_CHECK_SECONDS, 540):
  all      the best single call: issue 7's core GPU tests and its sweep (main rows with device times,
           some FlexAttention), then issue 5's workloads, official compiled baselines first
  kernels  issue 7 alone: core tests, the whole sweep (FlexAttention at every size), the other
           kernel and op tests, then the host/device profile and tile rows with what is left
  model    issue 5 alone: its workloads with every compiled variant, then the model-level GPU tests,
           the micro-benchmarks and a profile of the training step with what is left
Steps run in this order, each with min(cap, time left); one with fewer than `least` seconds left is
skipped. `expected` is an estimate (H100, cold caches) from session 1's measured run: see bench/README.md,
"Time plan", for how each was made.
"""

import argparse
import sys
from collections.abc import Callable
from typing import NamedTuple

# The GPU tests that matter most for issue 7, first: the kernels and the op against the reference in
# bf16, at the released length T = 197 too (32 tests); the other kernel and op tests after them.
CORE_TESTS = "(matches_reference or released_length) and not fp32"
# Issue 5's workloads and sizes, base, Triton in bf16 against the official computation in fp32 eager
# and in bf16 + torch.compile.
ISSUE5 = [
    "--backbones", "base", "--workloads", "train,stylize,stylize-roll,tta",
    "--batch-sizes", "train=4,stylize=8,stylize-roll=8,tta=8", "--dtypes", "bf16",
    "--backends", "reference,triton", "--compile-backends", "reference,triton", "--compile-dtypes", "bf16",
]  # fmt: skip
BENCH_IN_FLIGHT = 150  # s after the bench's budget for the variant in flight (a compiled training step)
SWEEP_MAIN = 100  # s for the sweep's main rows (144 at 3 heads x 4 batches)
SWEEP_IN_FLIGHT = 30  # s after a sweep phase's budget for the row in flight (a flex compile)


class Step(NamedTuple):
    name: str
    cap: int  # seconds at most
    least: int  # seconds: with less left, the step is skipped
    expected: int  # seconds expected (bench/README.md, "Time plan")
    argv: Callable[[int, str], list[str]]  # (the step's limit in s, output folder) -> command


def pytest(*selection: str) -> Callable[[int, str], list[str]]:
    # -rfE: the failures' names and messages in the summary; --durations: what to cut next time.
    return lambda limit, out: [
        "python3", "-m", "pytest", *selection, "-q", "-rfE", "--durations=25", "-p", "no:cacheprovider",
    ]  # fmt: skip


def sweep(flex_heads: list[str], flex_batches: list[str]) -> Callable[[int, str], list[str]]:
    """Main rows (H = 12 first, device times from B = 32) for SWEEP_MAIN s, then FlexAttention's with
    what the step's limit leaves."""
    return lambda limit, out: [
        "python3", "bench/sweep_shared_attention.py", "--out", out, "--heads", "12", "3", "6",
        "--graph-from-batch", "32", "--budget", str(SWEEP_MAIN), "--flex-heads", *flex_heads,
        "--flex-batches", *flex_batches, "--flex-budget", str(max(0, limit - SWEEP_MAIN - 2 * SWEEP_IN_FLIGHT)),
    ]  # fmt: skip


def tiles(limit: int, out: str) -> list[str]:
    """Tile configs of the fused kernels at B = 32, H = 12, in a sweep of their own (no main or flex rows)."""
    return [
        "python3", "bench/sweep_shared_attention.py", "--out", out, "--heads", "12", "--batches", "32",
        "--budget", "0", "--flex-budget", "0", "--graph-from-batch", "32", "--tune-blocks",
        "--tune-budget", str(limit - SWEEP_IN_FLIGHT),
    ]  # fmt: skip


def bench(*options: str) -> Callable[[int, str], list[str]]:
    return lambda limit, out: [
        "python3", "-m", "fastvit_style.cli", "bench", "--out", out, *options,
        "--budget", str(limit - BENCH_IN_FLIGHT),
    ]  # fmt: skip


def microbench(limit: int, out: str) -> list[str]:
    return [
        "python3", "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", "--benchmark-only",
        "--benchmark-json", f"{out}/microbench.json",
    ]  # fmt: skip


def train_profile(limit: int, out: str) -> list[str]:
    """Where the fast training step of issue 5's size goes (torch.profiler tables, in the step's log)."""
    return [
        "python3", "bench/train_cpu.py", "--device", "cuda", "--backbone", "base", "--bf16", "--batch", "4",
        "--steps", "2", "--profile",
    ]  # fmt: skip


# The card, the versions and backends, whether Triton runs on the hardware, and which attention ops
# xformers can dispatch to here: its own C++ kernels, or only PyTorch's (-pt).
ENV_COMMANDS = """nvidia-smi; python3 -m fastvit_style.info; python3 -c "import os, triton
print('TRITON_INTERPRET =', os.environ.get('TRITON_INTERPRET'), '-> interpreter on:', triton.knobs.runtime.interpret)"
python3 -m xformers.info 2>&1 | head -40 || true"""
ENV = Step("env", 60, 20, 20, lambda limit, out: ["bash", "-c", ENV_COMMANDS])
TESTS_CORE = Step(
    "tests-core", 60, 30, 50, pytest("tests/kernels", "tests/ops", "-m", "gpu", "-k", CORE_TESTS)
)
PROFILE = Step(
    "profile", 40, 20, 20, lambda limit, out: ["python3", "bench/profile_shared_attention.py", "--out", out]
)
PARTS = {
    "all": (
        ENV,
        TESTS_CORE,
        # Main rows, then flex for 30 s: H = 12 at B = 32 and 128 first (issue 7's targets are at B >= 32).
        Step("sweep", 190, 60, 160, sweep(["12", "3", "6"], ["32", "128", "64", "8"])),
        # Eager rows, then the official training step compiled (issue 5's 1.5x baseline, never timed),
        # then the other compiled rows as far as the budget goes.
        Step("bench", 600, BENCH_IN_FLIGHT + 30, 180, bench(*ISSUE5)),
        PROFILE,
    ),
    "kernels": (
        ENV,
        TESTS_CORE,
        Step("sweep", 290, 60, 290, sweep(["12", "3", "6"], ["32", "128", "64", "8"])),
        Step(
            "tests-rest",
            110,
            30,
            200,
            pytest("tests/kernels", "tests/ops", "-m", "gpu", "-k", f"not ({CORE_TESTS})"),
        ),
        PROFILE,
        Step("tiles", 60, 40, 60, tiles),
    ),
    "model": (
        ENV,
        Step("bench", 430, BENCH_IN_FLIGHT + 30, 430, bench(*ISSUE5)),
        # The model-level GPU tests (host syncs, then the model compiles, which the bench's compiled rows
        # also exercise), the micro-benchmarks (VGG19's layouts among them), the training step's operators.
        Step(
            "tests-model",
            60,
            20,
            150,
            pytest("tests", "-m", "gpu", "--ignore=tests/kernels", "--ignore=tests/ops"),
        ),
        Step("microbench", 40, 20, 30, microbench),
        Step("train-profile", 60, 30, 40, train_profile),
    ),
}


TOTAL, PACKING, SETUP = 540, 15, 15  # s: gpu_check.sh's default call, its reserve, package and wheels


def schedule(part: str, total: int = TOTAL) -> list[dict]:
    """The expected course of a call, by gpu_check.sh's rules (limit = min(cap, time left), skipped
    under `least`), each step taking its expected time or its limit: {name, start, limit, expected
    end} per step, limit None where skipped."""
    t, out = SETUP, []
    for s in PARTS[part]:
        limit = min(s.cap, total - PACKING - t)
        if limit < s.least:
            out.append({"name": s.name, "start": t, "limit": None, "end": t})
            continue
        out.append({"name": s.name, "start": t, "limit": limit, "end": t + min(s.expected, limit)})
        t = out[-1]["end"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=sorted(PARTS))
    p.add_argument("--command", metavar="NAME", help="print this step's argv, each argument NUL-ended")
    p.add_argument("--limit", type=int, help="the step's limit in seconds (with --command)")
    p.add_argument("--out", help="output folder (with --command)")
    p.add_argument("--table", action="store_true", help="print the time plan")
    args = p.parse_args(argv)
    steps = PARTS[args.part]
    if args.command:
        (step,) = (s for s in steps if s.name == args.command)
        sys.stdout.write("".join(f"{a}\0" for a in step.argv(args.limit, args.out)))
    elif args.table:
        print(
            f"{args.part}: {'step':14s} {'cap':>5s} {'expected':>8s} {'start':>5s} {'limit':>5s} {'end':>5s}"
        )
        for s, e in zip(steps, schedule(args.part)):
            limit = "skip" if e["limit"] is None else e["limit"]
            print(
                f"{'':{len(args.part) + 2}s}{s.name:14s} {s.cap:5d} {s.expected:8d} {e['start']:5d} {limit:>5} {e['end']:5d}"
            )
    else:
        print("\n".join(f"{s.name}\t{s.cap}\t{s.least}" for s in steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
