import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..tracing import traced
from .winograd import conv3x3, forget_transforms

# torchvision/timm VGG19 `features` indices of the 3x3 convs and their output channels; a max-pool
# follows the last conv of each stage.
VGG19_CONVS = (
    (0, 64), (2, 64),
    (5, 128), (7, 128),
    (10, 256), (12, 256), (14, 256), (16, 256),
    (19, 512), (21, 512), (23, 512), (25, 512),
    (28, 512), (30, 512), (32, 512), (34, 512),
)  # fmt: skip
_STAGE_ENDS = (2, 7, 16, 25, 34)


def use_channels_last(x: torch.Tensor) -> bool:
    """Run the frozen VGG19 on channels-last (NHWC) maps. On CUDA, cuDNN's tensor-core convolutions
    read and write NHWC and would otherwise transpose the NCHW maps around each of the 16
    convolutions (the early maps are the largest tensors of a training step). On CPU, oneDNN
    convolves NHWC maps in place of reordering NCHW ones to its blocked layout and back at every
    call: measured on 2 AVX-512 cores (2026-11-29, 4 images, forward + input gradient), 1.3x-2.1x
    faster for stages 1 and 2 (81 -> 38 ms at 3 -> 64 channels and 224 px, 248 -> 166 at 64 -> 64),
    the same from 56 px down; the whole training step of tiny at 224 px 6% faster. Compiled graphs
    choose their own layouts (inductor's layout optimization), and so do traced or transformed calls
    (vmap cannot query a layout); other devices keep NCHW, unmeasured."""
    return x.device.type in ("cpu", "cuda") and not traced(x)


RANDOM_WARNING = (
    "the VGG19 of this train=True model is randomly initialized (no ImageNet weights were loaded into "
    "it), so its perceptual losses are meaningless; the official constructor downloads ImageNet weights: "
    "load them with fastvit_style.weights.load_vgg_weights(model, path) (timm's vgg19.tv_in1k or "
    "torchvision's vgg19 file) or load an official checkpoint, which carries them"
)


def _warn_while_tracing() -> bool:
    # Dynamo runs a function marked by torch.compiler.assume_constant_result as it traces and puts its
    # result in the graph as a constant: the one way to warn from a compiled forward without a graph
    # break (a call per compilation; the flags it follows are guards, so loading weights later
    # recompiles without it).
    warnings.warn(RANDOM_WARNING, stacklevel=2)
    return True


# The decorator's whole work (torch 2.11 to 2.13; a test checks that it still is), set by hand: calling
# it imports torch._dynamo, and with it Triton, which importing this package must not.
_warn_while_tracing._dynamo_marked_constant = True


class VGG19Features(nn.Module):
    """timm `vgg19(features_only=True)` as the official loss uses it: a frozen perceptual network.

    forward: (B, 3, H, W) -> six maps, relu1_2, relu2_2, relu3_4, relu4_4, relu5_4 and the output of
    the final max-pool (shared doc 3.3). Parameters are named `features_N` as timm's flattened
    FeatureListNet names them, so the official checkpoints load unchanged.
    """

    def __init__(self):
        super().__init__()
        in_ch = 3
        for idx, out_ch in VGG19_CONVS:
            conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
            # torchvision's VGG init keeps activations at scale through 16 layers, so that even before
            # ImageNet weights are loaded the per-channel statistics of the losses are well conditioned.
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            self.add_module(f"features_{idx}", conv)
            in_ch = out_ch
        self.requires_grad_(False)
        self.eval()  # from the start, as the official loss network
        # Whether weights were ever loaded into it (official checkpoints carry them; the official
        # constructor downloads ImageNet ones), and whether a loss computed without is still to be warned of.
        self.loaded = False
        self.warn_if_random = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Every conv's weight and bias offered (a shape mismatch then makes the load raise, leaving the
        # flag set on a network the caller knows to be half loaded).
        if all(
            f"{prefix}features_{idx}.{name}" in state_dict
            for idx, _ in VGG19_CONVS
            for name in ("weight", "bias")
        ):
            self.loaded = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def warn_once_if_random(self, stacklevel: int) -> None:
        """One warning per network when losses run through it before any weights were loaded (none on
        the meta device, which has no values); stacklevel: of the user's call, from the caller. Under
        torch.compile the warning comes as each graph is traced (a compiled graph cannot warn), from
        dynamo's frames, and leaves the eager calls' warning to come."""
        if getattr(self, "loaded", True) or not getattr(self, "warn_if_random", True):
            return  # (a pickle from before these flags: not known to be random)
        if self.features_0.weight.is_meta:
            return
        if torch.compiler.is_compiling():
            _warn_while_tracing()
            return
        self.warn_if_random = False
        warnings.warn(RANDOM_WARNING, stacklevel=stacklevel + 1)

    def _apply(self, fn, recurse=True):
        # .to(), .half(), .cuda(): transforms of the old weights would stay alive, unused
        forget_transforms(self)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        # Frozen and always in eval mode, like the official loss network (it has no dropout/BN anyway).
        return super().train(False)

    def forward(self, x: torch.Tensor, fast: bool = False) -> list[torch.Tensor]:
        """fast: the fast losses' way, same numbers up to rounding: channels-last maps
        (`use_channels_last`), and on CPU the deep 3x3 convs by Winograd's algorithm where it pays
        (`winograd.conv3x3`). The reference losses leave it off. The maps keep x's memory format
        otherwise; channels-last ones are NCHW tensors all the same, with other strides."""
        if fast and use_channels_last(x):
            x = x.contiguous(memory_format=torch.channels_last)
        feats = []
        for idx, _ in VGG19_CONVS:
            conv = getattr(self, f"features_{idx}")
            # ReLU in place, as timm's VGG: the conv's backward does not read its output
            x = F.relu(conv3x3(x, conv) if fast else conv(x), inplace=True)
            if idx in _STAGE_ENDS:
                feats.append(x)
                x = F.max_pool2d(x, kernel_size=2, stride=2)
        feats.append(x)
        return feats
