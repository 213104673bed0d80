"""The C++ backend beyond the conformance suite (backends/test_conformance.py): casts and
16-bit rounding, integer division by zero, layouts and sizes 0, 1, 7, 1000, loop shapes and
tiles, in-place outputs and memory reuse, the on-disk cache surviving damaged entries, and
falling back when there is no compiler.

Compiling costs ~0.3 s per kernel, so ops are batched: one kernel computes many ops, one
output each, and kernels with symbolic sizes and strides run at many shapes per compile.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest
import sympy
import torch
from torch.testing import assert_close

from memopt.backends import reference
from memopt.backends.cpp import CompileError, CompilerNotFound, build, codegen, compile_kernel
from memopt.backends.runtime.kernels import FusedKernel
from memopt.compiler import kernel_ir as ir
from memopt.compiler.kernel_ir import Kernel, Store, indirect_var, reduction_var

import kernel_examples as examples
from kernel_examples import S, buf, i0, i1
from lowering_harness import fused_kernels, run_fused

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX") or "g++") is None, reason="needs a C++ compiler"
)

f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
i64, i32, i16, i8, u8, b8 = (
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
r0, r1 = reduction_var(0), reduction_var(1)
N = 97  # not a multiple of any vector width: every loop has a tail


def run_both(kernel: Kernel, inputs: list[torch.Tensor], sizes=None):
    """(C++ outputs, reference outputs) of `kernel` on `inputs`."""
    sizes = sizes or {}
    got = examples.allocate_outputs(kernel, sizes)
    want = examples.allocate_outputs(kernel, sizes)
    compile_kernel(kernel)(inputs, got, sizes)
    reference.compile_kernel(kernel)(inputs, want, sizes)
    return got, want


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    assert got.dtype == want.dtype, what
    if got.dtype.is_floating_point:
        assert_close(got, want, equal_nan=True, msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(got, want), f"{what}: {got} != {want}"


# --- pointwise ops ---------------------------------------------------------------------


def test_integer_pow_with_negative_exponents():
    base = torch.tensor([-3, -2, -1, 0, 1, 2, 3] * 3)
    exponent = torch.tensor([-2] * 7 + [-1] * 7 + [3] * 7)
    kernel = examples_pointwise("pow", [i64, i64], i64, len(base))
    got, want = run_both(kernel, [base, exponent])
    assert torch.equal(got[0], want[0])


POW_SPECIALS = [
    -float("inf"),
    -2.5,
    -1.0,
    -0.0,
    0.0,
    1e-30,
    0.3,
    3.7,
    1e20,
    float("inf"),
    float("nan"),
]


POW_CASES = [
    *((c, dtype) for c in (1.0, 2.0, 3.0, 0.5, -0.5, -1.0, -2.0, 2.5) for dtype in (f32, f64)),
    *((c, i64) for c in (1.0, 2.0, 3.0)),  # integer pow takes integer exponents
]


@pytest.mark.parametrize(("exponent", "dtype"), POW_CASES)
def test_pow_by_a_constant_is_exact_like_aten(exponent, dtype):
    """x ** c for the constants ATen's CPU kernel computes by multiplication, sqrt or a
    reciprocal is rendered so (no libm pow per element) and equals eager bit for bit,
    special values included; other exponents keep the pow call."""
    x = torch.tensor(POW_SPECIALS).to(dtype) if dtype.is_floating_point else torch.arange(-6, 7)
    c = exponent if dtype.is_floating_point else int(exponent)
    value = ir.op("pow", ir.load("in0", i0, dtype), ir.const(c, dtype), dtype=dtype)
    n = len(x)
    kernel = Kernel(
        "pow_c",
        (buf("in0", dtype, (n,)),),
        (buf("out0", dtype, (n,)),),
        (S(n),),
        (),
        (Store("out0", i0, value),),
    )
    compiled = compile_kernel(kernel)
    out = torch.empty_like(x)
    compiled([x], [out], {})
    want = torch.pow(x, c)
    generic = exponent == 2.5  # a vector libm pow: within an ulp, not exact
    body = compiled.source.split("memopt_kernel(")[1]  # the kernel, not its packed entry
    assert ("mo_pow(" in body) == generic
    assert torch.equal(out.isnan(), want.isnan())
    if generic:
        assert_close(out, want, equal_nan=True)
    else:
        assert torch.equal(out[~out.isnan()], want[~want.isnan()]), (out, want)


def examples_pointwise(op: str, in_dtypes, out_dtype, n: int) -> Kernel:
    loads = [ir.load(f"in{k}", i0, dtype) for k, dtype in enumerate(in_dtypes)]
    return Kernel(
        op,
        tuple(buf(f"in{k}", dtype, (n,)) for k, dtype in enumerate(in_dtypes)),
        (buf("out0", out_dtype, (n,)),),
        (S(n),),
        (),
        (Store("out0", i0, ir.op(op, *loads, dtype=out_dtype)),),
    )


@pytest.mark.parametrize("op", ["floordiv", "truncdiv", "remainder", "fmod"])
def test_integer_division_by_zero_raises_like_the_reference(op):
    kernel = examples_pointwise(op, [i64, i64], i64, 4)
    a, b = torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 1, 1])
    for backend in (compile_kernel, reference.compile_kernel):
        with pytest.raises(RuntimeError, match="ZeroDivisionError"):
            backend(kernel)([a, b], [torch.empty(4, dtype=i64)], {})


def test_casts_and_16bit_rounding():
    """Casts round into 16-bit floats (round to nearest even) and back; float -> int truncates;
    a 16-bit chain keeps float32 intermediates; constants round to their dtype."""
    x = torch.randn(N) * 100
    lx = ir.load("in0", i0, f32)
    half = ir.load("in1", i0, f16)
    chain = ir.op("sub", ir.op("add", half, ir.const(1e-3, f16), dtype=f16), half, dtype=f16)
    values = [
        ir.cast(ir.cast(lx, bf16), f32),
        ir.cast(ir.cast(lx, f16), f32),
        ir.cast(lx, i32),
        ir.cast(lx, u8),
        ir.cast(lx, b8),
        ir.cast(ir.cast(lx, f64), bf16),
        chain,
        ir.cast(ir.index_value(i0 * 3), f16),
    ]
    out_dtypes = [f32, f32, i32, u8, b8, bf16, f32, f16]
    kernel = Kernel(
        "casts",
        (buf("in0", f32, (N,)), buf("in1", f16, (N,))),
        tuple(buf(f"out{k}", d, (N,)) for k, d in enumerate(out_dtypes)),
        (S(N),),
        (),
        tuple(Store(f"out{k}", i0, v) for k, v in enumerate(values)),
    )
    x[:4] = torch.tensor([float("nan"), 0.5, 1.5, -2.5])
    inputs = [x, (torch.randn(N) * 100).to(f16)]
    got, want = run_both(kernel, inputs)
    u8_in_range = (x >= 0) & (x < 256)  # out of range is undefined in C++ and ATen alike
    for k, (g, w) in enumerate(zip(got, want)):
        if k == 3:
            g, w = g[u8_in_range], w[u8_in_range]
        if k in (2, 3):
            g, w = g[1:], w[1:]  # NaN to int is undefined too
        assert torch.equal(g, w) or g.dtype.is_floating_point and torch.equal(g.isnan(), w.isnan())


def test_16bit_conversions_without_float16_type():
    """The prelude's portable fp16 conversions (no _Float16) agree with torch bit for bit."""
    source = (
        "#define MO_NO_FLOAT16\n"
        + codegen.PRELUDE
        + 'extern "C" void to_float(const uint16_t* h, float* f, int64_t n) {'
        + " for (int64_t i = 0; i < n; ++i) f[i] = mo_h2f(h[i]); }\n"
        + 'extern "C" void to_half(const float* f, uint16_t* h, int64_t n) {'
        + " for (int64_t i = 0; i < n; ++i) h[i] = mo_f2h(f[i]); }\n"
    )
    library, _ = build.library(source)
    import ctypes

    def call(name, src, dst):
        getattr(library, name)(
            ctypes.c_void_p(src.data_ptr()),
            ctypes.c_void_p(dst.data_ptr()),
            ctypes.c_int64(src.numel()),
        )

    halves = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(f16)
    floats = torch.empty(1 << 16)
    call("to_float", halves.view(torch.int16), floats)
    assert torch.equal(floats.isnan(), halves.float().isnan())
    assert torch.equal(floats.nan_to_num(), halves.float().nan_to_num())
    sweep = torch.cat([torch.randn(100_000) * s for s in (1e-7, 1e-4, 1.0, 1e3, 7e4)])
    sweep = torch.cat([sweep, floats[~floats.isnan()], torch.tensor([65519.0, 65520.0, 1e9])])
    rounded = torch.empty(sweep.numel(), dtype=torch.int16)
    call("to_half", sweep, rounded)
    assert torch.equal(rounded.view(f16).float(), sweep.to(f16).float())


# --- reductions ------------------------------------------------------------------------

s0, s1, s2 = (sympy.Symbol(f"s{k}", integer=True, positive=True) for k in range(3))


def test_reduction_over_non_adjacent_axes():
    """Reduce dims 0 and 2 of (a, rows, b): the reduction variables do not merge: nested loops."""
    a, rows, b = 3, 4, 37
    x = torch.randn(a, rows, b)
    lx = ir.load("in0", r0 * (rows * b) + i0 * b + r1, f32)
    kernel = Kernel(
        "non_adjacent",
        (buf("in0", f32, (a, rows, b)),),
        (buf("out0", f32, (rows,)), buf("out1", i64, (rows,)), buf("out2", f32, (a, rows, b))),
        (S(rows),),
        (S(a), S(b)),
        (
            Store("out0", i0, ir.reduce("sum", lx, f32)),
            Store("out1", i0, ir.reduce("argmax", lx, i64)),
            Store(
                "out2",
                r0 * (rows * b) + i0 * b + r1,
                ir.op("sub", lx, ir.reduce("max", lx, f32), dtype=f32),
            ),
        ),
    )
    got, want = run_both(kernel, [x])
    for g, w in zip(got, want):
        assert_same(g, w)
    assert "for (int64_t r0 = 0" in compile_kernel(kernel).source


def test_normalizations_at_many_widths():
    """softmax and layer_norm (two dependent reductions, row outputs) at symbolic sizes."""
    kernel_sm, *_ = examples.softmax(rows=3, cols=8)
    kernel_ln, *_ = examples.layer_norm(rows=3, cols=8)
    for kernel in (kernel_sm, kernel_ln):
        symbolic = kernel.reduction_ranges[0]
        for cols in (1, 7, 1000):
            resized = _resize(kernel, {symbolic: cols})
            inputs = [torch.randn(tuple(int(s) for s in b.shape)) for b in resized.inputs]
            got, want = run_both(resized, inputs)
            for g, w in zip(got, want):
                assert_same(g, w, f"{kernel.name} width {cols}")


def _resize(kernel: Kernel, changes: dict) -> Kernel:
    def sub(expr):
        return sympy.sympify(expr).xreplace(changes)

    def value(v):
        if v.op == "load":
            arg = v.arg._replace(index=sub(v.arg.index))
            return ir.Value("load", tuple(map(value, v.args)), v.dtype, arg)
        if v.op == "const" and v.arg == float(list(changes)[0]):
            return ir.const(float(list(changes.values())[0]), v.dtype)
        return ir.Value(v.op, tuple(map(value, v.args)), v.dtype, v.arg)

    def buffer(b):
        return ir.Buffer(b.name, b.dtype, tuple(map(sub, b.shape)), tuple(map(sub, b.stride)))

    return Kernel(
        kernel.name,
        tuple(map(buffer, kernel.inputs)),
        tuple(map(buffer, kernel.outputs)),
        tuple(map(sub, kernel.ranges)),
        tuple(map(sub, kernel.reduction_ranges)),
        tuple(Store(s.buffer, sub(s.index), value(s.value)) for s in kernel.stores),
    )


# --- layouts: strides, storage offsets, sizes 0, 1, 7, 1000 ------------------------------


def strided_kernel() -> Kernel:
    """out[i0, i1] = x[i0, i1] * 2 + y[i1] with x's strides and y's stride symbolic."""
    rows, cols, sx0, sx1, sy = (
        sympy.Symbol(n, integer=True, positive=True) for n in ("s0", "s1", "s2", "s3", "s4")
    )
    x = ir.load("in0", i0 * sx0 + i1 * sx1, f32)
    y = ir.load("in1", i1 * sy, f32)
    value = ir.op("add", ir.op("mul", x, ir.const(2.0, f32), dtype=f32), y, dtype=f32)
    return Kernel(
        "strided",
        (buf("in0", f32, (rows, cols), (sx0, sx1)), buf("in1", f32, (cols,), (sy,))),
        (buf("out0", f32, (rows, cols)),),
        (rows, cols),
        (),
        (Store("out0", i0 * cols + i1, value),),
    )


def _layouts(rows: int, cols: int):
    yield "contiguous", torch.randn(rows, cols)
    yield "transposed", torch.randn(cols, rows).t()
    yield "offset", torch.randn(rows + 2, cols + 3)[2:, 3:]
    yield "broadcast", torch.randn(1, cols).expand(rows, cols)


@pytest.mark.parametrize("size", [0, 1, 7, 1000])
def test_layouts_and_sizes(size):
    kernel = strided_kernel()
    compiled = compile_kernel(kernel)
    for rows, cols in {(size, 3), (3, size), (size, size)}:
        y = torch.randn(cols * 2)[1::2]  # a strided, offset vector
        for name, x in _layouts(rows, cols):
            sizes = {"s0": rows, "s1": cols, "s2": x.stride(0), "s3": x.stride(1), "s4": 2}
            out = torch.full((rows, cols), float("nan"))
            compiled([x, y], [out], sizes)
            assert torch.equal(out, x * 2 + y), f"{name} {rows}x{cols}"


def test_output_layouts_and_offsets():
    """Storing into a transposed view of an offset tensor, as in the reference tests."""
    m, n = 5, 3
    kernel = Kernel(
        "transpose_store",
        (buf("in0", f32, (m, n)),),
        (buf("out0", f32, (m, n), (1, m)),),
        (S(m), S(n)),
        (),
        (Store("out0", i0 + i1 * m, ir.load("in0", i0 * n + i1, f32)),),
    )
    x = torch.randn(m, n)
    target = torch.zeros(n + 1, m)[1:].t()
    compile_kernel(kernel)([x], [target], {})
    assert torch.equal(target, x)


def test_reshape_index_with_div_and_mod():
    from torch.utils._sympy.functions import FloorDiv, ModularIndexing

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
    got, _ = run_both(kernel, [x])
    assert torch.equal(got[0], x.reshape(4, 6))


def test_masked_and_indirect_loads_never_read_out_of_bounds():
    vocab, n = 6, 4
    table, idx = torch.randn(vocab, n), torch.tensor([3, -1, 0, 5, -1_000_000_000])
    t0 = indirect_var(0)
    row = ir.load("in1", i0, i64)
    valid = ir.op("ge", row, ir.const(0, i64), dtype=b8)
    value = ir.load("in0", t0 * n + i1, f32, indirect=((t0, row),), mask=valid)
    kernel = Kernel(
        "padded_gather",
        (buf("in0", f32, (vocab, n)), buf("in1", i64, (5,))),
        (buf("out0", f32, (5, n)),),
        (S(5), S(n)),
        (),
        (Store("out0", i0 * n + i1, value),),
    )
    got, want = run_both(kernel, [table, idx])
    assert torch.equal(got[0], want[0])
    # An unmasked index outside the table raises, as the reference does, instead of reading.
    unmasked = ir.load("in0", t0 * n + i1, f32, indirect=((t0, row),))
    bad = Kernel(
        "bad_gather",
        kernel.inputs,
        kernel.outputs,
        kernel.ranges,
        (),
        (Store("out0", i0 * n + i1, unmasked),),
    )
    with pytest.raises(IndexError):
        compile_kernel(bad)([table, torch.tensor([0, 1, 2, 3, 6])], [torch.empty(5, n)], {})


def test_row_gathers_are_checked_once_per_row():
    """Must: an embedding lookup fused with LayerNorm reads each table row with plain
    contiguous loads, its index checked once per row (`_ok`). Must not: a gather whose
    index changes along the innermost loop (torch.gather along it) checks each element.
    Both raise IndexError for an index outside the table, as ATen does."""
    table, weight, bias = torch.randn(50, 32), torch.randn(32), torch.randn(32)
    ids = torch.randint(0, 50, (3, 7))

    def lookup(ids, table, weight, bias):
        return torch.nn.functional.layer_norm(table[ids], (32,), weight, bias)

    got, gm = run_fused(lookup, (ids, table, weight, bias), "cpp")
    assert_close(got, lookup(ids, table, weight, bias))
    (kernel,) = fused_kernels(gm)
    source = kernel._compiled["cpp"].source
    body = source[source.index(f'extern "C" int32_t {codegen.FUNCTION_NAME}') :]
    assert "_ok = " in body and "mo_checked(" not in body
    bad = ids.clone()
    bad[1, 4] = 50
    with pytest.raises(IndexError):
        gm(bad, table, weight, bias)

    x, index = torch.randn(6, 40), torch.randint(0, 40, (6, 40))
    got, gm = run_fused(lambda x, i: torch.gather(x * 2, 1, i) + 1, (x, index), "cpp")
    assert_close(got, torch.gather(x * 2, 1, index) + 1)
    sources = [k._compiled["cpp"].source for k in fused_kernels(gm)]
    start = f'extern "C" int32_t {codegen.FUNCTION_NAME}'
    assert any("mo_checked(" in s[s.index(start) :] for s in sources)


def test_kernel_reads_outputs_as_they_were_before_it():
    n = 7
    kernel = Kernel(
        "reverse",
        (),
        (buf("out0", f32, (n,)),),
        (S(n),),
        (),
        (Store("out0", i0, ir.load("out0", (n - 1) - i0, f32)),),
    )
    out = torch.arange(n, dtype=f32)
    compile_kernel(kernel)([], [out], {})
    assert torch.equal(out, torch.arange(n, dtype=f32).flip(0))


def test_refusals():
    full = ir.index_value(r0, f32)
    row_store_of_full = Kernel(
        "k", (), (buf("out0", f32, (4,)),), (S(4),), (S(3),), (Store("out0", i0, full),)
    )
    with pytest.raises(ValueError, match="row store"):
        compile_kernel(row_store_of_full)
    kernel = strided_kernel()
    with pytest.raises(ValueError, match="expected"):
        sizes = {"s0": 2, "s1": 3, "s2": 3, "s3": 1, "s4": 1}
        compile_kernel(kernel)([torch.randn(3, 2), torch.randn(3)], [torch.empty(2, 3)], sizes)


# --- the generated code ----------------------------------------------------------------


@pytest.mark.parametrize(
    "make, region",
    [
        (lambda: examples.add_broadcast(m=7, n=5), None),  # 35 points: one thread, no region
        (lambda: examples.softmax(rows=6, cols=1000), None),  # 6,000 points
        (lambda: examples.add_broadcast(m=256, n=256), "#pragma omp parallel for"),  # 65,536
        (lambda: examples.softmax(rows=64, cols=1000), "#pragma omp parallel"),
        (lambda: examples.dynamic_scale(), "MO_PARALLEL_WORK)"),  # symbolic: decided per call
    ],
    ids=["small pointwise", "small reduction", "large pointwise", "large reduction", "symbolic"],
)
def test_parallel_regions_only_where_the_work_can_use_them(make, region):
    """Static sizes decide at generation: under MO_PARALLEL_WORK points no OpenMP region
    (entering one costs ~0.4 us even with a false `if`), at or over it one with no `if`;
    symbolic sizes keep the run-time `if`. The results match the reference either way."""
    kernel, inputs, _, sizes = make()
    body = compile_kernel(kernel).source.split(f"{codegen.FUNCTION_NAME}(")[1]
    if region is None:
        assert "omp parallel" not in body
    else:
        assert region in body
        static = "MO_PARALLEL_WORK" not in body
        assert static == (not sizes)
    run_both(kernel, inputs, sizes)


def test_generated_code_shape():
    """OpenMP over rows, SIMD inner loops without index division, pointer-offset indexing."""
    kernel, *_ = examples.layer_norm(rows=4096, cols=1024)
    source = compile_kernel(kernel).source
    assert "#pragma omp parallel for" in source and "#pragma omp simd" in source
    inner_loops = re.findall(
        r"for \(int l = 0; l < MO_LANES; \+\+l\) \{\n(.*?)\n\s*\}", source, re.S
    )
    inner_loops += re.findall(
        r"for \(int64_t r = 0; r < n_r; \+\+r\) \{\n(.*?)\n\s*\}", source, re.S
    )
    assert len(inner_loops) == 3  # mean, variance, the normalized store
    for body in inner_loops:
        assert not re.search(r"[/%]", body.replace("mo_truediv", "")), body
        assert "in0[o" in body  # a hoisted row offset plus r
    kernel, *_ = examples.add_broadcast(m=64, n=32)
    source = compile_kernel(kernel).source
    assert "j < " in source and "in1[j]" in source


def test_contiguous_pointwise_dims_merge_into_one_loop():
    """A (N, C, H, W) pointwise kernel with a per-channel operand: H and W merge."""
    shape = (2, 3, 5, 7)
    x, scale = torch.randn(shape), torch.randn(3)
    i2, i3 = ir.index_var(2), ir.index_var(3)
    index = i0 * 105 + i1 * 35 + i2 * 7 + i3
    value = ir.op("mul", ir.load("in0", index, f32), ir.load("in1", i1, f32), dtype=f32)
    kernel = Kernel(
        "nchw",
        (buf("in0", f32, shape), buf("in1", f32, (3,))),
        (buf("out0", f32, shape),),
        tuple(S(s) for s in shape),
        (),
        (Store("out0", index, value),),
    )
    compiled = compile_kernel(kernel)
    assert "const int64_t n_j = 35;" in compiled.source  # i2 and i3 are one loop
    got, _ = run_both(kernel, [x, scale])
    assert torch.equal(got[0], x * scale[:, None, None])


# --- the cache and the compiler --------------------------------------------------------


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "_loaded", {})
    return build.cache_dir()


def _unique_kernel(constant: float) -> Kernel:
    value = ir.op("add", ir.load("in0", i0, f32), ir.const(constant, f32), dtype=f32)
    return Kernel(
        "unique",
        (buf("in0", f32, (8,)),),
        (buf("out0", f32, (8,)),),
        (S(8),),
        (),
        (Store("out0", i0, value),),
    )


def _check_runs(kernel: Kernel, constant: float) -> None:
    x, out = torch.randn(8), torch.empty(8)
    compile_kernel(kernel)([x], [out], {})
    assert torch.equal(out, x + constant)


def test_cache_rebuilds_truncated_and_corrupted_entries(fresh_cache, monkeypatch):
    compiles = []
    real_compile = build._compile_to
    monkeypatch.setattr(build, "_compile_to", lambda *a: compiles.append(1) or real_compile(*a))

    def entry(kernel):
        key = re.search(r"([0-9a-f]{64})", str(compile_kernel(kernel).source_path)).group(1)
        return fresh_cache / f"{key}.so", fresh_cache / f"{key}.sha256"

    # Truncated before anything loaded it (as a crash mid-copy would leave it).
    kernel = _unique_kernel(1.25)
    source = codegen.generate(kernel).source
    tools = build.toolchain()
    key = build.cache_key(source, tools)
    library_path = build.ensure_built(source, key, tools, fresh_cache)
    library_path.write_bytes(library_path.read_bytes()[:100])
    before = len(compiles)
    _check_runs(kernel, 1.25)
    assert len(compiles) == before + 1

    # Garbage with a matching checksum: the loader rejects it, and it is rebuilt.
    kernel = _unique_kernel(2.5)
    source = codegen.generate(kernel).source
    key = build.cache_key(source, tools)
    library_path = build.ensure_built(source, key, tools, fresh_cache)
    garbage = b"\x7fELF" + os.urandom(4000)
    library_path.write_bytes(garbage)
    (fresh_cache / f"{key}.sha256").write_text(build._digest_bytes(garbage))
    _check_runs(kernel, 2.5)
    assert build._intact(library_path, fresh_cache / f"{key}.sha256")

    # A cached entry is reused; a lost checksum or changed bytes rebuild it (atomically:
    # the loaded library's file is replaced, never rewritten in place).
    before = len(compiles)
    monkeypatch.setattr(build, "_loaded", {})
    _check_runs(kernel, 2.5)
    assert len(compiles) == before
    (fresh_cache / f"{key}.sha256").unlink()
    monkeypatch.setattr(build, "_loaded", {})
    _check_runs(kernel, 2.5)
    assert len(compiles) == before + 1
    assert not [p for p in fresh_cache.iterdir() if p.name.startswith(".")]  # no temp files


def test_missing_compiler_falls_back_to_reference_with_a_warning(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    kernel, inputs, expected, _ = examples.softmax()
    with pytest.raises(CompilerNotFound):
        compile_kernel(kernel)
    x = torch.randn(6, 10)
    with pytest.warns(UserWarning, match=r"failed to compile for cpp \(CompilerNotFound"):
        got, gm = run_fused(lambda x: torch.softmax(x, -1) * 2, (x,), "cpp")
    assert fused_kernels(gm)
    assert_close(got, torch.softmax(x, -1) * 2)


def test_compile_error_falls_back_with_a_warning(monkeypatch):
    def broken(kernel):
        return codegen.Generated("this is not C++", codegen.Signature((), (), ()))

    monkeypatch.setattr(codegen, "generate", broken)
    with pytest.raises(CompileError, match="not C"):
        compile_kernel(examples.softmax()[0])
    x = torch.randn(6, 10)
    with pytest.warns(UserWarning, match=r"kernel \w+ failed to compile for cpp \(CompileError"):
        got, _ = run_fused(lambda x: torch.softmax(x, -1) * 2, (x,), "cpp")
    assert_close(got, torch.softmax(x, -1) * 2)


def test_auto_picks_cpp_on_cpu():
    x = torch.randn(6, 10)
    got, gm = run_fused(lambda x: torch.softmax(x, -1) * 2, (x,), "auto")
    (fused,) = fused_kernels(gm)
    assert isinstance(fused, FusedKernel)
    assert fused._backend_for(torch.device("cpu")) == "cpp"
    assert fused.memopt_source_path and fused.memopt_source_path.endswith(".cpp")
    assert_close(got, torch.softmax(x, -1) * 2)


def test_reductions_without_reduction_variables_reduce_one_element():
    """x.sum() of a 0-d tensor: a reduce in a kernel with no reduction variables."""
    x = torch.tensor([1.5, float("nan"), -2.0, 0.0])
    lx = ir.load("in0", i0, f32)
    outputs = {
        "sum": f32,
        "prod": f32,
        "max": f32,
        "min": f32,
        "argmax": i64,
        "argmin": i64,
        "any": b8,
        "all": b8,
    }
    kernel = Kernel(
        "one_element",
        (buf("in0", f32, (4,)),),
        tuple(buf(f"out{k}", d, (4,)) for k, d in enumerate(outputs.values())),
        (S(4),),
        (),
        tuple(
            Store(f"out{k}", i0, ir.reduce(n, lx, d)) for k, (n, d) in enumerate(outputs.items())
        ),
    )
    got, want = run_both(kernel, [x])
    for name, g, w in zip(outputs, got, want):
        assert_same(g, w, name)


def _ulp_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    """Max error in units of the float32 spacing at the exact value (normal results)."""
    exact32 = exact.float().abs()
    spacing = (torch.nextafter(exact32, torch.tensor(float("inf"))) - exact32).double()
    return float(((got.double() - exact).abs() / spacing).max())


@pytest.mark.parametrize("op, bound_ulp", [("exp", 1.5), ("tanh", 5), ("erf", 6), ("sigmoid", 2.5)])
def test_inline_float_math_accuracy(op, bound_ulp):
    """exp, tanh, erf (and sigmoid through exp) are inline polynomials: bounded error, IEEE
    specials (NaN, infinities, overflow to inf, underflow to 0)."""
    dense = torch.linspace(-12, 12, 400_001)
    wide = torch.cat([torch.logspace(-38, 2, 20_001), -torch.logspace(-38, 2, 20_001)])
    x = torch.cat([dense, wide, torch.linspace(-110, 90, 20_001)])
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 89.0, -105.0])
    kernel = examples_pointwise(op, [f32], f32, x.numel() + specials.numel())
    (got,), _ = run_both(kernel, [torch.cat([x, specials])])
    got, got_specials = got[: x.numel()], got[x.numel() :]
    exact = getattr(torch, op)(x.double())
    normal = (exact.abs() > 1e-37) & (exact.abs() < 3e38)
    assert _ulp_error(got[normal], exact[normal]) <= bound_ulp
    tiny = exact.abs() <= 1e-37  # subnormal or zero results: absolutely tiny
    assert bool(((got[tiny].double() - exact[tiny]).abs() < 1e-37).all())
    assert_close(got_specials, getattr(torch, op)(specials), equal_nan=True)


# --- outputs written over inputs nothing reads afterwards ------------------------------


def test_in_place_outputs_need_same_element_reads():
    """An output may reuse an input's memory only when each element is read by the
    iteration that writes it (same layout, same index), and the kernel never reads it."""
    from memopt.backends.codegen.planning import in_place_outputs

    assert in_place_outputs(examples.layer_norm()[0]) == {0: 0}  # rows read, then stored
    assert in_place_outputs(examples.softmax()[0]) == {0: 0}
    assert in_place_outputs(examples.transposed_read()[0]) == {}  # reads another element
    assert in_place_outputs(examples.add_broadcast()[0]) == {0: 0}  # the full-size operand
    reads_output = Kernel(
        "reads_output",
        (buf("in0", f32, (4,)),),
        (buf("out0", f32, (4,)),),
        (S(4),),
        (),
        (
            Store(
                "out0",
                i0,
                ir.op("add", ir.load("in0", i0, f32), ir.load("out0", i0, f32), dtype=f32),
            ),
        ),
    )
    assert in_place_outputs(reads_output) == {}


def _record_fused_calls(monkeypatch):
    calls = []
    original = FusedKernel.__call__

    def record(self, *inputs):
        outputs = original(self, *inputs)
        if not any(isinstance(t, torch._subclasses.FakeTensor) for t in inputs):
            calls.append(({t.data_ptr() for t in inputs}, [t.data_ptr() for t in outputs]))
        return outputs

    monkeypatch.setattr(FusedKernel, "__call__", record)
    return calls


def test_kernel_writes_over_a_dead_matmul_output(monkeypatch):
    """gelu(x @ w + b): the bias + GELU kernel writes over the matmul's output (as
    Inductor's in-place kernels do), and the result is eager's."""
    calls = _record_fused_calls(monkeypatch)
    x, w, b = torch.randn(64, 32), torch.randn(32, 48), torch.randn(48)

    def fn(x, w, b):
        return torch.nn.functional.gelu(x @ w + b)

    compiled = torch.compile(fn, backend="memopt", options={"backend": "cpp"})
    for _ in range(2):
        assert_close(compiled(x, w, b), fn(x, w, b))
    assert calls and all(out[0] in ins for ins, out in calls)
    for tensor in (x, w, b):  # graph inputs are never written
        assert_close(tensor, tensor.clone())


def test_kernel_keeps_an_input_read_later(monkeypatch):
    """A matmul output another node reads after the kernel keeps its own memory."""
    calls = _record_fused_calls(monkeypatch)
    x, w = torch.randn(64, 32), torch.randn(32, 48)

    def fn(x, w):
        y = x @ w
        return torch.sigmoid(y) * 3 + 1, y @ w.t()

    compiled = torch.compile(fn, backend="memopt", options={"backend": "cpp"})
    for got, want in zip(compiled(x, w), fn(x, w)):
        assert_close(got, want)
    assert calls and all(not set(out) & ins for ins, out in calls)


def test_large_outputs_reuse_memory_nothing_holds():
    """A kernel hands a large output's memory out again only once nothing holds it."""
    x = torch.randn(2048, 1024)  # an 8 MiB output: large enough to be kept

    def fn(x):
        return torch.softmax(x, -1) * 2

    want = fn(x)
    compiled = torch.compile(fn, backend="memopt", options={"backend": "cpp"})
    first = compiled(x)
    address = first.data_ptr()
    del first
    second = compiled(x)
    assert second.data_ptr() == address  # nothing held the first: its memory again
    third = compiled(x)
    assert third.data_ptr() != second.data_ptr()  # `second` is held: fresh memory
    row = third[1]
    del third
    fourth = compiled(x)
    assert fourth.data_ptr() != row.data_ptr() - row.storage_offset() * 4  # a view holds it
    for result in (second, row, fourth):
        assert_close(result, want[1] if result is row else want)


# --- transpositions in tiles --------------------------------------------------------------


@pytest.mark.parametrize(
    "name, fn, shape, dtype",
    [
        (
            "to channels_last",
            lambda x: x.contiguous(memory_format=torch.channels_last),
            (3, 37, 5, 19),
            f32,
        ),
        ("from channels_last", lambda x: torch.relu(x).contiguous(), (2, 21, 3, 300), f64),
        ("2-D transpose", lambda x: (x.t() * 2).contiguous(), (300, 97), f16),
    ],
)
def test_transposing_kernels_run_in_tiles(name, fn, shape, dtype):
    """A load contiguous in another variable than the store: tiles (with tails on both sides)."""
    x = torch.randn(shape, dtype=dtype)
    if name == "from channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    got, gm = run_fused(fn, (x,), "cpp")
    (fused,) = fused_kernels(gm)  # a lone layout conversion too runs as a generated kernel
    assert "// tiled:" in fused._runner("cpp").source
    want = fn(x)
    assert got.stride() == want.stride()
    assert_same(got, want, name)


def test_prefetched_build_is_picked_up_and_errors_surface_later(fresh_cache):
    kernel = examples.softmax()[0]
    source = codegen.generate(kernel).source
    build.prefetch(source)
    library, _ = build.library(source)  # waits for the background build
    assert getattr(library, codegen.FUNCTION_NAME)
    build.prefetch("this is not C++")  # no error here...
    with pytest.raises(CompileError, match="not C"):
        build.library("this is not C++")  # ...but where the library is needed


# --- column reductions -------------------------------------------------------------------


def _with_nans(shape):
    x = torch.randn(shape)
    x.view(-1)[::37] = float("nan")
    x.view(-1)[5::41] = -float("inf")
    return x


SPLIT, BLOCKS = "split", "blocks"  # the two column skeletons
COLUMN_CASES = {
    # name: (fn, inputs, the column skeleton it takes, or None: the row skeleton)
    "bias_grad": (
        lambda g, x: ((g * x).tanh(), (g * x).sum(0)),
        (torch.randn(1000, 100), torch.randn(1000, 100)),
        SPLIT,
    ),
    "two_dims": (lambda x: x.exp().sum((0, 1)), (torch.randn(4, 50, 70),), SPLIT),
    "middle_dim": (lambda x: (x * 2).sum(1), (torch.randn(3, 40, 70),), SPLIT),
    "row_values": (
        lambda x, b, w: ((x + b).sum(0) * w + 1, (x + b).amax(0)),
        (torch.randn(129, 65), torch.randn(65), torch.randn(65)),
        SPLIT,
    ),
    "nan_max_min": (lambda x: ((x * 1).amax(0), (x * 1).amin(0)), (_with_nans((300, 50)),), SPLIT),
    "int_sum": (lambda x: (x * 3).sum(0), (torch.randint(-9, 9, (77, 130)),), SPLIT),
    "bool_any": (lambda x: (x > 1.5).any(0), (torch.randn(500, 70),), SPLIT),
    "two_rows": (lambda x: (x * 2).sum(0), (torch.randn(2, 300),), SPLIT),
    "threads": (lambda x: (x * 2).sum(0), (torch.randn(33, 3000),), SPLIT),  # 2 threads, odd rows
    # More columns than MO_SPLIT_COLUMNS: blocks of MO_COLUMNS columns, a ragged last one.
    "wide": (lambda x: (x * 2).sum(0), (torch.randn(5, 8200),), BLOCKS),
    "wide_max": (lambda x: (x - 1).amax(0), (_with_nans((3, 8250)),), BLOCKS),
    "row_sum": (lambda x: (x * 2).sum(1), (torch.randn(100, 1000),), None),
    "two_passes": (lambda x: torch.softmax(x * 2, 0), (torch.randn(200, 64),), None),
}


@pytest.mark.parametrize("name", list(COLUMN_CASES))
def test_column_reductions_reduce_adjacent_rows_in_the_lanes(name):
    """A single-pass reduction strided along the reduction and contiguous across rows (a bias
    gradient) runs rows side by side: split between the threads along the reduction, each
    streaming whole rows (up to MO_SPLIT_COLUMNS columns), or in blocks of MO_COLUMNS columns
    (wider); a row reduction and a two-pass one keep the row skeleton. Either way the values
    are eager's: exact for max, min, integer and bool reductions (NaN and -inf included), to
    rounding for float sums."""
    fn, inputs, skeleton = COLUMN_CASES[name]
    got, gm = run_fused(fn, inputs, "cpp")
    want = fn(*inputs)
    got, want = [(v,) if isinstance(v, torch.Tensor) else tuple(v) for v in (got, want)]
    for g, w in zip(got, want):
        if w.is_floating_point() and name not in ("nan_max_min", "wide_max"):
            assert_close(g, w, rtol=1e-5, atol=1e-4)
        elif w.is_floating_point():
            assert torch.equal(g.isnan(), w.isnan())
            assert torch.equal(g[~g.isnan()], w[~w.isnan()])
        else:
            assert torch.equal(g, w)
    sources = [k._compiled["cpp"].source for k in fused_kernels(gm) if k.kernel.reduction_ranges]
    assert sources, "no reduction kernel"
    found = {
        SPLIT: any("split between threads" in s for s in sources),
        BLOCKS: any("MO_COLUMNS) {" in s for s in sources),
    }
    assert found == {SPLIT: skeleton == SPLIT, BLOCKS: skeleton == BLOCKS}


@pytest.mark.parametrize(
    ("width", "accumulator"), [(256, "float"), (1024, "float"), (1025, "double"), (4096, "double")]
)  # noqa: E501
def test_short_float_rows_sum_in_float_lanes(width, accumulator):
    """A float32 sum over a row of at most SHORT_ROW elements accumulates in float lanes,
    a longer one (or one of unknown length) in double; either way the row sums stay within
    a few ulp of the exact sum of the float32 inputs."""
    x = torch.rand(64, width) + 0.5  # positive: no cancellation to hide the error in
    got, gm = run_fused(lambda x: (x * 3).sum(1), (x,), "cpp")
    (kernel,) = fused_kernels(gm)
    assert re.search(rf"\b{accumulator} v\d+_acc\[MO_LANES\]", kernel._compiled["cpp"].source)
    exact = (x.double() * 3).sum(1)
    ulp = torch.finfo(torch.float32).eps * exact
    assert ((got.double() - exact).abs() <= 16 * ulp).all()


# --- nested reductions (a reduction of a reduction's results over another axis) ------------


def _nested_kernel():
    """Over rows i0 < s0, outer r0 < s1, inner q0 < s2, with x: (s0, s2) and y: (s1, s2):
    d = x[i0, q0] - y[r0, q0]; per (i0, r0): s = sum |d|, m = max d, a = argmin d;
    per row: min of s + m, argmax of s, sum of a (an int), and any of (m > 1)."""
    s0, s1, s2 = sympy.symbols("s0 s1 s2", integer=True, positive=True)
    q0 = ir.inner_var(0)
    x = ir.load("in0", i0 * s2 + q0, f32)
    y = ir.load("in1", r0 * s2 + q0, f32)
    d = ir.op("sub", x, y, dtype=f32)
    total = ir.inner_reduce("sum", ir.op("abs", d, dtype=f32), f32)
    high = ir.inner_reduce("max", d, f32)
    lowest = ir.inner_reduce("argmin", d, i64)
    stores = (
        Store("out0", i0, ir.reduce("min", ir.op("add", total, high, dtype=f32), f32)),
        Store("out1", i0, ir.reduce("argmax", total, i64)),
        Store("out2", i0, ir.reduce("sum", lowest, i64)),
        Store("out3", i0, ir.reduce("any", ir.op("gt", high, ir.const(1.0, f32), dtype=b8), b8)),
    )
    return Kernel(
        "nested",
        (buf("in0", f32, (s0, s2)), buf("in1", f32, (s1, s2))),
        tuple(buf(f"out{k}", t, (s0,)) for k, t in enumerate((f32, i64, i64, b8))),
        (s0,),
        (s1,),
        stores,
        (s2,),
    )


@pytest.mark.parametrize("sizes", [(3, 5, 97), (1, 1, 1), (4, 33, 16), (2, 3, 0), (2, 0, 3)])
def test_nested_reduction_kernel_matches_the_reference(sizes):
    """One compile runs at every size: lane tails, one element, empty inner and outer
    reductions (their identities; argmin's 0); NaNs propagate through max and sum and win
    argmin/argmax as in torch; the first index wins a tie."""
    kernel = _nested_kernel()
    a, r, q = sizes
    x, y = torch.randn(a, q), torch.randn(r, q).round()
    if x.numel() > 2:
        x.view(-1)[1] = float("nan")
    names = {"s0": a, "s1": r, "s2": q}
    got, want = run_both(kernel, [x, y], names)
    for g, w in zip(got, want):
        assert_close(g, w, equal_nan=True, rtol=1e-6, atol=1e-5)
    source = codegen.generate(kernel).source
    assert "for (int64_t f = n_outer * chunk / n_chunks; f < f_end; ++f) {" in source


def _spread(*shape, dtype=torch.float32):
    """Integer-valued floats: every sum is exact, so argmin/argmax see eager's values."""
    return torch.randint(-6, 7, shape).to(dtype)


def _tied_rows():
    """Integer-valued (300, 200) rows whose smallest row sum (all -6) is at rows 10 and 250:
    in the first and the second thread's chunk of the outer reduction. argmin: 10."""
    x = _spread(300, 200)
    x[10] = x[250] = -6
    return x


NESTED_CASES = {
    "knn_argmin": (
        lambda x, y: ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1).argmin(1),
        (_spread(9, 21), _spread(13, 21)),
    ),
    "l1_min_f64": (
        lambda x, y: (x[:, None, :] - y[None, :, :]).abs().sum(-1).amin(1),
        (torch.randn(7, 40, dtype=f64), torch.randn(11, 40, dtype=f64)),
    ),
    "all_rows_one_outer": (lambda x: x.exp().sum(-1).max(), (torch.randn(37, 50),)),
    # One row, enough work for threads: the outer reduction is split between them, and
    # the chunks' argmin combined in order (integer sums: ties, the first index wins).
    "one_row_split": (lambda x: x.exp().sum(-1).max(), (torch.randn(300, 200),)),
    "one_row_split_argmin": (lambda x: x.sum(-1).argmin(), (_tied_rows(),)),
    "outer_over_two_dims": (lambda x: (x * 2).sum(-1).amin((0, 1)), (torch.randn(3, 5, 19),)),
    "inner_not_last": (lambda x: x.exp().sum(1).amax(-1), (torch.randn(5, 7, 9),)),
    "two_inner_dims": (lambda x: (x * 2).sum((2, 3)).amax(1), (torch.randn(3, 4, 5, 6),)),
    "two_inner_strided": (lambda x: (x * 2).sum((1, 3)).amax(1), (torch.randn(3, 4, 5, 6),)),
    "logsumexp_inner": (lambda x: torch.logsumexp(x, -1).amax(1), (torch.randn(4, 6, 33),)),
    "var_inner": (lambda x: x.var(-1).amin(1), (torch.randn(4, 6, 33),)),
    "mean_of_means": (lambda x: x.mean(-1).mean(1), (torch.randn(4, 6, 33),)),
    "keepdim_epilogue": (
        lambda x: (lambda s: (s.amin(1) * 2 + 1, s.amax(1)))(x.abs().sum(-1, keepdim=True)),
        (torch.randn(4, 6, 17),),
    ),
    "outer_reads_a_row_input": (
        lambda x, w: ((x * x).sum(-1).sqrt() * w).sum(1),
        (torch.randn(4, 6, 17), torch.randn(6)),
    ),
    "int_products": (
        lambda a, b: (a[:, None, :] * b[None, :, :]).sum(-1).amax(1),
        (torch.randint(-9, 9, (6, 20)), torch.randint(-9, 9, (5, 20))),
    ),
    "bool_row_in_table": (
        lambda x, y: (x[:, None, :] == y[None, :, :]).all(-1).any(1),
        (torch.randint(0, 2, (8, 3)), torch.randint(0, 2, (5, 3))),
    ),
    "argmax_inner_summed": (lambda x: x.argmax(-1).sum(1), (torch.randn(4, 6, 33),)),
    "nan_max_min": (lambda x: (x * 1).amax(-1).amin(1), (_with_nans((4, 7, 33)),)),
    "half_inner": (lambda x: x.exp().sum(-1).amax(1), (torch.randn(4, 6, 40).half(),)),
}


@pytest.mark.parametrize("name", list(NESTED_CASES))
def test_nested_reductions_run_as_one_kernel(name):
    """Each program is one nested kernel (Kernel.inner_ranges) on the C++ backend and on the
    reference backend, with eager's values: exact for max, min, argmin/argmax, integer and
    bool reductions and sums of integer-valued floats, to rounding for other float sums."""
    fn, inputs = NESTED_CASES[name]
    want = fn(*inputs)
    want = want if isinstance(want, tuple) else (want,)
    for backend in ("cpp", "reference"):
        got, gm = run_fused(fn, inputs, backend)
        got = got if isinstance(got, tuple) else (got,)
        kernels = fused_kernels(gm)
        assert len(kernels) == 1 and kernels[0].kernel.inner_ranges, backend
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            if w.is_floating_point() and name not in ("nan_max_min", "knn_argmin"):
                tolerance = {"rtol": 1e-3, "atol": 1e-3} if w.dtype == f16 else {}
                assert_close(g, w, equal_nan=True, **tolerance)
            else:
                assert torch.equal(g.isnan(), w.isnan()) if w.is_floating_point() else True
                assert torch.equal(g.nan_to_num(), w.nan_to_num()), (backend, g, w)


def test_kernels_over_empty_dims_compile_and_run():
    """A zero-size dim before the last makes a row-major stride of 0: the row index is 0
    (there is no row), not a division by zero at code generation."""

    def masked_cumsum(x, mask):
        return torch.where(mask, x, 0).cumsum(-1) * 2

    x, mask = torch.randn(5, 0, 0), torch.ones(5, 0, 0, dtype=torch.bool)
    got = torch.compile(masked_cumsum, backend="memopt")(x, mask)
    torch.testing.assert_close(got, masked_cumsum(x, mask))


def test_inner_reduction_constant_along_the_outer_one_is_not_nested():
    """multilabel_margin_loss reduces, per row, a value that does not vary along the outer
    reduction: that inner result is not computed per outer element, so no nested kernel."""
    x = torch.randn(5)
    target = torch.tensor([3, 0, 4, -1, 2])  # labels up to the first -1
    fn = torch.nn.functional.multilabel_margin_loss
    got = torch.compile(fn, backend="memopt")(x, target)
    torch.testing.assert_close(got, fn(x, target))
