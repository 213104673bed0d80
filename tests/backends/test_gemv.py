"""float32 products of a few rows on memopt's streaming kernels (backends/runtime/gemv.py)."""

import copy

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memopt.backends.cpp import launcher, quantized
from memopt.backends.runtime import gemv
from memopt.backends.runtime.executor import CompiledGraph
from memopt.backends.runtime.extern import plan_library_calls
from memopt.backends.runtime.gemv import StreamingGemv, streaming_matmul
from memopt.compiler.capture import capture

aten = torch.ops.aten


def _kernel_calls(monkeypatch):
    """Count the streaming kernels' calls (by name)."""
    calls = []
    kernels = dict(quantized.functions())

    def counted(name):
        def call(*args):
            calls.append(name)
            return kernels[name](*args)

        return call

    wrapped = {**kernels, **{n: counted(n) for n in kernels if n.startswith("memopt_f32")}}
    monkeypatch.setattr(quantized, "functions", lambda: wrapped)
    return calls


@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize(
    "k, n", [(1000, 37), (1003, 50), (64, 4096), (3, 5), (1, 40), (1003, 7), (17, 3)]
)
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["addmm", "mm"])
def test_streaming_kernels_match_aten(monkeypatch, rows, k, n, layout, with_bias):
    """Both weight layouts, tails of K (not a multiple of the vector width, nor of a
    thread's rows of the (K, N) kernel's four at a time) and of N (runs of columns per
    thread; 1-3 rows after the (N, K) kernel's blocks of four, or fewer rows than a block),
    one to four rows, with and without a bias."""
    calls = _kernel_calls(monkeypatch)
    torch.manual_seed(0)
    a = torch.randn(rows, k)
    b = torch.randn(n, k).t() if layout == "nk" else torch.randn(k, n)
    bias = torch.randn(n) if with_bias else None
    want = torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
    got = StreamingGemv(aten.mm.default if bias is None else aten.addmm.default)(
        *((a, b) if bias is None else (bias, a, b))
    )
    # A single-element K makes both layouts contiguous both ways: the (N, K) kernel reads it.
    kn = layout == "kn" and k > 1
    assert calls == ["memopt_f32_matmul_kn" if kn else "memopt_f32_matmul"]
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * k**0.5)


@pytest.mark.parametrize(
    "op, make",
    [
        (aten.mm.default, lambda: (torch.randn(5, 64), torch.randn(64, 32))),  # five rows
        (aten.mm.default, lambda: (torch.randn(1, 64).double(), torch.randn(64, 32).double())),
        (aten.mm.default, lambda: (torch.randn(1, 64), torch.randn(64, 64)[:, ::2])),  # strided
        (aten.mm.default, lambda: (torch.randn(1, 64), torch.randn(64, 32, requires_grad=True))),
        (aten.addmm.default, lambda: (torch.randn(1, 32), torch.randn(1, 64), torch.randn(64, 32))),
        (aten.mm.default, lambda: (torch.randn(1, 0), torch.randn(0, 32))),  # empty K
    ],
    ids=["five rows", "float64", "strided weight", "grad", "2-D bias", "empty"],
)
def test_anything_else_runs_the_aten_op_bit_for_bit(monkeypatch, op, make):
    calls = _kernel_calls(monkeypatch)
    args = make()
    got = StreamingGemv(op)(*args)
    assert calls == []
    assert torch.equal(got, op(*args))


def test_beta_and_alpha_run_the_aten_op(monkeypatch):
    calls = _kernel_calls(monkeypatch)
    bias, a, b = torch.randn(32), torch.randn(1, 64), torch.randn(64, 32)
    got = StreamingGemv(aten.addmm.default)(bias, a, b, beta=0.5, alpha=2.0)
    assert calls == [] and torch.equal(got, torch.addmm(bias, a, b, beta=0.5, alpha=2.0))


def _decode_graph(rows=1):
    def fn(x, w1, b1, w2):
        return torch.nn.functional.linear(torch.tanh(x @ w1.t() + b1), w2)

    args = (torch.randn(rows, 256), torch.randn(512, 256), torch.randn(512), torch.randn(64, 512))
    (graph,) = capture(fn, args)
    return graph.gm, lambda *_: fn(*args), graph.real_inputs  # in the graph's order


def test_plan_points_products_of_a_few_rows_at_the_kernels_when_chosen():
    """Must: both products of one row with cpu_gemv="memopt". Must not: the same graph
    with "aten", or products of more than GEMV_ROWS rows."""
    gm, fn, args = _decode_graph()
    assert plan_library_calls(gm, "aten", "memopt") == 2
    assert sum(isinstance(n.target, StreamingGemv) for n in gm.graph.nodes) == 2
    torch.testing.assert_close(gm(*args)[0], fn(*args))
    gm, fn, args = _decode_graph()
    assert plan_library_calls(gm, "aten", "aten") == 0
    gm, fn, args = _decode_graph(rows=gemv.GEMV_ROWS + 1)
    assert plan_library_calls(gm, "aten", "memopt") == 0
    assert torch.equal(gm(*args)[0], fn(*args))


def test_compiled_graph_describes_its_gemvs():
    gm, _, _ = _decode_graph()
    assert CompiledGraph(gm, "forward", [None], cpu_gemv="memopt").libraries == (
        "2 float32 GEMVs on memopt's streaming kernels (cpu_gemv='memopt')"
    )


def test_a_decode_step_through_torch_compile_matches_eager(monkeypatch):
    calls = _kernel_calls(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 64)
    )
    x = torch.randn(1, 256)
    compiled = torch.compile(model, backend="memopt", options={"cpu_gemv": "memopt"})
    with torch.no_grad():
        got = compiled(x)
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2
    aten_only = torch.compile(
        torch.nn.Linear(256, 64), backend="memopt", options={"cpu_gemv": "aten"}
    )
    calls.clear()
    with torch.no_grad():
        aten_only(x)
    assert calls == []


def test_the_kernels_take_views_at_an_offset():
    """A weight that is a view into a larger buffer (a slice of rows) is read from its own
    first element."""
    big = torch.randn(100, 64)
    w = big[10:42]  # (32, 64) rows 10..41, contiguous, at an offset
    a = torch.randn(1, 64)
    torch.testing.assert_close(streaming_matmul(None, a, w.t()), a @ w.t(), rtol=1e-5, atol=1e-5)


def test_outputs_are_cpu_tensors_under_another_default_device():
    a, w = torch.randn(1, 64), torch.randn(32, 64)
    with torch.device("meta"):
        got = streaming_matmul(None, a, w.t())
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, a @ w.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["addmm", "mm"])
def test_a_call_with_the_layouts_planned_last_is_one_native_launch(monkeypatch, layout, with_bias):
    """The first call plans and binds; the next, operands of the same layouts, runs the
    same kernel through the native launcher (no ctypes call) to the same values."""
    if launcher.module() is None:
        pytest.skip("no native launcher here")
    calls = _kernel_calls(monkeypatch)
    torch.manual_seed(0)
    a, bias = torch.randn(1, 96), torch.randn(40) if with_bias else None
    b = torch.randn(40, 96).t() if layout == "nk" else torch.randn(96, 40)
    op = StreamingGemv(aten.mm.default if bias is None else aten.addmm.default)
    args = (a, b) if bias is None else (bias, a, b)
    with torch.no_grad():
        first = op(*args)
        fresh = (
            [torch.randn(1, 96), *args[1:]] if bias is None else [args[0], torch.randn(1, 96), b]
        )
        second = op(*fresh)
    assert len(calls) == 1
    want = torch.mm(*fresh) if bias is None else torch.addmm(*fresh)
    torch.testing.assert_close(second, want, rtol=1e-5, atol=1e-4)
    assert second.data_ptr() != first.data_ptr() and second.shape == (1, 40)


def test_other_layouts_grads_and_fake_tensors_after_a_launch_is_bound(monkeypatch):
    """A bound launch takes only the layouts it was planned for, outside autograd: other
    rows or strides are planned again (or run the ATen op), a call that records gradients
    and fake tensors run the ATen op."""
    if launcher.module() is None:
        pytest.skip("no native launcher here")
    calls = _kernel_calls(monkeypatch)
    a, w = torch.randn(1, 64), torch.randn(32, 64)
    op = StreamingGemv(aten.mm.default)
    with torch.no_grad():
        op(a, w.t())
        op(a, w.t())
        assert len(calls) == 1
        two = torch.randn(2, 64)
        torch.testing.assert_close(op(two, w.t()), two @ w.t(), rtol=1e-5, atol=1e-4)
        assert len(calls) == 2  # planned again, for two rows
        strided = torch.randn(64, 64)[:, ::2]
        assert torch.equal(op(two, strided), two @ strided) and len(calls) == 2
    weight = w.t().clone().requires_grad_(True)
    got = op(two, weight)
    assert got.requires_grad and torch.equal(got, two @ weight) and len(calls) == 2
    with FakeTensorMode() as mode, torch.no_grad():
        fake = op(mode.from_tensor(two), mode.from_tensor(w).t())
    assert fake.shape == (2, 32) and len(calls) == 2


def test_a_negated_view_and_a_deep_copy_after_a_launch_is_bound():
    a, w = torch.randn(1, 64), torch.randn(32, 64)
    op = StreamingGemv(aten.mm.default)
    with torch.no_grad():
        want = op(a, w.t())
        op(a, w.t())
        torch.testing.assert_close(op(torch._neg_view(a), w.t()), -want)
        twin = copy.deepcopy(op)
        assert twin._launch is None
        torch.testing.assert_close(twin(a, w.t()), want)
