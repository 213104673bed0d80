"""float32 CPU GEMMs on oneDNN where it is the faster library (backends/runtime/gemm.py)."""

import json

import pytest
import torch

from memopt.backends.cache import cache_dir, machine_key
from memopt.backends.runtime import gemm
from memopt.backends.runtime.executor import CompiledGraph
from memopt.backends.runtime.extern import KeptOutputMatmul, plan_library_calls
from memopt.backends.runtime.gemm import OneDnnMatmul, choose, gemm_library
from memopt.backends.runtime.linear import onednn_available
from memopt.compiler.capture import capture
from memopt.config import Config
from memopt.errors import OptionError

aten = torch.ops.aten
needs_onednn = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


def _library_calls(call, *args):
    """(result, whether oneDNN's inner product ran)."""
    with torch.profiler.profile() as prof:
        result = call(*args)
    return result, any("_linear_pointwise" in e.name for e in prof.events())


@needs_onednn
@pytest.mark.parametrize(
    "op, make",
    [
        (aten.mm.default, lambda: (torch.randn(64, 32), torch.randn(32, 48))),
        (aten.mm.default, lambda: (torch.randn(64, 32), torch.randn(48, 32).t())),
        (aten.mm.default, lambda: (torch.randn(32, 64).t(), torch.randn(32, 48))),
        (aten.addmm.default, lambda: (torch.randn(48), torch.randn(64, 32), torch.randn(32, 48))),
        (
            aten.addmm.default,
            lambda: (
                torch.nn.Parameter(torch.randn(48)),
                torch.randn(64, 32),
                torch.nn.Parameter(torch.randn(32, 48)),
            ),
        ),
        (aten.mm.default, lambda: (torch.randn(1, 32), torch.randn(32, 7))),
    ],
    ids=["mm", "weight transposed", "input transposed", "addmm", "parameters", "one row"],
)
def test_onednn_matmul_matches_the_aten_op(op, make):
    args = make()
    want = op(*args)
    with torch.no_grad():
        got, onednn = _library_calls(OneDnnMatmul(op), *args)
    assert onednn
    assert got.shape == want.shape and got.stride() == want.stride()
    torch.testing.assert_close(got, want)


@needs_onednn
@pytest.mark.parametrize(
    "op, make, kwargs",
    [
        (aten.mm.default, lambda: (torch.randn(8, 4).double(), torch.randn(4, 6).double()), {}),
        (aten.mm.default, lambda: (torch.randn(8, 4), torch.randn(4, 12)[:, ::2]), {}),
        (aten.mm.default, lambda: (torch.randn(8, 0), torch.randn(0, 6)), {}),
        (aten.addmm.default, lambda: (torch.randn(8, 6), torch.randn(8, 4), torch.randn(4, 6)), {}),
        (
            aten.addmm.default,
            lambda: (torch.randn(12)[::2], torch.randn(8, 4), torch.randn(4, 6)),
            {},
        ),
        (
            aten.addmm.default,
            lambda: (torch.randn(6), torch.randn(8, 4), torch.randn(4, 6)),
            {"beta": 0.5},
        ),
    ],
    ids=["float64", "strided weight", "empty", "2-D bias", "strided bias", "beta"],
)
def test_what_onednn_does_not_take_runs_the_aten_op(op, make, kwargs):
    """Bit for bit ATen's result, and no oneDNN call."""
    args = make()
    with torch.no_grad():
        got, onednn = _library_calls(lambda *a: OneDnnMatmul(op)(*a, **kwargs), *args)
    assert not onednn
    assert torch.equal(got, op(*args, **kwargs))


@needs_onednn
def test_recorded_grads_take_the_aten_op():
    a, b = torch.randn(8, 4, requires_grad=True), torch.randn(4, 6)
    got, onednn = _library_calls(OneDnnMatmul(aten.mm.default), a, b)
    assert not onednn and got.requires_grad
    got.sum().backward()
    assert torch.equal(a.grad, torch.ones(8, 6) @ b.t())


def test_only_mm_and_addmm_have_a_onednn_stand_in():
    with pytest.raises(ValueError, match="mm or addmm"):
        OneDnnMatmul(aten.bmm.default)


def test_choose_takes_onednn_only_when_clearly_faster_everywhere():
    assert choose((2.0, 2.0), (1.0, 1.0)) == "onednn"
    assert choose((1.05, 1.05), (1.0, 1.0)) == "aten"  # under the 10% margin
    assert choose((4.0, 0.9), (1.0, 1.0)) == "aten"  # faster on average, slower on one shape
    assert choose((2.0, 2.0), ()) == "aten"  # no oneDNN times: a torch without it


def _cached(monkeypatch, tmp_path, aten_s, onednn_s):
    monkeypatch.setenv("MEMOPT_CACHE_DIR", str(tmp_path))
    record = {"shapes": [[8, 8, 8], [16, 16, 16]], "aten_s": aten_s, "onednn_s": onednn_s}
    (cache_dir("machine") / f"gemm-{machine_key()}.json").write_text(json.dumps(record))

    def measure():
        raise AssertionError("measured although the cache has this machine's times")

    monkeypatch.setattr(gemm, "measure", measure)


@needs_onednn
def test_auto_reads_the_machines_choice_from_the_cache(monkeypatch, tmp_path):
    _cached(monkeypatch, tmp_path, [2.0, 2.0], [1.0, 1.0])
    assert gemm_library("auto") == "onednn"
    _cached(monkeypatch, tmp_path, [1.0, 1.0], [2.0, 2.0])
    assert gemm_library("auto") == "aten"
    assert gemm_library("onednn") == "onednn" and gemm_library("aten") == "aten"


def test_auto_measures_and_caches_on_a_new_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gemm, "SHAPES", ((8, 16, 8), (4, 8, 4)))
    choice = gemm_library("auto")
    path = cache_dir("machine") / f"gemm-{machine_key()}.json"
    record = json.loads(path.read_text())
    assert record["label"] == "measured" and record["library"] == choice
    assert len(record["aten_s"]) == 2 and all(t > 0 for t in record["aten_s"])


def test_an_unknown_library_is_an_error_naming_the_choices():
    with pytest.raises(ValueError, match="'fast'.*auto, aten, onednn"):
        gemm_library("fast")
    with pytest.raises(OptionError, match="unknown cpu_gemm 'fast'; valid choices: aten, auto"):
        Config.from_options({"cpu_gemm": "fast"})
    with pytest.raises(OptionError, match="MEMOPT_CPU_GEMM|cpu_gemm 'mkl'"):
        Config.from_options(env={"MEMOPT_CPU_GEMM": "mkl"})


def _linear_graph(dtype=torch.float32):
    def fn(x, w, w2):
        return torch.tanh(x @ w) @ w2

    args = (
        torch.randn(64, 32, dtype=dtype),
        torch.randn(32, 16, dtype=dtype),
        torch.randn(16, 8, dtype=dtype),
    )
    (graph,) = capture(fn, args)
    return graph.gm, fn, args


@needs_onednn
def test_plan_points_float32_gemms_at_onednn_when_chosen():
    """Must: both GEMMs of a float32 graph with cpu_gemm="onednn". Must not: the same graph
    with "aten" (its small results are plain ATen calls), or a float64 graph."""
    gm, fn, args = _linear_graph()
    assert plan_library_calls(gm, "onednn") == 2
    targets = [n.target for n in gm.graph.nodes if isinstance(n.target, OneDnnMatmul)]
    assert len(targets) == 2 and all(t.op in gemm.GEMM_OPS for t in targets)
    torch.testing.assert_close(gm(*args)[0], fn(*args))

    gm, fn, args = _linear_graph()
    assert plan_library_calls(gm, "aten") == 0
    gm, fn, args = _linear_graph(torch.float64)
    assert plan_library_calls(gm, "onednn") == 0
    assert torch.equal(gm(*args)[0], fn(*args))


@needs_onednn
def test_a_large_result_with_aten_chosen_stays_in_kept_memory():
    def fn(x, w):
        return x @ w

    x, w = torch.randn(1024, 64), torch.randn(64, 2048)
    (graph,) = capture(fn, (x, w))
    plan_library_calls(graph.gm, "aten")
    assert any(isinstance(n.target, KeptOutputMatmul) for n in graph.gm.graph.nodes)
    (graph,) = capture(fn, (x, w))
    plan_library_calls(graph.gm, "onednn")
    assert any(isinstance(n.target, OneDnnMatmul) for n in graph.gm.graph.nodes)


@needs_onednn
def test_compiled_graph_describes_its_onednn_gemms():
    gm, _, _ = _linear_graph()
    assert CompiledGraph(gm, "forward", [None], cpu_gemm="onednn").gemms == (
        "2 float32 GEMMs on oneDNN (cpu_gemm='onednn')"
    )
    gm, _, _ = _linear_graph()
    assert CompiledGraph(gm, "forward", [None], cpu_gemm="aten").gemms == ""


@needs_onednn
@pytest.mark.parametrize("cpu_gemm", ["onednn", "aten"])
def test_training_through_torch_compile_matches_eager(cpu_gemm):
    """Forward and backward GEMMs (x @ w.t(), grad @ w, grad.t() @ x) on either library."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    x = torch.randn(16, 32)
    compiled = torch.compile(model, backend="memopt", options={"cpu_gemm": cpu_gemm})
    compiled(x).square().sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad)
