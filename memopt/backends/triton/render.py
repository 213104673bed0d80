"""Kernel IR -> Triton source.

One walk over the kernel's values emits one line per value (`tmp<k> = ...`), from a table of
op templates; the loop skeleton decides where each line goes:

- pointwise kernels: one flat block of XBLOCK domain points per program;
- reduction kernels: XBLOCK rows per program. *Persistent* when the reduced extent fits one
  block (RBLOCK >= rnumel): every value is computed once, reductions are `tl.sum(..., 1)`.
  *Looped* otherwise: one loop over the reduced extent per level of dependent reductions
  (layer_norm's variance needs the mean first), accumulating in [XBLOCK, RBLOCK] registers,
  then a last loop for the stores of full (per-element) values.

Every value is computed in fp32 when its dtype is a 16-bit float: loads upcast, casts to a
16-bit type round and come back to fp32, stores cast to the buffer's dtype. (Triton's CPU
interpreter gets bf16 arithmetic wrong, and a GPU kernel should compute this way anyway.)
Functions Triton's interpreter lacks (tanh, pow, log1p, ...) are written with builtins, so
one source runs on a GPU and in the interpreter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import sympy
import torch
from torch.utils._sympy.functions import FloorDiv, ModularIndexing

from memopt.compiler.kernel_ir import Kernel, Value, index_var, is_reduction_var, reduction_var

# Largest reduced extent computed in one block (persistent reduction).
PERSISTENT_MAX = 4096
# Block of the reduced extent per loop iteration (looped reduction).
LOOP_RBLOCK = 1024

_TL_DTYPES = {
    torch.float32: "tl.float32",
    torch.float64: "tl.float64",
    torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16",
    torch.int64: "tl.int64",
    torch.int32: "tl.int32",
    torch.int16: "tl.int16",
    torch.int8: "tl.int8",
    torch.uint8: "tl.uint8",
    torch.bool: "tl.int1",
}
_HALF = (torch.float16, torch.bfloat16)


def tl_dtype(dtype: torch.dtype) -> str:
    return _TL_DTYPES[dtype]


def held_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a value is computed in: 16-bit floats are held in fp32."""
    return torch.float32 if dtype in _HALF else dtype


class Unsupported(Exception):
    """An op this backend cannot render; the runtime falls back to the reference backend."""


# -- op templates: {a}, {b}, {c} are operand names; fp and int variants where they differ --

_FLOAT_UNARY = {
    "neg": "-{a}",
    "abs": "tl.abs({a})",
    "exp": "tl.exp({a})",
    "exp2": "tl.exp2({a})",
    "expm1": "(tl.exp({a}) - 1.0)",
    "log": "tl.log({a})",
    "log2": "tl.log2({a})",
    "log1p": "tl.log(1.0 + {a})",
    "sqrt": "tl.sqrt({a})",
    "rsqrt": "tl.rsqrt({a})",
    "sin": "tl.sin({a})",
    "cos": "tl.cos({a})",
    "tan": "(tl.sin({a}) / tl.cos({a}))",
    "tanh": "(2.0 * tl.sigmoid(2.0 * {a}) - 1.0)",
    "sigmoid": "tl.sigmoid({a})",
    "erf": "tl.erf({a})",
    "relu": "tl.where({a} < 0, 0.0, {a})",
    "reciprocal": "(1.0 / {a})",
    "sign": "tl.where({a} > 0, 1.0, tl.where({a} < 0, -1.0, {a} * 0.0))",
    "floor": "tl.floor({a})",
    "ceil": "tl.ceil({a})",
    "trunc": "tl.where({a} < 0, tl.ceil({a}), tl.floor({a}))",
    "round": "_round_half_even({a})",
    "square": "({a} * {a})",
    "isnan": "({a} != {a})",
    "isinf": "(tl.abs({a}) == float('inf'))",
    "logical_not": "({a} == 0)",
}
_INT_UNARY = {
    "neg": "-{a}",
    "abs": "tl.where({a} < 0, -{a}, {a})",
    "relu": "tl.where({a} < 0, 0, {a})",
    "sign": "tl.where({a} > 0, 1, tl.where({a} < 0, -1, 0))",
    "square": "({a} * {a})",
    "logical_not": "({a} == 0)",
    "bitwise_not": "(~{a})",
    "floor": "{a}",
    "ceil": "{a}",
    "trunc": "{a}",
    "round": "{a}",
    "isnan": "({a} != {a})",
    "isinf": "({a} != {a})",
}
_BOOL_UNARY = {"logical_not": "({a} == 0)", "bitwise_not": "({a} == 0)"}
_COMMON_BINARY = {
    "add": "({a} + {b})",
    "sub": "({a} - {b})",
    "mul": "({a} * {b})",
    "eq": "({a} == {b})",
    "ne": "({a} != {b})",
    "lt": "({a} < {b})",
    "le": "({a} <= {b})",
    "gt": "({a} > {b})",
    "ge": "({a} >= {b})",
    "logical_and": "(({a} != 0) & ({b} != 0))",
    "logical_or": "(({a} != 0) | ({b} != 0))",
    "logical_xor": "(({a} != 0) ^ ({b} != 0))",
    "bitwise_and": "({a} & {b})",
    "bitwise_or": "({a} | {b})",
    "bitwise_xor": "({a} ^ {b})",
}
_FLOAT_BINARY = {
    "truediv": "({a} / {b})",
    "floordiv": "tl.floor({a} / {b})",
    "truncdiv": "_trunc({a} / {b})",
    "remainder": "({a} - {b} * tl.floor({a} / {b}))",
    "fmod": "({a} - {b} * _trunc({a} / {b}))",
    "pow": "_pow({a}, {b})",
    # torch.maximum/minimum propagate nan
    "maximum": "tl.where({a} != {a}, {a}, tl.where({b} != {b}, {b}, tl.maximum({a}, {b})))",
    "minimum": "tl.where({a} != {a}, {a}, tl.where({b} != {b}, {b}, tl.minimum({a}, {b})))",
}
_INT_BINARY = {
    "truediv": "({a}.to(tl.float32) / {b}.to(tl.float32))",
    "floordiv": "_floordiv_int({a}, {b})",
    "truncdiv": "({a} // {b})",
    "remainder": "_remainder_int({a}, {b})",
    "fmod": "({a} % {b})",
    "pow": "_pow_int({a}, {b})",
    "maximum": "tl.maximum({a}, {b})",
    "minimum": "tl.minimum({a}, {b})",
}

HELPERS = """
@triton.jit
def _trunc(x):
    return tl.where(x < 0, tl.ceil(x), tl.floor(x))


@triton.jit
def _round_half_even(x):
    low = tl.floor(x)
    diff = x - low
    low_is_even = (low - 2.0 * tl.floor(low * 0.5)) == 0.0
    return tl.where(diff > 0.5, low + 1.0, tl.where(diff < 0.5, low, tl.where(low_is_even, low, low + 1.0)))


@triton.jit
def _pow(base, exponent):
    # exp2(y * log2|x|), with torch's signs and special cases for x <= 0.
    magnitude = tl.exp2(exponent * tl.log2(tl.abs(base)))
    integral = exponent == tl.floor(exponent)
    odd = integral & ((exponent - 2.0 * tl.floor(exponent * 0.5)) != 0.0)
    signed = tl.where((base < 0) & odd, -magnitude, magnitude)
    result = tl.where((base < 0) & (~integral), float("nan"), signed)
    result = tl.where(base == 0, tl.where(exponent == 0, 1.0, tl.where(exponent > 0, 0.0, float("inf"))), result)
    return tl.where(exponent == 0, 1.0, result)


@triton.jit
def _floordiv_int(a, b):
    q = a // b
    return tl.where(((a % b) != 0) & ((a < 0) != (b < 0)), q - 1, q)


@triton.jit
def _remainder_int(a, b):
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)


@triton.jit
def _pow_int(a, b):
    result = a * 0 + 1
    base = a
    e = b
    for _ in tl.static_range(63):
        result = tl.where((e & 1) != 0, result * base, result)
        base = base * base
        e = e >> 1
    return result
"""


def _print_index(expr: sympy.Expr, names: dict[sympy.Symbol, str]) -> str:
    """A sympy index expression as Triton integer arithmetic."""
    if isinstance(expr, sympy.Symbol):
        return names.get(expr, expr.name)
    if isinstance(expr, sympy.Integer):
        return str(int(expr))
    if isinstance(expr, sympy.Rational):
        raise Unsupported(f"non-integer index {expr}")
    if isinstance(expr, sympy.Add):
        return "(" + " + ".join(_print_index(a, names) for a in expr.args) + ")"
    if isinstance(expr, sympy.Mul):
        return "(" + " * ".join(_print_index(a, names) for a in expr.args) + ")"
    if isinstance(expr, sympy.Pow) and expr.exp.is_Integer and expr.exp > 0:
        return "(" + " * ".join([_print_index(expr.base, names)] * int(expr.exp)) + ")"
    if isinstance(expr, FloorDiv):
        return f"({_print_index(expr.args[0], names)} // {_print_index(expr.args[1], names)})"
    if isinstance(expr, ModularIndexing):
        a, b, c = (_print_index(x, names) for x in expr.args)
        return f"(({a} // {b}) % {c})"
    if isinstance(expr, sympy.Mod):
        return f"({_print_index(expr.args[0], names)} % {_print_index(expr.args[1], names)})"
    if isinstance(expr, sympy.Min):
        return _fold("tl.minimum", [_print_index(a, names) for a in expr.args])
    if isinstance(expr, sympy.Max):
        return _fold("tl.maximum", [_print_index(a, names) for a in expr.args])
    raise Unsupported(f"cannot print index expression {expr} ({type(expr).__name__})")


def _bf16_round(x: str) -> str:
    """fp32 -> nearest bf16 (ties to even), still in fp32, with integer ops.

    `.to(tl.bfloat16)` truncates in Triton's interpreter; this rounds the same way on a GPU
    and in the interpreter (as torch does). nan and inf pass through.
    """
    bits = f"{x}.to(tl.uint32, bitcast=True)"
    rounded = f"(({bits} + 0x7FFF + (({bits} >> 16) & 1)) & 0xFFFF0000)"
    return f"tl.where({x} != {x}, {x}, {rounded}.to(tl.float32, bitcast=True))"


def _fold(fn: str, args: list[str]) -> str:
    text = args[0]
    for arg in args[1:]:
        text = f"{fn}({text}, {arg})"
    return text


def _literal(value: object, dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "1" if value else "0"
    if dtype.is_floating_point:
        number = float(value)
        if math.isnan(number):
            return 'float("nan")'
        if math.isinf(number):
            return 'float("inf")' if number > 0 else 'float("-inf")'
        return repr(number)
    return str(int(value))


@dataclass
class RenderedKernel:
    source: str
    fn_name: str
    arg_names: list[str]
    size_names: list[str]
    reduction: bool
    persistent: bool
    rblock: int | None
    ranges: tuple[sympy.Expr, ...]
    reduction_ranges: tuple[sympy.Expr, ...]
    tile: tuple[int, int] | None = None  # (y, x) ranges of a 2D tile, else a 1D block


def _fastest_axis(index: sympy.Expr) -> int | None:
    """The domain range whose variable steps the index by exactly 1 element, if any."""
    for term in sympy.Add.make_args(sympy.expand(index)):
        if isinstance(term, sympy.Symbol) and term.name.startswith("i") and term.name[1:].isdigit():
            return int(term.name[1:])
    return None


@dataclass
class _Scope:
    lines: list[str] = field(default_factory=list)
    names: dict[Value, str] = field(default_factory=dict)
    indent: str = "    "

    def emit(self, line: str) -> None:
        self.lines.append(self.indent + line)


class _Renderer:
    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.counter = 0
        self.reduction = bool(kernel.reduction_ranges)
        rnumel = sympy.Mul(*kernel.reduction_ranges) if self.reduction else sympy.Integer(1)
        self.persistent = self.reduction and rnumel.is_number and int(rnumel) <= PERSISTENT_MAX
        self.rblock = (
            max(1, 1 << max(0, int(rnumel) - 1).bit_length())
            if self.persistent
            else LOOP_RBLOCK
            if self.reduction
            else None
        )
        self.var_names = {index_var(k): f"i{k}" for k in range(len(kernel.ranges))}
        self.var_names |= {reduction_var(k): f"r{k}" for k in range(len(kernel.reduction_ranges))}
        self.outer = _Scope()

    def fresh(self) -> str:
        self.counter += 1
        return f"tmp{self.counter}"

    # -- expressions ------------------------------------------------------------------

    def index(self, expr: sympy.Expr, scope: _Scope, indirect: dict[sympy.Symbol, str]) -> str:
        return _print_index(sympy.sympify(expr), {**self.var_names, **indirect})

    def mask_for(self, symbols: set[sympy.Symbol]) -> str:
        uses_r = any(is_reduction_var(s) for s in symbols)
        if self.reduction and uses_r:
            return "xmask & rmask"
        return "xmask"

    def value(self, value: Value, scope: _Scope) -> str:
        """The name of `value` in `scope`, emitting it (and its operands) if needed."""
        if value in scope.names:
            return scope.names[value]
        if scope is not self.outer and value.is_row and value in self.outer.names:
            return self.outer.names[value]
        if scope is not self.outer and value.is_row and value.op != "reduce":
            # Row values are computed once per row, outside the reduction loops.
            return self.value(value, self.outer)
        if value.op == "reduce" and scope is not self.outer and not self.persistent:
            raise AssertionError(f"reduction {value} must be computed by its loop first")
        text = self.expression(value, scope)
        name = self.fresh()
        scope.emit(f"{name} = {text}")
        scope.names[value] = name
        return name

    def expression(self, value: Value, scope: _Scope) -> str:
        op = value.op
        if op == "load":
            return self.load(value, scope)
        if op == "const":
            held = held_dtype(value.dtype)
            return f"tl.full([1], {_literal(value.arg, held)}, {tl_dtype(held)})"
        if op == "index":
            if not value.arg.free_symbols:
                held = held_dtype(value.dtype)
                return f"tl.full([1], {_literal(value.arg, held)}, {tl_dtype(held)})"
            text = self.index(value.arg, scope, {})
            if value.dtype == torch.int64:
                return f"({text}).to(tl.int64)"
            return f"({text}).to({tl_dtype(held_dtype(value.dtype))})"
        if op == "cast":
            source = self.value(value.args[0], scope)
            return self.cast(source, value.args[0].dtype, value.dtype)
        if op == "reduce":
            return self.persistent_reduce(value, scope)
        return self.pointwise(value, scope)

    def cast(self, source: str, from_dtype: torch.dtype, to_dtype: torch.dtype) -> str:
        if to_dtype == torch.bfloat16:
            return _bf16_round(f"{source}.to(tl.float32)")
        if to_dtype in _HALF:
            # Round to 16 bits, keep computing in fp32.
            return f"{source}.to({tl_dtype(to_dtype)}).to(tl.float32)"
        if to_dtype == torch.bool:
            return f"({source} != 0)"
        return f"{source}.to({tl_dtype(to_dtype)})"

    def load(self, value: Value, scope: _Scope) -> str:
        buffer, index, indirect, masked = value.arg
        operands = list(value.args)
        extra_mask = self.value(operands.pop(), scope) if masked else None
        bound = {s: self.value(v, scope) for s, v in zip(indirect, operands)}
        names = {s: f"{n}" for s, n in bound.items()}
        offset = self.index(index, scope, names)
        symbols = set(index.free_symbols) | {s for v in operands for s in v.symbols}
        mask = self.mask_for(symbols)
        if not index.free_symbols:
            offset = f"{offset} + 0 * xindex"  # a block of offsets, not one scalar
        if extra_mask is not None:
            mask = f"{mask} & {extra_mask}"
            # A masked-off lane may compute a wild offset: clamp it to 0.
            offset = f"tl.where({extra_mask}, {offset}, 0)"
        buffer_dtype = self.kernel.buffers[buffer].dtype
        text = f"tl.load({buffer} + ({offset}), {mask}, other=0)"
        if buffer_dtype in _HALF:
            text += ".to(tl.float32)"
        return text

    def pointwise(self, value: Value, scope: _Scope) -> str:
        names = [self.value(a, scope) for a in value.args]
        op = value.op
        operand_dtype = held_dtype(value.args[0].dtype) if value.args else value.dtype
        if op == "where":
            return f"tl.where({names[0]}, {names[1]}, {names[2]})"
        if op == "atan2":
            raise Unsupported("atan2 has no Triton builtin that the interpreter runs")
        if len(names) == 1:
            if operand_dtype == torch.bool:
                table = _BOOL_UNARY
            elif operand_dtype.is_floating_point:
                table = _FLOAT_UNARY
            else:
                table = _INT_UNARY
            template = table.get(op)
            if template is None:
                raise Unsupported(f"{op} on {operand_dtype}")
            return template.format(a=names[0])
        template = _COMMON_BINARY.get(op)
        if template is None:
            table = _FLOAT_BINARY if operand_dtype.is_floating_point else _INT_BINARY
            template = table.get(op)
        if template is None:
            raise Unsupported(f"{op} on {operand_dtype}")
        return template.format(a=names[0], b=names[1])

    def reduce_inputs(self, value: Value, source: str) -> tuple[str, str]:
        """(masked operand, identity) for a reduction over a [XBLOCK, RBLOCK] block."""
        kind = value.arg
        operand_dtype = held_dtype(value.args[0].dtype)
        floating = operand_dtype.is_floating_point
        identity = {
            "sum": "0.0" if floating else "0",
            "prod": "1.0" if floating else "1",
            "max": 'float("-inf")'
            if floating
            else str(torch.iinfo(operand_dtype).min if operand_dtype != torch.bool else 0),
            "min": 'float("inf")'
            if floating
            else str(torch.iinfo(operand_dtype).max if operand_dtype != torch.bool else 1),
            "argmax": 'float("-inf")' if floating else str(torch.iinfo(torch.int64).min),
            "argmin": 'float("inf")' if floating else str(torch.iinfo(torch.int64).max),
            "any": "0",
            "all": "1",
        }[kind]
        if kind in ("any", "all"):
            source = f"({source} != 0).to(tl.int32)"
        elif operand_dtype == torch.bool:
            source = f"{source}.to(tl.int32)"
        return f"tl.where(xmask & rmask, {source}, {identity})", identity

    def persistent_reduce(self, value: Value, scope: _Scope) -> str:
        source = self.value(value.args[0], scope)
        if value.args[0].is_row:
            source = f"tl.broadcast_to({source}, [XBLOCK, RBLOCK])"
        masked, _ = self.reduce_inputs(value, source)
        kind = value.arg
        block = self.fresh()
        scope.emit(f"{block} = {masked}")
        result = {
            "sum": f"tl.sum({block}, 1)",
            "prod": f"tl.reduce({block}, 1, _mul_combine)",
            "max": f"tl.max({block}, 1)",
            "min": f"tl.min({block}, 1)",
            "argmax": f"tl.argmax({block}, 1)",
            "argmin": f"tl.argmin({block}, 1)",
            "any": f"(tl.max({block}, 1) != 0)",
            "all": f"(tl.min({block}, 1) != 0)",
        }[kind]
        dtype = held_dtype(value.dtype)
        return f"({result})[:, None].to({tl_dtype(dtype)})"

    # -- skeletons ---------------------------------------------------------------------

    def decompose(self, flat: str, ranges, prefix: str, scope: _Scope) -> None:
        """Recover each domain variable from a flat index (innermost range fastest)."""
        n = len(ranges)
        stride = sympy.Integer(1)
        strides = []
        for size in reversed(ranges):
            strides.append(stride)
            stride = stride * size
        strides.reverse()
        for k, (size, step) in enumerate(zip(ranges, strides)):
            step_text = _print_index(sympy.sympify(step), {})
            size_text = _print_index(sympy.sympify(size), {})
            if k == 0 and n == 1:
                text = flat
            elif k == 0:
                text = f"{flat} // {step_text}"
            elif step == 1:
                text = f"{flat} % {size_text}"
            else:
                text = f"({flat} // {step_text}) % {size_text}"
            scope.emit(f"{prefix}{k} = {text}")

    def render(self) -> RenderedKernel:
        kernel = self.kernel
        size_names = [s.name for s in kernel.size_symbols]
        buffers = [b.name for b in (*kernel.inputs, *kernel.outputs)]
        args = [*buffers, *size_names, "xnumel", "rnumel", "XBLOCK: tl.constexpr"]
        if self.reduction:
            args.append("RBLOCK: tl.constexpr")
        tile = None if self.reduction else self.tile_axes()
        if tile is not None:
            args.append("YBLOCK: tl.constexpr")
        body = self.outer
        wide = self.needs_int64()
        if tile is not None:
            self.tiled_prologue(tile, wide, body)
        elif self.reduction:
            body.emit("xindex = tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK)[:, None]")
        else:
            body.emit("xindex = tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK)")
        if tile is None:
            if wide:
                body.emit("xindex = xindex.to(tl.int64)")
            body.emit("xmask = xindex < xnumel")
            self.decompose("xindex", kernel.ranges, "i", body)
        if not self.reduction:
            for store in kernel.stores:
                self.store(store, body)
        elif self.persistent:
            body.emit("rindex = tl.arange(0, RBLOCK)[None, :]")
            body.emit("rmask = rindex < rnumel")
            self.decompose("rindex", kernel.reduction_ranges, "r", body)
            for store in kernel.stores:
                self.store(store, body)
        else:
            self.looped(body)
        name = f"memopt_{kernel.name}"
        lines = [
            "import triton",
            "import triton.language as tl",
            "",
            HELPERS.strip("\n"),
            "",
            "",
            "@triton.jit",
            "def _mul_combine(a, b):",
            "    return a * b",
            "",
            "",
            "@triton.jit",
            f"def {name}({', '.join(args)}):",
            *body.lines,
            "",
        ]
        return RenderedKernel(
            source="\n".join(lines),
            fn_name=name,
            arg_names=buffers,
            size_names=size_names,
            reduction=self.reduction,
            persistent=self.persistent,
            rblock=self.rblock,
            ranges=kernel.ranges,
            reduction_ranges=kernel.reduction_ranges,
            tile=tile,
        )

    def tile_axes(self) -> tuple[int, int] | None:
        """(y, x) ranges of a 2D tile when a load's fastest axis is not the stores' one.

        A transposed read in a 1D block strides through memory; in a [YBLOCK, XBLOCK] tile
        over both axes, each load and each store has a contiguous run along one tile axis.
        """
        if len(self.kernel.ranges) < 2:
            return None
        store_axes = {_fastest_axis(s.index) for s in self.kernel.stores} - {None}
        load_axes = {
            _fastest_axis(v.arg[1]) for v in self.kernel.values if v.op == "load" and not v.arg[2]
        } - {None}
        if len(store_axes) != 1:
            return None
        (x_axis,) = store_axes
        others = sorted(load_axes - {x_axis})
        return (others[0], x_axis) if others else None

    def tiled_prologue(self, tile: tuple[int, int], wide: bool, body: _Scope) -> None:
        y_axis, x_axis = tile
        ranges = self.kernel.ranges
        body.emit("xi = tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK)[None, :]")
        body.emit("yi = tl.program_id(1) * YBLOCK + tl.arange(0, YBLOCK)[:, None]")
        body.emit("zi = tl.program_id(2)")
        if wide:
            body.emit("xi = xi.to(tl.int64)")
            body.emit("yi = yi.to(tl.int64)")
            body.emit("zi = zi.to(tl.int64)")
        x_size = _print_index(sympy.sympify(ranges[x_axis]), {})
        y_size = _print_index(sympy.sympify(ranges[y_axis]), {})
        body.emit(f"xmask = (xi < {x_size}) & (yi < {y_size})")
        body.emit("xindex = xi + yi")  # a [YBLOCK, XBLOCK] block, for shapes only
        body.emit(f"i{x_axis} = xi")
        body.emit(f"i{y_axis} = yi")
        rest = [k for k in range(len(ranges)) if k not in tile]
        if rest:
            inner = _Scope()
            self.decompose("zi", [ranges[k] for k in rest], "z", inner)
            for line in inner.lines:
                body.lines.append(line)
            for position, k in enumerate(rest):
                body.emit(f"i{k} = z{position}")

    def needs_int64(self) -> bool:
        limit = 2**31 - 1
        for buffer in (*self.kernel.inputs, *self.kernel.outputs):
            extent = sum(
                ((s - 1) * st for s, st in zip(buffer.shape, buffer.stride)), sympy.Integer(1)
            )
            extent = sympy.sympify(extent)
            if not extent.is_number or int(extent) > limit:
                return True
        total = sympy.Mul(*self.kernel.ranges) * sympy.Mul(*self.kernel.reduction_ranges)
        return not total.is_number or int(total) > limit

    def store(self, store, scope: _Scope) -> None:
        value = self.value(store.value, scope)
        buffer = self.kernel.buffers[store.buffer]
        offset = self.index(store.index, scope, {})
        if not store.index.free_symbols:
            offset = f"{offset} + 0 * xindex"
        mask = self.mask_for(set(store.index.free_symbols))
        if store.value.is_row and self.reduction and not store.is_row:
            value = f"tl.broadcast_to({value}, [XBLOCK, RBLOCK])"
        if buffer.dtype == torch.bfloat16:
            value = f"({_bf16_round(value + '.to(tl.float32)')})"
        scope.emit(
            f"tl.store({store.buffer} + ({offset}), {value}.to({tl_dtype(buffer.dtype)}), {mask})"
        )

    def looped(self, body: _Scope) -> None:
        """One loop per level of dependent reductions, then one for full stores."""
        reduces = [v for v in self.kernel.values if v.op == "reduce"]
        level: dict[Value, int] = {}
        for value in self.kernel.values:  # operands come first
            below = [level[a] for a in value.args if a in level]
            own = max(below, default=-1)
            level[value] = own + 1 if value.op == "reduce" else max(own, 0) if below else 0
        depth = {r: max((level[a] for a in r.args), default=0) for r in reduces}
        for stage in sorted(set(depth.values())):
            group = [r for r in reduces if depth[r] == stage]
            self.reduction_loop(group, body)
        full_stores = [s for s in self.kernel.stores if not s.is_row]
        if full_stores:
            loop = self.open_loop(body)
            for store in full_stores:
                self.store(store, loop)
            body.lines.extend(loop.lines)
        for store in self.kernel.stores:
            if store.is_row:
                self.store(store, body)

    def open_loop(self, body: _Scope) -> _Scope:
        loop = _Scope(indent="        ")
        loop.lines.append("    for roffset in range(0, rnumel, RBLOCK):")
        loop.emit("rindex = roffset + tl.arange(0, RBLOCK)[None, :]")
        loop.emit("rmask = rindex < rnumel")
        self.decompose("rindex", self.kernel.reduction_ranges, "r", loop)
        return loop

    def reduction_loop(self, group: list[Value], body: _Scope) -> None:
        accumulators = {}
        for value in group:
            # Row operands needed inside the loop are emitted before it.
            for arg in value.args:
                self._emit_rows(arg, body)
            acc = self.fresh()
            kind = value.arg
            source_dtype = held_dtype(value.args[0].dtype)
            _, identity = self.reduce_inputs(value, "x")
            acc_dtype = (
                "tl.int32"
                if kind in ("any", "all") or source_dtype == torch.bool
                else tl_dtype(source_dtype)
            )
            body.emit(f"{acc} = tl.full([XBLOCK, RBLOCK], {identity}, {acc_dtype})")
            if kind in ("argmax", "argmin"):
                body.emit(f"{acc}_index = tl.full([XBLOCK, RBLOCK], 0, tl.int64)")
            accumulators[value] = acc
        loop = self.open_loop(body)
        for value, acc in accumulators.items():
            source = self.value(value.args[0], loop)
            if value.args[0].is_row:
                source = f"tl.broadcast_to({source}, [XBLOCK, RBLOCK])"
            masked, _ = self.reduce_inputs(value, source)
            kind = value.arg
            if kind == "sum":
                loop.emit(f"{acc} = {acc} + {masked}")
            elif kind == "prod":
                loop.emit(f"{acc} = {acc} * {masked}")
            elif kind in ("max", "any"):
                loop.emit(f"{acc} = tl.maximum({acc}, {masked})")
            elif kind in ("min", "all"):
                loop.emit(f"{acc} = tl.minimum({acc}, {masked})")
            else:
                new = self.fresh()
                loop.emit(f"{new} = {masked}")
                better = f"{new} > {acc}" if kind == "argmax" else f"{new} < {acc}"
                loop.emit(f"{acc}_index = tl.where({better}, rindex, {acc}_index)")
                loop.emit(f"{acc} = tl.where({better}, {new}, {acc})")
        body.lines.extend(loop.lines)
        for value, acc in accumulators.items():
            kind = value.arg
            dtype = tl_dtype(held_dtype(value.dtype))
            if kind == "sum":
                result = f"tl.sum({acc}, 1)"
            elif kind == "prod":
                result = f"tl.reduce({acc}, 1, _mul_combine)"
            elif kind in ("max", "any"):
                result = f"tl.max({acc}, 1)"
            elif kind in ("min", "all"):
                result = f"tl.min({acc}, 1)"
            else:
                best = "tl.max" if kind == "argmax" else "tl.min"
                body.emit(f"{acc}_best = {best}({acc}, 1)[:, None]")
                # The first index among lanes holding the best value (torch's tie rule).
                result = f"tl.min(tl.where({acc} == {acc}_best, {acc}_index, {2**62}), 1)"
            if kind in ("any", "all"):
                result = f"({result} != 0)"
            name = self.fresh()
            body.emit(f"{name} = ({result})[:, None].to({dtype})")
            body.names[value] = name

    def _emit_rows(self, value: Value, body: _Scope) -> None:
        """Emit, before a loop, the row values its body needs (they don't change per lane)."""
        if value in body.names:
            return
        if value.is_row and value.op != "reduce":
            self.value(value, body)
            return
        for arg in value.args:
            self._emit_rows(arg, body)


def render(kernel: Kernel) -> RenderedKernel:
    """Triton source for a Kernel IR kernel; raises Unsupported for ops it cannot render."""
    return _Renderer(kernel).render()
