"""What code written against the official package reaches besides forward and state_dict: every
parameter's gradient, the submodules' own forwards and getters, the model's helper methods and the
official utilities. tests/test_official_parity.py compares the same against the official package."""

import math

import numpy as np
import pytest
import torch
from helpers import ENCODER_ATTRIBUTES, TOLERANCE, assert_close_rel, images, randomize_

from fastvit_style import StylizingViT, reference, resize_image, util
from fastvit_style.imageio import resize_pad

FP32 = TOLERANCE[torch.float32]
KW = {"input_size": 32, "encoder_depth": 2}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_every_parameter_gets_a_gradient(train):
    """k_proj.bias too (an exact zero, as softmax cancels it): DDP without find_unused_parameters and
    AdamW's weight decay treat a None gradient as an unused parameter, the official model has none."""
    model = randomize_(StylizingViT("tiny", train=train, **KW))
    out = model(images(3, 32))
    (out[0].total() if train else out.square().mean()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, p in trainable if p.grad is None] == []
    for blk in model.encoder.blocks:
        assert torch.equal(blk.attn.k_proj.bias.grad, torch.zeros_like(blk.attn.k_proj.bias))


def test_submodule_forwards_compute_the_official_calls():
    model = randomize_(StylizingViT("tiny", **KW))
    x, x_style = images(2, 32, seed=1), images(2, 32, seed=2)
    with torch.no_grad():
        _, _, z_t = model.encoder(x, x_style)
        assert_close_rel(model.reconstruct_patches(z_t[:, 1:]), model(x, x_style), FP32, "encoder forward")
        tokens, context = torch.randn(2, 5, 192), torch.randn(2, 5, 192)
        block = model.encoder.blocks[0]
        assert torch.equal(block(tokens, context), reference.cross_attention_block(block, tokens, context))
        assert block(tokens) is tokens  # the official block returns X when Y is None
        u = model.bottleneck(z_t)
        image = model.reconstruct_image(*u.chunk(2, dim=-1))
        assert_close_rel(image, model(x, x_style), FP32, "reconstruct_image")
    getters = [
        getattr(model.encoder, f"get_{n}")() for n in ("input_size", "patch_size", "in_channel", "embed_dim")
    ]
    assert getters == [32, 16, 3, 192] and (model.in_channel, model.patch_size, model.embed_dim) == (
        3,
        16,
        192,
    )
    with pytest.raises(ValueError, match="train=True"):
        model.compute_loss(*(images(1, 32),) * 5)


@pytest.mark.parametrize("side", [47, 64])
def test_the_encoder_takes_only_its_input_size(side):
    """model.encoder(x, x_style) called directly, as officially (timm's strict_img_size): 47 px would
    give the 32 px grid (the last rows and columns dropped, silently), 64 px a broadcast error."""
    enc = StylizingViT("tiny", **KW).encoder
    x = images(2, side)
    with pytest.raises(ValueError, match=rf"^X must have shape \(B, 3, 32, 32\).* \(2, 3, {side}, {side}\)"):
        enc(x, x)
    with pytest.raises(ValueError, match=rf"takes 32x32 images .* got shape \(2, 3, {side}, {side}\)"):
        enc.patch_embed(x)  # timm's PatchEmbed, called on its own


def test_official_attributes():
    enc = StylizingViT("tiny", **KW).encoder
    assert [getattr(enc, name) for name in ENCODER_ATTRIBUTES] == [32, 3, 16, 192, 2, 3, 4.0, True, 4]
    assert enc.norm_layer(8).eps == 1e-6
    pe = enc.patch_embed
    assert (pe.img_size, pe.patch_size, pe.grid_size, pe.num_patches) == ((32, 32), (16, 16), (2, 2), 4)
    keys = StylizingViT("tiny", encoder_qkv_bias=False, bottleneck_bias=False, **KW).state_dict().keys()
    biases = {k for k in keys if k.endswith("bias") and (".attn." in k or "bottleneck" in k)}
    assert biases == {
        "encoder.blocks.0.attn.out_proj.bias",
        "encoder.blocks.1.attn.out_proj.bias",
    }  # as officially
    pe = StylizingViT("tiny", input_size=48, encoder_depth=1).encoder.patch_embed  # a 3x3 grid
    assert (pe.img_size, pe.patch_size, pe.grid_size, pe.num_patches) == ((48, 48), (16, 16), (3, 3), 9)
    with pytest.raises(AttributeError):
        enc.depth = 3  # the blocks exist already: changing the number would mislead
    with pytest.raises(TypeError, match="backbone must be a str"):
        StylizingViT(None, encoder_depth=1)


def test_initial_embeddings_are_maes():
    """pos_embed: a zero CLS row, then per patch (row-major) sin and cos of its column over the first
    half of the channels and of its row over the second, at frequencies 10000^(-k / (L/4)), k < L/4;
    cls_token: N(0, 0.02^2). (test_official_parity compares the whole init with the official one.)"""
    from fastvit_style.layers.encoder import sincos_pos_embed

    dim, grid = 16, 3
    table = sincos_pos_embed(dim, grid)
    assert table.shape == (grid * grid + 1, dim) and table.dtype == torch.float64 and not table[0].any()
    freqs = [10000 ** (-k / (dim // 4)) for k in range(dim // 4)]
    for r in range(grid):
        for c in range(grid):
            expected = [f(pos * w) for pos in (c, r) for f in (math.sin, math.cos) for w in freqs]
            torch.testing.assert_close(table[1 + r * grid + c], torch.tensor(expected, dtype=torch.float64))
    enc = StylizingViT("tiny", input_size=48, encoder_depth=1).encoder
    assert torch.equal(enc.pos_embed[0], sincos_pos_embed(192, 3).float())
    assert 0.015 < enc.cls_token.std().item() < 0.025  # 192 draws: within 5 standard errors


def test_utilities():
    x = torch.randn(2, 3, 32, 32)
    patches = util.patchify_image(x, 3, 16)
    assert patches.shape == (2, 4, 768) and torch.equal(util.unpatchify_image(patches, 16, 3), x)
    torch.testing.assert_close(patches[0, 1, :3], x[0, :, 0, 16])  # patch (0, 1), pixel (0, 0), channels last
    with pytest.raises(ValueError, match="square"):
        util.patchify_image(x[..., :30], 3, 16)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    torch.testing.assert_close(util.denormalize_image(util.normalize_image(x, mean, std), mean, std), x)
    u8 = torch.tensor([100, 50, 200], dtype=torch.uint8).view(3, 1, 1)  # constants in float32, as officially
    expected = (u8.float() - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.equal(util.normalize_image(u8, mean, std), expected)
    back = u8.float() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    assert torch.equal(util.denormalize_image(u8, mean, std), back)

    wide = torch.rand(2, 3, 10, 20)
    out = resize_image(wide, 8, fill=0.5)  # longer side 20 -> 8, the other 4, centred on 0.5
    assert out.shape == (2, 3, 8, 8) and torch.equal(out[..., :2, :], torch.full((2, 3, 2, 8), 0.5))
    square = torch.rand(3, 8, 8)
    assert resize_image(square, 8) is square
    for dtype in (torch.float16, torch.bfloat16, torch.bool):  # resized in float32, returned as given
        assert resize_image(torch.ones(3, 12, 6, dtype=dtype), 8).dtype == dtype
    pixels = torch.randint(0, 256, (3, 12, 6), dtype=torch.uint8)
    assert resize_image(pixels, 8).dtype == torch.uint8
    from PIL import Image

    pil = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    assert torch.equal(resize_image(pil, 8), resize_image(pixels, 8))
    grey = Image.fromarray(np.zeros((6, 6), np.uint8))
    assert resize_image(grey, 8).shape == (1, 8, 8)


def test_loss_weights_are_the_official_ones():
    """lambda 70/1/7/10 (identity, consistency, anatomical, style: shared doc 3.3), the default of
    Loss.total and of training; the demo notebook's 70/1/10/7 swaps the last two."""
    from fastvit_style.train_config import TrainConfig

    terms = reference.Loss(*(torch.tensor(10.0**i) for i in range(4)))
    assert terms.total().item() == 70 + 10 + 700 + 10000
    assert tuple(TrainConfig.loss_weights) == (70.0, 1.0, 7.0, 10.0)


@pytest.mark.parametrize("weights", [(70, 1, 7), (70, 1, 7, 10, 5), 70.0, torch.tensor(70.0)])
def test_loss_total_refuses_weights_that_are_not_one_per_term(weights):
    """zip stopped at the shorter: three weights dropped the style term from the total without a word,
    a fifth was ignored; a single number failed with "'float' object is not iterable"."""
    terms = reference.Loss(*(torch.tensor(10.0**i) for i in range(4)))
    with pytest.raises(
        ValueError, match=r"weights must be 4 numbers, one per term \(identity, consistency, "
    ):
        terms.total(weights)
    assert terms.total(torch.tensor([1.0, 0, 0, 1])).item() == 1001


def test_resize_image_rounds_and_thresholds_what_it_returns_as_given():
    """Integer pixels are rounded back (not truncated), a mask keeps its edge (threshold 1/2), float64
    is resized in float64; an image of fewer than 3 dims, or patches of no square grid, are refused."""
    pixels = torch.randint(0, 256, (3, 12, 6), dtype=torch.uint8)
    rounded = resize_image(pixels.float(), 8).round().to(torch.uint8)
    assert torch.equal(resize_image(pixels, 8), rounded)
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[..., :8] = True  # the left half
    assert torch.equal(resize_image(mask, 8), mask[..., ::2, ::2])
    wide = torch.rand(3, 10, 20, dtype=torch.float64)
    assert torch.equal(resize_image(wide, 8), resize_pad(wide, 8))
    with pytest.raises(ValueError, match=r"needs a \(..., C, H, W\) image, got shape \(12, 6\)"):
        resize_image(torch.rand(12, 6), 8)
    with pytest.raises(ValueError, match="N a square"):
        util.unpatchify_image(torch.zeros(2, 5, 768), 16, 3)


@pytest.mark.parametrize(
    "image, size, match",
    [
        (torch.rand(3, 12, 6), 0, "size must be a positive int, got 0"),
        (torch.rand(3, 12, 6), -8, "size must be a positive int, got -8"),
        (torch.rand(3, 12, 6), 8.5, "size must be a positive int, got 8.5"),
        (torch.rand(3, 12, 6), "8", "size must be a positive int, got '8'"),
        (torch.rand(3, 12, 6), True, "size must be a positive int, got True"),
        (torch.rand(3, 12, 6), torch.tensor(8.0), r"size must be a positive int, got tensor\(8.\)"),
        (torch.rand(3, 0, 6), 8, r"needs an image of at least 1x1 pixels, got shape \(3, 0, 6\)"),
        (torch.rand(3, 12, 6, dtype=torch.complex64), 8, "real-valued image, got torch.complex64"),
    ],
)
def test_resize_image_refuses_a_bad_size_an_empty_or_a_complex_image(image, size, match):
    """They failed inside: a size of 0 in interpolate ("Input and output sizes should be greater than 0"), a
    float or str one in it or in int(size * w / h), an empty image in a reshape, a complex one in
    torch.iinfo ("requires an integer input type"); True made a 1x1 image."""
    with pytest.raises(ValueError, match=match):
        resize_image(image, size)


def test_resize_image_takes_numpy_and_0d_tensor_sizes():
    wide = torch.rand(3, 10, 20)
    for size in (np.int64(8), torch.tensor(8)):
        assert torch.equal(resize_image(wide, size), resize_image(wide, 8))
