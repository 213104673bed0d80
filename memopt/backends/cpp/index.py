"""Index expressions (integer sympy) printed as C++ int64 arithmetic.

C++'s `/` and `%` truncate toward zero where sympy's FloorDiv and Mod round toward -inf;
they agree when the dividend is non-negative and the divisor positive, which sympy can
tell from the symbols' assumptions (index variables are non-negative, sizes positive).
Then the plain operators are printed (they vectorize and read well); otherwise the
prelude's `mo_ifloordiv` / `mo_imod`. Also the split of an index into a part that is
constant along a loop and a stride along it, so loops step a pointer offset instead of
recomputing the index.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import sympy
from torch.utils._sympy import functions as torch_sympy


class IndexPrinter:
    """Prints an index expression; `names` maps symbols to C++ expressions (int64)."""

    def __init__(self, names: Mapping[sympy.Symbol, str]) -> None:
        self.names = names

    def __call__(self, expr: sympy.Expr) -> str:
        return self._print(sympy.sympify(expr))

    def _print(self, expr: sympy.Expr) -> str:
        if isinstance(expr, sympy.Symbol):
            if expr not in self.names:
                raise NotImplementedError(f"index symbol {expr} has no C++ value")
            return self.names[expr]
        if isinstance(expr, sympy.Integer):
            value = int(expr)
            return f"INT64_C({value})" if abs(value) >= 2**31 else str(value)
        for cls in type(expr).__mro__:
            rule = _RULES.get(cls)
            if rule is not None:
                return rule(self, expr)
        raise NotImplementedError(f"index expression {expr}: {type(expr).__name__}")

    def atom(self, expr: sympy.Expr) -> str:
        """Printed so it can be an operand of * or / without changing meaning."""
        text = self._print(expr)
        if _ATOM.fullmatch(text) or _is_call(text):
            return text
        return f"({text})"


_ATOM = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")
_CALLEE = re.compile(r"[A-Za-z_][A-Za-z0-9_:]*\(")


def _is_call(text: str) -> bool:
    """`f(...)` whose parenthesis closes at the end: `f(a) + g(b)` is not one call."""
    match = _CALLEE.match(text)
    if match is None:
        return False
    depth = 0
    for position in range(match.end() - 1, len(text)):
        depth += {"(": 1, ")": -1}.get(text[position], 0)
        if depth == 0:
            return position == len(text) - 1
    return False


def _add(p: IndexPrinter, expr: sympy.Add) -> str:
    # Symbols first, constants last: `i0*1024 + r0 + 3` reads like the loop.
    terms = sorted(expr.args, key=lambda t: (t.is_number, sympy.default_sort_key(t)))
    text = p._print(terms[0])
    for term in terms[1:]:
        coeff, rest = term.as_coeff_Mul()
        if coeff < 0:
            text += f" - {p._print(-term)}"
        else:
            text += f" + {p._print(term)}"
    return text


def _mul(p: IndexPrinter, expr: sympy.Mul) -> str:
    coeff, rest = expr.as_coeff_Mul()
    if not coeff.is_Integer:
        raise NotImplementedError(f"index expression {expr}: a fraction outside floor/ceiling")
    factors = [p.atom(f) for f in sympy.Mul.make_args(rest)]
    if coeff == -1:
        return "-" + " * ".join(factors)
    if coeff != 1:
        factors.append(p.atom(coeff))
    return " * ".join(factors)


def _pow(p: IndexPrinter, expr: sympy.Expr) -> str:
    base, exponent = expr.args
    if not (exponent.is_Integer and int(exponent) >= 0):
        raise NotImplementedError(f"index expression {expr}: not a natural power")
    if int(exponent) == 0:
        return "1"
    return " * ".join([p.atom(base)] * int(exponent))


def _nonnegative_division(a: sympy.Expr, b: sympy.Expr) -> bool:
    return bool(a.is_nonnegative) and bool(b.is_positive)


def _floordiv(p: IndexPrinter, a: sympy.Expr, b: sympy.Expr) -> str:
    if _nonnegative_division(a, b):
        return f"{p.atom(a)} / {p.atom(b)}"
    return f"mo_ifloordiv({p(a)}, {p(b)})"


def _mod(p: IndexPrinter, a: sympy.Expr, b: sympy.Expr) -> str:
    if _nonnegative_division(a, b):
        return f"{p.atom(a)} % {p.atom(b)}"
    return f"mo_imod({p(a)}, {p(b)})"


def _modular_indexing(p: IndexPrinter, expr: sympy.Expr) -> str:
    base, divisor, modulus = expr.args
    quotient = base if divisor == 1 else torch_sympy.FloorDiv(base, divisor)
    if _nonnegative_division(base, divisor) and modulus.is_positive:
        inner = p.atom(base) if divisor == 1 else f"({p.atom(base)} / {p.atom(divisor)})"
        return f"{inner} % {p.atom(modulus)}"
    return f"mo_imod({p(quotient)}, {p(modulus)})"


def _rounded_fraction(p: IndexPrinter, expr: sympy.Expr, ceiling: bool) -> str:
    # floor(p/q) and ceiling(p/q) exactly, as integer divisions of numerator by denominator.
    numerator, denominator = sympy.fraction(sympy.together(expr.args[0]))
    if ceiling:
        return f"-mo_ifloordiv({p(-numerator)}, {p(denominator)})"
    return f"mo_ifloordiv({p(numerator)}, {p(denominator)})"


def _fold(function: str) -> Callable[[IndexPrinter, sympy.Expr], str]:
    def rule(p: IndexPrinter, expr: sympy.Expr) -> str:
        text = p(expr.args[0])
        for arg in expr.args[1:]:
            text = f"{function}({text}, {p(arg)})"
        return text

    return rule


_RULES: dict[type, Callable[[IndexPrinter, sympy.Expr], str]] = {
    sympy.Add: _add,
    sympy.Mul: _mul,
    sympy.Pow: _pow,
    torch_sympy.PowByNatural: _pow,
    torch_sympy.FloorDiv: lambda p, e: _floordiv(p, *e.args),  # and its subclass CleanDiv
    torch_sympy.ModularIndexing: _modular_indexing,
    sympy.Mod: lambda p, e: _mod(p, *e.args),
    torch_sympy.Mod: lambda p, e: _mod(p, *e.args),
    torch_sympy.PythonMod: lambda p, e: _mod(p, *e.args),
    sympy.Min: _fold("mo_imin"),
    sympy.Max: _fold("mo_imax"),
    torch_sympy.Min: _fold("mo_imin"),
    torch_sympy.Max: _fold("mo_imax"),
    sympy.Abs: lambda p, e: f"mo_iabs({p(e.args[0])})",
    torch_sympy.Identity: lambda p, e: p(e.args[0]),
    sympy.floor: lambda p, e: _rounded_fraction(p, e, ceiling=False),
    sympy.ceiling: lambda p, e: _rounded_fraction(p, e, ceiling=True),
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
