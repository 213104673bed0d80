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
import re
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import sympy
import torch
import torch._dynamo
import torch.fx
import torch.utils._pytree as pytree
from torch._decomp import core_aten_decompositions, get_decompositions
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import default_partition
from torch._subclasses.fake_tensor import FakeTensor

from memopt.compiler.graph import annotate, copy_graph, shape_bindings
from memopt.compiler.order import written_buffers
from memopt.errors import MemoptError

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
    aten.linalg_vector_norm,  # abs, pow, sum: fuses with what reads it (a max of row norms)
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
    # Whole, the updates pass can make it in place (a copy into the view); its lowering
    # (lowering_rules._select_scatter) fuses it otherwise, as the decomposition would.
    aten.select_scatter.default,
]


@functools.cache
def decompositions() -> dict[object, Callable]:
    """The decomposition table memopt traces with: core ATen plus the composites above."""
    table = dict(core_aten_decompositions())
    table.update(get_decompositions(_EXTRA_DECOMPOSITIONS))
    for op in _KEEP_WHOLE:
        table.pop(op, None)
    return table


GraphCompiler = Callable[[torch.fx.GraphModule, Sequence[object], str], Callable]
PartitionFn = Callable[..., tuple[torch.fx.GraphModule, torch.fx.GraphModule]]

# What the capture-time stages decided about a Dynamo graph (or a joint graph), handed to
# the ATen graphs compiled from it: a list under this key of their graph modules' meta.
STAGE_RECORDS_KEY = "memopt_stage_records"
# Bytes of the tensors a capture run saved for the backward (counted), on the forward graph.
COUNTED_SAVED_BYTES_KEY = "memopt_counted_saved_bytes"
# The real values a forward or inference graph was compiled for (GraphValues), where they
# are known: what a pass that reads parameters' values (precision) needs.
GRAPH_VALUES_KEY = "memopt_graph_values"


class GraphValues:
    """The real example inputs of an ATen graph, in placeholder order, and which of them
    are the model's parameters (placeholder name -> the parameter's name in the model).

    Dynamo hands its backend real tensors (AOTAutograd's compilers see fake ones): the
    parameters as the model holds them, the other inputs as the first call passes them.
    Copies of a graph share one GraphValues (deepcopy returns it): the tensors are the
    model's and the caller's, never copied.
    """

    def __init__(self, inputs: Sequence[object], parameters: dict[str, str]) -> None:
        self.inputs = list(inputs)
        self.parameters = parameters

    def __deepcopy__(self, memo: dict) -> GraphValues:
        return self


def release_values(gm: torch.fx.GraphModule) -> None:
    """Let go of the real tensors a graph was compiled for (a compiled graph must not keep
    the caller's activations alive)."""
    values = gm.meta.pop(GRAPH_VALUES_KEY, None)
    if values is not None:
        values.inputs.clear()


def _parameter_label(node: torch.fx.Node) -> str:
    """A parameter's name in the model ("model.layers.0.mlp.up_proj.weight"), read off the
    Dynamo placeholder's source; the placeholder's name if it has none."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    parts = re.findall(r"_(?:modules|parameters|buffers)\['([^']+)'\]", getattr(source, "name", ""))
    return ".".join(parts) or node.name


def _graph_values(
    dynamo_gm: torch.fx.GraphModule, example_inputs: Sequence[object]
) -> tuple[list[object], list[str | None]]:
    """The real inputs AOTAutograd's graphs take, in order (the Dynamo graph's own
    parameters and buffers first, as AOTAutograd lifts them, then Dynamo's inputs), and
    each one's parameter name (None: not a parameter)."""
    lifted = [
        *dynamo_gm.named_parameters(remove_duplicate=False),
        *dynamo_gm.named_buffers(remove_duplicate=False),
    ]
    placeholders = [n for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
    # A size Dynamo made dynamic comes as a SymInt: its example value is its hint (reading
    # it this way adds no guard); a SymInt without one is left for the caller to refuse.
    inputs = [value for _, value in lifted] + [_hint(v) for v in example_inputs]
    labels: list[str | None] = [
        name if isinstance(value, torch.nn.Parameter) else None for name, value in lifted
    ]
    for index, value in enumerate(example_inputs):
        node = placeholders[index] if index < len(placeholders) else None
        is_parameter = isinstance(value, torch.nn.Parameter) and node is not None
        labels.append(_parameter_label(node) if is_parameter else None)
    return inputs, labels


def _hint(value: object) -> object:
    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        return hint if hint is not None else value
    return value


def _same_layout(real: torch.Tensor, fake: torch.Tensor) -> bool:
    """Same dtype and rank, and the same size in every dim whose fake size is static (a
    symbolic size is not compared: that would add a guard)."""
    if (real.dtype, real.dim()) != (fake.dtype, fake.dim()):
        return False
    return all(not isinstance(f, int) or f == r for r, f in zip(real.shape, fake.shape))


def _attach_values(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[object],
    real: tuple[list[object], list[str | None]] | None,
) -> None:
    """Put GraphValues on an ATen graph when its inputs are, one for one, the real ones
    (AOTAutograd drops duplicated arguments: then the values are not attached)."""
    if real is None:
        return
    inputs, labels = real
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs) or len(example_inputs) != len(inputs):
        return
    for value, fake in zip(inputs, example_inputs):
        if isinstance(value, torch.Tensor) != isinstance(fake, torch.Tensor):
            return
        if isinstance(value, torch.Tensor) and not _same_layout(value, fake):
            return
    parameters = {p.name: label for p, label in zip(placeholders, labels) if label is not None}
    gm.meta[GRAPH_VALUES_KEY] = GraphValues(inputs, parameters)


@dataclass(frozen=True)
class CaptureHooks:
    """What passes do while a program is captured, handed in by the caller.

    `rewrite_dynamo_graph(gm, training)` rewrites Dynamo's torch-level graph before
    AOTAutograd differentiates it and returns records of what it decided; they go to the
    first ATen graph compiled from it (the forward, or the inference graph), under
    STAGE_RECORDS_KEY. `partition` is AOTAutograd's partition_fn: it splits the joint graph
    into the forward and backward graphs (and may leave records on the forward's meta); it
    is also handed `inputs=`, the Dynamo graph's real inputs in the joint graph's primal
    order (None where they are not known), so that a stage can run the two graphs.
    Without hooks: no rewrite, and PyTorch's default partition.
    """

    rewrite_dynamo_graph: Callable[[torch.fx.GraphModule, bool], list[object]] | None = None
    partition: PartitionFn | None = None


def aot_backend(compile_graph: GraphCompiler, hooks: CaptureHooks | None = None) -> Callable:
    """A Dynamo backend that hands each ATen graph to `compile_graph(gm, inputs, kind)`.

    kind is "inference" (no gradients needed), "forward" or "backward".
    """
    hooks = hooks or CaptureHooks()
    # Records of a Dynamo graph's rewrites, handed to the first ATen graph compiled from it.
    pending: list[object] = []
    # The Dynamo graph's real inputs, for the forward or inference graph compiled from it.
    real: list[tuple[list[object], list[str | None]]] = []

    def compiler(kind: str) -> Callable:
        def compile_one(gm: torch.fx.GraphModule, example_inputs: Sequence[object]) -> Callable:
            annotate(gm)
            if pending and kind != "backward":
                gm.meta[STAGE_RECORDS_KEY] = [*pending, *gm.meta.get(STAGE_RECORDS_KEY, ())]
                pending.clear()
            if real and kind != "backward":
                _attach_values(gm, example_inputs, real.pop())
            bits = _bit_inputs(gm, example_inputs)  # before the passes rewrite gm
            compiled = compile_graph(gm, example_inputs, kind)
            return _resolving_bits(compiled, bits) if bits else compiled

        return compile_one

    def partition(joint: torch.fx.GraphModule, joint_inputs: Sequence[object], **kwargs):
        if hooks.partition is None:
            return default_partition(joint, joint_inputs, **kwargs)
        primals = [
            n for n in joint.graph.nodes if n.op == "placeholder" and n.name.startswith("primals")
        ]
        inputs = real[-1][0] if real else None
        if inputs is not None and len(inputs) != len(primals):
            inputs = None  # AOTAutograd dropped duplicated arguments: not one for one
        return hooks.partition(joint, joint_inputs, inputs=inputs, **kwargs)

    aot = aot_autograd(
        fw_compiler=compiler("forward"),
        bw_compiler=compiler("backward"),
        inference_compiler=compiler("inference"),
        decompositions=decompositions(),
        partition_fn=partition,
        keep_inference_input_mutations=True,
    )

    def backend(gm: torch.fx.GraphModule, example_inputs: Sequence[object]) -> Callable:
        if hooks.rewrite_dynamo_graph is not None:
            pending[:] = hooks.rewrite_dynamo_graph(gm, _needs_autograd(example_inputs))
        real[:] = [_graph_values(gm, example_inputs)]
        try:
            return aot(gm, example_inputs)
        finally:
            real.clear()  # the caller's tensors are not kept past the compile

    return backend


def _bit_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[object]) -> dict[int, bool]:
    """The positions of the inputs that carry a negation or conjugation bit
    (`torch._neg_view(w)`, `z.conj()`), each with whether the graph writes it.

    The bits are dispatch keys: ATen applies them as it reads, while memopt's kernels read
    the memory as it is (as Inductor's do: on torch 2.13 a negated view given to a graph
    compiled by either came out un-negated). Dynamo's guards hold each input's dispatch keys
    to the graph's, so a graph compiled without such inputs never gets one."""
    positions = [
        k
        for k, x in enumerate(example_inputs)
        if isinstance(x, torch.Tensor) and (x.is_neg() or x.is_conj())
    ]
    if not positions:
        return {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    written = {b for n in gm.graph.nodes if n.op == "call_function" for b in written_buffers(n)}
    return {k: k < len(placeholders) and placeholders[k] in written for k in positions}


def _resolving_bits(compiled: Callable, bits: dict[int, bool]) -> Callable:
    """`compiled`, given materialized copies of the inputs at `bits`' positions
    (`_bit_inputs`); a copy the graph writes is copied back into the caller's tensor after
    the call (memopt's kernels write it without moving its version counter)."""

    def run(args: list[object]) -> object:
        args = list(args)
        held = []
        for k, written in bits.items():
            given = args[k]
            if isinstance(given, torch.Tensor):
                args[k] = given.resolve_conj().resolve_neg()
                if written and args[k] is not given:
                    held.append((given, args[k]))
        outputs = compiled(args)
        with torch.no_grad():
            for given, resolved in held:
                given.copy_(resolved)  # through the caller's bits, as ATen's write would
        return outputs

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


def _needs_autograd(example_inputs: Sequence[object]) -> bool:
    """Whether AOTAutograd will make a forward and a backward graph (as it decides it)."""
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs
    )


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


def fresh_entry(fn: Callable) -> Callable:
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


class SavedTensorCounter:
    """Counts the bytes of the distinct tensors autograd saves for backward during a run.

    A `saved_tensors_hooks` context: every tensor saved (by eager autograd or a compiled
    graph's `save_for_backward`) is packed through it. Storages of the given inputs and
    parameters are not counted: they are alive anyway. All saved tensors are alive together
    at the end of the forward, so the count is the peak of saved-activation memory.
    """

    def __init__(self, alive: Sequence[object] = ()) -> None:
        self.excluded = {
            t.untyped_storage().data_ptr() for t in alive if isinstance(t, torch.Tensor)
        }
        self.seen: set[int] = set()
        self.nbytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, FakeTensor) or tensor.device.type == "meta":
            return tensor  # tracing, not running
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.excluded and key not in self.seen:
            self.seen.add(key)
            self.nbytes += storage.nbytes()
        return tensor

    def __enter__(self) -> SavedTensorCounter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def capture(
    fn: Callable,
    example_inputs: Sequence[object],
    training: bool = False,
    dynamic: bool = False,
    hooks: CaptureHooks | None = None,
) -> list[CapturedGraph]:
    """Trace `fn(*example_inputs)` into the ATen graphs the memopt backend would compile.

    Runs the program once (and its backward when training) on copies of the inputs; the
    model's parameters and gradients are left as they were. `hooks` are what the passes
    do during capture (CaptureHooks). When training, the bytes of the tensors saved for
    backward in that run are counted onto the forward graph (COUNTED_SAVED_BYTES_KEY).
    """
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
    entry = torch.compile(fresh_entry(fn), backend=aot_backend(record, hooks), dynamic=dynamic)
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
    forwards = [g for g in graphs if g.name.startswith("forward")]
    if training and len(forwards) == 1:
        # Only with one forward graph: a run with graph breaks cannot say which saved what.
        forwards[0].gm.meta[COUNTED_SAVED_BYTES_KEY] = counter.nbytes
    if not graphs:
        raise MemoptError(
            "torch.compile captured no graph: the program ran no tensor operations, or Dynamo "
            "fell back to eager for it (run with TORCH_LOGS=graph_breaks to see why)"
        )
    return graphs
