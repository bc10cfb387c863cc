"""FLOPs per image of each workload's official computation, and the card's measured bf16 matmul rate.

FLOPs are counted once per configuration with torch.utils.flop_counter on the meta device (shapes
only, no arithmetic, no memory): the official step as the reference runs it (48 block calls, 5 VGG
passes in training, K full forwards for TTA). Every backend is credited with these same FLOPs, so MFU
is "official work done per second" over the card's rate: exact work removal shows up as higher MFU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

MATMUL_N = 8192  # big enough to reach the card's peak, small enough to time in milliseconds


@functools.cache
def _count(workload, backbone: str, model_kwargs_json: str) -> float:
    from fastvit_style import StylizingViT

    batch = 2  # every counted step is linear in its batch; 2 keeps the roll meaningful
    with torch.device("meta"):
        model = StylizingViT(
            backbone, train=workload.train, backend="reference", **json.loads(model_kwargs_json)
        )
    inputs = workload.inputs(model.config, batch, "meta", torch.Generator().manual_seed(0))
    step = workload.step(model, inputs, True, contextlib.nullcontext, lambda f: f)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops() / workload.images(batch)


def flops_per_image(workload, workloads: dict, backbone: str, model_kwargs: dict, batch: int) -> float:
    """Official FLOPs per image of `workload` at `batch` (augment depends on the batch through n)."""
    key = json.dumps(model_kwargs, sort_keys=True)
    return workload.flops_per_image(lambda name: _count(workloads[name], backbone, key), batch)


def bf16_matmul_flops(device: torch.device, repeats: int = 10, warmup_s: float = 1.0) -> float | None:
    """Measured FLOP/s of a large bf16 matmul on random data (zeros run faster and would flatter it),
    after `warmup_s` seconds of the same matmuls: an idle GPU's clocks take a while to ramp up (an H200
    here read 345 MHz idle, 1980 under load), and a few calls would time part of the ramp."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(MATMUL_N, MATMUL_N, device=device, dtype=torch.bfloat16) for _ in range(2))
    start = time.monotonic()
    while True:  # in groups, synchronized: unsynchronized launches would queue far past warmup_s
        for _ in range(repeats):
            a @ b
        torch.cuda.synchronize()
        if time.monotonic() - start >= warmup_s:
            break
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    end.synchronize()
    return 2 * MATMUL_N**3 * repeats / (start.elapsed_time(end) / 1e3)
