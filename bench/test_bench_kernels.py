"""Micro-benchmarks on the GPU: the shared-attention op per backend, one model forward, and the
training losses' VGG19 on NCHW against channels-last maps.

    pytest bench/ --benchmark-only [--benchmark-json OUT.json]

Shapes are the model's: per layer, 3B query sequences [content; style; stylized] over 2B K/V
sequences [content; style], T=197, d=64, bf16. The full comparison with SDPA/xformers/FlexAttention
is bench/sweep_shared_attention.py; the end-to-end numbers are `fastvit-style bench`.
"""

import pytest
import torch

from fastvit_style import StylizingViT
from fastvit_style.layers import vgg19
from fastvit_style.ops import shared_attention

T, D, B = 197, 64, 32
BACKENDS = ["torch", "triton"]


def _layer_inputs(heads: int, requires_grad: bool):
    q = torch.randn(3 * B, T, heads, D, device="cuda", dtype=torch.bfloat16, requires_grad=requires_grad)
    k, v = (
        torch.randn(2 * B, T, heads, D, device="cuda", dtype=torch.bfloat16, requires_grad=requires_grad)
        for _ in range(2)
    )
    index = torch.cat([torch.arange(B), torch.arange(B, 2 * B), torch.arange(B, 2 * B)]).to(
        "cuda", torch.int32
    )
    return q, k, v, index


@pytest.mark.parametrize("heads", [pytest.param(3, id="tiny-H3"), pytest.param(12, id="base-H12")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_attention_forward(cuda_benchmark, backend, heads):
    q, k, v, index = _layer_inputs(heads, requires_grad=False)
    cuda_benchmark(lambda: shared_attention(q, k, v, index, backend=backend))


@pytest.mark.parametrize("heads", [pytest.param(3, id="tiny-H3"), pytest.param(12, id="base-H12")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_attention_forward_backward(cuda_benchmark, backend, heads):
    q, k, v, index = _layer_inputs(heads, requires_grad=True)
    grad = torch.randn_like(q)

    def fwd_bwd():
        torch.autograd.grad(shared_attention(q, k, v, index, backend=backend), (q, k, v), grad)

    cuda_benchmark(fwd_bwd)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_model_stylize_bf16(cuda_benchmark, backend):
    model = StylizingViT("base", backend=backend).cuda()
    x, x_style = torch.randn(2, B, 3, 224, 224, device="cuda")

    def stylize():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x, x_style)

    cuda_benchmark(stylize)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_vgg_losses_layout(cuda_benchmark, monkeypatch, channels_last):
    """What the fast losses' VGG19 passes of one base training step cost (x without a graph, the
    stylized and reconstructed batches with one; bf16 autocast) in either memory layout."""
    monkeypatch.setattr(vgg19, "use_channels_last", lambda x: channels_last and x.is_cuda)
    vgg = vgg19.VGG19Features().cuda()
    x, x_stylized, x_recon = torch.randn(3, B, 3, 224, 224, device="cuda")
    x_stylized.requires_grad_(True)
    x_recon.requires_grad_(True)

    def losses():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.no_grad():
                targets = vgg(x, fast=True)
            total = sum(
                (a.float() - t.float()).square().mean() + (b.float() - t.float()).square().mean()
                for a, b, t in zip(vgg(x_stylized, fast=True), vgg(x_recon, fast=True), targets)
            )
        torch.autograd.grad(total, (x_stylized, x_recon))

    cuda_benchmark(losses)
