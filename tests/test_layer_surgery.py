"""Replaced and hooked layers: the reference backend calls every layer as officially (hooks fire, pruning
and wrappers take effect); the fast path, which reads weights and skips modules, refuses such a model
with the layer's name, except for parametrized weights, which it reads through their parametrization."""

import copy
import re

import pytest
import torch
from helpers import TOLERANCE, assert_close_rel, images, randomize_, rel_err
from torch import nn
from torch.nn.utils import parametrize, prune

from fastvit_style import StyleBank, StylizingViT
from fastvit_style.layers import CrossAttentionBlock
from fastvit_style.tta import stylize

FP32 = TOLERANCE[torch.float32]
SIZE, KW = 32, {"input_size": 32, "encoder_depth": 2}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return randomize_(StylizingViT("tiny", backend="reference", **KW)).eval()


def with_backend(model, backend):
    copy_ = copy.deepcopy(model)
    copy_.backend = backend
    return copy_


class LoraLinear(nn.Module):
    """A PEFT-style wrapper: it exposes the base layer's weight, but its forward adds a low-rank term
    that a reader of `.weight` never sees."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base_layer = base
        self.lora_a = nn.Parameter(torch.randn(2, base.in_features) * 0.1)
        self.lora_b = nn.Parameter(torch.randn(base.out_features, 2) * 0.1)

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x):
        return self.base_layer(x) + x @ self.lora_a.T @ self.lora_b.T


class ScaledBlock(CrossAttentionBlock):
    """A subclass with a forward of its own (unlike a parametrized module's class)."""

    def forward(self, *args, **kwargs):
        return 2 * super().forward(*args, **kwargs)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_block_hooks_fire_four_times_per_layer_on_the_reference(model):
    """Officially each layer's block is called four times per forward (shared doc 1.4), its q_proj too,
    and the encoder once."""
    calls = []
    handles = [
        model.encoder.register_forward_hook(lambda *_: calls.append("encoder")),
        model.encoder.blocks[1].register_forward_hook(lambda *_: calls.append("block")),
        model.encoder.blocks[1].attn.q_proj.register_forward_pre_hook(lambda *_: calls.append("q_proj")),
    ]
    try:
        with torch.no_grad():
            model(images(2, SIZE))
    finally:
        for h in handles:
            h.remove()
    assert calls.count("block") == 4 and calls.count("q_proj") == 4 and calls.count("encoder") == 1


def test_a_wrapped_linear_is_honoured_by_the_reference_and_refused_by_the_fast_path(model):
    wrapped = copy.deepcopy(model)
    attn = wrapped.encoder.blocks[0].attn
    attn.v_proj = LoraLinear(attn.v_proj)
    x, s = images(2, SIZE), images(2, SIZE, seed=1)
    with torch.no_grad():
        changed = (wrapped(x, s) - model(x, s)).abs().max()
    assert changed > 1e-3  # the low-rank term reaches the output
    fast = with_backend(wrapped, "torch")
    message = r"model\.encoder\.blocks\.0\.attn\.v_proj is a .*LoraLinear, not the torch.nn.*Linear .*backend='reference'"
    with pytest.raises(ValueError, match=message):
        fast(x, s)
    with pytest.raises(ValueError, match=message):
        StyleBank.from_images(fast, s)


def test_pruning_takes_effect_on_the_reference(model):
    """A pruning mask applied by a pre-hook, over two training steps, equals the masked weight itself."""
    pruned = copy.deepcopy(model).train()
    q_proj = pruned.encoder.blocks[1].attn.q_proj
    prune.l1_unstructured(q_proj, "weight", 0.5)
    optimizer = torch.optim.SGD(pruned.parameters(), lr=0.1)
    x = images(2, SIZE)
    for _ in range(2):  # the second step fails if the mask is read from a stale tensor
        optimizer.zero_grad()
        pruned(x).pow(2).mean().backward()
        optimizer.step()
    with torch.no_grad():
        hooked = pruned(x)
    pruned.backend = "torch"  # (a pruned module cannot be deep-copied)
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.q_proj has hooks"):
        pruned(x)
    pruned.backend = "reference"
    prune.remove(q_proj, "weight")  # the masked weight, made permanent: no hook from here on
    assert (q_proj.weight == 0).float().mean() == 0.5
    with torch.no_grad():
        assert torch.equal(pruned(x), hooked)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda m: m.encoder.blocks[1].mlp.register_forward_hook(lambda *_: None),
            r"blocks\.1\.mlp has hooks",
        ),
        (lambda m: m.encoder.norm.register_full_backward_hook(lambda *_: None), r"encoder\.norm has hooks"),
        (lambda m: m.encoder.register_forward_pre_hook(lambda *_: None), r"model\.encoder has hooks"),
        (
            lambda m: m.encoder.blocks[0].attn.register_full_backward_pre_hook(lambda *_: None),
            r"blocks\.0\.attn has hooks",
        ),
        (
            lambda m: setattr(m.encoder.blocks[0], "__class__", ScaledBlock),
            r"blocks\.0 is a .*ScaledBlock, not the .*CrossAttentionBlock",
        ),
        (
            lambda m: setattr(m.encoder.blocks[1].mlp.fc2, "__class__", ScaledLinear),
            r"blocks\.1\.mlp\.fc2 is a .*ScaledLinear, not the torch.nn.*Linear",
        ),
        (lambda m: setattr(m.encoder.blocks[0].mlp, "act", nn.GELU("tanh")), r"approximate='tanh'"),
        (lambda m: setattr(m.encoder.blocks[0].mlp, "act", nn.ReLU()), r"blocks\.0\.mlp\.act is a .*ReLU"),
        (
            lambda m: setattr(m.encoder.blocks[1], "norm_context", nn.RMSNorm(m.embed_dim)),
            r"blocks\.1\.norm_context is a .*RMSNorm, not the torch.nn.*LayerNorm",
        ),
        (
            lambda m: setattr(
                m.encoder.blocks[0].attn.q_proj, "forward", m.encoder.blocks[0].attn.q_proj.forward
            ),
            r"blocks\.0\.attn\.q_proj has its forward replaced on the instance",
        ),
        (
            lambda m: m.bottleneck.fc1.register_forward_hook(lambda *_: None),
            r"model\.bottleneck\.fc1 has hooks",
        ),
        (
            lambda m: m.encoder.patch_embed.proj.register_forward_hook(lambda *_: None),
            r"patch_embed\.proj has hooks",
        ),
        (
            lambda m: m.post_process_conv.register_forward_hook(lambda *_: None),
            r"model\.post_process_conv has",
        ),
        (lambda m: m.encoder.blocks.__setitem__(1, nn.Identity()), r"blocks\.1 is a torch.nn.*Identity, not"),
        (lambda m: setattr(m.encoder.blocks[0].attn, "q_proj", None), r"attn\.q_proj is a builtins.NoneType"),
        (
            lambda m: m.encoder.blocks.append(copy.deepcopy(m.encoder.blocks[0])),
            r"blocks holds 3 blocks, its config 2",
        ),
    ],
    ids=[
        "forward-hook",
        "backward-hook",
        "encoder-pre-hook",
        "backward-pre-hook",
        "block-subclass",
        "linear-subclass",
        "tanh-gelu",
        "relu",
        "rmsnorm",
        "instance-forward",
        "bottleneck-hook",
        "patch-embed-hook",
        "post-conv-hook",
        "block-dropped",
        "linear-removed",
        "block-appended",
    ],
)
def test_the_fast_path_refuses_what_it_would_skip(model, change, message):
    fast = with_backend(model, "torch")
    change(fast)
    with pytest.raises(ValueError, match=message):
        fast(images(1, SIZE))


@pytest.mark.parametrize("layer", ["", "features_0", "features_28"])
def test_a_hook_on_the_losses_vgg19_is_refused(layer):
    """The fast losses call VGG19 3 times in a rolled training step, not 5 as officially (the style
    batches' features are rolls): a hook on it or on a layer of it is refused; the reference fires it 5
    times, as the official code does."""
    model = StylizingViT("tiny", train=True, backend="reference", **KW)
    calls = []
    model.vgg_encoder.get_submodule(layer).register_forward_hook(lambda *_: calls.append(1))
    x = images(2, SIZE)
    model(x)
    assert len(calls) == 5
    fast = with_backend(model, "torch")
    path = re.escape(f"model.vgg_encoder{'.' + layer if layer else ''} has hooks")
    with pytest.raises(ValueError, match=path + ".*backend='reference'"):
        fast(x)


BLOCK_LAYERS = ("norm_input", "norm_context", "attn", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj",
                "attn.attn_drop", "attn.proj_drop", "mlp", "mlp.fc1", "mlp.act", "mlp.drop1", "mlp.norm", "mlp.fc2",
                "mlp.drop2", "drop_path")  # fmt: skip


@pytest.mark.parametrize("layer", BLOCK_LAYERS)
def test_a_hook_on_any_layer_of_a_block_is_refused(model, layer):
    fast = with_backend(model, "torch")
    fast.encoder.blocks[1].get_submodule(layer).register_forward_hook(lambda *_: None)
    with pytest.raises(ValueError, match=rf"model\.encoder\.blocks\.1\.{re.escape(layer)} has hooks"):
        fast(images(1, SIZE))


def test_changed_eps_and_removed_biases_are_honoured(model):
    """What the fast path reads from a layer besides its weight (a LayerNorm's eps, a missing bias or
    affine weight) is read from the layer itself: the fast forward, the bank and stylize follow."""
    changed = copy.deepcopy(model)
    blk = changed.encoder.blocks[1]
    blk.norm_context.eps, blk.norm_input.eps, changed.encoder.norm.eps = 0.5, 0.25, 0.125
    blk.mlp.fc2.bias = blk.attn.out_proj.bias = changed.encoder.blocks[0].norm_context.weight = None
    x, s = images(2, SIZE), images(2, SIZE, seed=1)
    fast = with_backend(changed, "torch")
    with torch.no_grad():
        expected = changed(x, s)
        assert rel_err(expected, model(x, s)) > 1e-3  # the changes reach the output
        assert_close_rel(fast(x, s), expected, FP32, "fast forward")
        bank = StyleBank.from_images(fast, s)
        assert_close_rel(stylize(fast, x, bank, refs=torch.tensor([[0], [1]]))[:, 0], expected, FP32, "bank")


def test_style_banks_of_a_reference_model_refuse_hooks_without_pointing_at_the_reference(model):
    hooked = copy.deepcopy(model)
    hooked.encoder.blocks[0].mlp.register_forward_hook(lambda *_: None)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp has hooks.*style banks and TTA .*remove it"):
        StyleBank.from_images(hooked, images(1, SIZE))


def test_parametrized_weights_are_read_through_their_parametrization(model):
    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    x, s = images(2, SIZE), images(2, SIZE, seed=1)
    outputs = []
    for backend in ("reference", "torch"):
        m = with_backend(model, backend)
        parametrize.register_parametrization(m.encoder.blocks[0].attn.k_proj, "weight", Doubled())
        with torch.no_grad():
            outputs.append(m(x, s))
    doubled = copy.deepcopy(model)
    with torch.no_grad():
        doubled.encoder.blocks[0].attn.k_proj.weight.mul_(2)
        assert_close_rel(outputs[0], doubled(x, s), FP32, "reference")
    assert_close_rel(outputs[1], outputs[0], FP32, "fast vs reference")


def test_attention_is_callable_as_officially(model):
    attn = model.encoder.blocks[0].attn
    X, Y = torch.randn(2, 5, model.embed_dim), torch.randn(2, 5, model.embed_dim)
    heads = lambda t: t.reshape(2, 5, attn.num_heads, attn.head_dim).transpose(1, 2)
    weights = (heads(attn.q_proj(X)) @ heads(attn.k_proj(Y)).transpose(-1, -2) * attn.scale).softmax(-1)
    expected = attn.out_proj((weights @ heads(attn.v_proj(Y))).transpose(1, 2).reshape(2, 5, -1))
    assert attn.head_dim == 64 and attn.scale == 64**-0.5
    assert_close_rel(attn(X, Y), expected, FP32, "attention call")


GLOBAL_HOOKS = {
    "forward": lambda: nn.modules.module.register_module_forward_hook(lambda m, i, o: o),
    "forward-pre": lambda: nn.modules.module.register_module_forward_pre_hook(lambda m, i: None),
    "backward": lambda: nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: None),
    "backward-pre": lambda: nn.modules.module.register_module_full_backward_pre_hook(lambda m, go: None),
}


@pytest.mark.parametrize("kind", GLOBAL_HOOKS)
def test_a_global_module_hook_is_refused_while_registered(model, kind):
    """A hook on every module (register_module_forward_hook and kin) would fire on the modules the fast
    path calls and on none of the encoder's: refused, by the fast forward and by style banks, until
    removed."""
    fast, x = with_backend(model, "torch"), images(1, SIZE)
    handle = GLOBAL_HOOKS[kind]()
    try:
        with pytest.raises(
            ValueError, match=r"a global module hook \(<lambda>, .*\) is registered.*allow_gl"
        ):
            fast(x)
        with pytest.raises(ValueError, match="a global module hook .*style banks and TTA cannot honour it"):
            StyleBank.from_images(model, x)
        fast.allow_global_hooks = True  # the user's word that the hook is not meant for these layers
        with torch.no_grad():
            assert_close_rel(fast(x), model(x), FP32, "allowed")
    finally:
        handle.remove()
    fast.allow_global_hooks = False
    with torch.no_grad():
        assert_close_rel(fast(x), model(x), FP32, "after removal")


def test_torchs_own_observers_are_let_through(model):
    """FlopCounterMode follows the module hierarchy with global hooks (ModuleTracker): it changes no
    number, so the fast path runs under it, and so do style banks."""
    from torch.utils.flop_counter import FlopCounterMode

    fast, x = with_backend(model, "torch"), images(1, SIZE)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = fast(x)
        StyleBank.from_images(fast, x)
    assert counter.get_total_flops() > 0
    with torch.no_grad():
        assert_close_rel(out, model(x), FP32, "under FlopCounterMode")


@pytest.mark.parametrize("removed", ["k_proj", "v_proj", "both"])
def test_a_removed_key_or_value_bias_is_honoured(model, removed):
    """Either K/V projection may lose its bias (the fast path joins them in one matmul): the fast
    forward and its gradients follow the reference; a remaining k_proj bias gets its zero gradient."""
    changed = copy.deepcopy(model).train()
    for blk in changed.encoder.blocks:
        for name in ("k_proj", "v_proj") if removed == "both" else (removed,):
            setattr(blk.attn, name, nn.Linear(blk.attn.q_proj.in_features, blk.attn.q_proj.out_features,
                                              bias=False).requires_grad_(True))  # fmt: skip
            getattr(blk.attn, name).weight.data.normal_(0, 0.1)
    fast = with_backend(changed, "torch")
    x, s = images(2, SIZE), images(2, SIZE, seed=1)
    outputs = []
    for m in (changed, fast):
        out = m(x, s)
        out.square().mean().backward()
        outputs.append((out.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (expected, expected_grads), (got, grads) = outputs
    assert_close_rel(got, expected, FP32, "fast forward")
    for name, grad in expected_grads.items():
        if name.endswith("k_proj.bias"):
            assert torch.equal(grads[name], torch.zeros_like(grad)), name  # softmax cancels it exactly
        else:
            assert_close_rel(grads[name], grad, FP32, name)


def test_the_official_dropouts_are_honoured_by_the_reference_and_refused_by_the_fast_path(model):
    """The official dropouts and drop_path (identities at p = 0, `layers.placeholders`): a raised p or a
    stochastic depth assigned to drop_path takes effect on the reference, as officially, and is refused
    by the fast path, which would skip it; in eval mode a dropout of any p is an identity."""
    x, s = images(2, SIZE), images(2, SIZE, seed=1)
    with torch.no_grad():
        expected = model(x, s)
    fast = with_backend(model, "torch")
    changes = {
        r"blocks\.1\.attn\.attn_drop is a Dropout with p=0\.5 in training mode": lambda blk: setattr(
            blk.attn.attn_drop, "p", 0.5
        ),
        r"blocks\.1\.mlp\.drop2 is a Dropout with p=0\.5": lambda blk: setattr(blk.mlp.drop2, "p", 0.5),
        r"blocks\.1\.drop_path is a torch.nn.*Dropout, not the torch.nn.*Identity": lambda blk: setattr(
            blk, "drop_path", nn.Dropout(0.5)
        ),
    }
    # The bottleneck is called as a module, on other batches than officially (the roll shortcut would
    # reuse the content stream's masks for the style stream): refused too.
    bottleneck = r"model\.bottleneck\.drop1 is a Dropout with p=0\.5 in training mode, whose masks"
    changes[bottleneck] = lambda blk: None
    for message, change in changes.items():
        ref, fast = copy.deepcopy(model).train(), with_backend(model, "torch").train()
        change(ref.encoder.blocks[1])
        change(fast.encoder.blocks[1])
        if message == bottleneck:
            ref.bottleneck.drop1.p = fast.bottleneck.drop1.p = 0.5
        with pytest.raises(ValueError, match=message + ".*backend='reference'"), torch.no_grad():
            fast(x, s)
        with torch.no_grad():
            assert (ref(x, s) - ref(x, s)).abs().max() > 1e-3, message  # dropped at random
            if isinstance(fast.encoder.blocks[1].drop_path, nn.Identity):
                assert_close_rel(fast.eval()(x, s), expected, FP32, message)  # eval mode: no dropout


def test_a_hook_on_attn_drop_captures_the_attention_weights_on_the_reference(model):
    """The official way to read the attention maps: attn_drop receives the softmax weights, (B, nh, T, T),
    four block calls per layer."""
    maps = []
    handle = model.encoder.blocks[0].attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o))
    try:
        with torch.no_grad():
            model(images(2, SIZE))
    finally:
        handle.remove()
    T = model.encoder.num_patches + 1
    assert len(maps) == 4 and all(w.shape == (2, 3, T, T) for w in maps)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 3, T))


def test_a_pickle_from_before_the_official_dropouts_gets_them(model):
    old = copy.deepcopy(model)
    for blk in old.encoder.blocks:
        for module, names in ((blk, ["drop_path"]), (blk.attn, ["attn_drop", "proj_drop"]),
                              (blk.mlp, ["drop1", "norm", "drop2"])):  # fmt: skip
            for name in names:
                del module._modules[name]
    del old.encoder.patch_embed._modules["norm"], old.bottleneck._modules["drop1"]
    loaded = with_backend(old, "torch")  # deepcopy: through __setstate__, as a pickle
    assert sorted(n for n, _ in loaded.named_modules()) == sorted(n for n, _ in model.named_modules())
    x = images(2, SIZE)
    with torch.no_grad():
        assert_close_rel(loaded(x), model(x), FP32, "fast forward of an old pickle")


def test_an_eval_pickle_from_before_the_official_dropouts_gets_them_in_eval_mode(model):
    """The placeholders an old eval-mode pickle gets are in eval mode too: a p raised on one then drops
    nothing until the model is put in training mode, as for a model built now."""
    old = copy.deepcopy(model).eval()
    del old.encoder.blocks[0].attn._modules["attn_drop"]
    loaded = copy.deepcopy(old)  # through __setstate__, as a pickle
    assert not any(m.training for m in loaded.modules())
