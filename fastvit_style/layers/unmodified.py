"""The fast path's precondition: what it does not call as the official code does is unmodified.

The fast schedule, the style bank and TTA never call the encoder's modules: they read their weights and
run their own batched ops. A layer replaced there (a quantized or LoRA-wrapped linear, another norm or
activation, a forward patched on the instance) or hooked (pruning masks, feature capture) would be
skipped without a word. The patch embedding, the head and the losses' VGG19 are called as modules, but
on other batches than officially (streams concatenated, CLS rows dropped, 3 VGG19 calls of a rolled
training step instead of 5): a hook there would see other tensors, or fewer calls. Such a
model is refused, with the layer's name, and so is a model while a global module hook
(`torch.nn.modules.module.register_module_forward_hook` and kin) is registered, except those of
torch's own observers (FlopCounterMode's ModuleTracker, CommDebugMode), which only follow the module
hierarchy: every hook would fire on the modules the fast path calls and on none of the encoder's.
`model.allow_global_hooks = True` lets global hooks through, for those meant for other modules (a
quantization calibration of a classifier that the stylizer feeds). Parametrized weights
(torch.nn.utils.parametrize) are read through their parametrization, which is exact where reading a
weight is a function of the parameters (not spectral_norm in training mode, whose power iteration
advances on every read: the fast path reads fewer times).
"""

import functools
import sys

import torch
from torch import nn
from torch.nn.modules import module as nn_module

from .attention_block import Attention, CrossAttentionBlock
from .encoder import ViTEncoder
from .mlp import Mlp

# What the fast path computes: a class, and the same for its children by name.
_LINEAR, _NORM = (nn.Linear, ()), (nn.LayerNorm, ())
# The official dropouts and identities (`placeholders`), which the fast path computes as identities.
_DROPOUT, _IDENTITY = (nn.Dropout, ()), (nn.Identity, ())
_BLOCK = (
    CrossAttentionBlock,
    (
        ("norm_input", _NORM),
        ("norm_context", _NORM),
        (
            "attn",
            (
                Attention,
                (("q_proj", _LINEAR), ("k_proj", _LINEAR), ("v_proj", _LINEAR), ("out_proj", _LINEAR),
                 ("attn_drop", _DROPOUT), ("proj_drop", _DROPOUT)),
            ),
        ),
        (
            "mlp",
            (
                Mlp,
                (("fc1", _LINEAR), ("act", (nn.GELU, ())), ("drop1", _DROPOUT), ("norm", _IDENTITY),
                 ("fc2", _LINEAR), ("drop2", _DROPOUT)),
            ),
        ),
        ("drop_path", _IDENTITY),
    ),
)  # fmt: skip


def _qualified(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _has_hooks(module) -> bool:
    d = module.__dict__  # the hook dicts, read directly: this runs before every fast forward
    return bool(
        d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"]
    )


def _hooked(module) -> str | None:
    if _has_hooks(module):
        return "has hooks (pruning, feature capture), which the fast path would skip or feed other batches"
    return None


def _problem(module, cls) -> str | None:
    kind = type(module)
    # A parametrized module is a subclass with the same forward: still computed as its class.
    if kind is not cls and (not isinstance(module, cls) or kind.forward is not cls.forward):
        return f"is a {_qualified(kind)}, not the {_qualified(cls)} it was built with"
    if (problem := _hooked(module)) is not None:
        return problem
    if "forward" in module.__dict__:
        return "has its forward replaced on the instance (accelerate-style hooks)"
    if cls is nn.GELU and module.approximate != "none":
        return f"is a GELU with approximate={module.approximate!r}, not the exact one"
    if cls is nn.Dropout and not _idle(module):
        return f"is a Dropout with p={module.p} in training mode, which the fast path does not apply"
    return None


def _idle(dropout: nn.Dropout) -> bool:
    """Whether the dropout computes the identity (p = 0, or eval mode)."""
    return dropout.p == 0 or not dropout.training


def is_exact(module, cls) -> bool:
    """Whether module is a `cls` itself, unhooked and with its class's forward: what calling it does is
    what the class computes. type() first: a missing child (None) or another module is no `cls`,
    whatever its attributes."""
    return type(module) is cls and not _has_hooks(module) and "forward" not in module.__dict__


def _untouched_block(blk) -> bool:
    """_BLOCK's common case unrolled, exact classes only (a parametrized layer takes `_find`): it runs
    before every fast forward, in half the time of the walk (about 30 against 52 us for base's 12
    blocks before the placeholders, which added about half of that again). False sends the block to
    `_find`, which names what differs."""
    if not is_exact(blk, CrossAttentionBlock):
        return False
    b = blk._modules
    attn, mlp = b.get("attn"), b.get("mlp")
    if not (is_exact(attn, Attention) and is_exact(mlp, Mlp)):
        return False
    a, m = attn._modules, mlp._modules
    linears = (
        a.get("q_proj"),
        a.get("k_proj"),
        a.get("v_proj"),
        a.get("out_proj"),
        m.get("fc1"),
        m.get("fc2"),
    )
    return (
        all(is_exact(lin, nn.Linear) for lin in linears)
        and is_exact(b.get("norm_input"), nn.LayerNorm)
        and is_exact(b.get("norm_context"), nn.LayerNorm)
        and is_exact(m.get("act"), nn.GELU)
        and m["act"].approximate == "none"
        and _idle_placeholders(
            (a.get("attn_drop"), a.get("proj_drop"), m.get("drop1"), m.get("drop2")),
            (m.get("norm"), b.get("drop_path")),
        )
    )


def _idle_placeholders(dropouts: tuple, identities: tuple) -> bool:
    """Whether the dropouts are exact nn.Dropouts that compute the identity and the identities exact
    nn.Identities (`is_exact`)."""
    for d in dropouts:
        if not (is_exact(d, nn.Dropout) and _idle(d)):
            return False
    for i in identities:
        if not is_exact(i, nn.Identity):
            return False
    return True


def _find(module, spec) -> tuple[list[str], str] | None:
    """(path below module, problem) of the first layer the fast path cannot honour, or None."""
    cls, children = spec
    if (problem := _problem(module, cls)) is not None:
        return [], problem
    for child, child_spec in children:
        if (found := _find(module._modules.get(child), child_spec)) is not None:
            found[0].insert(0, child)
            return found
    return None


def _find_batch_dependent(module) -> tuple[list[str], str] | None:
    """(path below module, problem) of the first module in module's tree whose effect depends on the
    batches it is called on, or None: a hook, or a dropout drawing masks (where the official code draws
    independent masks for the style stream, the roll shortcut would reuse the content stream's)."""
    if (problem := _hooked(module)) is not None:
        return [], problem
    if isinstance(module, nn.modules.dropout._DropoutNd) and not _idle(module):
        return [], (
            f"is a {type(module).__name__} with p={module.p} in training mode, whose masks the fast path would "
            "draw on other batches than the official computation"
        )
    for child, sub in module._modules.items():
        if sub is not None and (found := _find_batch_dependent(sub)) is not None:
            found[0].insert(0, child)
            return found
    return None


_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
                 "_global_backward_hooks")  # fmt: skip


def _global_hook() -> str | None:
    """The name of the first global module hook that is not a method of a torch observer, or None."""
    registered = [getattr(nn_module, name, None) for name in _GLOBAL_HOOKS]  # private: absent, no check
    if not any(registered):  # the common case, before every fast forward
        return None
    for hooks in filter(None, registered):
        for hook in hooks.values():
            owner = getattr(hook, "__self__", None)
            if owner is None or not type(owner).__module__.startswith("torch."):
                # __name__: dynamo resolves a function's __qualname__ to the descriptor's repr.
                return getattr(hook, "__name__", None) or repr(hook)
    return None


# Called as modules by the fast path, on other batches than officially: hooks and active dropouts are refused.
_CALLED_ON_OTHER_BATCHES = ("patch_embed", "bottleneck", "post_process_conv", "vgg_encoder")


def check_unmodified(model, remedy: str) -> None:
    """ValueError naming the first layer of `model` (a StylizingViT) that the fast path cannot honour,
    followed by `remedy`.

    Traced by dynamo, the walk is inlined: its findings are constants of the graph. Run eagerly where
    dynamo is loaded, it runs with dynamo off: after a graph break (the error raised while tracing,
    without fullgraph) dynamo would compile the walk's helpers frame by frame, and since it does not
    guard on module hooks (`skip_nnmodule_hook_guards`) the frame compiled for an unhooked block would
    pass a hooked one. Where dynamo is not loaded nothing can compile it, and importing dynamo (and
    Triton with it) would cost the first eager call about a second."""
    if torch.compiler.is_compiling():
        return _check(model, remedy)
    dynamo = sys.modules.get("torch._dynamo")
    return (_check if dynamo is None else _uncompiled_check(dynamo))(model, remedy)


@functools.cache
def _uncompiled_check(dynamo):
    return dynamo.disable(_check)


def _check(model, remedy: str) -> None:
    encoder = model.encoder
    found = _find(encoder, (ViTEncoder, (("norm", _NORM),)))
    if found is not None:
        found[0].insert(0, "encoder")
    elif len(encoder.blocks) != encoder.config.depth:  # the config sizes style banks and checkpoints
        found = (
            ["encoder", "blocks"],
            f"holds {len(encoder.blocks)} blocks, its config {encoder.config.depth}",
        )
    for i, blk in enumerate(encoder.blocks._modules.values()):
        if found is not None:
            break
        if not _untouched_block(blk) and (found := _find(blk, _BLOCK)) is not None:
            found[0][:0] = ["encoder", "blocks", str(i)]
    for name in _CALLED_ON_OTHER_BATCHES:
        if found is not None:
            break
        owner = encoder if name == "patch_embed" else model
        module = owner._modules.get(name)
        if module is not None and (found := _find_batch_dependent(module)) is not None:
            found[0][:0] = ["encoder", name] if owner is encoder else [name]
    if found is not None:
        path, problem = found
        raise ValueError(f"model.{'.'.join(path)} {problem}: {remedy}")
    # getattr: a whole model pickled before the attribute existed has none.
    if not getattr(model, "allow_global_hooks", False) and (hook := _global_hook()) is not None:
        raise ValueError(
            f"a global module hook ({hook}, from torch.nn.modules.module.register_module_*_hook) is "
            f"registered, which the fast path would skip in the encoder's layers: {remedy}; or, if it "
            "is not meant for this model's layers, set model.allow_global_hooks = True"
        )
