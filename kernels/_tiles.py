"""Triton helpers shared by the kernel files."""

import triton
import triton.language as tl


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
