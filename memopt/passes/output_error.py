"""How far a narrowed program's outputs moved from the exact program's (the precision pass:
narrowed weights, and saved activations stored narrower).

The error of a run is the largest `max |out - ref| / max |ref|` over the floating outputs
(relative to each output's scale, so logits, hidden states and gradients compare alike; a
value no longer finite is an infinite error), with the largest absolute difference beside
it; for outputs that are logits, the mean next-token KL divergence too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Each narrowed value's share of the output error takes a run of the graph: measured when
# the runs take at most this long together, else its own rounding error stands in. Here:
# the 8-layer Llama's decode graph (58 weights) is measured (2.5 s more compile time), its
# prefill graph of 128 tokens (262 ms a run) is not.
SHARE_RUNS_S = 2.0


@dataclass(frozen=True)
class Error:
    """How far outputs moved: the largest max |diff| / max |ref| and max |diff| over the
    floating outputs, and the logits' mean next-token KL divergence (nats) if any."""

    relative: float
    absolute: float
    kl: float | None

    def __str__(self) -> str:
        kl = "" if self.kl is None else f", next-token KL {self.kl:.2e} nats"
        return f"max |error| {self.absolute:.2e} ({self.relative:.2e} of the output's scale){kl}"


def difference(want: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(max |got - want|, max |want|) over want's finite elements; a value that is not
    finite where want's is, or another non-finite value where want's is not (NaN for
    infinity, or an infinity of the other sign), is an infinite difference."""
    finite = torch.isfinite(want)
    if not torch.equal(torch.isfinite(got), finite) or not torch.equal(
        got[~finite].nan_to_num(), want[~finite].nan_to_num()
    ):
        return math.inf, 1.0
    if not finite.any():
        return 0.0, 0.0
    return (got - want)[finite].abs().max().item(), want[finite].abs().max().item()


def compare(
    expected: list[object], actual: list[object], logits: set[int], floor: float = 0.0
) -> Error:
    """The Error of `actual` against `expected`, output by output; `logits`: the positions
    whose last dim is a distribution. `floor`: no output's scale is taken below this
    fraction of the largest output's (gradients: one that is zero but for rounding, a key
    projection's bias under a softmax, is measured against it, not against its noise)."""
    pairs = [
        (position, want.float(), got.float())
        for position, (want, got) in enumerate(zip(expected, actual))
        if isinstance(want, torch.Tensor) and want.is_floating_point() and want.numel()
    ]
    differences = [difference(want, got) for _, want, got in pairs]
    least = floor * max((scale for _, scale in differences), default=0.0)
    relative = absolute = 0.0
    kls = []
    for (position, want, got), (diff, scale) in zip(pairs, differences):
        scale = max(scale, least)
        absolute = max(absolute, diff)
        relative = max(relative, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))
        if position in logits and want.dim() >= 1:
            kls.append(_kl(want, got))
    return Error(relative, absolute, max(kls) if kls else None)


def _kl(want: torch.Tensor, got: torch.Tensor) -> float:
    """Mean KL(softmax(want) || softmax(got)) over the rows (last dim) whose values are all
    finite in both; infinite when a row finite in want is not in got."""
    rows_want = torch.isfinite(want).all(dim=-1)
    rows_got = torch.isfinite(got).all(dim=-1)
    if (rows_want & ~rows_got).any():
        return math.inf
    if not rows_want.any():
        return 0.0
    p = torch.log_softmax(want[rows_want], dim=-1)
    q = torch.log_softmax(got[rows_want], dim=-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()
