"""The epilogue pass: mm + bias + activation, or + residual, as one oneDNN linear call.

Each must-change case asserts exact bytes and kernels with and without the pass and
compares compiled values with eager; each must-not case asserts that the graph is what it
is without the pass, and the decision that says why.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import memopt
from memopt.backends.runtime import linear
from memopt.passes import epilogue

F32 = 4
M, K, N = 16, 32, 64
X, W, B, Y = M * K * F32, K * N * F32, N * F32, M * N * F32  # 2048, 8192, 256, 4096

pytestmark = pytest.mark.skipif(not linear.onednn_available(), reason="this torch has no oneDNN")


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g, dtype=dtype)
    w = torch.randn(K, N, generator=g, dtype=dtype) / K**0.5
    b = torch.randn(N, generator=g, dtype=dtype)
    r = torch.randn(M, N, generator=g, dtype=dtype)
    return x, w, b, r


def on(options=None):
    """The options with the pass turned on (it is off by default), keeping its others."""
    options = dict(options or {})
    passes = dict(options.get("pass_options", {}))
    passes["epilogue"] = {"enabled": True, **passes.get("epilogue", {})}
    return {**options, "pass_options": passes}


def check(fn, *args, **options):
    """Analyze with check=True (the pass on) and run the compiled program against eager."""
    options = on(options)
    a = memopt.analyze(fn, *args, check=True, **options)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="memopt", options={"check": False, **options})
    got, want = compiled(*args), fn(*args)
    for g, w in zip(
        got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)
    ):
        torch.testing.assert_close(g, w)
    return a


def without(fn, *args):
    return memopt.analyze(fn, *args, disable=["epilogue"])


def decisions(a):
    return [
        (d.code, d.applied, d.bytes_saved)
        for p in a.ledger
        if p.pass_name == "epilogue"
        for d in p.decisions
    ]


def ops(a):
    return [k.ops for k in a.kernels]


# -- must change ----------------------------------------------------------------------------


def test_bias_gelu_tanh_is_one_linear_call():
    x, w, b, _ = inputs()
    fn = lambda x, w, b: F.gelu(x @ w + b, approximate="tanh")  # noqa: E731
    a = check(fn, x, w, b)
    # One call reads x, w and b once and writes the activation once.
    assert ops(a) == [("mkldnn._linear_pointwise(gelu_tanh)",)]
    assert a.bytes_moved == X + W + B + Y
    # Without it: mm writes its (M, N) result, a kernel reads it back for bias and GELU.
    before = without(fn, x, w, b)
    assert len(before.kernels) == 2
    assert before.bytes_moved == (X + W + Y) + (Y + B + Y)
    assert decisions(a) == [("epilogue.activation", True, 2 * Y)]


def test_gpt2_new_gelu_formula_and_nn_linear_weight():
    """transformers' NewGELU written out, after F.linear (the weight is read transposed)."""
    x, w, b, _ = inputs()
    weight = w.t().contiguous()  # (N, K), as nn.Linear holds it

    def fn(x, weight, b):
        h = F.linear(x, weight, b)
        return 0.5 * h * (1.0 + torch.tanh(0.7978845608028654 * (h + 0.044715 * torch.pow(h, 3.0))))

    a = check(fn, x, weight, b)
    assert ops(a) == [("mkldnn._linear_pointwise(gelu_tanh)",)]
    assert a.bytes_moved == X + W + B + Y


def test_erf_gelu_and_relu_without_bias():
    x, w, b, _ = inputs()
    a = check(lambda x, w, b: F.gelu(x @ w + b), x, w, b)
    assert ops(a) == [("mkldnn._linear_pointwise(gelu_erf)",)]
    a = check(lambda x, w: torch.relu(x @ w), x, w)
    assert ops(a) == [("mkldnn._linear_pointwise(relu)",)]
    assert a.bytes_moved == X + W + Y
    assert decisions(a) == [("epilogue.activation", True, 2 * Y)]


def test_bias_residual_is_one_linear_call():
    x, w, b, r = inputs()
    fn = lambda x, w, b, r: r + (x @ w + b)  # noqa: E731
    a = check(fn, x, w, b, r)
    assert ops(a) == [("mkldnn._linear_pointwise(add)",)]
    assert a.bytes_moved == X + W + B + Y + Y
    before = without(fn, x, w, b, r)
    assert len(before.kernels) == 2
    assert before.bytes_moved == (X + W + Y) + (Y + B + Y + Y)
    assert decisions(a) == [("epilogue.residual", True, 2 * Y)]


def test_residual_whose_sum_a_layer_norm_also_reads_saves_its_second_write():
    """GPT-2's pre-LN block: h = x @ w + b + r feeds the next residual and a layer norm. The
    fused kernel wrote h and the normalized value; now the call writes h and the layer norm
    reads it: one (M, N) write fewer, one read more of h, and no mm output."""
    x, w, b, r = inputs()
    ln_w, ln_b = torch.ones(N), torch.zeros(N)

    def fn(x, w, b, r, ln_w, ln_b):
        h = x @ w + b + r
        return h, F.layer_norm(h, (N,), ln_w, ln_b)

    a = check(fn, x, w, b, r, ln_w, ln_b)
    assert len(a.kernels) == 2
    before = without(fn, x, w, b, r, ln_w, ln_b)
    assert len(before.kernels) == 2
    assert before.bytes_moved - a.bytes_moved == Y
    assert decisions(a) == [("epilogue.residual", True, Y)]


# -- must not change ------------------------------------------------------------------------


def test_gemm_output_read_elsewhere():
    x, w, b, _ = inputs()

    def fn(x, w, b):
        h = x @ w
        return F.gelu(h + b), h * 2

    a = check(fn, x, w, b)
    before = without(fn, x, w, b)
    assert (a.bytes_moved, len(a.kernels)) == (before.bytes_moved, len(before.kernels))
    assert a.bytes_moved == (X + W + Y) + (Y + B + Y + Y)
    assert decisions(a) == [("epilogue.refused_shared", False, 2 * Y)]


def test_float64_is_refused():
    x, w, b, _ = inputs(torch.float64)
    fn = lambda x, w, b: F.gelu(x @ w + b)  # noqa: E731
    a = check(fn, x, w, b)
    assert ops(a)[0] == ("aten.mm.default",) and len(a.kernels) == 2
    assert a.bytes_moved == 2 * ((X + W + Y) + (Y + B + Y))
    assert decisions(a) == [("epilogue.refused_dtype", False, 2 * 2 * Y)]


def test_strided_input_is_refused():
    x, w, b, _ = inputs()
    xt = x.t().contiguous().t()  # (M, K) with strides (1, M)
    fn = lambda x, w, b: torch.relu(x @ w + b)  # noqa: E731
    a = check(fn, xt, w, b)
    assert len(a.kernels) == 2
    assert a.bytes_moved == (X + W + Y) + (Y + B + Y)
    assert decisions(a) == [("epilogue.refused_layout", False, 2 * Y)]


def test_activation_whose_output_fuses_onward_saves_nothing():
    """gelu(h) * g: fusion keeps the GELU in the kernel that multiplies; the call would
    write gelu(h) where mm wrote h: the same bytes, so no rewrite."""
    x, w, b, r = inputs()
    fn = lambda x, w, b, r: F.gelu(x @ w + b) * r  # noqa: E731
    a = check(fn, x, w, b, r)
    assert ops(a)[0] == ("aten.mm.default",) and len(a.kernels) == 2
    assert a.bytes_moved == (X + W + Y) + (Y + B + Y + Y)
    assert decisions(a) == [("epilogue.refused_bytes", False, 0)]


def test_residual_that_only_a_layer_norm_reads_saves_nothing():
    """BERT's post-LN: LN(x @ w + b + r). The kernel reads the mm output and r and writes
    the norm; the call would read r, write the sum, and the norm read it: the same bytes."""
    x, w, b, r = inputs()
    ln_w, ln_b = torch.ones(N), torch.zeros(N)
    fn = lambda x, w, b, r, g, c: F.layer_norm(x @ w + b + r, (N,), g, c)  # noqa: E731
    a = check(fn, x, w, b, r, ln_w, ln_b)
    before = without(fn, x, w, b, r, ln_w, ln_b)
    assert (a.bytes_moved, len(a.kernels)) == (before.bytes_moved, 2)
    assert decisions(a) == [("epilogue.refused_bytes", False, 0)]


def test_no_onednn_is_refused(monkeypatch):
    monkeypatch.setattr(epilogue, "onednn_available", lambda: False)
    x, w, b, _ = inputs()
    a = memopt.analyze(lambda x, w, b: F.gelu(x @ w + b), x, w, b, **on())
    assert len(a.kernels) == 2
    assert decisions(a) == [("epilogue.no_library", False, 2 * Y)]


def test_templates_take_the_epilogue_themselves():
    """Where fusion forms matmul templates (reference backend) the pass leaves the mm to them."""
    x, w, b, _ = inputs()
    a = memopt.analyze(lambda x, w, b: F.gelu(x @ w + b), x, w, b, backend="reference", **on())
    assert decisions(a) == []
    assert [k.kind for k in a.kernels] == ["matmul"]


@pytest.mark.parametrize("activation", [*linear.ACTIVATIONS, None])
def test_call_without_onednn_computes_the_same(monkeypatch, activation):
    """The ATen path (fake tensors, autograd, no oneDNN) and oneDNN's agree."""
    x, w, b, r = inputs()
    call = linear.LinearEpilogue(activation)
    other = r if activation is None else None
    fused = call(x, w, b, other)
    monkeypatch.setattr(linear, "onednn_available", lambda: False)
    torch.testing.assert_close(fused, call(x, w, b, other))


def test_symbolic_sizes_are_refused():
    x, w, b, _ = inputs()
    fn = lambda x, w, b: torch.relu(x @ w + b)  # noqa: E731
    a = memopt.analyze(fn, x, w, b, dynamic=True, **on())
    assert len(a.kernels) == 2
    assert a.bytes_moved == (X + W + Y) + (Y + B + Y)
    ((code, applied, _),) = decisions(a)
    assert (code, applied) == ("epilogue.refused_layout", False)


def test_row_major_weights_can_be_refused():
    """transposed_weights='refuse': a (K, N) row-major weight (GPT-2's Conv1D) stays with
    fusion; an (N, K) one (nn.Linear's) is still one call."""
    x, w, b, _ = inputs()
    options = {"pass_options": {"epilogue": {"transposed_weights": "refuse"}}}
    fn = lambda x, w, b: F.gelu(x @ w + b)  # noqa: E731
    a = memopt.analyze(fn, x, w, b, **on(options))
    assert len(a.kernels) == 2
    assert a.bytes_moved == (X + W + Y) + (Y + B + Y)
    assert decisions(a) == [("epilogue.refused_layout", False, 2 * Y)]
    linear_fn = lambda x, weight, b: F.gelu(F.linear(x, weight, b))  # noqa: E731
    a = check(linear_fn, x, w.t().contiguous(), b, **options)
    assert ops(a) == [("mkldnn._linear_pointwise(gelu_erf)",)]
    assert a.bytes_moved == X + W + B + Y


def test_off_by_default_with_the_bytes_at_stake():
    """Off (the default), the plan is fusion's, and each match is recorded as refused."""
    x, w, b, _ = inputs()
    fn = lambda x, w, b: F.gelu(x @ w + b)  # noqa: E731
    a = memopt.analyze(fn, x, w, b, check=True)
    assert len(a.kernels) == 2
    assert a.bytes_moved == without(fn, x, w, b).bytes_moved == (X + W + Y) + (Y + B + Y)
    assert decisions(a) == [("epilogue.off", False, 2 * Y)]
