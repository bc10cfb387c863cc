"""Backward of the weight-shared attention: dq, dk, dv without atomics.

With P = softmax(S), S = scale * q k^T (per query sequence s and its K/V sequence j = kv_index[s]):
    dv[j] = sum_{s: kv_index[s]=j} P_s^T dO_s
    dS_s  = P_s * (dO_s v_j^T - delta_s),  delta_s = rowsum(dO_s * O_s)
    dk[j] = scale * sum_{s: kv_index[s]=j} dS_s^T q_s
    dq_s  = scale * dS_s k_j
P is rebuilt from the forward's log-sum-exp. One program owns each dk/dv tile and loops over the
query sequences that read its K/V sequence (the inverse map, CSR form), so the sums are
deterministic; dq has its own kernel, launched first, one program per query tile, which also
stores delta for the dk/dv kernel (two launches in all) and streams the keys in full
tiles without a mask and ends with one tile only as wide as the rest needs (`_common.tail_width`).
The dk/dv kernel keeps one masked loop over query tiles (a narrow tail would save less there, 224
to 208 streamed rows at T=197 with 32-row tiles; not tried on a GPU yet).
"""

import math

import torch
import triton
import triton.language as tl

from . import _common
from ._tiles import load_rows_t


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
):
    """Add keys [start_n, start_n + BLOCK_N) to b_dq (not yet scaled) and return it."""
    # [BLOCK_D, BLOCK_N]
    b_kt = load_rows_t(p_k, start_n, Tk, stride_kt, stride_kd, HEAD_DIM, BLOCK_N, BLOCK_D, MASK_N, UPCAST)
    b_vt = load_rows_t(p_v, start_n, Tk, stride_vt, stride_vd, HEAD_DIM, BLOCK_N, BLOCK_D, MASK_N, UPCAST)
    # [BLOCK_M, BLOCK_N]
    b_p = tl.exp2(tl.dot(b_q, b_kt) * qk_scale - b_lse[:, None])
    if MASK_N:
        b_p = tl.where(m_m[:, None] & (start_n + tl.arange(0, BLOCK_N) < Tk)[None, :], b_p, 0.0)
    else:
        b_p = tl.where(m_m[:, None], b_p, 0.0)
    b_ds = b_p * (tl.dot(b_do, b_vt) - b_delta[:, None])
    return tl.dot(b_ds.to(b_kt.dtype), tl.trans(b_kt), b_dq)


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
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One program: BLOCK_N keys of K/V sequence j, head h; grid (cdiv(Tk, BLOCK_N), Skv * H).

    Works on transposed score tiles [BLOCK_N, BLOCK_M] so that dk/dv come out of plain dots.
    """
    i_n = tl.program_id(0)
    i_jh = tl.program_id(1)
    i_j = (i_jh // H).to(tl.int64)
    i_h = i_jh % H

    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_m = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_n = o_n < Tk
    m_d = o_d < HEAD_DIM
    m_nd = m_n[:, None] & m_d[None, :]

    p_k = K + i_j * stride_ks + i_h * stride_kh + o_n[:, None] * stride_kt + o_d[None, :] * stride_kd
    p_v = V + i_j * stride_vs + i_h * stride_vh + o_n[:, None] * stride_vt + o_d[None, :] * stride_vd
    # [BLOCK_N, BLOCK_D]
    b_k = tl.load(p_k, mask=m_nd, other=0.0)
    b_v = tl.load(p_v, mask=m_nd, other=0.0)
    if UPCAST:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # An unused K/V sequence has an empty range and stores zeros.
    q_start = tl.load(KV_OFFSETS + i_j)
    q_end = tl.load(KV_OFFSETS + i_j + 1)
    for i_q in range(q_start, q_end):
        i_s = tl.load(KV_QUERIES + i_q).to(tl.int64)
        p_qt = Q + i_s * stride_qs + i_h * stride_qh + o_d[:, None] * stride_qd + o_m[None, :] * stride_qt
        p_do = (
            DO + i_s * stride_dos + i_h * stride_doh + o_m[:, None] * stride_dot + o_d[None, :] * stride_dod
        )
        p_row = (i_s * H + i_h) * Tq + o_m
        for start_m in range(0, Tq, BLOCK_M):
            m_m = start_m + o_m < Tq
            # [BLOCK_D, BLOCK_M]
            b_qt = tl.load(p_qt + start_m * stride_qt, mask=m_d[:, None] & m_m[None, :], other=0.0)
            # [BLOCK_M, BLOCK_D]
            b_do = tl.load(p_do + start_m * stride_dot, mask=m_m[:, None] & m_d[None, :], other=0.0)
            if UPCAST:
                b_qt = b_qt.to(tl.float32)
                b_do = b_do.to(tl.float32)
            # [BLOCK_M]
            b_lse = tl.load(LSE + p_row + start_m, mask=m_m, other=0.0)
            b_delta = tl.load(DELTA + p_row + start_m, mask=m_m, other=0.0)
            # [BLOCK_N, BLOCK_M]; padded rows and columns are zeroed so that no overflow of
            # exp2 on padding can reach a stored element.
            b_pt = tl.exp2(tl.dot(b_k, b_qt) * qk_scale - b_lse[None, :])
            b_pt = tl.where(m_n[:, None] & m_m[None, :], b_pt, 0.0)
            b_dv = tl.dot(b_pt.to(b_do.dtype), b_do, b_dv)
            b_dpt = tl.dot(b_v, tl.trans(b_do))
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            b_dk = tl.dot(b_dst.to(b_qt.dtype), tl.trans(b_qt), b_dk)

    p_dk = DK + i_j * stride_dks + i_h * stride_dkh + o_n[:, None] * stride_dkt + o_d[None, :] * stride_dkd
    p_dv = DV + i_j * stride_dvs + i_h * stride_dvh + o_n[:, None] * stride_dvt + o_d[None, :] * stride_dvd
    tl.store(p_dk, (b_dk * scale).to(DK.dtype.element_ty), mask=m_nd)
    tl.store(p_dv, b_dv.to(DV.dtype.element_ty), mask=m_nd)


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
    TAIL_N: tl.constexpr,  # width of the last, partial key tile (0: BLOCK_N divides Tk)
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One program: BLOCK_M query rows of sequence s, head h; grid (cdiv(Tq, BLOCK_M), Sq * H).
    Also stores delta of those rows for the dk/dv kernel."""
    i_m = tl.program_id(0)
    i_sh = tl.program_id(1)
    i_s = (i_sh // H).to(tl.int64)
    i_h = i_sh % H
    # Clamped: an unchecked out-of-range map (compiled path) reads a wrong sequence, never outside K/V.
    i_kv = tl.minimum(tl.maximum(tl.load(KV_INDEX + i_s).to(tl.int64), 0), Skv - 1)

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m = o_m < Tq
    m_d = o_d < HEAD_DIM
    m_md = m_m[:, None] & m_d[None, :]

    p_q = Q + i_s * stride_qs + i_h * stride_qh + o_m[:, None] * stride_qt + o_d[None, :] * stride_qd
    p_do = DO + i_s * stride_dos + i_h * stride_doh + o_m[:, None] * stride_dot + o_d[None, :] * stride_dod
    # [BLOCK_M, BLOCK_D]
    b_q = tl.load(p_q, mask=m_md, other=0.0)
    b_do = tl.load(p_do, mask=m_md, other=0.0)
    if UPCAST:
        b_q = b_q.to(tl.float32)
        b_do = b_do.to(tl.float32)
    # [BLOCK_M]
    b_lse = tl.load(LSE + i_sh.to(tl.int64) * Tq + o_m, mask=m_m, other=0.0)
    # delta = rowsum(dO * O) of the owned rows, here rather than in a launch of its own.
    p_o = O + i_s * stride_os + i_h * stride_oh + o_m[:, None] * stride_ot + o_d[None, :] * stride_od
    b_delta = tl.sum(tl.load(p_o, mask=m_md, other=0.0).to(tl.float32) * b_do.to(tl.float32), 1)
    tl.store(DELTA + i_sh.to(tl.int64) * Tq + o_m, b_delta, mask=m_m)
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    p_k = K + i_kv * stride_ks + i_h * stride_kh
    p_v = V + i_kv * stride_vs + i_h * stride_vh
    n_full = Tk - Tk % BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        b_dq = _dq_tile(
            b_q, b_do, b_lse, b_delta, b_dq, m_m, p_k, p_v, start_n, Tk,
            stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
            HEAD_DIM, BLOCK_N, BLOCK_D, False, UPCAST,
        )
    if TAIL_N > 0:
        b_dq = _dq_tile(
            b_q, b_do, b_lse, b_delta, b_dq, m_m, p_k, p_v, n_full, Tk,
            stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
            HEAD_DIM, TAIL_N, BLOCK_D, True, UPCAST,
        )

    p_dq = DQ + i_s * stride_dqs + i_h * stride_dqh + o_m[:, None] * stride_dqt + o_d[None, :] * stride_dqd
    tl.store(p_dq, (b_dq * scale).to(DQ.dtype.element_ty), mask=m_md)


# fmt: on


@_common.memoize_per_shape
def kernel_configs(Tq: int, Tk: int, d: int, dtype: torch.dtype) -> dict:
    """{"bwd_dq" | "bwd_dkdv": (kernel, meta)}: the kernels the launcher runs at these sizes and dtype,
    in this order, and their compile-time arguments (constexprs, num_warps, num_stages). Also read by
    ahead-of-time compiles (`fastvit_style.benchmark.gpu_compile`)."""
    dq = _common.attention_blocks("bwd_dq", Tq, Tk, d, dtype)
    dkdv = _common.attention_blocks("bwd_dkdv", Tq, Tk, d, dtype)
    return {
        "bwd_dq": (_shared_attention_bwd_dq_kernel, _common.launch_meta(dq, d, streamed=Tk)),
        "bwd_dkdv": (_shared_attention_bwd_dkdv_kernel, _common.launch_meta(dkdv, d)),
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
    kv_queries[kv_offsets[j]:kv_offsets[j + 1]].
    Returns dq (Sq, Tq, H, d) and dk, dv (Skv, Tk, H, d), contiguous, in q's dtype.
    """
    _common.check_attention_inputs(q, k, v, kv_index)
    Sq, Tq, H, d = q.shape
    Skv, Tk = k.shape[:2]
    _common.check_tensor("do", do, q.shape, (q.dtype,), q.device)
    _common.check_tensor("out", out, q.shape, (q.dtype,), q.device)
    _common.check_tensor("lse", lse, (Sq, H, Tq), (torch.float32,), q.device)
    _common.check_tensor("kv_offsets", kv_offsets, (Skv + 1,), (torch.int64,), q.device)
    _common.check_tensor("kv_queries", kv_queries, (Sq,), (torch.int64,), q.device)

    dq = torch.empty((Sq, Tq, H, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((Skv, Tk, H, d), dtype=q.dtype, device=q.device)
    dv = torch.empty((Skv, Tk, H, d), dtype=q.dtype, device=q.device)
    if dk.numel() == 0:
        return dq, dk, dv
    if dq.numel() == 0:
        # No query reads K/V: their gradients are zero (the kernels need Tq >= 1 to launch).
        return dq, dk.zero_(), dv.zero_()

    lse = lse.contiguous()
    delta = torch.empty((Sq, H, Tq), dtype=torch.float32, device=q.device)
    kernels = kernel_configs(Tq, Tk, d, q.dtype)
    qk_scale = scale * math.log2(math.e)

    # fmt: off
    kernel, meta = kernels["bwd_dq"]
    kernel[(_common.cdiv(Tq, meta["BLOCK_M"]), Sq * H)](
        q, k, v, out, do, lse, delta, kv_index, dq,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *do.stride(), *dq.stride(),
        H, Skv, Tq, Tk, scale, qk_scale, **meta,
    )
    kernel, meta = kernels["bwd_dkdv"]
    kernel[(_common.cdiv(Tk, meta["BLOCK_N"]), Skv * H)](
        q, k, v, do, lse, delta, kv_offsets, kv_queries, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        H, Tq, Tk, scale, qk_scale, **meta,
    )
    # fmt: on
    return dq, dk, dv
