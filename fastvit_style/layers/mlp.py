from torch import nn

from .fused_linear import forget_packed


class Mlp(nn.Module):
    """timm's Mlp with drop 0: fc1 (L -> hidden), exact erf GELU, fc2 (hidden -> L)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def _apply(self, fn, recurse=True):
        # .to(), .half(), .cuda() of this module or one above it (the block): the packed CPU copies of
        # the old weights (layers/fused_linear) would stay alive, unused
        forget_packed(self)
        return super()._apply(fn, recurse)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
