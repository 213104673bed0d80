"""Loop and reduction planning, shared by the C++ and Triton skeletons: which variables form
the innermost loop, which variable a transposing kernel tiles, how many passes (loops) a
reduction row needs and which values each computes, which values a row caches between
passes, and which outputs may take an input's memory.

Pure functions of the Kernel IR; each backend's renderer turns their answers into loops.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import sympy

from memopt.backends.codegen.index import linear_coefficient
from memopt.compiler.kernel_ir import INNER_REDUCE, Kernel, Store, Value


def unit_stride_var(index: sympy.Expr, variables: list[sympy.Symbol]) -> sympy.Symbol | None:
    """The variable that steps `index` by exactly one element (innermost first), if any."""
    for var in reversed(variables):
        if linear_coefficient(index, var) == 1:
            return var
    return None


def innermost_block(
    variables: list[sympy.Symbol],
    ranges: dict[sympy.Symbol, sympy.Expr],
    exprs: list[sympy.Expr],
    store: Store,
) -> list[sympy.Symbol]:
    """The variable the store is contiguous in (else the last), merged with outer ones."""
    inner = unit_stride_var(store.index, variables) or variables[-1]
    position = variables.index(inner)
    return merge_block(variables[: position + 1], ranges, exprs)


def transposed_var(
    outer: list[sympy.Symbol], inner: list[sympy.Symbol], loads: list[sympy.Expr]
) -> sympy.Symbol | None:
    """An outer variable some load is contiguous in while that load strides along the
    innermost loop (a transposition: NCHW read, channels_last written); None if none.

    Such a kernel runs in tiles: a block of the outer variable around a short innermost
    loop, so the strided load's cache lines are used whole before they are evicted.
    """
    if not inner:
        return None
    last = inner[-1]
    for index in loads:
        step = linear_coefficient(index, last)
        if step is None or step in (0, 1):
            continue
        var = unit_stride_var(index, outer)
        if var is not None:
            return var
    return None


def column_reduction(
    kernel: Kernel, row_vars: list[sympy.Symbol], red_vars: list[sympy.Symbol]
) -> bool:
    """Whether the kernel reduces down columns: every load that varies along the reduction
    is contiguous along the last row variable and strided along the innermost reduction
    variable (a bias gradient: sum over tokens of a (tokens, features) tensor).

    Reducing one row at a time would then read one element per cache line and move on; a
    block of adjacent rows reduced together, the rows in the vector lanes, reads every
    cache line whole. Only single-pass reductions without argmax/argmin or gathers qualify.
    """
    if not row_vars or not red_vars:
        return False
    if any(v.op == "reduce" and v.arg in ("argmax", "argmin") for v in kernel.values):
        return False
    if len(plan_passes(kernel, reduction_depths(kernel))) != 1:
        return False
    loads = [v.arg for v in kernel.values if v.op == "load"]
    if any(load.indirect for load in loads):
        return False
    varying = [
        load.index
        for load in loads
        if any(linear_coefficient(load.index, r) != 0 for r in red_vars)
    ]
    return bool(varying) and all(
        linear_coefficient(index, row_vars[-1]) == 1
        and linear_coefficient(index, red_vars[-1]) != 1
        for index in varying
    )


def merge_block(
    variables: list[sympy.Symbol], ranges: dict[sympy.Symbol, sympy.Expr], exprs: list[sympy.Expr]
) -> list[sympy.Symbol]:
    """The last variable plus the run of variables before it that fold into one loop.

    u folds into the block (v..last) when every index is linear in u and in `last` with
    coef(u) == coef(last) * (the block's extent): then u*coef(u) + ... + last*coef(last) is
    coef(last) * j for one j over the product of the ranges.
    """
    last = variables[-1]
    block = [last]
    extent = ranges[last]
    for var in reversed(variables[:-1]):
        fits = True
        for expr in exprs:
            c_last, c_var = linear_coefficient(expr, last), linear_coefficient(expr, var)
            if c_last is None or c_var is None or sympy.expand(c_var - c_last * extent) != 0:
                fits = False
                break
        if not fits:
            break
        block.insert(0, var)
        extent = extent * ranges[var]
    return block


def plan_passes(kernel: Kernel, depth: dict[Value, int]) -> list[tuple[list[Value], list[Store]]]:
    """Pass k (from 1) computes the reductions of depth k and the full stores whose
    value needs reductions of depth < k; a last pass without reductions if needed."""
    reductions = [v for v in kernel.values if v.op == "reduce"]
    full_stores = [s for s in kernel.stores if not s.is_row]
    count = max(
        [depth[v] for v in reductions] + [depth[s.value] + 1 for s in full_stores], default=0
    )
    passes: list[tuple[list[Value], list[Store]]] = [([], []) for _ in range(count)]
    for value in reductions:
        passes[depth[value] - 1][0].append(value)
    for store in full_stores:
        passes[depth[store.value]][1].append(store)
    return passes


def reduction_depths(kernel: Kernel) -> dict[Value, int]:
    """How many nested reductions a Value waits for: max 1, then sum of x - max: 2 (an
    inner reduction counts as one: the min over r of a sum over q is 2)."""
    depth: dict[Value, int] = {}
    for value in kernel.values:  # operands first
        below = max((depth[a] for a in value.args), default=0)
        depth[value] = below + 1 if value.op in ("reduce", INNER_REDUCE) else below
    return depth


def full_closure(
    kernel: Kernel, needed: Iterable[Value], leaves: frozenset[Value] = frozenset()
) -> list[Value]:
    """The values that vary along the reduction that `needed` uses, in kernel order;
    the search stops at `leaves` (values read back from a row cache)."""
    found: set[Value] = set()
    stack = [v for v in needed if not v.is_row]
    while stack:
        value = stack.pop()
        if value in found:
            continue
        found.add(value)
        if value not in leaves:
            stack.extend(a for a in value.args if not a.is_row)
    return [v for v in kernel.values if v in found]


# Ops that cost more to recompute in a later pass than a store and a load from L1/L2.
_COSTLY_OPS = frozenset(
    "exp exp2 expm1 log log2 log1p sin cos tan tanh erf sigmoid pow atan2 fmod remainder "
    "floordiv".split()
)


@dataclass(frozen=True)
class PassPlan:
    """The full values one pass computes (kernel order), which of them it reads from a row
    cache an earlier pass filled, and which it saves to one for a later pass."""

    values: list[Value]
    reads: frozenset[Value]
    saves: tuple[Value, ...]


def plan_row_caches(
    kernel: Kernel, passes: list[tuple[list[Value], list[Store]]]
) -> list[PassPlan]:
    needed = [
        [v.args[0] for v in reductions] + [s.value for s in stores] for reductions, stores in passes
    ]
    naive = [set(full_closure(kernel, n)) for n in needed]
    saved_in: dict[Value, int] = {}
    for level, values in enumerate(naive):
        for value in values:
            later = any(value in naive[k] for k in range(level + 1, len(naive)))
            if value.op in _COSTLY_OPS and later and value not in saved_in:
                saved_in[value] = level
    plans = []
    for level, n in enumerate(needed):
        readable = frozenset(v for v, k in saved_in.items() if k < level)
        values = full_closure(kernel, n, readable)
        saves = tuple(v for v in values if saved_in.get(v) == level)
        plans.append(PassPlan(values, readable & set(values), saves))
    return plans


def in_place_outputs(kernel: Kernel) -> dict[int, int]:
    """Outputs the kernel may write over one of its inputs: output position -> input position
    (each input taken by at most one output; `may_overwrite` says when a pair qualifies).
    Whether an input may be overwritten at all (no later reader) is the caller's to know."""
    pairs: dict[int, int] = {}
    taken: set[int] = set()
    final = _final_stores(kernel)
    for k in range(len(kernel.outputs)):
        for i in range(len(kernel.inputs)):
            if i not in taken and _may_overwrite(kernel, k, i, final):
                pairs[k] = i
                taken.add(i)
                break
    return pairs


def may_overwrite(kernel: Kernel, output: int, input: int) -> bool:
    """Whether output `output` may share input `input`'s memory, the result being the one
    separate buffers give.

    They need the same dtype, shape and strides; every load of the input must read exactly
    the element the store to the output writes (same index, no indirection, no mask), and
    the kernel must never read the output. Then each element of the shared memory is read
    only by the loop iteration that writes it, and every read of it comes before that
    write in both skeletons (pointwise: the load feeds the store in one iteration;
    reduction: only a full store in the row's last pass qualifies, since every pass
    re-reads the row and a store in an earlier pass would overwrite what a later pass
    still loads: `h = x + y` stored beside `layer_norm(h)`). An input the kernel never
    loads does not qualify: nothing here knows what else reads it.
    """
    return _may_overwrite(kernel, output, input, _final_stores(kernel))


def _final_stores(kernel: Kernel) -> set[int] | None:
    """ids of the stores in a reduction kernel's last pass over its rows (None: pointwise)."""
    if not kernel.reduction_ranges:
        return None
    passes = plan_passes(kernel, reduction_depths(kernel))
    return {id(s) for s in passes[-1][1]} if passes else set()


def _may_overwrite(kernel: Kernel, output: int, input: int, final: set[int] | None) -> bool:
    out, inp = kernel.outputs[output], kernel.inputs[input]
    if (inp.dtype, inp.shape, inp.stride) != (out.dtype, out.shape, out.stride):
        return False
    loads = [v for v in kernel.values if v.op == "load"]
    if any(v.arg.buffer == out.name for v in loads):
        return False
    store = next((s for s in kernel.stores if s.buffer == out.name), None)
    own = [v for v in loads if v.arg.buffer == inp.name]
    if store is None or not own:
        return False
    if final is not None and id(store) not in final:
        return False
    return all(
        not v.arg.indirect and not v.arg.masked and sympy.expand(v.arg.index - store.index) == 0
        for v in own
    )
