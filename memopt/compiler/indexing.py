"""Index expressions: strides to offsets, reshapes to div/mod, and simplification by ranges.

Index expressions are sympy: integer arithmetic of the kernel's index variables (i0.., r0..),
size symbols and indirect symbols, plus torch's `FloorDiv(a, b)` and
`ModularIndexing(a, b, c)` (= (a // b) % c), which every backend prints.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import sympy
from torch.utils._sympy.functions import FloorDiv, ModularIndexing


def offset(index: Sequence[sympy.Expr], stride: Sequence[sympy.Expr]) -> sympy.Expr:
    """Element offset of a multi-dimensional index in a strided layout."""
    return sympy.expand(sum((i * s for i, s in zip(index, stride)), sympy.Integer(0)))


def contiguous_strides(shape: Sequence[sympy.Expr]) -> tuple[sympy.Expr, ...]:
    strides: list[sympy.Expr] = []
    step: sympy.Expr = sympy.Integer(1)
    for size in reversed(shape):
        strides.append(step)
        step = step * size
    return tuple(reversed(strides))


def reshape_index(
    index: Sequence[sympy.Expr], shape: Sequence[sympy.Expr], source_shape: Sequence[sympy.Expr]
) -> tuple[sympy.Expr, ...]:
    """Index into `source_shape` of the element at `index` of a reshape to `shape`.

    Both are read in row-major order: linearize, then split with div/mod.
    """
    linear = offset(index, contiguous_strides(shape))
    strides = contiguous_strides(source_shape)
    result = []
    for size, step in zip(source_shape, strides):
        if size == 1:
            result.append(sympy.Integer(0))
        else:
            result.append(ModularIndexing(linear, step, size))
    return tuple(result)


def _upper(expr: sympy.Expr, ranges: Mapping[sympy.Symbol, sympy.Expr]) -> sympy.Expr | None:
    """A bound M with 0 <= expr <= M, for sums of non-negative terms; None if unknown."""
    expr = sympy.expand(expr)
    total = sympy.Integer(0)
    for term in sympy.Add.make_args(expr):
        coeff, rest = term.as_coeff_Mul()
        if coeff < 0:
            return None
        if rest == 1:
            total += coeff
            continue
        if isinstance(rest, sympy.Symbol) and rest in ranges:
            total += coeff * (ranges[rest] - 1)
            continue
        if isinstance(rest, ModularIndexing):
            total += coeff * (rest.args[2] - 1)
            continue
        if isinstance(rest, FloorDiv):
            inner = _upper(rest.args[0], ranges)
            if inner is None:
                return None
            total += coeff * FloorDiv(inner, rest.args[1])
            continue
        return None
    return total


def _less(a: sympy.Expr | None, b: sympy.Expr) -> bool:
    if a is None:
        return False
    verdict = sympy.sympify(a < b)
    return verdict is sympy.true


def _split(expr: sympy.Expr, divisor: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr]:
    """expr = divisor * quotient + rest, taking the terms that are multiples of divisor."""
    quotient, rest = sympy.Integer(0), sympy.Integer(0)
    for term in sympy.Add.make_args(sympy.expand(expr)):
        ratio = _ratio(term, divisor)
        if ratio.is_integer or (ratio.is_polynomial() and sympy.fraction(ratio)[1] == 1):
            quotient += ratio
        else:
            rest += term
    return quotient, rest


@functools.lru_cache(maxsize=1 << 16)
def _ratio(term: sympy.Expr, divisor: sympy.Expr) -> sympy.Expr:
    """term / divisor with common factors cancelled (a product's own cancelling first: it
    is what index terms need, and sympy's general cancel costs a hundred times more)."""
    ratio = term / divisor
    if ratio.is_integer or sympy.fraction(ratio)[1] == 1:
        return ratio
    return sympy.cancel(ratio)


def simplify(expr: sympy.Expr, ranges: Mapping[sympy.Symbol, sympy.Expr]) -> sympy.Expr:
    """Remove div/mod that the variables' ranges make redundant.

    ((8*i0 + i1) // 8) % 4 with i1 < 8 and i0 < 4 becomes i0. A variable whose range is 1
    is 0. A split into div and mod that adds back up is one term again (`recombine`):
    4096*((i0 + 256*r0) // 4096) + 256*(r0 % 16) with i0 < 256 is 256*r0, which a
    backend sees as a stride along r0 rather than a division per element. Results are cached: fusion's trial lowerings simplify the same indices many times.
    """
    # A frozenset is the cache key: sorting the items by their printed form cost more than
    # the simplification.
    return _simplify(sympy.sympify(expr), frozenset(ranges.items()))


@functools.lru_cache(maxsize=1 << 16)
def _simplify(
    expr: sympy.Expr, range_items: frozenset[tuple[sympy.Symbol, sympy.Expr]]
) -> sympy.Expr:
    ranges = dict(range_items)
    units = {v: sympy.Integer(0) for v, size in ranges.items() if size == 1}
    expr = sympy.sympify(expr).xreplace(units) if units else sympy.sympify(expr)
    # Each round can expose more (a recombined term is a plain variable the next round's
    # div/mod rules see); two or three rounds reach the fixed point on real indices.
    for _ in range(4):
        simplified = sympy.expand(_divisions_simplified(expr, ranges))
        if simplified.has(FloorDiv):
            simplified = recombine(simplified, ranges)
        if simplified == expr:
            break
        expr = simplified
    return expr


def _divisions_simplified(
    node: sympy.Expr, ranges: Mapping[sympy.Symbol, sympy.Expr]
) -> sympy.Expr:
    """One round of `_simplify`'s div/mod rules, bottom up. (Module functions, not closures:
    a recursive closure would be a reference cycle per call.)"""
    if not node.args:
        return node
    args = [_divisions_simplified(a, ranges) for a in node.args]
    if isinstance(node, FloorDiv):
        return _floordiv(args[0], args[1], ranges)
    if isinstance(node, ModularIndexing):
        quotient = _floordiv(args[0], args[1], ranges)
        if _less(_upper(quotient, ranges), args[2]):
            return quotient
        return ModularIndexing(quotient, 1, args[2])
    return node.func(*args)


def _floordiv(
    base: sympy.Expr, divisor: sympy.Expr, ranges: Mapping[sympy.Symbol, sympy.Expr]
) -> sympy.Expr:
    if divisor == 1:
        return base
    quotient, rest = _split(base, divisor)
    if _less(_upper(rest, ranges), divisor):
        return quotient
    if quotient != 0:
        return quotient + FloorDiv(rest, divisor)
    return FloorDiv(base, divisor)


def _reduce_floordiv(node: sympy.Expr, ranges: Mapping[sympy.Symbol, sympy.Expr]) -> sympy.Expr:
    """(c*x + r) // (c*d) -> x // d when 0 <= r < c."""
    if not node.args:
        return node
    node = node.func(*(_reduce_floordiv(a, ranges) for a in node.args))
    if not isinstance(node, FloorDiv):
        return node
    base, divisor = node.args
    for term in sympy.Add.make_args(sympy.expand(base)):
        c = term.as_coeff_Mul()[0]
        if not (c.is_Integer and c > 1 and divisor.is_Integer and divisor % c == 0):
            continue
        quotient, rest = _split(base, c)
        if _less(_upper(rest, ranges), c):
            return quotient if divisor == c else FloorDiv(quotient, divisor // c)
    return node


def recombine(expr: sympy.Expr, ranges: Mapping[sympy.Symbol, sympy.Expr]) -> sympy.Expr:
    """Undo a split of an index into div and mod: k*d*(x // d) + k*(x % d) -> k*x.

    A view that reshapes a value and a view that reshapes it back leave such pairs; they
    name the same element as x.
    """
    expr = sympy.expand(_reduce_floordiv(sympy.sympify(expr), ranges))
    terms = list(sympy.Add.make_args(expr))
    changed = True
    while changed:
        changed = False
        for term in terms:
            coeff, rest = term.as_coeff_Mul()
            if not isinstance(rest, FloorDiv):
                continue
            base, divisor = rest.args
            k = coeff / divisor
            partner = k * ModularIndexing(base, 1, divisor)
            if partner in terms:
                terms.remove(term)
                terms.remove(partner)
                terms.append(k * base)
                changed = True
                break
    return sympy.expand(sympy.Add(*terms))
