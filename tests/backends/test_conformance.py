"""The backend conformance suite: every backend against the same kernels.

- The shared examples (tests/kernel_examples.py) against eager torch, on every backend.
- Every pointwise op at every dtype, and every reduction at many sizes (empty, one element,
  long rows), against the reference backend (the executable definition of the IR, itself
  tested against torch in test_reference_backend.py), on every other backend.

Ops are batched, one kernel computing many ops with one output each: compiling costs
~0.3 s per C++ kernel and Triton's interpreter ~2 ms per program. A backend missing here
(no C++ compiler, no Triton) is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import sympy
import torch
from torch.testing import assert_close

from memopt.backends.registry import get_backend
from memopt.compiler import kernel_ir as ir
from memopt.compiler.kernel_ir import Kernel, Store

import kernel_examples as examples
from kernel_examples import S, buf, i0

f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
i64, i32, i16, i8, u8 = torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8
b8 = torch.bool
r0, r1 = ir.reduction_var(0), ir.reduction_var(1)
s0, s1, s2 = (sympy.Symbol(f"s{k}", integer=True, positive=True) for k in range(3))
N = 97  # not a multiple of any vector width or block: every loop has a tail

_HAS_CXX = shutil.which(os.environ.get("CXX") or "g++") is not None
_HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(not _HAS_CXX, reason="no C++ compiler")),
    pytest.param(
        "triton", id="triton", marks=pytest.mark.skipif(not _HAS_TRITON, reason="no triton")
    ),
]
# Backends checked against the reference backend (the oracle is not checked against itself).
CHECKED = BACKENDS[1:]


def run(backend: str, kernel: Kernel, inputs: list[torch.Tensor], sizes=None):
    sizes = sizes or {}
    outputs = examples.allocate_outputs(kernel, sizes)
    get_backend(backend).compile(kernel)(inputs, outputs, sizes)
    return outputs


def run_both(backend: str, kernel: Kernel, inputs: list[torch.Tensor], sizes=None):
    """(the backend's outputs, the reference backend's outputs) of `kernel` on `inputs`."""
    return run(backend, kernel, inputs, sizes), run("reference", kernel, inputs, sizes)


# Float ops Triton writes with builtins where its interpreter lacks them (tanh, pow, atan2,
# log1p, ...; backends/triton/ops.py): a few ulp from libm, where C++ and torch agree.
TOLERANCE = {"triton": {f32: (2e-6, 1e-6), f64: (1e-12, 1e-12)}}


def assert_same(backend: str, got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    assert got.dtype == want.dtype, what
    if got.dtype.is_floating_point:
        rtol, atol = TOLERANCE.get(backend, {}).get(got.dtype, (None, None))
        assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(got, want), f"{what}: {got} != {want}"


# --- the shared examples ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(examples.EXAMPLES))
def test_example_matches_eager(backend, name):
    kernel, inputs, expected, sizes = examples.EXAMPLES[name]()
    outputs = run(backend, kernel, inputs, sizes)
    assert len(outputs) == len(expected)
    for output, want in zip(outputs, expected):
        assert_close(output, want)  # default tolerances follow the dtype (fp16, bf16)


# --- every pointwise op, per dtype, against the reference backend ----------------------


def _domain(name: str, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash(name) % 1000)
    specials = torch.tensor([0.0, -0.0, 1.0, float("nan"), float("inf"), -float("inf"), 2.5, -2.5])
    base = {
        "real": lambda: torch.randn(N, generator=g) * 3,
        "positive": lambda: torch.rand(N, generator=g) * 4 + 0.1,
        "nonzero": lambda: (
            (torch.rand(N, generator=g) + 0.5)
            * torch.where(torch.rand(N, generator=g) < 0.5, -1.0, 1.0)
        ),
        "ties": lambda: torch.randint(-2, 3, (N,), generator=g).float() * 0.5,
        "special": lambda: specials.repeat(N // 8 + 1)[:N],
        "small": lambda: torch.randint(-5, 6, (N,), generator=g).float(),
        "int": lambda: torch.randint(-100, 100, (N,), generator=g).float(),
        "int_nonzero": lambda: (
            torch.randint(1, 9, (N,), generator=g).float()
            * torch.where(torch.rand(N, generator=g) < 0.5, -1.0, 1.0)
        ),
        "exponent": lambda: torch.randint(-2, 4, (N,), generator=g).float(),
        "bool": lambda: (torch.rand(N, generator=g) < 0.5).float(),
    }[name]()
    if dtype == u8:
        base = base.abs()
    return base.to(dtype)


def multi_op_kernel(name: str, cases: list[tuple[str, list[tuple[str, torch.dtype]], torch.dtype]]):
    """One kernel, one output per case: out_k[i0] = op(in_a[i0], in_b[i0], ...).

    A case is (op, [(domain, dtype) per operand], result dtype); operands with the same
    domain and dtype share an input buffer. Returns (kernel, inputs).
    """
    slots: dict[tuple[str, torch.dtype], int] = {}
    for _, operands, _ in cases:
        for operand in operands:
            slots.setdefault(operand, len(slots))
    loads = {key: ir.load(f"in{k}", i0, key[1]) for key, k in slots.items()}
    stores = []
    for k, (op, operands, result) in enumerate(cases):
        value = ir.op(op, *(loads[o] for o in operands), dtype=result)
        stores.append(Store(f"out{k}", i0, value))
    kernel = Kernel(
        name,
        tuple(buf(f"in{k}", key[1], (N,)) for key, k in slots.items()),
        tuple(buf(f"out{k}", case[2], (N,)) for k, case in enumerate(cases)),
        (S(N),),
        (),
        tuple(stores),
    )
    return kernel, [_domain(domain, dtype) for domain, dtype in slots]


# op -> operand domains, for floats (every op but bitwise_not, which floats lack)
FLOAT_UNARY = {
    "neg": "real",
    "abs": "real",
    "exp": "real",
    "exp2": "real",
    "expm1": "real",
    "log": "positive",
    "log2": "positive",
    "log1p": "positive",
    "sqrt": "positive",
    "rsqrt": "positive",
    "sin": "real",
    "cos": "real",
    "tan": "real",
    "tanh": "real",
    "sigmoid": "real",
    "erf": "real",
    "relu": "special",
    "reciprocal": "nonzero",
    "sign": "special",
    "floor": "real",
    "ceil": "real",
    "trunc": "real",
    "round": "ties",
    "logical_not": "special",
    "isnan": "special",
    "isinf": "special",
    "square": "real",
}
FLOAT_BINARY = {
    "add": ("real", "real"),
    "sub": ("real", "real"),
    "mul": ("real", "real"),
    "truediv": ("real", "nonzero"),
    "floordiv": ("real", "nonzero"),
    "truncdiv": ("real", "nonzero"),
    "remainder": ("real", "nonzero"),
    "fmod": ("real", "nonzero"),
    "pow": ("positive", "real"),
    "maximum": ("special", "ties"),
    "minimum": ("special", "ties"),
    "eq": ("ties", "small"),
    "ne": ("ties", "small"),
    "lt": ("ties", "small"),
    "le": ("ties", "small"),
    "gt": ("ties", "small"),
    "ge": ("ties", "small"),
    "logical_and": ("special", "ties"),
    "logical_or": ("special", "ties"),
    "logical_xor": ("special", "ties"),
    "atan2": ("real", "real"),
}
INT_UNARY = {
    "neg": "int",
    "abs": "int",
    "sign": "int",
    "relu": "int",
    "floor": "int",
    "ceil": "int",
    "trunc": "int",
    "round": "int",
    "bitwise_not": "int",
    "logical_not": "small",
    "isnan": "int",
    "isinf": "int",
    "square": "int",
}
INT_TO_FLOAT_UNARY = {
    "exp": "small",
    "sqrt": "small",
    "sin": "int",
    "sigmoid": "small",
    "reciprocal": "small",
    "log1p": "small",
    "erf": "small",
}
INT_BINARY = {
    "add": ("int", "int"),
    "sub": ("int", "int"),
    "mul": ("int", "int"),
    "floordiv": ("int", "int_nonzero"),
    "truncdiv": ("int", "int_nonzero"),
    "remainder": ("int", "int_nonzero"),
    "fmod": ("int", "int_nonzero"),
    "pow": ("small", "exponent"),
    "maximum": ("small", "small"),
    "minimum": ("small", "small"),
    "eq": ("small", "small"),
    "ne": ("small", "small"),
    "lt": ("small", "small"),
    "le": ("small", "small"),
    "gt": ("small", "small"),
    "ge": ("small", "small"),
    "logical_and": ("small", "small"),
    "logical_or": ("small", "small"),
    "logical_xor": ("small", "small"),
    "bitwise_and": ("int", "int"),
    "bitwise_or": ("int", "int"),
    "bitwise_xor": ("int", "int"),
}
BOOL_OPS = {
    "logical_not": 1,
    "bitwise_not": 1,
    "add": 2,
    "mul": 2,
    "maximum": 2,
    "minimum": 2,
    "eq": 2,
    "ne": 2,
    "lt": 2,
    "logical_and": 2,
    "logical_or": 2,
    "logical_xor": 2,
    "bitwise_and": 2,
    "bitwise_or": 2,
    "bitwise_xor": 2,
    "where": 3,
}


def _result(op: str, dtype: torch.dtype) -> torch.dtype:
    return b8 if op in ir.PREDICATES else dtype


def test_tables_cover_every_op():
    assert set(FLOAT_UNARY) | {"bitwise_not"} == ir.UNARY_OPS
    assert set(FLOAT_BINARY) | {"bitwise_and", "bitwise_or", "bitwise_xor"} == ir.BINARY_OPS
    assert set(INT_BINARY) | {"truediv", "atan2"} == ir.BINARY_OPS
    assert ir.TERNARY_OPS == {"where"}


@pytest.mark.parametrize("backend", CHECKED)
@pytest.mark.parametrize("dtype", [f32, f64, f16, bf16], ids=str)
def test_float_ops(backend, dtype):
    cases = [(op, [(d, dtype)], _result(op, dtype)) for op, d in FLOAT_UNARY.items()]
    cases += [
        (op, [(a, dtype), (b, dtype)], _result(op, dtype)) for op, (a, b) in FLOAT_BINARY.items()
    ]
    cases.append(("where", [("bool", b8), ("real", dtype), ("special", dtype)], dtype))
    # Mixed operands: a comparison meets in the promoted dtype; an int / int is a float.
    cases.append(("lt", [("small", i32), ("ties", dtype)], b8))
    cases.append(("truediv", [("int", i32), ("int_nonzero", i32)], dtype))
    kernel, inputs = multi_op_kernel(f"float_ops_{dtype}", cases)
    got, want = run_both(backend, kernel, inputs)
    for (op, _, _), g, w in zip(cases, got, want):
        assert_same(backend, g, w, f"{op} {dtype}")


@pytest.mark.parametrize("backend", CHECKED)
@pytest.mark.parametrize("dtype", [i64, i32, i16, i8, u8], ids=str)
def test_integer_ops(backend, dtype):
    cases = [(op, [(d, dtype)], _result(op, dtype)) for op, d in INT_UNARY.items()]
    cases += [(op, [(d, dtype)], f32) for op, d in INT_TO_FLOAT_UNARY.items()]
    cases += [
        (op, [(a, dtype), (b, dtype)], _result(op, dtype)) for op, (a, b) in INT_BINARY.items()
    ]
    cases.append(("where", [("bool", b8), ("int", dtype), ("small", dtype)], dtype))
    kernel, inputs = multi_op_kernel(f"int_ops_{dtype}", cases)
    got, want = run_both(backend, kernel, inputs)
    for (op, _, _), g, w in zip(cases, got, want):
        assert_same(backend, g, w, f"{op} {dtype}")


@pytest.mark.parametrize("backend", CHECKED)
def test_bool_ops(backend):
    cases = [(op, [("bool", b8)] * arity, b8) for op, arity in BOOL_OPS.items()]
    kernel, _ = multi_op_kernel("bool_ops", cases)
    inputs = [torch.rand(N) < 0.5]
    got, want = run_both(backend, kernel, inputs)
    for (op, _, _), g, w in zip(cases, got, want):
        assert_same(backend, g, w, op)


# --- every reduction, at many sizes, against the reference backend ----------------------


def reductions_kernel(name: str, in_dtype: torch.dtype, reductions: dict[str, torch.dtype]):
    """out_k[i0] = reduction_k over (r0, r1) of in0[i0, r0, r1], sizes symbolic (s0, s1, s2)."""
    lx = ir.load("in0", i0 * (s1 * s2) + r0 * s2 + r1, in_dtype)
    names = list(reductions)
    return Kernel(
        name,
        (buf("in0", in_dtype, (s0, s1, s2)),),
        tuple(buf(f"out{k}", reductions[n], (s0,)) for k, n in enumerate(names)),
        (s0,),
        (s1, s2),
        tuple(Store(f"out{k}", i0, ir.reduce(n, lx, reductions[n])) for k, n in enumerate(names)),
    )


REDUCTION_INPUTS = {
    f32: lambda shape: torch.randint(-3, 4, shape).float() * 0.5,  # ties for argmax/argmin
    f16: lambda shape: torch.randn(shape).to(f16),
    i32: lambda shape: torch.randint(-3, 4, shape, dtype=i32),
    b8: lambda shape: torch.rand(shape) < 0.3,
}
REDUCTION_OUTPUTS = {
    f32: {
        "sum": f32,
        "prod": f32,
        "max": f32,
        "min": f32,
        "argmax": i64,
        "argmin": i64,
        "any": b8,
        "all": b8,
    },
    f16: {"sum": f16, "prod": f16, "max": f16, "argmax": i64, "all": b8},
    i32: {"sum": i64, "prod": i64, "max": i32, "min": i32, "argmax": i64, "argmin": i64},
    b8: {"any": b8, "all": b8, "sum": i64, "max": b8},
}


def test_reduction_tables_cover_every_reduction():
    assert set(REDUCTION_OUTPUTS[f32]) == ir.REDUCTIONS


@pytest.mark.parametrize("backend", CHECKED)
@pytest.mark.parametrize("dtype", list(REDUCTION_OUTPUTS), ids=str)
def test_reductions_at_many_sizes(backend, dtype):
    kernel = reductions_kernel(f"reductions_{dtype}", dtype, REDUCTION_OUTPUTS[dtype])
    shapes = [(3, 4, 5), (2, 0, 5), (1, 1, 1), (7, 1, 7), (2, 1000, 1), (0, 3, 3), (5, 2, 17)]
    for shape in shapes:
        x = REDUCTION_INPUTS[dtype](shape)
        if dtype == f32 and x.numel():
            x.view(-1)[:: max(1, x.numel() // 3)] = float("nan")  # NaN propagates in max/argmax
        sizes = dict(zip(("s0", "s1", "s2"), shape))
        got, want = run_both(backend, kernel, [x], sizes)
        for name, g, w in zip(REDUCTION_OUTPUTS[dtype], got, want):
            assert_same(backend, g, w, f"{name} {dtype} {shape}")
