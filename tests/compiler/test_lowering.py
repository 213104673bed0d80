"""Every lowering against eager: dtypes, layouts and sizes, on the reference backend and
under Triton's interpreter.

Each case computes many ops of one family in one function, every op followed by a multiply
so that it joins a generated kernel (single ops stay ATen calls), and the test asserts that
no ATen op of the family is left over: the ops really went through the lowering.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from lowering_harness import aten_ops, fused_kernels, run_fused

BACKENDS = ["reference"]
if importlib.util.find_spec("triton") is not None:
    BACKENDS.append("triton")
if shutil.which(os.environ.get("CXX") or "g++"):
    BACKENDS.append("cpp")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The fast tier lowers the families in fp32 on the reference backend; the full suite on
# every backend and dtype (the conformance suite covers each op on each backend quickly).
FAMILY_BACKENDS = [
    b if b == "reference" else pytest.param(b, marks=pytest.mark.slow) for b in BACKENDS
]
FAMILY_DTYPES = [
    d if d == torch.float32 else pytest.param(d, marks=pytest.mark.slow) for d in DTYPES
]


def layouts(dtype):
    """(name, tensor): one layout per size, so every size and every layout is covered."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    return [
        ("contiguous-1000", randn(1000)),
        ("permuted-13x37", randn(37, 13).t()),
        ("broadcast-7", randn(1, 7).expand(5, 7)),
        ("offset-1", randn(10)[3:4]),
        ("offset-2d-7x9", randn(12, 16)[2:9, 3:12]),
    ]


UNARY = {
    "neg": torch.neg,
    "abs": torch.abs,
    "exp": torch.exp,
    "exp2": torch.exp2,
    "expm1": torch.expm1,
    "log": lambda x: torch.log(x.abs() + 0.5),
    "log2": lambda x: torch.log2(x.abs() + 0.5),
    "log1p": lambda x: torch.log1p(x.abs()),
    "sqrt": lambda x: torch.sqrt(x.abs()),
    "rsqrt": lambda x: torch.rsqrt(x.abs() + 0.5),
    "sin": torch.sin,
    "cos": torch.cos,
    "tan": lambda x: torch.tan(x * 0.5),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "erf": torch.erf,
    "relu": torch.relu,
    "reciprocal": lambda x: torch.reciprocal(x.abs() + 0.5),
    "sign": torch.sign,
    "floor": lambda x: torch.floor(x * 4),
    "ceil": lambda x: torch.ceil(x * 4),
    "trunc": lambda x: torch.trunc(x * 4),
    "round": lambda x: torch.round(x * 4),
    "square": torch.square,
    "pow_scalar": lambda x: torch.pow(x, 3),
    "pow_half": lambda x: torch.pow(x.abs(), 0.5),
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "hardtanh": F.hardtanh,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "softplus": F.softplus,
    "clamp": lambda x: torch.clamp(x, -0.5, 0.5),
    "clamp_min": lambda x: torch.clamp_min(x, 0.1),
    "where": lambda x: torch.where(x > 0, x, x * 0.1),
    "masked_fill": lambda x: x.masked_fill(x < 0, -1.0),
    "to_f32": lambda x: x.float(),
    "to_f16": lambda x: x.half(),
    "to_i32": lambda x: (x * 4).to(torch.int32),
    "isnan": lambda x: torch.isnan(x),
    "logical_not": lambda x: torch.logical_not(x > 0),
    "cmp": lambda x: (x > 0.1) & (x <= 1.0) | (x == 0),
}


def _times2(value):
    return value * 2 if value.dtype != torch.bool else value & True


def unary_family(x):
    return tuple(_times2(fn(x)) for fn in UNARY.values())


BINARY = {
    "add": lambda x, y: x + y,
    "sub": lambda x, y: x - y,
    "mul": lambda x, y: x * y,
    "div": lambda x, y: x / (y.abs() + 0.5),
    "pow": lambda x, y: torch.pow(x.abs() + 0.1, y),
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "remainder": lambda x, y: torch.remainder(x, y.abs() + 0.5),
    "fmod": lambda x, y: torch.fmod(x, y.abs() + 0.5),
    "atan2": torch.atan2,
    "floor_divide": lambda x, y: torch.div(x * 4, y.abs() + 0.5, rounding_mode="floor"),
    "trunc_divide": lambda x, y: torch.div(x * 4, y.abs() + 0.5, rounding_mode="trunc"),
    "eq": lambda x, y: x == y,
    "lt": lambda x, y: x < y,
    "ge": lambda x, y: x >= y,
    "ne": lambda x, y: x != y,
    "logical_and": lambda x, y: torch.logical_and(x > 0, y > 0),
    "logical_xor": lambda x, y: torch.logical_xor(x > 0, y > 0),
    "where": lambda x, y: torch.where(x > y, x, y),
}


def binary_family(x):
    y = x.flip(-1) * 0.5 + 0.25  # flip is an ATen op: a second, materialized operand
    return tuple(_times2(fn(x, y)) for fn in BINARY.values())


REDUCTIONS = {
    "sum": lambda x: x.sum(-1),
    "mean": lambda x: x.mean(-1),
    "amax": lambda x: x.amax(-1),
    "amin": lambda x: x.amin(-1),
    "prod": lambda x: (x * 0.1 + 1).prod(-1),
    "var": lambda x: x.var(-1),
    "std": lambda x: x.std(-1, correction=0),
    "argmax": lambda x: x.argmax(-1),
    "argmin": lambda x: x.argmin(-1),
    "any": lambda x: (x > 1.5).any(-1),
    "all": lambda x: (x > -1.5).all(-1),
}


def reduction_family(x):
    x = x * 1.0
    out = []
    for fn in REDUCTIONS.values():
        value = fn(x)
        out.append(value * 2 if value.dtype.is_floating_point else value)
    return tuple(out)


def normalization_family(x):
    width = x.shape[-1]
    w = torch.linspace(0.5, 1.5, width, dtype=x.dtype)
    b = torch.linspace(-0.1, 0.1, width, dtype=x.dtype)
    return (
        torch.softmax(x, -1) * 2,
        torch.log_softmax(x, -1) * 2,
        F.layer_norm(x, (width,), w, b) * 2,
        F.rms_norm(x, (width,), w) * 2,
    )


FAMILIES = {
    "unary": (unary_family, UNARY),
    "binary": (binary_family, BINARY),
    "reduction": (reduction_family, REDUCTIONS),
    "normalization": (normalization_family, None),
}


# Ops whose result jumps at rounding boundaries: in 16-bit, eager and a fused kernel may
# round an intermediate differently and land on the other side of a step.
STEP_OPS = {
    "floor",
    "ceil",
    "trunc",
    "round",
    "floor_divide",
    "trunc_divide",
    "remainder",
    "fmod",
    "to_i32",
    "sign",
    "argmax",
    "argmin",
}


def tolerance(dtype):
    return {
        torch.float32: (1.3e-6, 1e-5),
        torch.float16: (2e-3, 2e-3),
        torch.bfloat16: (2e-2, 2e-2),
    }[dtype]


@pytest.mark.parametrize("backend", FAMILY_BACKENDS)
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", FAMILY_DTYPES, ids=str)
def test_family_against_eager(family, dtype, backend):
    fn, table = FAMILIES[family]
    names = list(table) if table else ["softmax", "log_softmax", "layer_norm", "rms_norm"]
    rtol, atol = tolerance(dtype)
    for layout, x in layouts(dtype):
        if family in ("reduction", "normalization") and x.dim() == 1 and x.numel() == 1:
            x = x.reshape(1, 1)
        got, gm = run_fused(fn, (x,), backend)
        want = fn(x)
        assert fused_kernels(gm), f"{layout}: nothing was fused"
        for k, (g, w) in enumerate(zip(got, want)):
            assert g.dtype == w.dtype, f"{family}[{k}] {layout}"
            assert g.shape == w.shape, f"{family}[{k}] {layout}"
            stepped = names[k] in STEP_OPS and dtype != torch.float32
            if g.dtype.is_floating_point and not stepped:
                torch.testing.assert_close(
                    g,
                    w,
                    rtol=rtol,
                    atol=atol,
                    equal_nan=True,
                    msg=lambda m, k=k, layout=layout: f"{names[k]} {layout}: {m}",
                )
            else:
                # Rounding-sensitive integer results (floor/argmax on ties) may differ on
                # values within one rounding step; require near-total agreement.
                close = torch.isclose(g.double(), w.double(), rtol=rtol, atol=atol)
                agree = close.double().mean().item() if g.numel() else 1.0
                assert agree >= 0.98, f"{names[k]} {layout}: only {agree:.3f} agree"


def test_every_family_op_is_lowered_not_left_to_aten():
    x = torch.randn(6, 10)
    # Without a cap on kernel size, every op of a family reads x and fuses into one kernel.
    _, gm = run_fused(unary_family, (x,), pass_options={"fusion": {"max_nodes": 1000}})
    assert not [op for op in aten_ops(gm) if "flip" not in op]
    _, gm = run_fused(reduction_family, (x,))
    assert not aten_ops(gm)
    _, gm = run_fused(normalization_family, (x,))
    # linspace makes the weights (in place, in this unfunctionalized trace): not a family op
    assert not [
        op for op in aten_ops(gm) if not any(k in op for k in ("linspace", "arange", "add_"))
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gathers_cat_and_factories(backend):
    table = torch.randn(11, 6)
    idx = torch.tensor([[3, 0], [10, 2]])
    flat = torch.tensor([4, 4, 1])
    negative = torch.tensor([-1, 2, -11])  # indexing counts negative indices from the end

    def fn(table, idx, flat, negative):
        return (
            F.embedding(idx, table) * 2,
            table.index_select(0, flat) + 1,
            table[negative] * 3,
            torch.gather(table, 1, flat.view(1, 3).expand(11, 3)) - 1,
            torch.cat([table, table * 2], 1) * 2,
            torch.arange(6, dtype=torch.float32) * table,
            torch.full((11, 6), 0.5) + table,
        )

    args = (table, idx, flat, negative)
    got, gm = run_fused(fn, args, backend)
    for k, (g, w) in enumerate(zip(got, fn(*args))):
        torch.testing.assert_close(g, w, msg=lambda m, k=k: f"output {k}: {m}")
    assert len(fused_kernels(gm)) >= 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatters_and_cat_of_computed_values(backend):
    """slice_scatter, select_scatter and cat whose pieces are computed in the same kernel:
    a piece is read only where it is used (masked), so its shifted index never reads outside
    a buffer, a gather's included (the rotary-embedding backward's pattern)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g)
    base = torch.randn(4, 11, generator=g)
    table = torch.randn(9, 3, generator=g)
    idx = torch.tensor([[8, 0], [2, 5], [1, 1], [7, 3]])

    def fn(x, base, table, idx):
        half = x[:, 3:]
        return (
            torch.slice_scatter(base, x.sin() * 2, dim=1, start=3, end=9) + 1,
            torch.slice_scatter(base, x[:, :4].exp(), dim=1, start=-10, step=3).relu(),
            torch.select_scatter(base, x[:, 0].cos(), 1, -1) * 3,
            torch.cat([-half, x[:, :3] * 2, F.embedding(idx, table).flatten(1)], 1) + 1,
        )

    args = (x, base, table, idx)
    got, gm = run_fused(fn, args, backend)
    for k, (a, b) in enumerate(zip(got, fn(*args))):
        torch.testing.assert_close(a, b, msg=lambda m, k=k: f"output {k}: {m}")
    assert aten_ops(gm) == []
    # Outputs of equal size share a kernel: the two scatters of `base`'s shape, the others.
    assert len(fused_kernels(gm)) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_slice_scatter_of_a_reduction_at_another_row_is_not_fused_with_it(backend):
    """The scatter reads the row sums at shifted rows: a kernel computes its own rows only,
    so the sum stays out of the scatter's kernel (an ATen call, alone) and is read by it."""
    x, base = torch.randn(5, 7), torch.randn(9)

    def fn(x, base):
        return torch.slice_scatter(base, x.sum(1), dim=0, start=2, end=7) * 2

    got, gm = run_fused(fn, (x, base), backend)
    torch.testing.assert_close(got, fn(x, base))
    assert aten_ops(gm) == ["aten.sum.dim_IntList"]
    assert [k.kernel.kind for k in fused_kernels(gm)] == ["pointwise"]
