"""Run a function through cleanup + fusion quickly (make_fx, no Dynamo) on a chosen backend."""

from __future__ import annotations

from torch.fx.experimental.proxy_tensor import make_fx

from memopt.backends.runtime.kernels import FusedKernel
from memopt.compiler.capture import decompositions
from memopt.compiler.graph import annotate
from memopt.config import Config
from memopt.passes.pipeline import run_pipeline


def run_fused(fn, inputs, backend="reference", **options):
    """(outputs, graph module) of fn(*inputs) optimized by the default pipeline on `backend`."""
    gm = make_fx(fn, decomposition_table=decompositions(), tracing_mode="fake")(*inputs)
    annotate(gm)
    config = Config.from_options({"backend": backend, **options})
    result = run_pipeline(gm, config.pipeline(), "test", {})
    outputs = result.gm(*inputs)
    return outputs, result.gm


def fused_kernels(gm):
    return [n.target for n in gm.graph.nodes if isinstance(n.target, FusedKernel)]


def aten_ops(gm):
    from memopt.compiler.cost import is_kernel

    return [
        str(n.target)
        for n in gm.graph.nodes
        if is_kernel(n) and not isinstance(n.target, FusedKernel)
    ]
