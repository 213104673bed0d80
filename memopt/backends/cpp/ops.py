"""The C++ backend's tables: dtypes, conversions, constants, and op name -> C++ template.

A Value is held in a C++ variable of its compute type (`compute_dtype`: 16-bit floats in
float) and converted at loads, stores and casts, as the reference backend does. Pointwise
ops are templates over their operands, already converted to the type the reference backend
computes in: the result dtype, or for predicates the operands' promoted dtype.
"""

from __future__ import annotations

import functools
import math

import torch

from memopt.compiler import kernel_ir
from memopt.compiler.kernel_ir import (
    BINARY_OPS,
    PREDICATES,
    REDUCTIONS,
    TERNARY_OPS,
    UNARY_OPS,
    Value,
    compute_dtype,
    operand_dtypes,
)

# dtype -> the C++ type a Value of that dtype is held in.
COMPUTE_TYPES: dict[torch.dtype, str] = {
    torch.float32: "float",
    torch.float64: "double",
    torch.int64: "int64_t",
    torch.int32: "int32_t",
    torch.int16: "int16_t",
    torch.int8: "int8_t",
    torch.uint8: "uint8_t",
    torch.bool: "bool",
}
# dtype -> the C++ element type of a buffer: 16-bit floats keep their own 2-byte type.
STORAGE_TYPES: dict[torch.dtype, str] = {
    **COMPUTE_TYPES,
    torch.float16: "mo_half",
    torch.bfloat16: "uint16_t",
}


def compute_type(dtype: torch.dtype) -> str:
    """The C++ type a Value of `dtype` is held in; KeyError for a dtype the backend lacks."""
    return COMPUTE_TYPES[compute_dtype(dtype)]


def load_expr(pointer_element: str, dtype: torch.dtype) -> str:
    """A buffer element (C++ lvalue text) as its compute type."""
    if dtype == torch.float16:
        return f"mo_h2f({pointer_element})"
    if dtype == torch.bfloat16:
        return f"mo_bf2f({pointer_element})"
    return pointer_element


def store_expr(expr: str, from_dtype: torch.dtype, to_dtype: torch.dtype) -> str:
    """A held value of `from_dtype` converted to the storage type of `to_dtype`.

    As torch's `.to()`: straight from the held value (an fp16 Value stored to an fp32 buffer
    is not rounded to fp16 first), round-to-nearest-even into 16-bit floats.
    """
    held = compute_dtype(from_dtype)
    if to_dtype == torch.float16:
        return f"mo_f2h({_as(expr, held, torch.float32)})"
    if to_dtype == torch.bfloat16:
        return f"mo_f2bf({_as(expr, held, torch.float32)})"
    return _as(expr, held, to_dtype)


def cast_expr(expr: str, from_dtype: torch.dtype, to_dtype: torch.dtype) -> str:
    """A `cast` Value: convert to `to_dtype`, rounding into 16-bit floats, held widened."""
    if to_dtype == torch.float16:
        return f"mo_h2f({store_expr(expr, from_dtype, to_dtype)})"
    if to_dtype == torch.bfloat16:
        return f"mo_bf2f({store_expr(expr, from_dtype, to_dtype)})"
    return _as(expr, compute_dtype(from_dtype), to_dtype)


def _as(expr: str, held: torch.dtype, target: torch.dtype) -> str:
    """Convert between compute types; C++'s (bool)x is x != 0, NaN included, as torch."""
    target = compute_dtype(target)
    if held == target:
        return expr
    # Float to a narrow integer goes through int64, as ATen's static_cast chain does for
    # in-range values; out-of-range conversions are undefined in C++ and in ATen alike.
    return f"({COMPUTE_TYPES[target]})({expr})"


def convert(expr: str, from_dtype: torch.dtype, to_dtype: torch.dtype) -> str:
    """An operand held as `from_dtype` converted to the compute type of `to_dtype` (no rounding)."""
    return _as(expr, compute_dtype(from_dtype), to_dtype)


# -- constants ----------------------------------------------------------------------------


def constant(value: float | int | bool, dtype: torch.dtype) -> str:
    """C++ literal of a `const` Value: the number rounded to `dtype`, held in its compute type."""
    held = torch.tensor(value, dtype=dtype).to(compute_dtype(dtype)).item()
    return literal(held, compute_dtype(dtype))


def literal(value: float | int | bool, dtype: torch.dtype) -> str:
    """An exact C++ literal of `value` in the compute type of `dtype`."""
    dtype = compute_dtype(dtype)
    if dtype == torch.bool:
        return "true" if value else "false"
    if dtype.is_floating_point:
        value = float(value)
        if math.isnan(value):
            text = "NAN"
        elif math.isinf(value):
            text = "INFINITY" if value > 0 else "-INFINITY"
        elif dtype == torch.float32:
            return _float32_literal(value)
        else:
            return repr(value)
        return text if dtype == torch.float32 else f"(double){text}"
    value = int(value)
    if dtype == torch.int64:
        if value == -(2**63):  # -9223372036854775808 is not a literal: its negation overflows
            return "INT64_MIN"
        return f"INT64_C({value})" if abs(value) >= 2**31 else str(value)
    return f"({COMPUTE_TYPES[dtype]}){value}"


def _float32_literal(value: float) -> str:
    """The shortest decimal that reads back as the same float32 (`0.1f`, not 0.100000001)."""
    # 0.0 == -0.0 and they hash alike: keyed by value alone, the cache would hand one the
    # other's literal.
    return _shortest_float32_literal(value, repr(value))


@functools.lru_cache(maxsize=4096)
def _shortest_float32_literal(value: float, _spelling: str) -> str:
    exact = torch.tensor(value, dtype=torch.float32)
    for digits in range(1, 10):
        text = f"{value:.{digits}g}"
        if torch.tensor(float(text), dtype=torch.float32) == exact:
            break
    if "e" not in text and "." not in text and "inf" not in text:
        text += ".0"
    return f"{text}f"


# -- pointwise ops ------------------------------------------------------------------------

# op -> C++ expression template over its converted operands {0}, {1}, {2}. Helpers (mo_*)
# live in the prelude; type-dependent rules (integer vs float) are resolved there.
POINTWISE_TEMPLATES: dict[str, str] = {
    "neg": "-{0}",
    "abs": "mo_abs({0})",
    "exp": "mo_exp({0})",
    "exp2": "mo_exp2({0})",
    "expm1": "mo_expm1({0})",
    "log": "mo_log({0})",
    "log2": "mo_log2({0})",
    "log1p": "mo_log1p({0})",
    "sqrt": "mo_sqrt({0})",
    "rsqrt": "mo_rsqrt({0})",
    "sin": "mo_sin({0})",
    "cos": "mo_cos({0})",
    "tan": "mo_tan({0})",
    "tanh": "mo_tanh({0})",
    "sigmoid": "mo_sigmoid({0})",
    "erf": "mo_erf({0})",
    "relu": "mo_relu({0})",
    "reciprocal": "mo_reciprocal({0})",
    "sign": "mo_sign({0})",
    "floor": "mo_floor({0})",
    "ceil": "mo_ceil({0})",
    "trunc": "mo_trunc({0})",
    "round": "mo_round({0})",
    "logical_not": "!{0}",
    "bitwise_not": "mo_bitwise_not({0})",
    "isnan": "mo_isnan({0})",
    "isinf": "mo_isinf({0})",
    "square": "{0} * {0}",
    "add": "{0} + {1}",
    "sub": "{0} - {1}",
    "mul": "{0} * {1}",
    "truediv": "mo_truediv({0}, {1})",
    "floordiv": "mo_floordiv({0}, {1})",
    "truncdiv": "mo_truncdiv({0}, {1})",
    "remainder": "mo_remainder({0}, {1})",
    "fmod": "mo_fmod({0}, {1})",
    "pow": "mo_pow({0}, {1})",
    "maximum": "mo_maximum({0}, {1})",
    "minimum": "mo_minimum({0}, {1})",
    "eq": "{0} == {1}",
    "ne": "{0} != {1}",
    "lt": "{0} < {1}",
    "le": "{0} <= {1}",
    "gt": "{0} > {1}",
    "ge": "{0} >= {1}",
    # Non-short-circuit & and |: both operands are already computed, and branches would
    # stop the loop from vectorizing.
    "logical_and": "(bool){0} & (bool){1}",
    "logical_or": "(bool){0} | (bool){1}",
    "logical_xor": "(bool){0} != (bool){1}",
    "bitwise_and": "{0} & {1}",
    "bitwise_or": "{0} | {1}",
    "bitwise_xor": "{0} ^ {1}",
    "atan2": "mo_atan2({0}, {1})",
    "where": "{0} ? {1} : {2}",
}
assert set(POINTWISE_TEMPLATES) == UNARY_OPS | BINARY_OPS | TERNARY_OPS


# x ** c for the constant exponents ATen's CPU pow computes without `pow` (multiplications,
# sqrt, reciprocal: exact as it is), and which powf would make a libm call per element.
POW_BY_CONSTANT = {
    1.0: "{0}",
    2.0: "({0} * {0})",
    3.0: "({0} * {0} * {0})",
}
FLOAT_POW_BY_CONSTANT = {
    0.5: "mo_sqrt({0})",  # ATen's too: pow(-inf, 0.5) is nan, not powf's inf
    -0.5: "mo_rsqrt({0})",
    -1.0: "mo_reciprocal({0})",
    -2.0: "mo_reciprocal({0} * {0})",
}


def pointwise_expr(value: Value, operands: list[str]) -> str:
    """C++ expression of a pointwise Value from its operands' variable names."""
    targets = operand_dtypes(value)
    converted = [
        convert(name, arg.dtype, target) for name, arg, target in zip(operands, value.args, targets)
    ]
    body = POINTWISE_TEMPLATES[value.op].format(*converted)
    if value.op == "pow" and value.args[1].op == "const":
        special = {**POW_BY_CONSTANT}
        if targets[0].is_floating_point:
            special.update(FLOAT_POW_BY_CONSTANT)
        exponent = float(value.args[1].arg)
        if exponent in special:
            body = special[exponent].format(converted[0])
    result = compute_dtype(value.dtype)
    # float op float stays float; integer arithmetic promotes to int and mixed helpers
    # (int truediv, math of ints) return float, so those convert back to the result type.
    data = targets[1:] if value.op == "where" else targets  # where's condition is bool
    same_float = result.is_floating_point and all(t == result for t in data)
    if same_float or (value.op in PREDICATES and result == torch.bool):
        return body
    return f"({COMPUTE_TYPES[result]})({body})"


# -- reductions ---------------------------------------------------------------------------


def accumulator_dtype(name: str, operand: torch.dtype) -> torch.dtype:
    """What a reduction accumulates in, from its operand's compute dtype.

    Float sums accumulate in double: one row of a layer norm is thousands of elements, and
    torch's own (cascaded) float sum is more accurate than one float accumulator. Integer
    and bool sums and products accumulate in int64, as torch.sum gives.
    """
    operand = compute_dtype(operand)
    if name == "sum" and operand.is_floating_point:
        return torch.float64
    if name in ("sum", "prod") and not operand.is_floating_point:
        return torch.int64
    if name in ("any", "all"):
        return torch.bool
    return operand


def reduction_identity(name: str, operand: torch.dtype) -> str:
    """The accumulator's start (and an empty reduction's result), as a C++ literal."""
    acc = accumulator_dtype(name, operand)
    return literal(kernel_ir.reduction_identity(name, acc), acc)


# reduction -> (per-lane update statement, lane-combine statement). {acc} is the lane's
# accumulator, {v} the operand converted to the accumulator type, {i} the flat reduction
# index (argmax/argmin keep it in {idx}); combine folds lane {l} into {out}/{out_idx}.
REDUCTION_UPDATES: dict[str, tuple[str, str]] = {
    "sum": ("{acc} = {acc} + {v};", "{out} = {out} + {acc};"),
    "prod": ("{acc} = {acc} * {v};", "{out} = {out} * {acc};"),
    "max": ("{acc} = mo_maximum({acc}, {v});", "{out} = mo_maximum({out}, {acc});"),
    "min": ("{acc} = mo_minimum({acc}, {v});", "{out} = mo_minimum({out}, {acc});"),
    "any": ("{acc} = {acc} | (bool){v};", "{out} = {out} | {acc};"),
    "all": ("{acc} = {acc} & (bool){v};", "{out} = {out} & {acc};"),
    "argmax": (
        "{{ const bool take = mo_argmax_takes({v}, {i}, {acc}, {idx}); "
        "{acc} = take ? {v} : {acc}; {idx} = take ? {i} : {idx}; }}",
        "if (mo_argmax_takes({acc}, {acc_idx}, {out}, {out_idx})) "
        "{{ {out} = {acc}; {out_idx} = {acc_idx}; }}",
    ),
    "argmin": (
        "{{ const bool take = mo_argmin_takes({v}, {i}, {acc}, {idx}); "
        "{acc} = take ? {v} : {acc}; {idx} = take ? {i} : {idx}; }}",
        "if (mo_argmin_takes({acc}, {acc_idx}, {out}, {out_idx})) "
        "{{ {out} = {acc}; {out_idx} = {acc_idx}; }}",
    ),
}
assert set(REDUCTION_UPDATES) == REDUCTIONS
