"""Construction and forward reject bad input with a message that says what was expected."""

import copy
import functools
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from fastvit_style import StyleAugment, StyleBank, StylizingViT, create_model

SMALL = {"input_size": 32, "encoder_depth": 1}


@pytest.fixture(scope="module")
def model():
    return StylizingViT("tiny", backend="torch", **SMALL)


@pytest.mark.parametrize("backbone", ["large", "vit_huge_patch14_224"])
def test_unsupported_backbones_fail_at_construction(backbone):
    with pytest.raises(ValueError, match="L/2 must be divisible by C\\*P"):
        StylizingViT(backbone)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="backend must be one of"):
        StylizingViT("tiny", backend="cuda", **SMALL)
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        StylizingViT("tiny", colour=3)
    for size in (40, 0, -16, "224"):
        with pytest.raises(ValueError, match=f"positive multiple of patch_size 16, got {size!r}"):
            StylizingViT("tiny", input_size=size)
    # What the official code would fail on deep inside construction or forward (a ZeroDivisionError, an
    # UnboundLocalError), refused by name.
    for kwargs, match in [
        ({"encoder_depth": 0}, "depth must be an integer >= 1, got 0"),
        ({"encoder_depth": "6"}, "depth must be an integer >= 1, got '6'"),
        ({"encoder_patch_size": 0}, "patch_size must be an integer >= 1, got 0"),
        ({"encoder_num_heads": 2.0}, "num_heads must be an integer >= 1, got 2.0"),
        ({"encoder_mlp_ratio": 0}, "mlp_ratio must be a finite positive number, got 0"),
        ({"post_process_conv_padding": -1}, "post_process_conv_padding must be an integer >= 0, got -1"),
        ({"encoder_embed_dim": 192, "encoder_num_heads": 5}, "embed_dim 192 is not divisible by num_heads 5"),
    ]:
        with pytest.raises(ValueError, match=match):
            StylizingViT("tiny", **kwargs)
    with pytest.raises(ValueError, match="bottleneck_drop=0.1 is not supported"):
        StylizingViT("tiny", bottleneck_drop=0.1, **SMALL)
    for norm_layer in (
        torch.nn.BatchNorm1d,
        functools.partial(torch.nn.LayerNorm, bias=False),
        functools.partial(torch.nn.LayerNorm, 192),  # a shape of its own: the model sets that
        functools.partial(torch.nn.LayerNorm, eps=None),  # was float()'s TypeError, naming no parameter
        functools.partial(torch.nn.LayerNorm, eps="1e-6"),  # officially layer_norm's TypeError at forward
    ):
        with pytest.raises(ValueError, match="encoder_norm_layer=.* is not supported"):
            StylizingViT("tiny", encoder_norm_layer=norm_layer, **SMALL)


def test_an_embed_dim_not_divisible_by_4_is_refused_by_name():
    """The 2-D sin-cos position embedding gives the patch column and row L/2 channels each, as sin-cos
    pairs: L = 18 (which the head's L/2 = C*P*K takes with P = 3, K = 1) failed with a bare size mismatch."""
    with pytest.raises(ValueError, match="embed_dim must be a multiple of 4 .*position embedding.*got 18"):
        StylizingViT("mine", encoder_embed_dim=18, encoder_num_heads=1, encoder_patch_size=3, input_size=6)


def test_a_post_process_kernel_larger_than_the_padded_image_is_refused_at_build():
    """Officially built, then a raw conv error at every forward ("Kernel size can't be greater than
    actual input size")."""
    match = "post_process_conv_kernel_size 37 is larger than the 36 px of input_size 32 padded by 2"
    with pytest.raises(ValueError, match=match):
        StylizingViT("tiny", post_process_conv_kernel_size=37, **SMALL)
    model = StylizingViT("tiny", post_process_conv_kernel_size=36, backend="reference", **SMALL)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3, 1, 1)  # eval keeps a size-changing conv


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"encoder_mlp_ratio": float("inf")}, "mlp_ratio"),  # was an OverflowError from int(L * ratio)
        ({"bottleneck_mlp_ratio": float("inf")}, "bottleneck_mlp_ratio"),
        ({"encoder_norm_layer": functools.partial(torch.nn.LayerNorm, eps=float("inf"))}, "norm_eps"),
    ],
)
def test_an_infinite_ratio_or_eps_is_refused_by_name(kwargs, name):
    """An infinite eps zeroed every normalized row: the model built and gave the same image for any input."""
    with pytest.raises(ValueError, match=f"^{name} must be a finite positive number, got inf$"):
        StylizingViT("tiny", **kwargs, **SMALL)


@pytest.mark.parametrize("name", ["encoder_mlp_ratio", "bottleneck_mlp_ratio"])
def test_a_ratio_that_leaves_an_mlp_no_hidden_unit_is_refused(name):
    """int(192 * 0.005) = 0: torch built zero-width layers with a warning, and a zero-width bottleneck gave
    the same image for any input."""
    field = name.removeprefix("encoder_")
    match = f"^{field} 0.005 leaves int\\(192 \\* 0.005\\) = 0 hidden units in the MLP: .* >= 1/192"
    with pytest.raises(ValueError, match=match):
        StylizingViT("tiny", **{name: 0.005}, **SMALL)
    assert StylizingViT("tiny", **{name: 1 / 192}, **SMALL).config.embed_dim == 192


@pytest.mark.parametrize("train", ["False", "no", 2.0, 2])
def test_a_train_flag_other_than_true_or_false_is_refused(train):
    """Officially only its truth counts: train="False" (from a config file) built a VGG19 and forward gave
    (Loss, x_recon) where an image was expected. 0 and 1 still count, as for the bias flags."""
    with pytest.raises(ValueError, match=f"^train must be True or False, got {train!r}$"):
        StylizingViT("tiny", train=train, **SMALL)
    assert StylizingViT("tiny", train=0, **SMALL).training_mode == 0


def test_numpy_numbers_become_python_numbers_so_a_style_bank_saves(tmp_path):
    """A sweep's np.int64 / np.float32 values built the model but stayed in its config, and a StyleBank of
    it failed to save ("Object of type int64 is not JSON serializable")."""
    kwargs = {"input_size": np.int64(32), "encoder_mlp_ratio": np.float32(2), "bottleneck_bias": np.int64(0)}
    model = StylizingViT("tiny", backend="torch", encoder_depth=1, **kwargs)
    types = {
        "input_size": int,
        "mlp_ratio": np.float32,
        "bottleneck_bias": int,
    }  # the float: see the next test
    assert {k: type(getattr(model.config, k)) for k in types} == types
    bank = StyleBank.from_images(model, torch.randn(1, 3, 32, 32))
    assert StyleBank.load(bank.save(tmp_path / "bank.safetensors"), model).config == model.config.to_dict()


def test_a_numpy_float_ratio_gives_the_official_widths():
    """The official width is int(L * ratio) in the ratio's arithmetic: for np.float32(5 / 192) at L = 192
    float32 rounds the product to 5.0, where float64 gives 4.999...; converted to Python's float, the MLP
    had 4 hidden units, not the official 5, and the official weights' shapes did not fit."""
    ratio = np.float32(5 / 192)
    assert int(192 * ratio) == 5 and int(192 * float(ratio)) == 4
    model = StylizingViT("tiny", encoder_mlp_ratio=ratio, bottleneck_mlp_ratio=ratio, **SMALL)
    assert model.encoder.blocks[0].mlp.fc1.out_features == 5 and model.bottleneck.fc1.out_features == 5
    assert (
        model.config.to_dict()["mlp_ratio"] == float(ratio)
        and type(model.config.to_dict()["mlp_ratio"]) is float
    )


def test_the_post_convs_padding_modes_are_taken_as_officially():
    """nn.Conv2d takes padding='same' and 'valid', so the official constructor does: they were refused as
    'must be an integer >= 0'. They are the padding they give; an uneven 'same' is refused by name."""
    same = StylizingViT("tiny", post_process_conv_kernel_size=3, post_process_conv_padding="same", **SMALL)
    assert same.config.post_process_conv_padding == 1 and same.post_process_conv.padding == (1, 1)
    x = torch.randn(2, 3, 32, 32)
    reference = StylizingViT("tiny", post_process_conv_kernel_size=3, post_process_conv_padding=1, **SMALL)
    reference.load_state_dict(same.state_dict())
    torch.testing.assert_close(same(x), reference(x), rtol=0, atol=0)
    assert (
        StylizingViT("tiny", post_process_conv_padding="valid", **SMALL).config.post_process_conv_padding == 0
    )
    for kernel, mode in [(4, "same"), (5, "reflect")]:
        with pytest.raises(ValueError, match=f"post_process_conv_padding={mode!r} is not supported"):
            StylizingViT(
                "tiny", post_process_conv_kernel_size=kernel, post_process_conv_padding=mode, **SMALL
            )


def test_numpy_bools_count_as_flags_as_officially():
    """The official code tests the flags' truth, so np.True_ (a sweep's, a mask's item) built its model;
    here it was refused as no True or False, and kept it would not have saved as JSON."""
    model = StylizingViT("tiny", train=np.True_, bottleneck_bias=np.False_, **SMALL)
    assert model.training_mode is True and model.config.bottleneck_bias is False
    # None is false officially too (`if train:`, nn.Linear's `if bias:`), a config's "not set"
    model = StylizingViT("tiny", train=None, encoder_qkv_bias=None, **SMALL)
    assert model.training_mode is False and model.config.qkv_bias is False
    assert not hasattr(model, "vgg_encoder") and model.encoder.blocks[0].attn.q_proj.bias is None


def test_a_misspelt_backbone_warns():
    """Officially any other name is a custom ViT with base defaults: kept, with a warning where no
    encoder_* keyword makes it one (a misspelt 'Tiny' would be base)."""
    with pytest.warns(UserWarning, match="backbone 'Tiny' is no official name \\(did you mean 'tiny'\\?\\)"):
        assert create_model("Tiny", input_size=32).embed_dim == 768
    with pytest.warns(UserWarning, match="backbone 'Small' is no official name"):
        StylizingViT("Small", encoder_depth=1, input_size=32)  # keywords do not excuse a case typo
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert StylizingViT("mine", encoder_embed_dim=96, encoder_num_heads=3, **SMALL).embed_dim == 96


@pytest.mark.parametrize(
    "norm_layer, eps",
    [
        (None, 1e-6),
        ("nn.LayerNorm", 1e-6),  # the official code reads the string as its default
        (torch.nn.LayerNorm, 1e-5),
        (functools.partial(torch.nn.LayerNorm, eps=1e-6), 1e-6),
        (functools.partial(torch.nn.LayerNorm, eps=1e-3, elementwise_affine=True), 1e-3),
        (functools.partial(torch.nn.LayerNorm, eps=np.float32(0.5)), 0.5),  # stored as a float (JSON)
        (functools.partial(torch.nn.LayerNorm, elementwise_affine=True), 1e-5),  # torch's default eps
    ],
)
def test_encoder_norm_layer_sets_every_layernorm_eps(norm_layer, eps):
    kwargs = {} if norm_layer is None else {"encoder_norm_layer": norm_layer}
    model = StylizingViT("tiny", **kwargs, **SMALL)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 3 and {m.eps for m in norms} == {eps} and model.config.norm_eps == eps
    assert type(model.config.norm_eps) is float


@pytest.mark.parametrize(
    "shape,match",
    [
        ((3, 32, 32), r"must have shape \(B, 3, 32, 32\).*got \(3, 32, 32\)"),
        ((2, 1, 32, 32), r"must have shape \(B, 3, 32, 32\).*got \(2, 1, 32, 32\)"),
        ((2, 3, 64, 64), r"must have shape \(B, 3, 32, 32\).*got \(2, 3, 64, 64\)"),
        ((2, 3, 32, 48), r"must have shape \(B, 3, 32, 32\).*got \(2, 3, 32, 48\)"),
        ((0, 3, 32, 32), "is an empty batch"),
    ],
)
def test_bad_image_shapes(model, shape, match):
    with pytest.raises(ValueError, match="^x " + match):
        model(torch.randn(shape))
    with pytest.raises(ValueError, match="^x_style " + match):
        model(torch.randn(2, 3, 32, 32), torch.randn(shape))


def test_style_shape_must_match(model):
    with pytest.raises(ValueError, match=r"same shape as x.*\(2, 3, 32, 32\).*\(3, 3, 32, 32\)"):
        model(torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_images_are_refused_naming_the_normalization(model, dtype):
    """Not "convert one of them": an image.float() of 0-255 pixels would be stylized, silently wrong."""
    x = torch.zeros(1, 3, 32, 32, dtype=dtype)
    match = rf"^x has dtype {dtype}, but the model takes floating-point images normalized .* / 255"
    with pytest.raises(ValueError, match=match):
        model(x)
    with pytest.raises(ValueError, match=match.replace("^x", "^refs")):
        StyleBank.from_images(model, x)


def test_dtype_mismatch(model):
    with pytest.raises(ValueError, match="dtype torch.float64 but the model's parameters are torch.float32"):
        model(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(
        ValueError, match="dtype torch.bfloat16 but the model's parameters are torch.float32:"
    ):
        model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16))
    amp = torch.autocast("cpu", dtype=torch.bfloat16)
    with amp, pytest.raises(ValueError, match=r"torch.float32 \(or torch.bfloat16 under autocast\)"):
        model(torch.randn(1, 3, 32, 32, dtype=torch.float16))
    with amp, pytest.raises(ValueError, match=r"torch.bfloat16 \(or torch.float32 under autocast\)"):
        copy.deepcopy(model).bfloat16()(torch.randn(1, 3, 32, 32, dtype=torch.float16))


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("dtype,amp", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_a_half_model_under_the_other_half_autocast_is_refused(backend, dtype, amp):
    """Autocast casts the GEMMs' and convolutions' weights but not the class token: the embedding's
    concatenation failed inside autocast ("Unexpected floating ScalarType in at::autocast::prioritize"),
    in the forward, StyleBank.from_images, stylize and StyleAugment alike."""
    m = StylizingViT("tiny", backend=backend, **SMALL).to(dtype).eval()
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    match = f"parameters are {dtype}, which {amp} autocast cannot run"
    with torch.autocast("cpu", dtype=amp), torch.no_grad():
        with pytest.raises(ValueError, match=match):
            m(x)
        with pytest.raises(ValueError, match=match):
            StyleBank.from_images(m, x)
        with pytest.raises(ValueError, match=match):
            StyleAugment(m, p=1.0)(x)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_images_in_the_autocast_dtype_are_taken_under_autocast(backend):
    """As officially (its convolutions cast them): in eval the same outputs as float32 images, which
    autocast casts to that dtype at the patch embedding anyway (a training loss compares x itself)."""
    torch.manual_seed(0)
    m = StylizingViT("tiny", backend=backend, **SMALL).eval()
    x, s = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert torch.equal(m(x.bfloat16(), s.bfloat16()), m(x, s))
        assert torch.equal(m(x.bfloat16()), m(x))
        half = copy.deepcopy(m).bfloat16()  # float32 images reach a bfloat16 model cast, as officially
        assert torch.equal(half(x, s), half(x.bfloat16(), s.bfloat16()))
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        pytest.raises(ValueError, match="model's parameters are torch.float64:"),
    ):
        m.double()(x.bfloat16())  # autocast does not cast float64 weights


def test_device_mismatch(model):
    """Images on another device than the model are refused by name (meta stands in for a GPU here)."""
    with pytest.raises(ValueError, match="^x is on meta but the model is on cpu"):
        model(torch.randn(1, 3, 32, 32, device="meta"))
    with pytest.raises(ValueError, match="^x_style is on meta but the model is on cpu"):
        model(torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32, device="meta"))


def test_not_a_tensor(model):
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        model([[0.0]])
    with pytest.raises(TypeError, match="^x must be a torch.Tensor, got NoneType"):
        model(None)  # was an AttributeError on None.device: only x_style may be None


_IMAGES = torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize(
    "X,X_style,error,match",
    [
        (_IMAGES, torch.randn(3, 3, 32, 32), ValueError, r"^X_style must have the same shape as X .*X \(2,"),
        (_IMAGES, torch.randn(2, 1, 32, 32), ValueError, r"^X_style must have shape \(B, 3, 32, 32\)"),
        (_IMAGES, None, TypeError, "^X_style must be a torch.Tensor, got NoneType"),
        (None, _IMAGES, TypeError, "^X must be a torch.Tensor, got NoneType"),
        (_IMAGES.double(), _IMAGES.double(), ValueError, "^X has dtype torch.float64 but the model's"),
        (_IMAGES, _IMAGES.to("meta"), ValueError, "^X_style is on meta but the model is on cpu"),
    ],
)
def test_the_encoder_forward_checks_its_inputs_as_the_model_does(model, X, X_style, error, match):
    """model.encoder(X, X_style), part of the official surface, failed deep inside: a bare reshape error
    for a style batch of another size, a raw conv error for other channels, an AttributeError for None
    (which the official encoder does not take either: only the model rolls x into a missing style)."""
    with pytest.raises(error, match=match):
        model.encoder(X, X_style)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    from fastvit_style.kernels import _common

    monkeypatch.setattr(_common, "INTERPRET", False)  # what the kernels were defined under, not the env
    m = StylizingViT("tiny", backend="triton", **SMALL)
    # The model states the op's own reason: one check decides for both.
    with pytest.raises(ValueError, match="'triton' cannot run here: CPU tensors .* outside interpreter"):
        m(torch.randn(1, 3, 32, 32))


def test_a_backend_that_cannot_run_anywhere_fails_at_construction(monkeypatch):
    """What no device could change is refused when the model is built, not at its first forward."""
    monkeypatch.setitem(sys.modules, "xformers", None)  # import xformers fails as if not installed
    with pytest.raises(ValueError, match="'xformers' cannot run this model here: the xformers package"):
        StylizingViT("tiny", backend="xformers", **SMALL)
    with pytest.raises(ValueError, match="'triton' cannot run this model here: head dim d=8 unsupported"):
        StylizingViT("mine", encoder_embed_dim=192, encoder_num_heads=24, backend="triton", **SMALL)
    # 'auto' falls back per call, so a head size the kernels lack is no error for it.
    StylizingViT("mine", encoder_embed_dim=192, encoder_num_heads=24, backend="auto", **SMALL)


def test_auto_falls_back_with_one_warning_on_cuda_only(monkeypatch):
    """'auto' means PyTorch off CUDA, silently; on CUDA where Triton cannot run, PyTorch with a warning
    that says why (once per reason)."""
    import importlib

    from fastvit_style import backends

    op_module = importlib.import_module("fastvit_style.ops.shared_attention")
    monkeypatch.setattr(op_module, "_fallbacks_warned", set())
    monkeypatch.setattr(backends, "triton_unavailable_reason", lambda device, **kw: "no Triton in this test")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for device in ("cpu", "meta"):
            assert backends.resolve_backend("auto", torch.device(device)) == "torch"
    with pytest.warns(
        UserWarning, match="backend='auto' falls back to the PyTorch path: no Triton in this test"
    ):
        assert backends.resolve_backend("auto", torch.device("cuda")) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason again: no second warning
        assert backends.resolve_backend("auto", torch.device("cuda")) == "torch"


def test_fast_path_skips_the_index_range_check(model, monkeypatch):
    """The schedule builds its kv_index maps itself: no range check (one device sync per map) per call."""
    import importlib

    op_module = importlib.import_module("fastvit_style.ops.shared_attention")
    calls = []
    monkeypatch.setattr(op_module, "check_index_range", lambda *args: calls.append(args))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert calls == []


def test_train_and_eval_modes_do_not_change_numbers(model):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model.train()(x)
        b = model.eval()(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_batch_of_one_is_styled_by_itself(model):
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x, x.clone()), rtol=1e-6, atol=1e-6)


def test_create_model_without_weights_is_random_init():
    m = create_model("tiny", **SMALL)
    assert isinstance(m, StylizingViT) and not m.training_mode


def test_compute_loss_inputs():
    """compute_loss takes five image batches of one shape, or the rolled style as two Nones; anything
    else would broadcast in the MSEs (wrong numbers) or fail inside VGG19."""
    torch.manual_seed(0)
    train_model = StylizingViT("tiny", train=True, backend="torch", **SMALL)
    x, t, r = (torch.randn(3, 3, 32, 32) for _ in range(3))
    rolled = train_model.compute_loss(x, None, t, r, None)
    explicit = train_model.compute_loss(x, x.roll(-1, 0), t, r, r.roll(-1, 0))
    for a, b in zip(rolled, explicit):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="x_style and x_style_recon must both be tensors, or both None"):
        train_model.compute_loss(x, None, t, r, r)
    with pytest.raises(
        ValueError, match=r"x_recon must be a \(B, 3, H, W\) image batch of x's shape \(3, 3, 32, 32\)"
    ):
        train_model.compute_loss(x, x, t, r[:1], r)
    with pytest.raises(
        ValueError, match=r"x must be a \(B, 3, H, W\) image batch, got shape \(3, 1, 32, 32\)"
    ):
        train_model.compute_loss(x[:, :1], None, t[:, :1], r[:, :1], None)
    with pytest.raises(TypeError, match="x_stylized must be a tensor, got ndarray"):
        train_model.compute_loss(x, None, t.numpy(), r, None)
    # backend="reference": the official ops, the same numbers, and higher-order gradients.
    reference_model = StylizingViT("tiny", train=True, backend="reference", **SMALL)
    reference_model.load_state_dict(train_model.state_dict())
    t.requires_grad_()
    loss = reference_model.compute_loss(x, None, t, r, None)
    for a, b in zip(loss, rolled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    (g,) = torch.autograd.grad(sum(loss), t, create_graph=True)
    assert g.requires_grad


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_compute_loss_refuses_images_that_are_not_floating_point(dtype):
    """They failed inside VGG19 with "Input type (unsigned char) and bias type (float) should be the
    same", which names no argument."""
    model = StylizingViT("tiny", train=True, backend="torch", **SMALL)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=rf"x_recon must hold floating-point images.*got {dtype}"):
        model.compute_loss(x, None, x, x.to(dtype), None)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_compute_loss_refuses_images_of_another_dtype_than_its_vgg19(backend):
    """A float16 x_stylized beside a float32 VGG19, or float64 images, failed inside VGG19 with "Input
    type (c10::Half) and bias type (float) should be the same", which names no argument. Under
    autocast the VGG19 takes float32 and the autocast dtype, as the forward does."""
    model = StylizingViT("tiny", train=True, backend=backend, **SMALL)
    model.vgg_encoder.warn_if_random = False
    x = torch.randn(2, 3, 32, 32)
    expected = (
        r"x_stylized has dtype torch\.float16 but the VGG19 loss network's parameters are torch\.float32: "
    )
    with pytest.raises(ValueError, match=expected + "convert one of them"):
        model.compute_loss(x, None, x.half(), x, None)
    with pytest.raises(ValueError, match=r"^x has dtype torch\.float64 but the VGG19"):
        model.compute_loss(*(x.double(),) * 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model.compute_loss(x, None, x.bfloat16(), x, None).total())
        with pytest.raises(
            ValueError, match=r"x_recon has dtype torch\.float64 .* \(or torch\.bfloat16 under autocast\)"
        ):
            model.compute_loss(x, None, x, x.double(), None)
    half = copy.deepcopy(model).half()
    assert torch.isfinite(half.compute_loss(*(x.half(),) * 5).total())


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_compute_loss_refuses_an_empty_batch(backend):
    """Five (0, 3, H, W) batches gave four NaN losses (a mean over no element) without a word; the
    forward refuses an empty batch."""
    model = StylizingViT("tiny", train=True, backend=backend, **SMALL)
    x = torch.randn(0, 3, 32, 32)
    with pytest.raises(ValueError, match="x is an empty batch: at least one image is needed"):
        model.compute_loss(x, None, x, x, None)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("hw", [(31, 31), (48, 16)])
def test_compute_loss_refuses_images_too_small_for_the_vgg19(backend, hw):
    """They failed inside VGG19's last pooling: "Given input size: (512x1x1). Calculated output size:
    (512x0x0). Output size is too small" (the official code too)."""
    model = StylizingViT("tiny", train=True, backend=backend, **SMALL)
    x = torch.randn(2, 3, *hw)
    with pytest.raises(ValueError, match=rf"{hw[0]}x{hw[1]} px.*VGG19.*at least 32 px"):
        model.compute_loss(x, None, x, x, None)

    class OneMap(nn.Module):  # a replaced loss network takes what it takes
        def forward(self, images):
            return [images]

    model.vgg_encoder = OneMap()
    assert all(torch.isfinite(loss) for loss in model.compute_loss(x, None, x, x, None))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_loss_targets_that_require_grad_are_refused(backend):
    """The losses take x and x_style as fixed targets (their VGG19 features without a graph): a gradient
    to them would miss those terms (measured: half the directional derivative), so an x or x_style that
    requires grad is refused while grad mode is on, as the official losses assert; under no_grad it
    computes nothing wrong and runs."""
    model = StylizingViT("tiny", train=True, backend=backend, **SMALL)
    model.vgg_encoder.warn_if_random = False
    x, t, r = (torch.randn(2, 3, 32, 32) for _ in range(3))
    xg = x.clone().requires_grad_()
    with pytest.raises(ValueError, match=r"x requires grad, .* fixed targets .* pass x\.detach\(\)"):
        model(xg)
    with pytest.raises(ValueError, match=r"x_style requires grad, .* pass x_style\.detach\(\)"):
        model(x, xg)
    with pytest.raises(ValueError, match="x requires grad"):
        model.compute_loss(xg, None, t, r, None)
    with torch.no_grad():
        loss, _ = model(xg, xg)
    assert torch.isfinite(loss.total())


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"post_process_conv_padding": 0},
            r"cannot compute its losses: .* makes the reconstruction 28 px wide, not input_size 32: .* 2 \* padding \+ 1",
        ),
        ({"post_process_conv_kernel_size": 4}, r"makes the reconstruction 33 px wide"),
        ({"in_channel": 1}, "in_channel=1: the VGG19 loss network takes 3 channels"),
        ({"input_size": 16}, "input_size=16: the VGG19 loss network halves .* at least 32 px"),
    ],
)
def test_train_configs_whose_losses_cannot_run_are_refused(kwargs, match, backend):
    """Configs the official constructor accepts but whose losses crash (after the whole encoder) with a
    bare shape error are refused at the training forward with what they need; eval still runs them."""
    cfg = {**SMALL, **kwargs}
    model = StylizingViT("tiny", train=True, backend=backend, **cfg)
    x = torch.randn(2, cfg.get("in_channel", 3), cfg["input_size"], cfg["input_size"])
    with pytest.raises(ValueError, match=match):
        model(x)
    model.training_mode = False
    assert torch.isfinite(model(x)).all()


def test_a_replaced_post_process_conv_is_not_judged_by_the_config():
    """A post conv replaced by one that keeps the size trains, as officially: the config's kernel size and
    padding describe the conv they built, not its replacement."""
    model = StylizingViT("tiny", train=True, backend="torch", **{**SMALL, "post_process_conv_padding": 0})
    model.post_process_conv = nn.Conv2d(3, 3, 3, padding=1)
    loss, x_recon = model(torch.randn(2, 3, SMALL["input_size"], SMALL["input_size"]))
    assert x_recon.shape == (2, 3, SMALL["input_size"], SMALL["input_size"])
    assert torch.isfinite(loss.total())


def test_compute_loss_gradients_reach_every_generated_image():
    """model.compute_loss differentiates in x_stylized, x_recon and x_style_recon as the official ops
    do: float64, the fast losses against backend='reference' (the rolled style's shortcuts are covered
    by the training parity tests)."""
    fast = StylizingViT("tiny", train=True, backend="torch", **SMALL).double()
    official = StylizingViT("tiny", train=True, backend="reference", **SMALL).double()
    official.load_state_dict(fast.state_dict())
    gen = torch.Generator().manual_seed(3)
    x, x_style, *generated = (torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64) for _ in range(5))
    grads = []
    for model in (fast, official):
        t, r, sr = (g.clone().requires_grad_() for g in generated)
        loss = model.compute_loss(x, x_style, t, r, sr)
        grads.append(torch.autograd.grad(sum((k + 1) * term for k, term in enumerate(loss)), (t, r, sr)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


def test_every_backbone_alias_is_its_size():
    from fastvit_style.configs import BACKBONES, make_config

    for size in ("tiny", "small", "base", "large", "huge"):
        patch = 14 if size == "huge" else 16
        for alias in (f"vit_{size}", f"vit_{size}_patch{patch}_224"):
            assert BACKBONES[alias] == BACKBONES[size], alias
    assert make_config("vit_small_patch16_224").embed_dim == 384


def test_cuda_devices_are_resolved_by_rank_and_checked(monkeypatch):
    """A bare "cuda" (or none, where CUDA is available) is the process's GPU, cuda:LOCAL_RANK; an index
    past the visible GPUs is refused by name. (CUDA calls stubbed: no GPU needed.)"""
    from fastvit_style.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None, 1) == torch.device("cuda", 1)
    assert resolve_device("cuda", 1) == torch.device("cuda", 1)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"device 'cuda:2': only 2 CUDA device\(s\) here"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None, 1) == torch.device("cpu")
    for cuda, build in ((None, "has no CUDA"), ("12.8", "sees no GPU")):
        monkeypatch.setattr(torch.version, "cuda", cuda)
        with pytest.raises(ValueError, match=rf"device 'cuda': this torch build \(.*\) {build}"):
            resolve_device("cuda")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_a_batch_of_one_gives_every_parameter_a_gradient_with_its_strides(backend):
    """DDP's buckets take each parameter's strides and warn at every step where a gradient has others,
    even along a size-1 dim: a batch of 1 per process once handed cls_token a strided view of the
    tokens' gradient."""
    torch.manual_seed(0)
    model = StylizingViT("tiny", train=True, backend=backend, **SMALL)
    x = torch.rand(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random VGG19's warning
        loss, _ = model(x)
    loss.total().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert p.grad.stride() == p.stride(), name
