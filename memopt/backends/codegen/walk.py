"""The walk every renderer shares: a Value's source text, chosen by the kind of its op.

A renderer subclasses ValueRenderer and writes one method per kind (a load, a constant, an
index value, a cast, a reduction, a pointwise op), each given the Value and the renderer's
own context (`where`: the loop or scope the line goes in); `expression` picks the method.
The loop skeleton, which decides where each line goes, is the renderer's own.
"""

from __future__ import annotations

from memopt.compiler.kernel_ir import DOT, INNER_REDUCE, Value


class ValueRenderer:
    def expression(self, value: Value, where: object) -> str:
        """The source text of `value` (its operands already named in `where`)."""
        method = _METHODS.get(value.op, "pointwise_expr")
        return getattr(self, method)(value, where)

    def load_expr(self, value: Value, where: object) -> str:
        raise NotImplementedError

    def const_expr(self, value: Value, where: object) -> str:
        raise NotImplementedError

    def index_expr(self, value: Value, where: object) -> str:
        raise NotImplementedError

    def cast_expr(self, value: Value, where: object) -> str:
        raise NotImplementedError

    def reduce_expr(self, value: Value, where: object) -> str:
        raise NotImplementedError

    def dot_expr(self, value: Value, where: object) -> str:
        raise NotImplementedError(f"{type(self).__name__} renders no {DOT}")

    def pointwise_expr(self, value: Value, where: object) -> str:
        raise NotImplementedError


_METHODS = {
    "load": "load_expr",
    "const": "const_expr",
    "index": "index_expr",
    "cast": "cast_expr",
    "reduce": "reduce_expr",
    INNER_REDUCE: "reduce_expr",
    DOT: "dot_expr",
}
