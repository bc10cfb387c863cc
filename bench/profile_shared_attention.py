"""Where the time of one small shared-attention forward+backward goes: host or device (CUDA only).

    python bench/profile_shared_attention.py [--batch 8] [--heads 3]

The H100 sweep of 2026-11-23 found fused forward+backward near 0.8-1.0 ms at every small size (B=8,
H=3 included), where cuDNN with duplicated K/V took 0.14-0.3 ms: a fixed cost. This prints, at one
small size (bf16, d=64, T=197, 3B query sequences over 2B K/V sequences, the model's map):
  - milliseconds per call, synchronised once per 50 calls, of: the op through autograd (as the model
    calls it); the three launchers called directly (no custom op, no autograd); the inverse map alone;
  - the torch.profiler table of the op through autograd, by host time and by device time.
If the op's time is far above the device total of the table, the fixed cost is on the host (Python,
dispatch, launch overhead), and CUDA graphs or fewer launches are the cure rather than tiling.
"""

import argparse
import time

import torch


def per_call_ms(fn, calls: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=3)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to profile")
        return 1
    from fastvit_style.kernels import shared_attention_bwd, shared_attention_fwd

    from fastvit_style.ops.shared_attention import _inverse_kv_map, shared_attention_fwd_op

    B, H, T, d = args.batch, args.heads, 197, 64
    dev, dt = torch.device("cuda"), torch.bfloat16
    q = torch.randn(3 * B, T, H, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(2 * B, T, H, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(2 * B, T, H, d, device=dev, dtype=dt, requires_grad=True)
    own = torch.arange(B, device=dev, dtype=torch.int32)
    kv_index = torch.cat([own, own + B, own + B])  # [x; s; a] -> [x, s, s]
    do = torch.randn_like(q)
    scale = d**-0.5

    def op():
        out = shared_attention_fwd_op(q, k, v, kv_index, scale)[0]
        torch.autograd.grad(out, (q, k, v), do)

    def launchers():
        with torch.no_grad():
            out, lse = shared_attention_fwd(q, k, v, kv_index, scale)
            offsets, queries = _inverse_kv_map(kv_index, k.shape[0])
            shared_attention_bwd(do, q, k, v, out, lse, kv_index, offsets, queries, scale)

    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | B={B} H={H} T={T} d={d} bf16")
    print(f"op through autograd, fwd+bwd: {per_call_ms(op):.3f} ms per call")
    print(f"launchers directly, fwd+bwd:  {per_call_ms(launchers):.3f} ms per call")
    print(
        f"inverse map alone:            {per_call_ms(lambda: _inverse_kv_map(kv_index, 2 * B)):.3f} ms per call"
    )

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            op()
        torch.cuda.synchronize()
    table = prof.key_averages()
    print("\n10 calls of the op, by host time:")
    print(table.table(sort_by="self_cpu_time_total", row_limit=20))
    print("\n10 calls of the op, by device time:")
    print(table.table(sort_by="self_device_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
