"""The Triton backend, run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1)."""

from __future__ import annotations

import ast

import pytest
import torch

pytest.importorskip("triton")

import importlib  # noqa: E402

from memopt.backends.triton import compile_kernel, render  # noqa: E402
from memopt.backends.triton.runtime import cache_dir  # noqa: E402

import kernel_examples as examples  # noqa: E402

# The module (the package re-exports its `render` function under the same name).
render_module = importlib.import_module("memopt.backends.triton.render")


def tolerance(dtype):
    return {torch.float16: (2e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5)}.get(dtype, (1.3e-6, 1e-5))


def run(kernel, inputs, sizes):
    outputs = examples.allocate_outputs(kernel, sizes)
    compile_kernel(kernel)(inputs, outputs, sizes)
    return outputs


@pytest.mark.parametrize("name", list(examples.EXAMPLES))
def test_examples_match_eager(name):
    kernel, inputs, expected, sizes = examples.EXAMPLES[name]()
    for got, want in zip(run(kernel, inputs, sizes), expected):
        rtol, atol = tolerance(want.dtype)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", ["softmax", "layer_norm", "column_sum", "argmax", "softmax_bf16"])
def test_looped_reductions_match_eager(name, monkeypatch):
    """Rows longer than one block: one loop per level of dependent reductions."""
    monkeypatch.setattr(render_module, "PERSISTENT_MAX", 2)
    monkeypatch.setattr(render_module, "LOOP_RBLOCK", 4)
    kernel, inputs, expected, sizes = examples.EXAMPLES[name]()
    rendered = render(kernel)
    assert rendered.reduction and not rendered.persistent
    assert rendered.source.count("for roffset in range(0, rnumel, RBLOCK):") >= 1
    for got, want in zip(run(kernel, inputs, sizes), expected):
        rtol, atol = tolerance(want.dtype)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_layer_norm_loops_once_per_dependency_level(monkeypatch):
    monkeypatch.setattr(render_module, "PERSISTENT_MAX", 2)
    kernel, *_ = examples.layer_norm()
    # mean, then the variance of values centred on it, then the stores: three loops.
    assert render(kernel).source.count("for roffset") == 3


def test_persistent_reduction_when_the_row_fits():
    kernel, *_ = examples.softmax(cols=1000)
    rendered = render(kernel)
    assert rendered.persistent and rendered.rblock == 1024
    assert "for roffset" not in rendered.source


def test_source_is_valid_python_without_libdevice():
    for build in examples.EXAMPLES.values():
        kernel, *_ = build()
        source = render(kernel).source
        ast.parse(source)
        assert "libdevice" not in source


def test_bf16_is_computed_in_fp32():
    kernel, *_ = examples.mixed_precision(dtype=torch.bfloat16)
    source = render(kernel).source
    assert ".to(tl.float32)" in source  # loads upcast
    assert "0x7FFF" in source  # the store rounds to nearest even by integer ops


def test_rendering_is_deterministic():
    kernel, *_ = examples.add_broadcast()
    assert render(kernel).source == render(examples.add_broadcast()[0]).source


def test_kernels_are_cached_on_disk_by_source_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOPT_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path / "triton"
    kernel, inputs, expected, sizes = examples.add_broadcast()
    first = compile_kernel(kernel)
    second = compile_kernel(examples.add_broadcast()[0])
    assert first.source_path == second.source_path
    assert list((tmp_path / "triton").glob("*.py")) == [first.source_path]
    torch.testing.assert_close(run(kernel, inputs, sizes)[0], expected[0])


def test_symbolic_sizes_are_runtime_arguments():
    kernel, inputs, expected, sizes = examples.dynamic_scale()
    rendered = render(kernel)
    assert rendered.size_names == ["s0", "s1"]
    assert "s0" in rendered.source.split("def ")[-1].split(")")[0]
    torch.testing.assert_close(run(kernel, inputs, sizes)[0], expected[0])
    # The same compiled kernel at other sizes.
    kernel, inputs, expected, sizes = examples.dynamic_scale(rows=3, cols=17)
    torch.testing.assert_close(run(kernel, inputs, sizes)[0], expected[0])


def test_transposed_read_gets_a_2d_tile_and_plain_reads_do_not():
    transposed, inputs, expected, sizes = examples.transposed_read()
    assert render(transposed).tile == (0, 1)  # read fastest along i0, stored along i1
    assert "YBLOCK" in render(transposed).source
    torch.testing.assert_close(run(transposed, inputs, sizes)[0], expected[0])
    plain, *_ = examples.add_broadcast()
    assert render(plain).tile is None


def test_2d_tile_with_outer_ranges_and_symbolic_sizes():
    import sympy

    from memopt.compiler import kernel_ir as ir
    from memopt.compiler.kernel_ir import Kernel, Store, index_var

    i0, i1, i2 = index_var(0), index_var(1), index_var(2)
    s0 = sympy.Symbol("s0", integer=True, positive=True)
    # out[b, m, n] = x[b, n, m] * 2: a batched transpose, batch size symbolic.
    x = torch.randn(3, 7, 5)
    value = ir.op(
        "mul",
        ir.load("in0", i0 * 35 + i2 * 5 + i1, torch.float32),
        ir.const(2.0, torch.float32),
        dtype=torch.float32,
    )
    kernel = Kernel(
        "batched_transpose",
        (examples.buf("in0", torch.float32, (s0, 7, 5)),),
        (examples.buf("out0", torch.float32, (s0, 5, 7)),),
        (s0, sympy.Integer(5), sympy.Integer(7)),
        (),
        (Store("out0", i0 * 35 + i1 * 7 + i2, value),),
    )
    assert render(kernel).tile == (1, 2)
    (got,) = run(kernel, [x], {"s0": 3})
    torch.testing.assert_close(got, x.transpose(1, 2) * 2)
