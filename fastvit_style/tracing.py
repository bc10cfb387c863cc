"""Whether a call is traced or transformed: where an eager-only fast path gives way to plain ops."""

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def traced(*tensors: Tensor) -> bool:
    """Whether anything traces or transforms this call (dynamo, make_fx and other dispatch modes, vmap
    and the other torch.func transforms, torch.jit.trace; fake, functional or batched tensors, which
    have no storage). Dynamo is asked first: it reads that as a constant and traces none of the rest
    (the dispatch-mode query is a graph break under fullgraph=True)."""
    return (
        torch.compiler.is_compiling()
        or _get_current_dispatch_mode() is not None
        or torch._C._are_functorch_transforms_active()
        or torch.jit.is_tracing()
        or any(type(t) not in _PLAIN_TENSORS or not torch._C._has_storage(t) for t in tensors)
    )


def forward_ad_active() -> bool:
    """Whether forward-mode AD is on (inside torch.autograd.forward_ad.dual_level, which torch.func.jvp
    enters too): where the fused ops without a forward derivative give way to plain ones."""
    return torch.autograd.forward_ad._current_level >= 0


def has_values(t: Tensor) -> bool:
    """Whether t's values can be read here: a plain tensor with storage, not on the meta device (fake,
    functional and batched tensors have none)."""
    return type(t) in _PLAIN_TENSORS and torch._C._has_storage(t) and not t.is_meta
