"""float32 CPU GEMMs on oneDNN where it is the faster library (backends/runtime/gemm.py)."""

import json
import warnings

import pytest
import torch

from memopt.backends.cache import cache_dir, machine_key
from memopt.backends.runtime import gemm, gemv
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


# 256 x 128 x 64 = 2**21 multiply-adds: the smallest product oneDNN takes (MIN_MACS).
M, K, N = 256, 128, 64


@needs_onednn
@pytest.mark.parametrize(
    "op, make",
    [
        (aten.mm.default, lambda: (torch.randn(M, K), torch.randn(K, N))),
        (aten.mm.default, lambda: (torch.randn(M, K), torch.randn(N, K).t())),
        (aten.mm.default, lambda: (torch.randn(K, M).t(), torch.randn(K, N))),
        (aten.addmm.default, lambda: (torch.randn(N), torch.randn(M, K), torch.randn(K, N))),
        (
            aten.addmm.default,
            lambda: (
                torch.nn.Parameter(torch.randn(N)),
                torch.randn(M, K),
                torch.nn.Parameter(torch.randn(K, N)),
            ),
        ),
        (aten.mm.default, lambda: (torch.randn(2, 1024), torch.randn(1024, 1024))),
    ],
    ids=["mm", "weight transposed", "input transposed", "addmm", "parameters", "two rows"],
)
def test_onednn_matmul_matches_the_aten_op(op, make):
    args = make()
    want = op(*args)
    with torch.no_grad():
        got, onednn = _library_calls(OneDnnMatmul(op), *args)
    assert onednn
    assert got.shape == want.shape and got.stride() == want.stride()
    # float32 sums of K products in another order: within a few ulp of the sums' size
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize(
    "op, make, kwargs",
    [
        (aten.mm.default, lambda: (torch.randn(M, K).double(), torch.randn(K, N).double()), {}),
        (aten.mm.default, lambda: (torch.randn(M, K), torch.randn(K, 2 * N)[:, ::2]), {}),
        (aten.mm.default, lambda: (torch.randn(M, 0), torch.randn(0, N)), {}),
        (aten.mm.default, lambda: (torch.randn(1, 4096), torch.randn(4096, 4096)), {}),
        (aten.mm.default, lambda: (torch.randn(64, 64), torch.randn(64, 64)), {}),
        (aten.mm.default, lambda: (torch.randn(M, K).to_sparse(), torch.randn(K, N)), {}),
        (aten.addmm.default, lambda: (torch.randn(M, N), torch.randn(M, K), torch.randn(K, N)), {}),
        (
            aten.addmm.default,
            lambda: (torch.randn(2 * N)[::2], torch.randn(M, K), torch.randn(K, N)),
            {},
        ),
        (
            aten.addmm.default,
            lambda: (torch.randn(N), torch.randn(M, K), torch.randn(K, N)),
            {"beta": 0.5},
        ),
    ],
    ids=[
        "float64",
        "strided weight",
        "empty",
        "one row",
        "small",
        "sparse",
        "2-D bias",
        "strided bias",
        "beta",
    ],
)
def test_what_onednn_does_not_take_runs_the_aten_op(op, make, kwargs):
    """Bit for bit ATen's result, and no oneDNN call."""
    args = make()
    with torch.no_grad():
        got, onednn = _library_calls(lambda *a: OneDnnMatmul(op)(*a, **kwargs), *args)
    assert not onednn
    want = op(*args, **kwargs)
    assert torch.equal(
        got.to_dense() if got.is_sparse else got, want.to_dense() if want.is_sparse else want
    )


@needs_onednn
def test_onednn_switched_off_runs_the_aten_op():
    a, b = torch.randn(M, K), torch.randn(K, N)
    with torch.backends.mkldnn.flags(enabled=False), torch.no_grad():
        got, onednn = _library_calls(OneDnnMatmul(aten.mm.default), a, b)
        assert gemm_library("onednn") == "aten" and gemm_library("auto") == "aten"
    assert not onednn and torch.equal(got, a @ b)


@needs_onednn
def test_recorded_grads_take_the_aten_op():
    a, b = torch.randn(M, K, requires_grad=True), torch.randn(K, N)
    got, onednn = _library_calls(OneDnnMatmul(aten.mm.default), a, b)
    assert not onednn and got.requires_grad
    got.sum().backward()
    assert torch.equal(a.grad, torch.ones(M, N) @ b.t())


def test_only_mm_and_addmm_have_a_onednn_stand_in():
    with pytest.raises(ValueError, match="mm or addmm"):
        OneDnnMatmul(aten.bmm.default)


def test_choose_takes_onednn_only_when_clearly_faster_everywhere():
    assert choose((2.0, 2.0)) == "onednn"
    assert choose((1.05, 1.05)) == "aten"  # under the 10% margin
    assert choose((4.0, 0.9)) == "aten"  # faster on average, slower on one shape
    assert choose(()) == "aten"  # no oneDNN times: a torch without it


SMALL_SHAPES = ((8, 16, 8), (4, 8, 4))


def _cache_path():
    return cache_dir("machine") / f"gemm-{machine_key()}.json"


def _cached(monkeypatch, tmp_path, **changes):
    """A cache record for SMALL_SHAPES (oneDNN 2x ATen's speed, or `changes`), and a
    measure() that fails."""
    monkeypatch.setenv("MEMOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gemm, "SHAPES", SMALL_SHAPES)
    monkeypatch.setattr(gemm, "_MEASURED", {})
    record = {
        "shapes": [list(s) for s in SMALL_SHAPES],
        "aten_s": [2e-6, 2e-6],
        "other_s": [1e-6, 1e-6],
        "ratios": [2.0, 2.0],
        **changes,
    }
    _cache_path().write_text(json.dumps(record))

    def measure():
        raise AssertionError("measured although the cache has this machine's times")

    monkeypatch.setattr(gemm, "measure", measure)


@needs_onednn
def test_auto_reads_the_machines_choice_from_the_cache(monkeypatch, tmp_path):
    _cached(monkeypatch, tmp_path)
    assert gemm_library("auto") == "onednn"
    _cached(monkeypatch, tmp_path, ratios=[0.5, 0.5])
    assert gemm_library("auto") == "aten"
    assert gemm_library("onednn") == "onednn" and gemm_library("aten") == "aten"


@needs_onednn
@pytest.mark.parametrize(
    "changes",
    [
        {"ratios": [0.0, 2.0]},
        {"aten_s": [-1.0, 2e-6]},
        {"other_s": ["fast", None]},
        {"ratios": [2.0]},
        {"shapes": [[1024, 512, 512], [8, 8, 8]]},  # measured for other shapes
        {"aten_s": None},
    ],
    ids=["zero", "negative", "not numbers", "too few", "other shapes", "missing"],
)
def test_an_unusable_cache_record_is_measured_again(monkeypatch, tmp_path, changes):
    _cached(monkeypatch, tmp_path, **changes)
    monkeypatch.setattr(
        gemm, "measure", lambda: gemm.GemmTimes(SMALL_SHAPES, (3e-6,) * 2, (1e-6,) * 2, (3.0,) * 2)
    )
    assert gemm_library("auto") == "onednn"
    record = json.loads(_cache_path().read_text())
    assert record["ratios"] == [3.0, 3.0] and record["library"] == "onednn"


def test_auto_measures_and_caches_on_a_new_machine(monkeypatch, tmp_path):
    """Under a float64 default dtype and a meta default device too: the measurement times
    real float32 CPU tensors. Measured once per process."""
    monkeypatch.setenv("MEMOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gemm, "SHAPES", SMALL_SHAPES)
    monkeypatch.setattr(gemm, "_MEASURED", {})
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.device("meta"):
            choice = gemm_library("auto")
    finally:
        torch.set_default_dtype(default)
    record = json.loads(_cache_path().read_text())
    assert record["label"] == "measured" and record["library"] == choice
    assert len(record["aten_s"]) == 2 and all(t > 0 for t in record["aten_s"])
    if onednn_available():
        assert len(record["ratios"]) == 2
    _cache_path().unlink()
    assert gemm_library("auto") == choice and not _cache_path().exists()  # not measured again


@needs_onednn
def test_a_failed_measurement_keeps_aten_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gemm, "_MEASURED", {})

    def measure():
        raise RuntimeError("no GEMM today")

    monkeypatch.setattr(gemm, "measure", measure)
    with pytest.warns(UserWarning, match="timing the CPU GEMM libraries failed.*no GEMM today"):
        assert gemm_library("auto") == "aten"


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
        torch.randn(M, K, dtype=dtype),
        torch.randn(K, N, dtype=dtype),
        torch.randn(N, 2 * K, dtype=dtype),
    )
    (graph,) = capture(fn, args)
    return graph.gm, fn, args


@needs_onednn
def test_plan_points_float32_gemms_at_onednn_when_chosen():
    """Must: both GEMMs of a float32 graph with cpu_gemm="onednn". Must not: the same graph
    with "aten" (its small results are plain ATen calls), a float64 graph, or products
    under MIN_MACS."""
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

    def small(x, w):
        return x @ w

    (graph,) = capture(small, (torch.randn(64, 64), torch.randn(64, 64)))
    assert plan_library_calls(graph.gm, "onednn") == 0


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
    assert CompiledGraph(gm, "forward", [None], cpu_gemm="onednn").libraries == (
        "2 float32 GEMMs on oneDNN (cpu_gemm='onednn')"
    )
    gm, _, _ = _linear_graph()
    assert CompiledGraph(gm, "forward", [None], cpu_gemm="aten").libraries == ""


@needs_onednn
@pytest.mark.parametrize("cpu_gemm", ["onednn", "aten"])
def test_training_through_torch_compile_matches_eager(cpu_gemm):
    """Forward and backward GEMMs (x @ w.t(), grad @ w, grad.t() @ x) on either library:
    with "onednn" every one of them runs on oneDNN, with "aten" none."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 128), torch.nn.Tanh(), torch.nn.Linear(128, 256)
    )
    x = torch.randn(128, 256)
    compiled = torch.compile(model, backend="memopt", options={"cpu_gemm": cpu_gemm})
    compiled(x).square().sum().backward()  # compiles
    model.zero_grad()
    with torch.profiler.profile() as prof:
        compiled(x).square().sum().backward()
    calls = sum("_linear_pointwise" in e.name for e in prof.events())
    assert calls == (5 if cpu_gemm == "onednn" else 0)  # 2 forward, 3 backward
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad)


@needs_onednn
def test_check_compares_the_passes_not_the_gemm_libraries():
    """check=True runs the unoptimized graph's GEMMs on the library the optimized one uses:
    a float32 product whose two libraries differ in the last bits is no mismatch."""
    x, w = torch.randn(256, 512), torch.randn(512, 256)
    compiled = torch.compile(
        lambda x, w: x @ w, backend="memopt", options={"check": True, "cpu_gemm": "onednn"}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = compiled(x, w)
    torch.testing.assert_close(got, x @ w, rtol=1e-5, atol=1e-4)


def test_memopts_gemvs_take_a_tie_but_not_a_shape_much_slower():
    """gemv.RULE: a replayed step launches memopt's GEMVs with no Python, so they are taken
    when as fast in the geometric mean, unless more than 10% slower on one shape."""
    rule = gemv.RULE
    assert choose((1.0, 1.0), "memopt", rule) == "memopt"
    assert choose((0.92, 1.4), "memopt", rule) == "memopt"
    assert choose((0.97, 0.98), "memopt", rule) == "aten"  # slower on average
    assert choose((0.85, 2.0), "memopt", rule) == "aten"  # one shape much slower
    assert choose((1.05, 1.05), "memopt", rule) == "memopt"  # under oneDNN's margin
