"""memopt: a compiler-style optimizer for the memory traffic of PyTorch programs.

import torch, memopt
fast = torch.compile(model, backend="memopt")          # registered by entry point
a = memopt.analyze(model, x)                            # eager vs optimized bytes, and why
print(a.eager_bytes, a.bytes_moved, a.lower_bound_bytes, a.predict("h100"))
memopt.report(model, x, out="memopt-report")            # HTML, JSON, graph diffs, kernels
memopt.ablate(model, x)                                 # passes on/off -> bytes, kernels, time
memopt.profile(model, x)                                # measured time per kernel vs its bytes
memopt.analyze(model, x, backend="triton", compile_for="h100").compiled  # Triton kernels
                                                        # compiled for sm_90: regs, spills
"""

from __future__ import annotations

import importlib

from memopt.errors import CheckError, MemoptError, OptionError, TargetError, VerificationError

__version__ = "0.1.0"

# The entry points pull in the compiler and Dynamo; import them on first use so that
# `import memopt.compiler.kernel_ir` (and the CLI's --help) stay light, and importing one
# layer of the package loads nothing above it.
_LAZY = {
    "Config": "memopt.config",
    "analyze": "memopt.driver.analyze",
    "Analysis": "memopt.driver.results",
    "report": "memopt.reports.writer",
    "ablate": "memopt.tools.ablate",
    "profile": "memopt.driver.profile",
    "compile_for_gpu": "memopt.driver.gpu",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'memopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "Analysis",
    "CheckError",
    "Config",
    "MemoptError",
    "OptionError",
    "TargetError",
    "VerificationError",
    "__version__",
    "ablate",
    "analyze",
    "compile_for_gpu",
    "profile",
    "report",
]
