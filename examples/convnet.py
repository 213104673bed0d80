"""A small conv net: 3 x (Conv2d 3x3 -> BatchNorm2d -> ReLU), global average pool, Linear.

Channels 3 -> 16 -> 32 -> 32 on a batch of 8 32x32 images, 10 classes. The example is in
eval mode (batchnorm uses its running statistics, so it can fold into pointwise work);
`memopt report convnet --train` analyzes it in training mode with batch statistics.
"""

from __future__ import annotations

import torch
from torch import nn

BATCH = 8
IMAGE_SIZE = 32
CHANNELS = (3, 16, 32, 32)
NUM_CLASSES = 10


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class ConvNet(nn.Module):
    def __init__(self, channels: tuple[int, ...] = CHANNELS, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.body = nn.Sequential(*(conv_block(a, b) for a, b in zip(channels, channels[1:])))
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        x = x.mean(dim=(2, 3))  # global average pool: (B, C, H, W) -> (B, C)
        return self.head(x)


def example() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The net in eval mode and one (BATCH, 3, IMAGE_SIZE, IMAGE_SIZE) float32 input."""
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(BATCH, CHANNELS[0], IMAGE_SIZE, IMAGE_SIZE)
    return model, (x,)


if __name__ == "__main__":
    import memopt
    from memopt.reports.summary import format_analysis

    model, inputs = example()
    print(format_analysis(memopt.analyze(model, *inputs)))
