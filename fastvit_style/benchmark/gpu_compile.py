"""Compile the Triton kernels for a GPU that is not there: does each compile, and what does ptxas make of it.

    TRITON_INTERPRET=0 python -m fastvit_style.benchmark.gpu_compile [--arch 90] [--json]

For each kernel the launchers run at the released shapes (T=197 keys, 197 and 196 query rows, d=64,
and d=128), in bf16 and fp32, with the launchers' own compile-time arguments (`kernel_configs` of
each kernel file): registers per thread, spill stack, tensor-core instructions (HGMMA on sm_90, HMMA
before) and SASS length, read from the cubin with the cuobjdump and nvdisasm that ship with Triton.
Needs no GPU and no driver, only Triton's NVIDIA backend; the interpreter must be off (it replaces the
kernels by Python functions). Tensor arguments are assumed 16-byte aligned and last-dim strides 1,
as Triton specializes them on a real launch; other strides divisible by 16, as in the models.
`--scan KERNEL [KERNEL ...]` compiles the named kernels over tile shapes, warps and stages instead,
to choose tiles offline (`_common._EXACT_FP32_BLOCKS` came from such a scan); `--shapes` compiles at
other lengths and head sizes, whose last tiles have other widths.
"""

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_SCALARS = {"H": "i32", "Skv": "i32", "Tq": "i32", "Tk": "i32", "scale": "fp32", "qk_scale": "fp32"}
_POINTERS = {"LSE": "*fp32", "DELTA": "*fp32", "KV_INDEX": "*i32", "KV_OFFSETS": "*i64", "KV_QUERIES": "*i64"}
# (Tq, Tk, d): the encoder's layers, its last layer (CLS query row dropped), and the widest head.
SHAPES = ((197, 197, 64), (196, 197, 64), (197, 197, 128))
KERNEL_FILES = (
    "shared_attention_fwd",
    "shared_attention_bwd",
    "shared_attention_bwd_fused",
)  # modules of fastvit_style.kernels


def _signature(fn, meta: dict, dtype: str) -> tuple[dict, dict, dict]:
    """Triton signature, constexprs and divisibility attributes of a launch of `fn` with `meta`."""
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(inspect.signature(fn.fn).parameters):
        if name in meta:
            signature[name], constexprs[name] = "constexpr", meta[name]
        elif name.startswith("stride_") and name.endswith("d"):
            signature[name], constexprs[name] = "constexpr", 1
        elif name.startswith("stride_"):
            signature[name], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
        elif name in _SCALARS:
            signature[name] = _SCALARS[name]
        else:
            signature[name], attrs[(i,)] = _POINTERS.get(name, f"*{dtype}"), [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _cuda_tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.isfile(path):
        raise RuntimeError(f"{path} not found: this triton install has no NVIDIA backend tools")
    return path


def _resources(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run(
            [_cuda_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [_cuda_tool("nvdisasm"), path], capture_output=True, text=True, check=True
        ).stdout
    return {
        "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
        "spill_stack_bytes": int(re.search(r"STACK:(\d+)", usage).group(1)),
        "wgmma": len(re.findall(r"\bHGMMA\b", sass)),
        "mma": len(re.findall(r"\bHMMA\b", sass)),
        "sass_lines": sass.count("\n"),
    }


def compile_report(arch: int = 90, shapes=SHAPES, dtypes=tuple(_DTYPES), kernels=None) -> list[dict]:
    """One row per (kernel, dtype, shape): its compile-time arguments and ptxas' resources for sm_<arch>.

    shapes: (Tq, Tk, d) triples; dtypes: names among "bf16", "fp32"; kernels: names to compile
    (default: every kernel the launchers run).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..kernels import _common

    if _common.INTERPRET:
        raise RuntimeError(
            "TRITON_INTERPRET is set: the kernels are Python functions, unset it to compile them"
        )
    modules = [importlib.import_module(f"fastvit_style.kernels.{m}") for m in KERNEL_FILES]
    rows = []
    for dtype_name in dtypes:
        dtype = _DTYPES[dtype_name]
        for Tq, Tk, d in shapes:
            for module in modules:
                for name, (fn, meta) in module.kernel_configs(Tq, Tk, d, dtype).items():
                    if kernels is not None and name not in kernels:
                        continue
                    constexprs = {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")}
                    signature, constexprs, attrs = _signature(fn, constexprs, dtype_name)
                    options = {k: meta[k] for k in ("num_warps", "num_stages") if k in meta}
                    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
                    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                    rows.append(
                        {
                            "kernel": name,
                            "dtype": dtype_name,
                            "Tq": Tq,
                            "Tk": Tk,
                            "d": d,
                            "meta": meta,
                            "shared_bytes": compiled.metadata.shared,
                            **_resources(compiled.asm["cubin"]),
                        }
                    )
    return rows


SCAN_KERNELS = ("fwd", "bwd_dq", "bwd_dkdv")  # the tile heuristic's names (`_common.attention_blocks`)
SCAN_ROWS = (16, 32, 64, 128)


def scan_report(
    kernels=SCAN_KERNELS, arch: int = 90, shapes=SHAPES, dtypes=tuple(_DTYPES), tile_rows=SCAN_ROWS
) -> list[dict]:
    """compile_report's rows of `kernels` (among SCAN_KERNELS) at every tile shape: rows x columns
    in tile_rows, 4 and 8 warps, 1 and 2 pipeline stages, the heuristic's tail flags kept. A
    register/spill map for choosing tiles offline; 128-row fp32 tiles take minutes each to compile."""
    import itertools

    from ..kernels import _common

    heuristic = _common.attention_blocks
    rows = []
    try:
        for block_m, block_n, warps, stages in itertools.product(tile_rows, tile_rows, (4, 8), (1, 2)):

            def blocks(name, tq, tk, d, dtype, shape=(block_m, block_n, warps, stages)):
                picked = heuristic(name, tq, tk, d, dtype)
                return picked._replace(**dict(zip(picked._fields, shape))) if name in kernels else picked

            _common.attention_blocks = blocks
            rows += compile_report(arch, shapes, dtypes, kernels)
    finally:
        _common.attention_blocks = heuristic
    return rows


def _shape(text: str) -> tuple[int, int, int]:
    """A --shapes value, TQ,TK,D, as (Tq, Tk, d)."""
    try:
        Tq, Tk, d = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TQ,TK,D (three integers), got {text!r}") from None
    from ..kernels import _common

    if Tq < 1 or Tk < 1 or not _common.MIN_HEAD_DIM <= d <= _common.MAX_HEAD_DIM:
        raise argparse.ArgumentTypeError(
            f"expected lengths >= 1 and {_common.MIN_HEAD_DIM} <= D <= {_common.MAX_HEAD_DIM}, got {text!r}"
        )
    return Tq, Tk, d


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--quick", action="store_true", help=f"only the first shape, {SHAPES[0]}")
    p.add_argument(
        "--out", help="also write the rows, with the target, versions, date and commit, to this JSON file"
    )
    p.add_argument(
        "--tf32", action="store_true", help="fp32 kernels as with TF32 allowed (exact dots otherwise)"
    )
    p.add_argument(
        "--scan",
        nargs="+",
        choices=SCAN_KERNELS,
        help="these kernels at every tile shape, warp count and stage count instead (minutes a shape)",
    )
    p.add_argument(
        "--rows",
        type=int,
        nargs="+",
        choices=SCAN_ROWS,
        default=SCAN_ROWS,
        help="tile sides that --scan tries (default: all)",
    )
    p.add_argument("--dtype", choices=tuple(_DTYPES), help="this dtype only (default: both)")
    p.add_argument(
        "--shapes",
        type=_shape,
        nargs="+",
        metavar="TQ,TK,D",
        help="query length, key length and head size of each compile (default: the released ones)",
    )
    args = p.parse_args(argv)
    if tuple(args.rows) != SCAN_ROWS and not args.scan:
        p.error("--rows needs --scan")
    if args.shapes and args.quick:
        p.error("--quick picks the first released shape: give --shapes or --quick, not both")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32  # what `_common.dot_precision` reads
    if args.out:
        from .report import check_output_file

        check_output_file(args.out, ("target", "triton", "rows"))
    shapes = tuple(args.shapes) if args.shapes else SHAPES[:1] if args.quick else SHAPES
    dtypes = (args.dtype,) if args.dtype else tuple(_DTYPES)
    if args.scan:
        rows = scan_report(tuple(args.scan), args.arch, shapes, dtypes, tuple(args.rows))
    else:
        rows = compile_report(args.arch, shapes, dtypes)
    if args.out:
        import triton

        from ..atomic import write_json
        from .report import git_commit, utc_now

        # The rows are the kernels' registers and spills: they belong to the code (commit, sources hash).
        write_json(args.out, {"target": f"cuda sm_{args.arch}", "triton": triton.__version__, "rows": rows,
                              "torch": torch.__version__, "date": utc_now(), "git": git_commit()})  # fmt: skip
    if args.json:
        print(json.dumps(rows))
        return 0
    for r in rows:
        m = r["meta"]
        if "W0" in m:  # the one-launch backward: query rows, then the key parts
            parts = "+".join(str(m[w]) for w in ("W0", "W1", "W2") if m[w])
            tiles = f"{m['BLOCK_M']} rows, keys {parts}"
        else:
            tiles = "x".join(str(m[k]) for k in ("BLOCK_M", "BLOCK_N", "TAIL_M", "TAIL_N"))
        print(
            f"{r['kernel']:>10} {r['dtype']} Tq={r['Tq']} Tk={r['Tk']} d={r['d']} tiles {tiles:>12} "
            f"warps {m['num_warps']} stages {m['num_stages']}: {r['registers']:3d} registers, "
            f"{r['spill_stack_bytes']:3d} B spill stack, {r['shared_bytes'] // 1024} KB shared, "
            f"{r['wgmma']} HGMMA, {r['mma']} HMMA, {r['sass_lines']} SASS lines"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
