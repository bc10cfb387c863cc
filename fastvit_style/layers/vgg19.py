import torch
import torch.nn as nn
import torch.nn.functional as F

from .winograd import conv3x3

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
    """Run the frozen VGG19 on channels-last (NHWC) maps: on CUDA, where cuDNN's tensor-core
    convolutions read and write NHWC and would otherwise transpose the NCHW maps around each of the
    16 convolutions (the early maps are the largest tensors of a training step). Compiled graphs
    choose their own layouts (inductor's layout optimization)."""
    return x.is_cuda and not torch.compiler.is_compiling()


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

    def train(self, mode: bool = True):
        # Frozen and always in eval mode, like the official loss network (it has no dropout/BN anyway).
        return super().train(False)

    def forward(self, x: torch.Tensor, fast: bool = False) -> list[torch.Tensor]:
        """fast: the fast losses' way for the device, same numbers up to rounding: on CPU the deep 3x3
        convs by Winograd's algorithm where it pays (`winograd.conv3x3`), on CUDA channels-last maps
        (`use_channels_last`). The reference losses leave it off. The maps keep x's memory format
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
