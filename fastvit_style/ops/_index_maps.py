"""What the op derives from the values of kv_index: its range check and its inverse map, each computed
once per map rather than once per call.

A model passes the same one or two maps to the attention of every layer, forward and backward, so
a result is kept for as long as that very tensor is alive and unmodified (same object, same version
counter). Nothing is kept for inference tensors (they have no version counter) or while a CUDA graph
is being captured (a replay must recompute from the map's values then, not reuse a tensor computed
before the capture).
"""

import weakref

import torch
from torch import Tensor


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class _PerMapCache:
    """A few (map, key) -> value entries, newest first; a map is matched by identity and version."""

    def __init__(self, size: int):
        self.size = size
        self.entries = ()

    @staticmethod
    def _cacheable(t: Tensor) -> bool:
        return not t.is_inference() and not _capturing(t)

    def get(self, t: Tensor, key):
        if self._cacheable(t):
            for ref, version, entry_key, value in self.entries:
                if ref() is t and version == t._version and entry_key == key:
                    return value
        return None

    def put(self, t: Tensor, key, value) -> None:
        if self._cacheable(t):
            # One tuple swap: a thread reading the old entries still sees a consistent tuple.
            self.entries = ((weakref.ref(t), t._version, key, value), *self.entries[: self.size - 1])


# The model's maps: [self; cross] of the layers and the re-anchor's identity, for one or two models.
_checked = _PerMapCache(4)
_inverses = _PerMapCache(4)


def check_index_range(kv_index: Tensor, num_kv: int) -> None:
    """ValueError unless every entry of kv_index lies in [0, num_kv). Reads the values: one device sync
    per new or edited map; eager mode only. Not checked while a CUDA graph is captured (no values can
    be read then; nor are replays checked, as on the compiled path)."""
    if _capturing(kv_index) or _checked.get(kv_index, num_kv):
        return
    lo, hi = torch.stack([kv_index.min(), kv_index.max()]).tolist()
    if lo < 0 or hi >= num_kv:
        raise ValueError(f"kv_index values must lie in [0, Skv={num_kv}), got min {lo} and max {hi}")
    _checked.put(kv_index, num_kv, True)


def inverse_kv_map(kv_index: Tensor, num_kv: int) -> tuple[Tensor, Tensor]:
    """kv_index (Sq,) inverted in CSR form, with shapes fixed by (Sq, Skv) alone.

    Returns kv_offsets (Skv + 1,) int64 and kv_queries (Sq,) int64: the query sequences reading
    K/V sequence j are kv_queries[kv_offsets[j]:kv_offsets[j + 1]], in increasing order. No device sync.
    """
    kv_queries = torch.argsort(kv_index, stable=True)
    bounds = torch.arange(num_kv + 1, dtype=kv_index.dtype, device=kv_index.device)
    return torch.searchsorted(kv_index[kv_queries], bounds), kv_queries


def cached_inverse_kv_map(kv_index: Tensor, num_kv: int) -> tuple[Tensor, Tensor]:
    """inverse_kv_map, computed once per map (see the module docstring). Eager mode only: a compiled
    graph may run under CUDA graph trees, whose warm-up allocates in the graph's memory pool, and a
    tensor kept from there could be overwritten by a later replay."""
    inverse = _inverses.get(kv_index, num_kv)
    if inverse is None:
        inverse = inverse_kv_map(kv_index, num_kv)
        _inverses.put(kv_index, num_kv, inverse)
    return inverse
