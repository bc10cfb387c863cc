from torch import nn

from .fused_linear import HoldsPackedWeights
from .placeholders import add_missing, no_dropout


class Mlp(HoldsPackedWeights):
    """timm's Mlp with drop 0: fc1 (L -> hidden), exact erf GELU, fc2 (hidden -> L); drop1, norm and
    drop2 are timm's identities at these settings (`placeholders`), called where timm calls them."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.drop1 = no_dropout()
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop2 = no_dropout()

    def __setstate__(self, state):
        super().__setstate__(state)
        add_missing(self, drop1=no_dropout, norm=nn.Identity, drop2=no_dropout)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))
