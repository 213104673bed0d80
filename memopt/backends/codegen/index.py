"""Index expressions (integer sympy) printed as source, and their linear structure.

One walk for every backend: `IndexPrinter` prints sums, products, natural powers, floor
and ceiling of fractions, FloorDiv, Mod, ModularIndexing, Min, Max and Abs through a table
by sympy class, with the precedence of each result so that parentheses go only where they
must. A dialect overrides the operators that differ (integer division and remainder,
minimum and maximum, large literals) and nothing else.

`linear_coefficient` splits an index into a part that is constant along a loop variable
and a stride along it, so loops step a pointer offset instead of recomputing the index.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import sympy
from torch.utils._sympy import functions as torch_sympy

ATOM, PRODUCT, SUM = 3, 2, 1  # precedence of a printed expression

Printed = tuple[str, int]  # (text, precedence)


class Unsupported(NotImplementedError):
    """A kernel the backend cannot express; the caller falls back to the reference backend."""


class IndexPrinter:
    """Prints an index expression; `names` maps symbols to source expressions."""

    def __init__(self, names: Mapping[sympy.Symbol, str]) -> None:
        self.names = names

    def __call__(self, expr: sympy.Expr) -> str:
        return self.printed(sympy.sympify(expr))[0]

    def printed(self, expr: sympy.Expr) -> Printed:
        if isinstance(expr, sympy.Symbol):
            return self.symbol(expr), ATOM
        if isinstance(expr, sympy.Integer):
            value = int(expr)
            return self.integer(value), ATOM if value >= 0 else SUM
        for cls in type(expr).__mro__:
            rule = _RULES.get(cls)
            if rule is not None:
                return rule(self, expr)
        raise Unsupported(f"index expression {expr}: {type(expr).__name__}")

    def at(self, expr: sympy.Expr, precedence: int) -> str:
        """`expr` printed to stand where an operator of `precedence` takes it."""
        text, own = self.printed(expr)
        return text if own >= precedence else f"({text})"

    # -- what a dialect overrides ----------------------------------------------------------

    def symbol(self, symbol: sympy.Symbol) -> str:
        if symbol not in self.names:
            raise Unsupported(f"index symbol {symbol} has no value")
        return self.names[symbol]

    def integer(self, value: int) -> str:
        return str(value)

    def floordiv(self, a: sympy.Expr, b: sympy.Expr) -> Printed:
        """floor(a / b) (sympy's FloorDiv rounds toward -inf)."""
        raise NotImplementedError

    def mod(self, a: sympy.Expr, b: sympy.Expr) -> Printed:
        """a mod b with the divisor's sign (sympy's Mod)."""
        raise NotImplementedError

    def modular_indexing(
        self, base: sympy.Expr, divisor: sympy.Expr, modulus: sympy.Expr
    ) -> Printed:
        """(base // divisor) mod modulus."""
        quotient = base if divisor == 1 else torch_sympy.FloorDiv(base, divisor)
        return self.mod(quotient, modulus)

    def ceil_div(self, numerator: sympy.Expr, denominator: sympy.Expr) -> Printed:
        """ceiling(numerator / denominator)."""
        text, _ = self.floordiv(-numerator, denominator)
        return f"-{text}", SUM

    def call(self, function: str, args: Sequence[str]) -> str:
        """`function(a, b)` folded left over more than two arguments (Min, Max)."""
        text = args[0]
        for arg in args[1:]:
            text = f"{function}({text}, {arg})"
        return text

    minimum = "min"
    maximum = "max"
    absolute = "abs"


def _add(p: IndexPrinter, expr: sympy.Add) -> Printed:
    # Symbols first, constants last: `1024*i0 + r0 + 3` reads like the loop.
    terms = sorted(expr.args, key=lambda t: (t.is_number, sympy.default_sort_key(t)))
    text = ""
    for term in terms:
        negative = term.as_coeff_Mul()[0] < 0
        part = p.at(-term if negative else term, PRODUCT)
        if not text:
            text = f"-{part}" if negative else part
        else:
            text += f" - {part}" if negative else f" + {part}"
    return text, SUM


def _mul(p: IndexPrinter, expr: sympy.Mul) -> Printed:
    coeff, rest = expr.as_coeff_Mul()
    if not coeff.is_Integer:
        raise Unsupported(f"index expression {expr}: a fraction outside floor/ceiling")
    factors = [p.at(f, ATOM) for f in sympy.Mul.make_args(rest)]
    if coeff == -1:
        return "-" + " * ".join(factors), SUM
    if coeff != 1:
        factors.insert(0, p.at(coeff, ATOM))
    return " * ".join(factors), PRODUCT


def _pow(p: IndexPrinter, expr: sympy.Expr) -> Printed:
    base, exponent = expr.args
    if not (exponent.is_Integer and int(exponent) >= 0):
        raise Unsupported(f"index expression {expr}: not a natural power")
    if int(exponent) == 0:
        return "1", ATOM
    return " * ".join([p.at(base, ATOM)] * int(exponent)), PRODUCT


def _fraction(p: IndexPrinter, expr: sympy.Expr, ceiling: bool) -> Printed:
    # floor(p/q) and ceiling(p/q) exactly, as integer divisions of numerator by denominator.
    numerator, denominator = sympy.fraction(sympy.together(expr.args[0]))
    return p.ceil_div(numerator, denominator) if ceiling else p.floordiv(numerator, denominator)


def _fold(attribute: str) -> Callable[[IndexPrinter, sympy.Expr], Printed]:
    def rule(p: IndexPrinter, expr: sympy.Expr) -> Printed:
        return p.call(getattr(p, attribute), [p(a) for a in expr.args]), ATOM

    return rule


_RULES: dict[type, Callable[[IndexPrinter, sympy.Expr], Printed]] = {
    sympy.Add: _add,
    sympy.Mul: _mul,
    sympy.Pow: _pow,
    torch_sympy.PowByNatural: _pow,
    torch_sympy.FloorDiv: lambda p, e: p.floordiv(*e.args),  # and its subclass CleanDiv
    torch_sympy.ModularIndexing: lambda p, e: p.modular_indexing(*e.args),
    sympy.Mod: lambda p, e: p.mod(*e.args),
    torch_sympy.Mod: lambda p, e: p.mod(*e.args),
    torch_sympy.PythonMod: lambda p, e: p.mod(*e.args),
    sympy.Min: _fold("minimum"),
    sympy.Max: _fold("maximum"),
    torch_sympy.Min: _fold("minimum"),
    torch_sympy.Max: _fold("maximum"),
    sympy.Abs: lambda p, e: (p.call(p.absolute, [p(e.args[0])]), ATOM),
    torch_sympy.Identity: lambda p, e: p.printed(e.args[0]),
    sympy.floor: lambda p, e: _fraction(p, e, ceiling=False),
    sympy.ceiling: lambda p, e: _fraction(p, e, ceiling=True),
}


def linear_coefficient(expr: sympy.Expr, var: sympy.Symbol) -> sympy.Expr | None:
    """c when expr = c*var + (terms without var) and c is free of `var`; else None.

    0 when var does not occur. A var inside FloorDiv/ModularIndexing/Min/... is not linear.
    """
    expr = sympy.sympify(expr)
    if var not in expr.free_symbols:
        return sympy.Integer(0)
    coefficient = sympy.Integer(0)
    for term in sympy.Add.make_args(sympy.expand(expr)):
        if var not in term.free_symbols:
            continue
        factor = term / var
        if var in factor.free_symbols or not isinstance(term, (sympy.Mul, sympy.Symbol)):
            return None
        coefficient += factor
    return coefficient


def row_major(flat: sympy.Symbol, ranges: Sequence[sympy.Expr]) -> list[sympy.Expr]:
    """The index along each range of the element at row-major position `flat` (the last
    range fastest): flat // stride, then mod the range, with the trivial parts left out."""
    strides = []
    stride = sympy.Integer(1)
    for size in reversed(ranges):
        strides.append(stride)
        stride = stride * size
    strides.reverse()
    exprs: list[sympy.Expr] = []
    for k, (size, step) in enumerate(zip(ranges, strides)):
        if step == 0:  # a later range is empty: so is the domain, no element to index
            exprs.append(sympy.Integer(0))
        elif k == 0:
            exprs.append(flat if step == 1 else torch_sympy.FloorDiv(flat, step))
        else:
            exprs.append(torch_sympy.ModularIndexing(flat, step, size))
    return exprs
