"""Capture: ATen-level fx graphs, as the memopt backend sees them.

Dynamo traces Python to an fx graph of torch calls; AOTAutograd functionalizes it,
decomposes it with the table below and, when training, splits the joint graph into a
forward and a backward graph. The same plumbing serves `torch.compile(backend="memopt")`
(driver/dynamo.py) and `memopt.analyze` (driver/analyze.py), so both see the same
graphs.
"""

from __future__ import annotations

import functools
import itertools
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx
import torch.utils._pytree as pytree

from memopt.compiler.graph import annotate, copy_graph, shape_bindings
from memopt.config import Config
from memopt.errors import MemoptError
from memopt.passes.attention_pattern import ATTENTION_META_KEY, rewrite_attention

aten = torch.ops.aten

# Composite ops that core ATen keeps whole but that are, underneath, pointwise and reduction
# primitives a fusing compiler wants to see (environment.md: core_aten_decompositions leaves
# these whole). Matmuls (mm, bmm), convolutions and attention stay whole: they run as
# library calls.
_EXTRA_DECOMPOSITIONS = [
    aten.native_layer_norm,
    aten.native_layer_norm_backward,
    aten.gelu,
    aten.gelu_backward,
    aten._softmax,
    aten._log_softmax,
    aten._softmax_backward_data,
    aten._log_softmax_backward_data,
    aten.addmm,  # mm + bias add: the add can fuse with what follows
    aten.native_group_norm,
    aten.native_dropout,
    aten.hardtanh,
    aten.leaky_relu,
    aten.elu,
    aten.embedding,
    aten._native_batch_norm_legit_functional,
    aten._native_batch_norm_legit_no_training,  # calls _native_batch_norm_legit(training=False)
    aten._native_batch_norm_legit,
    aten.native_batch_norm_backward,
    aten.mean,
    aten.var_mean,
]

# Fused attention stays one op: core ATen decomposes it into matmul -> softmax -> matmul,
# which writes the score matrix, and whose training graph then hands the probabilities to
# the fused backward in place of its logsumexp (wrong gradients, torch 2.13). Kept whole,
# the forward returns (out, logsumexp) and the backward recomputes scores blockwise.
_KEEP_WHOLE = [
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
]


@functools.cache
def decompositions() -> dict[object, Callable]:
    """The decomposition table memopt traces with: core ATen plus the composites above."""
    from torch._decomp import core_aten_decompositions, get_decompositions

    table = dict(core_aten_decompositions())
    table.update(get_decompositions(_EXTRA_DECOMPOSITIONS))
    for op in _KEEP_WHOLE:
        table.pop(op, None)
    return table


def partition_fn(
    joint_module: torch.fx.GraphModule,
    joint_inputs: Sequence[object],
    *,
    config: Config | None = None,
    **kwargs: object,
) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """How the joint graph splits into forward and backward: which tensors are saved.

    With the recompute pass in the configured pipeline: the partition that moves the
    fewest bytes (passes/partition.py); without it, PyTorch's default partitioner, which
    saves what the backward needs and recomputes nothing.
    """
    from memopt.passes.partition import partition

    config = config if config is not None else Config.from_options()
    return partition(joint_module, joint_inputs, config, **kwargs)


GraphCompiler = Callable[[torch.fx.GraphModule, Sequence[object], str], Callable]


def aot_backend(compile_graph: GraphCompiler, config: Config | None = None) -> Callable:
    """A Dynamo backend that hands each ATen graph to `compile_graph(gm, inputs, kind)`.

    kind is "inference" (no gradients needed), "forward" or "backward". `config` steers the
    forward/backward partition (recomputation); None reads the environment and defaults.
    """
    from torch._dynamo.backends.common import aot_autograd

    if config is None:
        # A CompileSession's method carries the session's config (driver/dynamo.py).
        config = getattr(getattr(compile_graph, "__self__", None), "config", None)

    # Attention rewrites found in a Dynamo graph, handed to the first ATen graph compiled
    # from it (the forward, or the inference graph): the attention pass records them.
    pending: list[object] = []

    def compiler(kind: str) -> Callable:
        def compile_one(gm: torch.fx.GraphModule, example_inputs: Sequence[object]) -> Callable:
            annotate(gm)
            if pending and kind != "backward":
                gm.meta[ATTENTION_META_KEY] = list(pending)
                pending.clear()
            return compile_graph(gm, example_inputs, kind)

        return compile_one

    aot = aot_autograd(
        fw_compiler=compiler("forward"),
        bw_compiler=compiler("backward"),
        inference_compiler=compiler("inference"),
        decompositions=decompositions(),
        partition_fn=functools.partial(partition_fn, config=config),
        keep_inference_input_mutations=True,
    )
    rewrite = config is None or ("attention" in config.pass_names() and config.fuel != 0)

    def backend(gm: torch.fx.GraphModule, example_inputs: Sequence[object]) -> Callable:
        if rewrite:
            pending[:] = rewrite_attention(gm)
        return aot(gm, example_inputs)

    return backend


@dataclass
class CapturedGraph:
    """One ATen graph, with the real inputs it first ran on (for checks and kernels)."""

    name: str
    gm: torch.fx.GraphModule
    bindings: dict[sympy.Symbol, int]
    real_inputs: list[object] = field(default_factory=list)


def _clone_input(value: object) -> object:
    if not isinstance(value, torch.Tensor):
        return value
    clone = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
    with torch.no_grad():
        clone.copy_(value)
    return clone


def clone_inputs(inputs: Sequence[object]) -> tuple[object, ...]:
    """Copies of example inputs with the same strides and requires_grad, for side-effect-free runs."""
    clones = []
    for value in inputs:
        clone = _clone_input(value)
        if isinstance(value, torch.Tensor) and value.requires_grad and clone.is_floating_point():
            clone.requires_grad_(True)
        clones.append(clone)
    return tuple(clones)


_capture_ids = itertools.count()


def _fresh_entry(fn: Callable) -> Callable:
    """A new function object with its own code object around `fn`.

    Dynamo caches compiled code per code object. A fresh code object per capture keeps
    repeated analyses of the same model from piling up cache entries (and from hitting the
    recompile limit, after which Dynamo would silently run eagerly).
    """

    def entry(*args: object) -> object:
        return fn(*args)

    name = f"memopt_capture_{next(_capture_ids)}"
    entry.__code__ = entry.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(entry.__code__, entry.__globals__, name, None, entry.__closure__)


def backward_seeds(output: object) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The outputs that require grad and a ones-like gradient for each."""
    outs = [
        t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad
    ]
    if not outs:
        raise MemoptError("training=True, but no output of the program requires grad")
    return outs, [torch.ones_like(t) for t in outs]


def saved_grads(fn: object) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    return [(p, p.grad) for p in params]


def restore_grads(saved: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    for param, grad in saved:
        param.grad = grad


def capture(
    fn: Callable,
    example_inputs: Sequence[object],
    training: bool = False,
    dynamic: bool = False,
    config: Config | None = None,
) -> list[CapturedGraph]:
    """Trace `fn(*example_inputs)` into the ATen graphs the memopt backend would compile.

    Runs the program once (and its backward when training) on copies of the inputs; the
    model's parameters and gradients are left as they were. `config` steers the
    forward/backward partition (None: environment and defaults). When training, the bytes
    of the tensors saved for backward in that run are counted onto the forward graph's
    partition record.
    """
    import torch._dynamo

    from memopt.passes.partition import SavedTensorCounter, attach_counted_saved_bytes

    graphs: list[CapturedGraph] = []
    counts: dict[str, int] = {}

    def record(gm: torch.fx.GraphModule, inputs: Sequence[object], kind: str) -> Callable:
        index = counts.get(kind, 0)
        counts[kind] = index + 1
        name = kind if index == 0 else f"{kind}.{index}"
        graph = CapturedGraph(name=name, gm=gm, bindings=shape_bindings(inputs))
        graphs.append(graph)
        # The capture run executes the unoptimized ATen graph; the pipeline runs afterwards
        # on a copy, so analyses of several option sets share one capture.
        gm = copy_graph(gm)

        def run(args: list[object]) -> object:
            if not graph.real_inputs:
                graph.real_inputs = [_clone_input(a) for a in args]
            return gm(*args)

        run._boxed_call = True  # type: ignore[attr-defined]
        return run

    inputs = clone_inputs(example_inputs)
    saved = saved_grads(fn)
    entry = torch.compile(_fresh_entry(fn), backend=aot_backend(record, config), dynamic=dynamic)
    alive = [*inputs, *(fn.parameters() if isinstance(fn, torch.nn.Module) else ())]
    alive += list(fn.buffers()) if isinstance(fn, torch.nn.Module) else []
    counter = SavedTensorCounter(alive)
    try:
        with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=4096):
            if training:
                with torch.enable_grad():
                    with counter:
                        output = entry(*inputs)
                    outs, seeds = backward_seeds(output)
                    torch.autograd.backward(outs, grad_tensors=seeds)
            else:
                with torch.no_grad():
                    entry(*inputs)
    finally:
        restore_grads(saved)
    if training:
        attach_counted_saved_bytes(graphs, counter.nbytes)
    if not graphs:
        raise MemoptError(
            "torch.compile captured no graph: the program ran no tensor operations, or Dynamo "
            "fell back to eager for it (run with TORCH_LOGS=graph_breaks to see why)"
        )
    return graphs
