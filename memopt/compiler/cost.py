"""The cost model: bytes read and written and FLOPs of every node, as sympy expressions.

Rules (docs/architecture.md, "How bytes are counted"):
- Views (view, permute, expand, slice, squeeze, ...) and tuple indexing move nothing and
  launch nothing.
- An ATen node reads each distinct buffer it takes once: the distinct elements it touches
  (a broadcast input counts its real elements once; several views of one buffer together
  count at most the buffer), and writes each output once.
- Gathers (index_select, embedding, ...) read at most as many source elements as they write.
- `copy_` (an input mutation at the end of a functional graph) reads only its source
  (its functional form, `copy`, clones the destination first: it reads both).
- In-place updates of some elements (`index_put_`, `scatter_`, `scatter_add_`,
  `index_add_`) write only the elements they update and read their indices, the values
  they write (at most one per updated element) and, when they accumulate, the updated
  elements; the rest of the buffer is neither read nor written.
- A node whose target brings its own cost (a fused kernel) is asked for it: `target.memopt_cost(node)`.
- Sectors (modelled, for kernels on a GPU): a read whose neighbouring lanes are s > 1
  elements apart costs min(32, s x itemsize) bytes an element, at most its span in
  32-byte sectors (`sector_nbytes`). A generated Triton kernel charges it from its Kernel
  IR (backends/triton/sectors.py); the passes price candidates with it where the kernels
  run on Triton (`graph_cost(..., sectors=True)`); other ATen nodes and the C++ and
  reference backends' kernels keep their bytes.

FLOPs are modelled: 2*M*N*K for matmuls, 2*out*(in_channels/groups)*prod(kernel) for
convolutions, one per output element for everything else.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import sympy
import torch
import torch.fx

from memopt.compiler.aten_ops import (
    ATTENTION_BACKWARD,
    ATTENTION_FORWARD,
    EXTERN_OPS,
    FILL_OPS,
    FREE_OPS,
    GATHERS,
    PARTIAL_UPDATES,
    indexed_numel,
    update_accumulates,
)
from memopt.compiler.graph import (
    TensorMeta,
    evaluate,
    numel,
    output_metas,
    tensor_meta,
    touched_elements,
)

aten = torch.ops.aten
ZERO = sympy.Integer(0)
# A GPU's memory moves whole 32-byte sectors: a warp's access is served as the sectors its
# lanes touch (CUDA C++ Best Practices Guide, "Coalesced Access to Global Memory").
SECTOR_BYTES = 32


@dataclass(frozen=True)
class Cost:
    read: sympy.Expr
    write: sympy.Expr
    flops: sympy.Expr

    @property
    def nbytes(self) -> sympy.Expr:
        return self.read + self.write


def is_view(node: torch.fx.Node) -> bool:
    """True for nodes that only reinterpret an existing buffer (no kernel, no bytes)."""
    if node.op != "call_function":
        return False
    target = node.target
    if target in FREE_OPS:
        return True
    if isinstance(target, torch._ops.OpOverload) and target.is_view:
        if target in (aten.reshape.default, aten._reshape_alias.default):
            source = tensor_meta(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
            return source is not None and source.is_contiguous()
        return True
    return False


def is_kernel(node: torch.fx.Node) -> bool:
    """True for nodes the program launches: everything but placeholders, outputs and views."""
    if node.op != "call_function" or is_view(node):
        return False
    # Pure scalar arithmetic on sizes (operator.mul on SymInts) runs on the host.
    return bool(output_metas(node)) or _custom_cost(node) is not None


def kernel_kind(node: torch.fx.Node) -> str:
    kind = getattr(node.target, "memopt_kind", None)
    if kind is not None:
        return kind
    return "extern" if node.target in EXTERN_OPS else "aten"


def buffer_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users of a node's buffer, looking through views (which read it in place)."""
    found: list[torch.fx.Node] = []
    for user in node.users:
        if is_view(user) and user.target is not operator.getitem:
            found.extend(buffer_users(user))
        else:
            found.append(user)
    return found


def reaches_output(node: torch.fx.Node) -> bool:
    """The node's buffer is a graph output, directly or through views."""
    return any(user.op == "output" for user in buffer_users(node))


def readers_between(
    buffer: torch.fx.Node, start: torch.fx.Node, end: torch.fx.Node
) -> list[torch.fx.Node]:
    """Nodes strictly between `start` and `end` in the graph that read `buffer` (through
    views too): what sees other values of it when a write moves from `end` to `start`."""
    inside, found = False, []
    readers = set(buffer_users(buffer))
    for node in buffer.graph.nodes:
        if node is end:
            break
        if inside and node in readers:
            found.append(node)
        inside = inside or node is start
    return found


def view_base(node: torch.fx.Node) -> torch.fx.Node:
    """The node that owns the buffer a chain of views reads from."""
    # operator.getitem picks one output of a multi-output node: that output is its own buffer.
    while (
        is_view(node)
        and node.target is not operator.getitem
        and node.args
        and isinstance(node.args[0], torch.fx.Node)
    ):
        node = node.args[0]
    return node


def kernel_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The tensors a kernel reads: its tensor arguments, not an out= buffer it writes."""
    found: list[torch.fx.Node] = []
    _tensor_args(node.args, found)
    # An out= buffer is written, not read.
    _tensor_args(tuple(v for k, v in node.kwargs.items() if k != "out"), found)
    return found


def _tensor_args(arg: object, found: list[torch.fx.Node]) -> None:
    """Append the tensor nodes in `arg` (nested lists and tuples) not in `found` yet.
    (A module function, not a closure: a recursive closure is a reference cycle per call,
    garbage only the cyclic collector frees.)"""
    if isinstance(arg, torch.fx.Node):
        if tensor_meta(arg) is not None and arg not in found:
            found.append(arg)
    elif isinstance(arg, (list, tuple)):
        for item in arg:
            _tensor_args(item, found)


def read_bytes(
    node: torch.fx.Node,
    inputs: Iterable[torch.fx.Node],
    charged: Mapping[torch.fx.Node, sympy.Expr] | Callable[[TensorMeta], sympy.Expr] | None = None,
) -> sympy.Expr:
    """Bytes read from the given input nodes: distinct touched elements, per distinct buffer.

    `charged` prices some inputs otherwise (their bytes in sectors): a map from input node
    to bytes, or a function of each input's metadata. Several views of one buffer together
    never cost more than the buffer (read in full, its sectors are its bytes)."""
    per_base: dict[torch.fx.Node, list[sympy.Expr]] = {}
    for arg in inputs:
        meta = tensor_meta(arg)
        if meta is None:
            continue
        if charged is None:
            nbytes = meta.touched_nbytes
        elif callable(charged):
            nbytes = charged(meta)
        else:
            nbytes = charged.get(arg, meta.touched_nbytes)
        per_base.setdefault(view_base(arg), []).append(nbytes)
    total = ZERO
    for base, figures in per_base.items():
        touched = sympy.Add(*figures)
        base_meta = tensor_meta(base)
        if len(figures) > 1 and base_meta is not None:
            touched = sympy.Min(touched, base_meta.nbytes)
        total += touched
    return total


def sector_nbytes(
    shape: tuple[sympy.Expr, ...],
    stride: tuple[sympy.Expr, ...],
    itemsize: int,
    lane_stride: sympy.Expr | int | None,
) -> sympy.Expr:
    """Bytes of reading (or writing) a tensor's distinct elements in 32-byte sectors, when
    neighbouring lanes of the kernel are `lane_stride` elements apart (modelled).

    Coalesced (1), shared by the lanes (0) or not affine (None, a gather): its bytes. Else
    each element drags in the part of its sector up to the next lane's, min(32, stride x
    itemsize) bytes, and the whole never more than the tensor's span rounded up to sectors
    (a stride-2 fp32 read: 2x its bytes; one element a sector from 8 fp32 elements apart:
    8x). A symbolic stride stays symbolic: where it is 1 the figure is the bytes again.
    """
    elements = sympy.sympify(touched_elements(shape, stride))
    plain = elements * itemsize
    lane_stride = None if lane_stride is None else sympy.sympify(lane_stride)
    if lane_stride is None or (lane_stride.is_number and lane_stride <= 1) or elements == 0:
        return plain
    per_element = sympy.Min(SECTOR_BYTES, lane_stride * itemsize)
    span = 1 + sum(((size - 1) * step for size, step in zip(shape, stride)), ZERO)
    span_sectors = sympy.ceiling(span * itemsize / SECTOR_BYTES) * SECTOR_BYTES
    return sympy.Min(elements * per_element, span_sectors)


def view_lane_stride(meta: TensorMeta) -> sympy.Expr:
    """Elements between neighbouring lanes of a GPU kernel reading `meta` with its lanes
    in the best order it can (from the graph, before any kernel exists: a lower bound).

    1 when a dim of it (of size above 1) has unit stride: lanes run along it, or a tile
    makes a transposed read contiguous; 0 when no dim moves (a broadcast scalar); else the
    smallest stride among its dims (every other element, a column of a row-major matrix).
    """
    moving = [step for size, step in zip(meta.shape, meta.stride) if size != 1 and step != 0]
    if not moving:
        return ZERO
    if any(step == 1 for step in moving):
        return sympy.Integer(1)
    return sympy.Min(*moving)


def touched_sector_nbytes(meta: TensorMeta) -> sympy.Expr:
    """`meta.touched_nbytes` in 32-byte sectors, read by a GPU kernel (view_lane_stride)."""
    return sector_nbytes(meta.shape, meta.stride, meta.itemsize, view_lane_stride(meta))


def _custom_cost(node: torch.fx.Node) -> Cost | None:
    method = getattr(node.target, "memopt_cost", None)
    return method(node) if callable(method) else None


def node_cost(node: torch.fx.Node) -> Cost:
    """Modelled traffic and FLOPs of one node; zero for views, placeholders and outputs."""
    traffic = _traffic(node)
    if isinstance(traffic, Cost):
        return traffic
    read, write = traffic
    return Cost(read=read, write=write, flops=_flops(node, output_metas(node)))


def node_bytes(node: torch.fx.Node, sectors: bool = False) -> sympy.Expr:
    """node_cost(node).nbytes, without counting FLOPs. `sectors`: an ATen pointwise or
    reduction node reads each input in 32-byte sectors (`touched_sector_nbytes`), as the
    kernel that runs it on a GPU would."""
    traffic = _traffic(node, sectors)
    return traffic.nbytes if isinstance(traffic, Cost) else traffic[0] + traffic[1]


def _traffic(node: torch.fx.Node, sectors: bool = False) -> Cost | tuple[sympy.Expr, sympy.Expr]:
    """(bytes read, bytes written) of one node, or its whole Cost where an op or an update
    rule gives one."""
    custom = _custom_cost(node)
    if custom is not None:
        return custom
    if not is_kernel(node):
        return Cost(ZERO, ZERO, ZERO)
    outputs = output_metas(node)
    write = sympy.Add(*(m.nbytes for m in outputs))
    target = node.target
    if target in _UPDATES:
        return _update_cost(node)
    if target is aten.copy_.default:
        read = read_bytes(node, [node.args[1]])
    elif target in GATHERS:
        args = kernel_inputs(node)
        source = node.args[0] if node.args else None  # the table
        others = [a for a in args if a is not source]
        read = read_bytes(node, others)
        source_meta = tensor_meta(source) if isinstance(source, torch.fx.Node) else None
        if source_meta is not None:
            read += sympy.Min(source_meta.touched_nbytes, write)
    elif target in FILL_OPS:
        read = ZERO
    elif sectors and target not in EXTERN_OPS:
        read = read_bytes(node, kernel_inputs(node), touched_sector_nbytes)
    else:
        read = read_bytes(node, kernel_inputs(node))
    return read, write


def _indexed_elements(base: TensorMeta, indices: list[object]) -> sympy.Expr:
    """Elements `base[indices]` selects (index_put's indices: None for a whole dim). A
    boolean mask selects an unknown number of elements: the whole buffer is counted."""
    metas = [tensor_meta(i) if isinstance(i, torch.fx.Node) else None for i in indices]
    if any(m is not None and m.dtype in (torch.bool, torch.uint8) for m in metas):
        return base.numel
    return sympy.sympify(indexed_numel(base.shape, [m.shape if m else None for m in metas]))


def _update_cost(node: torch.fx.Node) -> Cost:
    """An in-place partial update (PARTIAL_UPDATES): the updated elements written (read too
    when it accumulates), its indices read, its values read at most once per element."""
    spec = PARTIAL_UPDATES[node.target]
    base = tensor_meta(node.args[0])
    if spec.updated_arg is None:  # index_put_(self, indices, values, accumulate)
        written, values = _indexed_elements(base, list(node.args[1])), node.args[2]
    else:  # scatter_(self, dim, index, src), index_add_(self, dim, index, source), ...
        written = tensor_meta(node.args[spec.updated_arg]).numel
        values = node.args[3] if len(node.args) > 3 else None
    index_args = [a for a in kernel_inputs(node)[1:] if a is not values]
    read = read_bytes(node, index_args)
    values_meta = tensor_meta(values) if isinstance(values, torch.fx.Node) else None
    if values_meta is not None:
        read += sympy.Min(values_meta.touched_nbytes, written * values_meta.itemsize)
    if update_accumulates(node.target, node.args, node.kwargs):
        read += written * base.itemsize
    return Cost(read=read, write=written * base.itemsize, flops=written)


# In-place partial updates (a pass makes them: capture is functional) cost what they update.
_UPDATES = {t for t in PARTIAL_UPDATES if t._schema.is_mutable}


def op_flops(node: torch.fx.Node, op: object) -> sympy.Expr:
    """FLOPs of `node` had its target been `op` (same arguments): for call targets that run
    an ATen op another way (into a slice of a bigger buffer, say)."""
    rule = _FLOP_RULES.get(op)
    return sympy.sympify(rule(node, op)) if rule is not None else _flops(node, output_metas(node))


def _shape(arg: object) -> tuple[sympy.Expr, ...]:
    meta = tensor_meta(arg) if isinstance(arg, torch.fx.Node) else None
    return meta.shape if meta is not None else ()


def _mm_flops(node: torch.fx.Node, op: object) -> sympy.Expr:
    a, b = (node.args[1], node.args[2]) if op is aten.addmm.default else node.args[:2]
    (m, k), (_, n) = _shape(a), _shape(b)
    return 2 * m * n * k


def _bmm_flops(node: torch.fx.Node, op: object) -> sympy.Expr:
    a, b = (node.args[1], node.args[2]) if op is aten.baddbmm.default else node.args[:2]
    (batch, m, k), (_, _, n) = _shape(a), _shape(b)
    return 2 * batch * m * n * k


def _conv_flops(node: torch.fx.Node, op: object) -> sympy.Expr:
    weight = _shape(node.args[1])
    groups = node.args[8] if len(node.args) > 8 else 1
    out = output_metas(node)[0]
    # weight is (out_channels, in_channels / groups, *kernel); transposed conv has them swapped.
    transposed = bool(node.args[6]) if len(node.args) > 6 else False
    per_output = weight[0] / groups if transposed else weight[1]
    return 2 * out.numel * per_output * numel(weight[2:])


def _conv_backward_flops(node: torch.fx.Node, op: object) -> sympy.Expr:
    # Each gradient (input, weight) costs as much as the forward convolution; weight[1] is
    # already in_channels / groups.
    grad_out, weight = _shape(node.args[0]), _shape(node.args[2])
    mask = node.args[10] if len(node.args) > 10 else (True, True, True)
    forward = 2 * numel(grad_out) * weight[1] * numel(weight[2:])
    return forward * (int(bool(mask[0])) + int(bool(mask[1])))


def attention_flops(node: torch.fx.Node, op: object = None) -> sympy.Expr:
    # Forward: two matmuls over (batch, heads, Sq, Sk, D). Backward (flash): the scores
    # recomputed, then dV, dP, dQ, dK: five. Causal masks skip about half; not modelled.
    query, key = node.args[1:3] if node.target in ATTENTION_BACKWARD else node.args[:2]
    *batch, seq_q, head_dim = _shape(query)
    seq_k = _shape(key)[-2]
    matmuls = 5 if node.target in ATTENTION_BACKWARD else 2
    return 2 * matmuls * numel(batch) * seq_q * seq_k * head_dim


# op -> its FLOPs, from a node with that op's arguments (the node's target may run the op
# another way: extern.IntoSlice).
_FLOP_RULES: Mapping[object, Callable[[torch.fx.Node, object], sympy.Expr]] = {
    aten.mm.default: _mm_flops,
    aten.mm.out: _mm_flops,
    aten.addmm.default: _mm_flops,
    aten.bmm.default: _bmm_flops,
    aten.bmm.out: _bmm_flops,
    aten.baddbmm.default: _bmm_flops,
    aten.convolution.default: _conv_flops,
    aten.convolution_backward.default: _conv_backward_flops,
    **dict.fromkeys(ATTENTION_FORWARD | ATTENTION_BACKWARD, attention_flops),
}


def _flops(node: torch.fx.Node, outputs: list[TensorMeta]) -> sympy.Expr:
    rule = _FLOP_RULES.get(node.target)
    if rule is not None:
        return sympy.sympify(rule(node, node.target))
    # Reductions read more elements than they write: one op per input element.
    inputs = [tensor_meta(a) for a in kernel_inputs(node)]
    largest_input = max((m.numel for m in inputs if m is not None), default=ZERO, key=_size_key)
    largest_output = max((m.numel for m in outputs), default=ZERO, key=_size_key)
    return sympy.Max(largest_input, largest_output) if largest_input != ZERO else largest_output


def _size_key(expr: sympy.Expr) -> tuple[int, str]:
    # max() over symbolic sizes: order by the number of factors, then by text (deterministic).
    return (len(sympy.Mul.make_args(expr)), str(expr))


def is_low_precision(node: torch.fx.Node) -> bool:
    outputs = output_metas(node)
    return kernel_kind(node) == "extern" and any(
        m.dtype in (torch.float16, torch.bfloat16) for m in outputs
    )


@dataclass(frozen=True)
class GraphCost:
    """Totals of one graph: symbolic and at the example sizes."""

    total: sympy.Expr  # the sum of the nodes' bytes, as added up
    kernels: int
    bindings: Mapping[sympy.Symbol, int]

    @functools.cached_property
    def bytes_expr(self) -> sympy.Expr:
        """The bytes, symbolic and simplified (simplifying a large sum takes a while: only
        when asked for)."""
        return sympy.simplify(self.total)

    @property
    def nbytes(self) -> int:
        return evaluate(self.total, self.bindings)


def graph_cost(
    gm: torch.fx.GraphModule, bindings: Mapping[sympy.Symbol, int], sectors: bool = False
) -> GraphCost:
    """The graph's modelled bytes. `sectors`: its ATen pointwise and reduction nodes read in
    32-byte sectors too (node_bytes), a pass's estimate for a graph whose kernels run on a
    GPU; generated kernels charge what they charge either way (FusedKernel.memopt_cost)."""
    nodes = [n for n in gm.graph.nodes if is_kernel(n)]
    total = sympy.Add(*(node_bytes(n, sectors) for n in nodes))
    return GraphCost(total=total, kernels=len(nodes), bindings=bindings)
