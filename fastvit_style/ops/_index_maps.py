"""What the op derives from the values of kv_index: its range check and its inverse map, each computed
once per map rather than once per call.

A model passes the same one or two maps to the attention of every layer, forward and backward.
- The range check is kept for as long as that very tensor is alive and unmodified (same object,
  same version counter). Writes that bypass the version counter (`.data`, numpy or DLPack aliases)
  are not seen: such an edited map goes unchecked, like a map on the compiled path, and the kernels
  clamp indices so that it reads the wrong K/V sequence rather than outside memory.
- The inverse map is shared by the autograd nodes of one graph that read the same map: taken in
  their forwards, computed by the first backward, dropped with the graph. A later forward never gets
  one a backward has used, so nothing is reused across training steps, where a map could have been
  rewritten behind the version counter (within one graph, that would break autograd's saved
  tensors as well). A backward on another CUDA stream than the one that computed it (a model whose
  layers run on several streams) computes its own: nothing orders the first stream's work before it.
Nothing is kept for inference tensors (they have no version counter) or while a CUDA graph is being
captured (a replay must recompute from the map's values, not reuse a tensor computed before).
"""

import weakref

import torch
from torch import Tensor


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _stream(t: Tensor):
    """The stream that work on t's device is queued on now; None on CPU."""
    return torch.cuda.current_stream(t.device) if t.is_cuda else None


def _cacheable(t: Tensor) -> bool:
    return not t.is_inference() and not _capturing(t)


# The last maps found in range, newest first: (weak reference, version counter, Skv). Two maps per
# model (layers, re-anchor), for one or two models.
_checked = ()
_CHECKED_KEPT = 4


def check_index_range(kv_index: Tensor, num_kv: int) -> None:
    """ValueError unless every entry of kv_index lies in [0, num_kv). Reads the values: one device sync
    per new or edited map; eager mode only. Not checked while a CUDA graph is captured (no values can
    be read then; nor are replays checked, as on the compiled path)."""
    global _checked
    if _capturing(kv_index):
        return
    cacheable = not kv_index.is_inference()
    if cacheable and any(
        ref() is kv_index and version == kv_index._version and n == num_kv for ref, version, n in _checked
    ):
        return
    lo, hi = torch.stack([kv_index.min(), kv_index.max()]).tolist()
    if lo < 0 or hi >= num_kv:
        raise ValueError(f"kv_index values must lie in [0, Skv={num_kv}), got min {lo} and max {hi}")
    if cacheable:
        # One tuple swap: a thread reading the old entries still sees a consistent tuple.
        _checked = ((weakref.ref(kv_index), kv_index._version, num_kv), *_checked[: _CHECKED_KEPT - 1])


def inverse_kv_map(kv_index: Tensor, num_kv: int) -> tuple[Tensor, Tensor]:
    """kv_index (Sq,) inverted in CSR form, with shapes fixed by (Sq, Skv) alone.

    Returns kv_offsets (Skv + 1,) int64 and kv_queries (Sq,) int64: the query sequences reading
    K/V sequence j are kv_queries[kv_offsets[j]:kv_offsets[j + 1]], in increasing order. No device sync.
    Entries outside [0, Skv) count as reading the nearest end, as the kernels read them (an unchecked
    map on the compiled path): every query sequence reads some K/V sequence, or the one-launch backward
    would leave its dq unwritten. Skv = 0 needs Sq = 0.
    """
    kv_index = kv_index.clamp(0, max(num_kv - 1, 0))
    sorted_index, kv_queries = torch.sort(kv_index, stable=True)
    bounds = torch.arange(num_kv + 1, dtype=kv_index.dtype, device=kv_index.device)
    return torch.searchsorted(sorted_index, bounds), kv_queries


class SharedInverse:
    """The inverse of one map, computed by the first backward that needs it; autograd nodes keep it."""

    __slots__ = ("__weakref__", "inverse", "map_ref", "num_kv", "stream")

    def __init__(self, kv_index: Tensor, num_kv: int):
        self.map_ref, self.num_kv, self.inverse, self.stream = weakref.ref(kv_index), num_kv, None, None

    def get(self, kv_index: Tensor) -> tuple[Tensor, Tensor]:
        """The inverse of kv_index: the saved map of the node asking, with the values seen in forward."""
        if _capturing(kv_index):
            return inverse_kv_map(kv_index, self.num_kv)
        stream = _stream(kv_index)
        if self.inverse is None:
            self.inverse, self.stream = inverse_kv_map(kv_index, self.num_kv), stream
        elif stream != self.stream:
            return inverse_kv_map(kv_index, self.num_kv)
        return self.inverse


# (id, version counter, Skv) of a map -> its SharedInverse, while some autograd node holds it.
_live_inverses = weakref.WeakValueDictionary()


def shared_inverse(kv_index: Tensor, num_kv: int) -> SharedInverse:
    """Called in forward: the SharedInverse of this map, the one other live nodes hold if any. The
    caller keeps it for its backward, which keeps it alive for later forwards of the same graph."""
    if not _cacheable(kv_index):
        return SharedInverse(kv_index, num_kv)
    key = (id(kv_index), kv_index._version, num_kv)
    shared = _live_inverses.get(key)
    # One already used by a backward belongs to an earlier graph (a previous step's, still referenced
    # through its loss): the map may have been rewritten since, behind the version counter.
    if shared is None or shared.map_ref() is not kv_index or shared.inverse is not None:
        shared = _live_inverses[key] = SharedInverse(kv_index, num_kv)
    return shared
