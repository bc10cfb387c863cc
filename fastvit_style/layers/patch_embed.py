from torch import nn

from .placeholders import add_missing


class PatchEmbed(nn.Module):
    """timm's PatchEmbed (no norm): (B, C, H, W) -> (B, N, L), tokens in row-major patch order."""

    def __init__(self, patch_size: int, in_channel: int, embed_dim: int, input_size: int | None = None):
        super().__init__()
        self.proj = nn.Conv2d(in_channel, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()  # timm's, without a norm layer (`placeholders`)
        self._input_size = input_size  # None: unknown, and so are the attributes below (None too)

    def forward(self, x):
        # timm's strict_img_size: the convolution alone would drop the rows and columns past the last
        # whole patch (the encoder's T still matching the position embedding), or fail on a broadcast.
        size = self.img_size
        if size is not None and tuple(x.shape[-2:]) != size:
            raise ValueError(
                f"the patch embedding takes {size[0]}x{size[1]} images (the model's input_size), "
                f"got shape {tuple(x.shape)}"
            )
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))

    def __setstate__(self, state):
        super().__setstate__(state)
        add_missing(self, norm=nn.Identity)

    # timm's attributes, read-only: the convolution and the position embedding fix them.
    @property
    def img_size(self) -> tuple[int, int] | None:
        size = getattr(self, "_input_size", None)  # (a pickle from before it was kept: unknown)
        return None if size is None else (size, size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.proj.kernel_size)

    @property
    def grid_size(self) -> tuple[int, int] | None:
        size = self.img_size
        return None if size is None else (size[0] // self.proj.kernel_size[0],) * 2

    @property
    def num_patches(self) -> int | None:
        grid = self.grid_size
        return None if grid is None else grid[0] * grid[1]
