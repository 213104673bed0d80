"""Kernel IR: one fused kernel as data. Immutable, hashable, printable one line per value.

A Kernel iterates over a domain: pointwise index variables i0..in (`ranges`) and, for a
reduction kernel, reduction variables r0..rm (`reduction_ranges`). Its body is a DAG of
Values: loads (with a sympy index expression into a buffer, possibly indirect through
loaded values), constants, index expressions, pointwise ops, casts and reductions (over
all reduction variables). Stores write Values to output buffers at index expressions.

A Value that depends on a reduction variable is "full" (one per domain point); one that
does not is a "row" value (one per point of the pointwise domain). A Store of a row value
happens once per row; the backends derive this from the index expression, which then
contains no r variable.

Nested reductions (a reduction of a reduction's result over another axis: the minimum over
r of the sum over q): a kernel may have a second, inner level of reduction variables
q0..qk (`inner_ranges`). An `inner_reduce` reduces over all of them, and its result varies
with the rows and the outer reduction variables; a `reduce` then reduces over the outer
ones (r) and must not read a value that varies along q. Every store of such a kernel is a
row store: the inner results live only inside the kernel.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import sympy
import torch

from memopt.compiler.graph import DTYPE_NAMES

# Pointwise ops every backend implements, by arity. Names follow torch where one exists.
UNARY_OPS = frozenset(
    "neg abs exp exp2 expm1 log log2 log1p sqrt rsqrt sin cos tan tanh sigmoid erf relu "
    "reciprocal sign floor ceil trunc round logical_not bitwise_not isnan isinf square".split()
)
BINARY_OPS = frozenset(
    "add sub mul truediv floordiv truncdiv remainder fmod pow maximum minimum eq ne lt le "
    "gt ge logical_and logical_or logical_xor bitwise_and bitwise_or bitwise_xor atan2".split()
)
TERNARY_OPS = frozenset({"where"})
REDUCTIONS = frozenset({"sum", "prod", "max", "min", "argmax", "argmin", "any", "all"})
# A reduction over the inner reduction variables q<k> of a nested kernel (see the module
# docstring); its arg is a name from REDUCTIONS, as a `reduce`'s.
INNER_REDUCE = "inner_reduce"
# A matmul template's contraction: dot(a, b) = sum over the reduction variables of a * b,
# accumulated in its dtype (fp32 for 16-bit and fp32 operands). `a` depends on the batch
# ranges, the second-to-last range (M) and the reduction; `b` on the batch ranges, the
# reduction and the last range (N). A kernel holds at most one; its stores are row stores.
DOT = "dot"
# Ops whose operands meet in their promoted dtype (torch's type promotion), not in their
# result's (bool) dtype: comparisons, logical ops and the predicates on floats.
PREDICATES = frozenset(
    "eq ne lt le gt ge logical_and logical_or logical_xor logical_not isnan isinf".split()
)
_ARITY = {**dict.fromkeys(UNARY_OPS, 1), **dict.fromkeys(BINARY_OPS, 2), "where": 3}
_STRUCTURAL = frozenset({"load", "const", "index", "cast", "reduce", INNER_REDUCE, DOT})


# -- semantics every backend implements ---------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a Value of `dtype` is held in between casts: floats under 32 bits widen to
    fp32 (rounding happens at casts, constants, index values and stores, never per op)."""
    if dtype.is_floating_point and dtype.itemsize < 4:
        return torch.float32
    return dtype


def operand_dtypes(value: Value) -> tuple[torch.dtype, ...]:
    """The dtypes a pointwise Value's operands are converted to before its op: the result's
    compute dtype, or the operands' promoted one for a predicate (where's condition: bool)."""
    result = compute_dtype(value.dtype)
    if value.op == "where":
        return (torch.bool, result, result)
    if value.op in PREDICATES:
        promoted = functools.reduce(torch.promote_types, (a.dtype for a in value.args))
        return (compute_dtype(promoted),) * len(value.args)
    return (result,) * len(value.args)


def reduction_identity(name: str, dtype: torch.dtype) -> float | int | bool:
    """Where a reduction's accumulator of `dtype` starts (what lanes outside the domain hold):
    0 for sums and any, 1 for products and all, the lowest value for max and argmax, the
    highest for min and argmin."""
    if name in ("sum", "any"):
        return False if dtype == torch.bool else 0
    if name in ("prod", "all"):
        return True if dtype == torch.bool else 1
    highest = name in ("min", "argmin")
    if dtype == torch.bool:
        return highest
    if dtype.is_floating_point:
        return math.inf if highest else -math.inf
    info = torch.iinfo(dtype)
    return info.max if highest else info.min


def index_var(k: int) -> sympy.Symbol:
    return sympy.Symbol(f"i{k}", integer=True, nonnegative=True)


def reduction_var(k: int) -> sympy.Symbol:
    return sympy.Symbol(f"r{k}", integer=True, nonnegative=True)


def inner_var(k: int) -> sympy.Symbol:
    """The k-th inner reduction variable of a nested kernel (reduced by `inner_reduce`)."""
    return sympy.Symbol(f"q{k}", integer=True, nonnegative=True)


def indirect_var(k: int) -> sympy.Symbol:
    """Stands for a loaded value inside an index expression (an indirect load)."""
    return sympy.Symbol(f"t{k}", integer=True)


# Distinct sizes a runtime keeps worked out for a kernel with size symbols (its launches,
# layouts and bindings), then forgets: a long dynamic-cache generation meets thousands.
SIZES_KEPT = 256


def evaluate_size(expr: object, sizes: Mapping[str, int]) -> int:
    """A size expression as an int, given each size symbol's value by name (as backends get)."""
    if isinstance(expr, (int, sympy.Integer)):
        return int(expr)
    return _substituted(sympy.sympify(expr), sizes)


@functools.lru_cache(maxsize=4096)
def size_function(exprs: tuple[object, ...]):
    """`exprs` (sizes, strides: ints or sympy expressions) as one Python function of the
    size symbols' values by name, returning their ints, compiled once per tuple.

    Polynomials with integer coefficients (most sizes and strides: `s0 + 1`, `64*s0`) run
    as Python's integer arithmetic, exact; anything else (a floor division, a max) through
    sympy's substitution. A graph with size symbols evaluates every buffer's layout of every
    kernel at each new size (a dynamic KV cache's decode step: each step a new length): one
    call here for a kernel's buffers, a few us, where a substitution per expression took
    1.5-3 us each. Static layouts (ints only) compile nothing."""
    if all(isinstance(expr, (int, sympy.Integer)) for expr in exprs):
        values = tuple(int(expr) for expr in exprs)
        return lambda sizes: values
    parts, slow = [], []
    for expr in exprs:
        if isinstance(expr, (int, sympy.Integer)):
            parts.append(str(int(expr)))
            continue
        try:
            parts.append(_python(sympy.sympify(expr)))
        except ValueError:
            parts.append(f"_slow[{len(slow)}](sizes)")
            slow.append(functools.partial(_substituted, sympy.sympify(expr)))
    namespace = {"__builtins__": {}, "_slow": tuple(slow)}
    return eval(f"lambda sizes: ({', '.join(parts)},)", namespace)  # noqa: S307 - rendered here


def layout_function(buffers: Sequence[Buffer]):
    """Each buffer's (shape, stride) as tuples of ints at given sizes, through one
    `size_function`: a caller keeps it, and pays no hashing of expressions per call."""
    ranks = [len(b.shape) for b in buffers]
    flat = size_function(tuple(e for b in buffers for e in (*b.shape, *b.stride)))

    def layouts(sizes: Mapping[str, int]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        values, found, at = flat(sizes), [], 0
        for rank in ranks:
            found.append((values[at : at + rank], values[at + rank : at + 2 * rank]))
            at += 2 * rank
        return found

    return layouts


def _python(e: sympy.Basic) -> str:
    """A sum or product of integers, symbols (read from `sizes`) and their non-negative
    integer powers as Python; ValueError for anything else."""
    if e.is_Integer:
        return f"({int(e)})"
    if e.is_Symbol:
        return f"sizes[{e.name!r}]"
    if e.is_Add or e.is_Mul:
        return "(" + (" + " if e.is_Add else " * ").join(_python(a) for a in e.args) + ")"
    if e.is_Pow and e.exp.is_Integer and e.exp >= 0:
        return f"({_python(e.base)} ** {int(e.exp)})"
    raise ValueError(e)


def _substituted(expr: sympy.Basic, sizes: Mapping[str, int]) -> int:
    return int(expr.xreplace({s: sympy.Integer(sizes[s.name]) for s in expr.free_symbols}))


def is_reduction_var(symbol: sympy.Symbol) -> bool:
    """r<k>, or an inner reduction variable q<k> (a value depending on either is not a row)."""
    return symbol.name[:1] in ("r", "q") and symbol.name[1:].isdigit()


def is_inner_var(symbol: sympy.Symbol) -> bool:
    return symbol.name.startswith("q") and symbol.name[1:].isdigit()


@dataclass(frozen=True)
class Buffer:
    """A tensor the kernel reads or writes. Strides are in elements from the data pointer."""

    name: str
    dtype: torch.dtype
    shape: tuple[sympy.Expr, ...]
    stride: tuple[sympy.Expr, ...]

    def __str__(self) -> str:
        dims = ", ".join(map(str, self.shape))
        strides = ", ".join(map(str, self.stride))
        return f"{self.name}: {DTYPE_NAMES.get(self.dtype, self.dtype)}[{dims}]({strides})"


class LoadArg(NamedTuple):
    """What a load reads: `buffer[index]`, the symbols t<k> in the index that its indirect
    operands bind (in order), and whether its last operand is a mask."""

    buffer: str
    index: sympy.Expr
    indirect: tuple[sympy.Symbol, ...]
    masked: bool


@dataclass(frozen=True, eq=False)
class Value:
    """One node of the kernel body.

    op:   "load", "const", "index", "cast", a pointwise op name, "reduce" or "inner_reduce".
    args: operand Values (for "load": the Values its indirect symbols t<k> stand for).
    dtype: the dtype torch gives the result.
    arg:  op-specific data: load -> a LoadArg (buffer name, index expression, indirect
          symbols, masked); a masked load's last operand is a bool Value: where it is False the
          load reads nothing and yields 0 (cat, padding: indices outside the buffer);
          const -> a Python number; index -> a sympy expression of the index variables;
          reduce, inner_reduce -> the reduction name (REDUCTIONS); cast -> None (dtype says
          the target);
          dot -> None (a matmul's contraction over the reduction variables, see DOT).
    """

    op: str
    args: tuple[Value, ...]
    dtype: torch.dtype
    arg: object = None
    _hash: int = field(default=0, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Values are compared and hashed structurally; cache the hash of deep DAGs.
        object.__setattr__(self, "_hash", hash((self.op, self.args, self.dtype, _freeze(self.arg))))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Value) or self._hash != other._hash:
            return False
        return (self.op, self.dtype, _freeze(self.arg), self.args) == (
            other.op,
            other.dtype,
            _freeze(other.arg),
            other.args,
        )

    @functools.cached_property
    def symbols(self) -> frozenset[sympy.Symbol]:
        """Index variables the value depends on (through loads and index expressions)."""
        found: set[sympy.Symbol] = set()
        if self.op == "load":
            _, index, indirect, _ = self.arg
            found |= set(index.free_symbols) - set(indirect)
        elif self.op == "index":
            found |= set(self.arg.free_symbols)
        for arg in self.args:
            found |= arg.symbols
        if self.op in ("reduce", DOT):
            found = {s for s in found if not is_reduction_var(s)}
        elif self.op == INNER_REDUCE:
            found = {s for s in found if not is_inner_var(s)}
        return frozenset(found)

    @property
    def is_row(self) -> bool:
        """No dependence on a reduction variable: one value per row."""
        return not any(is_reduction_var(s) for s in self.symbols)


def _freeze(value: object) -> object:
    # 0.0 == -0.0 and nan != nan in Python; as constants they are different and the same.
    if isinstance(value, float):
        return ("float", repr(value))
    if isinstance(value, list):
        return tuple(value)
    return value


def load(
    buffer: str,
    index: sympy.Expr,
    dtype: torch.dtype,
    indirect: tuple[tuple[sympy.Symbol, Value], ...] = (),
    mask: Value | None = None,
) -> Value:
    """Read buffer[index]. `indirect` binds symbols t<k> in index to loaded Values."""
    symbols = tuple(s for s, _ in indirect)
    args = tuple(v for _, v in indirect) + ((mask,) if mask is not None else ())
    return Value(
        "load", args, dtype, LoadArg(buffer, sympy.sympify(index), symbols, mask is not None)
    )


def const(value: float | int | bool, dtype: torch.dtype) -> Value:
    return Value("const", (), dtype, value)


def index_value(expr: sympy.Expr, dtype: torch.dtype = torch.int64) -> Value:
    return Value("index", (), dtype, sympy.sympify(expr))


def cast(value: Value, dtype: torch.dtype) -> Value:
    return value if value.dtype == dtype else Value("cast", (value,), dtype)


def op(name: str, *args: Value, dtype: torch.dtype) -> Value:
    arity = (
        1 if name in UNARY_OPS else 2 if name in BINARY_OPS else 3 if name in TERNARY_OPS else None
    )
    if arity is None or arity != len(args):
        raise ValueError(f"unknown pointwise op {name!r} with {len(args)} operands")
    return Value(name, tuple(args), dtype)


def reduce(name: str, value: Value, dtype: torch.dtype) -> Value:
    if name not in REDUCTIONS:
        raise ValueError(f"unknown reduction {name!r}")
    return Value("reduce", (value,), dtype, name)


def inner_reduce(name: str, value: Value, dtype: torch.dtype) -> Value:
    """Reduce over a nested kernel's inner reduction variables q<k> (one result per row and
    outer reduction element)."""
    if name not in REDUCTIONS:
        raise ValueError(f"unknown reduction {name!r}")
    return Value(INNER_REDUCE, (value,), dtype, name)


def dot(a: Value, b: Value, dtype: torch.dtype) -> Value:
    """sum over the reduction variables of a * b (a matmul), accumulated in `dtype`."""
    return Value(DOT, (a, b), dtype)


@dataclass(frozen=True)
class Store:
    buffer: str
    index: sympy.Expr
    value: Value

    @property
    def is_row(self) -> bool:
        return not any(is_reduction_var(s) for s in self.index.free_symbols)


def _operands_first(value: Value, seen: set[Value], order: list[Value]) -> None:
    """Append `value` to `order` after its operands, each once (`seen`). A module function:
    a recursive closure would be a reference cycle per call."""
    if value in seen:
        return
    for arg in value.args:
        _operands_first(arg, seen, order)
    seen.add(value)
    order.append(value)


@dataclass(frozen=True)
class Kernel:
    name: str
    inputs: tuple[Buffer, ...]
    outputs: tuple[Buffer, ...]
    ranges: tuple[sympy.Expr, ...]
    reduction_ranges: tuple[sympy.Expr, ...]
    stores: tuple[Store, ...]
    # The inner reduction variables q<k> of a nested kernel; () for every other kernel.
    inner_ranges: tuple[sympy.Expr, ...] = ()

    @property
    def kind(self) -> str:
        if any(value.op == DOT for value in self.values):
            return "matmul"
        return "reduction" if self.reduction_ranges else "pointwise"

    @property
    def buffers(self) -> dict[str, Buffer]:
        return {b.name: b for b in (*self.inputs, *self.outputs)}

    @functools.cached_property
    def values(self) -> tuple[Value, ...]:
        """Every Value of the body, operands before users, in a deterministic order."""
        order: list[Value] = []
        seen: set[Value] = set()
        for store in self.stores:
            _operands_first(store.value, seen, order)
        return tuple(order)

    @functools.cached_property
    def size_symbols(self) -> tuple[sympy.Symbol, ...]:
        """Symbolic sizes the kernel needs at run time (dynamic shapes), sorted by name."""
        found: set[sympy.Symbol] = set()
        for expr in (*self.ranges, *self.reduction_ranges, *self.inner_ranges):
            found |= sympy.sympify(expr).free_symbols
        for buffer in (*self.inputs, *self.outputs):
            for expr in (*buffer.shape, *buffer.stride):
                found |= sympy.sympify(expr).free_symbols
        for value in self.values:
            if value.op == "load":
                found |= value.arg.index.free_symbols
            elif value.op == "index":
                found |= value.arg.free_symbols
        for store in self.stores:
            found |= store.index.free_symbols
        domain = {index_var(k) for k in range(len(self.ranges))}
        domain |= {reduction_var(k) for k in range(len(self.reduction_ranges))}
        domain |= {inner_var(k) for k in range(len(self.inner_ranges))}
        indirect = {s for v in self.values if v.op == "load" for s in v.arg.indirect}
        return tuple(sorted(found - domain - indirect, key=lambda s: s.name))

    def verify(self) -> None:
        """Raise ValueError unless the kernel is well formed: known ops of the right arity,
        loads from its buffers, one store to each output and none elsewhere, no row store
        (one per row) of a value that varies along the reduction, at most one dot; in a
        nested kernel, only row stores, no dot, and no `reduce` of a value that varies
        along an inner variable."""
        buffers = self.buffers
        outputs = {b.name for b in self.outputs}
        for value in self.values:
            if value.op not in _STRUCTURAL and _ARITY.get(value.op) != len(value.args):
                raise ValueError(f"kernel {self.name}: unknown op {value.op!r}/{len(value.args)}")
            if value.op in ("reduce", INNER_REDUCE) and value.arg not in REDUCTIONS:
                raise ValueError(f"kernel {self.name}: unknown reduction {value.arg!r}")
            if value.op == INNER_REDUCE and not self.inner_ranges:
                raise ValueError(f"kernel {self.name}: inner_reduce without inner_ranges")
            if value.op == "reduce" and any(map(is_inner_var, value.args[0].symbols)):
                raise ValueError(
                    f"kernel {self.name}: a reduce over a value that varies along an inner "
                    "reduction variable (reduce it with inner_reduce first)"
                )
            if value.op == "load" and value.arg.buffer not in buffers:
                raise ValueError(f"kernel {self.name}: load from unknown buffer {value.arg.buffer}")
        if sum(value.op == DOT for value in self.values) > 1:
            raise ValueError(f"kernel {self.name}: more than one dot")
        if self.inner_ranges and not self.reduction_ranges:
            raise ValueError(f"kernel {self.name}: inner_ranges without reduction_ranges")
        if self.inner_ranges and any(value.op == DOT for value in self.values):
            raise ValueError(f"kernel {self.name}: a dot in a nested kernel")
        stored: set[str] = set()
        for store in self.stores:
            if store.buffer not in outputs:
                raise ValueError(f"kernel {self.name}: store to {store.buffer}, not an output")
            if store.buffer in stored:
                raise ValueError(f"kernel {self.name}: two stores to {store.buffer}")
            stored.add(store.buffer)
            if store.is_row and not store.value.is_row:
                raise ValueError(
                    f"store {store.buffer}[{store.index}]: a row store (no reduction variable "
                    "in its index) of a value that varies along the reduction"
                )
            if self.inner_ranges and not store.is_row:
                raise ValueError(
                    f"store {store.buffer}[{store.index}]: a nested kernel stores rows only"
                )

    def __str__(self) -> str:
        names = {value: f"%{k}" for k, value in enumerate(self.values)}
        lines = [f"kernel {self.name} ({self.kind})"]
        lines += [f"  in  {b}" for b in self.inputs]
        lines += [f"  out {b}" for b in self.outputs]
        lines.append(f"  ranges [{', '.join(map(str, self.ranges))}]")
        if self.reduction_ranges:
            lines.append(f"  reduce [{', '.join(map(str, self.reduction_ranges))}]")
        if self.inner_ranges:
            lines.append(f"  inner [{', '.join(map(str, self.inner_ranges))}]")
        for value in self.values:
            lines.append(f"  {names[value]} = {_describe(value, names)}")
        for store in self.stores:
            lines.append(f"  store {store.buffer}[{store.index}] = {names[store.value]}")
        return "\n".join(lines)


def _describe(value: Value, names: dict[Value, str]) -> str:
    dtype = DTYPE_NAMES.get(value.dtype, str(value.dtype))
    args = ", ".join(names[a] for a in value.args)
    if value.op == "load":
        buffer, index, indirect, masked = value.arg
        binds = "".join(f", {s}={names[v]}" for s, v in zip(indirect, value.args))
        mask = f", mask={names[value.args[-1]]}" if masked else ""
        return f"load {buffer}[{index}]{binds}{mask} : {dtype}"
    if value.op == "const":
        return f"const {value.arg!r} : {dtype}"
    if value.op == "index":
        return f"index {value.arg} : {dtype}"
    if value.op in ("reduce", INNER_REDUCE):
        return f"{value.op}.{value.arg}({args}) : {dtype}"
    return f"{value.op}({args}) : {dtype}"
