"""PyTorch path of shared_attention: gather K/V per query sequence, then SDPA.

Plain torch ops only, so autocast, autograd and torch.compile(fullgraph=True) see through it.
shared_attention_torch, evaluated in float64, is the reference the Triton kernels are tested against;
shared_attention_sliced, the CPU backend, reads K/V slices in place where the map allows it.
"""

import torch
import torch.nn.functional as F

from ..tracing import forward_ad_active, traced


def shared_attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor, scale: float
) -> torch.Tensor:
    """q: (Sq, Tq, H, d); k, v: (Skv, Tk, H, d); kv_index: (Sq,) int32/int64 -> (Sq, Tq, H, d) in q's dtype.

    K/V are duplicated per query sequence (Sq x Tk x H x d each); their gradients are summed back
    by index_select's backward.
    """
    out = _sdpa(q, k.index_select(0, kv_index), v.index_select(0, kv_index), scale)
    return carry_nan_rows(out, q, k, kv_index)


# Most SDPA calls the sliced path makes for one op call; the model's maps take at most 3 (the roll).
_MAX_RUNS = 3
# Longest map the sliced path reads on the host (a Python loop): far beyond the model's 3B sequences.
_MAX_READ = 4096


def shared_attention_sliced(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor, scale: float
) -> torch.Tensor:
    """shared_attention_torch with K/V read in place where kv_index is a few runs of consecutive K/V
    sequences: one SDPA call per run over a slice of k and v, no gather. The model's maps are such
    runs (identity; [0..2B, B..2B] with explicit styles; the roll), and the gathers were about 3% of
    a CPU eval call. Taken where the map is read without a device sync (CPU, eager) and, under
    autograd, for one run only (a slice's backward is as cheap as the gather's; several would each
    allocate a full dK/dV). Same shapes, dtypes and numbers as shared_attention_torch."""
    runs = None
    if kv_index.device.type == "cpu" and kv_index.numel() <= _MAX_READ and not traced(q, k, v, kv_index):
        runs = _consecutive_runs(kv_index.tolist(), k.shape[0], 1 if torch.is_grad_enabled() else _MAX_RUNS)
    if not runs:  # None, or no query sequence
        return shared_attention_torch(q, k, v, kv_index, scale)
    outs = []
    for start, first, n in runs:
        kv = slice(first, first + n)
        k_run, v_run = (k, v) if n == k.shape[0] else (k[kv], v[kv])
        outs.append(_sdpa(q[start : start + n], k_run, v_run, scale))
    return carry_nan_rows(outs[0] if len(outs) == 1 else torch.cat(outs), q, k, kv_index)


def _consecutive_runs(index: list[int], n_kv: int, most: int) -> list[tuple[int, int, int]] | None:
    """(first query sequence, first K/V sequence, length) of each run of consecutive K/V sequences in
    index, or None where there are more than `most` or an entry is out of [0, n_kv) (the gather then
    raises its own error)."""
    runs = []
    for s, j in enumerate(index):
        if not 0 <= j < n_kv:
            return None
        if runs and runs[-1][1] + runs[-1][2] == j:
            start, first, n = runs[-1]
            runs[-1] = (start, first, n + 1)
        elif len(runs) == most:
            return None
        else:
            runs.append((s, j, 1))
    return runs


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA on (S, T, H, d) views, whose sequences pair up one to one -> (S, Tq, H, d). Under forward-mode
    AD (torch.func.jvp, dual tensors) SDPA's math composite, the one SDPA kernel with a forward
    derivative (the fused ones raise NotImplementedError)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if forward_ad_active():
        return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, scale=scale)[0].transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)


def carry_nan_rows(
    out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, kv_index: torch.Tensor
) -> torch.Tensor:
    """out (S, T, H, d), a fused kernel's fresh output, with NaN in every row the formula makes NaN
    where SDPA's CPU kernels give zeros (their running max skips NaN, and a row of no logit above -inf
    reads as masked), as the Triton kernels do: rows whose query row holds a NaN or inf, and rows of a
    head whose K/V sequence has a NaN or inf in every key (each logit is then NaN or +-inf; while a
    key is finite, so is its logit and SDPA is right). Zero times the query row's largest magnitude
    carries the first (a sum could overflow a finite fp16 row, and CUDA autocast would widen it); in
    place where autograd does not need the kernel's output. On the CPU in eager mode it is skipped
    where the sums of q and k are finite (no NaN or inf in them; finite values whose sum overflows
    take the long way): two reductions, read without a sync, instead of maps of |q| and k (the carrier
    was 3% of a CPU eval call)."""
    if q.device.type == "cpu" and not traced(out, q, k) and torch.isfinite(_total(q) + _total(k)):
        return out
    no_finite_key = k.detach().isfinite().all(-1).any(1).logical_not().index_select(0, kv_index)  # (S, H)
    # amax's backward reads its output: not in place.
    carrier = (q.abs().amax(-1, keepdim=True) * 0).masked_fill(
        no_finite_key.unsqueeze(-1).unsqueeze(1), float("nan")
    )
    # Traced, one op whatever the grad mode: torch.jit.trace checks its graph by tracing again under no_grad.
    return out + carrier if torch.is_grad_enabled() or traced(out) else out.add_(carrier)


def _total(t: torch.Tensor) -> torch.Tensor:
    """The sum of t, over tokens first: a whole sum of the projections' strided views (the model's q
    and k) takes about twice as long on the CPU."""
    return t.detach().sum(1).sum()
