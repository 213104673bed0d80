"""A 2-layer MLP: 1024 -> 4096 -> 1024 with GELU, batch 64, float32.

Two matmuls with a bias + GELU epilogue between them: the smallest program where fusing
elementwise work into its producer saves a round trip of the 64 x 4096 hidden activation.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

BATCH = 64
WIDTH = 1024
HIDDEN = 4096


class MLP(nn.Module):
    def __init__(self, width: int = WIDTH, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def example() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The MLP and one (BATCH, WIDTH) float32 input."""
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(BATCH, WIDTH)
    return model, (x,)


if __name__ == "__main__":
    import memopt
    from memopt.reports.summary import format_analysis

    model, inputs = example()
    print(format_analysis(memopt.analyze(model, *inputs)))
