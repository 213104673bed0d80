"""The Triton backend, run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1).

Every kernel is compared with eager torch (the examples' expectations, or torch ops on the
same inputs), not with another backend. Shapes are small: the interpreter costs ~1.8 ms per
program, and the block sizes make most launches one program.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys

import pytest
import sympy
import torch

pytest.importorskip("triton")

from memopt.backends.reference import POINTWISE_FUNCTIONS  # noqa: E402
from memopt.backends.triton import (  # noqa: E402
    compile_kernel,
    launching,  # noqa: E402
    render,
)
from memopt.backends.triton import runtime as triton_runtime  # noqa: E402
from memopt.backends.triton.runtime import cache_dir  # noqa: E402
from memopt.compiler import kernel_ir as ir  # noqa: E402
from memopt.compiler.kernel_ir import (  # noqa: E402
    Kernel,
    Store,
    index_var,
    reduction_var,
)

import kernel_examples as examples  # noqa: E402

# The module (the package re-exports its `render` function under the same name).
render_module = importlib.import_module("memopt.backends.triton.render")

i0, i1, i2 = index_var(0), index_var(1), index_var(2)
r0 = reduction_var(0)
S = sympy.Integer
f32 = torch.float32


def tolerance(dtype):
    return {torch.float16: (2e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5)}.get(dtype, (1.3e-6, 1e-5))


def run(kernel, inputs, sizes=None):
    sizes = sizes or {}
    outputs = examples.allocate_outputs(kernel, sizes)
    compile_kernel(kernel)(inputs, outputs, sizes)
    return outputs


def assert_matches(got, want, name=""):
    rtol, atol = tolerance(want.dtype)
    torch.testing.assert_close(
        got, want, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{name}: {m}"
    )


# -- the shared examples ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["softmax", "layer_norm", "column_sum", "argmax", "softmax_bf16"])
def test_looped_reductions_match_eager(name, monkeypatch):
    """Rows longer than one block: one loop per level of dependent reductions."""
    monkeypatch.setattr(render_module, "PERSISTENT_MAX", 2)
    monkeypatch.setattr(render_module, "LOOP_RBLOCK", 4)
    kernel, inputs, expected, sizes = examples.EXAMPLES[name]()
    rendered = render(kernel)
    assert rendered.looped and not rendered.persistent
    assert rendered.source.count("for roffset in range(0, rnumel, RBLOCK):") >= 1
    for got, want in zip(run(kernel, inputs, sizes), expected):
        assert_matches(got, want, name)


@pytest.mark.parametrize("build", [examples.softmax, examples.layer_norm], ids=lambda b: b.__name__)
def test_rows_of_5000_loop_at_the_default_threshold(build):
    kernel, inputs, expected, sizes = build(rows=3, cols=5000)
    rendered = render(kernel)
    assert rendered.looped and rendered.rblock == render_module.LOOP_RBLOCK
    for got, want in zip(run(kernel, inputs, sizes), expected):
        assert_matches(got, want, kernel.name)


def test_layer_norm_loops_once_per_dependency_level(monkeypatch):
    monkeypatch.setattr(render_module, "PERSISTENT_MAX", 2)
    kernel, *_ = examples.layer_norm()
    source = render(kernel).source
    # mean, then the variance of values centred on it, then the stores: three loops.
    assert source.count("for roffset") == 3
    # The rstd row store comes once per row, after the loops (at the kernel's indent).
    assert "\n    tl.store(out1 + (i0)" in source


def test_persistent_reduction_when_the_row_fits():
    kernel, *_ = examples.softmax(cols=1000)
    rendered = render(kernel)
    assert rendered.persistent and not rendered.looped and rendered.rblock == 1024
    assert "for roffset" not in rendered.source
    assert "tl.sum(" in rendered.source and "tl.max(" in rendered.source


# -- pointwise ops against torch ----------------------------------------------------------

SPECIAL = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 0.5, -0.5, 1.5, 2.5, -2.5]
SPECIAL += [1e-6, -1e-6, 3.0, -3.0, 1.0, -1.0]

# The ops against the torch functions that define them (the reference backend's table).
FLOAT_UNARY = {
    op: POINTWISE_FUNCTIONS[op]
    for op in "neg abs exp exp2 expm1 log log2 log1p sqrt rsqrt sin cos tan tanh sigmoid "
    "erf relu reciprocal sign floor ceil trunc round square".split()
}
FLOAT_BINARY = {
    op: POINTWISE_FUNCTIONS[op]
    for op in "add sub mul truediv floordiv truncdiv remainder fmod pow maximum minimum "
    "atan2".split()
}


def family_kernel(name, ops, dtype, arity, n):
    """One kernel applying every op to in0 (and in1), one output each: one launch."""
    a, b = ir.load("in0", i0, dtype), ir.load("in1", i0, dtype)
    stores, outputs = [], []
    for k, (op, out_dtype) in enumerate(ops):
        value = ir.op(op, *(a, b)[:arity], dtype=out_dtype)
        stores.append(Store(f"out{k}", i0, value))
        outputs.append(examples.buf(f"out{k}", out_dtype, (n,)))
    inputs = (examples.buf("in0", dtype, (n,)), examples.buf("in1", dtype, (n,)))
    return Kernel(name, inputs, tuple(outputs), (S(n),), (), tuple(stores))


def test_float_pointwise_ops_match_torch_at_special_values():
    x = torch.cat([torch.randn(48) * 3, torch.tensor(SPECIAL)])
    y = torch.cat([torch.randn(48) * 2, torch.tensor(SPECIAL).flip(0)])
    for table, arity in ((FLOAT_UNARY, 1), (FLOAT_BINARY, 2)):
        kernel = family_kernel(f"ops{arity}", [(op, f32) for op in table], f32, arity, x.numel())
        for (op, fn), got in zip(table.items(), run(kernel, [x, y])):
            assert_matches(got, fn(*(x, y)[:arity]), op)


def test_expm1_log1p_tanh_keep_relative_precision_near_zero():
    x = torch.tensor([1e-8, -3e-7, 2e-5, -1e-3, 0.1, -0.3])
    ops = {"expm1": torch.expm1, "log1p": torch.log1p, "tanh": torch.tanh}
    kernel = family_kernel("small", [(op, f32) for op in ops], f32, 1, x.numel())
    for (op, fn), got in zip(ops.items(), run(kernel, [x, x])):
        torch.testing.assert_close(got, fn(x.double()).float(), rtol=2e-6, atol=0, msg=op)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8], ids=str)
def test_integer_and_bool_ops_match_torch(dtype):
    n = 40
    x = torch.randint(-20, 20, (n,), dtype=dtype)
    y = torch.randint(1, 7, (n,), dtype=dtype) * torch.where(torch.rand(n) < 0.5, -1, 1).to(dtype)
    binary = {
        "floordiv": lambda a, b: torch.div(a, b, rounding_mode="floor"),
        "truncdiv": lambda a, b: torch.div(a, b, rounding_mode="trunc"),
        "remainder": torch.remainder,
        "fmod": torch.fmod,
        "maximum": torch.maximum,
        "minimum": torch.minimum,
        "bitwise_and": torch.bitwise_and,
        "bitwise_xor": torch.bitwise_xor,
        "add": torch.add,
        "mul": torch.mul,
    }
    unary = {"sign": torch.sign, "abs": torch.abs, "neg": torch.neg, "relu": torch.relu}
    kernel = family_kernel("int2", [(op, dtype) for op in binary], dtype, 2, n)
    for (op, fn), got in zip(binary.items(), run(kernel, [x, y])):
        torch.testing.assert_close(got, fn(x, y), msg=op)
    kernel = family_kernel("int1", [(op, dtype) for op in unary], dtype, 1, n)
    for (op, fn), got in zip(unary.items(), run(kernel, [x, y])):
        torch.testing.assert_close(got, fn(x), msg=op)
    # bool operands: add is `or`, mul is `and`, as torch's bool arithmetic
    bx, by = x > 0, y < 0
    bools = {"add": torch.add, "mul": torch.mul, "maximum": torch.maximum}
    bools |= {"logical_xor": torch.logical_xor, "bitwise_or": torch.bitwise_or}
    kernel = family_kernel("bool2", [(op, torch.bool) for op in bools], torch.bool, 2, n)
    for (op, fn), got in zip(bools.items(), run(kernel, [bx, by])):
        torch.testing.assert_close(got, fn(bx, by), msg=op)


def test_mixed_dtypes_meet_in_the_result_dtype():
    """exp of an int64 index and int + float: operands convert first, as in torch."""
    x = torch.arange(-4, 5)
    index = ir.load("in0", i0, torch.int64)
    exp = ir.op("exp", ir.op("mul", index, ir.const(0.5, f32), dtype=f32), dtype=f32)
    shifted = ir.op("add", index, ir.const(0.25, f32), dtype=f32)
    kernel = Kernel(
        "mixed_dtypes",
        (examples.buf("in0", torch.int64, (9,)),),
        (examples.buf("out0", f32, (9,)), examples.buf("out1", f32, (9,))),
        (S(9),),
        (),
        (Store("out0", i0, exp), Store("out1", i0, shifted)),
    )
    got = run(kernel, [x])
    torch.testing.assert_close(got[0], torch.exp(x * 0.5))
    torch.testing.assert_close(got[1], x + 0.25)


def test_pow_by_a_small_constant_multiplies():
    x = torch.randn(16)
    value = ir.op("pow", ir.load("in0", i0, f32), ir.const(3.0, f32), dtype=f32)
    kernel = Kernel(
        "cube",
        (examples.buf("in0", f32, (16,)),),
        (examples.buf("out0", f32, (16,)),),
        (S(16),),
        (),
        (Store("out0", i0, value),),
    )
    source = render(kernel).source
    assert "tmp0 * tmp0 * tmp0" in source and "_pow" not in source
    torch.testing.assert_close(run(kernel, [x])[0], x**3)


# -- reductions ---------------------------------------------------------------------------


def reduction_kernel(rows, cols, reductions, dtype=f32):
    """out<k>[i] = reductions[k](in0[i, :]) for (name, result dtype) in `reductions`."""
    operand = ir.load("in0", i0 * cols + r0, dtype)
    values = [ir.reduce(name, operand, out_dtype) for name, out_dtype in reductions]
    return Kernel(
        "reductions",
        (examples.buf("in0", dtype, (rows, cols)),),
        tuple(examples.buf(f"out{k}", v.dtype, (rows,)) for k, v in enumerate(values)),
        (S(rows),),
        (S(cols),),
        tuple(Store(f"out{k}", i0, v) for k, v in enumerate(values)),
    )


@pytest.mark.parametrize("looped", [False, True], ids=["persistent", "looped"])
def test_max_min_argmax_argmin_propagate_nan_and_take_the_first_tie(looped, monkeypatch):
    if looped:
        monkeypatch.setattr(render_module, "PERSISTENT_MAX", 2)
        monkeypatch.setattr(render_module, "LOOP_RBLOCK", 4)
    x = torch.randn(6, 9)
    x[1, 3] = float("nan")  # one nan
    x[2, :] = float("-inf")  # all -inf: argmax is 0
    x[3, 2] = x[3, 5] = 10.0  # a tie for the max
    x[4, 7] = x[4, 1] = float("nan")  # the first nan wins
    x[5, 4] = x[5, 8] = -10.0  # a tie for the min
    eager = {
        "max": lambda t: t.amax(1),
        "min": lambda t: t.amin(1),
        "argmax": lambda t: t.argmax(1),
        "argmin": lambda t: t.argmin(1),
        "sum": lambda t: t.sum(1),
        "prod": lambda t: t.prod(1),
    }
    reductions = [(name, torch.int64 if "arg" in name else f32) for name in eager]
    kernel = reduction_kernel(6, 9, reductions)
    assert render(kernel).looped == looped
    for (name, fn), got in zip(eager.items(), run(kernel, [x])):
        assert_matches(got, fn(x), name)


@pytest.mark.parametrize("looped", [False, True], ids=["persistent", "looped"])
def test_integer_and_bool_reductions(looped, monkeypatch):
    if looped:
        monkeypatch.setattr(render_module, "PERSISTENT_MAX", 2)
        monkeypatch.setattr(render_module, "LOOP_RBLOCK", 4)
    x = torch.randint(-1000, 1000, (4, 7), dtype=torch.int32)
    reductions = [("sum", torch.int64), ("max", torch.int32), ("argmin", torch.int64)]
    got = run(reduction_kernel(4, 7, reductions, torch.int32), [x])
    for g, want in zip(got, (x.sum(1), x.amax(1), x.argmin(1))):
        torch.testing.assert_close(g, want)
    b = torch.rand(4, 7) > 0.7
    reductions = [("any", torch.bool), ("all", torch.bool), ("sum", torch.int64)]
    got = run(reduction_kernel(4, 7, reductions, torch.bool), [b])
    for g, want in zip(got, (b.any(1), b.all(1), b.sum(1))):
        torch.testing.assert_close(g, want)


def test_empty_rows_reduce_to_the_identity():
    reductions = [("sum", f32), ("max", f32), ("argmax", torch.int64)]
    got = run(reduction_kernel(3, 0, reductions), [torch.randn(3, 0)])
    torch.testing.assert_close(got[0], torch.zeros(3))
    torch.testing.assert_close(got[1], torch.full((3,), float("-inf")))
    torch.testing.assert_close(got[2], torch.zeros(3, dtype=torch.int64))


# -- layouts ------------------------------------------------------------------------------


def test_transposed_read_gets_a_2d_tile_and_plain_reads_do_not():
    transposed, inputs, expected, sizes = examples.transposed_read()
    rendered = render(transposed)
    assert rendered.tile == (0, 1)  # read fastest along i0, stored along i1
    assert "YBLOCK" in rendered.params and "tl.arange(0, YBLOCK)[:, None]" in rendered.source
    torch.testing.assert_close(run(transposed, inputs, sizes)[0], expected[0])
    plain, *_ = examples.add_broadcast()
    assert render(plain).tile is None
    assert "YBLOCK" not in render(plain).source


def test_2d_tile_with_outer_ranges_and_symbolic_sizes():
    s0 = sympy.Symbol("s0", integer=True, positive=True)
    # out[b, m, n] = x[b, n, m] * 2: a batched transpose, batch size symbolic.
    x = torch.randn(3, 7, 5)
    value = ir.op("mul", ir.load("in0", i0 * 35 + i2 * 5 + i1, f32), ir.const(2.0, f32), dtype=f32)
    kernel = Kernel(
        "batched_transpose",
        (examples.buf("in0", f32, (s0, 7, 5)),),
        (examples.buf("out0", f32, (s0, 5, 7)),),
        (s0, S(5), S(7)),
        (),
        (Store("out0", i0 * 35 + i1 * 7 + i2, value),),
    )
    rendered = render(kernel)
    assert rendered.tile == (1, 2)
    # The batch folds into the tile's y extent: one 1D grid, no program per batch.
    assert "tl.program_id(1)" not in rendered.source
    (got,) = run(kernel, [x], {"s0": 3})
    torch.testing.assert_close(got, x.transpose(1, 2) * 2)


def test_int64_indexing_only_past_2_31():
    big = 2**31 + 8
    value = ir.op("neg", ir.load("in0", i0, f32), dtype=f32)

    def kernel(n):
        buffers = (examples.buf("in0", f32, (n,)),), (examples.buf("out0", f32, (n,)),)
        return Kernel("negate", *buffers, (S(n),), (), (Store("out0", i0, value),))

    assert "tl.program_id(0).to(tl.int64)" in render(kernel(big)).source
    assert "tl.int64" not in render(kernel(1000)).source
    dynamic, *_ = examples.dynamic_scale()  # symbolic sizes: int64
    assert "tl.program_id(0).to(tl.int64)" in render(dynamic).source


# -- the generated source -----------------------------------------------------------------


def test_source_is_valid_python_without_libdevice():
    kernels = [build()[0] for build in examples.EXAMPLES.values()]
    kernels.append(family_kernel("ops1", [(op, f32) for op in FLOAT_UNARY], f32, 1, 8))
    kernels.append(family_kernel("ops2", [(op, f32) for op in FLOAT_BINARY], f32, 2, 8))
    for kernel in kernels:
        source = render(kernel).source
        ast.parse(source)
        assert "libdevice" not in source and "tl.math.pow" not in source


def test_helpers_are_emitted_only_when_called():
    softmax, *_ = examples.softmax()
    assert "\ndef _" not in render(softmax).source
    rounding = family_kernel("rounding", [("round", f32)], f32, 1, 8)
    source = render(rounding).source
    assert source.count("\ndef _") == 1 and "def _round_half_even(" in source


def test_bf16_is_computed_in_fp32():
    kernel, *_ = examples.mixed_precision(dtype=torch.bfloat16)
    source = render(kernel).source
    assert ".to(tl.float32)" in source  # loads upcast
    assert "0x7FFF" in source  # the store rounds to nearest even by integer ops


def test_rendering_is_deterministic_and_reads_like_the_kernel():
    kernel, *_ = examples.add_broadcast()
    source = render(kernel).source
    assert source == render(examples.add_broadcast()[0]).source
    body = source.split("@triton.jit\n")[-1]
    assert body.splitlines() == [
        "def memopt_add_broadcast(in0, in1, out0, xnumel, rnumel, XBLOCK: tl.constexpr):",
        "    xindex = tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK)",
        "    xmask = xindex < 35",
        "    i0 = xindex // 5",
        "    i1 = xindex % 5",
        "    tmp0 = tl.load(in0 + (5 * i0 + i1), xmask, other=0)",
        "    tmp1 = tl.load(in1 + (i1), xmask, other=0)",
        "    tmp2 = tl.full([1], 2.0, tl.float32)",
        "    tmp3 = (tmp1 * tmp2)",
        "    tmp4 = (tmp0 + tmp3)",
        "    tl.store(out0 + (5 * i0 + i1), tmp4, xmask)",
    ]


# -- the runtime --------------------------------------------------------------------------


def test_kernels_are_cached_on_disk_by_source_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOPT_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path / "triton"
    kernel, inputs, expected, sizes = examples.add_broadcast()
    first = compile_kernel(kernel)
    second = compile_kernel(examples.add_broadcast()[0])
    assert first.source_path == second.source_path
    assert list((tmp_path / "triton").glob("*.py")) == [first.source_path]
    assert len(first.source_path.stem) == 16
    torch.testing.assert_close(run(kernel, inputs, sizes)[0], expected[0])


def test_a_process_level_cache_miss_reloads_from_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOPT_CACHE_DIR", str(tmp_path))
    kernel, inputs, expected, sizes = examples.cat_rows()
    compiled = compile_kernel(kernel)
    torch.testing.assert_close(run(kernel, inputs, sizes)[0], expected[0])
    before = compiled.source_path.stat()
    triton_runtime.clear_memory_cache()
    assert not launching._MODULES
    torch.testing.assert_close(run(kernel, inputs, sizes)[0], expected[0])  # imports again
    after = compiled.source_path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    assert len(launching._MODULES) == 1


def test_a_cpu_launch_sets_the_interpreter_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    triton_runtime.clear_memory_cache()  # the next launch imports its module
    kernel, inputs, expected, sizes = examples.gather_rows()
    torch.testing.assert_close(run(kernel, inputs, sizes)[0], expected[0])
    assert os.environ["TRITON_INTERPRET"] == "1"


def test_symbolic_sizes_are_runtime_arguments():
    kernel, inputs, expected, sizes = examples.dynamic_scale()
    rendered = render(kernel)
    assert rendered.size_names == ["s0", "s1"]
    assert rendered.params[:4] == ["in0", "out0", "s0", "s1"]
    assert "s0" in rendered.source.split("def ")[-1].split(")")[0]
    torch.testing.assert_close(run(kernel, inputs, sizes)[0], expected[0])
    # The same compiled kernel at other sizes.
    kernel, inputs, expected, sizes = examples.dynamic_scale(rows=3, cols=17)
    torch.testing.assert_close(run(kernel, inputs, sizes)[0], expected[0])


@pytest.mark.slow
def test_interpreter_without_the_variable_in_the_environment():
    # torch.compile imports triton before any backend runs: with TRITON_INTERPRET unset
    # then, Triton's own helpers (tl.sum) are compiled-mode functions, which an interpreted
    # kernel cannot call unless the runtime makes them interpretable.
    code = """
import torch
g = lambda x: (x.exp() + 1).sum(-1)
x = torch.randn(8, 16)
got = torch.compile(g, backend="memopt", options={"backend": "triton"})(x)
torch.testing.assert_close(got, g(x))
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
