"""Lowering: a group of ATen fx nodes -> one Kernel IR kernel.

Each node is a function from an index (a tuple of sympy expressions, one per dimension of
its result) to a Value: `value_at(node, index)`. Pointwise ops apply their op to their
operands' values at the broadcast index; views (permute, expand, reshape, slice, ...)
transform the index and ask their source; reductions ask their source at the row's index
extended with the reduction variables; nodes outside the group are loads from their
tensor, through its own strides (so a view of an input is read in place, with no copy).

A group lowers to a kernel whose domain is its reduction's (rows x reduced elements) or, for
a pointwise group, its outputs' shape. What does not fit raises NotLowerable with the
reason, which the fusion pass records.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import sympy
import torch
import torch.fx
from torch.utils._sympy.functions import FloorDiv, ToFloat

from memopt.compiler import kernel_ir as ir
from memopt.compiler.aten_ops import GATHERS, TEMPLATE_MATMULS
from memopt.compiler.cost import buffer_users, is_view
from memopt.compiler.graph import TensorMeta, tensor_meta
from memopt.compiler.indexing import offset, recombine, reshape_index, simplify
from memopt.compiler.kernel_ir import Buffer, Kernel, Store, Value

aten = torch.ops.aten
prims = torch.ops.prims

Index = tuple[sympy.Expr, ...]
ZERO = sympy.Integer(0)


class NotLowerable(Exception):
    """The group cannot be one kernel; the message says why (recorded as a refusal)."""


# -- op tables ---------------------------------------------------------------------------

# aten/prims op -> Kernel IR op, for ops whose tensor/scalar operands are args[0..n).
UNARY = {
    aten.neg.default: "neg", aten.abs.default: "abs", aten.exp.default: "exp",
    aten.exp2.default: "exp2", aten.expm1.default: "expm1", aten.log.default: "log",
    aten.log2.default: "log2", aten.log1p.default: "log1p", aten.sqrt.default: "sqrt",
    aten.rsqrt.default: "rsqrt", aten.sin.default: "sin", aten.cos.default: "cos",
    aten.tan.default: "tan", aten.tanh.default: "tanh", aten.sigmoid.default: "sigmoid",
    aten.erf.default: "erf", aten.relu.default: "relu", aten.reciprocal.default: "reciprocal",
    aten.sign.default: "sign", aten.floor.default: "floor", aten.ceil.default: "ceil",
    aten.trunc.default: "trunc", aten.round.default: "round",
    aten.logical_not.default: "logical_not", aten.bitwise_not.default: "bitwise_not",
    aten.isnan.default: "isnan", aten.isinf.default: "isinf",
    prims.exp.default: "exp", prims.log.default: "log", prims.sqrt.default: "sqrt",
    prims.rsqrt.default: "rsqrt", prims.neg.default: "neg", prims.abs.default: "abs",
    prims.tanh.default: "tanh", prims.sin.default: "sin", prims.cos.default: "cos",
}  # fmt: skip
BINARY = {
    aten.add.Tensor: "add", aten.sub.Tensor: "sub", aten.mul.Tensor: "mul",
    aten.div.Tensor: "truediv", aten.pow.Tensor_Tensor: "pow", aten.pow.Tensor_Scalar: "pow",
    aten.pow.Scalar: "pow", aten.maximum.default: "maximum", aten.minimum.default: "minimum",
    aten.remainder.Tensor: "remainder", aten.remainder.Scalar: "remainder",
    aten.fmod.Tensor: "fmod", aten.fmod.Scalar: "fmod", aten.atan2.default: "atan2",
    aten.eq.Tensor: "eq", aten.eq.Scalar: "eq", aten.ne.Tensor: "ne", aten.ne.Scalar: "ne",
    aten.lt.Tensor: "lt", aten.lt.Scalar: "lt", aten.le.Tensor: "le", aten.le.Scalar: "le",
    aten.gt.Tensor: "gt", aten.gt.Scalar: "gt", aten.ge.Tensor: "ge", aten.ge.Scalar: "ge",
    aten.logical_and.default: "logical_and", aten.logical_or.default: "logical_or",
    aten.logical_xor.default: "logical_xor", aten.bitwise_and.Tensor: "bitwise_and",
    aten.bitwise_or.Tensor: "bitwise_or", aten.bitwise_xor.Tensor: "bitwise_xor",
    aten.bitwise_and.Scalar: "bitwise_and", aten.bitwise_or.Scalar: "bitwise_or",
    aten.bitwise_xor.Scalar: "bitwise_xor", aten.add.Scalar: "add", aten.sub.Scalar: "sub",
    aten.mul.Scalar: "mul", aten.div.Scalar: "truediv",
    prims.add.default: "add", prims.sub.default: "sub", prims.mul.default: "mul",
    prims.div.default: "truediv", prims.maximum.default: "maximum",
    prims.minimum.default: "minimum", prims.pow.default: "pow",
}  # fmt: skip
# reduction op -> (Kernel IR reduction, argument layout)
REDUCTIONS = {
    aten.sum.dim_IntList: "sum", aten.sum.default: "sum", prims.sum.default: "sum",
    aten.amax.default: "max", aten.amin.default: "min", aten.prod.dim_int: "prod",
    aten.prod.default: "prod", aten.argmax.default: "argmax", aten.argmin.default: "argmin",
    aten.any.dim: "any", aten.any.dims: "any", aten.any.default: "any",
    aten.all.dim: "all", aten.all.dims: "all", aten.all.default: "all",
    prims.amax.default: "max", prims.amin.default: "min", prims.prod.default: "prod",
    aten.mean.dim: "mean", aten.mean.default: "mean",
    prims.var.default: "var", aten.var.correction: "var", aten.var.dim: "var",
}  # fmt: skip
VIEWS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
    aten.expand.default, aten.slice.Tensor, aten.select.int, aten.squeeze.dim,
    aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default, aten.t.default,
    aten.transpose.int, aten.alias.default, prims.broadcast_in_dim.default,
}  # fmt: skip
IDENTITY = {aten.clone.default, aten.lift_fresh_copy.default, aten.alias.default}
CASTS = {aten._to_copy.default, prims.convert_element_type.default}
FILLS = {aten.full.default, aten.full_like.default, aten.zeros_like.default,
         aten.ones_like.default, aten.scalar_tensor.default, aten.zeros.default,
         aten.ones.default}  # fmt: skip
OTHER = {aten.where.self, aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default,
         aten.div.Tensor_mode, aten.arange.start_step, aten.arange.default,
         aten.arange.start, aten.cat.default, prims.iota.default, prims.where.default, aten.square.default,
         aten.slice_scatter.default, aten.select_scatter.default}  # fmt: skip
# Matmuls a template kernel computes (with the pointwise ops around them), when the fusion
# pass puts one in a group; alone they stay library calls.
TEMPLATE_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
SUPPORTED_DTYPES = {
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool,
}  # fmt: skip


def can_lower(node: torch.fx.Node) -> bool:
    """Whether a node may join a generated kernel (views are folded, not members)."""
    if node.op != "call_function" or is_view(node):
        return False
    target = node.target
    known = (
        target in UNARY or target in BINARY or target in REDUCTIONS or target in IDENTITY
        or target in CASTS or target in FILLS or target in GATHERS or target in OTHER
    )  # fmt: skip
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


def symbolic_scalar(node: object) -> sympy.Expr | None:
    """The sympy expression of an fx node that computes a size (a SymInt/SymFloat), or None."""
    if not isinstance(node, torch.fx.Node):
        return None
    value = node.meta.get("val")
    if not isinstance(value, (torch.SymInt, torch.SymFloat)):
        return None
    expr = sympy.sympify(value.node.expr)
    if isinstance(expr, ToFloat):
        expr = expr.args[0]  # the operand's cast makes it a float
    # Only integer arithmetic of sizes is an index expression every backend evaluates.
    if any(
        not isinstance(a, (sympy.Symbol, sympy.Number, sympy.Add, sympy.Mul))
        for a in sympy.preorder_traversal(expr)
    ):
        return None
    return expr


def _operand_dtype(arg: object) -> torch.dtype:
    meta = tensor_meta(arg) if isinstance(arg, torch.fx.Node) else None
    return meta.dtype if meta is not None else _scalar_dtype(arg)


def _index_dtype(expr: sympy.Expr) -> torch.dtype:
    return torch.int64 if expr.is_integer is not False else torch.float32


def _scalar_dtype(value: object) -> torch.dtype:
    if isinstance(value, bool):
        return torch.bool
    if isinstance(value, int):
        return torch.int64
    return torch.float32


def _promote(operands: Sequence[object]) -> torch.dtype:
    """torch's type promotion over tensor metas and Python scalars."""
    probes: list[object] = []
    for operand in operands:
        if isinstance(operand, TensorMeta):
            probes.append(torch.empty((1,) if operand.shape else (), dtype=operand.dtype))
        else:
            probes.append(operand)
    result = probes[0] if isinstance(probes[0], torch.Tensor) else torch.tensor(probes[0])
    dtype = result.dtype
    for other in probes[1:]:
        dtype = torch.result_type(result, other)
        result = torch.empty(result.shape, dtype=dtype)
    return dtype


def _dims(dims: object, ndim: int) -> tuple[int, ...]:
    if dims is None:
        return tuple(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    if ndim == 0:  # dim 0 or -1 of a 0-dim tensor: it has no axis to index
        raise NotLowerable("reduces a 0-dim tensor along a dim")
    return tuple(sorted(d % ndim for d in dims))


@dataclass(frozen=True)
class ReductionSignature:
    """The domain a reduction defines: the shape it reads and the axes it reduces."""

    shape: tuple[sympy.Expr, ...]
    axes: tuple[int, ...]


def reduction_signature(node: torch.fx.Node) -> ReductionSignature:
    source = tensor_meta(node.args[0])
    if source is None:
        raise NotLowerable(f"%{node.name} reduces a non-tensor")
    ndim = len(source.shape)
    target = node.target
    if target in (aten.argmax.default, aten.argmin.default):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dim is None:
            return ReductionSignature(source.shape, tuple(range(ndim)))
        return ReductionSignature(source.shape, _dims(dim, ndim))
    if target in (aten.sum.default, aten.prod.default, aten.any.default, aten.all.default,
                  aten.mean.default):  # fmt: skip
        return ReductionSignature(source.shape, tuple(range(ndim)))
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return ReductionSignature(source.shape, _dims(dims, ndim))


def _keepdim(node: torch.fx.Node) -> bool:
    target = node.target
    if target.namespace == "prims":
        return False  # prims reductions drop the reduced dims
    if target is aten.var.correction:
        return bool(node.kwargs.get("keepdim", False))
    return bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))


def _correction(node: torch.fx.Node) -> float:
    if node.target is prims.var.default:
        return node.args[2]
    if node.target is aten.var.dim:
        unbiased = node.args[2] if len(node.args) > 2 else node.kwargs.get("unbiased", True)
        return 1 if unbiased else 0
    correction = node.kwargs.get("correction")
    return 1 if correction is None else correction


@dataclass
class Lowered:
    """A lowered group: the kernel, and which fx nodes its buffers are."""

    kernel: Kernel
    input_nodes: list[torch.fx.Node]
    output_nodes: list[torch.fx.Node]
    gather_sources: frozenset[torch.fx.Node]  # inputs read only through indirect loads
    flops: sympy.Expr


class _Lowering:
    def __init__(self, members: Sequence[torch.fx.Node], name: str) -> None:
        self.members = list(members)
        self.member_set = set(members)
        self.name = name
        self.inputs: dict[torch.fx.Node, str] = {}
        self.direct_reads: set[torch.fx.Node] = set()
        self.indirect_reads: set[torch.fx.Node] = set()
        self.memo: dict[tuple[torch.fx.Node, Index, Value | None], Value] = {}
        # Where the value being built is used: loads outside it read nothing (see `masked`).
        self.mask: Value | None = None
        self.indirect_count = 0
        self.signature: ReductionSignature | None = None
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

    def store_index(self, node: torch.fx.Node) -> Index:
        """The index at which an output node's elements are computed, in domain variables."""
        shape = tensor_meta(node).shape
        rows = tuple(ir.index_var(k) for k in range(len(self.row_vars)))
        if self.signature is None:
            domain_shape = tuple(self.ranges[v] for v in rows)
            return _reshaped(rows, domain_shape, shape)
        full_shape, axes = self.signature.shape, self.signature.axes
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
            return ir.const(node, dtype_hint or _scalar_dtype(node))
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
        self.mask = inside if outer is None else _and(outer, inside)
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
        return ir.load(name, offset(index, meta.stride), meta.dtype, mask=self.mask)

    def operand(self, node: torch.fx.Node, arg: object, index: Index, dtype: torch.dtype) -> Value:
        """An operand of a pointwise node at the node's index, broadcast and cast to dtype."""
        size = symbolic_scalar(arg)
        if size is not None:
            # A size computed on the host (sym_size, arithmetic on it): an index expression
            # of the size symbols, which the kernel reads off its inputs' shapes.
            return ir.cast(ir.index_value(size, _index_dtype(size)), dtype)
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
                dtype if dtype != torch.bool else _operand_dtype(node.args[0])
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
        rule = _OTHER_RULES.get(target)
        if rule is None:
            raise NotLowerable(f"no lowering for {target}")
        return rule(self, node, index)

    def binary(self, node: torch.fx.Node, name: str, index: Index) -> Value:
        a, b = node.args[0], node.args[1]
        dtype = tensor_meta(node).dtype
        compute = dtype
        if name in ir.PREDICATES:
            compute = _promote(
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
        assert signature == self.signature
        kind = REDUCTIONS[node.target]
        axes = signature.axes
        ndim = len(signature.shape)
        # With keepdim the reduced dims are still in the index (as 0); drop them.
        out_rows = (
            [e for d, e in enumerate(index) if d not in axes] if _keepdim(node) else list(index)
        )
        rows_here = tuple(simplify(v, self.ranges) for v in self.row_vars)
        if tuple(simplify(e, self.ranges) for e in out_rows) != rows_here:
            raise NotLowerable(
                f"%{node.name} is read at another row than the one the kernel computes"
            )
        rows = iter(out_rows)
        reduced = iter(ir.reduction_var(k) for k in range(len(axes)))
        source_index = tuple(next(reduced) if d in axes else next(rows) for d in range(ndim))
        dtype = tensor_meta(node).dtype
        count = sympy.Mul(*(signature.shape[d] for d in axes))
        if kind in ("argmax", "argmin", "any", "all"):
            source = self.value_at(node.args[0], source_index)
            return ir.reduce(kind, source, dtype)
        accumulate = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        source = ir.cast(self.value_at(node.args[0], source_index), accumulate)
        if kind == "mean":
            total = ir.reduce("sum", source, accumulate)
            return ir.cast(
                ir.op("truediv", total, _count(count, accumulate), dtype=accumulate),
                dtype,
            )
        if kind == "var":
            correction = _correction(node)
            n = _count(count, accumulate)
            mean = ir.op("truediv", ir.reduce("sum", source, accumulate), n, dtype=accumulate)
            centered = ir.op("sub", source, mean, dtype=accumulate)
            squares = ir.reduce(
                "sum", ir.op("mul", centered, centered, dtype=accumulate), accumulate
            )
            divisor_expr = sympy.sympify(count - correction)
            if divisor_expr.is_number and divisor_expr < 0:  # torch: max(0, N - correction)
                divisor_expr = sympy.Integer(0)
            divisor = _count(divisor_expr, accumulate)
            return ir.cast(ir.op("truediv", squares, divisor, dtype=accumulate), dtype)
        return ir.cast(ir.reduce(kind, source, accumulate), dtype)

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
        rule = _VIEW_RULES.get(node.target)
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
            ir.op("add", idx_value, _count(size, idx_value.dtype), dtype=idx_value.dtype),
            idx_value,
            dtype=idx_value.dtype,
        )
        full_index = tuple(symbol if e is None else e for e in table_index)
        name = self.inputs.setdefault(source, f"in{len(self.inputs)}")
        self.indirect_reads.add(source)
        return ir.load(
            name,
            offset(full_index, source_meta.stride),
            source_meta.dtype,
            indirect=((symbol, position),),
            mask=self.mask,
        )


def _same_numel(a: Sequence[sympy.Expr], b: Sequence[sympy.Expr]) -> bool:
    return sympy.simplify(sympy.Mul(*a) - sympy.Mul(*b)) == 0


def _reshaped(index: Index, shape: Sequence[sympy.Expr], target: Sequence[sympy.Expr]) -> Index:
    """The index in `target` of the element at `index` of `shape` (row-major order)."""
    if tuple(shape) == tuple(target):
        return tuple(index)
    return reshape_index(index, shape, target)


def _number(expr: object) -> object:
    value = sympy.sympify(expr)
    return int(value) if value.is_integer else float(value)


def _count(expr: object, dtype: torch.dtype) -> Value:
    """A number of elements as a value: a constant, or computed from sizes at run time."""
    value = sympy.sympify(expr)
    if value.is_number:
        return ir.const(_number(value), dtype)
    return ir.cast(ir.index_value(value), dtype)


# -- view rules: the source index of the element at `index` of the view -------------------


def _permute(node: torch.fx.Node, index: Index) -> Index:
    dims = [d % len(index) for d in node.args[1]]
    source = [ZERO] * len(index)
    for out_dim, src_dim in enumerate(dims):
        source[src_dim] = index[out_dim]
    return tuple(source)


def _transpose(node: torch.fx.Node, index: Index) -> Index:
    ndim = len(index)
    if node.target is aten.t.default:
        return tuple(reversed(index)) if ndim == 2 else index
    a, b = node.args[1] % ndim, node.args[2] % ndim
    source = list(index)
    source[a], source[b] = index[b], index[a]
    return tuple(source)


def _expand(node: torch.fx.Node, index: Index) -> Index:
    source_shape = tensor_meta(node.args[0]).shape
    shift = len(index) - len(source_shape)
    return tuple(ZERO if size == 1 else index[d + shift] for d, size in enumerate(source_shape))


def _broadcast_in_dim(node: torch.fx.Node, index: Index) -> Index:
    source_shape = tensor_meta(node.args[0]).shape
    dims = node.args[2]
    return tuple(ZERO if size == 1 else index[d] for size, d in zip(source_shape, dims))


def _reshape(node: torch.fx.Node, index: Index) -> Index:
    return reshape_index(index, tensor_meta(node).shape, tensor_meta(node.args[0]).shape)


def _slice(node: torch.fx.Node, index: Index) -> Index:
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(index)
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    step = node.args[4] if len(node.args) > 4 else 1
    start = _slice_start(start, tensor_meta(node.args[0]).shape[dim])
    source = list(index)
    source[dim] = start + index[dim] * step
    return tuple(source)


def _slice_start(start: object, size: object) -> object:
    """A slice's first element: negative counts from the end; clamped to [0, size]."""
    size = sympy.sympify(size)
    if isinstance(start, int) and start < 0:
        start = size + start
    if size.is_number:
        start = max(0, min(int(sympy.sympify(start)), int(size)))
    return start


def _select(node: torch.fx.Node, index: Index) -> Index:
    source_shape = tensor_meta(node.args[0]).shape
    dim = node.args[1] % len(source_shape)
    position = node.args[2]
    if isinstance(position, int) and position < 0:
        position = source_shape[dim] + position
    return tuple(index[:dim]) + (sympy.sympify(position),) + tuple(index[dim:])


def _squeeze(node: torch.fx.Node, index: Index) -> Index:
    source_shape = tensor_meta(node.args[0]).shape
    out_shape = tensor_meta(node).shape
    if len(out_shape) == len(source_shape):
        return index
    it = iter(index)
    # Squeezed dims are the size-1 dims of the source that are gone from the output.
    result, out_dim = [], 0
    for size in source_shape:
        if (
            out_dim < len(out_shape)
            and size == out_shape[out_dim]
            and (size != 1 or _kept(node, len(result), source_shape))
        ):
            result.append(next(it))
            out_dim += 1
        else:
            result.append(ZERO)
    return tuple(result)


def _kept(node: torch.fx.Node, dim: int, source_shape: Sequence[sympy.Expr]) -> bool:
    if node.target is aten.squeeze.default:
        return False
    dims = node.args[1] if len(node.args) > 1 else ()
    dims = [dims] if isinstance(dims, int) else list(dims)
    return dim not in [d % len(source_shape) for d in dims]


def _unsqueeze(node: torch.fx.Node, index: Index) -> Index:
    dim = node.args[1] % len(index)
    return tuple(index[:dim]) + tuple(index[dim + 1 :])


_VIEW_RULES: Mapping[object, Callable[[torch.fx.Node, Index], Index]] = {
    aten.permute.default: _permute,
    aten.t.default: _transpose,
    aten.transpose.int: _transpose,
    aten.expand.default: _expand,
    prims.broadcast_in_dim.default: _broadcast_in_dim,
    aten.view.default: _reshape,
    aten._unsafe_view.default: _reshape,
    aten.reshape.default: _reshape,
    aten.slice.Tensor: _slice,
    aten.select.int: _select,
    aten.squeeze.dim: _squeeze,
    aten.squeeze.dims: _squeeze,
    aten.squeeze.default: _squeeze,
    aten.unsqueeze.default: _unsqueeze,
    aten.alias.default: lambda node, index: index,
}


# -- rules for the remaining ops ---------------------------------------------------------


def _where(self: _Lowering, node: torch.fx.Node, index: Index) -> Value:
    dtype = tensor_meta(node).dtype
    cond = self.operand(node, node.args[0], index, torch.bool)
    return ir.op(
        "where",
        cond,
        self.operand(node, node.args[1], index, dtype),
        self.operand(node, node.args[2], index, dtype),
        dtype=dtype,
    )


def _clamp(self: _Lowering, node: torch.fx.Node, index: Index) -> Value:
    result = tensor_meta(node).dtype
    dtype = ir.compute_dtype(result)
    value = self.operand(node, node.args[0], index, dtype)
    if node.target is aten.clamp_min.default:
        low, high = node.args[1], None
    elif node.target is aten.clamp_max.default:
        low, high = None, node.args[1]
    else:
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
        high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    if low is not None:
        value = ir.op("maximum", value, self.operand(node, low, index, dtype), dtype=dtype)
    if high is not None:
        value = ir.op("minimum", value, self.operand(node, high, index, dtype), dtype=dtype)
    return ir.cast(value, result)


def _div_mode(self: _Lowering, node: torch.fx.Node, index: Index) -> Value:
    mode = node.kwargs.get("rounding_mode")
    result = tensor_meta(node).dtype
    dtype = ir.compute_dtype(result)
    name = {"floor": "floordiv", "trunc": "truncdiv", None: "truediv"}[mode]
    a = self.operand(node, node.args[0], index, dtype)
    b = self.operand(node, node.args[1], index, dtype)
    return ir.cast(ir.op(name, a, b, dtype=dtype), result)


def _arange(self: _Lowering, node: torch.fx.Node, index: Index) -> Value:
    dtype = tensor_meta(node).dtype
    args = list(node.args)
    if node.target is aten.arange.default:
        start, step = 0, 1
    else:
        start = args[0]
        step = args[2] if len(args) > 2 else node.kwargs.get("step", 1)
    if isinstance(start, float) or isinstance(step, float):
        base = ir.cast(ir.index_value(index[0]), dtype)
        scaled = ir.op("mul", base, ir.const(step, dtype), dtype=dtype)
        return ir.op("add", scaled, ir.const(start, dtype), dtype=dtype)
    return ir.cast(ir.index_value(start + index[0] * step), dtype)


def _iota(self: _Lowering, node: torch.fx.Node, index: Index) -> Value:
    dtype = tensor_meta(node).dtype
    start, step = node.kwargs.get("start", 0), node.kwargs.get("step", 1)
    return ir.cast(ir.index_value(start + index[0] * step), dtype)


def _square(self: _Lowering, node: torch.fx.Node, index: Index) -> Value:
    result = tensor_meta(node).dtype
    dtype = ir.compute_dtype(result)
    value = self.operand(node, node.args[0], index, dtype)
    return ir.cast(ir.op("mul", value, value, dtype=dtype), result)


def _and(a: Value, b: Value) -> Value:
    return ir.op("logical_and", a, b, dtype=torch.bool)


def _in_range(position: Value, start: sympy.Expr, end: sympy.Expr) -> Value:
    """start <= position < end, as a bool Value."""
    return _and(
        ir.op("ge", position, ir.index_value(start), dtype=torch.bool),
        ir.op("lt", position, ir.index_value(end), dtype=torch.bool),
    )


def _static_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise NotLowerable(f"{what} {value!r} is not a constant integer")
    return value


def _cat(self: _Lowering, node: torch.fx.Node, index: Index) -> Value:
    """Each input where the index falls in its range along dim, read there masked."""
    tensors = [t for t in node.args[0] if tensor_meta(t) is not None and tensor_meta(t).numel != 0]
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(index)
    dtype = tensor_meta(node).dtype
    start = sympy.Integer(0)
    pieces: list[tuple[Value, Value]] = []
    position = ir.index_value(index[dim])
    for tensor in tensors:
        size = tensor_meta(tensor).shape[dim]
        inside = _in_range(position, start, start + size)
        shifted = tuple(e - start if d == dim else e for d, e in enumerate(index))
        with self.masked(inside):
            pieces.append((inside, ir.cast(self.value_at(tensor, shifted), dtype)))
        start = start + size
    value = pieces[-1][1]
    for inside, piece in reversed(pieces[:-1]):
        value = ir.op("where", inside, piece, value, dtype=dtype)
    return value


def _slice_scatter(self: _Lowering, node: torch.fx.Node, index: Index) -> Value:
    """slice_scatter(base, src, dim, start, end, step): src where the index is in the
    slice (read there masked), base elsewhere."""
    base, src = node.args[0], node.args[1]
    args = list(node.args[2:]) + [None] * (4 - len(node.args[2:]))
    dim = node.kwargs.get("dim", args[0] if args[0] is not None else 0) % len(index)
    start = node.kwargs.get("start", args[1])
    step = _static_int(node.kwargs.get("step", args[3] if args[3] is not None else 1), "step")
    start = 0 if start is None else _static_int(start, "start")
    start = sympy.sympify(_slice_start(start, tensor_meta(node).shape[dim]))
    count = tensor_meta(src).shape[dim]  # the slice's length, whatever `end` was
    dtype = tensor_meta(node).dtype
    position = index[dim]
    inside = _in_range(ir.index_value(position), start, start + (count - 1) * step + 1)
    if step != 1:
        offset_value = ir.index_value(position - start)
        on_step = ir.op(
            "eq",
            ir.op("remainder", offset_value, ir.const(step, offset_value.dtype),
                  dtype=offset_value.dtype),
            ir.const(0, offset_value.dtype),
            dtype=torch.bool,
        )  # fmt: skip
        inside = _and(inside, on_step)
    along = position - start if step == 1 else FloorDiv(position - start, step)
    source_index = tuple(along if d == dim else e for d, e in enumerate(index))
    with self.masked(inside):
        piece = ir.cast(self.value_at(src, source_index), dtype)
    return ir.op("where", inside, piece, ir.cast(self.value_at(base, index), dtype), dtype=dtype)


def _select_scatter(self: _Lowering, node: torch.fx.Node, index: Index) -> Value:
    """select_scatter(base, src, dim, i): src where the index along dim is i, else base."""
    base, src, dim, chosen = node.args[:4]
    dim = dim % len(index)
    chosen = _static_int(chosen, "index")
    size = sympy.sympify(tensor_meta(node).shape[dim])
    if chosen < 0:
        chosen = size + chosen
    dtype = tensor_meta(node).dtype
    inside = ir.op(
        "eq", ir.index_value(index[dim]), ir.index_value(sympy.sympify(chosen)), dtype=torch.bool
    )
    source_index = tuple(e for d, e in enumerate(index) if d != dim)
    with self.masked(inside):
        piece = ir.cast(self.value_at(src, source_index), dtype)
    return ir.op("where", inside, piece, ir.cast(self.value_at(base, index), dtype), dtype=dtype)


_OTHER_RULES: Mapping[object, Callable[[_Lowering, torch.fx.Node, Index], Value]] = {
    aten.where.self: _where,
    prims.where.default: _where,
    aten.clamp.default: _clamp,
    aten.clamp_min.default: _clamp,
    aten.clamp_max.default: _clamp,
    aten.div.Tensor_mode: _div_mode,
    aten.arange.start_step: _arange,
    aten.arange.start: _arange,
    aten.arange.default: _arange,
    prims.iota.default: _iota,
    aten.square.default: _square,
    aten.cat.default: _cat,
    aten.slice_scatter.default: _slice_scatter,
    aten.select_scatter.default: _select_scatter,
}


def _count_flops(kernel: Kernel) -> sympy.Expr:
    rows = sympy.Mul(*kernel.ranges)
    full = rows * sympy.Mul(*kernel.reduction_ranges)
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
    lowering = _Lowering(members, name)
    for node in members:
        if not (can_lower(node) or can_lower_matmul(node)):
            raise NotLowerable(f"%{node.name} ({node.target}) has no lowering")
    outputs = lowering.outputs()
    if not outputs:
        raise NotLowerable("the group has no outputs")
    ranges, reduced = lowering.domain(outputs)
    lowering.row_vars = tuple(ir.index_var(k) for k in range(len(ranges)))
    lowering.ranges = {ir.index_var(k): s for k, s in enumerate(ranges)}
    lowering.ranges |= {ir.reduction_var(k): s for k, s in enumerate(reduced)}
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
        name, input_buffers, tuple(output_buffers), tuple(ranges), tuple(reduced), tuple(stores)
    )
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
        flops=_count_flops(kernel),
    )


__all__ = ["Lowered", "NotLowerable", "can_lower", "can_lower_matmul", "lower_group"]
