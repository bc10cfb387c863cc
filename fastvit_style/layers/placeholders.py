"""The official modules' dropouts and identities: CrossAttention's attn_drop and proj_drop, the block's
drop_path, timm's Mlp drop1, norm and drop2, timm's PatchEmbed norm.

At the official settings (every p = 0) each one is an identity, but code written against the official
model reaches them by name: `named_modules`, `get_submodule`, a DropPath assigned to `blk.drop_path` for
stochastic depth, a hook on `attn.attn_drop` that captures the attention weights, `p` raised for Monte
Carlo dropout. Without them such an assignment or change would be silently ignored. The modules' own
forwards call them where the official ones do (backend="reference" honours a change); the fast path,
which reads the block's weights and skips its modules, refuses them changed (`unmodified`).
"""

from torch import nn


def no_dropout() -> nn.Dropout:
    """A dropout at the official p = 0."""
    return nn.Dropout(0.0)


def add_missing(module: nn.Module, **factories) -> None:
    """Give `module` the placeholder children (name=factory) that a pickle from before them lacks, in
    `module`'s mode: a dropout given p > 0 later then drops only where its model trains."""
    for name, make in factories.items():
        if module._modules.get(name) is None:
            module._modules[name] = make().train(module.training)
