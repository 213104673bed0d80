"""The memory-bound block gelu(layer_norm(x + residual)) at (4096, 1024) float32.

No matmul, so bytes are everything: eager writes and re-reads the sum, the normalized
tensor and the GELU output; one fused kernel reads x, residual, weight and bias once and
writes the result once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

ROWS = 4096
WIDTH = 1024


def layernorm_gelu(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    return F.gelu(F.layer_norm(x + residual, (x.shape[-1],), weight, bias))


def example() -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    """The function and its inputs (x, residual, weight, bias)."""
    torch.manual_seed(0)
    x = torch.randn(ROWS, WIDTH)
    residual = torch.randn(ROWS, WIDTH)
    weight = torch.randn(WIDTH)
    bias = torch.randn(WIDTH)
    return layernorm_gelu, (x, residual, weight, bias)


if __name__ == "__main__":
    import memopt
    from memopt.reports.summary import format_analysis

    fn, inputs = example()
    print(format_analysis(memopt.analyze(fn, *inputs)))
