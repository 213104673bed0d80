"""Hand-built Kernel IR programs with their eager equivalents, shared by the backend tests.

Each example returns (kernel, inputs, expected_outputs, sizes): run the kernel on `inputs`
into freshly allocated outputs (shape and strides of kernel.outputs evaluated at `sizes`)
and compare with `expected_outputs`.
"""

from __future__ import annotations

import sympy
import torch

from memopt.compiler import kernel_ir as ir
from memopt.compiler.kernel_ir import Buffer, Kernel, Store, index_var, indirect_var, reduction_var

i0, i1, i2 = index_var(0), index_var(1), index_var(2)
r0 = reduction_var(0)
S = sympy.Integer


def contiguous_strides(shape):
    strides, step = [], S(1)
    for size in reversed(shape):
        strides.append(step)
        step = step * size
    return tuple(reversed(strides))


def buf(name, dtype, shape, stride=None):
    shape = tuple(sympy.sympify(s) for s in shape)
    stride = (
        tuple(sympy.sympify(s) for s in stride) if stride is not None else contiguous_strides(shape)
    )
    return Buffer(name, dtype, shape, stride)


def add_broadcast(m=7, n=5, dtype=torch.float32):
    """out[i, j] = x[i, j] + b[j] * 2"""
    x, b = torch.randn(m, n).to(dtype), torch.randn(n).to(dtype)
    lx = ir.load("in0", i0 * n + i1, dtype)
    lb = ir.load("in1", i1, dtype)
    value = ir.op("add", lx, ir.op("mul", lb, ir.const(2.0, dtype), dtype=dtype), dtype=dtype)
    kernel = Kernel(
        "add_broadcast",
        (buf("in0", dtype, (m, n)), buf("in1", dtype, (n,))),
        (buf("out0", dtype, (m, n)),),
        (S(m), S(n)),
        (),
        (Store("out0", i0 * n + i1, value),),
    )
    return kernel, [x, b], [x + b * 2], {}


def transposed_read(m=33, n=17):
    """out[i, j] = exp(x.t()[i, j]) with x contiguous (n, m): the read is strided."""
    x = torch.randn(n, m)
    value = ir.op("exp", ir.load("in0", i1 * m + i0, torch.float32), dtype=torch.float32)
    kernel = Kernel(
        "transposed_exp",
        (buf("in0", torch.float32, (n, m)),),
        (buf("out0", torch.float32, (m, n)),),
        (S(m), S(n)),
        (),
        (Store("out0", i0 * n + i1, value),),
    )
    return kernel, [x], [x.t().exp()], {}


def softmax(rows=6, cols=1000, dtype=torch.float32):
    """Row softmax: max, exp(x - max), sum, divide: two reductions, one stored full value."""
    x = torch.randn(rows, cols).to(dtype)
    f32 = torch.float32
    lx = ir.cast(ir.load("in0", i0 * cols + r0, dtype), f32)
    mx = ir.reduce("max", lx, f32)
    e = ir.op("exp", ir.op("sub", lx, mx, dtype=f32), dtype=f32)
    total = ir.reduce("sum", e, f32)
    out = ir.cast(ir.op("truediv", e, total, dtype=f32), dtype)
    kernel = Kernel(
        "softmax",
        (buf("in0", dtype, (rows, cols)),),
        (buf("out0", dtype, (rows, cols)),),
        (S(rows),),
        (S(cols),),
        (Store("out0", i0 * cols + r0, out),),
    )
    return kernel, [x], [torch.softmax(x.float(), -1).to(dtype)], {}


def layer_norm(rows=5, cols=37):
    """mean and variance (a reduction of a value that depends on a reduction), row outputs."""
    x, w = torch.randn(rows, cols), torch.randn(cols)
    f32 = torch.float32
    lx = ir.load("in0", i0 * cols + r0, f32)
    mean = ir.op("truediv", ir.reduce("sum", lx, f32), ir.const(float(cols), f32), dtype=f32)
    centered = ir.op("sub", lx, mean, dtype=f32)
    var = ir.op(
        "truediv",
        ir.reduce("sum", ir.op("mul", centered, centered, dtype=f32), f32),
        ir.const(float(cols), f32),
        dtype=f32,
    )
    rstd = ir.op("rsqrt", ir.op("add", var, ir.const(1e-5, f32), dtype=f32), dtype=f32)
    y = ir.op("mul", ir.op("mul", centered, rstd, dtype=f32), ir.load("in1", r0, f32), dtype=f32)
    kernel = Kernel(
        "layer_norm",
        (buf("in0", f32, (rows, cols)), buf("in1", f32, (cols,))),
        (buf("out0", f32, (rows, cols)), buf("out1", f32, (rows, 1))),
        (S(rows),),
        (S(cols),),
        (Store("out0", i0 * cols + r0, y), Store("out1", i0, rstd)),
    )
    expected_y = torch.nn.functional.layer_norm(x, (cols,), w, None, 1e-5)
    expected_rstd = torch.rsqrt(x.var(1, correction=0, keepdim=True) + 1e-5)
    return kernel, [x, w], [expected_y, expected_rstd], {}


def column_sum(rows=9, cols=4):
    """Reduce over dim 0 of a (rows, cols) tensor: the reduction variable is the slow axis."""
    x = torch.randn(rows, cols)
    value = ir.reduce("sum", ir.load("in0", r0 * cols + i0, torch.float32), torch.float32)
    kernel = Kernel(
        "column_sum",
        (buf("in0", torch.float32, (rows, cols)),),
        (buf("out0", torch.float32, (cols,)),),
        (S(cols),),
        (S(rows),),
        (Store("out0", i0, value),),
    )
    return kernel, [x], [x.sum(0)], {}


def argmax_rows(rows=4, cols=11):
    x = torch.randn(rows, cols)
    value = ir.reduce("argmax", ir.load("in0", i0 * cols + r0, torch.float32), torch.int64)
    kernel = Kernel(
        "argmax",
        (buf("in0", torch.float32, (rows, cols)),),
        (buf("out0", torch.int64, (rows,)),),
        (S(rows),),
        (S(cols),),
        (Store("out0", i0, value),),
    )
    return kernel, [x], [x.argmax(1)], {}


def cat_rows(m1=3, m2=4, n=6):
    """torch.cat([a, b]) along dim 0 with masked loads."""
    a, b = torch.randn(m1, n), torch.randn(m2, n)
    in_a = ir.op("lt", ir.index_value(i0), ir.const(m1, torch.int64), dtype=torch.bool)
    in_b = ir.op("logical_not", in_a, dtype=torch.bool)
    la = ir.load("in0", i0 * n + i1, torch.float32, mask=in_a)
    lb = ir.load("in1", (i0 - m1) * n + i1, torch.float32, mask=in_b)
    value = ir.op("where", in_a, la, lb, dtype=torch.float32)
    kernel = Kernel(
        "cat",
        (buf("in0", torch.float32, (m1, n)), buf("in1", torch.float32, (m2, n))),
        (buf("out0", torch.float32, (m1 + m2, n)),),
        (S(m1 + m2), S(n)),
        (),
        (Store("out0", i0 * n + i1, value),),
    )
    return kernel, [a, b], [torch.cat([a, b])], {}


def gather_rows(vocab=10, n=8, count=5):
    """Embedding lookup: out[i, j] = table[idx[i], j] * 2 (an indirect load)."""
    table = torch.randn(vocab, n)
    idx = torch.randint(0, vocab, (count,))
    t0 = indirect_var(0)
    row = ir.load("in1", i0, torch.int64)
    value = ir.op(
        "mul",
        ir.load("in0", t0 * n + i1, torch.float32, indirect=((t0, row),)),
        ir.const(2.0, torch.float32),
        dtype=torch.float32,
    )
    kernel = Kernel(
        "gather",
        (buf("in0", torch.float32, (vocab, n)), buf("in1", torch.int64, (count,))),
        (buf("out0", torch.float32, (count, n)),),
        (S(count), S(n)),
        (),
        (Store("out0", i0 * n + i1, value),),
    )
    return kernel, [table, idx], [table[idx] * 2], {}


def dynamic_scale(rows=6, cols=10):
    """Sizes as runtime arguments: s0 rows, s1 columns, a strided (transposed) output."""
    s0, s1 = (
        sympy.Symbol("s0", integer=True, positive=True),
        sympy.Symbol("s1", integer=True, positive=True),
    )
    x = torch.randn(rows, cols)
    value = ir.op(
        "where",
        ir.op(
            "gt",
            ir.load("in0", i0 * s1 + i1, torch.float32),
            ir.const(0.0, torch.float32),
            dtype=torch.bool,
        ),
        ir.load("in0", i0 * s1 + i1, torch.float32),
        ir.cast(ir.index_value(i1), torch.float32),
        dtype=torch.float32,
    )
    kernel = Kernel(
        "dynamic",
        (buf("in0", torch.float32, (s0, s1)),),
        (buf("out0", torch.float32, (s0, s1), (1, s0)),),
        (s0, s1),
        (),
        (Store("out0", i0 + i1 * s0, value),),
    )
    expected = torch.where(x > 0, x, torch.arange(cols, dtype=torch.float32).expand(rows, cols))
    return kernel, [x], [expected], {"s0": rows, "s1": cols}


def mixed_precision(n=7, dtype=torch.float16):
    """16-bit loads and stores computed in fp32: sigmoid(x) * y, cast back."""
    x, y = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    value = ir.op(
        "mul",
        ir.op("sigmoid", ir.load("in0", i0, dtype), dtype=dtype),
        ir.load("in1", i0, dtype),
        dtype=dtype,
    )
    kernel = Kernel(
        "mixed",
        (buf("in0", dtype, (n,)), buf("in1", dtype, (n,))),
        (buf("out0", dtype, (n,)),),
        (S(n),),
        (),
        (Store("out0", i0, value),),
    )
    return kernel, [x, y], [(torch.sigmoid(x.float()) * y.float()).to(dtype)], {}


EXAMPLES = {
    "add_broadcast": add_broadcast,
    "transposed_read": transposed_read,
    "softmax": softmax,
    "layer_norm": layer_norm,
    "column_sum": column_sum,
    "argmax": argmax_rows,
    "cat": cat_rows,
    "gather": gather_rows,
    "dynamic": dynamic_scale,
    "fp16": mixed_precision,
    "bf16": lambda: mixed_precision(dtype=torch.bfloat16),
    "softmax_bf16": lambda: softmax(dtype=torch.bfloat16),
}


def allocate_outputs(kernel, sizes):
    """Empty output tensors with each output buffer's shape and strides at `sizes`."""

    def ev(expr):
        expr = sympy.sympify(expr)
        return int(expr.subs({s: sizes[s.name] for s in expr.free_symbols}))

    return [
        torch.empty_strided([ev(s) for s in b.shape], [ev(s) for s in b.stride], dtype=b.dtype)
        for b in kernel.outputs
    ]
