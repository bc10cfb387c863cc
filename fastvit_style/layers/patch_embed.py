from torch import nn


class PatchEmbed(nn.Module):
    """timm's PatchEmbed (no norm): (B, C, H, W) -> (B, N, L), tokens in row-major patch order."""

    def __init__(self, patch_size: int, in_channel: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channel, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)
