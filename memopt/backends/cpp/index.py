"""Index expressions printed as C++ int64 arithmetic: the C++ dialect of the shared printer.

C++'s `/` and `%` truncate toward zero where sympy's FloorDiv and Mod round toward -inf;
they agree when the dividend is non-negative and the divisor positive, which sympy can
tell from the symbols' assumptions (index variables are non-negative, sizes positive).
Then the plain operators are printed (they vectorize and read well); otherwise the
prelude's `mo_ifloordiv` / `mo_imod`.
"""

from __future__ import annotations

import sympy
from torch.utils._sympy import functions as torch_sympy

from memopt.backends.codegen.index import ATOM, PRODUCT, SUM, IndexPrinter, Printed


def _nonnegative_division(a: sympy.Expr, b: sympy.Expr) -> bool:
    return bool(a.is_nonnegative) and bool(b.is_positive)


class CppIndexPrinter(IndexPrinter):
    minimum = "mo_imin"
    maximum = "mo_imax"
    absolute = "mo_iabs"

    def integer(self, value: int) -> str:
        return f"INT64_C({value})" if abs(value) >= 2**31 else str(value)

    def floordiv(self, a: sympy.Expr, b: sympy.Expr) -> Printed:
        if _nonnegative_division(a, b):
            return f"{self.at(a, PRODUCT)} / {self.at(b, ATOM)}", PRODUCT
        return f"mo_ifloordiv({self(a)}, {self(b)})", ATOM

    def mod(self, a: sympy.Expr, b: sympy.Expr) -> Printed:
        if _nonnegative_division(a, b):
            return f"{self.at(a, PRODUCT)} % {self.at(b, ATOM)}", PRODUCT
        return f"mo_imod({self(a)}, {self(b)})", ATOM

    def modular_indexing(
        self, base: sympy.Expr, divisor: sympy.Expr, modulus: sympy.Expr
    ) -> Printed:
        if _nonnegative_division(base, divisor) and modulus.is_positive:
            if divisor == 1:
                return f"{self.at(base, PRODUCT)} % {self.at(modulus, ATOM)}", PRODUCT
            quotient = f"({self.at(base, PRODUCT)} / {self.at(divisor, ATOM)})"
            return f"{quotient} % {self.at(modulus, ATOM)}", PRODUCT
        quotient = base if divisor == 1 else torch_sympy.FloorDiv(base, divisor)
        return f"mo_imod({self(quotient)}, {self(modulus)})", ATOM

    def ceil_div(self, numerator: sympy.Expr, denominator: sympy.Expr) -> Printed:
        return f"-mo_ifloordiv({self(-numerator)}, {self(denominator)})", SUM
