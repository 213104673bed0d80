"""The reference backend against eager torch: the shared examples, every op, every reduction,
index arithmetic, strided and offset buffers, degenerate sizes, and the errors it raises."""

from __future__ import annotations

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close
from torch.utils._sympy.functions import FloorDiv, ModularIndexing

from memopt.backends.reference import compile_kernel, evaluate_index
from memopt.compiler import kernel_ir as ir
from memopt.compiler.kernel_ir import Kernel, Store, indirect_var, reduction_var

import kernel_examples as examples
from kernel_examples import S, buf, i0, i1

f32 = torch.float32
r0, r1 = reduction_var(0), reduction_var(1)


def run(kernel: Kernel, inputs: list[torch.Tensor], sizes=None) -> list[torch.Tensor]:
    sizes = sizes or {}
    outputs = examples.allocate_outputs(kernel, sizes)
    compile_kernel(kernel)(inputs, outputs, sizes)
    return outputs


def pointwise_kernel(name: str, in_dtypes, out_dtype, n: int) -> Kernel:
    """out0[i0] = name(in0[i0], in1[i0], ...)."""
    loads = [ir.load(f"in{k}", i0, dtype) for k, dtype in enumerate(in_dtypes)]
    value = ir.op(name, *loads, dtype=out_dtype)
    return Kernel(
        name,
        tuple(buf(f"in{k}", dtype, (n,)) for k, dtype in enumerate(in_dtypes)),
        (buf("out0", out_dtype, (n,)),),
        (S(n),),
        (),
        (Store("out0", i0, value),),
    )


# --- the shared examples ---------------------------------------------------------------


# --- every pointwise op ----------------------------------------------------------------

N = 64


def _inputs(domain: str) -> torch.Tensor:
    return {
        "real": lambda: torch.randn(N) * 3,
        "positive": lambda: torch.rand(N) * 4 + 0.1,
        "nonzero": lambda: (torch.rand(N) + 0.5) * torch.where(torch.rand(N) < 0.5, -1.0, 1.0),
        "ties": lambda: torch.randint(-2, 3, (N,)).float(),
        "special": lambda: torch.tensor([0.0, 1.0, float("nan"), float("inf"), -float("inf")] * 13)[
            :N
        ],
        "bool": lambda: torch.rand(N) < 0.5,
        "int": lambda: torch.randint(-100, 100, (N,), dtype=torch.int32),
        "int_nonzero": lambda: torch.randint(1, 9, (N,)) * torch.where(torch.rand(N) < 0.5, -1, 1),
    }[domain]()


# op -> (domain, result dtype, eager definition): Python operators where one exists, so the
# check does not merely repeat the backend's own table.
UNARY_CASES = {
    "neg": ("real", f32, lambda x: -x),
    "abs": ("real", f32, torch.abs),
    "exp": ("real", f32, torch.exp),
    "exp2": ("real", f32, lambda x: 2.0**x),
    "expm1": ("real", f32, torch.expm1),
    "log": ("positive", f32, torch.log),
    "log2": ("positive", f32, torch.log2),
    "log1p": ("positive", f32, torch.log1p),
    "sqrt": ("positive", f32, torch.sqrt),
    "rsqrt": ("positive", f32, lambda x: 1 / x.sqrt()),
    "sin": ("real", f32, torch.sin),
    "cos": ("real", f32, torch.cos),
    "tan": ("real", f32, torch.tan),
    "tanh": ("real", f32, torch.tanh),
    "sigmoid": ("real", f32, lambda x: 1 / (1 + torch.exp(-x))),
    "erf": ("real", f32, torch.erf),
    "relu": ("real", f32, lambda x: x.clamp(min=0)),
    "reciprocal": ("nonzero", f32, lambda x: 1 / x),
    "sign": ("ties", f32, torch.sign),
    "floor": ("real", f32, torch.floor),
    "ceil": ("real", f32, torch.ceil),
    "trunc": ("real", f32, torch.trunc),
    "round": ("real", f32, torch.round),
    "square": ("real", f32, lambda x: x * x),
    "logical_not": ("bool", torch.bool, lambda x: ~x),
    "bitwise_not": ("int", torch.int32, lambda x: ~x),
    "isnan": ("special", torch.bool, lambda x: x != x),
    "isinf": ("special", torch.bool, lambda x: x.abs() == float("inf")),
}

BINARY_CASES = {
    "add": ("real", "real", f32, lambda a, b: a + b),
    "sub": ("real", "real", f32, lambda a, b: a - b),
    "mul": ("real", "real", f32, lambda a, b: a * b),
    "truediv": ("real", "nonzero", f32, lambda a, b: a / b),
    "floordiv": ("real", "nonzero", f32, lambda a, b: a // b),
    "truncdiv": ("real", "nonzero", f32, lambda a, b: torch.trunc(a / b)),
    "remainder": ("real", "nonzero", f32, lambda a, b: a % b),
    "fmod": ("real", "nonzero", f32, torch.fmod),
    "pow": ("positive", "real", f32, lambda a, b: a**b),
    "maximum": ("ties", "ties", f32, torch.maximum),
    "minimum": ("ties", "ties", f32, torch.minimum),
    "eq": ("ties", "ties", torch.bool, lambda a, b: a == b),
    "ne": ("ties", "ties", torch.bool, lambda a, b: a != b),
    "lt": ("ties", "ties", torch.bool, lambda a, b: a < b),
    "le": ("ties", "ties", torch.bool, lambda a, b: a <= b),
    "gt": ("ties", "ties", torch.bool, lambda a, b: a > b),
    "ge": ("ties", "ties", torch.bool, lambda a, b: a >= b),
    "logical_and": ("bool", "bool", torch.bool, lambda a, b: a & b),
    "logical_or": ("bool", "bool", torch.bool, lambda a, b: a | b),
    "logical_xor": ("bool", "bool", torch.bool, lambda a, b: a ^ b),
    "bitwise_and": ("int", "int", torch.int32, lambda a, b: a & b),
    "bitwise_or": ("int", "int", torch.int32, lambda a, b: a | b),
    "bitwise_xor": ("int", "int", torch.int32, lambda a, b: a ^ b),
    "atan2": ("real", "real", f32, torch.atan2),
}

# Integer division rounds exactly (no float detour), toward -inf or toward zero.
INTEGER_CASES = {
    "floordiv": lambda a, b: a // b,
    "truncdiv": lambda a, b: torch.div(a, b, rounding_mode="trunc"),
    "remainder": lambda a, b: a % b,
    "fmod": torch.fmod,
}


def test_cases_cover_every_op():
    assert set(UNARY_CASES) == ir.UNARY_OPS
    assert set(BINARY_CASES) == ir.BINARY_OPS
    assert ir.TERNARY_OPS == {"where"}


@pytest.mark.parametrize("name", sorted(UNARY_CASES))
def test_unary_op(name):
    domain, out_dtype, eager = UNARY_CASES[name]
    x = _inputs(domain)
    (out,) = run(pointwise_kernel(name, [x.dtype], out_dtype, N), [x])
    assert_close(out, eager(x), equal_nan=True)


@pytest.mark.parametrize("name", sorted(BINARY_CASES))
def test_binary_op(name):
    domain_a, domain_b, out_dtype, eager = BINARY_CASES[name]
    a, b = _inputs(domain_a), _inputs(domain_b)
    (out,) = run(pointwise_kernel(name, [a.dtype, b.dtype], out_dtype, N), [a, b])
    assert_close(out, eager(a, b))


@pytest.mark.parametrize("name", sorted(INTEGER_CASES))
def test_integer_division(name):
    a, b = _inputs("int").long(), _inputs("int_nonzero")
    (out,) = run(pointwise_kernel(name, [torch.int64, torch.int64], torch.int64, N), [a, b])
    assert torch.equal(out, INTEGER_CASES[name](a, b))


def test_where():
    cond, a, b = _inputs("bool"), _inputs("real"), _inputs("real")
    (out,) = run(pointwise_kernel("where", [torch.bool, f32, f32], f32, N), [cond, a, b])
    assert torch.equal(out, torch.where(cond, a, b))


def test_int_truediv_gives_float():
    a, b = _inputs("int"), _inputs("int_nonzero").int()
    (out,) = run(pointwise_kernel("truediv", [torch.int32, torch.int32], f32, N), [a, b])
    assert_close(out, a / b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["exp", "sigmoid", "tanh", "sqrt"])
def test_16bit_unary_computes_in_float32(name, dtype):
    x = _inputs("positive").to(dtype)
    (out,) = run(pointwise_kernel(name, [dtype], dtype, N), [x])
    assert torch.equal(out, getattr(torch, name)(x.float()).to(dtype))


def test_16bit_chain_keeps_float32_intermediates():
    """(x + c) - x on fp16 Values: no rounding to fp16 between the ops, only at the const."""
    h = torch.float16
    x = torch.randn(N).to(h) * 100
    lx = ir.load("in0", i0, h)
    c = ir.const(1e-3, h)
    value = ir.op("sub", ir.op("add", lx, c, dtype=h), lx, dtype=h)
    kernel = Kernel(
        "chain",
        (buf("in0", h, (N,)),),
        (buf("out0", f32, (N,)),),
        (S(N),),
        (),
        (Store("out0", i0, value),),
    )
    (out,) = run(kernel, [x])
    c32 = torch.tensor(1e-3).to(h).float()  # the const rounds to its dtype
    assert torch.equal(out, (x.float() + c32) - x.float())
    assert not torch.equal(out, ((x + c32.to(h)) - x).float())  # fp16 intermediates differ


def test_cast_to_16bit_rounds():
    x = torch.randn(N)
    value = ir.cast(ir.cast(ir.load("in0", i0, f32), torch.bfloat16), f32)
    kernel = Kernel(
        "round_trip",
        (buf("in0", f32, (N,)),),
        (buf("out0", f32, (N,)),),
        (S(N),),
        (),
        (Store("out0", i0, value),),
    )
    (out,) = run(kernel, [x])
    assert torch.equal(out, x.bfloat16().float())


# --- reductions ------------------------------------------------------------------------

# name -> (input, result dtype, eager reduction over dim 1 of the (3, 20) view)
REDUCTION_CASES = {
    "sum": (lambda: torch.randn(3, 4, 5), f32, lambda x: x.sum(1)),
    "prod": (lambda: torch.rand(3, 4, 5) * 0.5 + 0.75, f32, lambda x: x.prod(1)),
    "max": (lambda: torch.randn(3, 4, 5), f32, lambda x: x.amax(1)),
    "min": (lambda: torch.randn(3, 4, 5), f32, lambda x: x.amin(1)),
    # Few distinct values: ties, where the first occurrence must win.
    "argmax": (lambda: torch.randint(0, 3, (3, 4, 5)).float(), torch.int64, lambda x: x.argmax(1)),
    "argmin": (lambda: torch.randint(0, 3, (3, 4, 5)).float(), torch.int64, lambda x: x.argmin(1)),
    "any": (lambda: torch.rand(3, 4, 5) < 0.03, torch.bool, lambda x: x.any(1)),
    "all": (lambda: torch.rand(3, 4, 5) < 0.97, torch.bool, lambda x: x.all(1)),
}


def reduction_kernel(name: str, in_dtype, out_dtype, rows: int, r_sizes: tuple[int, int]):
    """out0[i0] = name over (r0, r1) of in0[i0, r0, r1]: two reduction axes."""
    a, b = r_sizes
    lx = ir.load("in0", i0 * (a * b) + r0 * b + r1, in_dtype)
    return Kernel(
        f"reduce_{name}",
        (buf("in0", in_dtype, (rows, a, b)),),
        (buf("out0", out_dtype, (rows,)),),
        (S(rows),),
        (S(a), S(b)),
        (Store("out0", i0, ir.reduce(name, lx, out_dtype)),),
    )


def test_cases_cover_every_reduction():
    assert set(REDUCTION_CASES) == ir.REDUCTIONS


@pytest.mark.parametrize("name", sorted(REDUCTION_CASES))
def test_reduction_over_two_axes(name):
    make, out_dtype, eager = REDUCTION_CASES[name]
    x = make()
    (out,) = run(reduction_kernel(name, x.dtype, out_dtype, 3, (4, 5)), [x])
    assert_close(out, eager(x.reshape(3, 20)))


def test_16bit_sum_accumulates_in_float32():
    h = torch.float16
    x = torch.ones(2, 3000, dtype=h)  # an fp16 accumulator stalls at 2048
    value = ir.reduce("sum", ir.load("in0", i0 * 3000 + r0, h), h)
    kernel = Kernel(
        "sum16",
        (buf("in0", h, (2, 3000)),),
        (buf("out0", h, (2,)),),
        (S(2),),
        (S(3000),),
        (Store("out0", i0, value),),
    )
    (out,) = run(kernel, [x])
    assert torch.equal(out, torch.full((2,), 3000.0, dtype=h))


def test_full_store_of_a_row_value_broadcasts_it():
    """out[i0, r0] = x[i0, r0] - max_r x[i0, r]: a reduction used inside the full domain."""
    x = torch.randn(4, 9)
    lx = ir.load("in0", i0 * 9 + r0, f32)
    value = ir.op("sub", lx, ir.reduce("max", lx, f32), dtype=f32)
    kernel = Kernel(
        "center",
        (buf("in0", f32, (4, 9)),),
        (buf("out0", f32, (4, 9)),),
        (S(4),),
        (S(9),),
        (Store("out0", i0 * 9 + r0, value),),
    )
    (out,) = run(kernel, [x])
    assert torch.equal(out, x - x.amax(1, keepdim=True))


# --- index arithmetic, strides, offsets ------------------------------------------------


def test_reshape_read_with_floordiv_and_modular_indexing():
    """out[i0, i1] of a (4, 6) view of a contiguous (3, 8) input."""
    x = torch.randn(3, 8)
    linear = i0 * 6 + i1
    index = FloorDiv(linear, 8) * 8 + ModularIndexing(linear, 1, 8)
    kernel = Kernel(
        "reshape",
        (buf("in0", f32, (3, 8)),),
        (buf("out0", f32, (4, 6)),),
        (S(4), S(6)),
        (),
        (Store("out0", i0 * 6 + i1, ir.load("in0", index, f32)),),
    )
    (out,) = run(kernel, [x])
    assert torch.equal(out, x.reshape(4, 6))


def test_storage_offset_input():
    base = torch.randn(10, 8)
    x = base[2:6, 1:5]  # storage offset 17, strides (8, 1)
    value = ir.op("neg", ir.load("in0", i0 * 8 + i1, f32), dtype=f32)
    kernel = Kernel(
        "offset",
        (buf("in0", f32, (4, 4), (8, 1)),),
        (buf("out0", f32, (4, 4)),),
        (S(4), S(4)),
        (),
        (Store("out0", i0 * 4 + i1, value),),
    )
    (out,) = run(kernel, [x])
    assert torch.equal(out, -x)


def test_store_into_transposed_output():
    m, n = 5, 3
    x = torch.randn(m, n)
    kernel = Kernel(
        "transpose_store",
        (buf("in0", f32, (m, n)),),
        (buf("out0", f32, (m, n), (1, m)),),
        (S(m), S(n)),
        (),
        (Store("out0", i0 + i1 * m, ir.load("in0", i0 * n + i1, f32)),),
    )
    (out,) = run(kernel, [x])
    assert out.stride() == (1, m)
    assert torch.equal(out, x)
    # The same through a caller's transposed view of a storage offset tensor.
    target = torch.zeros(n + 1, m)[1:].t()
    compile_kernel(kernel)([x], [target], {})
    assert torch.equal(target, x)


def test_masked_indirect_load_skips_padding_indices():
    """out[i, j] = table[idx[i], j] where idx[i] >= 0, else 0 (negative offsets not read)."""
    vocab, n = 6, 4
    table, idx = torch.randn(vocab, n), torch.tensor([3, -1, 0, 5, -1])
    t0 = indirect_var(0)
    row = ir.load("in1", i0, torch.int64)
    valid = ir.op("ge", row, ir.const(0, torch.int64), dtype=torch.bool)
    value = ir.load("in0", t0 * n + i1, f32, indirect=((t0, row),), mask=valid)
    kernel = Kernel(
        "padded_gather",
        (buf("in0", f32, (vocab, n)), buf("in1", torch.int64, (5,))),
        (buf("out0", f32, (5, n)),),
        (S(5), S(n)),
        (),
        (Store("out0", i0 * n + i1, value),),
    )
    (out,) = run(kernel, [table, idx])
    assert torch.equal(out, torch.where((idx >= 0)[:, None], table[idx.clamp(min=0)], 0.0))


def test_kernel_reads_outputs_as_they_were_before_it():
    """An in-place reversal: every load happens before the first store."""
    n = 7
    value = ir.load("out0", (n - 1) - i0, f32)
    kernel = Kernel(
        "reverse", (), (buf("out0", f32, (n,)),), (S(n),), (), (Store("out0", i0, value),)
    )
    out = torch.arange(n, dtype=f32)
    compile_kernel(kernel)([], [out], {})
    assert torch.equal(out, torch.arange(n, dtype=f32).flip(0))


# --- degenerate sizes ------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: examples.dynamic_scale(rows=0, cols=4),
        lambda: examples.dynamic_scale(rows=1, cols=1),
        lambda: examples.add_broadcast(m=0, n=5),
        lambda: examples.add_broadcast(m=1, n=1),
        lambda: examples.softmax(rows=0, cols=8),
        lambda: examples.softmax(rows=3, cols=1),
        pytest.param(
            lambda: examples.layer_norm(rows=0, cols=4),
            marks=pytest.mark.filterwarnings("ignore:var\\(\\)"),  # eager's var of no rows
        ),
        lambda: examples.column_sum(rows=0, cols=4),  # empty reduction: sums are 0
        lambda: examples.argmax_rows(rows=2, cols=1),
        lambda: examples.gather_rows(count=0),
        lambda: examples.cat_rows(m1=0, m2=2),
    ],
)
def test_degenerate_sizes(make):
    kernel, inputs, expected, sizes = make()
    outputs = run(kernel, inputs, sizes)
    for output, want in zip(outputs, expected):
        assert output.shape == want.shape
        assert_close(output, want)


@pytest.mark.parametrize(
    "name, fill",
    [("max", -float("inf")), ("min", float("inf")), ("argmax", 0), ("sum", 0.0), ("all", True)],
)
def test_empty_reduction_yields_identity(name, fill):
    out_dtype = REDUCTION_CASES[name][1]
    (out,) = run(reduction_kernel(name, f32, out_dtype, 3, (0, 5)), [torch.empty(3, 0, 5)])
    assert torch.equal(out, torch.full((3,), fill, dtype=out_dtype))


# --- errors ----------------------------------------------------------------------------


def _simple(index, n: int = 4, ranges=None, reduction_ranges=(), value=None):
    value = value if value is not None else ir.load("in0", i0, f32)
    return Kernel(
        "k",
        (buf("in0", f32, (n,)),),
        (buf("out0", f32, (n,)),),
        ranges or (S(n),),
        reduction_ranges,
        (Store("out0", index, value),),
    )


def test_store_race_raises():
    kernel = _simple(FloorDiv(i0, 2))  # lanes 0 and 1 write different values to element 0
    with pytest.raises(ValueError, match="race"):
        run(kernel, [torch.arange(4.0)])


def test_store_of_the_same_value_from_many_lanes_is_fine():
    kernel = _simple(S(0), value=ir.const(1.5, f32))
    (out,) = run(kernel, [torch.zeros(4)])
    assert out[0] == 1.5


def test_row_store_of_full_value_raises():
    kernel = _simple(i0, ranges=(S(4),), reduction_ranges=(S(3),), value=ir.index_value(r0, f32))
    with pytest.raises(ValueError, match="row store"):
        run(kernel, [torch.zeros(4)])


def test_out_of_bounds_load_raises():
    kernel = _simple(i0, value=ir.load("in0", i0 + 1, f32))
    with pytest.raises(IndexError, match="in0"):
        run(kernel, [torch.zeros(4)])


def test_wrong_input_layout_raises():
    kernel = _simple(i0)
    with pytest.raises(ValueError, match="input"):
        compile_kernel(kernel)([torch.zeros(5)], [torch.zeros(4)], {})


def test_missing_size_raises():
    kernel, inputs, _, sizes = examples.dynamic_scale()
    outputs = examples.allocate_outputs(kernel, sizes)
    with pytest.raises(ValueError, match="s1"):
        compile_kernel(kernel)(inputs, outputs, {"s0": sizes["s0"]})


# --- the index evaluator ---------------------------------------------------------------

_POINTS = list(range(-3, 13))


def _index_exprs() -> st.SearchStrategy[sympy.Expr]:
    x = sympy.Symbol("x", integer=True)
    leaves = st.one_of(st.just(x), st.integers(-4, 9).map(sympy.Integer))

    def grow(children):
        divisor = st.integers(1, 6)
        return st.one_of(
            st.tuples(children, children).map(lambda ab: ab[0] + ab[1]),
            st.tuples(children, st.integers(-3, 3)).map(lambda ab: ab[0] * ab[1]),
            st.tuples(children, divisor).map(lambda ab: FloorDiv(ab[0], ab[1])),
            st.tuples(children, divisor, divisor).map(lambda abc: ModularIndexing(*abc)),
            st.tuples(children, divisor).map(lambda ab: sympy.Mod(ab[0], ab[1])),
            st.tuples(children, children).map(lambda ab: sympy.Min(*ab)),
            st.tuples(children, children).map(lambda ab: sympy.Max(*ab)),
            st.tuples(children, divisor).map(lambda ab: sympy.floor(ab[0] / ab[1])),
            st.tuples(children, divisor).map(lambda ab: sympy.ceiling(ab[0] / ab[1])),
        )

    return st.recursive(leaves, grow, max_leaves=6)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(_index_exprs())
def test_evaluate_index_matches_sympy(expr):
    x = sympy.Symbol("x", integer=True)
    got = evaluate_index(expr, {"x": torch.tensor(_POINTS)}).expand(len(_POINTS))
    # doit(): every function re-evaluated bottom-up on the number (subs can leave a
    # FloorDiv of an evaluated Min unevaluated).
    want = [int(expr.xreplace({x: sympy.Integer(point)}).doit()) for point in _POINTS]
    assert got.tolist() == want
