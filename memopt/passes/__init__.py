"""The passes, and the default pipeline: one ordered list, in one place."""

from __future__ import annotations

from memopt.passes.attention import Attention
from memopt.passes.base import Fuel, Pass, PassContext, PassResult
from memopt.passes.cleanup import Cleanup
from memopt.passes.fusion import Fusion
from memopt.passes.layout import Layout
from memopt.passes.recompute import Recompute

# Every pass by name. `options={"disable": [...]}` and `options={"passes": [...]}` name these.
PASSES: dict[str, type[Pass]] = {
    Attention.name: Attention,
    Cleanup.name: Cleanup,
    Fusion.name: Fusion,
    Layout.name: Layout,
    Recompute.name: Recompute,
}

# The order passes run in by default.
DEFAULT_PIPELINE: tuple[str, ...] = ("cleanup", "layout", "attention", "recompute", "fusion")

__all__ = ["DEFAULT_PIPELINE", "PASSES", "Fuel", "Pass", "PassContext", "PassResult"]
