"""The passes, their registry and the default pipeline: one ordered list, in one place.

Each pass registers itself (passes/registry.py) when its module is imported here.
"""

from __future__ import annotations

from memopt.passes import attention, cleanup, fusion, layout, recompute
from memopt.passes.base import Fuel, Pass, PassContext, Pipeline, Stage
from memopt.passes.registry import PASSES, make_pass, register_pass

# The order passes run in by default.
DEFAULT_PIPELINE: tuple[str, ...] = ("cleanup", "layout", "attention", "recompute", "fusion")

__all__ = [
    "DEFAULT_PIPELINE",
    "PASSES",
    "Fuel",
    "Pass",
    "PassContext",
    "Pipeline",
    "Stage",
    "attention",
    "cleanup",
    "fusion",
    "layout",
    "make_pass",
    "recompute",
    "register_pass",
]
