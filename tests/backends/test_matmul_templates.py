"""Matmul templates: a matmul with its epilogue (and prologue) as one generated kernel.

Values against eager through the Triton backend (interpreter) and the reference backend;
exact byte and kernel counts worked out by hand. Shapes are small and not multiples of
the tiles (the interpreter's tiles are up to 128; tl.dot needs >= 16).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import memopt
from memopt.backends.registry import Feature, backend_for
from memopt.backends.triton.tiles import matmul_tiles
from memopt.errors import OptionError

pytest.importorskip("triton")

PASSES = ("cleanup", "fusion")  # the counts below are the fusion pass's alone
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (8e-2, 8e-2)}


def compiled_matches(fn, *inputs, backend="triton"):
    got = torch.compile(fn, backend="memopt", options={"backend": backend, "passes": PASSES})(
        *inputs
    )
    want = fn(*inputs)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for g, w in zip(got, want):
        rtol, atol = TOLERANCE[w.dtype]
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


def analyze(fn, *inputs, backend="triton", **options):
    return memopt.analyze(fn, *inputs, backend=backend, passes=PASSES, **options)


def kinds(a):
    return sorted(k.kind for k in a.kernels)


def fusion(a):
    return next(p for p in a.ledger if p.pass_name == "fusion")


def linear_gelu(x, w, b):
    return F.gelu(F.linear(x, w, b))


# -- epilogues ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_bias_gelu_is_one_kernel(dtype):
    x, w, b = (torch.randn(*s).to(dtype) for s in ((6, 20), (24, 20), (24,)))
    a = analyze(linear_gelu, x, w, b)
    # Input + weight + bias + output, nothing else: the product never touches memory.
    size = dtype.itemsize
    assert a.bytes_moved == (6 * 20 + 24 * 20 + 24 + 6 * 24) * size
    assert kinds(a) == ["matmul"]
    assert a.bytes_moved == a.lower_bound_bytes
    compiled_matches(linear_gelu, x, w, b)


def test_several_tiles_and_a_partial_k_step():
    # M = 130 > 128: two row tiles; K = 150: a full and a partial step of BLOCK_K = 128.
    x, w, b = torch.randn(130, 150), torch.randn(40, 150), torch.randn(40)
    compiled_matches(linear_gelu, x, w, b)
    compiled_matches(linear_gelu, x, w, b, backend="reference")


def test_linear_residual_add():
    def fn(x, w, b, r):
        return F.linear(x, w, b) + r

    x, w, b, r = torch.randn(2, 5, 20), torch.randn(24, 20), torch.randn(24), torch.randn(2, 5, 24)
    a = analyze(fn, x, w, b, r)
    assert a.bytes_moved == (2 * 5 * 20 + 24 * 20 + 24 + 2 * 5 * 24 + 2 * 5 * 24) * 4
    assert kinds(a) == ["matmul"]
    compiled_matches(fn, x, w, b, r)
    compiled_matches(fn, x, w, b, r, backend="reference")


def test_product_needed_elsewhere_is_a_second_store():
    def fn(x, w):
        y = x @ w
        return y, torch.relu(y) * 3

    x, w = torch.randn(7, 18), torch.randn(18, 21)
    a = analyze(fn, x, w)
    assert a.bytes_moved == (7 * 18 + 18 * 21 + 2 * 7 * 21) * 4
    assert kinds(a) == ["matmul"]
    compiled_matches(fn, x, w)


def test_batched_matmul_with_a_transposed_operand():
    def fn(p, q):
        return torch.relu(p.transpose(1, 2) @ q * 0.5)

    p, q = torch.randn(3, 33, 17), torch.randn(3, 33, 40)
    a = analyze(fn, p, q)
    # p is read in place through its strides: no transposed copy.
    assert a.bytes_moved == (3 * 33 * 17 + 3 * 33 * 40 + 3 * 17 * 40) * 4
    assert kinds(a) == ["matmul"]
    compiled_matches(fn, p, q)
    compiled_matches(fn, p, q, backend="reference")


# -- prologues ------------------------------------------------------------------------------


def test_cast_and_scale_prologue():
    def fn(x, w):
        return (x.to(torch.float16) * 2.0) @ w

    x, w = torch.randn(20, 33), torch.randn(33, 18, dtype=torch.float16)
    a = analyze(fn, x, w)
    # The fp32 input is read once, cast and scaled per tile; no fp16 copy is written.
    assert a.bytes_moved == 20 * 33 * 4 + 33 * 18 * 2 + 20 * 18 * 2
    assert kinds(a) == ["matmul"]
    applied = [d.reason for d in fusion(a).decisions if d.applied]
    assert any("matmul template prologue" in r for r in applied)
    compiled_matches(fn, x, w)


# -- refusals: must not fuse ----------------------------------------------------------------


def test_cpu_auto_backend_keeps_the_library_matmul_and_says_why():
    x, w, b = torch.randn(6, 20), torch.randn(24, 20), torch.randn(24)
    a = analyze(linear_gelu, x, w, b, backend="auto")  # CPU tensors: the C++ backend runs
    assert kinds(a) == ["extern", "pointwise"]
    (refusal,) = [d for d in fusion(a).decisions if d.code == "fusion.refused_template"]
    assert not refusal.applied and "runs no matmul templates" in refusal.reason
    assert refusal.bytes_saved == 2 * 6 * 24 * 4  # the product written and read back
    off = analyze(linear_gelu, x, w, b, pass_options={"fusion": {"matmul_templates": "off"}})
    assert kinds(off) == ["extern", "pointwise"]
    assert off.bytes_moved == a.bytes_moved == a.lower_bound_bytes + 2 * 6 * 24 * 4


def test_two_matmuls_never_share_a_kernel():
    def fn(x, w1, w2):
        return torch.relu(x @ w1) @ w2

    x, w1, w2 = torch.randn(8, 16), torch.randn(16, 20), torch.randn(20, 12)
    a = analyze(fn, x, w1, w2)
    assert kinds(a) == ["extern", "matmul"]
    refused = [d.reason for d in fusion(a).decisions if not d.applied]
    assert any("a template kernel holds one matmul" in r for r in refused)
    # relu joins the first as its epilogue; its result is written once and read once by
    # the second (a library matmul), where unfused the product would also go through relu.
    assert a.bytes_moved == (8 * 16 + 16 * 20 + 2 * 8 * 20 + 20 * 12 + 8 * 12) * 4
    assert a.eager_bytes - a.bytes_moved == 2 * 8 * 20 * 4
    compiled_matches(fn, x, w1, w2)


def test_a_lone_matmul_stays_a_library_call():
    a = analyze(lambda x, w: x @ w, torch.randn(8, 16), torch.randn(16, 4))
    assert kinds(a) == ["extern"]


def test_matmul_templates_option_is_validated():
    with pytest.raises(OptionError, match="matmul_templates"):
        analyze(
            linear_gelu,
            *(torch.randn(2, 2),) * 2,
            torch.randn(2),
            pass_options={"fusion": {"matmul_templates": "maybe"}},
        )


# -- tiles ----------------------------------------------------------------------------------


def test_tiles_are_recorded_and_bounded():
    assert matmul_tiles(6, 24, 20, on_gpu=True) == {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
    assert matmul_tiles(4096, 4096, 4096, on_gpu=True) == {
        "BLOCK_M": 64,
        "BLOCK_N": 64,
        "BLOCK_K": 32,
    }
    assert matmul_tiles(130, 40, 150, on_gpu=False) == {
        "BLOCK_M": 128,
        "BLOCK_N": 64,
        "BLOCK_K": 128,
    }
    assert backend_for("auto", "cuda").supports(Feature.MATMUL_TEMPLATES)
    assert not backend_for("auto", "cpu").supports(Feature.MATMUL_TEMPLATES)
    x, w, b = torch.randn(6, 20), torch.randn(24, 20), torch.randn(24)
    a = analyze(linear_gelu, x, w, b)
    assert any("GPU tiles 16x32x32" in d.reason for d in fusion(a).decisions if d.applied)


def test_16_bit_operands_get_wider_gpu_tiles_and_more_warps():
    assert matmul_tiles(4096, 4096, 4096, on_gpu=True, half=True) == {
        "BLOCK_M": 128,
        "BLOCK_N": 128,
        "BLOCK_K": 32,
    }
    assert matmul_tiles(4096, 4096, 4096, on_gpu=False, half=True) == matmul_tiles(
        4096, 4096, 4096, on_gpu=False
    )  # the interpreter's tiles do not depend on the dtype


def _template(a):
    from memopt.backends.runtime.kernels import FusedKernel

    (kernel,) = [
        node.target.kernel
        for graph in a.graphs
        for node in graph.gm.graph.nodes
        if isinstance(node.target, FusedKernel) and node.target.kernel.kind == "matmul"
    ]
    return kernel


def test_fp32_casts_of_16_bit_operands_take_the_16_bit_dot_on_a_gpu():
    from memopt.backends.triton.matmul import half_operands
    from memopt.backends.triton.runtime import render

    x, w = torch.randn(256, 64).half(), torch.randn(64, 256).half()
    widened = analyze(lambda x, w: torch.relu(x.float() @ w.float()), x, w)
    kernel = _template(widened)
    assert half_operands(kernel) == torch.float16  # products exact in fp32: same sums
    assert "if LOW_PRECISION_DOT:" in render(kernel).source
    assert any("GPU tiles 128x128x32" in d.reason for d in fusion(widened).decisions if d.applied)
    fp32 = analyze(lambda x, w: torch.relu(x @ w), x.float(), w.float())
    assert half_operands(_template(fp32)) is None
    assert "if LOW_PRECISION_DOT:" not in render(_template(fp32)).source
    assert any("GPU tiles 64x64x32" in d.reason for d in fusion(fp32).decisions if d.applied)
    compiled_matches(lambda x, w: torch.relu(x.float() @ w.float()), x, w)
