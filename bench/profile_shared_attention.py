"""Where the time of one small shared-attention forward+backward goes: host or device.

    python bench/profile_shared_attention.py [--batch 8] [--heads 3] [--out DIR]     # CUDA
    python bench/profile_shared_attention.py --host [--out DIR]                      # any machine

The H100 sweep of 2026-11-23 found fused forward+backward near 0.8-1.0 ms at every small size (B=8,
H=3 included), where cuDNN with duplicated K/V took 0.14-0.3 ms: a fixed cost. This times, at one
small size (bf16, d=64, T=197, 3B query sequences over 2B K/V sequences, the model's map), in
microseconds per call:
  api        shared_attention(backend="triton") forward+backward, as an eager model calls it
  custom-op  the torch.library custom op forward+backward through its autograd (what a compiled
             graph calls, there without the autograd wrapper; what the eager path avoids)
  launchers  the forward and backward launchers called directly, no autograd (inverse map included)
  inverse    the inverse of kv_index alone (computed once per map on the api path)
On CUDA (synchronised once per 200 calls) each row is host and device together, whichever is
longer, and the torch.profiler table of the api path follows, by host and by device time: if a row
is far above the table's device total, the fixed cost is on the host. --host runs on CPU tensors
with the Triton interpreter loaded but every kernel launch replaced by a no-op: the host time of
everything except Triton's own launch (argument binding, cache lookup, driver call), which only a
GPU run includes.
"""

import argparse
import os
import sys
import time

import torch

from fastvit_style.apps.common import positive_int

CALLS = 200


def per_call_us(fn, sync) -> float:
    for _ in range(10):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(CALLS):
        fn()
    sync()
    return (time.perf_counter() - t0) / CALLS * 1e6


def stub_kernel_launches() -> None:
    """Every Triton launch returns at once (interpreter mode only: the kernels are InterpretedFunctions)."""
    from triton.runtime.interpreter import InterpretedFunction

    InterpretedFunction.run = lambda self, *args, grid, warmup, **kwargs: None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--heads", type=positive_int, default=3)
    p.add_argument("--host", action="store_true", help="CPU, launches stubbed: host time only")
    p.add_argument("--out", help="also write the numbers as JSON into this folder")
    args = p.parse_args(argv)
    if args.host:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--host needs TRITON_INTERPRET=1 before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
        stub_kernel_launches()
        dev = torch.device("cpu")
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        dev = torch.device("cuda")
    else:
        print("no CUDA device: nothing to profile (--host measures the host side on CPU)")
        return 1

    from fastvit_style.kernels import shared_attention_bwd, shared_attention_fwd

    from fastvit_style.benchmark.report import describe_device, environment, output_stem, write_json
    from fastvit_style.ops import shared_attention
    from fastvit_style.ops._index_maps import inverse_kv_map
    from fastvit_style.ops.shared_attention import shared_attention_fwd_op

    B, H, T, d = args.batch, args.heads, 197, 64
    dt = torch.bfloat16
    q = torch.randn(3 * B, T, H, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(2 * B, T, H, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(2 * B, T, H, d, device=dev, dtype=dt, requires_grad=True)
    own = torch.arange(B, device=dev, dtype=torch.int32)
    kv_index = torch.cat([own, own + B, own + B])  # [x; s; a] -> [x, s, s]
    do = torch.randn_like(q)
    scale = d**-0.5

    def api():
        out = shared_attention(q, k, v, kv_index, backend="triton", check_index=False)
        torch.autograd.grad(out, (q, k, v), do)

    def custom_op():
        out = shared_attention_fwd_op(q, k, v, kv_index, scale)[0]
        torch.autograd.grad(out, (q, k, v), do)

    def launchers():
        with torch.no_grad():
            out, lse = shared_attention_fwd(q, k, v, kv_index, scale)
            offsets, queries = inverse_kv_map(kv_index, k.shape[0])
            shared_attention_bwd(do, q, k, v, out, lse, kv_index, offsets, queries, scale)

    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    rows = {
        name: per_call_us(fn, sync)
        for name, fn in (
            ("api", api),
            ("custom-op", custom_op),
            ("launchers", launchers),
            ("inverse", lambda: inverse_kv_map(kv_index, 2 * B)),
        )
    }
    what = "host only, launches stubbed" if args.host else "host and device"
    print(
        f"{describe_device(dev)['name']} | torch {torch.__version__} | B={B} H={H} T={T} d={d} bf16 | {what}"
    )
    for name, us in rows.items():
        print(f"  {name:10s} {us:8.1f} us per call")
    if args.out:
        path = (
            output_stem(args.out, describe_device(dev), "host_profile" if args.host else "profile") + ".json"
        )
        run = {"mode": what, "shape": {"B": B, "H": H, "T": T, "d": d}, "us_per_call": rows}
        write_json(path, run, environment())
        print(f"wrote {path}")
    if args.host:
        return 0

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            api()
        torch.cuda.synchronize()
    table = prof.key_averages()
    print("\n10 calls of the api path, by host time:")
    print(table.table(sort_by="self_cpu_time_total", row_limit=20))
    print("\n10 calls of the api path, by device time:")
    print(table.table(sort_by="self_device_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
