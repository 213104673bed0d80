"""The lowering's rules: which ATen ops join generated kernels, and what each computes.

- Op tables: ATen/prims op -> Kernel IR op (pointwise, reductions), and the classes the
  lowering treats alike (views, copies, casts, fills, the remaining ops).
- View rules: for a view, the index in its source of the element at an index of the view
  (permute, transpose, expand, reshape, slice, select, squeeze, unsqueeze).
- Op rules: the Value of the remaining ops at an index (where, clamp, rounding division,
  arange, cat, slice_scatter, select_scatter, ...), built through the lowering
  (`Lowering.value_at`, `Lowering.operand`, `Lowering.masked`).
- Reduction signatures: the domain a reduction defines.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sympy
import torch
import torch.fx
from torch.utils._sympy.functions import FloorDiv, ToFloat

from memopt.compiler import kernel_ir as ir
from memopt.compiler.graph import TensorMeta, tensor_meta
from memopt.compiler.indexing import reshape_index
from memopt.compiler.kernel_ir import Value

if TYPE_CHECKING:
    from memopt.compiler.lower import Lowering

aten = torch.ops.aten
prims = torch.ops.prims

Index = tuple[sympy.Expr, ...]
ZERO = sympy.Integer(0)


class NotLowerable(Exception):
    """The group cannot be one kernel; the message says why (recorded as a refusal)."""


# -- op tables ---------------------------------------------------------------------------


def _overloads(namespace: object, names: str, overloads: str = "default") -> dict[object, str]:
    """{op.overload: name} for every name and overload (that exists), e.g. aten.eq.Tensor."""
    table = {}
    for name in names.split():
        packet = getattr(namespace, name)
        for overload in overloads.split():
            if overload in packet.overloads():
                table[getattr(packet, overload)] = name
    return table


# aten/prims op -> Kernel IR op, for ops whose tensor/scalar operands are args[0..n).
UNARY = {
    **_overloads(
        aten,
        "neg abs exp exp2 expm1 log log2 log1p sqrt rsqrt sin cos tan tanh sigmoid erf relu "
        "reciprocal sign floor ceil trunc round logical_not bitwise_not isnan isinf",
    ),
    **_overloads(prims, "exp log sqrt rsqrt neg abs tanh sin cos"),
}
BINARY = {
    **_overloads(
        aten,
        "add sub mul eq ne lt le gt ge remainder fmod bitwise_and bitwise_or bitwise_xor",
        "Tensor Scalar",
    ),
    **_overloads(aten, "maximum minimum atan2 logical_and logical_or logical_xor"),
    **dict.fromkeys([aten.div.Tensor, aten.div.Scalar], "truediv"),
    **_overloads(aten, "pow", "Tensor_Tensor Tensor_Scalar Scalar"),
    **_overloads(prims, "add sub mul maximum minimum pow"),
    prims.div.default: "truediv",
}

# reduction op -> Kernel IR reduction (mean and var lower to sums)
REDUCTIONS = {
    **_overloads(aten, "sum", "dim_IntList default"),
    **_overloads(aten, "prod", "dim_int default"),
    **_overloads(aten, "argmax argmin"),
    **_overloads(aten, "any all", "dim dims default"),
    **_overloads(aten, "mean", "dim default"),
    **_overloads(aten, "var", "correction dim"),
    **_overloads(prims, "sum prod var"),
    # x.max() and x.min() (no dim): over every axis, as amax/amin with no dims.
    **dict.fromkeys([aten.amax.default, prims.amax.default, aten.max.default], "max"),
    **dict.fromkeys([aten.amin.default, prims.amin.default, aten.min.default], "min"),
}
VIEWS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.permute.default,
    aten.expand.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.unsqueeze.default,
    aten.t.default,
    aten.transpose.int,
    aten.alias.default,
    prims.broadcast_in_dim.default,
}
IDENTITY = {aten.clone.default, aten.lift_fresh_copy.default, aten.alias.default}
CASTS = {aten._to_copy.default, prims.convert_element_type.default}
FILLS = {
    aten.full.default,
    aten.full_like.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.scalar_tensor.default,
    aten.zeros.default,
    aten.ones.default,
}
OTHER = {
    aten.where.self,
    aten.clamp.default,
    aten.clamp_min.default,
    aten.clamp_max.default,
    aten.div.Tensor_mode,
    aten.arange.start_step,
    aten.arange.default,
    aten.arange.start,
    aten.cat.default,
    prims.iota.default,
    prims.where.default,
    aten.square.default,
    aten.slice_scatter.default,
    aten.select_scatter.default,
}
# Matmuls a template kernel computes (with the pointwise ops around them), when the fusion
# pass puts one in a group; alone they stay library calls.
TEMPLATE_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
SUPPORTED_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64}
SUPPORTED_DTYPES |= {torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool}


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


def operand_dtype(arg: object) -> torch.dtype:
    meta = tensor_meta(arg) if isinstance(arg, torch.fx.Node) else None
    return meta.dtype if meta is not None else scalar_dtype(arg)


def index_dtype(expr: sympy.Expr) -> torch.dtype:
    return torch.int64 if expr.is_integer is not False else torch.float32


def scalar_dtype(value: object) -> torch.dtype:
    if isinstance(value, bool):
        return torch.bool
    if isinstance(value, int):
        return torch.int64
    return torch.float32


def promote(operands: Sequence[object]) -> torch.dtype:
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
    if target in (
        aten.sum.default,
        aten.prod.default,
        aten.any.default,
        aten.all.default,
        aten.mean.default,
    ):
        return ReductionSignature(source.shape, tuple(range(ndim)))
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return ReductionSignature(source.shape, _dims(dims, ndim))


def keeps_dims(node: torch.fx.Node) -> bool:
    target = node.target
    if target.namespace == "prims":
        return False  # prims reductions drop the reduced dims
    if target is aten.var.correction:
        return bool(node.kwargs.get("keepdim", False))
    return bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))


def var_correction(node: torch.fx.Node) -> float:
    if node.target is prims.var.default:
        return node.args[2]
    if node.target is aten.var.dim:
        unbiased = node.args[2] if len(node.args) > 2 else node.kwargs.get("unbiased", True)
        return 1 if unbiased else 0
    correction = node.kwargs.get("correction")
    return 1 if correction is None else correction


def _number(expr: object) -> object:
    value = sympy.sympify(expr)
    return int(value) if value.is_integer else float(value)


def count_value(expr: object, dtype: torch.dtype) -> Value:
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


VIEW_RULES: Mapping[object, Callable[[torch.fx.Node, Index], Index]] = {
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


def _where(self: Lowering, node: torch.fx.Node, index: Index) -> Value:
    dtype = tensor_meta(node).dtype
    cond = self.operand(node, node.args[0], index, torch.bool)
    return ir.op(
        "where",
        cond,
        self.operand(node, node.args[1], index, dtype),
        self.operand(node, node.args[2], index, dtype),
        dtype=dtype,
    )


def _clamp(self: Lowering, node: torch.fx.Node, index: Index) -> Value:
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


def _div_mode(self: Lowering, node: torch.fx.Node, index: Index) -> Value:
    mode = node.kwargs.get("rounding_mode")
    result = tensor_meta(node).dtype
    dtype = ir.compute_dtype(result)
    name = {"floor": "floordiv", "trunc": "truncdiv", None: "truediv"}[mode]
    a = self.operand(node, node.args[0], index, dtype)
    b = self.operand(node, node.args[1], index, dtype)
    return ir.cast(ir.op(name, a, b, dtype=dtype), result)


def _arange(self: Lowering, node: torch.fx.Node, index: Index) -> Value:
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


def _iota(self: Lowering, node: torch.fx.Node, index: Index) -> Value:
    dtype = tensor_meta(node).dtype
    start, step = node.kwargs.get("start", 0), node.kwargs.get("step", 1)
    return ir.cast(ir.index_value(start + index[0] * step), dtype)


def _square(self: Lowering, node: torch.fx.Node, index: Index) -> Value:
    result = tensor_meta(node).dtype
    dtype = ir.compute_dtype(result)
    value = self.operand(node, node.args[0], index, dtype)
    return ir.cast(ir.op("mul", value, value, dtype=dtype), result)


def both(a: Value, b: Value) -> Value:
    return ir.op("logical_and", a, b, dtype=torch.bool)


def _in_range(position: Value, start: sympy.Expr, end: sympy.Expr) -> Value:
    """start <= position < end, as a bool Value."""
    return both(
        ir.op("ge", position, ir.index_value(start), dtype=torch.bool),
        ir.op("lt", position, ir.index_value(end), dtype=torch.bool),
    )


def _static_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise NotLowerable(f"{what} {value!r} is not a constant integer")
    return value


def _cat(self: Lowering, node: torch.fx.Node, index: Index) -> Value:
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


def _slice_scatter(self: Lowering, node: torch.fx.Node, index: Index) -> Value:
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
            ir.op(
                "remainder",
                offset_value,
                ir.const(step, offset_value.dtype),
                dtype=offset_value.dtype,
            ),
            ir.const(0, offset_value.dtype),
            dtype=torch.bool,
        )
        inside = both(inside, on_step)
    along = position - start if step == 1 else FloorDiv(position - start, step)
    source_index = tuple(along if d == dim else e for d, e in enumerate(index))
    with self.masked(inside):
        piece = ir.cast(self.value_at(src, source_index), dtype)
    return ir.op("where", inside, piece, ir.cast(self.value_at(base, index), dtype), dtype=dtype)


def _select_scatter(self: Lowering, node: torch.fx.Node, index: Index) -> Value:
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


OP_RULES: Mapping[object, Callable[[Lowering, torch.fx.Node, Index], Value]] = {
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
