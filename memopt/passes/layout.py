"""layout: no standalone copy kernels where a consumer can read strided; layouts chosen by bytes.

Three rewrites, each priced with the cost model and recorded in the ledger:

1. Copies removed. An explicit copy (`clone`, `contiguous()`, a `_to_copy` that changes only
   the memory format) whose consumers can all read its source through strides disappears:
   generated kernels fold permutes, transposes, expands, slices and reshapes into their
   index expressions, and an extern matmul takes an operand whose last or second-to-last
   stride is 1. The copy is kept (refused, with its bytes) when a consumer needs it: a
   `view` that the strided source cannot express, an extern op that would copy internally,
   a graph output whose strides would change, or no bytes saved. Where the kernels run on
   a GPU (Triton) and no dim of the source has unit stride (every 8th column: no tile
   makes it contiguous), both graphs are priced in 32-byte sectors after a dry run of
   fusion, and the copy stays when the strided reads drag in more sectors than the copy
   and contiguous reads (two kernels reading a column block, say).
2. Matmul outputs written in their reader's order. An `mm`/`bmm` whose only reader is a
   copy through views (attention's `(batch, heads, seq, dim) -> (batch, seq, heads*dim)`
   after `att @ v`) writes straight into a buffer laid out as that copy's result
   (`bmm.out` into `empty_strided`), so the copy becomes the identity and goes.
3. channels_last for convolution graphs. Every convolution's activations run NCHW or NHWC,
   whichever moves fewer modelled bytes over the whole graph (after fusion when fusion is in
   the pipeline), counting every conversion either choice needs: inputs converted for a
   convolution, views that need the old layout, graph outputs converted back to eager's
   strides, and weights the convolution library converts internally. On the CPU it also counts
   the reorders oneDNN makes of NCHW activations to its blocked layout and back
   (`compiler/onednn.py`), which channels_last avoids. Sizes are evaluated at the example
   bindings; the symbolic totals are in the decision's reason.

Graph outputs keep eager's strides: a rewrite that would change them is refused, and the
channels_last choice converts them back (and pays for it).
Options: `channels_last` ("auto": by bytes; "never"; "always": whenever legal);
`onednn_reorders` (count oneDNN's reorders of NCHW activations on the CPU; default True).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import sympy
import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch._prims_common import infer_size
from torch._subclasses.fake_tensor import FakeTensorMode

from memopt.backends.triton.sectors import moves_sectors
from memopt.compiler.aten_ops import (
    CONVOLUTIONS,
    EXTERN_OPS,
    MATMUL_OUT_VARIANTS,
    MATMULS,
)
from memopt.compiler.cost import (
    buffer_users,
    graph_cost,
    is_view,
    reaches_output,
    view_base,
    view_lane_stride,
)
from memopt.compiler.graph import (
    META_KEY,
    TensorMeta,
    copy_graph,
    evaluate,
    graph_device,
    meta_of_value,
    tensor_meta,
)
from memopt.compiler.indexing import contiguous_strides
from memopt.compiler.lower import can_lower
from memopt.compiler.onednn import hidden_reorder_bytes, runs_on_onednn
from memopt.passes.base import Pass, PassContext
from memopt.passes.registry import register_pass

aten = torch.ops.aten
ONE = sympy.Integer(1)

# Views whose inverse is again a view: the chain a matmul's output may reach a copy through.
_INVERTIBLE_VIEWS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.permute.default,
    aten.transpose.int,
    aten.t.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.alias.default,
}
# Views that fail on a source whose strides cannot express them.
_STRICT_VIEWS = {aten.view.default, aten._unsafe_view.default}
# Per convolution op: the activation operands (converted to the chosen layout by the graph)
# and the weight (converted by the library when its layout differs).
_CONV_OPERANDS = {
    aten.convolution.default: ((0,), 1),
    aten.convolution_backward.default: ((0, 1), 2),
}
NCHW, NHWC = "NCHW", "channels_last"
_FORMATS = {NCHW: torch.contiguous_format, NHWC: torch.channels_last}


class LayoutEstimate(NamedTuple):
    """What running every convolution in one layout costs (modelled, at the example sizes)."""

    total: int  # bytes: the graph's, plus the library's conversions and reorders
    bytes_expr: sympy.Expr  # the graph's bytes, symbolic
    conversions: int  # layout conversions the graph needs
    library: int  # bytes the convolution library moves converting weights
    reorders: int  # bytes oneDNN moves reordering NCHW activations (CPU)


# -- layouts ------------------------------------------------------------------------------


def _same_strides(a: TensorMeta, b: TensorMeta) -> bool:
    """Equal strides, ignoring dims of size 1 (where a stride means nothing)."""
    return a.shape == b.shape and all(
        size == 1 or sympy.simplify(x - y) == 0 for x, y, size in zip(a.stride, b.stride, a.shape)
    )


def _channels_last_strides(shape: tuple[sympy.Expr, ...]) -> tuple[sympy.Expr, ...]:
    n, c, h, w = shape
    return (h * w * c, ONE, w * c, c)


def in_layout(meta: TensorMeta | None, layout: str) -> bool:
    """Whether a 4-D tensor is dense in `layout` (a tensor with size-1 dims may be in both)."""
    if meta is None or len(meta.shape) != 4:
        return False
    strides = (
        contiguous_strides(meta.shape) if layout == NCHW else _channels_last_strides(meta.shape)
    )
    return _same_strides(meta, TensorMeta(meta.shape, strides, meta.storage_offset, meta.dtype))


def layout_of(meta: TensorMeta | None) -> str | None:
    """NCHW, channels_last, or None (not 4-D, or neither); a tensor that is both is NCHW."""
    return next((name for name in (NCHW, NHWC) if in_layout(meta, name)), None)


def _format_of(meta: TensorMeta) -> torch.memory_format | None:
    if meta.is_contiguous():
        return torch.contiguous_format
    name = layout_of(meta)
    return _FORMATS[name] if name is not None else None


def _opaque(user: torch.fx.Node) -> bool:
    """Whether `user` runs as a library or ATen call, not a generated kernel: then only
    `_readable_by` says which strides it takes. An ATen op with no lowering may assume the
    layout its caller established (`_embedding_bag_forward_only` reads its indices as
    contiguous, since `embedding_bag` makes them so), so it is held to contiguity."""
    if user.target in EXTERN_OPS:
        return True
    if user.op != "call_function" or user.target is operator.getitem or is_view(user):
        return False
    return not can_lower(user)


def _readable_by(user: torch.fx.Node, operand: TensorMeta) -> bool:
    """Whether an extern op reads `operand` as it is, without copying it first."""
    if user.target in MATMULS or user.target in MATMUL_OUT_VARIANTS.values():
        # BLAS takes a matrix with unit stride along either of its two dims.
        return len(operand.shape) < 2 or 1 in (operand.stride[-1], operand.stride[-2])
    if user.target in CONVOLUTIONS:
        return layout_of(operand) is not None or operand.is_contiguous()
    return operand.is_contiguous()


# -- metadata -----------------------------------------------------------------------------


def _fake_mode(gm: torch.fx.GraphModule) -> FakeTensorMode:
    values = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    return detect_fake_mode(values) or FakeTensorMode(allow_non_fake_inputs=True)


def _snapshot(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, tuple[object, object]]:
    return {n: (n.meta.get("val"), n.meta.get(META_KEY)) for n in gm.graph.nodes}


def _restore(snapshot: dict[torch.fx.Node, tuple[object, object]]) -> None:
    for node, (value, meta) in snapshot.items():
        node.meta["val"], node.meta[META_KEY] = value, meta


def propagate(
    gm: torch.fx.GraphModule,
    repair: Callable[[torch.fx.Node], bool] | None = None,
    changed: Iterable[torch.fx.Node] | None = None,
) -> str | None:
    """Recompute every node's fake value and metadata; None, or why a node fails.

    `repair(node)` may rewrite the graph around a node that fails and return True to retry it.
    `changed`: only these nodes (whose arguments a rewrite changed) and the nodes downstream
    whose inputs' metadata comes out different are recomputed; the rest keep their values.
    """
    mode = _fake_mode(gm)
    interpreter = torch.fx.Interpreter(gm)
    inputs = iter(n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder")
    dirty = set(changed) if changed is not None else None
    moved: set[torch.fx.Node] = set()  # recomputed to different metadata
    with mode:
        for node in list(gm.graph.nodes):
            if node.op == "placeholder":
                value = next(inputs)
            elif node.op == "output":
                continue
            elif (
                dirty is not None
                and node not in dirty
                and "val" in node.meta
                and not any(a in moved for a in node.all_input_nodes)
            ):
                interpreter.env[node] = node.meta["val"]
                continue
            else:
                while True:
                    try:
                        value = _evaluate(interpreter, node)
                        break
                    except Exception as error:  # noqa: BLE001 - reported as a refusal reason
                        if repair is None or not repair(node):
                            first = str(error).splitlines()[0] if str(error) else ""
                            return f"%{node.name} ({node.target}) fails: {first}"
            interpreter.env[node] = value
            before = node.meta.get(META_KEY)
            node.meta["val"] = value
            node.meta[META_KEY] = meta_of_value(value)
            if before != node.meta[META_KEY]:
                moved.add(node)
    return None


def _evaluate(interpreter: torch.fx.Interpreter, node: torch.fx.Node) -> object:
    """A node's fake value; inputs inserted since the walk began (a repair) are computed first."""
    for arg in node.all_input_nodes:
        if arg not in interpreter.env:
            interpreter.env[arg] = _evaluate(interpreter, arg)
            arg.meta["val"] = interpreter.env[arg]
            arg.meta[META_KEY] = meta_of_value(arg.meta["val"])
    args, kwargs = interpreter.fetch_args_kwargs_from_env(node)
    if node.target in _STRICT_VIEWS and isinstance(args[0], torch.Tensor):
        _check_viewable(args[0], args[1])
    return getattr(interpreter, node.op)(node.target, args, kwargs)


def _check_viewable(source: torch.Tensor, size: Sequence[object]) -> None:
    """Raise where a real tensor at the source's strides refuses `view(size)`.

    Fake tensors accept some views real ones refuse (torch 2.13: a (1, 2, 1, 3) tensor at
    strides (6, 1, 6, 2) viewed as (6,)), so the strides are checked here, in plain Python;
    symbolic sizes are left to the fake tensor.
    """
    shape, stride = list(source.shape), list(source.stride())
    if not all(isinstance(d, int) for d in (*shape, *stride, *size)):
        return
    numel = math.prod(shape)
    if numel == 0 or view_strides(shape, stride, list(infer_size(size, numel))) is not None:
        return
    raise RuntimeError(
        f"view of a tensor of shape {shape} at strides {stride} as {list(size)} "
        "needs a copy (a dimension spans two non-contiguous runs of memory)"
    )


def view_strides(shape: list[int], stride: list[int], target: list[int]) -> list[int] | None:
    """The strides `view(target)` gives a tensor, or None where no strides can express it.

    The source's dims split into runs that are contiguous with each other (size-1 dims join
    any run); each run must be covered by whole target dims, strided from the run's base.
    """
    result = [0] * len(target)
    t = len(target) - 1
    base = stride[-1] if stride else 1
    run = covered = 1
    for d in range(len(shape) - 1, -1, -1):
        run *= shape[d]
        run_ends = d == 0 or (shape[d - 1] != 1 and stride[d - 1] != run * base)
        if not run_ends:
            continue
        while t >= 0 and (covered < run or target[t] == 1):
            result[t] = covered * base
            covered *= target[t]
            t -= 1
        if covered != run:
            return None
        if d > 0:
            base, run, covered = stride[d - 1], 1, 1
    # Leftover size-1 target dims (a 0-dim source) take stride 1.
    while t >= 0:
        if target[t] != 1:
            return None
        result[t] = 1
        t -= 1
    return result


def _output_metas(gm: torch.fx.GraphModule) -> list[TensorMeta | None]:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = output.args[0]
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    return [tensor_meta(v) if isinstance(v, torch.fx.Node) else None for v in values]


def _outputs_changed(gm: torch.fx.GraphModule, eager: list[TensorMeta | None]) -> list[int]:
    return [
        k
        for k, (want, have) in enumerate(zip(eager, _output_metas(gm)))
        if want is not None and have is not None and not _same_strides(want, have)
    ]


# -- sizes as graph values (for empty_strided under symbolic shapes) -----------------------


class _Sizes:
    """Builds fx values for size expressions: ints as they are, symbols read off the inputs."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.graph = gm.graph
        self.sources: dict[sympy.Symbol, tuple[torch.fx.Node, str, int | None]] = {}
        for node in gm.graph.nodes:
            if node.op != "placeholder":
                continue
            value = node.meta.get("val")
            if isinstance(value, torch.SymInt) and isinstance(value.node.expr, sympy.Symbol):
                self.sources.setdefault(value.node.expr, (node, "value", None))
            meta = tensor_meta(node)
            if meta is not None:
                for kind, exprs in (("size", meta.shape), ("stride", meta.stride)):
                    for dim, expr in enumerate(exprs):
                        if isinstance(expr, sympy.Symbol):
                            self.sources.setdefault(expr, (node, kind, dim))

    def buildable(self, expr: sympy.Expr) -> bool:
        return all(s in self.sources for s in sympy.sympify(expr).free_symbols)

    def value(self, expr: sympy.Expr) -> object:
        expr = sympy.sympify(expr)
        if expr.is_Integer:
            return int(expr)
        if isinstance(expr, sympy.Symbol):
            node, kind, dim = self.sources[expr]
            if kind == "value":
                return node
            op = aten.sym_size.int if kind == "size" else aten.sym_stride.int
            return self.graph.call_function(op, (node, dim))
        if isinstance(expr, (sympy.Add, sympy.Mul)):
            combine = operator.add if isinstance(expr, sympy.Add) else operator.mul
            terms = [self.value(a) for a in expr.args]
            result = terms[0]
            for term in terms[1:]:
                result = self.graph.call_function(combine, (result, term))
            return result
        raise ValueError(f"cannot build size {expr}")


# -- the pass -----------------------------------------------------------------------------


def _copy_source(node: torch.fx.Node) -> torch.fx.Node | None:
    """The tensor an explicit copy reads, when the copy changes at most the layout."""
    if node.op != "call_function" or tensor_meta(node) is None:
        return None
    source = node.args[0] if node.args else None
    if not isinstance(source, torch.fx.Node) or tensor_meta(source) is None:
        return None
    if node.target is aten.clone.default:
        return source
    if node.target is aten._to_copy.default:
        if tensor_meta(source).dtype != tensor_meta(node).dtype:
            return None
        if any(node.kwargs.get(k) is not None for k in ("device", "layout")):
            return None
        return source
    return None


def _mutated(node: torch.fx.Node) -> bool:
    base = view_base(node)
    return any(u.target is aten.copy_.default and u.args[0] is base for u in base.users)


@register_pass(
    "layout",
    codes=(
        "copy_removed",  # a copy whose consumers read its source through strides
        "copy_kept_output",  # kept: its result is a graph output
        "copy_kept_mutated",  # kept: its source is mutated in place later
        "copy_kept",  # kept: a consumer needs the layout, or nothing is saved
        "copy_kept_sectors",  # kept: strided reads of its source cost more 32-byte sectors
        "matmul_out_order",  # a matmul writes in its reader's order (out= into strides)
        "matmul_out_kept",  # ... refused: no strides give the copy's layout
        "conv_layout",  # channels_last or NCHW chosen for the convolutions
        "conv_layout_kept",  # the convolutions' layout kept (the other moves more)
        "conversion",  # a layout conversion inserted for the chosen layout
    ),
)
@dataclass(frozen=True)
class Layout(Pass):
    """Folds copies into strided reads, orders matmul outputs for their readers, picks
    channels_last by bytes. Refusals say why and what the kept copy costs."""

    # "auto": channels_last when it moves fewer bytes; "never"; "always": whenever legal.
    channels_last: Literal["auto", "never", "always"] = "auto"
    # Count the reorders oneDNN makes of NCHW activations for CPU convolutions (modelled:
    # `compiler/onednn.py`); False prices both layouts by the graph's own traffic alone.
    onednn_reorders: bool = True

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        eager_outputs = _output_metas(gm)
        self._order_matmul_outputs(gm, ctx, eager_outputs)
        self._remove_copies(gm, ctx, eager_outputs)
        if self.channels_last != "never":
            self._choose_conv_layout(gm, ctx, eager_outputs)

    # -- 1. copies --------------------------------------------------------------------

    def _remove_copies(self, gm, ctx, eager_outputs) -> None:
        for node in list(gm.graph.nodes):
            source = _copy_source(node)
            if source is None or node.graph is not gm.graph:
                continue
            label = f"copy %{node.name} ({node.target})"
            nbytes = ctx.nbytes(node)
            if reaches_output(node):
                why = "its result is a graph output; without the copy it would alias its input"
                ctx.refuse("copy_kept_output", f"kept {label}", why, nbytes, (node.name,))
                continue
            if _mutated(source):
                why = "its source is mutated in place later in the graph"
                ctx.refuse("copy_kept_mutated", f"kept {label}", why, nbytes, (node.name,))
                continue
            lane_stride = self._strided_on_gpu(gm, ctx, source)
            kept_sectors = self._sector_estimate(gm, ctx) if lane_stride is not None else None
            reason = self._try_remove(gm, ctx, node, source, eager_outputs)
            if isinstance(reason, str):
                ctx.refuse("copy_kept", f"kept {label}", reason, nbytes, (node.name,))
                continue
            saved, undo = reason
            what = f"removed {label}"
            why = (
                f"every consumer reads %{source.name} through its strides "
                f"(copy kernel: {nbytes} B); graph moves {saved} B less"
            )
            figures = {}
            if kept_sectors is not None:
                removed_sectors = self._sector_estimate(gm, ctx, drop=node)
                figures = {"sectors_with_copy": kept_sectors, "sectors_without": removed_sectors}
                sectors = (
                    f"in 32-byte sectors, after fusion: {removed_sectors} B without the copy, "
                    f"{kept_sectors} B with it"
                )
                if removed_sectors >= kept_sectors:
                    undo()
                    why = (
                        f"its consumers would read %{source.name} with lanes {lane_stride} "
                        f"elements apart (no unit-stride dim for a tile), each dragging in "
                        f"whole sectors: {sectors}; by bytes the removal would save {saved} B"
                    )
                    at_stake = kept_sectors - removed_sectors
                    ctx.refuse(
                        "copy_kept_sectors", f"kept {label}", why, at_stake, (node.name,), figures
                    )
                    continue
                why += f" ({sectors})"
            if ctx.decide("copy_removed", what, why, saved, (node.name,), figures):
                gm.graph.erase_node(node)
            else:
                undo()

    def _strided_on_gpu(self, gm, ctx, source) -> sympy.Expr | None:
        """The lane stride reading `source` costs where the graph's kernels run on a GPU
        (Triton, in 32-byte sectors) and no dim of it has unit stride; else None: reading
        it costs its bytes (or a tile makes it contiguous), and bytes alone decide."""
        if not moves_sectors(ctx.kernel_backend(graph_device(gm))):
            return None
        stride = view_lane_stride(tensor_meta(source))
        return None if stride.is_number and stride <= 1 else stride

    def _sector_estimate(self, gm, ctx, drop: torch.fx.Node | None = None) -> int:
        """Modelled bytes of the graph in 32-byte sectors, after fusion when the pipeline
        fuses (a dry run on a copy, as for the channels_last choice): generated kernels
        charge their sectors (FusedKernel.memopt_cost), other nodes the sectors of their
        strided reads (cost.graph_cost with sectors). `drop`: a copy bypassed, left dead."""
        trial = copy_graph(gm)
        if drop is not None:
            dead = next(n for n in trial.graph.nodes if n.name == drop.name)
            if not dead.users:
                trial.graph.erase_node(dead)
        if self._fuses(ctx):
            fusion = ctx.pipeline.instance("fusion")  # a sibling pass, used as an estimator
            fusion.run(trial, ctx.scratch(fusion))
        return graph_cost(trial, ctx.bindings, sectors=True).nbytes

    def _try_remove(self, gm, ctx, node, source, eager_outputs):
        """Bypass the copy; (bytes saved, undo) if legal and cheaper, else the reason not."""
        before = graph_cost(gm, ctx.bindings).nbytes
        snapshot = _snapshot(gm)
        users = {u: (u.args, u.kwargs) for u in node.users}

        def undo() -> None:
            for user, (args, kwargs) in users.items():
                user.args, user.kwargs = args, kwargs
            _restore(snapshot)

        node.replace_all_uses_with(source)
        failure = propagate(gm, changed=users)
        if failure is None:
            failure = self._unreadable(gm, snapshot, source, eager_outputs)
        if failure is None:
            # The bypassed copy is still in the graph (dead) until the decision is taken.
            after = graph_cost(gm, ctx.bindings).nbytes - ctx.nbytes(node)
            if after >= before:
                failure = f"saves nothing ({before} B before, {after} B after)"
        if failure is not None:
            undo()
            if "fails" in failure:
                failure = f"a consumer needs the copied layout: {failure}"
            return failure
        return before - after, undo

    def _unreadable(self, gm, snapshot, source, eager_outputs) -> str | None:
        changed = _outputs_changed(gm, eager_outputs)
        if changed:
            return f"graph output {changed[0]} would change strides (eager's must be kept)"
        for node in gm.graph.nodes:
            old = snapshot.get(node, (None, None))[1]
            meta = tensor_meta(node)
            if meta is None or (
                node is not source and isinstance(old, TensorMeta) and _same_strides(old, meta)
            ):
                continue
            readers = [node] + [u for u in node.users if is_view(u)]
            for reader in readers:
                for user in reader.users:
                    if _opaque(user) and not _readable_by(user, tensor_meta(reader)):
                        return (
                            f"%{user.name} ({user.target}) cannot read %{reader.name} at "
                            f"strides {list(tensor_meta(reader).stride)} without a copy"
                        )
        return None

    # -- 2. matmul outputs in their reader's order --------------------------------------

    def _order_matmul_outputs(self, gm, ctx, eager_outputs) -> None:
        for node in list(gm.graph.nodes):
            if node.target not in MATMUL_OUT_VARIANTS or node.graph is not gm.graph:
                continue
            readers = buffer_users(node)
            if len(readers) != 1 or _copy_source(readers[0]) is None:
                continue
            copy_node = readers[0]
            chain = []
            current = copy_node.args[0]
            while current is not node:
                if current.target not in _INVERTIBLE_VIEWS or len(current.users) != 1:
                    chain = None
                    break
                chain.append(current)
                current = current.args[0]
            if chain is None:
                continue
            label = f"%{node.name} ({node.target}) for copy %{copy_node.name}"
            nbytes = ctx.nbytes(copy_node)
            strides = self._wanted_strides(node, chain, copy_node)
            if isinstance(strides, str):
                ctx.refuse(
                    "matmul_out_kept",
                    f"kept layout of {label}",
                    strides,
                    nbytes,
                    (node.name, copy_node.name),
                )
                continue
            meta = tensor_meta(node)
            if _same_strides(
                meta, TensorMeta(meta.shape, strides, meta.storage_offset, meta.dtype)
            ):
                continue  # already in that order: the copy is an identity (cleanup's business)
            sizes = _Sizes(gm)
            if not all(sizes.buildable(e) for e in (*meta.shape, *strides)):
                ctx.refuse(
                    "matmul_out_kept",
                    f"kept layout of {label}",
                    "a size of the wanted layout cannot be read off the graph inputs",
                    nbytes,
                    (node.name, copy_node.name),
                )
                continue
            what = f"{label}: writes strides {list(strides)}, the copy's order"
            why = (
                f"the copy then reads its result in order, so the {nbytes} B copy kernel can "
                f"go (counted where it is removed); the library writes a matmul at any row stride"
            )
            if not ctx.decide("matmul_out_order", what, why, 0, (node.name, copy_node.name)):
                return
            self._rewrite_matmul(gm, node, strides, sizes)
            failure = propagate(gm)
            assert failure is None, failure
            self._drop_identity_copy(gm, ctx, copy_node, eager_outputs)

    def _wanted_strides(self, node, chain, copy_node):
        """Strides of the matmul output that make the view chain land on the copy's layout."""
        mode = _fake_mode(node.graph.owning_module)
        target = copy_node.meta.get("val")
        if not isinstance(target, torch.Tensor):
            return "the copy's fake value is unknown"
        try:
            with mode:
                value = torch.empty_strided(
                    target.shape, target.stride(), dtype=target.dtype, device=target.device
                )
                for view in chain:  # from the copy back to the matmul
                    source = view.args[0].meta["val"]
                    if view.target in (aten.permute.default,):
                        dims = [d % value.dim() for d in view.args[1]]
                        inverse = [dims.index(d) for d in range(len(dims))]
                        value = value.permute(inverse)
                    elif view.target in (aten.transpose.int, aten.t.default):
                        value = (
                            value.t()
                            if view.target is aten.t.default
                            else value.transpose(view.args[1], view.args[2])
                        )
                    else:
                        value = value.view(source.shape)
        except (RuntimeError, ValueError):
            # e.g. (batch, heads) merged into bmm's one batch dim, which has a single stride
            # while the copy's order would need one per dim: the matmul forces the copy.
            return (
                f"the matmul's output dims cannot take strides that give the copy's layout "
                f"(view to {list(value.shape)} -> {list(source.shape)} is not expressible); "
                f"the copy is what the matmul's stride requirements force"
            )
        strides = tuple(sympy.sympify(meta) for meta in TensorMeta.from_tensor(value).stride)
        return strides

    def _rewrite_matmul(self, gm, node, strides, sizes: _Sizes) -> None:
        meta, value = tensor_meta(node), node.meta["val"]
        with gm.graph.inserting_before(node):
            shape_args = [sizes.value(e) for e in meta.shape]
            stride_args = [sizes.value(e) for e in strides]
            buffer = gm.graph.call_function(
                aten.empty_strided.default,
                (shape_args, stride_args),
                {"dtype": meta.dtype, "device": value.device},
            )
            written = gm.graph.call_function(
                MATMUL_OUT_VARIANTS[node.target], tuple(node.args), {"out": buffer}
            )
        written.meta.update(node.meta)
        node.replace_all_uses_with(written)
        gm.graph.erase_node(node)

    def _drop_identity_copy(self, gm, ctx, copy_node, eager_outputs) -> None:
        # The copy may be a graph output: its source is then a view of the matmul's own
        # buffer, which nothing else reads, so the output aliases no input and no other output.
        source = _copy_source(copy_node)
        if source is None:
            return
        if not _same_strides(tensor_meta(source), tensor_meta(copy_node)):
            return
        nbytes = ctx.nbytes(copy_node)
        what = f"removed copy %{copy_node.name} ({copy_node.target})"
        why = f"its source %{source.name} is already in the copy's layout"
        if ctx.decide("copy_removed", what, why, nbytes, (copy_node.name,)):
            copy_node.replace_all_uses_with(source)
            gm.graph.erase_node(copy_node)

    # -- 3. channels_last ---------------------------------------------------------------

    def _choose_conv_layout(self, gm, ctx, eager_outputs) -> None:
        convs = [n for n in gm.graph.nodes if n.target in _CONV_OPERANDS]
        if not convs or any(layout_of(tensor_meta(n.args[0])) is None for n in convs):
            return
        names = tuple(n.name for n in convs)
        estimates: dict[str, LayoutEstimate | str] = {}
        reorders_apply = self.onednn_reorders and any(
            runs_on_onednn(n, ctx.bindings) for n in convs
        )
        for layout in (NCHW, NHWC):
            trial = copy_graph(gm)
            conversions = _apply_layout(trial, layout, eager_outputs, ctx, record=False)
            if isinstance(conversions, str):
                estimates[layout] = conversions
                continue
            library = _library_conversions(trial, layout, ctx)
            reorders = _library_reorders(trial, ctx) if reorders_apply else 0
            bytes_expr = self._estimate(trial, ctx)
            total = evaluate(bytes_expr, ctx.bindings) + library + reorders
            estimates[layout] = LayoutEstimate(
                total, bytes_expr, len(conversions), library, reorders
            )
        # The graph as it is: the layout that needs no conversion (None: both need some).
        unchanged = [
            k for k, v in estimates.items() if not isinstance(v, str) and v.conversions == 0
        ]
        current = unchanged[0] if unchanged else None
        legal = {k: v for k, v in estimates.items() if not isinstance(v, str)}
        if not legal:
            return
        if self.channels_last == "always" and NHWC in legal:
            chosen = NHWC
        else:
            chosen = min(legal, key=lambda k: (legal[k].total, k != current))
        other = NHWC if chosen == NCHW else NCHW
        was = current or f"mixed: {layout_of(tensor_meta(convs[0])) or 'strided'} output"
        stage = "after fusion" if self._fuses(ctx) else "before fusion"

        def describe(layout: str, estimate: LayoutEstimate | str) -> str:
            if isinstance(estimate, str):
                return f"{layout}: not possible ({estimate})"
            total, expr, conversions, library, reorders = estimate
            symbolic = "" if sympy.sympify(expr).is_number else f" = {expr}"
            hidden = f"; activations oneDNN reorders: {reorders} B" if reorders_apply else ""
            return (
                f"{layout}: {total} B (graph {stage}: {total - library - reorders} B{symbolic}, "
                f"with {conversions} conversion(s) inserted; weights the library converts: "
                f"{library} B{hidden})"
            )

        summary = "; ".join(describe(k, v) for k, v in estimates.items())
        alternative = legal.get(other)
        margin = alternative.total - legal[chosen].total if alternative is not None else 0
        if chosen == current:
            what = f"kept {current} for {len(convs)} convolution(s); {other} refused"
            ctx.refuse("conv_layout_kept", what, summary, -margin, names)
            return
        what = f"chose {chosen} for {len(convs)} convolution(s) (was {was})"
        if not ctx.decide("conv_layout", what, summary, margin, names):
            return
        _apply_layout(gm, chosen, eager_outputs, ctx, record=True)

    def _fuses(self, ctx: PassContext) -> bool:
        return ctx.pipeline.runs("fusion")

    def _estimate(self, gm: torch.fx.GraphModule, ctx: PassContext) -> sympy.Expr:
        """Modelled bytes of the graph, after fusion when the pipeline fuses (a dry run)."""
        if self._fuses(ctx):
            fusion = ctx.pipeline.instance("fusion")  # a sibling pass, used as an estimator
            fusion.run(gm, ctx.scratch(fusion))
        return graph_cost(gm, ctx.bindings).bytes_expr


def _library_conversions(gm: torch.fx.GraphModule, layout: str, ctx: PassContext) -> int:
    """Bytes the convolution library moves converting weights not in its layout (read + write)."""
    total = 0
    for node in gm.graph.nodes:
        if node.target in _CONV_OPERANDS:
            _, weight = _CONV_OPERANDS[node.target]
            meta = tensor_meta(node.args[weight])
            if layout_of(meta) is not None and not in_layout(meta, layout):
                total += 2 * evaluate(meta.nbytes, ctx.bindings)
    return total


def _library_reorders(gm: torch.fx.GraphModule, ctx: PassContext) -> int:
    """Bytes oneDNN moves reordering NCHW activations to its blocked layout and back (read +
    write each; modelled, `compiler/onednn.py`): traffic the graph does not show."""
    return sum(
        hidden_reorder_bytes(n, ctx.bindings) for n in gm.graph.nodes if n.target in _CONV_OPERANDS
    )


def _convert(gm, node: torch.fx.Node, before: torch.fx.Node, memory_format) -> torch.fx.Node:
    with gm.graph.inserting_before(before):
        return gm.graph.call_function(aten.clone.default, (node,), {"memory_format": memory_format})


def _apply_layout(gm, layout, eager_outputs, ctx, record: bool):
    """Run every convolution in `layout`; return the conversions inserted, or why it cannot.

    With `record` each conversion is a decision (and takes fuel); without, it is a dry run
    on a copy.
    """
    inserted: list[torch.fx.Node] = []

    def note(node: torch.fx.Node, what: str) -> bool:
        if not record:
            inserted.append(node)
            return True
        nbytes = ctx.nbytes(node)
        why = f"part of the {layout} choice; the conversion moves {nbytes} B"
        what = f"inserted conversion %{node.name}: {what}"
        if ctx.decide("conversion", what, why, -nbytes, (node.name,)):
            inserted.append(node)
            return True
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        return False

    old = {n: tensor_meta(n) for n in gm.graph.nodes}
    target = _FORMATS[layout]
    for conv in [n for n in gm.graph.nodes if n.target in _CONV_OPERANDS]:
        activations, weight = _CONV_OPERANDS[conv.target]
        positions = activations if layout == NHWC else (*activations, weight)
        for position in positions:
            operand = conv.args[position]
            if in_layout(tensor_meta(operand), layout):
                continue
            converted = _convert(gm, operand, conv, target)
            conv.replace_input_with(operand, converted)
            failure = propagate(gm)
            if failure is not None:
                return failure
            note(converted, f"%{operand.name} to {layout} for %{conv.name}")

    def repair(node: torch.fx.Node) -> bool:
        # A view that needs the tensor's old layout reads a conversion back to it.
        source = node.args[0] if node.args else None
        if node.target not in _STRICT_VIEWS or not isinstance(source, torch.fx.Node):
            return False
        memory_format = _format_of(old.get(source)) if old.get(source) else None
        if memory_format is None or source.target is aten.clone.default:
            return False
        converted = _convert(gm, source, node, memory_format)
        node.replace_input_with(source, converted)
        converted.meta["val"] = source.meta["val"].clone(memory_format=memory_format)
        converted.meta[META_KEY] = meta_of_value(converted.meta["val"])
        return note(converted, f"%{source.name} back for view %{node.name}")

    failure = propagate(gm, repair)
    if failure is not None:
        return failure
    output = next(n for n in gm.graph.nodes if n.op == "output")
    for position in _outputs_changed(gm, eager_outputs):
        values = output.args[0]
        node = values[position]
        memory_format = _format_of(eager_outputs[position])
        if memory_format is None:
            return f"graph output {position} has strides no conversion restores"
        converted = _convert(gm, node, output, memory_format)
        new_values = list(values)
        new_values[position] = converted
        output.args = (type(values)(new_values),)
        propagate(gm)
        note(converted, f"output %{node.name} back to eager's strides")
    failure = propagate(gm)
    return failure if failure is not None else inserted
