"""Forward of the weight-shared attention: out[s] = softmax(q[s] k[j]^T * scale) v[j], j = kv_index[s].

Online softmax (FlashAttention-2) over all Tk keys of the mapped K/V sequence, no mask; the
log-sum-exp of each query row is kept for the backward. No Tq x Tk matrix is materialised.
"""

import math

import torch
import triton
import triton.language as tl

from . import _common
from ._tiles import gpu_rounded, load_rows, load_rows_t, program_tile, store_rows


# Kernel signatures keep the four strides of each tensor on one line.
# fmt: off
@triton.jit
def _fwd_tile(
    b_q, b_max, b_sum, b_acc,  # running state of the online softmax of BLOCK_M query rows
    p_k, p_v,  # K, V of this (sequence, head) at key 0
    start_n, Tk, stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_N: tl.constexpr,  # the tile reaches past Tk
    UPCAST: tl.constexpr,
    DOT: tl.constexpr,
):
    """Fold keys [start_n, start_n + BLOCK_N) into (b_max, b_sum, b_acc) and return them."""
    m_n = start_n + tl.arange(0, BLOCK_N) < Tk
    # [BLOCK_D, BLOCK_N]: K is read transposed so that q @ k^T is a plain dot.
    b_kt = load_rows_t(p_k, start_n, Tk, stride_kt, stride_kd, HEAD_DIM, BLOCK_N, BLOCK_D, MASK_N, UPCAST)
    # [BLOCK_N, BLOCK_D]
    b_v = load_rows(p_v, start_n, Tk, stride_vt, stride_vd, HEAD_DIM, BLOCK_N, BLOCK_D, MASK_N, UPCAST)
    # [BLOCK_M, BLOCK_N]
    b_s = tl.dot(b_q, b_kt, input_precision=DOT) * qk_scale
    if MASK_N:
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
    b_max_new = tl.maximum(b_max, tl.max(b_s, 1))
    # A row whose keys so far all have logit -inf (a -inf in K) has no finite max to shift by:
    # exp2(-inf - -inf) would make it NaN for good. Shifted by 0 instead, they weigh exactly 0.
    b_shift = tl.where(b_max_new == float("-inf"), 0.0, b_max_new)
    b_alpha = tl.exp2(b_max - b_shift)
    b_p = tl.exp2(b_s - b_shift[:, None])
    b_sum = b_sum * b_alpha + tl.sum(b_p, 1)
    b_acc = tl.dot(gpu_rounded(b_p, p_v, UPCAST).to(b_v.dtype), b_v, b_acc * b_alpha[:, None], input_precision=DOT)
    return b_max_new, b_sum, b_acc


@triton.jit
def _fwd_rows(
    p_q, p_k, p_v, p_o,  # this (sequence, head) of Q, K, V and O at row 0
    p_lse,  # its Tq log-sum-exps
    start_m, Tq, Tk,
    stride_qt, stride_qd, stride_kt, stride_kd, stride_vt, stride_vd, stride_ot, stride_od,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TAIL_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT: tl.constexpr,
):
    """Store the output and log-sum-exp of query rows [start_m, start_m + ROWS)."""
    # [ROWS, BLOCK_D]
    b_q = load_rows(p_q, start_m, Tq, stride_qt, stride_qd, HEAD_DIM, ROWS, BLOCK_D, True, UPCAST)
    # [ROWS]
    b_max = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    b_sum = tl.zeros([ROWS], dtype=tl.float32)
    # [ROWS, BLOCK_D]
    b_acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    if TAIL_N == BLOCK_N:
        # A last tile as wide as the others: one masked loop. A loop and a separate last tile of its
        # width spilled in exact fp32 on sm_90 (up to 728 bytes at Tk = 49 and 81, d = 64).
        for start_n in range(0, Tk, BLOCK_N):
            b_max, b_sum, b_acc = _fwd_tile(
                b_q, b_max, b_sum, b_acc, p_k, p_v, start_n, Tk, stride_kt, stride_kd, stride_vt,
                stride_vd, qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D, True, UPCAST, DOT,
            )
    else:
        # Full tiles without a key mask, then the rest of Tk in a tile only as wide as it needs (197 =
        # 3 x 64 + 16 rather than 4 x 64: a fifth less matmul work at the released length).
        n_full = Tk - Tk % BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            b_max, b_sum, b_acc = _fwd_tile(
                b_q, b_max, b_sum, b_acc, p_k, p_v, start_n, Tk, stride_kt, stride_kd, stride_vt,
                stride_vd, qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D, False, UPCAST, DOT,
            )
        if TAIL_N > 0:
            b_max, b_sum, b_acc = _fwd_tile(
                b_q, b_max, b_sum, b_acc, p_k, p_v, n_full, Tk, stride_kt, stride_kd, stride_vt,
                stride_vd, qk_scale, HEAD_DIM, TAIL_N, BLOCK_D, True, UPCAST, DOT,
            )

    store_rows(p_o, b_acc / b_sum[:, None], start_m, Tq, stride_ot, stride_od, HEAD_DIM, ROWS, BLOCK_D)
    o_m = start_m + tl.arange(0, ROWS)
    m_m = o_m < Tq
    # Kept in base 2 (log2 sum_j 2^(qk_scale q.k_j) = log2(e) * natural lse), the units the backward
    # rebuilds P in: a round trip through the natural log would cost an ulp of the largest logit.
    tl.store(p_lse + o_m, b_max + tl.log2(b_sum), mask=m_m)


# Skv only bounds a clamp: specializing on its value would compile more variants for nothing.
@triton.jit(do_not_specialize=["Skv"])
def _shared_attention_fwd_kernel(
    Q,  # (Sq, Tq, H, d), any strides
    K,  # (Skv, Tk, H, d), any strides
    V,  # (Skv, Tk, H, d), any strides
    KV_INDEX,  # (Sq,) int32/int64
    O,  # (Sq, Tq, H, d), any strides
    LSE,  # (Sq, H, Tq) fp32, contiguous: log-sum-exp of the scaled logits, in base 2
    stride_qs, stride_qt, stride_qh, stride_qd,
    stride_ks, stride_kt, stride_kh, stride_kd,
    stride_vs, stride_vt, stride_vh, stride_vd,
    stride_os, stride_ot, stride_oh, stride_od,
    H, Skv, Tq, Tk,
    qk_scale,  # scale * log2(e): logits in base-2 units so the exponentials are exp2
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
    grid `_common.launch_grid(HEADS_OUTER, Tq, BLOCK_M, Sq, H)`."""
    i_m, i_s, i_h = program_tile(Tq, H, BLOCK_M, HEADS_OUTER)
    # Clamped: an unchecked out-of-range map (compiled path) reads a wrong sequence, never outside K/V.
    i_kv = tl.minimum(tl.maximum(tl.load(KV_INDEX + i_s).to(tl.int64), 0), Skv - 1)
    p_q = Q + i_s * stride_qs + i_h * stride_qh
    p_k = K + i_kv * stride_ks + i_h * stride_kh
    p_v = V + i_kv * stride_vs + i_h * stride_vh
    p_o = O + i_s * stride_os + i_h * stride_oh
    p_lse = LSE + (i_s * H + i_h) * Tq
    start_m = i_m * BLOCK_M
    # A narrow last tile (197 = 3 x 64 + 16 rather than 4 x 64) is compiled as a branch of its own:
    # block shapes are compile-time constants.
    if TAIL_M > 0 and TAIL_M < BLOCK_M:
        if start_m + BLOCK_M > Tq:
            _fwd_rows(
                p_q, p_k, p_v, p_o, p_lse, start_m, Tq, Tk, stride_qt, stride_qd, stride_kt, stride_kd,
                stride_vt, stride_vd, stride_ot, stride_od, qk_scale,
                HEAD_DIM, TAIL_M, BLOCK_N, TAIL_N, BLOCK_D, UPCAST, DOT,
            )
        else:
            _fwd_rows(
                p_q, p_k, p_v, p_o, p_lse, start_m, Tq, Tk, stride_qt, stride_qd, stride_kt, stride_kd,
                stride_vt, stride_vd, stride_ot, stride_od, qk_scale,
                HEAD_DIM, BLOCK_M, BLOCK_N, TAIL_N, BLOCK_D, UPCAST, DOT,
            )
    else:
        _fwd_rows(
            p_q, p_k, p_v, p_o, p_lse, start_m, Tq, Tk, stride_qt, stride_qd, stride_kt, stride_kd,
            stride_vt, stride_vd, stride_ot, stride_od, qk_scale,
            HEAD_DIM, BLOCK_M, BLOCK_N, TAIL_N, BLOCK_D, UPCAST, DOT,
        )


# fmt: on


@_common.memoize_per_shape
def kernel_configs(Tq: int, Tk: int, d: int, dtype: torch.dtype) -> dict:
    """{"fwd": (kernel, meta)}: the kernel the launcher runs at these sizes and dtype, and its
    compile-time arguments (constexprs, num_warps, num_stages). Also read by ahead-of-time compiles
    (`fastvit_style.benchmark.gpu_compile`)."""
    blocks = _common.attention_blocks("fwd", Tq, Tk, d, dtype)
    meta = _common.launch_meta(blocks, d, Tq, Tk, dtype)
    return {"fwd": (_shared_attention_fwd_kernel, meta)}


def shared_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward.

    q: (Sq, Tq, H, d); k, v: (Skv, Tk, H, d); all one dtype in {fp32, fp16, bf16}, any strides.
    kv_index: (Sq,) int32/int64 with values in [0, Skv) (not checked here).
    Returns out (Sq, Tq, H, d) contiguous in q's dtype and lse (Sq, H, Tq) fp32, the log-sum-exp of
    each row of scaled logits in base 2 (log2(e) times the natural one).
    """
    scale = _common.check_attention_inputs(q, k, v, kv_index, scale)
    q, k, v = (_common.int32_addressable(n, t) for n, t in (("q", q), ("k", k), ("v", v)))
    Sq, Tq, H, d = q.shape
    Skv, Tk = k.shape[:2]
    out = torch.empty((Sq, Tq, H, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((Sq, H, Tq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    kernel, meta = kernel_configs(Tq, Tk, d, q.dtype)["fwd"]
    grid = _common.launch_grid(meta["HEADS_OUTER"], Tq, meta["BLOCK_M"], Sq, H)
    # fmt: off
    with _common.on_device(q):
        kernel[grid](
            q, k, v, kv_index, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            H, Skv, Tq, Tk, scale * math.log2(math.e), **meta,
        )
    # fmt: on
    return out, lse
