from torch import nn

from .fused_linear import HoldsPackedWeights


class Mlp(HoldsPackedWeights):
    """timm's Mlp with drop 0: fc1 (L -> hidden), exact erf GELU, fc2 (hidden -> L)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
