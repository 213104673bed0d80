"""Lowering: a group of ATen fx nodes -> one Kernel IR kernel.

Each node is a function from an index (a tuple of sympy expressions, one per dimension of
its result) to a Value: `value_at(node, index)`. Pointwise ops apply their op to their
operands' values at the broadcast index; views (permute, expand, reshape, slice, ...)
transform the index and ask their source; reductions ask their source at the row's index
extended with the reduction variables; nodes outside the group are loads from their
tensor, through its own strides (so a view of an input is read in place, with no copy).

A group lowers to a kernel whose domain is its reduction's (rows x reduced elements) or, for
a pointwise group, its outputs' shape. A group with two reductions, one over the result of
the other along another axis (`d.sum(-1).amin(1)`), lowers to a nested kernel: rows x outer
reduced elements x inner reduced elements, the inner results never stored. What does not fit raises NotLowerable with the
reason, which the fusion pass records. The op tables and the rules of views and of the
remaining ops are in lowering_rules.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import sympy
import torch
import torch.fx

from memopt.compiler import kernel_ir as ir
from memopt.compiler.aten_ops import GATHERS, TEMPLATE_MATMULS
from memopt.compiler.cost import buffer_users, is_view
from memopt.compiler.graph import tensor_meta
from memopt.compiler.indexing import offset, recombine, reshape_index, simplify
from memopt.compiler.kernel_ir import Buffer, Kernel, Store, Value
from memopt.compiler.lowering_rules import (
    BINARY,
    CASTS,
    FILLS,
    IDENTITY,
    OP_RULES,
    OTHER,
    REDUCTIONS,
    SUPPORTED_DTYPES,
    TEMPLATE_DTYPES,
    UNARY,
    VIEW_RULES,
    VIEWS,
    ZERO,
    Index,
    NotLowerable,
    ReductionSignature,
    both,
    count_value,
    index_dtype,
    keeps_dims,
    operand_dtype,
    promote,
    reduction_signature,
    scalar_dtype,
    symbolic_scalar,
    var_correction,
)

aten = torch.ops.aten
prims = torch.ops.prims


def can_lower(node: torch.fx.Node) -> bool:
    """Whether a node may join a generated kernel (views are folded, not members)."""
    if node.op != "call_function" or is_view(node):
        return False
    target = node.target
    known = (
        target in UNARY
        or target in BINARY
        or target in REDUCTIONS
        or target in IDENTITY
        or target in CASTS
        or target in FILLS
        or target in GATHERS
        or target in OTHER
    )
    meta = tensor_meta(node)
    if not known or meta is None or meta.dtype not in SUPPORTED_DTYPES:
        return False
    inputs = [tensor_meta(a) for a in node.all_input_nodes if symbolic_scalar(a) is None]
    return all(m is not None and m.dtype in SUPPORTED_DTYPES for m in inputs)


def can_lower_matmul(node: torch.fx.Node) -> bool:
    """Whether a matmul may anchor a template kernel (a float mm or bmm of one dtype)."""
    if node.op != "call_function" or node.target not in TEMPLATE_MATMULS:
        return False
    metas = [tensor_meta(node), *(tensor_meta(a) for a in node.args[:2])]
    return all(m is not None and m.dtype in TEMPLATE_DTYPES for m in metas) and (
        len({m.dtype for m in metas}) == 1
    )


@dataclass
class Lowered:
    """A lowered group: the kernel, and which fx nodes its buffers are."""

    kernel: Kernel
    input_nodes: list[torch.fx.Node]
    output_nodes: list[torch.fx.Node]
    gather_sources: frozenset[torch.fx.Node]  # inputs read only through indirect loads
    # Per gathered input: how many gather nodes read it (each one lookup per element).
    gathers_per_source: Mapping[torch.fx.Node, int]
    flops: sympy.Expr


class Lowering:
    def __init__(self, members: Sequence[torch.fx.Node], name: str) -> None:
        self.members = list(members)
        self.member_set = set(members)
        self.name = name
        self.inputs: dict[torch.fx.Node, str] = {}
        self.direct_reads: set[torch.fx.Node] = set()
        self.indirect_reads: set[torch.fx.Node] = set()
        self.gather_nodes: dict[torch.fx.Node, set[torch.fx.Node]] = {}
        self.memo: dict[tuple[torch.fx.Node, Index, Value | None], Value] = {}
        # Where the value being built is used: loads outside it read nothing (see `masked`).
        self.mask: Value | None = None
        self.indirect_count = 0
        self.signature: ReductionSignature | None = None
        # A nested kernel's inner reduction, and the index (in the coordinates of its kept
        # dims) at which the outer level reads its results: the outer full index.
        self.inner_signature: ReductionSignature | None = None
        self.inner_rows: Index = ()
        self.row_vars: tuple[sympy.Symbol, ...] = ()
        self.ranges: dict[sympy.Symbol, sympy.Expr] = {}

    # -- the domain -------------------------------------------------------------------

    def outputs(self) -> list[torch.fx.Node]:
        return [n for n in self.members if any(u not in self.member_set for u in buffer_users(n))]

    def domain(
        self, outputs: list[torch.fx.Node]
    ) -> tuple[tuple[sympy.Expr, ...], tuple[sympy.Expr, ...]]:
        signatures = {reduction_signature(n) for n in self.members if n.target in REDUCTIONS}
        matmuls = [n for n in self.members if n.target in TEMPLATE_MATMULS]
        if matmuls:
            return self.matmul_domain(matmuls, signatures)
        if len(signatures) == 2:
            nested = _nesting(*signatures) or _nesting(*reversed(list(signatures)))
            if nested is not None:
                self.inner_signature = nested[0]
                signatures = {nested[1]}
        if len(signatures) > 1:
            raise NotLowerable("reductions over different shapes or axes cannot share a kernel")
        if signatures:
            (self.signature,) = signatures
            shape, axes = self.signature.shape, self.signature.axes
            ranges = tuple(s for d, s in enumerate(shape) if d not in axes)
            reduced = tuple(s for d, s in enumerate(shape) if d in axes)
            return ranges, reduced
        # A pointwise kernel iterates over its first output; other outputs must have as many
        # elements (a view of the same values in another shape is stored through a reshape).
        shape = tensor_meta(outputs[0]).shape
        for node in outputs[1:]:
            if not _same_numel(tensor_meta(node).shape, shape):
                raise NotLowerable(
                    "outputs with different numbers of elements cannot share a pointwise kernel"
                )
        return shape, ()

    def matmul_domain(
        self, matmuls: list[torch.fx.Node], signatures: set[ReductionSignature]
    ) -> tuple[tuple[sympy.Expr, ...], tuple[sympy.Expr, ...]]:
        """A template kernel iterates over its matmul's output (*batch, M, N) and reduces K."""
        if len(matmuls) > 1:
            raise NotLowerable("a template kernel holds one matmul")
        if signatures:
            raise NotLowerable("a matmul template and a reduction cannot share a kernel")
        (matmul,) = matmuls
        shape = tensor_meta(matmul).shape
        depth = tensor_meta(matmul.args[0]).shape[-1]
        self.signature = ReductionSignature((*shape, depth), (len(shape),))
        return shape, (depth,)

    def inner_ranges(self) -> tuple[sympy.Expr, ...]:
        if self.inner_signature is None:
            return ()
        shape, axes = self.inner_signature.shape, self.inner_signature.axes
        return tuple(shape[d] for d in axes)

    def store_index(self, node: torch.fx.Node) -> Index:
        """The index at which an output node's elements are computed, in domain variables."""
        shape = tensor_meta(node).shape
        rows = tuple(ir.index_var(k) for k in range(len(self.row_vars)))
        if self.signature is None:
            domain_shape = tuple(self.ranges[v] for v in rows)
            return _reshaped(rows, domain_shape, shape)
        full_shape, axes = self.signature.shape, self.signature.axes
        if self.inner_signature is not None and not _same_numel(
            shape, [s for d, s in enumerate(full_shape) if d not in axes]
        ):
            raise NotLowerable(
                f"%{node.name} of shape {list(shape)} is needed outside the kernel, but a "
                "kernel with nested reductions stores only the outer reduction's rows (the "
                "inner results stay inside it)"
            )
        if _same_numel(shape, full_shape):
            return _reshaped(self.full_index(), full_shape, shape)
        kept = tuple(s for d, s in enumerate(full_shape) if d not in axes)
        if _same_numel(shape, kept):
            # A row value, stored in any shape with one element per row (keepdim or not).
            return _reshaped(rows, kept, shape)
        raise NotLowerable(
            f"%{node.name} of shape {list(shape)} is neither a row nor an element of the "
            f"reduction domain {list(full_shape)}"
        )

    def full_index(self) -> Index:
        assert self.signature is not None
        rows, reduced = (
            iter(self.row_vars),
            iter(ir.reduction_var(k) for k in range(len(self.signature.axes))),
        )
        return tuple(
            next(reduced) if d in self.signature.axes else next(rows)
            for d in range(len(self.signature.shape))
        )

    # -- values ----------------------------------------------------------------------

    def value_at(self, node: object, index: Index, dtype_hint: torch.dtype | None = None) -> Value:
        if not isinstance(node, torch.fx.Node):
            return ir.const(node, dtype_hint or scalar_dtype(node))
        index = tuple(simplify(e, self.ranges) for e in index)
        key = (node, index, self.mask)
        if key not in self.memo:
            self.memo[key] = self._value_at(node, index)
        return self.memo[key]

    def _value_at(self, node: torch.fx.Node, index: Index) -> Value:
        if node in self.member_set:
            return self.compute(node, index)
        if is_view(node) and node.target in VIEWS and self._reaches_member(node):
            return self.value_at(node.args[0], self.view_source_index(node, index))
        return self.load(node, index)

    def _reaches_member(self, node: torch.fx.Node) -> bool:
        while is_view(node) and isinstance(node.args[0], torch.fx.Node):
            node = node.args[0]
            if node in self.member_set:
                return True
        return False

    @contextlib.contextmanager
    def masked(self, inside: Value) -> Iterator[None]:
        """Values built inside are used only where `inside` holds (a piece of a cat, the
        slice a slice_scatter writes): elsewhere their index may fall outside a buffer, so
        every load made for them is masked, and reads nothing there."""
        outer = self.mask
        self.mask = inside if outer is None else both(outer, inside)
        try:
            yield
        finally:
            self.mask = outer

    def load(self, node: torch.fx.Node, index: Index) -> Value:
        meta = tensor_meta(node)
        if meta is None:
            raise NotLowerable(f"%{node.name} is not a tensor")
        name = self.inputs.setdefault(node, f"in{len(self.inputs)}")
        self.direct_reads.add(node)
        flat = simplify(offset(index, meta.stride), self.ranges)
        return ir.load(name, flat, meta.dtype, mask=self.mask)

    def operand(self, node: torch.fx.Node, arg: object, index: Index, dtype: torch.dtype) -> Value:
        """An operand of a pointwise node at the node's index, broadcast and cast to dtype."""
        size = symbolic_scalar(arg)
        if size is not None:
            # A size computed on the host (sym_size, arithmetic on it): an index expression
            # of the size symbols, which the kernel reads off its inputs' shapes.
            return ir.cast(ir.index_value(size, index_dtype(size)), dtype)
        if isinstance(arg, torch.fx.Node):
            meta = tensor_meta(arg)
            if meta is None:
                raise NotLowerable(f"%{arg.name} is neither a tensor nor a size expression")
            out_shape = tensor_meta(node).shape
            shift = len(out_shape) - len(meta.shape)
            source_index = tuple(
                ZERO if size == 1 and out_shape[d + shift] != 1 else index[d + shift]
                for d, size in enumerate(meta.shape)
            )
            return ir.cast(self.value_at(arg, source_index), dtype)
        return ir.const(arg, dtype)

    def compute(self, node: torch.fx.Node, index: Index) -> Value:
        target = node.target
        meta = tensor_meta(node)
        dtype = meta.dtype
        if target in UNARY:
            # isnan, isinf, logical_not: a bool result of an operand in its own dtype
            compute = ir.compute_dtype(
                dtype if dtype != torch.bool else operand_dtype(node.args[0])
            )
            value = ir.op(
                UNARY[target], self.operand(node, node.args[0], index, compute), dtype=compute
            )
            return ir.cast(value, dtype)
        if target in BINARY:
            return self.binary(node, BINARY[target], index)
        if target in REDUCTIONS:
            return self.reduction(node, index)
        if target in TEMPLATE_MATMULS:
            return self.matmul(node, index)
        if target in IDENTITY:
            return self.value_at(node.args[0], index)
        if target in CASTS:
            return ir.cast(self.value_at(node.args[0], index), dtype)
        if target in FILLS:
            return self.fill(node, dtype)
        if target in GATHERS:
            return self.gather(node, index)
        rule = OP_RULES.get(target)
        if rule is None:
            raise NotLowerable(f"no lowering for {target}")
        return rule(self, node, index)

    def binary(self, node: torch.fx.Node, name: str, index: Index) -> Value:
        a, b = node.args[0], node.args[1]
        dtype = tensor_meta(node).dtype
        compute = dtype
        if name in ir.PREDICATES:
            compute = promote(
                [tensor_meta(x) if isinstance(x, torch.fx.Node) else x for x in (a, b)]
            )
        if name == "truediv" and not compute.is_floating_point:
            compute = torch.float32
        compute = ir.compute_dtype(compute)
        left = self.operand(node, a, index, compute)
        right = self.operand(node, b, index, compute)
        alpha = node.kwargs.get("alpha")
        if alpha is not None and alpha != 1:
            right = ir.op("mul", right, ir.const(alpha, compute), dtype=compute)
        return ir.cast(ir.op(name, left, right, dtype=compute), dtype)

    def fill(self, node: torch.fx.Node, dtype: torch.dtype) -> Value:
        target = node.target
        if target in (aten.zeros_like.default, aten.zeros.default):
            return ir.const(0, dtype)
        if target in (aten.ones_like.default, aten.ones.default):
            return ir.const(1, dtype)
        if target is aten.scalar_tensor.default:
            return ir.const(node.args[0], dtype)
        return ir.const(node.args[1], dtype)  # full(size, value), full_like(x, value)

    def reduction(self, node: torch.fx.Node, index: Index) -> Value:
        signature = reduction_signature(node)
        inner = signature == self.inner_signature and signature != self.signature
        assert inner or signature == self.signature
        kind = REDUCTIONS[node.target]
        axes = signature.axes
        ndim = len(signature.shape)
        # With keepdim the reduced dims are still in the index (as 0); drop them.
        out_rows = (
            [e for d, e in enumerate(index) if d not in axes] if keeps_dims(node) else list(index)
        )
        # An inner reduction is computed per row and outer reduced element.
        expected = self.inner_rows if inner else self.row_vars
        rows_here = tuple(simplify(v, self.ranges) for v in expected)
        if tuple(simplify(e, self.ranges) for e in out_rows) != rows_here:
            raise NotLowerable(
                f"%{node.name} is read at another row than the one the kernel computes"
                + (" (a nested kernel computes each inner result once)" if inner else "")
            )
        rows = iter(out_rows)
        variable = ir.inner_var if inner else ir.reduction_var
        reduced = iter(variable(k) for k in range(len(axes)))
        make = ir.inner_reduce if inner else ir.reduce
        source_index = tuple(next(reduced) if d in axes else next(rows) for d in range(ndim))
        dtype = tensor_meta(node).dtype
        count = sympy.Mul(*(signature.shape[d] for d in axes))
        if kind in ("argmax", "argmin", "any", "all"):
            source = self.value_at(node.args[0], source_index)
            return make(kind, source, dtype)
        accumulate = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        source = ir.cast(self.value_at(node.args[0], source_index), accumulate)
        if kind == "mean":
            total = make("sum", source, accumulate)
            return ir.cast(
                ir.op("truediv", total, count_value(count, accumulate), dtype=accumulate),
                dtype,
            )
        if kind == "var":
            correction = var_correction(node)
            n = count_value(count, accumulate)
            mean = ir.op("truediv", make("sum", source, accumulate), n, dtype=accumulate)
            centered = ir.op("sub", source, mean, dtype=accumulate)
            squares = make("sum", ir.op("mul", centered, centered, dtype=accumulate), accumulate)
            divisor_expr = sympy.sympify(count - correction)
            if divisor_expr.is_number and divisor_expr < 0:  # torch: max(0, N - correction)
                divisor_expr = sympy.Integer(0)
            divisor = count_value(divisor_expr, accumulate)
            return ir.cast(ir.op("truediv", squares, divisor, dtype=accumulate), dtype)
        return ir.cast(make(kind, source, accumulate), dtype)

    def matmul(self, node: torch.fx.Node, index: Index) -> Value:
        """dot(A[*batch, m, r0], B[*batch, r0, n]): operands through their own strides (a
        transposed weight is read in place), prologue members computed per element read."""
        rows = tuple(simplify(v, self.ranges) for v in self.row_vars)
        if tuple(recombine(e, self.ranges) for e in index) != rows:
            raise NotLowerable(
                f"%{node.name} is read at another element than the one the kernel computes"
            )
        *batch, m, n = rows
        k = ir.reduction_var(0)
        a = self.value_at(node.args[0], (*batch, m, k))
        b = self.value_at(node.args[1], (*batch, k, n))
        dtype = tensor_meta(node).dtype
        return ir.cast(ir.dot(a, b, ir.compute_dtype(dtype)), dtype)

    def view_source_index(self, node: torch.fx.Node, index: Index) -> Index:
        rule = VIEW_RULES.get(node.target)
        if rule is None:
            raise NotLowerable(f"no index rule for view {node.target}")
        return rule(node, index)

    def gather(self, node: torch.fx.Node, index: Index) -> Value:
        target = node.target
        meta = tensor_meta(node)
        if target is aten.embedding.default:
            source, indices, dim = node.args[0], node.args[1], 0
            index_meta = tensor_meta(indices)
            k = len(index_meta.shape)
            table_index = (None,) + tuple(index[k:])
            idx_value = self.value_at(indices, tuple(index[:k]))
        elif target is aten.index_select.default:
            source, dim, indices = node.args
            dim = dim % len(meta.shape)
            idx_value = (
                self.value_at(indices, (index[dim],))
                if tensor_meta(indices).shape
                else self.value_at(indices, ())
            )
            table_index = tuple(None if d == dim else e for d, e in enumerate(index))
        elif target is aten.gather.default:
            source, dim, indices = node.args[:3]
            dim = dim % len(meta.shape)
            idx_value = self.value_at(indices, index)
            table_index = tuple(None if d == dim else e for d, e in enumerate(index))
        else:  # index.Tensor / _unsafe_index.Tensor with one index tensor
            source, index_list = node.args
            present = [d for d, t in enumerate(index_list) if t is not None]
            if len(present) != 1:
                raise NotLowerable("indexing with several index tensors stays an ATen call")
            (dim,) = present
            indices = index_list[dim]
            k = len(tensor_meta(indices).shape)
            idx_value = self.value_at(indices, tuple(index[dim : dim + k]))
            table_index = tuple(index[:dim]) + (None,) + tuple(index[dim + k :])
        if (
            not isinstance(source, torch.fx.Node)
            or source in self.member_set
            or self._reaches_member(source)
        ):
            raise NotLowerable("a gather's table must be a materialized tensor")
        source_meta = tensor_meta(source)
        size = source_meta.shape[table_index.index(None)]
        symbol = ir.indirect_var(self.indirect_count)
        self.indirect_count += 1
        # Negative indices count from the end, as in torch.
        position = ir.op(
            "where",
            ir.op("lt", idx_value, ir.const(0, idx_value.dtype), dtype=torch.bool),
            ir.op("add", idx_value, count_value(size, idx_value.dtype), dtype=idx_value.dtype),
            idx_value,
            dtype=idx_value.dtype,
        )
        full_index = tuple(symbol if e is None else e for e in table_index)
        name = self.inputs.setdefault(source, f"in{len(self.inputs)}")
        self.indirect_reads.add(source)
        self.gather_nodes.setdefault(source, set()).add(node)
        return ir.load(
            name,
            offset(full_index, source_meta.stride),
            source_meta.dtype,
            indirect=((symbol, position),),
            mask=self.mask,
        )


def _nesting(
    inner: ReductionSignature, outer: ReductionSignature
) -> tuple[ReductionSignature, ReductionSignature] | None:
    """(inner, outer) when `outer` reduces the results of `inner` along other axes: it reads
    inner's kept dims (keepdim or not) as its shape; else None."""
    kept = tuple(s for d, s in enumerate(inner.shape) if d not in inner.axes)
    if outer.shape == kept:
        return inner, outer
    keepdim = tuple(1 if d in inner.axes else s for d, s in enumerate(inner.shape))
    if outer.shape == keepdim and not set(outer.axes) & set(inner.axes):
        return inner, outer
    return None


def _nesting_error(kernel: Kernel) -> str | None:
    """Why the backends cannot run a nested kernel (None if they can): the outer level is
    one pass (no reduction reads an outer reduction's result); the inner level may take
    several (a logsumexp, a variance per outer element), as a row does."""
    for value in kernel.values:
        if value.op in ("reduce", ir.INNER_REDUCE):
            if any(v.op == "reduce" for v in _reductions_below(value.args[0])):
                level = "an outer" if value.op == "reduce" else "an inner"
                return (
                    f"{level} reduction reads an outer reduction's result (two passes over "
                    "the outer reduction)"
                )
    if any(v.op == "load" and v.arg.indirect for v in kernel.values):
        return "a gather in a kernel with nested reductions"
    if any(v.op == ir.INNER_REDUCE and v.is_row for v in kernel.values):
        # The C++ skeleton computes inner results per outer element, inside the outer loop.
        return "an inner reduction that does not vary along the outer reduction"
    return None


def _reductions_below(value: Value) -> list[Value]:
    found, stack, seen = [], [value], set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v.op in ("reduce", ir.INNER_REDUCE):
            found.append(v)
        stack.extend(v.args)
    return found


def _same_numel(a: Sequence[sympy.Expr], b: Sequence[sympy.Expr]) -> bool:
    return sympy.simplify(sympy.Mul(*a) - sympy.Mul(*b)) == 0


def _reshaped(index: Index, shape: Sequence[sympy.Expr], target: Sequence[sympy.Expr]) -> Index:
    """The index in `target` of the element at `index` of `shape` (row-major order)."""
    if tuple(shape) == tuple(target):
        return tuple(index)
    return reshape_index(index, shape, target)


def _count_flops(kernel: Kernel) -> sympy.Expr:
    rows = sympy.Mul(*kernel.ranges)
    full = rows * sympy.Mul(*kernel.reduction_ranges)
    if kernel.inner_ranges:
        # One per point of each value's level: inner (rows x r x q), outer (rows x r), row.
        inner = full * sympy.Mul(*kernel.inner_ranges)
        total = sympy.Integer(0)
        for value in kernel.values:
            if value.op in ("load", "const", "index", "cast"):
                continue
            level = value.args[0].symbols if value.op in ("reduce", ir.INNER_REDUCE) else None
            symbols = value.symbols if level is None else level
            if any(map(ir.is_inner_var, symbols)):
                total += inner
            elif any(map(ir.is_reduction_var, symbols)):
                total += full
            else:
                total += rows
        return total
    total = sympy.Integer(0)
    extents = {ir.index_var(k): r for k, r in enumerate(kernel.ranges)}
    extents |= {ir.reduction_var(k): r for k, r in enumerate(kernel.reduction_ranges)}
    for value in kernel.values:
        if value.op in ("load", "const", "index", "cast"):
            continue
        if value.op == ir.DOT:
            total += 2 * full  # a multiply and an add per (row, reduced element)
            continue
        if kernel.kind == "matmul":
            # A prologue value varies along (m, k) or (k, n), not over the whole domain.
            total += sympy.Mul(*(extents[s] for s in value.symbols if s in extents))
            continue
        total += rows if value.is_row and value.op != "reduce" else full
    return total


def lower_group(members: Sequence[torch.fx.Node], name: str) -> Lowered:
    """Lower fx nodes (in graph order) to one kernel; NotLowerable says why it cannot be."""
    lowering = Lowering(members, name)
    for node in members:
        if not (can_lower(node) or can_lower_matmul(node)):
            raise NotLowerable(f"%{node.name} ({node.target}) has no lowering")
    outputs = lowering.outputs()
    if not outputs:
        raise NotLowerable("the group has no outputs")
    ranges, reduced = lowering.domain(outputs)
    inner = lowering.inner_ranges()
    lowering.row_vars = tuple(ir.index_var(k) for k in range(len(ranges)))
    lowering.ranges = {ir.index_var(k): s for k, s in enumerate(ranges)}
    lowering.ranges |= {ir.reduction_var(k): s for k, s in enumerate(reduced)}
    lowering.ranges |= {ir.inner_var(k): s for k, s in enumerate(inner)}
    if lowering.inner_signature is not None:
        full = lowering.full_index()
        if len(full) == len(lowering.inner_signature.shape):  # the inner reduction keeps dims
            full = tuple(e for d, e in enumerate(full) if d not in lowering.inner_signature.axes)
        lowering.inner_rows = full
    stores, output_buffers = [], []
    for k, node in enumerate(outputs):
        meta = tensor_meta(node)
        index = lowering.store_index(node)
        value = ir.cast(lowering.value_at(node, index), meta.dtype)
        buffer = f"out{k}"
        output_buffers.append(Buffer(buffer, meta.dtype, meta.shape, meta.stride))
        stores.append(Store(buffer, simplify(offset(index, meta.stride), lowering.ranges), value))
    input_nodes = list(lowering.inputs)
    input_buffers = tuple(
        Buffer(
            lowering.inputs[n], tensor_meta(n).dtype, tensor_meta(n).shape, tensor_meta(n).stride
        )
        for n in input_nodes
    )
    kernel = Kernel(
        name,
        input_buffers,
        tuple(output_buffers),
        tuple(ranges),
        tuple(reduced),
        tuple(stores),
        inner,
    )
    if inner:
        error = _nesting_error(kernel)
        if error is not None:
            raise NotLowerable(error)
    bindable = set()
    for buffer in (*input_buffers,):
        for expr in (*buffer.shape, *buffer.stride):
            if isinstance(expr, sympy.Symbol):
                bindable.add(expr)
    missing = set(kernel.size_symbols) - bindable
    if missing:
        raise NotLowerable(
            f"size symbol(s) {', '.join(sorted(map(str, missing)))} cannot be read off the inputs"
        )
    return Lowered(
        kernel=kernel,
        input_nodes=input_nodes,
        output_nodes=outputs,
        gather_sources=frozenset(lowering.indirect_reads - lowering.direct_reads),
        gathers_per_source={k: len(v) for k, v in lowering.gather_nodes.items()},
        flops=_count_flops(kernel),
    )


__all__ = ["Lowered", "NotLowerable", "can_lower", "can_lower_matmul", "lower_group"]
