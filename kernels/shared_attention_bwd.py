"""Backward of the weight-shared attention: dq, dk, dv without atomics.

With P = softmax(S), S = scale * q k^T (per query sequence s and its K/V sequence j = kv_index[s]):
    dv[j] = sum_{s: kv_index[s]=j} P_s^T dO_s
    dS_s  = P_s * (dO_s v_j^T - delta_s),  delta_s = rowsum(dO_s * O_s)
    dk[j] = scale * sum_{s: kv_index[s]=j} dS_s^T q_s
    dq_s  = scale * dS_s k_j
P is rebuilt from the forward's log-sum-exp. One program owns each dk/dv tile and loops over the
query sequences that read its K/V sequence (the inverse map, CSR form), so the sums are
deterministic; dq has its own kernel, launched first, one program per query tile, which also
stores delta for the dk/dv kernel (two launches in all). Both kernels stream the other side in
full tiles without a mask and end with one tile only as wide as the rest needs, or, when that last
tile is as wide as the others, in one masked loop; the last program of a sequence owns a tile only
as wide as its rows need (`_common.tail_width`).
"""

import math

import torch
import triton
import triton.language as tl

from . import _common
from ._tiles import gpu_rounded, load_rows, load_rows_t, program_tile, store_rows
from .shared_attention_bwd_fused import kernel_configs as fused_kernel_configs
from .shared_attention_bwd_fused import launch_fused


# Kernel signatures keep the four strides of each tensor on one line.
# fmt: off
@triton.jit
def _dq_tile(
    b_q, b_do, b_lse, b_delta, b_dq,  # the owned query rows: q, dO [BLOCK_M, BLOCK_D], lse, delta, dq sum
    m_m,  # [BLOCK_M] owned rows inside Tq
    p_k, p_v,  # K, V of the mapped sequence and head at key 0
    start_n, Tk, stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_N: tl.constexpr,  # the tile reaches past Tk
    UPCAST: tl.constexpr,
    DOT: tl.constexpr,
):
    """Add keys [start_n, start_n + BLOCK_N) to b_dq (not yet scaled) and return it."""
    # [BLOCK_D, BLOCK_N]
    b_kt = load_rows_t(p_k, start_n, Tk, stride_kt, stride_kd, HEAD_DIM, BLOCK_N, BLOCK_D, MASK_N, UPCAST)
    b_vt = load_rows_t(p_v, start_n, Tk, stride_vt, stride_vd, HEAD_DIM, BLOCK_N, BLOCK_D, MASK_N, UPCAST)
    # [BLOCK_M, BLOCK_N]
    b_p = tl.exp2(tl.dot(b_q, b_kt, input_precision=DOT) * qk_scale - b_lse[:, None])
    if MASK_N:
        b_p = tl.where(m_m[:, None] & (start_n + tl.arange(0, BLOCK_N) < Tk)[None, :], b_p, 0.0)
    else:
        b_p = tl.where(m_m[:, None], b_p, 0.0)
    b_ds = b_p * (tl.dot(b_do, b_vt, input_precision=DOT) - b_delta[:, None])
    return tl.dot(gpu_rounded(b_ds, p_k, UPCAST).to(b_kt.dtype), tl.trans(b_kt), b_dq, input_precision=DOT)


@triton.jit
def _dq_rows(
    p_q, p_k, p_v, p_o, p_do, p_dq,  # this (sequence, head) of Q, K, V, O, dO and dQ at row 0
    p_lse, p_delta,  # its Tq log-sum-exps and deltas
    start_m, Tq, Tk, scale, qk_scale,
    stride_qt, stride_qd, stride_kt, stride_kd, stride_vt, stride_vd,
    stride_ot, stride_od, stride_dot, stride_dod, stride_dqt, stride_dqd,
    HEAD_DIM: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TAIL_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT: tl.constexpr,
):
    """Store dq and delta of query rows [start_m, start_m + ROWS)."""
    o_m = start_m + tl.arange(0, ROWS)
    m_m = o_m < Tq
    # [ROWS, BLOCK_D]
    b_q = load_rows(p_q, start_m, Tq, stride_qt, stride_qd, HEAD_DIM, ROWS, BLOCK_D, True, UPCAST)
    b_do = load_rows(p_do, start_m, Tq, stride_dot, stride_dod, HEAD_DIM, ROWS, BLOCK_D, True, UPCAST)
    # [ROWS]
    b_lse = tl.load(p_lse + o_m, mask=m_m, other=0.0)
    # delta = rowsum(dO * O) of the owned rows, here rather than in a launch of its own.
    b_o = load_rows(p_o, start_m, Tq, stride_ot, stride_od, HEAD_DIM, ROWS, BLOCK_D, True, UPCAST)
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    tl.store(p_delta + o_m, b_delta, mask=m_m)
    b_dq = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)

    if TAIL_N == BLOCK_N:
        # A last tile as wide as the others: one masked loop. A loop and a separate last tile of its
        # width spilled in exact fp32 on sm_90 (up to 2 KB at Tk = 17 and 36).
        for start_n in range(0, Tk, BLOCK_N):
            b_dq = _dq_tile(
                b_q, b_do, b_lse, b_delta, b_dq, m_m, p_k, p_v, start_n, Tk,
                stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                HEAD_DIM, BLOCK_N, BLOCK_D, True, UPCAST, DOT,
            )
    else:
        # Full key tiles without a mask, then the rest in a tile only as wide as it needs.
        n_full = Tk - Tk % BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            b_dq = _dq_tile(
                b_q, b_do, b_lse, b_delta, b_dq, m_m, p_k, p_v, start_n, Tk,
                stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                HEAD_DIM, BLOCK_N, BLOCK_D, False, UPCAST, DOT,
            )
        if TAIL_N > 0:
            b_dq = _dq_tile(
                b_q, b_do, b_lse, b_delta, b_dq, m_m, p_k, p_v, n_full, Tk,
                stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
                HEAD_DIM, TAIL_N, BLOCK_D, True, UPCAST, DOT,
            )
    store_rows(p_dq, b_dq * scale, start_m, Tq, stride_dqt, stride_dqd, HEAD_DIM, ROWS, BLOCK_D)


@triton.jit
def _dkdv_tile(
    b_k, b_v, b_dk, b_dv,  # the owned keys: k, v [COLS, BLOCK_D], dk (not yet scaled) and dv sums
    m_n,  # [COLS] owned keys inside Tk
    p_q, p_do,  # one (query sequence, head) of Q and dO at row 0
    p_lse, p_delta,  # its Tq log-sum-exps and deltas
    start_m, Tq, stride_qt, stride_qd, stride_dot, stride_dod, qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_M: tl.constexpr,  # the tile reaches past Tq
    UPCAST: tl.constexpr,
    DOT: tl.constexpr,
):
    """Add query rows [start_m, start_m + BLOCK_M) to b_dk and b_dv and return them.

    Works on transposed score tiles [COLS, BLOCK_M] so that dk/dv come out of plain dots.
    """
    o_m = start_m + tl.arange(0, BLOCK_M)
    m_m = o_m < Tq
    # [BLOCK_D, BLOCK_M]
    b_qt = load_rows_t(p_q, start_m, Tq, stride_qt, stride_qd, HEAD_DIM, BLOCK_M, BLOCK_D, MASK_M, UPCAST)
    # [BLOCK_M, BLOCK_D]
    b_do = load_rows(p_do, start_m, Tq, stride_dot, stride_dod, HEAD_DIM, BLOCK_M, BLOCK_D, MASK_M, UPCAST)
    # [BLOCK_M]
    if MASK_M:
        b_lse = tl.load(p_lse + o_m, mask=m_m, other=0.0)
        b_delta = tl.load(p_delta + o_m, mask=m_m, other=0.0)
    else:
        b_lse = tl.load(p_lse + o_m)
        b_delta = tl.load(p_delta + o_m)
    # [COLS, BLOCK_M]; padded keys and queries are zeroed so that no overflow of exp2 on padding
    # can reach a stored element.
    b_pt = tl.exp2(tl.dot(b_k, b_qt, input_precision=DOT) * qk_scale - b_lse[None, :])
    if MASK_M:
        b_pt = tl.where(m_n[:, None] & m_m[None, :], b_pt, 0.0)
    else:
        b_pt = tl.where(m_n[:, None], b_pt, 0.0)
    b_dv = tl.dot(gpu_rounded(b_pt, p_do, UPCAST).to(b_do.dtype), b_do, b_dv, input_precision=DOT)
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT)
    b_dst = b_pt * (b_dpt - b_delta[None, :])
    b_dk = tl.dot(gpu_rounded(b_dst, p_q, UPCAST).to(b_qt.dtype), tl.trans(b_qt), b_dk, input_precision=DOT)
    return b_dk, b_dv


@triton.jit
def _dkdv_cols(
    Q, DO, LSE, DELTA, KV_QUERIES,  # as in the kernel
    p_k, p_v, p_dk, p_dv,  # this (K/V sequence, head) of K, V, dK and dV at key 0
    q_start, q_end,  # its query sequences are KV_QUERIES[q_start:q_end]
    i_h, H, start_n, Tq, Tk, scale, qk_scale,
    stride_qs, stride_qt, stride_qh, stride_qd, stride_kt, stride_kd, stride_vt, stride_vd,
    stride_dos, stride_dot, stride_doh, stride_dod, stride_dkt, stride_dkd, stride_dvt, stride_dvd,
    HEAD_DIM: tl.constexpr,
    COLS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TAIL_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT: tl.constexpr,
):
    """Store dk and dv of keys [start_n, start_n + COLS)."""
    o_n = start_n + tl.arange(0, COLS)
    m_n = o_n < Tk
    # [COLS, BLOCK_D]
    b_k = load_rows(p_k, start_n, Tk, stride_kt, stride_kd, HEAD_DIM, COLS, BLOCK_D, True, UPCAST)
    b_v = load_rows(p_v, start_n, Tk, stride_vt, stride_vd, HEAD_DIM, COLS, BLOCK_D, True, UPCAST)
    b_dk = tl.zeros([COLS, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([COLS, BLOCK_D], dtype=tl.float32)

    # An unused K/V sequence has an empty range and stores zeros.
    m_full = Tq - Tq % BLOCK_M
    for i_q in range(q_start, q_end):
        i_s = tl.load(KV_QUERIES + i_q).to(tl.int64)
        p_q = Q + i_s * stride_qs + i_h * stride_qh
        p_do = DO + i_s * stride_dos + i_h * stride_doh
        p_lse = LSE + (i_s * H + i_h) * Tq
        p_delta = DELTA + (i_s * H + i_h) * Tq
        if TAIL_M == BLOCK_M:
            # A last tile as wide as the others: one masked loop. A loop and a separate last tile
            # cost registers here (dk/dv spilled at d = 128 on sm_90 with triton 3.6).
            for start_m in range(0, Tq, BLOCK_M):
                b_dk, b_dv = _dkdv_tile(
                    b_k, b_v, b_dk, b_dv, m_n, p_q, p_do, p_lse, p_delta, start_m, Tq,
                    stride_qt, stride_qd, stride_dot, stride_dod, qk_scale,
                    HEAD_DIM, BLOCK_M, BLOCK_D, True, UPCAST, DOT,
                )
        else:
            # Full query tiles without a mask, then the rest in a tile only as wide as it needs.
            for start_m in range(0, m_full, BLOCK_M):
                b_dk, b_dv = _dkdv_tile(
                    b_k, b_v, b_dk, b_dv, m_n, p_q, p_do, p_lse, p_delta, start_m, Tq,
                    stride_qt, stride_qd, stride_dot, stride_dod, qk_scale,
                    HEAD_DIM, BLOCK_M, BLOCK_D, False, UPCAST, DOT,
                )
            if TAIL_M > 0:
                b_dk, b_dv = _dkdv_tile(
                    b_k, b_v, b_dk, b_dv, m_n, p_q, p_do, p_lse, p_delta, m_full, Tq,
                    stride_qt, stride_qd, stride_dot, stride_dod, qk_scale,
                    HEAD_DIM, TAIL_M, BLOCK_D, True, UPCAST, DOT,
                )

    store_rows(p_dk, b_dk * scale, start_n, Tk, stride_dkt, stride_dkd, HEAD_DIM, COLS, BLOCK_D)
    store_rows(p_dv, b_dv, start_n, Tk, stride_dvt, stride_dvd, HEAD_DIM, COLS, BLOCK_D)


@triton.jit
def _shared_attention_bwd_dkdv_kernel(
    Q,  # (Sq, Tq, H, d), any strides
    K,  # (Skv, Tk, H, d), any strides
    V,  # (Skv, Tk, H, d), any strides
    DO,  # (Sq, Tq, H, d), any strides
    LSE,  # (Sq, H, Tq) fp32, contiguous, base 2
    DELTA,  # (Sq, H, Tq) fp32, contiguous
    KV_OFFSETS,  # (Skv + 1,) int64: query ids of K/V sequence j are KV_QUERIES[KV_OFFSETS[j]:KV_OFFSETS[j+1]]
    KV_QUERIES,  # (Sq,) int64: query sequence ids sorted by kv_index
    DK,  # (Skv, Tk, H, d), any strides
    DV,  # (Skv, Tk, H, d), any strides
    stride_qs, stride_qt, stride_qh, stride_qd,
    stride_ks, stride_kt, stride_kh, stride_kd,
    stride_vs, stride_vt, stride_vh, stride_vd,
    stride_dos, stride_dot, stride_doh, stride_dod,
    stride_dks, stride_dkt, stride_dkh, stride_dkd,
    stride_dvs, stride_dvt, stride_dvh, stride_dvd,
    H, Tq, Tk, scale,
    qk_scale,  # scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TAIL_M: tl.constexpr,  # width of the last, partial query tile (0: BLOCK_M divides Tq)
    TAIL_N: tl.constexpr,  # keys of the last program when Tk leaves a partial tile (0: none)
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT: tl.constexpr,
    HEADS_OUTER: tl.constexpr,  # program order, see `_common.launch_grid`
):
    """One program: BLOCK_N keys of K/V sequence j, head h (TAIL_N for the last partial tile);
    grid `_common.launch_grid(HEADS_OUTER, Tk, BLOCK_N, Skv, H)`."""
    i_n, i_j, i_h = program_tile(Tk, H, BLOCK_N, HEADS_OUTER)
    p_k = K + i_j * stride_ks + i_h * stride_kh
    p_v = V + i_j * stride_vs + i_h * stride_vh
    p_dk = DK + i_j * stride_dks + i_h * stride_dkh
    p_dv = DV + i_j * stride_dvs + i_h * stride_dvh
    q_start = tl.load(KV_OFFSETS + i_j)
    q_end = tl.load(KV_OFFSETS + i_j + 1)
    start_n = i_n * BLOCK_N
    # A narrow last tile is compiled as a branch of its own: block shapes are compile-time constants.
    if TAIL_N > 0 and TAIL_N < BLOCK_N:
        if start_n + BLOCK_N > Tk:
            _dkdv_cols(
                Q, DO, LSE, DELTA, KV_QUERIES, p_k, p_v, p_dk, p_dv, q_start, q_end, i_h, H, start_n, Tq, Tk,
                scale, qk_scale, stride_qs, stride_qt, stride_qh, stride_qd, stride_kt, stride_kd, stride_vt,
                stride_vd, stride_dos, stride_dot, stride_doh, stride_dod, stride_dkt, stride_dkd, stride_dvt,
                stride_dvd, HEAD_DIM, TAIL_N, BLOCK_M, TAIL_M, BLOCK_D, UPCAST, DOT,
            )
        else:
            _dkdv_cols(
                Q, DO, LSE, DELTA, KV_QUERIES, p_k, p_v, p_dk, p_dv, q_start, q_end, i_h, H, start_n, Tq, Tk,
                scale, qk_scale, stride_qs, stride_qt, stride_qh, stride_qd, stride_kt, stride_kd, stride_vt,
                stride_vd, stride_dos, stride_dot, stride_doh, stride_dod, stride_dkt, stride_dkd, stride_dvt,
                stride_dvd, HEAD_DIM, BLOCK_N, BLOCK_M, TAIL_M, BLOCK_D, UPCAST, DOT,
            )
    else:
        _dkdv_cols(
            Q, DO, LSE, DELTA, KV_QUERIES, p_k, p_v, p_dk, p_dv, q_start, q_end, i_h, H, start_n, Tq, Tk,
            scale, qk_scale, stride_qs, stride_qt, stride_qh, stride_qd, stride_kt, stride_kd, stride_vt,
            stride_vd, stride_dos, stride_dot, stride_doh, stride_dod, stride_dkt, stride_dkd, stride_dvt,
            stride_dvd, HEAD_DIM, BLOCK_N, BLOCK_M, TAIL_M, BLOCK_D, UPCAST, DOT,
        )


# Skv only bounds a clamp: specializing on its value would compile more variants for nothing.
@triton.jit(do_not_specialize=["Skv"])
def _shared_attention_bwd_dq_kernel(
    Q,  # (Sq, Tq, H, d), any strides
    K,  # (Skv, Tk, H, d), any strides
    V,  # (Skv, Tk, H, d), any strides
    O,  # (Sq, Tq, H, d), any strides: the forward's output
    DO,  # (Sq, Tq, H, d), any strides (stride 0 after an expand)
    LSE,  # (Sq, H, Tq) fp32, contiguous, base 2
    DELTA,  # (Sq, H, Tq) fp32, contiguous: written here, read by the dk/dv kernel launched after
    KV_INDEX,  # (Sq,) int32/int64
    DQ,  # (Sq, Tq, H, d), any strides
    stride_qs, stride_qt, stride_qh, stride_qd,
    stride_ks, stride_kt, stride_kh, stride_kd,
    stride_vs, stride_vt, stride_vh, stride_vd,
    stride_os, stride_ot, stride_oh, stride_od,
    stride_dos, stride_dot, stride_doh, stride_dod,
    stride_dqs, stride_dqt, stride_dqh, stride_dqd,
    H, Skv, Tq, Tk, scale,
    qk_scale,  # scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TAIL_M: tl.constexpr,  # rows of the last program when Tq leaves a partial tile (0: none)
    TAIL_N: tl.constexpr,  # width of the last, partial key tile (0: BLOCK_N divides Tk)
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT: tl.constexpr,
    HEADS_OUTER: tl.constexpr,  # program order, see `_common.launch_grid`
):
    """One program: BLOCK_M query rows of sequence s, head h (TAIL_M for the last partial tile);
    grid `_common.launch_grid(HEADS_OUTER, Tq, BLOCK_M, Sq, H)`. Also stores delta of those rows for
    the dk/dv kernel."""
    i_m, i_s, i_h = program_tile(Tq, H, BLOCK_M, HEADS_OUTER)
    # Clamped: an unchecked out-of-range map (compiled path) reads a wrong sequence, never outside K/V.
    i_kv = tl.minimum(tl.maximum(tl.load(KV_INDEX + i_s).to(tl.int64), 0), Skv - 1)
    p_q = Q + i_s * stride_qs + i_h * stride_qh
    p_k = K + i_kv * stride_ks + i_h * stride_kh
    p_v = V + i_kv * stride_vs + i_h * stride_vh
    p_o = O + i_s * stride_os + i_h * stride_oh
    p_do = DO + i_s * stride_dos + i_h * stride_doh
    p_dq = DQ + i_s * stride_dqs + i_h * stride_dqh
    p_lse = LSE + (i_s * H + i_h) * Tq
    p_delta = DELTA + (i_s * H + i_h) * Tq
    start_m = i_m * BLOCK_M
    # A narrow last tile is compiled as a branch of its own: block shapes are compile-time constants.
    if TAIL_M > 0 and TAIL_M < BLOCK_M:
        if start_m + BLOCK_M > Tq:
            _dq_rows(
                p_q, p_k, p_v, p_o, p_do, p_dq, p_lse, p_delta, start_m, Tq, Tk, scale, qk_scale,
                stride_qt, stride_qd, stride_kt, stride_kd, stride_vt, stride_vd, stride_ot, stride_od,
                stride_dot, stride_dod, stride_dqt, stride_dqd,
                HEAD_DIM, TAIL_M, BLOCK_N, TAIL_N, BLOCK_D, UPCAST, DOT,
            )
        else:
            _dq_rows(
                p_q, p_k, p_v, p_o, p_do, p_dq, p_lse, p_delta, start_m, Tq, Tk, scale, qk_scale,
                stride_qt, stride_qd, stride_kt, stride_kd, stride_vt, stride_vd, stride_ot, stride_od,
                stride_dot, stride_dod, stride_dqt, stride_dqd,
                HEAD_DIM, BLOCK_M, BLOCK_N, TAIL_N, BLOCK_D, UPCAST, DOT,
            )
    else:
        _dq_rows(
            p_q, p_k, p_v, p_o, p_do, p_dq, p_lse, p_delta, start_m, Tq, Tk, scale, qk_scale,
            stride_qt, stride_qd, stride_kt, stride_kd, stride_vt, stride_vd, stride_ot, stride_od,
            stride_dot, stride_dod, stride_dqt, stride_dqd,
            HEAD_DIM, BLOCK_M, BLOCK_N, TAIL_N, BLOCK_D, UPCAST, DOT,
        )


# fmt: on


@_common.memoize_per_shape
def kernel_configs(Tq: int, Tk: int, d: int, dtype: torch.dtype) -> dict:
    """{"bwd_dq" | "bwd_dkdv": (kernel, meta)}: the kernels the launcher runs at these sizes and dtype,
    in this order, and their compile-time arguments (constexprs, num_warps, num_stages). Also read by
    ahead-of-time compiles (`fastvit_style.benchmark.gpu_compile`)."""
    dq = _common.attention_blocks("bwd_dq", Tq, Tk, d, dtype)
    dkdv = _common.attention_blocks("bwd_dkdv", Tq, Tk, d, dtype)
    return {
        "bwd_dq": (_shared_attention_bwd_dq_kernel, _common.launch_meta(dq, d, Tq, Tk, dtype)),
        "bwd_dkdv": (
            _shared_attention_bwd_dkdv_kernel,
            _common.launch_meta(dkdv, d, Tq, Tk, dtype, owns_keys=True),
        ),
    }


def shared_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_index: torch.Tensor,
    kv_offsets: torch.Tensor,
    kv_queries: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward.

    do, out: (Sq, Tq, H, d) in q's dtype, any strides; q, k, v, kv_index as for the forward;
    lse: (Sq, H, Tq) fp32 from the forward (base 2). The inverse of kv_index in CSR form:
    kv_offsets (Skv + 1,) int64 and kv_queries (Sq,) int64, the query ids of K/V sequence j being
    kv_queries[kv_offsets[j]:kv_offsets[j + 1]]. lse and the inverse map may have any strides.
    Returns dq (Sq, Tq, H, d) and dk, dv (Skv, Tk, H, d), contiguous, in q's dtype.
    Two launches (dq, then dk/dv), or one where `_common.ONE_LAUNCH_BACKWARD_MIN_PROGRAMS` says so.
    """
    scale = _common.check_attention_inputs(q, k, v, kv_index, scale)
    Sq, Tq, H, d = q.shape
    Skv, Tk = k.shape[:2]
    _common.check_tensor("do", do, q.shape, (q.dtype,), q.device)
    _common.check_tensor("out", out, q.shape, (q.dtype,), q.device)
    _common.check_tensor("lse", lse, (Sq, H, Tq), (torch.float32,), q.device)
    _common.check_tensor("kv_offsets", kv_offsets, (Skv + 1,), (torch.int64,), q.device)
    _common.check_tensor("kv_queries", kv_queries, (Sq,), (torch.int64,), q.device)
    do, q, k, v, out = (
        _common.int32_addressable(n, t) for n, t in (("do", do), ("q", q), ("k", k), ("v", v), ("out", out))
    )

    dq = torch.empty((Sq, Tq, H, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((Skv, Tk, H, d), dtype=q.dtype, device=q.device)
    dv = torch.empty((Skv, Tk, H, d), dtype=q.dtype, device=q.device)
    if dk.numel() == 0:
        return dq, dk, dv
    if dq.numel() == 0:
        # No query reads K/V: their gradients are zero (the kernels need Tq >= 1 to launch).
        return dq, dk.zero_(), dv.zero_()

    # The kernels read these as plain arrays (entry i at base + i): any layout in, contiguous copies read.
    lse, kv_offsets, kv_queries = lse.contiguous(), kv_offsets.contiguous(), kv_queries.contiguous()
    with _common.on_device(q):
        _launch(do, q, k, v, out, lse, kv_index, kv_offsets, kv_queries, dq, dk, dv, scale)
    return dq, dk, dv


def _launch(do, q, k, v, out, lse, kv_index, kv_offsets, kv_queries, dq, dk, dv, scale) -> None:
    """Fill dq, dk, dv: the one-launch kernel where `_common.ONE_LAUNCH_BACKWARD_MIN_PROGRAMS` says so
    and it applies, else the dq and dk/dv kernels; the arguments as `shared_attention_bwd` checked and
    allocated them."""
    Sq, Tq, H, d = q.shape
    Skv, Tk = k.shape[:2]
    one_launch = _common.ONE_LAUNCH_BACKWARD_MIN_PROGRAMS
    if one_launch is not None and Skv * H >= one_launch:
        fused = fused_kernel_configs(Tq, Tk, d, q.dtype).get("bwd_fused")
        if fused is not None:
            launch_fused(do, q, k, v, out, lse, kv_offsets, kv_queries, dq, dk, dv, scale, fused[1])
            return
    delta = torch.empty((Sq, H, Tq), dtype=torch.float32, device=q.device)
    kernels = kernel_configs(Tq, Tk, d, q.dtype)
    qk_scale = scale * math.log2(math.e)

    # fmt: off
    kernel, meta = kernels["bwd_dq"]
    kernel[_common.launch_grid(meta["HEADS_OUTER"], Tq, meta["BLOCK_M"], Sq, H)](
        q, k, v, out, do, lse, delta, kv_index, dq,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *do.stride(), *dq.stride(),
        H, Skv, Tq, Tk, scale, qk_scale, **meta,
    )
    kernel, meta = kernels["bwd_dkdv"]
    kernel[_common.launch_grid(meta["HEADS_OUTER"], Tk, meta["BLOCK_N"], Skv, H)](
        q, k, v, do, lse, delta, kv_offsets, kv_queries, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        H, Tq, Tk, scale, qk_scale, **meta,
    )
    # fmt: on
