"""Backward of the weight-shared attention in one launch and five matmuls, for short key sequences.

Same equations as `shared_attention_bwd` (see there). One program owns all Tk keys of a (K/V sequence,
head): their dk/dv sums stay in registers while it streams the query tiles of every query sequence
that reads that K/V sequence (the inverse map). A query tile then meets all of its keys in one
program, so its dq is complete there and is stored once: no atomics, no partial sums, and P and dS
are computed once rather than once for dq and again for dk/dv (5 matmuls per tile instead of 7).
delta = rowsum(dO * O) is computed from the tile itself, since each query row is visited once.

The keys are held as up to three parts of power-of-two widths (197 = 128 + 64 + 16 padded), so that
little of the matmul work is padding; this bounds Tk (`MAX_KEYS`), and with it the registers. The
price is parallelism, Skv * H programs, and a few registers spilled on sm_90: whether and from which
size this beats the two launches is for a GPU sweep to say (`_common.ONE_LAUNCH_BACKWARD_MIN_PROGRAMS`).
Every dot but the last part's keeps the key axis or the head dim as its M side ([keys, rows] score
tiles, dq^T), so that it can run as a Hopper warpgroup MMA (M >= 64).
"""

import math

import torch
import triton
import triton.language as tl

from . import _common
from ._tiles import gpu_rounded, load_rows, load_rows_t, store_rows

# Keys a program can own: dk and dv of 256 keys at d = 64 are 128 KB of fp32 accumulators.
MAX_KEYS = 256
_MAX_PARTS = 3


# fmt: off
@triton.jit
def _key_part(
    p_k, p_v,  # K, V of the (sequence, head) at key 0
    b_dk, b_dv, b_dqt,  # the part's dk (unscaled) and dv sums [W, BLOCK_D]; the tile's dq^T [BLOCK_D, ROWS]
    b_qt, b_q,  # the query tile: q^T [BLOCK_D, ROWS] and q [ROWS, BLOCK_D]
    b_do, b_dot,  # its dO [ROWS, BLOCK_D] and dO^T [BLOCK_D, ROWS]
    b_lse, b_delta,  # [ROWS]
    m_m,  # [ROWS] query rows inside Tq
    start_n, Tk, stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
    HEAD_DIM: tl.constexpr,
    W: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_N: tl.constexpr,  # the part reaches past Tk
    MASK_M: tl.constexpr,  # the tile reaches past Tq
    UPCAST: tl.constexpr,
    DOT: tl.constexpr,
):
    """Add the query tile to the part's dk, dv and the part's keys to the tile's dq^T; return them."""
    # [W, BLOCK_D]: read again for every query tile (from cache) rather than held in registers,
    # which the dk/dv sums fill.
    b_k = load_rows(p_k, start_n, Tk, stride_kt, stride_kd, HEAD_DIM, W, BLOCK_D, MASK_N, UPCAST)
    b_v = load_rows(p_v, start_n, Tk, stride_vt, stride_vd, HEAD_DIM, W, BLOCK_D, MASK_N, UPCAST)
    # [W, ROWS]; padded keys and rows are zeroed so that an overflow of exp2 there reaches nothing.
    b_pt = tl.exp2(tl.dot(b_k, b_qt, input_precision=DOT) * qk_scale - b_lse[None, :])
    if MASK_N:
        m_n = start_n + tl.arange(0, W) < Tk
        if MASK_M:
            b_pt = tl.where(m_n[:, None] & m_m[None, :], b_pt, 0.0)
        else:
            b_pt = tl.where(m_n[:, None], b_pt, 0.0)
    elif MASK_M:
        b_pt = tl.where(m_m[None, :], b_pt, 0.0)
    b_dv = tl.dot(gpu_rounded(b_pt, p_k, UPCAST).to(b_do.dtype), b_do, b_dv, input_precision=DOT)
    b_dst = gpu_rounded(b_pt * (tl.dot(b_v, b_dot, input_precision=DOT) - b_delta[None, :]), p_k, UPCAST).to(b_k.dtype)
    b_dk = tl.dot(b_dst, b_q, b_dk, input_precision=DOT)
    b_dqt = tl.dot(tl.trans(b_k), b_dst, b_dqt, input_precision=DOT)
    return b_dk, b_dv, b_dqt


@triton.jit
def _query_tile(
    p_q, p_o, p_do, p_dq, p_lse,  # one (query sequence, head) of Q, O, dO, dQ at row 0, and its lse
    p_k, p_v,  # K, V of the mapped (sequence, head) at key 0
    b_dk0, b_dv0, b_dk1, b_dv1, b_dk2, b_dv2,  # the key parts' dk (unscaled) and dv sums
    start_m, Tq, Tk, scale, qk_scale,
    stride_qt, stride_qd, stride_ot, stride_od, stride_dot, stride_dod, stride_dqt, stride_dqd,
    stride_kt, stride_kd, stride_vt, stride_vd,
    HEAD_DIM: tl.constexpr,
    ROWS: tl.constexpr,
    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
    MASK_LAST: tl.constexpr,  # the last part reaches past Tk
    MASK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT: tl.constexpr,
):
    """Store dq of query rows [start_m, start_m + ROWS); return the parts' dk, dv with these rows added."""
    o_m = start_m + tl.arange(0, ROWS)
    m_m = o_m < Tq
    # [BLOCK_D, ROWS], [ROWS, BLOCK_D]
    b_qt = load_rows_t(p_q, start_m, Tq, stride_qt, stride_qd, HEAD_DIM, ROWS, BLOCK_D, MASK_M, UPCAST)
    b_do = load_rows(p_do, start_m, Tq, stride_dot, stride_dod, HEAD_DIM, ROWS, BLOCK_D, MASK_M, UPCAST)
    # Loaded both ways rather than transposed in registers: fewer registers spilled on sm_90 (88 bytes
    # against 120 with triton 3.6), the dk/dv sums taking most of them.
    b_q = load_rows(p_q, start_m, Tq, stride_qt, stride_qd, HEAD_DIM, ROWS, BLOCK_D, MASK_M, UPCAST)
    b_dot = load_rows_t(p_do, start_m, Tq, stride_dot, stride_dod, HEAD_DIM, ROWS, BLOCK_D, MASK_M, UPCAST)
    b_o = load_rows(p_o, start_m, Tq, stride_ot, stride_od, HEAD_DIM, ROWS, BLOCK_D, MASK_M, UPCAST)
    # [ROWS]: each query row is visited by one program once, so delta needs no launch of its own.
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    if MASK_M:
        b_lse = tl.load(p_lse + o_m, mask=m_m, other=0.0)
    else:
        b_lse = tl.load(p_lse + o_m)
    b_dqt = tl.zeros([BLOCK_D, ROWS], dtype=tl.float32)
    b_dk0, b_dv0, b_dqt = _key_part(
        p_k, p_v, b_dk0, b_dv0, b_dqt, b_qt, b_q, b_do, b_dot, b_lse, b_delta, m_m,
        0, Tk, stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
        HEAD_DIM, W0, BLOCK_D, MASK_LAST and W1 == 0, MASK_M, UPCAST, DOT,
    )
    if W1 > 0:
        b_dk1, b_dv1, b_dqt = _key_part(
            p_k, p_v, b_dk1, b_dv1, b_dqt, b_qt, b_q, b_do, b_dot, b_lse, b_delta, m_m,
            W0, Tk, stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
            HEAD_DIM, W1, BLOCK_D, MASK_LAST and W2 == 0, MASK_M, UPCAST, DOT,
        )
    if W2 > 0:
        b_dk2, b_dv2, b_dqt = _key_part(
            p_k, p_v, b_dk2, b_dv2, b_dqt, b_qt, b_q, b_do, b_dot, b_lse, b_delta, m_m,
            W0 + W1, Tk, stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
            HEAD_DIM, W2, BLOCK_D, MASK_LAST, MASK_M, UPCAST, DOT,
        )
    store_rows(p_dq, tl.trans(b_dqt * scale), start_m, Tq, stride_dqt, stride_dqd, HEAD_DIM, ROWS, BLOCK_D)
    return b_dk0, b_dv0, b_dk1, b_dv1, b_dk2, b_dv2


@triton.jit
def _shared_attention_bwd_fused_kernel(
    Q,  # (Sq, Tq, H, d), any strides
    K,  # (Skv, Tk, H, d), any strides
    V,  # (Skv, Tk, H, d), any strides
    O,  # (Sq, Tq, H, d), any strides: the forward's output
    DO,  # (Sq, Tq, H, d), any strides (stride 0 after an expand)
    LSE,  # (Sq, H, Tq) fp32, contiguous, base 2
    KV_OFFSETS,  # (Skv + 1,) int64: query ids of K/V sequence j are KV_QUERIES[KV_OFFSETS[j]:KV_OFFSETS[j+1]]
    KV_QUERIES,  # (Sq,) int64: query sequence ids sorted by kv_index
    DQ,  # (Sq, Tq, H, d), any strides
    DK,  # (Skv, Tk, H, d), any strides
    DV,  # (Skv, Tk, H, d), any strides
    stride_qs, stride_qt, stride_qh, stride_qd,
    stride_ks, stride_kt, stride_kh, stride_kd,
    stride_vs, stride_vt, stride_vh, stride_vd,
    stride_os, stride_ot, stride_oh, stride_od,
    stride_dos, stride_dot, stride_doh, stride_dod,
    stride_dqs, stride_dqt, stride_dqh, stride_dqd,
    stride_dks, stride_dkt, stride_dkh, stride_dkd,
    stride_dvs, stride_dvt, stride_dvh, stride_dvd,
    H, Tq, Tk, scale,
    qk_scale,  # scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASK_M: tl.constexpr,  # BLOCK_M does not divide Tq
    W0: tl.constexpr,  # widths of the key parts, keys [0, W0), [W0, W0 + W1), [W0 + W1, W0 + W1 + W2)
    W1: tl.constexpr,  # (0: no such part)
    W2: tl.constexpr,
    MASK_LAST: tl.constexpr,  # the last part reaches past Tk
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT: tl.constexpr,
):
    """One program: all keys of K/V sequence j, head h, and every query row that reads them;
    grid (Skv * H,)."""
    i_jh = tl.program_id(0)
    i_j = (i_jh // H).to(tl.int64)
    i_h = i_jh % H
    p_k = K + i_j * stride_ks + i_h * stride_kh
    p_v = V + i_j * stride_vs + i_h * stride_vh
    # An absent part keeps a placeholder that nothing adds to or stores.
    b_dk0 = tl.zeros([W0, BLOCK_D], dtype=tl.float32)
    b_dv0 = tl.zeros([W0, BLOCK_D], dtype=tl.float32)
    b_dk1, b_dv1, b_dk2, b_dv2 = b_dk0, b_dv0, b_dk0, b_dv0
    if W1 > 0:
        b_dk1 = tl.zeros([W1, BLOCK_D], dtype=tl.float32)
        b_dv1 = tl.zeros([W1, BLOCK_D], dtype=tl.float32)
    if W2 > 0:
        b_dk2 = tl.zeros([W2, BLOCK_D], dtype=tl.float32)
        b_dv2 = tl.zeros([W2, BLOCK_D], dtype=tl.float32)

    # An unused K/V sequence has an empty range and stores zeros.
    q_start = tl.load(KV_OFFSETS + i_j)
    q_end = tl.load(KV_OFFSETS + i_j + 1)
    for i_q in range(q_start, q_end):
        i_s = tl.load(KV_QUERIES + i_q).to(tl.int64)
        p_q = Q + i_s * stride_qs + i_h * stride_qh
        p_o = O + i_s * stride_os + i_h * stride_oh
        p_do = DO + i_s * stride_dos + i_h * stride_doh
        p_dq = DQ + i_s * stride_dqs + i_h * stride_dqh
        p_lse = LSE + (i_s * H + i_h) * Tq
        # One loop, every tile masked where BLOCK_M does not divide Tq: full tiles and a separate
        # (narrower) last one cost registers here (672 bytes spilled on sm_90 against 88).
        for start_m in range(0, Tq, BLOCK_M):
            b_dk0, b_dv0, b_dk1, b_dv1, b_dk2, b_dv2 = _query_tile(
                p_q, p_o, p_do, p_dq, p_lse, p_k, p_v, b_dk0, b_dv0, b_dk1, b_dv1, b_dk2, b_dv2,
                start_m, Tq, Tk, scale, qk_scale,
                stride_qt, stride_qd, stride_ot, stride_od, stride_dot, stride_dod, stride_dqt, stride_dqd,
                stride_kt, stride_kd, stride_vt, stride_vd,
                HEAD_DIM, BLOCK_M, W0, W1, W2, MASK_LAST, MASK_M, BLOCK_D, UPCAST, DOT,
            )

    p_dk = DK + i_j * stride_dks + i_h * stride_dkh
    p_dv = DV + i_j * stride_dvs + i_h * stride_dvh
    store_rows(p_dk, b_dk0 * scale, 0, Tk, stride_dkt, stride_dkd, HEAD_DIM, W0, BLOCK_D)
    store_rows(p_dv, b_dv0, 0, Tk, stride_dvt, stride_dvd, HEAD_DIM, W0, BLOCK_D)
    if W1 > 0:
        store_rows(p_dk, b_dk1 * scale, W0, Tk, stride_dkt, stride_dkd, HEAD_DIM, W1, BLOCK_D)
        store_rows(p_dv, b_dv1, W0, Tk, stride_dvt, stride_dvd, HEAD_DIM, W1, BLOCK_D)
    if W2 > 0:
        store_rows(p_dk, b_dk2 * scale, W0 + W1, Tk, stride_dkt, stride_dkd, HEAD_DIM, W2, BLOCK_D)
        store_rows(p_dv, b_dv2, W0 + W1, Tk, stride_dvt, stride_dvd, HEAD_DIM, W2, BLOCK_D)


# fmt: on


def key_parts(tk: int, widest: int = 128) -> tuple[int, int, int] | None:
    """Widths (W0, W1, W2) of the key parts that cover tk keys (0 for an absent part), powers of two
    from 16 to `widest`, all but the last exactly full; None when tk > MAX_KEYS."""
    if not 1 <= tk <= MAX_KEYS:
        return None
    widths, rest = [], tk
    while rest > 0:
        if len(widths) == _MAX_PARTS - 1 or rest >= widest:
            width = min(widest, max(16, _common.next_power_of_2(rest)))
        else:
            width = max(16, 1 << (rest.bit_length() - 1))
        widths.append(width)
        rest -= width
    if len(widths) > _MAX_PARTS:
        return None
    return (*widths, *(0,) * (_MAX_PARTS - len(widths)))


@_common.memoize_per_shape
def kernel_configs(Tq: int, Tk: int, d: int, dtype: torch.dtype) -> dict:
    """{"bwd_fused": (kernel, meta)}: the kernel and its compile-time arguments, as in the other kernel
    files; {} where it does not apply: keys that three parts of the configured width cannot hold
    (more than MAX_KEYS), or, on a GPU, fp32 or d > 64, where the dk/dv sums of every key overflow the
    registers (the interpreter has no such limit)."""
    if not _common.INTERPRET and (d > 64 or dtype == torch.float32):
        return {}
    blocks = _common.attention_blocks("bwd_fused", Tq, Tk, d, dtype)
    parts = key_parts(Tk, blocks.block_n)
    if parts is None:
        return {}
    meta = {
        "HEAD_DIM": d,
        "BLOCK_M": blocks.block_m,
        "MASK_M": Tq % blocks.block_m != 0,
        "W0": parts[0],
        "W1": parts[1],
        "W2": parts[2],
        "MASK_LAST": sum(parts) > Tk,
        "BLOCK_D": _common.block_d(d),
        "UPCAST": _common.UPCAST_TILES,
        "DOT": _common.dot_precision(dtype),
        "num_warps": blocks.num_warps,
        "num_stages": blocks.num_stages,
    }
    return {"bwd_fused": (_shared_attention_bwd_fused_kernel, meta)}


def launch_fused(do, q, k, v, out, lse, kv_offsets, kv_queries, dq, dk, dv, scale, meta) -> None:
    """Fill dq (Sq, Tq, H, d) and dk, dv (Skv, Tk, H, d), any strides, in q's dtype; the other
    arguments as for `shared_attention_bwd`, which checks and allocates them; meta from kernel_configs."""
    H = q.shape[2]
    grid = _common.launch_grid(False, 1, 1, k.shape[0], H)  # one program per (K/V sequence, head)
    # fmt: off
    _shared_attention_bwd_fused_kernel[grid](
        q, k, v, out, do, lse, kv_offsets, kv_queries, dq, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *do.stride(), *dq.stride(), *dk.stride(),
        *dv.stride(), H, q.shape[1], k.shape[1], scale, scale * math.log2(math.e), **meta,
    )
    # fmt: on
