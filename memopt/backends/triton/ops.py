"""The Triton backend's tables: dtypes, conversions, constants, op name -> Triton template.

A Value is held in a Triton variable of its held dtype (16-bit floats in fp32) and
converted at loads, stores and casts, as the reference backend does. Pointwise templates
take operands already converted to the dtype the op computes in; a reduction is its
identity, one loop step and its result's conversion (render.py reduces a block).
"""

from __future__ import annotations

import math

import sympy
import torch

from memopt.backends.codegen.index import Unsupported
from memopt.compiler import kernel_ir
from memopt.compiler.kernel_ir import Value, compute_dtype

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
HALF = (torch.float16, torch.bfloat16)


def tl_dtype(dtype: torch.dtype) -> str:
    """The Triton dtype's name in source (`tl.float32`); Unsupported for others (fp8, ...)."""
    if dtype not in _TL_DTYPES:
        raise Unsupported(f"no Triton dtype for {dtype}")
    return _TL_DTYPES[dtype]


# -- op templates: {a}, {b}, {c} are operand names, already converted to the dtype the op
# computes in (the result's, or the operands' promoted dtype for comparisons); fp, int and
# bool variants where they differ. Functions the interpreter lacks are written inline with
# builtins where short: each call of a @triton.jit helper costs ~0.5 ms per program there.


def _horner(x: str, coefficients: list[float]) -> str:
    """c0 + x*(c1 + x*(c2 + ...)) as text."""
    text = repr(coefficients[-1])
    for c in reversed(coefficients[:-1]):
        text = f"{c!r} + {x} * ({text})"
    return text


# Taylor series: exact to fp32 rounding on |x| < 0.5 (expm1) and |x| < 0.25 (tanh), where
# exp(x) - 1 and 2*sigmoid(2x) - 1 lose the low bits to cancellation.
_EXPM1_SMALL = "{a} * (" + _horner("{a}", [1 / math.factorial(k) for k in range(1, 11)]) + ")"
_TANH_SMALL = (
    "{a} + {a} * {a} * {a} * ("
    + _horner(
        "({a} * {a})", [-1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925, 21844 / 6081075]
    )
    + ")"
)

# fp64 needs more terms for the same: the series above stop near fp32's precision.
_EXPM1_SMALL_64 = "{a} * (" + _horner("{a}", [1 / math.factorial(k) for k in range(1, 19)]) + ")"
_TANH_SMALL_64 = (
    "{a} + {a} * {a} * {a} * ("
    + _horner(
        "({a} * {a})",
        [
            -1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925, 21844 / 6081075,
            -929569 / 638512875, 6404582 / 10854718875, -443861162 / 1856156927625,
            18888466084 / 194896477400625,
        ],
    )
    + ")"
)  # fmt: skip
# fp64 variants of FLOAT_UNARY's templates, where the fp32 ones would lose digits.
FLOAT64_UNARY = {
    "expm1": f"tl.where(tl.abs({{a}}) < 0.5, {_EXPM1_SMALL_64}, tl.exp({{a}}) - 1.0)",
    "tanh": (
        f"tl.where(tl.abs({{a}}) < 0.25, {_TANH_SMALL_64}, 2.0 * tl.sigmoid(2.0 * {{a}}) - 1.0)"
    ),
}

UINT_BINARY = {"pow": "_pow_uint({a}, {b})"}  # unsigned: no negative exponent

FLOAT_UNARY = {
    "neg": "-{a}",
    "abs": "tl.abs({a})",
    "exp": "tl.exp({a})",
    "exp2": "tl.exp2({a})",
    "expm1": f"tl.where(tl.abs({{a}}) < 0.5, {_EXPM1_SMALL}, tl.exp({{a}}) - 1.0)",
    "log": "tl.log({a})",
    "log2": "tl.log2({a})",
    # Kahan: log(u) * x / (u - 1) with u = 1 + x cancels the rounding of u for small x.
    "log1p": (
        "tl.where((tl.abs({a}) < 0.5) & (1.0 + {a} != 1.0), "
        "tl.log(1.0 + {a}) * ({a} / tl.where(1.0 + {a} == 1.0, 1.0, (1.0 + {a}) - 1.0)), "
        "tl.where(1.0 + {a} == 1.0, {a}, tl.log(1.0 + {a})))"
    ),
    "sqrt": "tl.sqrt({a})",
    "rsqrt": "tl.rsqrt({a})",
    "sin": "tl.sin({a})",
    "cos": "tl.cos({a})",
    "tan": "(tl.sin({a}) / tl.cos({a}))",
    "tanh": f"tl.where(tl.abs({{a}}) < 0.25, {_TANH_SMALL}, 2.0 * tl.sigmoid(2.0 * {{a}}) - 1.0)",
    "sigmoid": "tl.sigmoid({a})",
    "erf": "tl.erf({a})",
    "relu": "tl.where({a} < 0, 0.0, {a})",  # nan stays nan, as torch.relu
    "reciprocal": "(1.0 / {a})",
    "sign": "tl.where({a} > 0, 1.0, tl.where({a} < 0, -1.0, tl.zeros_like({a})))",  # sign(nan) = 0
    "floor": "tl.floor({a})",
    "ceil": "tl.ceil({a})",
    "trunc": "tl.where({a} < 0, tl.ceil({a}), tl.floor({a}))",
    "round": "_round_half_even({a})",
    "square": "({a} * {a})",
    "isnan": "({a} != {a})",
    "isinf": "(tl.abs({a}) == float('inf'))",
    "logical_not": "({a} == 0)",
}
INT_UNARY = {
    "neg": "-{a}",
    "abs": "tl.where({a} < 0, -{a}, {a})",
    "relu": "tl.where({a} < 0, 0, {a})",
    "sign": "tl.where({a} > 0, 1, tl.where({a} < 0, -1, 0)).to({a}.dtype)",
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
BOOL_UNARY = {
    "logical_not": "({a} == 0)",
    "bitwise_not": "({a} == 0)",
    **{op: "{a}" for op in ("abs", "relu", "sign", "square", "floor", "ceil", "trunc", "round")},
    "isnan": "({a} != {a})",
    "isinf": "({a} != {a})",
}
COMMON_BINARY = {
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
    # `%` is C's remainder on ints and fmod on floats (GPU and interpreter); torch's
    # remainder takes the divisor's sign.
    "fmod": "({a} % {b})",
    "remainder": "tl.where((({a} % {b}) != 0) & ((({a} % {b}) < 0) != ({b} < 0)), ({a} % {b}) + {b}, {a} % {b})",
}
BOOL_BINARY = {
    "add": "({a} | {b})",
    "mul": "({a} & {b})",
    "maximum": "({a} | {b})",
    "minimum": "({a} & {b})",
}
FLOAT_BINARY = {
    "truediv": "({a} / {b})",
    "floordiv": "_floordiv({a}, {b})",
    "truncdiv": "tl.where({a} / {b} < 0, tl.ceil({a} / {b}), tl.floor({a} / {b}))",
    "pow": "_pow({a}, {b})",
    "atan2": "_atan2({a}, {b})",
    # torch.maximum/minimum propagate nan
    "maximum": "tl.where({a} != {a}, {a}, tl.where({b} != {b}, {b}, tl.maximum({a}, {b})))",
    "minimum": "tl.where({a} != {a}, {a}, tl.where({b} != {b}, {b}, tl.minimum({a}, {b})))",
}
INT_BINARY = {
    # `//` truncates toward zero on ints in Triton; torch's floor division rounds down.
    "floordiv": "(({a} // {b}) - ((({a} % {b}) != 0) & (({a} < 0) != ({b} < 0))).to({a}.dtype))",
    "truncdiv": "({a} // {b})",
    "pow": "_pow_int({a}, {b})",
    "maximum": "tl.maximum({a}, {b})",
    "minimum": "tl.minimum({a}, {b})",
}

# x ** c for constant exponents c: exact multiplications (as torch computes them) and
# builtins instead of exp2(c * log2|x|).
POW_BY_CONSTANT = {
    1.0: "{a}",
    2.0: "({a} * {a})",
    3.0: "({a} * {a} * {a})",
    4.0: "(({a} * {a}) * ({a} * {a}))",
}
FLOAT_POW_BY_CONSTANT = {
    0.5: "tl.where({a} == float('-inf'), float('inf'), tl.sqrt({a}))",
    -0.5: "tl.where({a} == float('-inf'), 0.0, tl.rsqrt({a}))",
    -1.0: "(1.0 / {a})",
    -2.0: "(1.0 / ({a} * {a}))",
}

# (operand kind, arity) -> the template tables an op is looked up in, the first that has it.
_TABLES = {
    ("bool", 1): (BOOL_UNARY,),
    ("bool", 2): (BOOL_BINARY, COMMON_BINARY),
    ("float64", 1): (FLOAT64_UNARY, FLOAT_UNARY),
    ("float64", 2): (COMMON_BINARY, FLOAT_BINARY),
    ("float", 1): (FLOAT_UNARY,),
    ("float", 2): (COMMON_BINARY, FLOAT_BINARY),
    ("unsigned", 1): (INT_UNARY,),
    ("unsigned", 2): (COMMON_BINARY, UINT_BINARY, INT_BINARY),
    ("int", 1): (INT_UNARY,),
    ("int", 2): (COMMON_BINARY, INT_BINARY),
}


def op_tables(dtype: torch.dtype, arity: int) -> tuple[dict[str, str], ...]:
    """The template tables of an op of `arity` on operands of the (held) `dtype`."""
    if dtype == torch.bool:
        kind = "bool"
    elif dtype == torch.float64:
        kind = "float64"
    elif dtype.is_floating_point:
        kind = "float"
    else:
        kind = "int" if dtype.is_signed else "unsigned"
    return _TABLES[kind, arity]


# Helper @triton.jit functions, by name; a source includes the ones its kernel calls.
HELPERS = {
    "_round_half_even": """
@triton.jit
def _round_half_even(x):
    low = tl.floor(x)
    diff = x - low
    low_is_even = (low - 2.0 * tl.floor(low * 0.5)) == 0.0
    rounded = tl.where(diff < 0.5, low, tl.where(low_is_even, low, low + 1.0))
    return tl.where(diff > 0.5, low + 1.0, rounded)
""",
    "_floordiv": """
@triton.jit
def _floordiv(a, b):
    # torch's div_floor for floats: exact through fmod, where floor(a / b) can round up.
    mod = a % b
    div = (a - mod) / b
    div = tl.where((mod != 0) & ((b < 0) != (mod < 0)), div - 1.0, div)
    low = tl.floor(div)
    low = tl.where(div - low > 0.5, low + 1.0, low)
    low = tl.where(div == 0, div * 0.0, low)
    return tl.where(b == 0, a / b, low)
""",
    "_pow": """
@triton.jit
def _pow(base, exponent):
    # exp2(y * log2|x|), with torch's signs and special cases for x <= 0. In fp64: an fp32
    # product y * log2|x| near 30 is off by 2e-6 relative, which exp2 carries into the result.
    wide = exponent.to(tl.float64) * tl.log2(tl.abs(base).to(tl.float64))
    magnitude = tl.exp2(wide).to(base.dtype)
    integral = exponent == tl.floor(exponent)
    odd = (exponent - 2.0 * tl.floor(exponent * 0.5)) == 1.0
    signed = tl.where((base < 0) & odd, -magnitude, magnitude)
    result = tl.where((base < 0) & (~integral), float("nan"), signed)
    one = (exponent == 0) | (base == 1) | ((base == -1) & (tl.abs(exponent) == float("inf")))
    return tl.where(one, 1.0, result)
""",
    "_atan2": """
@triton.jit
def _atan2(y, x):
    # atan of the ratio in [0, 1], reduced around pi/4, then moved to its octant and
    # quadrant. The ratio's atan: Cephes' atanf polynomial (~1 ulp) in fp32; in fp64 the
    # rational approximation of Cephes' atan (double), valid for |w| <= 0.66 (~1e-16).
    ax = tl.abs(x)
    ay = tl.abs(y)
    high = tl.maximum(ax, ay)
    low = tl.minimum(ax, ay)
    ratio = tl.where(high == 0, 0.0, tl.where(low == high, 1.0, low / tl.where(high == 0, 1.0, high)))
    upper = ratio > 0.41421356237309503
    w = tl.where(upper, (ratio - 1.0) / (ratio + 1.0), ratio)
    z = w * w
    if x.dtype == tl.float64:
        p = (((-8.750608600031904122785e-1 * z - 1.615753718733365076637e1) * z
              - 7.500855792314704667340e1) * z - 1.228866684490136173410e2) * z - 6.485021904942025371773e1
        q = ((((z + 2.485846490142306297962e1) * z + 1.650270098316988542046e2) * z
              + 4.328810604912902668951e2) * z + 4.853903996359136964868e2) * z + 1.945506571482613964425e2
        angle = w + w * z * p / q
    else:
        poly = ((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1
        angle = w + w * z * poly
    # pi/4 added to the tensor, not picked by tl.where: a where of two Python floats is
    # an fp32 constant.
    angle = tl.where(upper, angle + 0.7853981633974483, angle)
    angle = tl.where(ay > ax, 1.5707963267948966 - angle, angle)
    angle = tl.where(x < 0, 3.141592653589793 - angle, angle)
    angle = tl.where(y < 0, -angle, angle)
    return tl.where((x != x) | (y != y), x + y, angle)
""",
    "_pow_uint": """
@triton.jit
def _pow_uint(a, b):
    # Exact, wrapping on overflow (ATen's powi), for exponents >= 0.
    result = a * 0 + 1
    base = a
    e = b
    for _ in tl.static_range(63):
        result = tl.where((e & 1) != 0, result * base, result)
        base = base * base
        e = e >> 1
    return result
""",
    "_pow_int": """
@triton.jit
def _pow_int(a, b):
    # ATen's powi: a negative exponent gives 1 for a == 1, -1 or 1 for a == -1 (by the
    # exponent's parity), 0 otherwise.
    result = _pow_uint(a, tl.where(b < 0, 0, b))
    odd = (b & 1) != 0
    negative = tl.where(a == 1, 1, tl.where(a == -1, tl.where(odd, -1, 1), 0))
    return tl.where(b < 0, negative.to(result.dtype), result)
""",
    "_mul_combine": """
@triton.jit
def _mul_combine(a, b):
    return a * b
""",
}


def convert(name: str, held: torch.dtype, target: torch.dtype) -> str:
    """A value held as `held` converted to the held dtype `target` (no 16-bit rounding)."""
    if held == target:
        return name
    if target == torch.bool:
        return f"({name} != 0)"
    return f"{name}.to({tl_dtype(target)})"


def bf16_round(x: str) -> str:
    """fp32 -> nearest bf16 (ties to even), still in fp32, with integer ops.

    `.to(tl.bfloat16)` truncates in Triton's interpreter; this rounds the same way on a GPU
    and in the interpreter (as torch does). nan and inf pass through.
    """
    bits = f"{x}.to(tl.uint32, bitcast=True)"
    rounded = f"(({bits} + 0x7FFF + (({bits} >> 16) & 1)) & 0xFFFF0000)"
    return f"tl.where({x} != {x}, {x}, {rounded}.to(tl.float32, bitcast=True))"


def number(value: object) -> float | int | bool:
    """A constant's Python number (index constants are sympy Integers)."""
    if isinstance(value, bool | int | float):
        return value
    return int(value) if sympy.sympify(value).is_Integer else float(value)


def literal(value: object, dtype: torch.dtype) -> str:
    """`value` as Triton source for `dtype` (repr of a float is exact: it reads back the same)."""
    if dtype == torch.bool:
        return "1" if value else "0"
    if dtype.is_floating_point:
        x = float(value)
        if math.isnan(x):
            return 'float("nan")'
        if math.isinf(x):
            return 'float("inf")' if x > 0 else 'float("-inf")'
        return repr(x)
    return str(int(value))


def reduction_identity(kind: str, acc: torch.dtype) -> str:
    """The accumulator's start, and what masked-off lanes hold, as a literal of `acc`."""
    return literal(kernel_ir.reduction_identity(kind, acc), acc)


def reduction_result(value: Value, result: str, acc: torch.dtype) -> str:
    """A reduction's [XBLOCK, 1] result converted to the dtype its Value is held in."""
    produced = {"argmax": None, "argmin": None, "any": torch.bool, "all": torch.bool}.get(
        value.arg, acc
    )  # argmax/argmin: the index's dtype (int32 or int64)
    if produced == compute_dtype(value.dtype):
        return result
    return f"({result}).to({tl_dtype(compute_dtype(value.dtype))})"


# (reduction, floating) -> one loop step of a looped reduction: the accumulator {acc} and the
# new masked block {new} (for argmax/argmin: whether {new} takes over the lane). Float max
# and min propagate nan, as torch does.
LOOP_UPDATES = {
    ("sum", True): "{acc} + {new}",
    ("sum", False): "{acc} + {new}",
    ("prod", True): "{acc} * {new}",
    ("prod", False): "{acc} * {new}",
    ("max", True): "tl.where(({acc} > {new}) | ({acc} != {acc}), {acc}, {new})",
    ("max", False): "tl.maximum({acc}, {new})",
    ("min", True): "tl.where(({acc} < {new}) | ({acc} != {acc}), {acc}, {new})",
    ("min", False): "tl.minimum({acc}, {new})",
    ("any", False): "tl.maximum({acc}, {new})",
    ("all", False): "tl.minimum({acc}, {new})",
    ("argmax", True): "({new} > {acc}) | (({new} != {new}) & ({acc} == {acc}))",
    ("argmax", False): "{new} > {acc}",
    ("argmin", True): "({new} < {acc}) | (({new} != {new}) & ({acc} == {acc}))",
    ("argmin", False): "{new} < {acc}",
}
