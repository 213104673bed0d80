"""The passes, their registry and the default pipeline: one ordered list, in one place.

Every module of this package is imported here, so a pass registers itself
(passes/registry.py) by being a file in it: writing a pass is one file with one decorated
class.
"""

from __future__ import annotations

import importlib
import pkgutil

from memopt.passes.base import Fuel, Pass, PassContext, Pipeline, Stage
from memopt.passes.registry import PASSES, make_pass, register_pass

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

# The order passes run in by default.
DEFAULT_PIPELINE: tuple[str, ...] = (
    "cleanup",
    "layout",
    "attention",
    "recompute",
    "concat",
    "epilogue",
    "fusion",
    "inplace",
)

# Passes that change results, run only when asked for: giving one's options puts it in the
# default pipeline, after the pass named here.
OPT_IN_PASSES: dict[str, str] = {"precision": "cleanup"}

__all__ = [
    "DEFAULT_PIPELINE",
    "OPT_IN_PASSES",
    "PASSES",
    "Fuel",
    "Pass",
    "PassContext",
    "Pipeline",
    "Stage",
    "make_pass",
    "register_pass",
]
