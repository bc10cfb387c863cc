"""Winograd F(2x2, 3x3) convolutions (the fast losses' VGG on CPU) against F.conv2d."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCE, assert_close_rel

from fastvit_style.layers import winograd
from fastvit_style.layers.vgg19 import VGG19_CONVS, VGG19Features
from fastvit_style.layers.winograd import conv3x3, transform_weight, use_winograd, winograd_conv3x3


def frozen_conv(cin, cout, dtype, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(cin, cout, 3, padding=1).to(dtype).requires_grad_(False)
    with torch.no_grad():
        conv.bias.normal_()
    return conv


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(2, 5, 6, 8), (1, 3, 2, 2), (3, 4, 10, 4)])
def test_forward_and_input_gradient_match_conv2d(shape, dtype):
    N, C, H, W = shape
    conv = frozen_conv(C, 7, dtype)
    x = torch.randn(shape, dtype=torch.float64).relu().to(dtype)
    g = torch.randn(N, 7, H, W, dtype=dtype)
    outs = []
    for fn in (lambda t: F.conv2d(t, conv.weight, conv.bias, padding=1),
               lambda t: winograd_conv3x3(t, transform_weight(conv.weight), conv.bias)):  # fmt: skip
        outs.append(fn(x))
    assert_close_rel(outs[1], outs[0], TOLERANCE[dtype], "output")
    # the input gradient: the same convolution with the kernel flipped and its channels swapped
    flipped = conv.weight.flip(2, 3).transpose(0, 1)
    xr = x.clone().requires_grad_()
    F.conv2d(xr, conv.weight, conv.bias, padding=1).backward(g)
    assert_close_rel(winograd_conv3x3(g, transform_weight(flipped), None), xr.grad, TOLERANCE[dtype], "d x")


@pytest.mark.skipif(not winograd.onednn_ready(torch.float32), reason="torch without oneDNN (mkldnn)")
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # from mkldnn.flags()
def test_onednn_tile_products_match_conv2d_and_follow_the_switch():
    """float32: the 16 tile-position GEMMs as oneDNN matmuls on packed transforms (forward and input
    gradient, against float64); with oneDNN switched off, the bmm on plain transforms again."""
    conv = frozen_conv(6, 512, torch.float32, seed=1)
    x = torch.randn(2, 6, 10, 6, dtype=torch.float64).relu()
    expected = F.conv2d(x, conv.weight.double(), conv.bias.double(), padding=1)
    packed = winograd.pack_for_onednn(transform_weight(conv.weight))
    assert len(packed) == 16
    assert_close_rel(
        winograd_conv3x3(x.float(), packed, conv.bias), expected, TOLERANCE[torch.float32], "packed"
    )
    xr = x.float().requires_grad_()
    g = torch.randn_like(expected)
    out = conv3x3(xr, conv)
    assert isinstance(winograd._transforms_of[conv][1], tuple)  # packed where oneDNN is ready
    out.backward(g.float())
    x64 = x.clone().requires_grad_()
    F.conv2d(x64, conv.weight.double(), conv.bias.double(), padding=1).backward(g)
    assert_close_rel(out, expected, TOLERANCE[torch.float32], "conv3x3")
    assert_close_rel(xr.grad, x64.grad, TOLERANCE[torch.float32], "d x")
    with torch.backends.mkldnn.flags(enabled=False):
        assert_close_rel(conv3x3(x.float(), conv), expected, TOLERANCE[torch.float32], "bmm")
        assert isinstance(winograd._transforms_of[conv][1], torch.Tensor)
    # One tile (a single GEMM row, another oneDNN kernel), and a double backward through packed transforms.
    one = torch.randn(1, 6, 2, 2, dtype=torch.float64)
    single = F.conv2d(one, conv.weight.double(), conv.bias.double(), padding=1)
    assert_close_rel(conv3x3(one.float(), conv), single, TOLERANCE[torch.float32], "one tile")
    xr, x64 = x.float().requires_grad_(), x.clone().requires_grad_()
    grads = []
    for t, weight, bias in ((xr, conv.weight, conv.bias), (x64, conv.weight.double(), conv.bias.double())):
        y = conv3x3(t, conv) if t is xr else F.conv2d(t, weight, bias, padding=1)
        (gx,) = torch.autograd.grad(y.square().sum(), t, create_graph=True)
        gx.square().sum().backward()
        grads.append(t.grad)
    assert_close_rel(grads[0], grads[1], TOLERANCE[torch.float32], "double backward")


def test_autograd_path_and_cached_transforms():
    conv = frozen_conv(4, 512, torch.float64)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    assert use_winograd(x, conv)
    assert torch.autograd.gradcheck(lambda t: conv3x3(t, conv), (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda t: conv3x3(t, conv), (x,), fast_mode=True)  # create_graph
    first = winograd._transforms_of[conv]
    conv3x3(x, conv)
    assert winograd._transforms_of[conv] is first  # reused while the weight is unchanged
    with torch.no_grad():
        conv.weight.mul_(2)  # a new version: the transforms follow it
    assert_close_rel(conv3x3(x, conv), F.conv2d(x, conv.weight, conv.bias, padding=1), 1e-12, "after update")
    conv.weight.data.mul_(1.5)  # behind the version counter (hand-written loaders, EMA): seen all the same
    assert_close_rel(conv3x3(x, conv), F.conv2d(x, conv.weight, conv.bias, padding=1), 1e-12, "after .data")
    assert not any("winograd" in name for name in (*conv.state_dict(), *vars(conv)))


def test_transforms_are_neither_pickled_nor_kept_past_a_cast():
    """Kept beside the convs, not on them: a pickle, deepcopy or torch.save of the model does not carry
    4x its VGG19's size of transforms, and a cast or move drops them."""
    vgg = VGG19Features()
    with torch.no_grad():
        vgg(torch.randn(1, 3, 32, 32), fast=True)
    convs = [m for m in vgg.modules() if m in winograd._transforms_of]
    assert len(convs) == sum(out_ch >= 512 for _, out_ch in VGG19_CONVS)
    size = len(pickle.dumps(vgg))
    assert size < 1.01 * sum(p.numel() * 4 for p in vgg.parameters())
    assert not any(m in winograd._transforms_of for m in copy.deepcopy(vgg).modules())
    vgg.double()
    assert not any(m in winograd._transforms_of for m in vgg.modules())


def test_weights_that_are_inference_tensors():
    """A model built under torch.inference_mode has weights without version counters: the transforms
    follow them through the sample, as for writes through .data."""
    with torch.inference_mode():
        conv = frozen_conv(4, 512, torch.float64)
        x = torch.randn(1, 4, 4, 4, dtype=torch.float64)
        assert_close_rel(conv3x3(x, conv), F.conv2d(x, conv.weight, conv.bias, padding=1), 1e-12, "first")
        conv.weight.mul_(2)
        assert_close_rel(conv3x3(x, conv), F.conv2d(x, conv.weight, conv.bias, padding=1), 1e-12, "after")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transforms_built_in_inference_mode_serve_training(dtype):
    """A validation pass under torch.inference_mode builds the transforms (inference tensors); the next
    training step's backward, and a double backward, use them."""
    conv = frozen_conv(8, 512, dtype)
    x = torch.randn(2, 8, 6, 6, dtype=dtype)
    with torch.inference_mode():
        conv3x3(x, conv)
    xr = x.clone().requires_grad_()
    conv3x3(xr, conv).square().sum().backward()
    x64 = x.double().requires_grad_()
    F.conv2d(x64, conv.weight.double(), conv.bias.double(), padding=1).square().sum().backward()
    assert_close_rel(xr.grad, x64.grad, TOLERANCE[dtype], "d x")
    if dtype == torch.float64:
        assert torch.autograd.gradgradcheck(lambda t: conv3x3(t, conv), (xr,), fast_mode=True)


def test_torch_func_transforms_take_the_direct_convolution():
    """vmap and grad cannot run the Winograd Function (nor query channels-last layouts): the losses'
    VGG19 gives way to the plain convolution under them, with the same numbers."""
    vgg = VGG19Features().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fast = torch.func.vmap(lambda t: vgg(t[None], fast=True)[-1])(x)
    assert_close_rel(fast[:, 0], vgg(x)[-1], 1e-12, "vmap")
    g = torch.func.grad(lambda t: vgg(t, fast=True)[-2].square().sum())(x)
    xr = x.clone().requires_grad_()
    vgg(xr)[-2].square().sum().backward()
    assert_close_rel(g, xr.grad, 1e-12, "grad")


def test_cached_transforms_follow_an_in_place_edit_off_the_sample():
    """An in-place write to one element that the strided sample skips (flat index 1): the version
    counter alone tells the transforms to follow."""
    conv = frozen_conv(4, 512, torch.float64)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    conv3x3(x, conv)
    with torch.no_grad():
        conv.weight[0, 0, 0, 1] += 1.0
    assert_close_rel(conv3x3(x, conv), F.conv2d(x, conv.weight, conv.bias, padding=1), 1e-12, "after edit")


def test_transforms_first_built_under_inference_mode():
    """A validation pass under torch.inference_mode first, training after it: the cached transforms
    must be tensors that autograd may save."""
    conv = frozen_conv(4, 512, torch.float64)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    with torch.inference_mode():
        conv3x3(x.detach(), conv)
    conv3x3(x, conv).sum().backward()
    xr = x.detach().requires_grad_()
    F.conv2d(xr, conv.weight, conv.bias, padding=1).sum().backward()
    assert_close_rel(x.grad, xr.grad, 1e-12, "d x")


def test_direct_where_winograd_does_not_pay_or_apply():
    conv = frozen_conv(4, 512, torch.float32)
    assert use_winograd(torch.randn(1, 4, 6, 6), conv)
    assert not use_winograd(torch.randn(1, 4, 5, 6), conv)  # odd side
    assert not use_winograd(torch.randn(1, 4, 6, 5), conv)  # odd width only
    assert not use_winograd(torch.randn(0, 4, 6, 6), conv)  # empty batch
    assert conv3x3(torch.randn(0, 4, 6, 6), conv).shape == (0, 512, 6, 6)
    assert not use_winograd(torch.randn(1, 4, 6, 6), frozen_conv(4, 256, torch.float32))  # few channels
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_winograd(torch.randn(1, 4, 6, 6), conv)
    conv.bias.requires_grad_(True)  # a bias gradient: conv2d (the Winograd Function returns none)
    assert not use_winograd(torch.randn(1, 4, 6, 6), conv)
    conv.bias.requires_grad_(False)
    conv.weight.requires_grad_(True)  # the weight's gradient (the Function returns none): conv2d
    assert not use_winograd(torch.randn(1, 4, 6, 6), conv)
    assert not use_winograd(torch.randn(1, 4, 6, 6), conv.requires_grad_(True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_direct_for_half_dtypes_outside_autocast(dtype):
    """Half tensors (a model cast with .bfloat16(), no autocast) keep the direct convolution's rounding."""
    conv = frozen_conv(4, 512, torch.float32).to(dtype)
    x = torch.randn(1, 4, 6, 6).to(dtype)
    assert not use_winograd(x, conv)
    assert torch.equal(conv3x3(x, conv), conv(x))


def test_direct_off_the_cpu():
    """Other devices keep the direct convolution (cuDNN picks its own algorithms); meta stands in here."""
    conv = frozen_conv(4, 512, torch.float32).to("meta")
    assert not use_winograd(torch.empty(1, 4, 6, 6, device="meta"), conv)


class _HalvedConv(torch.nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 0.5


@pytest.mark.parametrize("change", ["pre_hook", "subclass", "wrapper", "reflect", "dilated", "grouped"])
def test_a_replaced_or_hooked_conv_is_called_as_a_module(change):
    """Surgery on a deep VGG conv (512 channels: Winograd's) takes effect in the fast losses' VGG as in
    the reference's: a pre-hook that edits the input, a subclass with its own forward, a wrapper
    without a weight of its own (which Winograd read, an AttributeError), a plain conv with reflect
    padding, dilation or groups (which Winograd computed as a zero-padded dense 3x3)."""
    torch.manual_seed(0)
    vgg = VGG19Features().double()
    conv = vgg.features_28
    if change == "pre_hook":
        conv.register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))
    elif change == "subclass":
        vgg.features_28 = _HalvedConv(512, 512, 3, padding=1).double().requires_grad_(False)
        vgg.features_28.load_state_dict(conv.state_dict())
    elif change == "wrapper":
        vgg.features_28 = torch.nn.Sequential(conv)
    else:  # a plain nn.Conv2d of another geometry, which Winograd computed as a zero-padded dense 3x3
        kwargs = {"reflect": {"padding_mode": "reflect"}, "dilated": {"padding": 2, "dilation": 2},
                  "grouped": {"groups": 2}}[change]  # fmt: skip
        vgg.features_28 = (
            torch.nn.Conv2d(512, 512, 3, **{"padding": 1, **kwargs}).double().requires_grad_(False)
        )
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        direct, fast = vgg(x), vgg(x, fast=True)
    for j, (a, e) in enumerate(zip(fast, direct)):
        assert_close_rel(a, e, 1e-12, f"level {j}")


# (1, 3, 32, 48): non-square images (compute_loss takes any H, W) whose stage-5 maps are 2x3, an
# even height and an odd width: the direct convolution there, not a Winograd tile short of a column.
@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 3, 32, 48)])
def test_vgg_features_with_winograd_match_direct(shape):
    torch.manual_seed(0)
    vgg = VGG19Features().double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    direct = vgg(x)
    fast = vgg(x, fast=True)
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in fast)  # oneDNN's own layout
    for j, (a, e) in enumerate(zip(fast, direct)):
        assert_close_rel(a, e, 1e-12, f"level {j}")
    g_direct = torch.autograd.grad(sum(f.square().sum() for f in direct), x)[0]
    g_fast = torch.autograd.grad(sum(f.square().sum() for f in fast), x)[0]
    assert_close_rel(g_fast, g_direct, 1e-12, "d x")


def test_fast_losses_run_vgg19_the_fast_way(monkeypatch):
    """The fast losses call our VGG19 with fast=True (every conv through conv3x3, which picks Winograd
    where it pays), the reference losses the plain way: three VGG passes of 16 convs with the roll."""
    from fastvit_style import StylizingViT
    from fastvit_style.layers import vgg19

    calls = []
    monkeypatch.setattr(vgg19, "conv3x3", lambda x, conv: calls.append(conv) or conv(x))
    model = StylizingViT("tiny", train=True, backend="torch", input_size=32, encoder_depth=1)
    model.vgg_encoder.warn_if_random = False
    x, t, r = (torch.randn(2, 3, 32, 32) for _ in range(3))
    with torch.no_grad():
        model.compute_loss(x, None, t, r, None)
        assert len(calls) == 3 * len(VGG19_CONVS)
        model.backend = "reference"
        model.compute_loss(x, None, t, r, None)
    assert len(calls) == 3 * len(VGG19_CONVS)


def test_vgg_features_without_fast_keep_the_input_layout():
    """The reference losses' calls (fast=False) return NCHW maps for NCHW input, as timm's VGG19."""
    vgg = VGG19Features()
    with torch.no_grad():
        feats = vgg(torch.randn(1, 3, 32, 32))
    assert all(f.is_contiguous() for f in feats)


def test_random_vgg19_init_is_torchvisions():
    """Kaiming normal, fan_out, zero biases: std sqrt(2 / (9 Cout)) per conv (activations at scale)."""
    vgg = VGG19Features()
    for idx, out_ch in VGG19_CONVS:
        conv = getattr(vgg, f"features_{idx}")
        ratio = conv.weight.std().item() / (2 / (9 * out_ch)) ** 0.5
        assert abs(ratio - 1) < 0.1, (idx, ratio)
        assert not conv.bias.any()
