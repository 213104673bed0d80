"""Kernel IR -> one C++ function (`extern "C"`), using the tables in ops.py.

The walk is shared by both loop skeletons: it names every Value `v<k>` (its position in
`Kernel.values`), prints each as one `const T v<k> = <template>;` line, and decides where
each line goes: once per row (a Value that does not vary along the innermost loop), or
inside the loop. Index expressions that are linear in the loop variable are split into an
offset hoisted out of the loop plus `stride * j`, so a contiguous loop reads `p[o + j]`.

Skeletons:

- pointwise: the domain is collapsed to rows x an innermost range. The innermost variable
  is the one the first store is contiguous in, merged with the variables outside it while
  every index is linear in them with matching strides (a contiguous (N, C, H, W) domain is
  one loop). Rows (and chunks of long rows) form one flat loop that OpenMP splits across
  threads when the domain is large enough; the innermost loop is `omp simd`.
- reduction: one row per iteration of the parallel loop. Per row, one pass over the
  reduction domain per dependency level of the reductions (layer_norm: mean, then
  variance, then the normalized stores), each with MO_LANES partial accumulators per
  reduction (a vectorizable loop whose NaN and tie rules are exact), then the row stores.
- column reduction: a single-pass reduction whose loads are contiguous across rows and
  strided along the reduction (a bias gradient) reduces MO_COLUMNS adjacent rows at once,
  one per vector lane, so each load reads consecutive elements.
- nested reduction (Kernel.inner_ranges: `d.sum(-1).amin(1)`): per row, a loop over the
  outer reduction; per outer element, one lane pass over the inner reduction (as a row
  pass), whose results feed the outer reductions' scalar accumulators. The inner results
  never leave registers.
"""

from __future__ import annotations

import dataclasses
import functools
import keyword
import re
from dataclasses import dataclass, field

import sympy
import torch

from memopt.backends.codegen import planning
from memopt.backends.codegen.index import ATOM, Unsupported, linear_coefficient, row_major
from memopt.backends.codegen.walk import ValueRenderer
from memopt.backends.cpp import ops
from memopt.backends.cpp.index import CppIndexPrinter
from memopt.backends.cpp.prelude import PARALLEL_WORK, PRELUDE
from memopt.compiler import kernel_ir
from memopt.compiler.kernel_ir import (
    DOT,
    INNER_REDUCE,
    Kernel,
    Store,
    Value,
    index_var,
    inner_var,
    reduction_var,
)

FUNCTION_NAME = "memopt_kernel"
# The same kernel with its arguments packed: `int32_t f(void* const* pointers, const
# int64_t* scalars)`, the data pointers in argument order, then the integers. What the
# native launcher calls (launcher.py): one signature for every kernel.
PACKED_NAME = "memopt_kernel_packed"
SHORT_ROW = 1024  # float32 sums over rows up to this long accumulate in float32 lanes
SPLIT_COLUMNS = 8192  # column reductions over at most this many columns: MO_SPLIT_COLUMNS

_J = sympy.Symbol("j", integer=True, nonnegative=True)  # the pointwise innermost variable
_R = sympy.Symbol("r", integer=True, nonnegative=True)  # the innermost reduction variable


@dataclass(frozen=True)
class Signature:
    """What the Python side passes, in order, after the buffers' data pointers.

    Arguments: every input, then every output (data pointers); then a snapshot of each
    output in `snapshot_outputs` (a kernel that reads an output sees it as it was before
    the kernel); then the extent in elements of each buffer in `extent_buffers` (bounds for
    data-dependent loads); then each size symbol in `size_names`. Returns an error code.
    """

    snapshot_outputs: tuple[int, ...]
    extent_buffers: tuple[str, ...]
    size_names: tuple[str, ...]


@dataclass(frozen=True)
class Generated:
    source: str
    signature: Signature


def generate(kernel: Kernel) -> Generated:
    """C++ source of `kernel`; NotImplementedError/ValueError for what it cannot express.

    Cached by the kernel without its name, which the source never contains: a kernel's
    source is asked for when it is prefetched and again when it is built, and a repeated
    layer's kernels differ only in their names. An error is not cached; it is raised again,
    naming this kernel."""
    try:
        return _generate(dataclasses.replace(kernel, name=""))
    except (NotImplementedError, ValueError):
        return _Codegen(kernel).generate()


@functools.lru_cache(maxsize=4096)
def _generate(kernel: Kernel) -> Generated:
    return _Codegen(kernel).generate()


@dataclass
class _Loop:
    """Index printing inside one loop: offsets along `var` are hoisted into `hoisted`."""

    var: sympy.Symbol | None
    prefix: str
    hoisted: list[str] = field(default_factory=list)
    offsets: dict[sympy.Expr, str] = field(default_factory=dict)
    extent: sympy.Expr | None = None  # how many values `var` takes (for row-level checks)
    # The kernel's index variables that change inside the loop (folded into `var`, or
    # outer reduction variables around it): a value depending on none is fixed in it.
    varying: frozenset[sympy.Symbol] = frozenset()


class _Codegen(ValueRenderer):
    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        kernel.verify()
        for value in kernel.values:
            if value.op == DOT:
                raise Unsupported(f"kernel {kernel.name}: the C++ backend renders no matmul")
            for dtype in (value.dtype, *(a.dtype for a in value.args)):
                if dtype not in ops.STORAGE_TYPES:
                    raise Unsupported(f"kernel {kernel.name}: dtype {dtype}")
        self.names = {value: f"v{k}" for k, value in enumerate(kernel.values)}
        self.buffers = kernel.buffers
        self.c_names = _c_names([b.name for b in (*kernel.inputs, *kernel.outputs)])
        output_names = [b.name for b in kernel.outputs]
        loaded = {v.arg.buffer for v in kernel.values if v.op == "load"}
        self.snapshots = tuple(k for k, name in enumerate(output_names) if name in loaded)
        indirect = {v.arg.buffer for v in kernel.values if v.op == "load" and v.arg.indirect}
        self.extent_buffers = tuple(name for name in self.c_names if name in indirect)
        self.size_names = {s: _size_name(s.name) for s in kernel.size_symbols}
        self.substitution: dict[sympy.Symbol, sympy.Expr] = {}
        self.symbol_names: dict[sympy.Symbol, str] = dict(self.size_names)
        # The variables a lane pass (`_reduction_pass`) reduces over, and their extent: the
        # reduction's, or a nested kernel's inner ones.
        self.lane_vars = [reduction_var(k) for k in range(len(kernel.reduction_ranges))]
        self.lane_work = sympy.Mul(*kernel.reduction_ranges)

    # -- the whole source ------------------------------------------------------------

    def generate(self) -> Generated:
        kernel = self.kernel
        if kernel.inner_ranges:
            body = self._nested_body()
        elif kernel.reduction_ranges:
            body = self._reduction_body()
        else:
            body = self._pointwise_body()
        ir_lines = str(kernel).splitlines()[1:]  # the name is not part of the program
        header = [f"// memopt C++ kernel ({kernel.kind}), from the Kernel IR:"]
        header += [f"// {line}" for line in ir_lines]
        source = "\n".join(
            [
                *header,
                PRELUDE.strip(),
                "",
                f'extern "C" int32_t {FUNCTION_NAME}({self._parameters()}) {{',
                *_indent(body, 1),
                "  return mo_take_error();",
                "}",
                "",
                *self._packed_entry(),
            ]
        )
        signature = Signature(
            snapshot_outputs=self.snapshots,
            extent_buffers=self.extent_buffers,
            size_names=tuple(s.name for s in self.kernel.size_symbols),
        )
        return Generated(source, signature)

    def _packed_entry(self) -> list[str]:
        """FUNCTION_NAME called with its arguments unpacked from two arrays."""
        pointers = []
        for buffer in self.kernel.inputs:
            pointers.append(f"const {ops.STORAGE_TYPES[buffer.dtype]}*")
        for buffer in self.kernel.outputs:
            pointers.append(f"{ops.STORAGE_TYPES[buffer.dtype]}*")
        for k in self.snapshots:
            pointers.append(f"const {ops.STORAGE_TYPES[self.kernel.outputs[k].dtype]}*")
        arguments = [f"({kind})p[{k}]" for k, kind in enumerate(pointers)]
        integers = len(self.extent_buffers) + len(self.kernel.size_symbols)
        arguments += [f"s[{k}]" for k in range(integers)]
        return [
            f'extern "C" int32_t {PACKED_NAME}(void* const* p, const int64_t* s) {{',
            f"  (void)p; (void)s; return {FUNCTION_NAME}({', '.join(arguments)});",
            "}",
            "",
        ]

    def _parameters(self) -> str:
        params = []
        for buffer in self.kernel.inputs:
            element = ops.STORAGE_TYPES[buffer.dtype]
            params.append(f"const {element}* __restrict__ {self.c_names[buffer.name]}")
        for buffer in self.kernel.outputs:
            element = ops.STORAGE_TYPES[buffer.dtype]
            params.append(f"{element}* __restrict__ {self.c_names[buffer.name]}")
        for k in self.snapshots:
            buffer = self.kernel.outputs[k]
            element = ops.STORAGE_TYPES[buffer.dtype]
            params.append(f"const {element}* __restrict__ {self.c_names[buffer.name]}_before")
        params += [f"int64_t {self.c_names[name]}_extent" for name in self.extent_buffers]
        params += [f"int64_t {self.size_names[s]}" for s in self.kernel.size_symbols]
        return ", ".join(params) or "void"

    # -- pointwise skeleton ----------------------------------------------------------

    def _pointwise_body(self) -> list[str]:
        kernel = self.kernel
        variables = [index_var(k) for k in range(len(kernel.ranges))]
        ranges = dict(zip(variables, kernel.ranges))
        if not variables:  # a 0-d kernel: one point
            inner: list[sympy.Symbol] = []
        else:
            inner = planning.innermost_block(
                variables, ranges, self._expressions(), kernel.stores[0]
            )
        outer = [v for v in variables if v not in inner]
        if inner:
            self.substitution = {v: sympy.Integer(0) for v in inner[:-1]}
            self.substitution[inner[-1]] = _J
        self.symbol_names.update({v: v.name for v in outer})
        self.symbol_names[_J] = "j"
        extent = sympy.Mul(*(ranges[v] for v in inner))
        rows = sympy.Mul(*(ranges[v] for v in outer))
        inner_set = set(inner)

        def varies(value: Value) -> bool:
            return bool(value.symbols & inner_set)

        loop = _Loop(_J, "o", extent=extent, varying=frozenset(inner))
        row_values = [v for v in kernel.values if not varies(v)]
        full_values = [v for v in kernel.values if varies(v)]
        row_lines = [self._value_line(v, _Loop(None, "o")) for v in row_values]
        loop_lines = [self._value_line(v, loop) for v in full_values]
        loop_lines += [self._store_line(s, loop) for s in kernel.stores]

        loads = [v.arg.index for v in kernel.values if v.op == "load" and not v.arg.indirect]
        tile = planning.transposed_var(outer, inner, loads)
        if tile is not None:
            return self._tiled_body(inner, outer, tile, ranges, row_lines, loop, loop_lines)
        p = CppIndexPrinter(self.symbol_names)
        lines = [f"const int64_t n_j = {p(extent)};  // innermost: {_names(inner) or 'one point'}"]
        lines.append(f"const int64_t n_rows = {p(rows)};  // rows: {_names(outer) or 'one'}")
        chunked = not (extent.is_Integer and int(extent) <= 4096)
        if chunked:
            lines.append("const int64_t n_chunks = (n_j + MO_CHUNK - 1) / MO_CHUNK;")
            tasks = "n_rows * n_chunks"
        else:
            tasks = "n_rows"
        lines += _parallel("for schedule(static)", rows * extent, "n_rows * n_j")
        lines.append(f"for (int64_t task = 0; task < {tasks}; ++task) {{")
        body: list[str] = []
        if chunked:
            body.append("const int64_t row = task / n_chunks;")
            body.append("const int64_t j_begin = (task - row * n_chunks) * MO_CHUNK;")
            body.append("const int64_t j_end = mo_imin(j_begin + MO_CHUNK, n_j);")
        else:
            body.append("const int64_t row = task;")
        body += self._decompose("row", outer, ranges)
        body += row_lines + loop.hoisted
        begin, end = ("j_begin", "j_end") if chunked else ("0", "n_j")
        body.append("#pragma omp simd")
        body.append(f"for (int64_t j = {begin}; j < {end}; ++j) {{")
        body += _indent(loop_lines, 1)
        body.append("}")
        lines += _indent(body, 1)
        lines.append("}")
        return lines

    def _tiled_body(self, inner, outer, tile, ranges, row_lines, loop, loop_lines) -> list[str]:
        """A transposition in tiles: MO_TILE values of `tile` (which a load is contiguous in)
        around MO_TILE_J values of the innermost loop (which the store is contiguous in), so
        the strided load reads a few sequential streams (prelude.py has the measurements)."""
        row_vars = [v for v in outer if v is not tile]
        p = CppIndexPrinter(self.symbol_names)
        extent = sympy.Mul(*(ranges[v] for v in inner))
        rows = sympy.Mul(*(ranges[v] for v in row_vars))
        t = tile.name
        lines = [
            f"const int64_t n_j = {p(extent)};  // innermost: {_names(inner)}",
            f"const int64_t n_rows = {p(rows)};  // rows: {_names(row_vars) or 'one'}",
            f"const int64_t n_t = {p(ranges[tile])};  // tiled: {t}",
            "const int64_t n_tiles = (n_t + MO_TILE - 1) / MO_TILE;",
            "const int64_t n_chunks = (n_j + MO_TILE_J - 1) / MO_TILE_J;",
            *_parallel("for schedule(static)", rows * ranges[tile] * extent, "n_rows * n_t * n_j"),
            "for (int64_t task = 0; task < n_rows * n_tiles * n_chunks; ++task) {",
        ]
        body = [
            "const int64_t row = task / (n_tiles * n_chunks);",
            "const int64_t tile = task / n_chunks - row * n_tiles;",
            "const int64_t j_begin = (task % n_chunks) * MO_TILE_J;",
            "const int64_t j_end = mo_imin(j_begin + MO_TILE_J, n_j);",
            *self._decompose("row", row_vars, ranges),
            f"const int64_t {t}_end = mo_imin((tile + 1) * MO_TILE, n_t);",
            f"for (int64_t {t} = tile * MO_TILE; {t} < {t}_end; ++{t}) {{",
            *_indent([*row_lines, *loop.hoisted, "#pragma omp simd"], 1),
            "  for (int64_t j = j_begin; j < j_end; ++j) {",
            *_indent(loop_lines, 2),
            "  }",
            "}",
        ]
        return lines + _indent(body, 1) + ["}"]

    # -- reduction skeleton ----------------------------------------------------------

    def _reduction_body(self) -> list[str]:
        kernel = self.kernel
        row_vars = [index_var(k) for k in range(len(kernel.ranges))]
        red_vars = [reduction_var(k) for k in range(len(kernel.reduction_ranges))]
        ranges = dict(zip(row_vars, kernel.ranges))
        red_ranges = dict(zip(red_vars, kernel.reduction_ranges))
        inner = planning.merge_block(red_vars, red_ranges, self._expressions())
        outer_red = [v for v in red_vars if v not in inner]
        self.substitution = {v: sympy.Integer(0) for v in inner[:-1]}
        self.substitution[inner[-1]] = _R
        self.symbol_names.update({v: v.name for v in (*row_vars, *outer_red)})
        self.symbol_names[_R] = "r"
        p = CppIndexPrinter(self.symbol_names)
        extent = sympy.Mul(*(red_ranges[v] for v in inner))
        self.inner_extent = extent
        rows = sympy.Mul(*kernel.ranges)
        work = sympy.Mul(*kernel.reduction_ranges)

        if planning.column_reduction(kernel, row_vars, red_vars):
            if rows.is_Integer and int(rows) <= SPLIT_COLUMNS:
                return self._split_column_body(row_vars, ranges, outer_red, red_ranges, extent)
            return self._column_body(row_vars, ranges, outer_red, red_ranges, p(extent))
        depth = planning.reduction_depths(kernel)
        passes = planning.plan_passes(kernel, depth)
        plans = planning.plan_row_caches(kernel, passes)
        cached = [v for plan in plans for v in plan.saves]
        lines = [f"const int64_t n_rows = {p(rows)};  // rows: {_names(row_vars) or 'one'}"]
        lines.append(f"const int64_t n_r = {p(extent)};  // innermost: {_names(inner)}")
        lines.append("const int64_t n_blocked = n_r - n_r % MO_LANES;  // whole lane blocks")
        domain, printed = rows * work, f"n_rows * {p.at(work, ATOM)}"
        body = self._decompose("row", row_vars, ranges)
        computed: set[Value] = set()
        for level, ((reductions, stores), plan) in enumerate(zip(passes, plans)):
            # Row values whose reductions are all done: once per row, before the next pass.
            ready = [
                v
                for v in kernel.values
                if v.is_row and v.op != "reduce" and v not in computed and depth[v] <= level
            ]
            body += [self._value_line(v, _Loop(None, "o")) for v in ready]
            computed.update(ready)
            body += self._reduction_pass(level + 1, reductions, stores, plan, outer_red, red_ranges)
            computed.update(reductions)
        rest = [v for v in kernel.values if v.is_row and v not in computed]
        body += [self._value_line(v, _Loop(None, "o")) for v in rest]
        body += [self._store_line(s, _Loop(None, "o")) for s in kernel.stores if s.is_row]
        row_loop = ["for (int64_t row = 0; row < n_rows; ++row) {", *_indent(body, 1), "}"]
        if not cached:
            return [*lines, *_parallel("for schedule(static)", domain, printed), *row_loop]
        # Values a later pass needs again and that cost more to recompute than to reread
        # (exp in softmax) are kept for the row in per-thread scratch, in L1/L2.
        lines.append(f"const int64_t n_flat = {p(work)};  // the reduction domain of one row")
        lines += _parallel("", domain, printed)
        lines.append("{")
        scratch = []
        for value in cached:
            ctype = ops.compute_type(value.dtype)
            scratch.append(
                f"{ctype}* __restrict__ {self.names[value]}_row = "
                f"({ctype}*)malloc(sizeof({ctype}) * (n_flat > 0 ? n_flat : 1));"
            )
        lines += _indent(scratch, 1)
        lines.append("  #pragma omp for schedule(static)")
        lines += _indent(row_loop, 1)
        lines += [f"  free({self.names[value]}_row);" for value in cached]
        lines.append("}")
        return lines

    def _column_body(
        self,
        row_vars: list[sympy.Symbol],
        ranges: dict[sympy.Symbol, sympy.Expr],
        outer_red: list[sympy.Symbol],
        red_ranges: dict[sympy.Symbol, sympy.Expr],
        extent: str,
    ) -> list[str]:
        """A reduction down columns (planning.column_reduction): MO_COLUMNS adjacent rows
        at a time, one row per vector lane, each with its own accumulator, so every load
        along the reduction reads consecutive elements; then each row's result and stores.

        A row accumulates its elements in order, in the accumulator type of the row skeleton
        (double for float sums), so the result is as accurate as the row skeleton's."""
        kernel = self.kernel
        p = CppIndexPrinter(self.symbol_names)
        rows = sympy.Mul(*kernel.ranges)
        work = sympy.Mul(*kernel.reduction_ranges)
        reductions, before, after = self._single_pass_values()
        loop = _Loop(None, "o")
        lane = ["const int64_t row = rb + l;", *self._decompose("row", row_vars, ranges)]

        inits, updates, results = [], [], []
        lines = [
            f"const int64_t n_rows = {p(rows)};  // rows: {_names(row_vars)}",
            f"const int64_t n_r = {extent};  // the reduction, rows in the lanes",
            *_parallel("for schedule(static)", rows * work, f"n_rows * {p.at(work, ATOM)}"),
            "for (int64_t rb = 0; rb < n_rows; rb += MO_COLUMNS) {",
            "  const int64_t n_l = n_rows - rb < MO_COLUMNS ? n_rows - rb : MO_COLUMNS;",
        ]
        for value in reductions:
            name, operand = self.names[value], value.args[0]
            acc = ops.accumulator_dtype(value.arg, operand.dtype)
            identity = ops.reduction_identity(value.arg, operand.dtype)
            lines.append(f"  {ops.COMPUTE_TYPES[acc]} {name}_acc[MO_COLUMNS];")
            inits.append(f"{name}_acc[l] = {identity};")
            updates.append(
                ops.REDUCTION_UPDATES[value.arg][0].format(
                    acc=f"{name}_acc[l]", v=ops.convert(self.names[operand], operand.dtype, acc)
                )
            )
            ctype = ops.compute_type(value.dtype)
            results.append(
                f"const {ctype} {name} = {ops.convert(f'{name}_acc[l]', acc, value.dtype)};"
            )
        lines.append(f"  for (int l = 0; l < MO_COLUMNS; ++l) {{ {' '.join(inits)} }}")
        element = [self._value_line(v, loop) for v in before]
        element += [self._store_line(st, loop) for st in kernel.stores if not st.is_row]
        inner = [
            "for (int64_t r = 0; r < n_r; ++r) {",
            "  #pragma omp simd",
            "  for (int64_t l = 0; l < n_l; ++l) {",
            *_indent([*lane, *element, *updates], 2),
            "  }",
            "}",
        ]
        for var in reversed(outer_red):
            bound = p.at(red_ranges[var], ATOM)
            inner = [
                f"for (int64_t {var.name} = 0; {var.name} < {bound}; ++{var.name}) {{",
                *_indent(inner, 1),
                "}",
            ]
        lines += _indent(inner, 1)
        row_inputs = [v for v in before if v.is_row]  # what the results are combined with
        finish = [*lane, *(self._value_line(v, loop) for v in row_inputs), *results]
        finish += [self._value_line(v, loop) for v in after]
        finish += [self._store_line(st, loop) for st in kernel.stores if st.is_row]
        lines += [
            "  for (int64_t l = 0; l < n_l; ++l) {",
            *_indent(finish, 2),
            "  }",
            "}",
        ]
        return lines

    def _single_pass_values(self) -> tuple[list[Value], list[Value], list[Value]]:
        """A single-pass reduction's values: the reductions, what they read (depth 0), and
        what is computed from their results."""
        values = self.kernel.values
        depth = planning.reduction_depths(self.kernel)
        reductions = [v for v in values if v.op == "reduce"]
        before = [v for v in values if v.op != "reduce" and depth[v] == 0]
        after = [v for v in values if v.op != "reduce" and depth[v] > 0]
        return reductions, before, after

    def _split_column_body(
        self,
        row_vars: list[sympy.Symbol],
        ranges: dict[sympy.Symbol, sympy.Expr],
        outer_red: list[sympy.Symbol],
        red_ranges: dict[sympy.Symbol, sympy.Expr],
        extent: sympy.Expr,
    ) -> list[str]:
        """A column reduction over few columns (at most MO_SPLIT_COLUMNS), split along the
        reduction: each thread takes a run of the reduction's rows and streams them whole,
        every column in the vector lanes with its own accumulator (per-thread scratch);
        after a barrier the threads combine the partial results, in thread order, column
        by column, and compute and store each column's results.

        Blocks of MO_COLUMNS columns down all rows (`_column_body`) read one short run per
        row, a page apart when rows are long: on data that is not in cache every run waits
        for memory on its own, with a TLB miss (GELU backward + bias gradient over 1024 x
        2048 floats, cold: see docs/architecture.md). Here each thread reads memory in
        order. The same accumulator type as the other skeletons (double for float sums); a
        column's sum is its threads' partial sums, each in order, added in thread order."""
        kernel = self.kernel
        p = CppIndexPrinter(self.symbol_names)
        rows = sympy.Mul(*kernel.ranges)
        work = sympy.Mul(*kernel.reduction_ranges)
        reductions, before, after = self._single_pass_values()
        loop = _Loop(None, "o")
        lane = self._decompose("row", row_vars, ranges)
        flat = extent * sympy.Mul(*(red_ranges[v] for v in outer_red))
        lines = [
            f"const int64_t n_rows = {p(rows)};  // columns: {_names(row_vars)}",
            f"const int64_t n_r = {p(extent)};  // innermost reduction",
            f"const int64_t n_q = {p(flat)};  // the whole reduction, split between threads",
            f"int n_threads = n_rows * {p.at(work, ATOM)} >= MO_PARALLEL_WORK "
            "? omp_get_max_threads() : 1;",
            "if (n_threads > n_q) n_threads = n_q > 0 ? (int)n_q : 1;",
        ]
        scratch, inits, updates, combines, results = [], [], [], [], []
        for value in reductions:
            name, operand = self.names[value], value.args[0]
            acc = ops.accumulator_dtype(value.arg, operand.dtype)
            ctype = ops.COMPUTE_TYPES[acc]
            identity = ops.reduction_identity(value.arg, operand.dtype)
            update, combine = ops.REDUCTION_UPDATES[value.arg]
            lines.append(
                f"{ctype}* __restrict__ {name}_part = "
                f"({ctype}*)malloc(sizeof({ctype}) * n_threads * n_rows);"
            )
            scratch.append(f"{ctype}* __restrict__ {name}_acc = {name}_part + t * n_rows;")
            inits.append(f"{name}_acc[row] = {identity};")
            updates.append(
                update.format(
                    acc=f"{name}_acc[row]",
                    v=ops.convert(self.names[operand], operand.dtype, acc),
                )
            )
            combines += [
                f"{ctype} {name}_all = {name}_part[row];",
                "for (int u = 1; u < nt; ++u) {",
                "  " + combine.format(out=f"{name}_all", acc=f"{name}_part[u * n_rows + row]"),
                "}",
            ]
            results.append(
                f"const {ops.compute_type(value.dtype)} {name} = "
                f"{ops.convert(f'{name}_all', acc, value.dtype)};"
            )
        # The flat reduction row q as the outer reduction variables and the innermost r.
        position = ["const int64_t r = q % n_r;"]
        if outer_red:
            position.append("int64_t rest = q / n_r;")
        for var in reversed(outer_red):
            bound = p.at(red_ranges[var], ATOM)
            position += [
                f"const int64_t {var.name} = rest % {bound};",
                f"rest = rest / {bound};",
            ]
        element = [self._value_line(v, loop) for v in before]
        element += [self._store_line(st, loop) for st in kernel.stores if not st.is_row]
        row_inputs = [v for v in before if v.is_row]  # what the results are combined with
        finish = [*lane, *(self._value_line(v, loop) for v in row_inputs), *combines, *results]
        finish += [self._value_line(v, loop) for v in after]
        finish += [self._store_line(st, loop) for st in kernel.stores if st.is_row]
        body = [
            "const int t = omp_get_thread_num();",
            "const int nt = omp_get_num_threads();  // the team may be smaller than asked",
            *scratch,
            "#pragma omp simd",
            "for (int64_t row = 0; row < n_rows; ++row) {",
            *_indent(inits, 1),
            "}",
            "const int64_t q_end = n_q * (t + 1) / nt;",
            "for (int64_t q = n_q * t / nt; q < q_end; ++q) {",
            *_indent(position, 1),
            "  #pragma omp simd",
            "  for (int64_t row = 0; row < n_rows; ++row) {",
            *_indent([*lane, *element, *updates], 2),
            "  }",
            "}",
            "#pragma omp barrier",
            "#pragma omp for schedule(static)",
            "for (int64_t row = 0; row < n_rows; ++row) {",
            *_indent(finish, 1),
            "}",
        ]
        lines += ["#pragma omp parallel num_threads(n_threads)", "{", *_indent(body, 1), "}"]
        lines += [f"free({self.names[value]}_part);" for value in reductions]
        return lines

    def _reduction_pass(
        self,
        level: int,
        reductions: list[Value],
        stores: list[Store],
        plan: planning.PassPlan,
        outer_red: list[sympy.Symbol],
        red_ranges: dict[sympy.Symbol, sympy.Expr],
    ) -> list[str]:
        what = [f"{self.names[v]} = {v.arg}" for v in reductions]
        what += [f"store {s.buffer}" for s in stores]
        lines = [f"// pass {level}: {', '.join(what)}"]
        loop = _Loop(_R, f"o{level}_", extent=self.inner_extent, varying=frozenset(self.lane_vars))
        p = CppIndexPrinter(self.symbol_names)
        flat = sympy.Integer(0)
        step = sympy.Integer(1)
        for var in reversed(self.lane_vars):
            if var in outer_red:
                flat += var * step
            step *= red_ranges[var]
        # With the trailing reduction variables merged into r, r is their row-major offset.
        flat_text = p(flat + _R) if flat != 0 else "r"
        value_lines = []
        for value in plan.values:
            if value in plan.reads:
                ctype = ops.compute_type(value.dtype)
                name = self.names[value]
                value_lines.append(f"const {ctype} {name} = {name}_row[{flat_text}];")
                continue
            value_lines.append(self._value_line(value, loop))
            if value in plan.saves:
                value_lines.append(f"{self.names[value]}_row[{flat_text}] = {self.names[value]};")
        store_lines = [self._store_line(s, loop) for s in stores]

        accumulators = []
        for value in reductions:
            name = self.names[value]
            acc = self._lane_accumulator(value)
            identity = ops.literal(kernel_ir.reduction_identity(value.arg, acc), acc)
            ctype = ops.COMPUTE_TYPES[acc]
            lines.append(f"{ctype} {name}_acc[MO_LANES];")
            if value.arg in ("argmax", "argmin"):
                lines.append(f"int64_t {name}_idx[MO_LANES];")
                init = f"{name}_acc[l] = {identity}; {name}_idx[l] = 0;"
            else:
                init = f"{name}_acc[l] = {identity};"
            accumulators.append(init)
        if accumulators:
            lines.append(f"for (int l = 0; l < MO_LANES; ++l) {{ {' '.join(accumulators)} }}")

        def updates(lane: str) -> list[str]:
            result = []
            for value in reductions:
                name, operand = self.names[value], value.args[0]
                acc = self._lane_accumulator(value)
                update = ops.REDUCTION_UPDATES[value.arg][0].format(
                    acc=f"{name}_acc[{lane}]",
                    idx=f"{name}_idx[{lane}]",
                    v=ops.convert(self.names[operand], operand.dtype, acc),
                    i=flat_text,
                )
                result.append(update)
            return result

        loop_lines: list[str] = []
        if reductions:
            loop_lines.append("for (int64_t rb = 0; rb < n_blocked; rb += MO_LANES) {")
            loop_lines.append("  #pragma omp simd")
            loop_lines.append("  for (int l = 0; l < MO_LANES; ++l) {")
            loop_lines.append("    const int64_t r = rb + l;")
            loop_lines += _indent(value_lines + store_lines + updates("l"), 2)
            loop_lines.append("  }")
            loop_lines.append("}")
            loop_lines.append("for (int64_t r = n_blocked; r < n_r; ++r) {  // the tail: lane 0")
            loop_lines += _indent(value_lines + store_lines + updates("0"), 1)
            loop_lines.append("}")
        else:
            loop_lines.append("#pragma omp simd")
            loop_lines.append("for (int64_t r = 0; r < n_r; ++r) {")
            loop_lines += _indent(value_lines + store_lines, 1)
            loop_lines.append("}")
        loop_lines = loop.hoisted + loop_lines
        for var in reversed(outer_red):
            bound = p.at(red_ranges[var], ATOM)
            loop_lines = [
                f"for (int64_t {var.name} = 0; {var.name} < {bound}; ++{var.name}) {{",
                *_indent(loop_lines, 1),
                "}",
            ]
        lines += loop_lines

        for value in reductions:
            name = self.names[value]
            acc = self._lane_accumulator(value)
            ctype = ops.COMPUTE_TYPES[acc]
            combine = ops.REDUCTION_UPDATES[value.arg][1].format(
                out=f"{name}_total",
                out_idx=f"{name}_total_idx",
                acc=f"{name}_acc[l]",
                acc_idx=f"{name}_idx[l]",
            )
            if value.arg in ("argmax", "argmin"):
                lines.append(f"{ctype} {name}_total = {name}_acc[0];")
                lines.append(f"int64_t {name}_total_idx = {name}_idx[0];")
                lines.append(f"for (int l = 1; l < MO_LANES; ++l) {combine}")
                result = f"{name}_total_idx"
                held = torch.int64
            else:
                identity = ops.literal(kernel_ir.reduction_identity(value.arg, acc), acc)
                lines.append(f"{ctype} {name}_total = {identity};")
                lines.append(f"for (int l = 0; l < MO_LANES; ++l) {combine}")
                result = f"{name}_total"
                held = acc
            ctype_out = ops.compute_type(value.dtype)
            lines.append(f"const {ctype_out} {name} = {ops.convert(result, held, value.dtype)};")
        return lines

    # -- nested reduction skeleton ---------------------------------------------------

    def _nested_body(self) -> list[str]:
        """A kernel with nested reductions, in two phases.

        Phase 1, one task per (row, chunk of the outer reduction): for each outer element
        of the chunk (in order of the flat outer index f), the values that vary with it, one
        lane pass over the inner variables per dependency level of the inner reductions
        (`_reduction_pass`, as a row of the reduction skeleton: a logsumexp takes two), the
        values computed from their results, and an update of each outer reduction's scalar
        accumulator; the chunk's partial results go to per-task scratch. A row is one chunk
        unless there are fewer rows than threads (`x.exp().sum(-1).max()`: one row), where
        each row is split into one chunk per thread.

        Phase 2, per row: the chunks' partial results combined in order (so argmin's first
        index wins a tie), the row values and the row stores.

        The outer level is one pass (lower.py forms no other nested kernel): no reduction
        reads an outer reduction's result."""
        kernel = self.kernel
        row_vars = [index_var(k) for k in range(len(kernel.ranges))]
        red_vars = [reduction_var(k) for k in range(len(kernel.reduction_ranges))]
        q_vars = [inner_var(k) for k in range(len(kernel.inner_ranges))]
        ranges = dict(zip(row_vars, kernel.ranges))
        red_ranges = dict(zip(red_vars, kernel.reduction_ranges))
        q_ranges = dict(zip(q_vars, kernel.inner_ranges))
        inner = planning.merge_block(q_vars, q_ranges, self._expressions())
        outer_q = [v for v in q_vars if v not in inner]
        self.substitution = {v: sympy.Integer(0) for v in inner[:-1]}
        self.substitution[inner[-1]] = _R
        self.symbol_names.update({v: v.name for v in (*row_vars, *red_vars, *outer_q)})
        self.symbol_names[_R] = "r"
        self.lane_vars = q_vars
        self.lane_work = sympy.Mul(*kernel.inner_ranges)
        self.inner_extent = sympy.Mul(*(q_ranges[v] for v in inner))
        p = CppIndexPrinter(self.symbol_names)

        depth = planning.reduction_depths(kernel)
        inner_reductions = [v for v in kernel.values if v.op == INNER_REDUCE]
        outer_reductions = [v for v in kernel.values if v.op == "reduce"]
        structural = ("reduce", INNER_REDUCE)
        after_outer: dict[Value, bool] = {}  # whether a value reads an outer reduction
        for value in kernel.values:
            if value.op in structural and after_outer[value.args[0]]:
                raise Unsupported(f"kernel {kernel.name}: the outer reduction needs two passes")
            after_outer[value] = value.op == "reduce" or any(after_outer[a] for a in value.args)
        q_set = set(q_vars)
        outer_level = [
            v
            for v in kernel.values
            if not v.is_row and not v.symbols & q_set and v.op not in structural
        ]
        rows_before = [v for v in kernel.values if v.is_row and v.op != "reduce" and not depth[v]]
        rows_after = [v for v in kernel.values if v.is_row and v.op != "reduce" and depth[v]]
        row = _Loop(None, "o")
        row_lines = [self._value_line(v, row) for v in rows_before]

        # Per outer element of a chunk.
        per_element = self._decompose("f", red_vars, red_ranges)
        done = 0  # the inner levels computed so far
        for level in range(1, max((depth[v] for v in inner_reductions), default=0) + 1):
            per_element += [
                self._value_line(v, row) for v in outer_level if done <= depth[v] < level
            ]
            reductions = [v for v in inner_reductions if depth[v] == level]
            # The values varying along q that this pass's reductions read (an earlier
            # pass's values are computed again: no row cache here).
            needed: set[Value] = set()
            stack = [v.args[0] for v in reductions]
            while stack:
                value = stack.pop()
                if value in needed or not value.symbols & q_set:
                    continue
                needed.add(value)
                stack.extend(value.args)
            values = [v for v in kernel.values if v in needed]
            plan = planning.PassPlan(values, frozenset(), ())
            per_element += self._reduction_pass(level, reductions, [], plan, outer_q, q_ranges)
            done = level
        per_element += [self._value_line(v, row) for v in outer_level if depth[v] >= done]

        # Each outer reduction: a scalar accumulator per chunk, its partial result in
        # scratch (`_part`, and `_part_idx` for argmax/argmin), combined per row.
        scratch: list[tuple[str, str]] = []  # (name, C++ type)
        inits, chunk_ends, totals, finals = [], [], [], []
        for value in outer_reductions:
            name, operand = self.names[value], value.args[0]
            acc = ops.accumulator_dtype(value.arg, operand.dtype)
            ctype = ops.COMPUTE_TYPES[acc]
            identity = ops.literal(kernel_ir.reduction_identity(value.arg, acc), acc)
            update, combine = ops.REDUCTION_UPDATES[value.arg]
            per_element.append(
                update.format(
                    acc=f"{name}_acc",
                    idx=f"{name}_idx",
                    v=ops.convert(self.names[operand], operand.dtype, acc),
                    i="f",
                )
            )
            inits.append(f"{ctype} {name}_acc = {identity};")
            chunk_ends.append(f"{name}_part[task] = {name}_acc;")
            scratch.append((f"{name}_part", ctype))
            totals.append(f"{ctype} {name}_total = {name}_part[row * n_chunks];")
            result, held = f"{name}_total", acc
            if value.arg in ("argmax", "argmin"):
                inits.append(f"int64_t {name}_idx = 0;")
                chunk_ends.append(f"{name}_part_idx[task] = {name}_idx;")
                scratch.append((f"{name}_part_idx", "int64_t"))
                totals.append(f"int64_t {name}_total_idx = {name}_part_idx[row * n_chunks];")
                result, held = f"{name}_total_idx", torch.int64
            combined = combine.format(
                out=f"{name}_total",
                out_idx=f"{name}_total_idx",
                acc=f"{name}_part[row * n_chunks + c]",
                acc_idx=f"{name}_part_idx[row * n_chunks + c]",
            )
            totals.append(f"for (int64_t c = 1; c < n_chunks; ++c) {combined}")
            ctype_out = ops.compute_type(value.dtype)
            finals.append(f"const {ctype_out} {name} = {ops.convert(result, held, value.dtype)};")

        phase1 = [
            "const int64_t row = task / n_chunks;",
            "const int64_t chunk = task - row * n_chunks;",
            *self._decompose("row", row_vars, ranges),
            *row_lines,
            *inits,
            "const int64_t f_end = n_outer * (chunk + 1) / n_chunks;",
            "for (int64_t f = n_outer * chunk / n_chunks; f < f_end; ++f) {",
            *_indent(per_element, 1),
            "}",
            *chunk_ends,
        ]
        phase2 = [*self._decompose("row", row_vars, ranges), *row_lines, *totals, *finals]
        phase2 += [self._value_line(v, row) for v in rows_after]
        phase2 += [self._store_line(s, row) for s in kernel.stores]

        rows = sympy.Mul(*kernel.ranges)
        outer = sympy.Mul(*kernel.reduction_ranges)
        work = outer * self.lane_work
        lines = [
            f"const int64_t n_rows = {p(rows)};  // rows: {_names(row_vars) or 'one'}",
            f"const int64_t n_outer = {p(outer)};  // the outer reduction: {_names(red_vars)}",
            f"const int64_t n_r = {p(self.inner_extent)};  // innermost: {_names(inner)}",
            "const int64_t n_blocked = n_r - n_r % MO_LANES;  // whole lane blocks",
            f"const bool threaded = n_rows * {p.at(work, ATOM)} >= MO_PARALLEL_WORK;",
            "int64_t n_chunks = threaded && n_rows < omp_get_max_threads() "
            "? omp_get_max_threads() : 1;",
            "if (n_chunks > n_outer) n_chunks = n_outer > 0 ? n_outer : 1;",
        ]
        lines += [
            f"{ctype}* __restrict__ {name} = ({ctype}*)malloc(sizeof({ctype}) * n_rows * n_chunks);"
            for name, ctype in scratch
        ]
        lines += [
            "#pragma omp parallel for schedule(static) if (threaded)",
            "for (int64_t task = 0; task < n_rows * n_chunks; ++task) {",
            *_indent(phase1, 1),
            "}",
            "#pragma omp parallel for schedule(static) if (threaded)",
            "for (int64_t row = 0; row < n_rows; ++row) {",
            *_indent(phase2, 1),
            "}",
        ]
        lines += [f"free({name});" for name, _ in scratch]
        return lines

    def _lane_accumulator(self, value: Value) -> torch.dtype:
        """What a reduction of the row skeleton accumulates in: `ops.accumulator_dtype`,
        except that a float32 sum over a short row of known length (at most SHORT_ROW
        elements, so at most SHORT_ROW / MO_LANES per lane accumulator) stays in float32,
        as ATen's vectorized softmax and layer norm sum. Converting every element to double
        cost a fifth of a 256-wide softmax's time (measured); over 64 terms a float lane
        loses at most 64 ulp, typically 8, then the lanes are summed."""
        operand = value.args[0]
        acc = ops.accumulator_dtype(value.arg, operand.dtype)
        work = self.lane_work
        if (
            acc == torch.float64
            and kernel_ir.compute_dtype(operand.dtype) == torch.float32
            and work.is_Integer
            and int(work) <= SHORT_ROW
        ):
            return torch.float32
        return acc

    # -- the walk: one line per Value ------------------------------------------------

    def _expressions(self) -> list[sympy.Expr]:
        """Every index expression of the kernel: loads, index values, stores."""
        exprs = [v.arg.index for v in self.kernel.values if v.op == "load"]
        exprs += [v.arg for v in self.kernel.values if v.op == "index"]
        exprs += [s.index for s in self.kernel.stores]
        return exprs

    def _value_line(self, value: Value, loop: _Loop) -> str:
        ctype = ops.compute_type(value.dtype)
        return f"const {ctype} {self.names[value]} = {self.expression(value, loop)};"

    def const_expr(self, value: Value, loop: _Loop) -> str:
        return ops.constant(value.arg, value.dtype)

    def index_expr(self, value: Value, loop: _Loop) -> str:
        return ops.cast_expr(self._index(value.arg, loop, {}), torch.int64, value.dtype)

    def cast_expr(self, value: Value, loop: _Loop) -> str:
        (arg,) = value.args
        return ops.cast_expr(self.names[arg], arg.dtype, value.dtype)

    def pointwise_expr(self, value: Value, loop: _Loop) -> str:
        return ops.pointwise_expr(value, [self.names[a] for a in value.args])

    def reduce_expr(self, value: Value, loop: _Loop) -> str:
        """A reduction in a kernel without reduction variables reduces one element (the
        skeleton computes every other reduction in its pass)."""
        if self.kernel.reduction_ranges:
            raise AssertionError("reductions are computed by their pass")
        (operand,) = value.args
        name = self.names[operand]
        if value.arg in ("argmax", "argmin"):
            return ops.literal(0, value.dtype)
        if value.arg in ("any", "all"):
            return ops.convert(
                ops.convert(name, operand.dtype, torch.bool), torch.bool, value.dtype
            )
        return ops.convert(name, operand.dtype, value.dtype)

    def load_expr(self, value: Value, loop: _Loop) -> str:
        buffer_name, index, indirect, masked = value.arg
        dtype = self.buffers[buffer_name].dtype
        pointer = self.c_names[buffer_name]
        if buffer_name in {b.name for b in self.kernel.outputs}:
            pointer += "_before"
        bound = {s: f"(int64_t){self.names[v]}" for s, v in zip(indirect, value.args)}
        offset = self._index(index, loop, bound)
        if indirect:
            checked = None if masked else self._row_checked(value, loop, bound)
            offset = checked or f"mo_checked({offset}, {self.c_names[buffer_name]}_extent)"
        element = ops.load_expr(f"{pointer}[{offset}]", dtype)
        # A load converts the element to its Value's dtype (rounding, for 16-bit floats).
        loaded = ops.cast_expr(element, dtype, value.dtype) if dtype != value.dtype else element
        if masked:
            mask = self.names[value.args[-1]]
            zero = ops.literal(0, value.dtype)
            return f"(bool){mask} ? {loaded} : {zero}"
        return loaded

    def _row_checked(self, value: Value, loop: _Loop, bound: dict[sympy.Symbol, str]) -> str | None:
        """A gather whose data-dependent part is fixed for the whole loop (an embedding row:
        `table[r + 512 * id]`, the id loaded once per row) checked once per row, not per
        element: hoisted before the loop, the offsets at the loop's first and last values
        are checked against the buffer's extent; a bad row fails the kernel (MO_ERR_INDEX)
        and reads from offset 0 instead, which holds the whole loop's span (checked here,
        on static sizes). In the loop the load is then plain `base + stride * var`, which
        the compiler vectorizes as contiguous loads; a check per element is a branch, which
        keeps the loop scalar (an embedding + LayerNorm kernel: 1.59 ms -> 0.26 ms).
        None where that does not apply (the caller checks each element)."""
        buffer_name, index, indirect, _ = value.arg
        var = loop.var
        if var is None or loop.extent is None or not loop.varying:
            return None
        if any(v.symbols & loop.varying for v in value.args[: len(indirect)]):
            return None  # the looked-up index changes inside the loop
        expr = sympy.expand(sympy.sympify(index).xreplace(self.substitution))
        coefficient = linear_coefficient(expr, var)
        if coefficient is None or not coefficient.is_Integer or coefficient < 0:
            return None
        base = sympy.expand(expr - coefficient * var)
        allowed = (set(indirect) | set(self.symbol_names)) - {var, _R} - set(self.lane_vars)
        if not base.free_symbols <= allowed:
            return None  # it varies inside the pass (an outer reduction variable)
        buffer = self.buffers[buffer_name]
        span = sympy.sympify(loop.extent)
        sizes = [sympy.sympify(x) for x in (*buffer.shape, *buffer.stride)]
        if not span.is_Integer or not all(x.is_Integer for x in sizes) or int(span) < 1:
            return None
        if any(int(n) == 0 for n in buffer.shape):
            return None
        extent = 1 + sum((int(n) - 1) * int(st) for n, st in zip(buffer.shape, buffer.stride))
        last = int(coefficient) * (int(span) - 1)
        if last >= extent:
            return None  # offset 0 would not hold the span: check each element
        key = ("checked", buffer_name, base)
        name = loop.offsets.get(key)
        if name is None:
            name = f"{loop.prefix}g{len(loop.offsets)}"
            loop.offsets[key] = name
            p = CppIndexPrinter({**self.symbol_names, **bound})
            ext = f"{self.c_names[buffer_name]}_extent"
            loop.hoisted += [
                f"const int64_t {name}_lo = {p(base)};",
                f"const bool {name}_ok = {name}_lo >= 0 && {name}_lo + {last} < {ext};",
                f"if (!{name}_ok) mo_fail(MO_ERR_INDEX);",
                f"const int64_t {name} = {name}_ok ? {name}_lo : 0;",
            ]
        step = CppIndexPrinter(self.symbol_names)(var * coefficient)
        return f"{name} + {step}"

    def _store_line(self, store: Store, loop: _Loop) -> str:
        buffer = self.buffers[store.buffer]
        offset = self._index(store.index, loop, {})
        value = ops.store_expr(self.names[store.value], store.value.dtype, buffer.dtype)
        return f"{self.c_names[store.buffer]}[{offset}] = {value};"

    def _index(self, expr: sympy.Expr, loop: _Loop, bound: dict[sympy.Symbol, str]) -> str:
        """Print an index inside `loop`: a linear one as hoisted offset + stride * var."""
        expr = sympy.sympify(expr).xreplace(self.substitution)
        names = {**self.symbol_names, **bound}
        p = CppIndexPrinter(names)
        var = loop.var
        if var is None or var not in expr.free_symbols or bound:
            return p(expr)
        coefficient = linear_coefficient(expr, var)
        if coefficient is None:
            return p(expr)
        base = sympy.expand(expr - coefficient * var)
        if base == 0:
            offset = ""
        else:
            if base not in loop.offsets:
                name = f"{loop.prefix}{len(loop.offsets)}"
                loop.offsets[base] = name
                loop.hoisted.append(f"const int64_t {name} = {p(base)};")
            offset = loop.offsets[base] + " + "
        step = p(var * coefficient) if coefficient != 1 else p(var)
        return f"{offset}{step}"

    def _decompose(
        self, flat: str, variables: list[sympy.Symbol], ranges: dict[sympy.Symbol, sympy.Expr]
    ) -> list[str]:
        """Row-major index variables from a flat row number (once per row, not per element)."""
        position = sympy.Symbol(flat, integer=True, nonnegative=True)
        p = CppIndexPrinter({**self.symbol_names, position: flat})
        exprs = row_major(position, [ranges[v] for v in variables])
        return [f"const int64_t {var.name} = {p(expr)};" for var, expr in zip(variables, exprs)]


# -- names -------------------------------------------------------------------------------

# Names the skeletons declare; a buffer with one of these names is renamed buf<k>.
_RESERVED = {
    "j",
    "r",
    "l",
    "rb",
    "row",
    "task",
    "rest",
    "n_j",
    "n_r",
    "n_rows",
    "n_chunks",
    "n_blocked",
    "n_l",
    "n_t",
    "n_tiles",
    "tile",
    "j_begin",
    "j_end",
    "f",
    "f_end",
    "c",
    "chunk",
    "n_outer",
    "threaded",
}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _c_names(names: list[str]) -> dict[str, str]:
    """Buffer name -> a C++ parameter name (the IR's name when it is a safe identifier)."""
    result = {}
    for k, name in enumerate(names):
        # Generated names: v<k> values, o<k> offsets, i<k>/r<k>/q<k> variables, s<k> sizes.
        clash = name in _RESERVED or re.fullmatch(r"[viorqu]\d.*|s\d+|mo_.*|buf\d+", name)
        safe = _IDENTIFIER.fullmatch(name) and not keyword.iskeyword(name) and not clash
        result[name] = name if safe else f"buf{k}"
    return result


@functools.cache
def _size_name(name: str) -> str:
    if re.fullmatch(r"[su]\d+", name):
        return name
    return "size_" + re.sub(r"\W", "_", name)


def _parallel(construct: str, domain: sympy.Expr, printed: str) -> list[str]:
    """The `#pragma omp parallel` line of a kernel over `domain` points (`printed`: the same
    count as C++ reads it). Sizes known at generation decide there: below PARALLEL_WORK no
    pragma at all, since entering a region costs about 0.4 us even when its `if` clause is
    false (a 64-element kernel: 610 -> 193 ns a call, measured); at or above it, no clause.
    Symbolic sizes keep the clause, decided per call."""
    head = f"#pragma omp parallel {construct}".rstrip()
    if domain.is_Integer:
        return [] if int(domain) < PARALLEL_WORK else [head]
    return [f"{head} if ({printed} >= MO_PARALLEL_WORK)"]


def _names(variables: list[sympy.Symbol]) -> str:
    return ", ".join(v.name for v in variables)


def _indent(lines: list[str], levels: int) -> list[str]:
    pad = "  " * levels
    return [pad + line if line else line for line in lines]
