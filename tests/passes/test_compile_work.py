"""Compile work grows linearly with a model's depth: counted in work units, not seconds.

Each pass counts what it does (`LedgerEntry.work`): fusion the candidate pairs it scores,
the cycle checks and the vertices they visit, the groups it lowers (and those whose lowering
it reuses from a group of the same structure); recompute its duplication trials (and the
trials it reuses); the partition the candidate graphs it costs through the pipeline. A
stack of identical blocks twice as deep must cost at most about twice the units, and the
units that repeated structure shares (lowerings, trials, candidate graphs) must not grow.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import memopt
from memopt.passes import fusion

# Twice the layers: linear work doubles; quadratic work would quadruple. The bound leaves
# room for the blocks at either end and for the cycle checks of two readers of one buffer
# in distant layers, which search the layers between them.
LINEAR = 2.6


class Block(nn.Module):
    """LayerNorm, a tanh-GELU MLP and a residual add; a softmax gate and a second residual."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.gate = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(F.gelu(self.fc1(self.norm1(x)), approximate="tanh"))
        return x + torch.softmax(self.gate(self.norm2(x)), -1) * x


def work(layers: int, training: bool) -> collections.Counter:
    """Every pass's work units, summed over the graphs, for a stack of `layers` blocks; the
    lowering probes start from an empty cache, as in a fresh process."""
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(16) for _ in range(layers)])
    fusion._PROBES.clear()
    analysis = memopt.analyze(model, torch.randn(2, 4, 16), training=training)
    total: collections.Counter = collections.Counter()
    for graph in analysis.graphs:
        for entry in graph.ledger:
            total.update(entry.work)
    return total


def test_inference_fusion_work_is_linear_in_depth():
    shallow, deep = work(8, training=False), work(16, training=False)
    for unit in ("fusion.pairs_scored", "fusion.cycle_checks", "fusion.vertices_visited"):
        assert 0 < deep[unit] <= LINEAR * shallow[unit], (unit, shallow[unit], deep[unit])
    # Every block's groups have one structure: they are lowered once, then reused.
    assert deep["fusion.lowerings"] == shallow["fusion.lowerings"]
    assert deep["fusion.lowerings_reused"] > shallow["fusion.lowerings_reused"]


@pytest.mark.slow
def test_training_work_is_linear_in_depth():
    # From 6 blocks on, the duplication trials' regions are smaller than the graph (below,
    # a trial runs on a copy of all of it): their lowerings no longer change with depth.
    shallow, deep = work(6, training=True), work(12, training=True)
    for unit in ("fusion.pairs_scored", "fusion.cycle_checks", "fusion.vertices_visited"):
        assert 0 < deep[unit] <= LINEAR * shallow[unit], (unit, shallow[unit], deep[unit])
    # The partition costs the same candidates (at most three, forward and backward); the
    # duplication trials of the middle blocks are reused, not run again.
    assert deep["partition.graphs_costed"] == shallow["partition.graphs_costed"] <= 6
    assert deep["recompute.trials"] == shallow["recompute.trials"]
    assert deep["recompute.trials_reused"] > shallow["recompute.trials_reused"]
    assert deep["fusion.lowerings"] == shallow["fusion.lowerings"]


def test_kernels_lowered_once_for_repeated_blocks_compute_what_eager_does():
    """Blocks of one structure share one lowering: the later blocks' kernels are rebuilt
    from the first's (their own inputs and outputs), and must compute the same as eager."""
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(16) for _ in range(4)]).eval()
    x = torch.randn(2, 4, 16)
    fusion._PROBES.clear()
    fusion._LOWERINGS.clear()
    analysis = memopt.analyze(model, x)
    reused = sum(e.work.get("fusion.kernels_reused", 0) for g in analysis.graphs for e in g.ledger)
    assert reused >= 3  # at least one kernel of each later block
    with torch.no_grad():
        got = torch.compile(model, backend="memopt")(x)
        torch.testing.assert_close(got, model(x))


def test_a_shared_lowering_refusal_names_the_nodes_of_its_own_group():
    """A refusal reason shared by structure keeps node names as positions and gets the
    names of the group it is used for; one naming a node outside the structure is not
    shared."""
    gm = torch.fx.symbolic_trace(lambda a, b: (a + 1, b + 1))
    a, b, add, add_1, _ = gm.graph.nodes
    template = fusion._template("%add reads %a at another row", [add, a])
    assert fusion._filled(template, [add_1, b]) == "%add_1 reads %b at another row"
    assert fusion._template("%add reads %b", [add, a]) is None
