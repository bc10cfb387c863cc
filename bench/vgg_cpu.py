"""Per-layer CPU timings behind the fast losses' VGG19 rules (`layers/vgg19.use_channels_last`,
`layers/winograd.use_winograd`), which depend on the machine: rerun this on a new kind of CPU.

    python bench/vgg_cpu.py [--batch 4] [--size 224] [--repeats 5] [--threads N]

For each distinct 3x3 convolution of VGG19 at `--size` px input, the median milliseconds of one
forward and input gradient (frozen weights, float32) three ways: oneDNN on NCHW maps, oneDNN on
channels-last maps, Winograd F(2x2, 3x3) (`winograd.conv3x3` forced on), and which of them the
current rules pick.
"""

import argparse
import statistics
import time

import torch

from fastvit_style.apps.common import positive_int
from fastvit_style.layers import winograd
from fastvit_style.layers.vgg19 import _STAGE_ENDS, VGG19_CONVS


def layer_shapes(size: int) -> list[tuple[int, int, int]]:
    """(in channels, out channels, side) of each distinct conv of VGG19 at a size x size input."""
    shapes, cin, side = [], 3, size
    for idx, cout in VGG19_CONVS:
        if (cin, cout, side) not in shapes:
            shapes.append((cin, cout, side))
        cin = cout
        if idx in _STAGE_ENDS:
            side //= 2
    return shapes


def input_side(text: str) -> int:
    """--size: a multiple of 32, so that every stage's side is even after VGG19's four poolings
    (Winograd's 2x2 output tiles need even sides; it is timed at every layer)."""
    value = positive_int(text)
    if value % 32:
        raise argparse.ArgumentTypeError(
            f"must be a multiple of 32 (each stage's side even for Winograd's 2x2 tiles), got {value}"
        )
    return value


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def layer_ms(conv: torch.nn.Conv2d, x: torch.Tensor, g: torch.Tensor, repeats: int) -> list[float]:
    """Forward + input gradient of conv at input x, output gradient g: [NCHW, NHWC, Winograd] ms."""

    def winograd_conv(t):  # whatever use_winograd would say
        return winograd._WinogradConv.apply(t, *winograd._transforms(conv), conv.bias)

    def step(f, x, g):
        xr = x.detach().requires_grad_()
        torch.autograd.grad(f(xr), xr, g)

    x_cl, g_cl = (t.contiguous(memory_format=torch.channels_last) for t in (x, g))
    return [
        median_ms(lambda: step(conv, x, g), repeats),
        median_ms(lambda: step(conv, x_cl, g_cl), repeats),
        median_ms(lambda: step(winograd_conv, x_cl, g), repeats),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--batch", type=positive_int, default=4, help="images per call (a training step's VGG batch)"
    )
    p.add_argument("--size", type=input_side, default=224, help="input side in px, a multiple of 32")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"{'in':>4} {'out':>4} {'side':>4}  {'NCHW':>8} {'NHWC':>8} {'Winograd':>8}  rules pick")
    torch.manual_seed(0)
    for cin, cout, side in layer_shapes(args.size):
        conv = torch.nn.Conv2d(cin, cout, 3, padding=1).requires_grad_(False)
        x = torch.randn(args.batch, cin, side, side)
        ms = layer_ms(conv, x, torch.randn(args.batch, cout, side, side), args.repeats)
        picked = "Winograd" if winograd.use_winograd(x, conv) else "NHWC"
        print(f"{cin:>4} {cout:>4} {side:>4}  {ms[0]:8.1f} {ms[1]:8.1f} {ms[2]:8.1f}  {picked}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
