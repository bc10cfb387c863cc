"""3x3 convolutions (stride 1, padding 1) by Winograd's F(2x2, 3x3): the frozen VGG19 of the losses on CPU.

A 2x2 output tile costs 16 multiplies per channel pair instead of 36 (2.25x fewer), at the price of
input and output transforms that only pay where the channel count is large: stages 4-5 of VGG19
(512 output channels, 28 and 14 px), which hold two fifths of its FLOPs. The transforms' entries
are 0, +-1 and +-1/2, so the rounding error stays that of a direct convolution (tests compare both
with float64). The input gradient is the same convolution with the kernel flipped and its channels
swapped, so the backward pass runs through Winograd too. CPU only: on CUDA cuDNN picks its own
algorithms. The reference losses keep the direct convolution.
"""

import weakref

import torch
import torch.nn.functional as F

from ..tracing import forward_ad_active, traced
from . import fused_linear
from .unmodified import is_exact
from .weight_stamp import weight_stamp

_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))  # kernel transform, 4x3


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3) -> U (16, Cin, Cout) = G w G^T per channel pair, tile position major."""
    G = torch.tensor(_G, dtype=weight.dtype, device=weight.device)
    u = torch.einsum("ax,oixy,by->abio", G, weight, G)
    return u.reshape(16, weight.shape[1], weight.shape[0])


def onednn_ready(dtype: torch.dtype) -> bool:
    """Whether the 16 tile-position GEMMs run as oneDNN matmuls (float32, torch built with oneDNN and
    it enabled) rather than as one MKL bmm. On an AMD EPYC with Zen 5 flags (2026-12-02, 2 threads)
    MKL ran its GEMMs at under half of oneDNN's speed (6.55 against 2.86 ms at 2352 x 512 x 512; the
    16 products of a 512 -> 512 convolution at 28 px over 12 images 123.6 against 68.6 ms), which made
    Winograd a loss there (`bench/results/README.md`, session 31)."""
    return fused_linear.onednn_enabled() and dtype == torch.float32


def pack_for_onednn(u: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """U (16, Cin, Cout) -> its 16 tile positions' (Cout, Cin) weights in oneDNN's blocked layout."""
    return tuple(torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), None) for w in u)


def _tile_products(v: torch.Tensor, u) -> list[torch.Tensor]:
    """v (16, P, Cin) @ U for each tile position -> 16 (P, Cout) products; u: U (16, Cin, Cout), or its
    `pack_for_onednn` form."""
    if isinstance(u, torch.Tensor):
        return list(torch.bmm(v, u).unbind(0))
    return [fused_linear._ONEDNN_LINEAR(v[i], u[i], None, "none", [], "") for i in range(16)]


def _rows_into(r0, r1, r2, r3, out: torch.Tensor) -> torch.Tensor:
    """B^T applied along one tile axis: the four transformed rows of a 4-row tile, written into
    out[0..3] (out= spares a fresh tensor and a copy per row: 20 of each per convolution)."""
    torch.sub(r0, r2, out=out[0])
    torch.add(r1, r2, out=out[1])
    torch.sub(r2, r1, out=out[2])
    torch.sub(r1, r3, out=out[3])
    return out


def winograd_conv3x3(x: torch.Tensor, u, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(x, w, bias, padding=1) for x (N, Cin, H, W) with even H, W and u = transform_weight(w), or
    pack_for_onednn of it (float32 x only).

    Returns (N, Cout, H, W) in channels_last memory (the transforms work on (N, H, W, C) rows). Not
    differentiable itself (its transforms write with out=): `conv3x3` gives it a backward.
    """
    N, C, H, W = x.shape
    th, tw = H // 2, W // 2
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (N, H+2, W+2, C)
    rows = _rows_into(*(xp[:, k : k + H : 2] for k in range(4)), out=x.new_empty(4, N, th, W + 2, C))
    v = x.new_empty(4, 4, N, th, tw, C)
    for a in range(4):
        _rows_into(*(rows[a][:, :, k : k + W : 2] for k in range(4)), out=v[a])
    m = [p.view(N, th, tw, -1) for p in _tile_products(v.view(16, N * th * tw, C), u)]  # m[4 a + b]
    Cout = m[0].shape[-1]
    # A plain channels_last tensor, not a permuted view: autograd lets callers modify it in place (ReLU).
    out = torch.empty(N, Cout, H, W, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    out_rows = out.permute(0, 2, 3, 1)
    # A^T along rows, then along columns, each sum left to right; the last one lands in its strided
    # place in out, with the bias.
    s = x.new_empty(2, 4, N, th, tw, Cout)
    for b in range(4):
        torch.add(m[b], m[4 + b], out=s[0, b]).add_(m[8 + b])
        torch.sub(m[4 + b], m[8 + b], out=s[1, b]).sub_(m[12 + b])
    t = x.new_empty(N, th, tw, Cout)
    for a in range(2):
        torch.add(s[a, 0], s[a, 1], out=t).add_(s[a, 2])
        _place(t, bias, out_rows[:, a::2, 0::2])
        torch.sub(s[a, 1], s[a, 2], out=t).sub_(s[a, 3])
        _place(t, bias, out_rows[:, a::2, 1::2])
    return out


def _place(t: torch.Tensor, bias: torch.Tensor | None, dest: torch.Tensor) -> None:
    """dest = t + bias in one pass (dest: a strided view of the output's rows)."""
    if bias is None:
        dest.copy_(t)
    else:
        torch.add(t, bias, out=dest)


class _WinogradConv(torch.autograd.Function):
    """Gradient to the input only: the weights are frozen."""

    @staticmethod
    def forward(ctx, x, u, u_flipped, bias):
        # Kept on ctx, not saved: the transforms may be tuples of packed weights, and they are frozen
        # constants that nothing writes in place (`_transforms` builds new ones when the weight changes).
        ctx.transforms = (u, u_flipped)
        return winograd_conv3x3(x, u, bias)

    @staticmethod
    def backward(ctx, grad):
        u, u_flipped = ctx.transforms
        # The input gradient is the convolution with the flipped kernel, linear in grad: through this
        # Function again (kernels swapped), so that create_graph=True records it. winograd_conv3x3
        # itself writes with out=, which autograd cannot record.
        return _WinogradConv.apply(grad, u_flipped, u, None), None, None, None


# conv -> (key, U, U of the flipped kernel). Held beside the convs, not on them: a pickle, deepcopy or
# torch.save of the model would carry 4x its VGG19's size of transforms that a copy recomputes anyway.
_transforms_of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _transforms(conv: torch.nn.Conv2d) -> tuple:
    """U of the kernel and of its flipped, channel-swapped twin (the input gradient's), packed for oneDNN
    where `onednn_ready`, kept until the weight changes (`weight_stamp`, which says what it sees), oneDNN
    is switched on or off, or `forget_transforms`: a 512x512 transform costs as much as the saving."""
    w = conv.weight
    key = (weight_stamp(w), onednn_ready(w.dtype))  # a CPU tensor (use_winograd)
    cached = _transforms_of.get(conv)
    if cached is None or cached[0] != key:
        # Built under torch.inference_mode (a validation pass), they serve later training steps too: the
        # Function keeps them on its ctx, not as saved tensors, which inference tensors could not be.
        u, u_flipped = transform_weight(w), transform_weight(w.flip(2, 3).transpose(0, 1))
        if key[1]:
            u, u_flipped = pack_for_onednn(u), pack_for_onednn(u_flipped)
        cached = _transforms_of[conv] = (key, u, u_flipped)
    return cached[1], cached[2]


def forget_transforms(module: torch.nn.Module) -> None:
    """Drop the transforms kept for the convs in `module` (their weights are being moved or cast)."""
    for m in module.modules():
        _transforms_of.pop(m, None)


def use_winograd(x: torch.Tensor, conv: torch.nn.Conv2d) -> bool:
    """Where F(2x2, 3x3) beats oneDNN on CPU: >= 512 output channels, even sides, frozen weights,
    float32/float64 outside autocast, eager and untransformed (compiled graphs pick their own), outside
    forward-mode AD.

    The saving grows with in x out channels, the transforms' memory passes with in + out. Measured
    (2 cores, 12 images, forward, oneDNN direct -> Winograd, ms):
    - the first development VM (2026-11-23, 35-40 GFLOP/s per core): 1.25x faster at 128->256
      channels and 56 px, 1.7x at 512 -> 512 at 28 and 14 px, slower at 128 channels and 112 px;
    - an AMD EPYC VM with AVX-512 (2026-11-29), whose direct convolutions run 2.5x faster: 125 -> 212 at
      128->256 and 56 px, 232 -> 305 at 256->256 and 56 px (slower), 98 -> 81 at 256->512 and 28 px,
      190 -> 140-185 at 512->512 and 28 px, 46 -> 33 at 512->512 and 14 px;
    - an AMD EPYC VM with Zen 5 flags (2026-12-02; `bench/vgg_cpu.py`, 4 images, forward and input
      gradient, channels-last direct -> Winograd with its GEMMs through oneDNN, `onednn_ready`):
      33.0 -> 23.4 at 256->512 and 28 px, 64.3 -> 39.7 at 512->512, 19.2 -> 11.5 at 14 px; also
      64.9 -> 51.5 at 256->256 and 56 px, where the rule keeps the direct convolution for the other
      VMs' sake (with MKL's bmm it lost even at 512 channels on this VM: 33.7 -> 43.7 at 256->512 and
      28 px).
    512 output channels is where it wins on all three. `bench/vgg_cpu.py` times every layer three ways."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu")
        and not traced(x, conv.weight)  # the torch.func transforms cannot run its Function; graphs pick
        and not forward_ad_active()  # nor dual tensors: it has no forward derivative
        and conv.out_channels >= 512
        and x.shape[0] > 0  # its tile views cannot infer a size from no elements
        and x.shape[2] % 2 == 0
        and x.shape[3] % 2 == 0
        and not conv.weight.requires_grad
        and (conv.bias is None or not conv.bias.requires_grad)  # the Function returns no bias gradient
    )


def conv3x3(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """conv(x) for a frozen 3x3/stride 1/padding 1 conv, by Winograd where it pays (see use_winograd).

    A conv that is no plain nn.Conv2d (a subclass or wrapper put in its place) or is hooked is called
    as a module, as officially: Winograd reads its weight and would skip its forward and hooks. So is
    a plain one of another geometry (reflect padding, dilation, groups), which Winograd would compute
    as a zero-padded dense 3x3."""
    if is_exact(conv, torch.nn.Conv2d) and _is_3x3_same(conv) and use_winograd(x, conv):
        return _WinogradConv.apply(x, *_transforms(conv), conv.bias)
    return conv(x)


def _is_3x3_same(conv: torch.nn.Conv2d) -> bool:
    # The one convolution F(2x2, 3x3) computes here: the VGG's own layers, not every conv in their place.
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )
