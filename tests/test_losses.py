"""fastvit_style.losses: pieces of the fast losses against the official ops (the whole losses are
compared in test_model_parity)."""

import pytest
import torch
import torch.nn.functional as F

from fastvit_style import losses


@pytest.mark.parametrize("layout", ["channels_last", "nchw", "mixed"])
def test_map_mse_is_the_official_mse(layout, monkeypatch):
    """map_mse gives F.mse_loss's value and gradient on maps of any layout, and
    hands F.mse_loss contiguous operands where both maps are channels-last (torch's CPU backward runs
    a slow strided loop on channels-last maps)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(2, 5, 6, 7, generator=gen) for _ in range(2))
    if layout != "nchw":
        a = a.contiguous(memory_format=torch.channels_last)
        b = b if layout == "mixed" else b.contiguous(memory_format=torch.channels_last)
    a.requires_grad_()
    expected = F.mse_loss(a, b)
    (expected_grad,) = torch.autograd.grad(expected, a)
    operands = []
    real = F.mse_loss
    monkeypatch.setattr(losses.F, "mse_loss", lambda x, y: operands.append((x, y)) or real(x, y))
    got = losses.map_mse(a, b)
    (grad,) = torch.autograd.grad(got, a)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=0)
    if layout == "channels_last":  # the layout of the VGG's maps, which its backward reads
        assert grad.is_contiguous(memory_format=torch.channels_last)
    assert all(t.is_contiguous() for t in operands[0]) == (layout != "mixed")


def test_map_mse_under_vmap():
    """Per-sample MSEs through torch.func.vmap, which cannot query a memory format (as in per-sample
    losses of the whole model)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, 2, 4, 5, 6, generator=gen) for _ in range(2))
    got = torch.func.vmap(losses.map_mse)(a, b)
    torch.testing.assert_close(got, torch.stack([F.mse_loss(x, y) for x, y in zip(a, b)]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("compiled", [False, True])
def test_half_style_statistics_are_float32_with_a_given_style_as_with_the_roll(compiled):
    """The statistics of half maps are float32 with an explicit x_style as with the roll, compiled as
    in eager mode: an fp16 variance of a map with std above 256 is inf, which made the style loss inf
    with one and finite with the other, and compiled ones 0 (anatomical) and NaN (style)."""
    gen = torch.Generator().manual_seed(0)
    x, x_stylized, x_recon = (torch.randn(4, 3, 8, 8, generator=gen).half() for _ in range(3))

    def vgg(images):  # a replaced loss network, whose maps have std 1000
        return [images.float().mul(1000).half()]

    loss = losses.compute_loss
    if compiled:
        torch._dynamo.reset()
        loss = torch.compile(loss, backend="eager", fullgraph=True)
    rolled = loss(vgg, x, None, x_stylized, x_recon, None)
    given = loss(vgg, x, x.roll(-1, 0), x_stylized, x_recon, x_recon.roll(-1, 0))
    eager = losses.compute_loss(vgg, x, None, x_stylized, x_recon, None)
    assert eager.style.isfinite() and eager.anatomical > 0
    torch.testing.assert_close(rolled.style, eager.style, rtol=2e-3, atol=0)
    torch.testing.assert_close(rolled.anatomical, eager.anatomical, rtol=2e-3, atol=0)
    for name in ("identity", "consistency", "anatomical", "style"):
        torch.testing.assert_close(getattr(given, name), getattr(rolled, name), rtol=2e-3, atol=0)
