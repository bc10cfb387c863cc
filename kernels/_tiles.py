"""Triton helpers shared by the kernel files."""

import triton
import triton.language as tl


@triton.jit
def program_tile(
    T,  # length of the axis the programs own (queries, or keys for dk/dv)
    H,
    BLOCK: tl.constexpr,  # rows a program owns
    HEADS_OUTER: tl.constexpr,  # the grid of `_common.launch_grid`
):
    """(tile, sequence as int64, head) of this program on a `_common.launch_grid` grid."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(T, BLOCK)
    i_tile = pid % n_tiles
    if HEADS_OUTER:
        i_s = pid // n_tiles
        i_h = tl.program_id(1)
    else:
        i_sh = pid // n_tiles
        i_s = i_sh // H
        i_h = i_sh % H
    return i_tile, i_s.to(tl.int64), i_h


@triton.jit
def load_rows_t(
    p,  # one (sequence, head) of a (S, T, H, d) tensor, at row 0
    start_n,
    T,
    stride_t,
    stride_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_N: tl.constexpr,  # the tile reaches past T: mask its rows (zeros there)
    UPCAST: tl.constexpr,  # widen to fp32 (the interpreter cannot do half-precision dots)
):
    """Rows [start_n, start_n + BLOCK_N) transposed: a [BLOCK_D, BLOCK_N] tile, columns past d zero."""
    o_n = start_n + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    p_t = p + o_d[:, None] * stride_d + o_n[None, :] * stride_t
    m_d = (o_d < HEAD_DIM)[:, None]
    if MASK_N:
        b_t = tl.load(p_t, mask=m_d & (o_n < T)[None, :], other=0.0)
    else:
        b_t = tl.load(p_t, mask=m_d, other=0.0)
    if UPCAST:
        b_t = b_t.to(tl.float32)
    return b_t


@triton.jit
def load_rows(
    p,  # one (sequence, head) of a (S, T, H, d) tensor, at row 0
    start_n,
    T,
    stride_t,
    stride_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_N: tl.constexpr,  # the tile may reach past T: mask its rows (zeros there)
    UPCAST: tl.constexpr,  # widen to fp32 (the interpreter cannot do half-precision dots)
):
    """Rows [start_n, start_n + BLOCK_N) as a [BLOCK_N, BLOCK_D] tile, columns past d zero."""
    o_n = start_n + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    p_n = p + o_n[:, None] * stride_t + o_d[None, :] * stride_d
    m_d = (o_d < HEAD_DIM)[None, :]
    if MASK_N:
        b = tl.load(p_n, mask=(o_n < T)[:, None] & m_d, other=0.0)
    else:
        b = tl.load(p_n, mask=m_d, other=0.0)
    if UPCAST:
        b = b.to(tl.float32)
    return b


@triton.jit
def store_rows(
    p,  # one (sequence, head) of a (S, T, H, d) tensor, at row 0
    b,  # [BLOCK_N, BLOCK_D] tile, cast to p's dtype
    start_n,
    T,
    stride_t,
    stride_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Store b as rows [start_n, start_n + BLOCK_N), those inside T and d only."""
    o_n = start_n + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    p_n = p + o_n[:, None] * stride_t + o_d[None, :] * stride_d
    tl.store(p_n, b.to(p.dtype.element_ty), mask=(o_n < T)[:, None] & (o_d < HEAD_DIM)[None, :])


@triton.jit
def gpu_rounded(b, p, UPCAST: tl.constexpr):
    """b (fp32 scores or their gradient, about to be a dot operand in the inputs' dtype) with the
    rounding the GPU gives it there, in that dtype of the tensor p points at: interpreted (UPCAST,
    fp32 dots), rounded and widened again; on the GPU, b as it is (the dot operand's cast rounds it)."""
    if UPCAST:
        b = b.to(p.dtype.element_ty).to(tl.float32)
    return b
