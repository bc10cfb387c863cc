"""Flags and heuristics shared by the Triton kernels: interpreter mode, supported dtypes, block sizes."""

import contextlib
import functools
import math
import numbers
import os
from typing import NamedTuple

import torch

# Read once, like Triton itself: the variable must be set before triton is first imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")

# bf16/fp16 `tl.dot` under the interpreter multiplies raw bit patterns (triton issue 11584), so the
# kernels widen tiles to fp32 right after loading them when interpreted; the GPU keeps half dots.
UPCAST_TILES = INTERPRET

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
# The kernels take scale * log2(e) as an fp32 argument.
MAX_SCALE = torch.finfo(torch.float32).max / math.log2(math.e)
# One K/V head row of BLOCK_D <= 128 lanes; tl.dot needs at least 16 along the reduction.
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128

# The backward runs as one launch (`shared_attention_bwd_fused`: 5 matmuls per tile instead of 7, but
# one program per K/V sequence and head) when it has at least this many programs (Skv * H) and the
# kernel applies at the shape and dtype; None: never. Off until a GPU sweep has timed it against the
# two launches (bench/sweep_shared_attention.py, method fused-1launch); tests set it to 0. A program
# works through every query sequence that reads its K/V sequence, one after another, and the launcher
# cannot count those without a device sync: the model's maps have at most 2 per K/V sequence (its
# self and stylized queries), but a map sending many queries to one K/V sequence would serialize them.
ONE_LAUNCH_BACKWARD_MIN_PROGRAMS: int | None = None


class Blocks(NamedTuple):
    """Tile shape and launch parameters of one attention kernel."""

    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int
    # A partial last tile runs only as wide as it needs (see `tail_width`): on the axis a program
    # streams in a loop (the keys of the forward and dq kernels, the queries of dk/dv), and on the
    # axis the programs own (the last program's query rows, or keys for dk/dv). False runs it at full
    # width, masked, as a plain loop or grid would: the sweep times both.
    narrow_streamed: bool = True
    narrow_owned: bool = True
    # Program order (see `launch_grid`): every program of one head before the next head, rather than
    # the heads of one sequence side by side (FlashAttention's order). In the model's maps the query
    # sequences that read one K/V sequence are B apart (self and stylized queries), so their programs
    # then run about 4B programs apart and the later reader should find the keys and values in L2
    # instead of reading them from DRAM again: a quarter less forward traffic for a K/V sequence with
    # two readers (a sixth over the explicit-style map). What passes through L2 in between, one head's
    # K/V, q and out, is about 100 KB x B at T = 197, d = 64 in bf16 (13 MB at B = 128; 155 MB at 12
    # heads in the other order), within the H100's 50 MB up to B of about 500. Unmeasured until a GPU
    # sweep times both orders.
    heads_outer: bool = True


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (triton.cdiv costs several microseconds of host time per call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def block_d(head_dim: int) -> int:
    """Head dimension padded to a power of two (d=80 runs as 128 lanes, masked)."""
    return next_power_of_2(head_dim)


# Exact fp32 dots run on the FMA units, every product in registers, where the tiles below (chosen for
# tensor cores) spill: dk/dv 496-504 bytes at d = 64, the forward 504-632 at d = 128 (sm_90). These
# are the widest tiles at 8 warps and 2 stages that compile spill-free for sm_90 at T = 197 with both
# triton 3.6 (the GPU machine's) and 3.9, ties going to the larger owned side (fewer programs re-read
# the streamed one); under 64 KB of shared memory where GPUs with 64 KB per block still run the kernel
# (the forward, and the backward at d <= 64). From `gpu_compile --scan` (bench/results,
# 20261130_sm90_exact_fp32_tile_scan*.json); their speed is unmeasured. At d > 64, dq streams 32 keys,
# not 64, and dk/dv runs its last keys at full width, so that every length of a square image from 32
# to 512 px compiles spill-free too (with triton 3.9; 3.6: at most 24 bytes, below 96 px), where a
# narrow last tile beside full ones spilled 120-232 bytes (20261130_sm90_fp32_lengths*.json).
_EXACT_FP32_BLOCKS = {  # (kernel, head_dim > 64): blocks
    ("fwd", False): Blocks(64, 32, 8, 2),
    ("fwd", True): Blocks(16, 32, 8, 2),
    ("bwd_dq", False): Blocks(32, 64, 8, 2, narrow_owned=False),
    ("bwd_dq", True): Blocks(16, 32, 8, 2, narrow_owned=False),
    ("bwd_dkdv", False): Blocks(16, 64, 8, 2, narrow_streamed=False),
    ("bwd_dkdv", True): Blocks(32, 32, 8, 2, narrow_streamed=False, narrow_owned=False),
}


def attention_blocks(kernel: str, tq: int, tk: int, head_dim: int, dtype: torch.dtype) -> Blocks:
    """Blocks for `kernel` in {"fwd", "bwd_dkdv", "bwd_dq", "bwd_fused"} at query length tq, key length tk
    (for bwd_fused, block_n is the widest key part, and the tails are never narrow).

    Tests monkeypatch this to drive other tile shapes through the interpreter.
    """
    if INTERPRET:
        # The interpreter runs programs one by one in numpy: few, large tiles are fastest.
        return _fit(Blocks(64, 128 if kernel == "bwd_fused" else 64, 4, 1), tq, tk)
    wide = head_dim > 64  # BLOCK_D = 128
    fp32 = dtype == torch.float32
    if fp32 and kernel != "bwd_fused" and dot_precision(dtype) == "ieee":
        return _fit(_EXACT_FP32_BLOCKS[kernel, wide], tq, tk)
    # Twice the registers per tile: more warps share them.
    warps = 8 if wide or fp32 else 4
    # fp32 tiles take twice the shared memory: fewer pipeline stages and narrower streamed tiles
    # keep every config under ~100 KB, so that it also fits GPUs smaller than the H100.
    if kernel == "fwd":
        # T=197 gives 4 query tiles of 64 per (sequence, head): enough programs at every batch size.
        return _fit(Blocks(64, 32 if fp32 else 64, warps, 2 if fp32 else 3), tq, tk)
    if kernel == "bwd_fused":
        # The dk/dv sums of all keys fill the registers (104 per thread at T = 197, d = 64, 8 warps):
        # 16 streamed query rows spill least on sm_90 (88 bytes with triton 3.6; 176 at 32 rows, more
        # at 4 or 16 warps, with one pipeline stage, or with the key tiles held in registers).
        return _fit(Blocks(16, 128, 8, 2), tq, tk)
    # The backward owns one side in fp32 accumulators and streams the other (tutorial pattern):
    # 32-row streamed tiles pad 197 to 224 rather than 256.
    owned = 32 if wide and fp32 else 64
    if kernel == "bwd_dq" and wide and fp32:
        owned = 16  # TF32 dq spilled 544 bytes with 32 rows on sm_90 (20261130_sm90_fp32_lengths_tf32*)
    # Narrow tails that cost registers stay off until a GPU sweep says the work they save pays
    # (sm_90 compiles with triton 3.6, bf16, d = 64): a narrow streamed tail takes dk/dv from 183 to
    # 191 registers and makes it spill at d = 128 and in fp32; a narrow last query tile takes dq from
    # 92 to 124 (five programs per SM to four). The others cost no occupancy.
    if kernel == "bwd_dkdv":
        return _fit(Blocks(32, owned, warps, 2, narrow_streamed=False), tq, tk)
    return _fit(Blocks(owned, 32, warps, 2, narrow_owned=False), tq, tk)


def tail_width(length: int, block: int, narrow: bool = True) -> int:
    """Width of the last, partial tile when `length` rows are cut into `block`-row tiles: 0 when block
    divides length; else the remainder rounded up to a power of two, at least 16 (the smallest tl.dot
    side) and at most block; `block` itself when not narrow."""
    rest = length % block
    if rest == 0:
        return 0
    return min(block, max(16, next_power_of_2(rest))) if narrow else block


def launch_grid(heads_outer: bool, length: int, block: int, sequences: int, heads: int) -> tuple:
    """Grid of an attention kernel whose programs each own `block` rows (the last one fewer) of one of
    `sequences` sequences of `length` rows, for one of `heads` heads; `_tiles.program_tile` reads it.

    Tiles and sequences share the first axis, whose limit is 2**31 - 1: CUDA's other axes stop at
    65535, which Sq * H passes from Sq = 5462 at 12 heads (a stylize call with explicit styles on
    1,821 images).
    """
    programs = cdiv(length, block) * sequences * (1 if heads_outer else heads)
    if programs >= 2**31 or (heads_outer and heads > 65535):
        raise ValueError(
            f"too many programs for a CUDA grid: {programs} on the first axis and {heads} heads "
            f"(at most 2**31 - 1 and 65535); split the batch"
        )
    return (programs, heads) if heads_outer else (programs,)


def dot_precision(dtype: torch.dtype) -> str:
    """The input_precision of the kernels' tl.dot for inputs of `dtype` (their DOT constexpr).

    fp32: what torch's own fp32 matmuls on CUDA do, exact ("ieee") unless TF32 is allowed
    (`torch.set_float32_matmul_precision("high")`, `torch.backends.cuda.matmul.allow_tf32` or
    `fp32_precision = "tf32"` there or in `torch.backends`): the
    official attention is a torch matmul, so an fp32 model gives its numbers unless the user opts into
    TF32 the usual way (Triton's own default would be TF32 always). Half-precision dots are exact
    either way; they keep Triton's default, "tf32"."""
    if dtype == torch.float32 and not _tf32_matmuls():
        return "ieee"
    return "tf32"


def _tf32_matmuls() -> bool:
    """Whether torch lets fp32 CUDA matmuls use TF32: `fp32_precision` (torch >= 2.9; its getter gives
    the effective value, `torch.backends.fp32_precision` included), else `allow_tf32`, which raises
    once the newer API has been used."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    return matmul.allow_tf32 if precision is None else precision == "tf32"


def launch_meta(
    blocks: Blocks, head_dim: int, tq: int, tk: int, dtype: torch.dtype, owns_keys: bool = False
) -> dict:
    """Compile-time arguments of an attention kernel launched with `blocks` at query length tq and key
    length tk on inputs of `dtype`: its constexprs (TAIL_M, TAIL_N: the widths of the last query and
    key tiles; DOT: `dot_precision`) and num_warps/num_stages. owns_keys: the programs own key tiles and
    stream the queries (dk/dv); otherwise they own query tiles and stream the keys."""
    narrow_m, narrow_n = blocks.narrow_streamed, blocks.narrow_owned
    if not owns_keys:
        narrow_m, narrow_n = narrow_n, narrow_m
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_M": blocks.block_m,
        "BLOCK_N": blocks.block_n,
        "TAIL_M": tail_width(tq, blocks.block_m, narrow_m),
        "TAIL_N": tail_width(tk, blocks.block_n, narrow_n),
        "BLOCK_D": block_d(head_dim),
        "UPCAST": UPCAST_TILES,
        "DOT": dot_precision(dtype),
        "HEADS_OUTER": blocks.heads_outer,
        "num_warps": blocks.num_warps,
        "num_stages": blocks.num_stages,
    }


def memoize_per_shape(kernel_configs):
    """Decorate a kernel file's kernel_configs(Tq, Tk, d, dtype) to compute it once per shape, dtype,
    block heuristic in force (tests and the sweep replace `attention_blocks`) and dot precision (torch's
    TF32 setting may change between calls): launchers call it on every launch, and building it costs
    more host time than the launch. Callers read the shared result and never change it."""
    cache = {}

    @functools.wraps(kernel_configs)
    def memoized(Tq: int, Tk: int, d: int, dtype: torch.dtype) -> dict:
        key = (attention_blocks, Tq, Tk, d, dtype, dot_precision(dtype))
        configs = cache.get(key)
        if configs is None:
            if len(cache) >= 256:  # a sweep makes a new heuristic per config: keep the cache bounded
                cache.clear()
            configs = cache[key] = kernel_configs(Tq, Tk, d, dtype)
        return configs

    return memoized


def _fit(blocks: Blocks, tq: int, tk: int) -> Blocks:
    """Shrink tiles to short sequences (down to 16, the smallest tl.dot side) so no tile is mostly padding."""
    return blocks._replace(
        block_m=min(blocks.block_m, max(16, next_power_of_2(tq))),
        block_n=min(blocks.block_n, max(16, next_power_of_2(tk))),
    )


def check_tensor(name: str, t: torch.Tensor, shape: tuple, dtypes: tuple, device: torch.device) -> None:
    """ValueError naming `name` unless t has this shape, one of these dtypes and this device."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {dtypes}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {t.device}")


def on_device(t: torch.Tensor):
    """Context for launching on t's GPU. Triton launches on the current CUDA device, not on the one its
    arguments live on: a model moved to cuda:1 without torch.cuda.set_device would hand kernels on
    cuda:0 pointers they cannot read."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def int32_addressable(name: str, t: torch.Tensor) -> torch.Tensor:
    """t (S, T, H, d), or a contiguous copy of it where the kernels' offsets would overflow.

    The kernels address a sequence's rows, heads and lanes with 32-bit products (index x stride; the
    sequence offset is 64-bit): a sequence-minor layout of over 2**31 elements, such as a (T, S, H, d)
    tensor viewed as (S, T, H, d), would wrap them around. ValueError when one contiguous sequence,
    the layout of the outputs, is too large for them.
    """
    _, T, H, d = t.shape
    if (T - 1) * H * d >= 2**31:
        raise ValueError(
            f"{name}: one sequence of {(T, H, d)} (T, H, d) holds too many elements for the Triton "
            f"kernels' 32-bit offsets (at most 2**31 per sequence)"
        )
    _, st, sh, sd = t.stride()
    if (T - 1) * st < 2**31 and (H - 1) * sh < 2**31 and (d - 1) * sd < 2**31:
        return t
    return t.contiguous()


def check_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor, scale: float
) -> float:
    """The launchers' checks on q (Sq, Tq, H, d), k/v (Skv, Tk, H, d), kv_index (Sq,) and scale (a
    real number such that scale * log2(e), a kernel argument, is a finite fp32 number); returns scale as
    a Python float (the interpreter cannot pass a NumPy scalar).

    kv_index values are not read (that would sync the device): the op checks them in eager mode.
    """
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not abs(scale) <= MAX_SCALE:
        raise ValueError(
            f"scale must be a finite real number of at most {MAX_SCALE:.3g} in magnitude, got {scale!r}"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (S, T, H, d), got shape {tuple(t.shape)}")
    if q.device.type == "cpu" and not INTERPRET:
        raise ValueError(
            "CPU tensors given to the Triton backend outside interpreter mode (set TRITON_INTERPRET=1)"
        )
    Sq, _, H, d = q.shape
    Skv, Tk = k.shape[:2]
    check_tensor("q", q, q.shape, DTYPES, q.device)
    check_tensor("k", k, (Skv, Tk, H, d), (q.dtype,), q.device)
    check_tensor("v", v, (Skv, Tk, H, d), (q.dtype,), q.device)
    check_tensor("kv_index", kv_index, (Sq,), INDEX_DTYPES, q.device)
    if Sq > 1 and kv_index.stride(0) != 1:  # the kernels read entry s at kv_index + s
        raise ValueError(f"kv_index must be contiguous (stride 1), got stride {kv_index.stride(0)}")
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(
            f"head dim d={d} unsupported by the Triton kernels (need {MIN_HEAD_DIM} <= d <= {MAX_HEAD_DIM})"
        )
    if Sq > 0 and (Skv < 1 or Tk < 1):
        raise ValueError(
            f"k and v need at least one sequence and key (Skv, Tk >= 1) when Sq > 0, got Skv={Skv}, Tk={Tk}"
        )
    return float(scale)
