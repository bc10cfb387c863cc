"""The fast path's precondition: the encoder's layers are the modules it was built with, without hooks.

The fast schedule (and the style bank) never calls the encoder's modules: it reads their weights and
runs its own batched ops. A layer replaced (a quantized or LoRA-wrapped linear, another norm or
activation) or hooked (pruning masks, feature capture) would be skipped without a word, so such a
model is refused, pointing at backend="reference", which calls every layer as the official code does.
Parametrized weights (torch.nn.utils.parametrize) are read through their parametrization: allowed.
"""

from torch import nn

from .attention_block import Attention, CrossAttentionBlock
from .encoder import ViTEncoder
from .mlp import Mlp

# What the fast path computes: a class, and the same for its children by name.
_LINEAR, _NORM = (nn.Linear, ()), (nn.LayerNorm, ())
_BLOCK = (
    CrossAttentionBlock,
    (
        ("norm_input", _NORM),
        ("norm_context", _NORM),
        (
            "attn",
            (
                Attention,
                (("q_proj", _LINEAR), ("k_proj", _LINEAR), ("v_proj", _LINEAR), ("out_proj", _LINEAR)),
            ),
        ),
        ("mlp", (Mlp, (("fc1", _LINEAR), ("act", (nn.GELU, ())), ("fc2", _LINEAR)))),
    ),
)


def _qualified(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _problem(module, cls) -> str | None:
    kind = type(module)
    # A parametrized module is a subclass with the same forward: still computed as its class.
    if kind is not cls and (not isinstance(module, cls) or kind.forward is not cls.forward):
        return f"is a {_qualified(kind)}, not the {_qualified(cls)} it was built with"
    d = module.__dict__  # the hook dicts, read directly: this runs before every fast forward
    if d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"]:
        return "has hooks (pruning, feature capture), which would not fire"
    if cls is nn.GELU and module.approximate != "none":
        return f"is a GELU with approximate={module.approximate!r}, not the exact one"
    return None


def _find(module, spec) -> tuple[list[str], str] | None:
    """(path below module, problem) of the first layer the fast path cannot honour, or None."""
    cls, children = spec
    if (problem := _problem(module, cls)) is not None:
        return [], problem
    for child, child_spec in children:
        if (found := _find(module._modules[child], child_spec)) is not None:
            found[0].insert(0, child)
            return found
    return None


def check_unmodified(encoder) -> None:
    """ValueError naming the first layer of `encoder` (a ViTEncoder) that the fast path cannot honour."""
    found = _find(encoder, (ViTEncoder, (("norm", _NORM),)))
    for i, blk in enumerate(encoder.blocks._modules.values()):
        if found is not None:
            break
        if (found := _find(blk, _BLOCK)) is not None:
            found[0][:0] = ["blocks", str(i)]
    if found is not None:
        path, problem = found
        raise ValueError(
            f"model.{'.'.join(['encoder', *path])} {problem}: the fast path reads the layers' weights and "
            "skips their modules; build the model with backend='reference', which calls every layer as "
            "the official code does"
        )
