"""Kernel IR -> Triton source.

One walk over the kernel's values emits one line per value (`tmp<k> = ...`, k its position
in kernel.values, %k in the printed kernel) from the op tables of ops.py; the loop skeleton
decides where each line goes:

- pointwise kernels: one flat block of XBLOCK domain points per program, or a
  [YBLOCK, XBLOCK] tile when a load's stride-1 range is not the stores' one (a transposed
  read), so that both the read and the write are contiguous along one tile axis;
- reduction kernels: XBLOCK rows per program. *Persistent* when the reduced extent is known
  and fits one block (rnumel <= PERSISTENT_MAX, RBLOCK >= rnumel): every value is computed
  once, reductions are `tl.sum(..., 1)`. *Looped* otherwise: one loop over the reduced
  extent per level of dependent reductions (layer_norm's variance needs the mean first),
  accumulating in [XBLOCK, RBLOCK] registers, then a last loop for the stores of full
  (per-element) values; row values and row stores come once per row, between the loops.

Every value is computed in fp32 when its dtype is a 16-bit float: loads upcast, casts to a
16-bit type round and come back to fp32, stores convert to the buffer's dtype. (Triton's
CPU interpreter gets bf16 arithmetic wrong, and a GPU kernel should compute this way
anyway.) Functions Triton's interpreter lacks (tanh, pow, log1p, atan2, ...) are written
with builtins, so one source runs on a GPU and in the interpreter. Index arithmetic is
int64 when a buffer's extent or the domain may pass 2**31 - 1 (or is symbolic).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import sympy
import torch

from memopt.backends.codegen.index import (
    ATOM,
    PRODUCT,
    IndexPrinter,
    Printed,
    row_major,
)
from memopt.backends.codegen.planning import reduction_depths, unit_stride_var
from memopt.backends.codegen.walk import ValueRenderer
from memopt.backends.triton.ops import (
    FLOAT_POW_BY_CONSTANT,
    HALF,
    HELPERS,
    LOOP_UPDATES,
    POW_BY_CONSTANT,
    Unsupported,
    bf16_round,
    convert,
    literal,
    number,
    op_tables,
    reduction_identity,
    reduction_result,
    tl_dtype,
)
from memopt.compiler import kernel_ir
from memopt.compiler.kernel_ir import (
    Kernel,
    Store,
    Value,
    compute_dtype,
    index_var,
    is_reduction_var,
    operand_dtypes,
    reduction_var,
)

# Largest reduced extent computed in one block (persistent reduction).
PERSISTENT_MAX = 4096
# Block of the reduced extent per loop iteration (looped reduction).
LOOP_RBLOCK = 1024


class TritonIndexPrinter(IndexPrinter):
    """Index expressions as Triton integer arithmetic (`1024 * i0 + r0`): the Triton dialect.

    Symbols print as `names` maps them (indirect t<k> -> the loaded value), else by name.
    Triton's `//` and `%` truncate toward zero on ints where sympy's FloorDiv and Mod round
    down: they agree because index expressions divide non-negative numbers by positive ones
    (an index variable, size or offset is never negative in a lane that reads or writes).
    """

    minimum = "tl.minimum"
    maximum = "tl.maximum"
    absolute = "tl.abs"

    def symbol(self, symbol: sympy.Symbol) -> str:
        return self.names.get(symbol, symbol.name)

    def floordiv(self, a: sympy.Expr, b: sympy.Expr) -> Printed:
        return f"{self.at(a, PRODUCT)} // {self.at(b, ATOM)}", PRODUCT

    def mod(self, a: sympy.Expr, b: sympy.Expr) -> Printed:
        return f"{self.at(a, PRODUCT)} % {self.at(b, ATOM)}", PRODUCT

    def ceil_div(self, numerator: sympy.Expr, denominator: sympy.Expr) -> Printed:
        return self.floordiv(numerator + denominator - 1, denominator)  # numerator >= 0


def _print_index(expr: sympy.Expr, names: Mapping[sympy.Symbol, str]) -> str:
    return TritonIndexPrinter(names)(expr)


@dataclass
class RenderedKernel:
    """A kernel's Triton module and how to launch its `@triton.jit` function `fn_name`.

    Parameters, in order: one pointer per input then per output buffer (`arg_names`), one
    int per size symbol (`size_names`), `xnumel` (the product of the ranges) and `rnumel`
    (of the reduction ranges; 1 for a pointwise kernel), then the constexpr block sizes
    XBLOCK, and RBLOCK for a reduction or YBLOCK for a 2D tile. Layouts: a pointwise kernel
    is a flat block, or a [YBLOCK, XBLOCK] tile when `tile` is (y range, x range); a
    reduction is persistent (RBLOCK = `rblock` >= rnumel, no loop) or looped (steps of
    `rblock`). The runtime chooses XBLOCK and YBLOCK at launch.
    """

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
    template: str | None = None  # "matmul": a template kernel (matmul.py), launched its own way
    across_rows: bool = False  # a reduction whose loads are contiguous along a kept range

    @functools.cached_property
    def loops(self) -> int:
        """How many run-time loops the kernel's source has (a looped reduction: one a pass;
        `tl.static_range` loops of helpers are unrolled, not counted)."""
        return len(re.findall(r"^\s*for \w+ in range\(", self.source, re.M))

    @property
    def looped(self) -> bool:
        return self.reduction and not self.persistent

    @property
    def params(self) -> list[str]:
        """The kernel function's parameters, in order."""
        if self.template == "matmul":
            sizes = ["bnumel", "mnumel", "nnumel", "knumel"]
            blocks = ["BLOCK_M", "BLOCK_N", "BLOCK_K", "LOW_PRECISION_DOT", "DOT_PRECISION"]
            return [*self.arg_names, *self.size_names, *sizes, *blocks]
        blocks = ["XBLOCK"] + (["RBLOCK"] if self.reduction else [])
        blocks += ["YBLOCK"] if self.tile is not None else []
        return [*self.arg_names, *self.size_names, "xnumel", "rnumel", *blocks]


def reduces_across_rows(kernel: Kernel) -> bool:
    """Whether the kernel reduces across rows: its loads step by one element along a kept
    range and none along the reduced one (the bias gradient's column sum)."""
    kept = [index_var(k) for k in range(len(kernel.ranges))]
    reduced = [reduction_var(k) for k in range(len(kernel.reduction_ranges))]
    along_kept = along_reduced = False
    for value in kernel.values:
        if value.op == "load":
            var = unit_stride_var(value.arg[1], [*kept, *reduced])
            along_kept |= var in kept
            along_reduced |= var in reduced
    return along_kept and not along_reduced


def _fastest_axis(index: sympy.Expr, count: int) -> int | None:
    """The domain range (of `count`) whose variable steps the index by exactly 1 element."""
    variables = [index_var(k) for k in range(count)]
    var = unit_stride_var(index, variables)
    return None if var is None else variables.index(var)


def tile_axes(kernel: Kernel) -> tuple[int, int] | None:
    """(y, x) ranges of the 2D tile a pointwise kernel renders as, or None for a flat block
    (and for every reduction): a tile when a load's fastest axis is not the stores' one.

    A transposed read in a 1D block strides through memory; in a [YBLOCK, XBLOCK] tile
    over both axes, each load and each store has a contiguous run along one tile axis. A
    function of the Kernel IR alone: the renderer and the sector cost (sectors.py) ask it.
    """
    if kernel.reduction_ranges or len(kernel.ranges) < 2:
        return None
    count = len(kernel.ranges)
    store_axes = {_fastest_axis(s.index, count) for s in kernel.stores} - {None}
    load_axes = {
        _fastest_axis(v.arg.index, count)
        for v in kernel.values
        if v.op == "load" and not v.arg.indirect
    } - {None}
    if len(store_axes) != 1:
        return None
    (x_axis,) = store_axes
    others = sorted(load_axes - {x_axis})
    return (others[0], x_axis) if others else None


@dataclass
class Scope:
    lines: list[str] = field(default_factory=list)
    names: dict[Value, str] = field(default_factory=dict)
    indent: str = "    "

    def emit(self, line: str) -> None:
        self.lines.append(self.indent + line)


class Renderer(ValueRenderer):
    def __init__(self, kernel: Kernel) -> None:
        kernel.verify()
        self.kernel = kernel
        self.reduction = bool(kernel.reduction_ranges)
        rnumel = sympy.Mul(*kernel.reduction_ranges) if self.reduction else sympy.Integer(1)
        self.across_rows = self.reduction and reduces_across_rows(kernel)
        # A reduction across rows (a column sum) loops: its block is wide along the
        # contiguous kept range and short along the reduced one (chosen at launch).
        self.persistent = (
            self.reduction
            and not self.across_rows
            and rnumel.is_number
            and int(rnumel) <= PERSISTENT_MAX
        )
        self.rblock = (
            max(1, 1 << max(0, int(rnumel) - 1).bit_length())
            if self.persistent
            else LOOP_RBLOCK
            if self.reduction
            else None
        )
        self.kept_vars = frozenset(index_var(k) for k in range(len(kernel.ranges)))
        self.var_names = {index_var(k): f"i{k}" for k in range(len(kernel.ranges))}
        self.var_names |= {reduction_var(k): f"r{k}" for k in range(len(kernel.reduction_ranges))}
        self.outer = Scope()
        self.positions = {value: k for k, value in enumerate(kernel.values)}
        # Zeros shaped like the block's offsets, for an index without any variable.
        self.zero_block = "0 * xindex"

    def name(self, value: Value) -> str:
        """`tmp<k>` for the k-th value of kernel.values (%k in the printed kernel)."""
        return f"tmp{self.positions[value]}"

    # -- expressions ------------------------------------------------------------------

    def index(self, expr: sympy.Expr, scope: Scope, indirect: dict[sympy.Symbol, str]) -> str:
        return _print_index(sympy.sympify(expr), {**self.var_names, **indirect})

    def mask_for(self, symbols: set[sympy.Symbol]) -> str:
        uses_r = any(is_reduction_var(s) for s in symbols)
        uses_x = any(s in self.kept_vars for s in symbols)
        if self.reduction and uses_r:
            # A value along the reduced range only (LayerNorm's weight) is the same for every
            # row: masked by rmask alone it is one [1, RBLOCK] load a program, broadcast,
            # not one per row. Its address is in range whatever the row.
            return "xmask & rmask" if uses_x or self.across_rows else "rmask"
        return "xmask"

    def value(self, value: Value, scope: Scope) -> str:
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
        name = self.name(value)
        scope.emit(f"{name} = {text}")
        scope.names[value] = name
        return name

    def const_expr(self, value: Value, scope: Scope) -> str:
        # The number rounded to the Value's dtype (a 16-bit constant is not fp32's).
        held = compute_dtype(value.dtype)
        rounded = torch.tensor(number(value.arg), dtype=value.dtype).to(held).item()
        return f"tl.full([1], {literal(rounded, held)}, {tl_dtype(held)})"

    def index_expr(self, value: Value, scope: Scope) -> str:
        if not value.arg.free_symbols:
            return self.const_expr(value, scope)
        text = self.index(value.arg, scope, {})
        return self.cast(f"({text}).to(tl.int64)", torch.int64, value.dtype)

    def cast_expr(self, value: Value, scope: Scope) -> str:
        source = self.value(value.args[0], scope)
        return self.cast(source, value.args[0].dtype, value.dtype)

    def reduce_expr(self, value: Value, scope: Scope) -> str:
        return self.persistent_reduce(value, scope)

    def cast(self, source: str, from_dtype: torch.dtype, to_dtype: torch.dtype) -> str:
        """`source`, held as `from_dtype` holds, rounded to `to_dtype` and held as it holds."""
        if compute_dtype(from_dtype) == to_dtype:
            return source
        if to_dtype == torch.bfloat16:
            return bf16_round(f"{source}.to(tl.float32)")
        if to_dtype in HALF:
            # Round to 16 bits, keep computing in fp32.
            return f"{source}.to({tl_dtype(to_dtype)}).to(tl.float32)"
        if to_dtype == torch.bool:
            return f"({source} != 0)"
        return f"{source}.to({tl_dtype(to_dtype)})"

    def load_expr(self, value: Value, scope: Scope) -> str:
        buffer, index, indirect, masked = value.arg
        operands = list(value.args)
        extra_mask = self.value(operands.pop(), scope) if masked else None
        bound = {s: self.value(v, scope) for s, v in zip(indirect, operands)}
        names = {s: f"{n}" for s, n in bound.items()}
        offset = self.index(index, scope, names)
        symbols = set(index.free_symbols) | {s for v in operands for s in v.symbols}
        mask = self.mask_for(symbols)
        if not index.free_symbols:
            offset = f"{offset} + {self.zero_block}"  # a block of offsets, not one scalar
        if extra_mask is not None:
            mask = f"{mask} & {extra_mask}"
        if extra_mask is not None and indirect:
            # A masked-off lane may gather a wild offset: clamp it to 0. (An affine offset
            # is only out of range there, and a masked lane never reads: no clamp, which
            # would hide the offset's contiguity from the compiler and cost vector loads.)
            offset = f"tl.where({extra_mask}, {offset}, 0)"
        buffer_dtype = self.kernel.buffers[buffer].dtype
        text = f"tl.load({buffer} + ({offset}), {mask}, other=0)"
        if buffer_dtype in HALF:
            text += ".to(tl.float32)"  # exact: the 16-bit value, computed on in fp32
        if value.dtype != buffer_dtype:  # a load that converts, as the reference backend's
            text = self.cast(text, buffer_dtype, value.dtype)
        return text

    def pointwise_expr(self, value: Value, scope: Scope) -> str:
        """A pointwise op from the template tables, on operands converted as torch does.

        Operands meet in the dtype the op computes in (as the reference backend): the
        result's held dtype, or for comparisons and logical ops the operands' promoted one.
        """
        op = value.op
        result = compute_dtype(value.dtype)
        targets = operand_dtypes(value)
        names = [
            convert(self.value(arg, scope), compute_dtype(arg.dtype), target)
            for arg, target in zip(value.args, targets)
        ]
        if op == "where":
            return f"tl.where({names[0]}, {names[1]}, {names[2]})"
        tables = op_tables(targets[-1], len(names))
        if op == "pow" and value.args[1].op == "const":
            exponent = float(value.args[1].arg)
            special = {
                **POW_BY_CONSTANT,
                **(FLOAT_POW_BY_CONSTANT if result.is_floating_point else {}),
            }
            tables = ({op: special[exponent]}, *tables) if exponent in special else tables
        template = next((t[op] for t in tables if op in t), None)
        if template is None:
            raise Unsupported(f"{op} on {targets[-1]}")
        return template.format(a=names[0], b=names[-1])

    def reduce_inputs(self, value: Value, source: str) -> tuple[str, str, torch.dtype]:
        """(masked operand, identity, accumulator dtype) of a reduction over a block.

        Sums and products accumulate in the result's dtype (fp32 for 16-bit floats, int64
        for integer and bool sums, as torch); max/min/argmax/argmin compare in the operand's
        dtype (bool as int8); any/all reduce `x != 0` as int8. Lanes past rnumel (and rows
        past xnumel) hold the identity.
        """
        kind = value.arg
        operand = compute_dtype(value.args[0].dtype)
        if kind in ("sum", "prod"):
            acc = compute_dtype(value.dtype)
        elif kind in ("any", "all") or operand == torch.bool:
            acc = torch.int8
        else:
            acc = operand
        if kind in ("any", "all"):
            source = f"({source} != 0).to(tl.int8)"
        elif acc != operand:
            source = f"{source}.to({tl_dtype(acc)})"
        # A bool operand is held as int8: its identity is a bool's (False for max, True for
        # min), not int8's extremes, which read back as True.
        if operand == torch.bool:
            identity = "1" if kernel_ir.reduction_identity(kind, torch.bool) else "0"
        else:
            identity = reduction_identity(kind, acc)
        return f"tl.where(xmask & rmask, {source}, {identity})", identity, acc

    def reduce_block(
        self, kind: str, block: str, index: str, missing: str, acc: torch.dtype, scope: Scope
    ) -> str:
        """The [XBLOCK, 1] reduction over axis 1 of a masked block.

        `index` holds each lane's flat reduction index (argmax/argmin), `missing` an index no
        lane holds. torch's max/min/argmax/argmin propagate nan (the first nan wins), which
        tl.max/tl.min do not (they skip it on a GPU and in the interpreter): a float block
        also reduces its nan flags. Ties go to the first index, as torch.
        """
        if kind == "sum":
            return f"tl.sum({block}, 1)[:, None]"
        if kind == "prod":
            return f"tl.reduce({block}, 1, _mul_combine)[:, None]"
        if kind in ("any", "all"):
            return f"({'tl.max' if kind == 'any' else 'tl.min'}({block}, 1)[:, None] != 0)"
        extreme = "tl.max" if kind in ("max", "argmax") else "tl.min"
        best = f"{extreme}({block}, 1)[:, None]"
        if acc.is_floating_point:
            scope.emit(f"{block}_nan = tl.max(({block} != {block}).to(tl.int8), 1)[:, None] != 0")
            best = f'tl.where({block}_nan, float("nan"), {best})'
        if kind in ("max", "min"):
            return best
        scope.emit(f"{block}_best = {best}")
        hit = f"{block} == {block}_best"
        if acc.is_floating_point:
            hit = f"({hit}) | (({block} != {block}) & {block}_nan)"
        return f"tl.min(tl.where({hit}, {index}, {missing}), 1)[:, None]"

    def persistent_reduce(self, value: Value, scope: Scope) -> str:
        source = self.value(value.args[0], scope)
        masked, _, acc = self.reduce_inputs(value, source)
        block = f"{self.name(value)}_block"
        scope.emit(f"{block} = {masked}")
        result = self.reduce_block(value.arg, block, "rindex", "RBLOCK", acc, scope)
        return reduction_result(value, result, acc)

    # -- skeletons ---------------------------------------------------------------------

    def decompose(self, flat: str, ranges, prefix: str, scope: Scope) -> None:
        """Recover each domain variable from a flat index (innermost range fastest)."""
        position = sympy.Symbol(flat, integer=True, nonnegative=True)
        printer = TritonIndexPrinter({position: flat})
        for k, expr in enumerate(row_major(position, list(ranges))):
            scope.emit(f"{prefix}{k} = {printer(expr)}")

    def render(self) -> RenderedKernel:
        kernel = self.kernel
        size_names = [s.name for s in kernel.size_symbols]
        buffers = [b.name for b in (*kernel.inputs, *kernel.outputs)]
        args = [*buffers, *size_names, "xnumel", "rnumel", "XBLOCK: tl.constexpr"]
        if self.reduction:
            args.append("RBLOCK: tl.constexpr")
        tile = tile_axes(kernel)
        if tile is not None:
            args.append("YBLOCK: tl.constexpr")
        body = self.outer
        wide = self.needs_int64()
        if tile is not None:
            self.tiled_prologue(tile, wide, body)
        else:
            # In int64 the program id converts first: pid * XBLOCK itself may pass 2**31.
            pid = "tl.program_id(0).to(tl.int64)" if wide else "tl.program_id(0)"
            lanes = "tl.arange(0, XBLOCK)[:, None]" if self.reduction else "tl.arange(0, XBLOCK)"
            body.emit(f"xindex = {pid} * XBLOCK + {lanes}")
        if tile is None:
            body.emit(f"xmask = xindex < {self.extent(kernel.ranges, 'xnumel')}")
            self.decompose("xindex", kernel.ranges, "i", body)
        if not self.reduction:
            for store in kernel.stores:
                self.store(store, body)
        elif self.persistent:
            body.emit(f"rindex = tl.arange(0, RBLOCK)[None, :]{'.to(tl.int64)' if wide else ''}")
            body.emit(f"rmask = rindex < {self.extent(kernel.reduction_ranges, 'rnumel')}")
            self.decompose("rindex", kernel.reduction_ranges, "r", body)
            for store in kernel.stores:
                self.store(store, body)
        else:
            self.looped(body)
        name = function_name(kernel)
        return RenderedKernel(
            source=module_source(name, args, body.lines),
            fn_name=name,
            arg_names=buffers,
            size_names=size_names,
            reduction=self.reduction,
            persistent=self.persistent,
            rblock=self.rblock,
            ranges=kernel.ranges,
            reduction_ranges=kernel.reduction_ranges,
            tile=tile,
            across_rows=self.across_rows,
        )

    def tiled_prologue(self, tile: tuple[int, int], wide: bool, body: Scope) -> None:
        """A [YBLOCK, XBLOCK] tile: x along the stores' fastest range, y along the others.

        The ranges other than the two fold into y with the load's fastest range innermost,
        so one program covers several of them, and the grid is 1D (GPU grids allow only
        65535 programs along y and z): the program id splits into the x and y tiles.
        """
        y_axis, x_axis = tile
        ranges = self.kernel.ranges
        y_ranges = [k for k in range(len(ranges)) if k != x_axis and k != y_axis] + [y_axis]
        x_size = _print_index(ranges[x_axis], {})
        y_size = _print_index(sympy.Mul(*(ranges[k] for k in y_ranges)), {})
        body.emit(f"pid = {'tl.program_id(0).to(tl.int64)' if wide else 'tl.program_id(0)'}")
        body.emit(f"x_tiles = ({x_size} + XBLOCK - 1) // XBLOCK")
        body.emit("xindex = (pid % x_tiles) * XBLOCK + tl.arange(0, XBLOCK)[None, :]")
        body.emit("yindex = (pid // x_tiles) * YBLOCK + tl.arange(0, YBLOCK)[:, None]")
        body.emit(f"xmask = (xindex < {x_size}) & (yindex < {y_size})")
        body.emit(f"i{x_axis} = xindex")
        self.zero_block = "0 * (xindex + yindex)"
        inner = Scope()
        self.decompose("yindex", [ranges[k] for k in y_ranges], "y", inner)
        body.lines.extend(inner.lines)
        for position, k in enumerate(y_ranges):
            body.emit(f"i{k} = y{position}")

    @staticmethod
    def extent(ranges: tuple[sympy.Expr, ...], name: str) -> str:
        """A mask's bound: the literal extent when it is static, else the `name` argument.

        A literal's power-of-two factor tells Triton's compiler that the mask is constant
        over runs of lanes (1000 = 8 x 125: runs of 8), which lets contiguous accesses be
        vectorized; a runtime int is only known divisible by 16, or not at all.
        """
        extent = sympy.Mul(*ranges)
        return str(int(extent)) if extent.is_number else name

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

    def store(self, store: Store, scope: Scope) -> None:
        """tl.store of the value converted straight to the buffer's dtype (tl.store
        broadcasts a row value over the reduction axis of a full store)."""
        value = self.value(store.value, scope)
        buffer = self.kernel.buffers[store.buffer]
        offset = self.index(store.index, scope, {})
        if not store.index.free_symbols:
            offset = f"{offset} + {self.zero_block}"
        mask = self.mask_for(set(store.index.free_symbols))
        held = compute_dtype(store.value.dtype)
        if buffer.dtype == torch.bfloat16:
            # Rounded with integer ops first: the interpreter's conversion truncates.
            value = f"{bf16_round(convert(value, held, torch.float32))}.to(tl.bfloat16)"
        else:
            value = convert(value, held, buffer.dtype)
        scope.emit(f"tl.store({store.buffer} + ({offset}), {value}, {mask})")

    def looped(self, body: Scope) -> None:
        """One loop per level of dependent reductions, then one for full stores."""
        depth = reduction_depths(self.kernel)
        reduces = [v for v in self.kernel.values if v.op == "reduce"]
        for level in sorted({depth[r] for r in reduces}):
            self.reduction_loop([r for r in reduces if depth[r] == level], body)
        full_stores = [s for s in self.kernel.stores if not s.is_row]
        if full_stores:
            loop = self.open_loop(body)
            for store in full_stores:
                self.store(store, loop)
            body.lines.extend(loop.lines)
        for store in self.kernel.stores:
            if store.is_row:
                self.store(store, body)

    def open_loop(self, body: Scope) -> Scope:
        loop = Scope(indent="        ")
        loop.lines.append("    for roffset in range(0, rnumel, RBLOCK):")
        lanes = "tl.arange(0, RBLOCK)[None, :]" + (".to(tl.int64)" if self.needs_int64() else "")
        loop.emit(f"rindex = roffset + {lanes}")
        loop.emit(f"rmask = rindex < {self.extent(self.kernel.reduction_ranges, 'rnumel')}")
        self.decompose("rindex", self.kernel.reduction_ranges, "r", loop)
        return loop

    def reduction_loop(self, group: list[Value], body: Scope) -> None:
        accumulators = {}
        for value in group:
            # Row operands needed inside the loop are emitted before it.
            for arg in value.args:
                self._emit_rows(arg, body)
            acc = f"{self.name(value)}_acc"
            _, identity, acc_dtype = self.reduce_inputs(value, "x")
            body.emit(f"{acc} = tl.full([XBLOCK, RBLOCK], {identity}, {tl_dtype(acc_dtype)})")
            if value.arg in ("argmax", "argmin"):
                body.emit(f"{acc}_index = tl.full([XBLOCK, RBLOCK], 0, tl.int64)")
            accumulators[value] = acc
        loop = self.open_loop(body)
        for value, acc in accumulators.items():
            source = self.value(value.args[0], loop)
            masked, _, acc_dtype = self.reduce_inputs(value, source)
            new = f"{self.name(value)}_block"
            loop.emit(f"{new} = {masked}")
            update = LOOP_UPDATES[value.arg, acc_dtype.is_floating_point]
            if value.arg in ("argmax", "argmin"):
                # Strictly better (or the first nan): on ties the earlier index stays.
                loop.emit(f"{new}_take = {update.format(acc=acc, new=new)}")
                loop.emit(f"{acc}_index = tl.where({new}_take, rindex, {acc}_index)")
                loop.emit(f"{acc} = tl.where({new}_take, {new}, {acc})")
            else:
                loop.emit(f"{acc} = {update.format(acc=acc, new=new)}")
        body.lines.extend(loop.lines)
        for value, acc in accumulators.items():
            _, _, acc_dtype = self.reduce_inputs(value, "x")
            result = self.reduce_block(value.arg, acc, f"{acc}_index", "rnumel", acc_dtype, body)
            name = self.name(value)
            body.emit(f"{name} = {reduction_result(value, result, acc_dtype)}")
            body.names[value] = name

    def _emit_rows(self, value: Value, body: Scope) -> None:
        """Emit, before a loop, the row values its body needs (they don't change per lane)."""
        if value in body.names:
            return
        if value.is_row and value.op != "reduce":
            self.value(value, body)
            return
        for arg in value.args:
            self._emit_rows(arg, body)


def function_name(kernel: Kernel) -> str:
    """The @triton.jit function's name: `memopt_` and the kernel's name as an identifier."""
    return "memopt_" + re.sub(r"\W", "_", kernel.name)


def _helpers_called(text: str) -> list[str]:
    """The sources of the helpers `text` calls, and of the helpers they call, in HELPERS'
    order (a helper before its callers)."""
    called: set[str] = set()
    pending = [text]
    while pending:
        source = pending.pop()
        for name, helper in HELPERS.items():
            if name not in called and re.search(rf"\b{name}\b", source):
                called.add(name)
                pending.append(helper)
    return [HELPERS[name].strip("\n") for name in HELPERS if name in called]


def module_source(fn_name: str, args: list[str], body: list[str]) -> str:
    """A Triton module: imports, the helpers the body calls, then the @triton.jit function."""
    helpers = _helpers_called("\n".join(body))
    lines = [
        "import triton",
        "import triton.language as tl",
        "",
        "",
        *(line for helper in helpers for line in (helper, "", "")),
        "@triton.jit",
        f"def {fn_name}({', '.join(args)}):",
        *body,
        "",
    ]
    return "\n".join(lines)


def render_elementwise(kernel: Kernel) -> RenderedKernel:
    """Triton source for a pointwise or reduction kernel; Unsupported for what it cannot
    render (matmul templates render in matmul.py)."""
    if kernel.inner_ranges:
        raise Unsupported(f"kernel {kernel.name}: nested reductions (Feature.NESTED_REDUCTIONS)")
    return Renderer(kernel).render()
