"""The fusion pass: exact bytes and kernel counts for each fusion kind, and each refusal."""

from __future__ import annotations

import pytest
import torch

import memopt

F32 = 4
X = 4 * 8 * F32  # a float32 (4, 8) tensor: 128 bytes
ROW = 4 * F32  # one float32 per row of it: 16 bytes


def x48():
    return torch.randn(4, 8)


def fusion(a):
    return next(p for p in a.ledger if p.pass_name == "fusion")


def check(fn, *inputs, **options):
    """Analyze with check=True (every pass compared with eager on real inputs) and run the
    compiled program against eager."""
    a = memopt.analyze(fn, *inputs, check=True, **options)
    compiled = torch.compile(fn, backend="memopt", options={"check": False, **options})
    got, want = compiled(*inputs), fn(*inputs)
    for g, w in zip(
        got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)
    ):
        torch.testing.assert_close(g, w)
    return a


def generated(a):
    return [k for k in a.kernels if k.kind in ("pointwise", "reduction")]


# -- fusion kinds: must fuse --------------------------------------------------------------


def test_pointwise_chain():
    a = check(lambda x, b: (x * 2 + b).relu(), x48(), torch.randn(8))
    # One kernel reads x and the 8-element bias once and writes the result once.
    assert a.bytes_moved == X + 8 * F32 + X
    assert len(a.kernels) == 1 and a.kernels[0].kind == "pointwise"
    assert fusion(a).bytes_before == (X + 8 * F32 + X) + 2 * (X + X)
    assert a.bytes_moved == a.lower_bound_bytes


def test_pointwise_into_reduction_input():
    a = check(lambda x: (x * 2).exp().sum(1), x48())
    assert a.bytes_moved == X + ROW
    assert [k.kind for k in a.kernels] == ["reduction"]


def test_reduction_into_its_consumers():
    a = check(lambda x: x.sum(1) * 2 + 1, x48())
    assert a.bytes_moved == X + ROW
    assert len(a.kernels) == 1


def test_softmax_is_one_kernel():
    a = check(lambda x: torch.softmax(x, -1), x48())
    assert a.bytes_moved == X + X
    assert len(a.kernels) == 1


def test_layer_norm_is_one_kernel():
    w, b = torch.randn(8), torch.randn(8)
    a = check(lambda x, w, b: torch.nn.functional.layer_norm(x, (8,), w, b), x48(), w, b)
    assert a.bytes_moved == X + 8 * F32 + 8 * F32 + X
    assert len(a.kernels) == 1


def test_horizontal_reductions_share_a_read():
    a = check(lambda x: (x.sum(1), (x * x).sum(1)), x48())
    assert a.bytes_moved == X + 2 * ROW
    assert len(a.kernels) == 1
    assert any(d.code == "fusion.horizontal" for d in fusion(a).decisions if d.applied)


def test_horizontal_pointwise_share_a_read():
    a = check(lambda x: (x.exp(), x.sin()), x48())
    assert a.bytes_moved == X + 2 * X
    assert len(a.kernels) == 1


def test_multi_output_kernel_stores_every_value_needed_outside():
    a = check(lambda x: (lambda y: (y, y + 1))(x * 2), x48())
    assert a.bytes_moved == X + 2 * X
    assert len(a.kernels) == 1


def test_views_between_fused_nodes_are_folded_into_indexing():
    a = check(lambda x: (x * 2).t().exp().reshape(32) + 1, x48())
    assert a.bytes_moved == X + X
    assert len(a.kernels) == 1


def test_gather_fuses_with_its_consumer():
    table, idx = torch.randn(10, 8), torch.tensor([3, 1, 3])
    a = check(lambda t, i: t[i].relu() * 2, table, idx)
    # Reads 3 of the 10 rows, the 3 indices, writes 3 rows.
    assert a.bytes_moved == 3 * 8 * F32 + 3 * 8 + 3 * 8 * F32
    assert len(a.kernels) == 1


# -- legality: must not fuse --------------------------------------------------------------


def refusals(a):
    return [d for d in fusion(a).decisions if not d.applied]


def test_no_cycle_through_an_extern_matmul():
    def fn(x):
        e = x.exp()
        return e * 2 + e @ e

    a = check(fn, torch.randn(4, 4))
    reasons = [d.reason for d in refusals(a)]
    assert any("path from one to the other leaves the group" in r for r in reasons)
    kinds = sorted(k.kind for k in a.kernels)
    assert "extern" in kinds
    assert all(d.bytes_saved > 0 for d in refusals(a))


def test_no_shared_kernel_for_different_reduction_axes():
    a = check(lambda x: (x.sum(0), x.sum(1)), x48())
    assert any(
        d.code == "fusion.refused_lowering" and "different shapes or axes" in d.reason
        for d in refusals(a)
    )
    assert len(a.kernels) == 2
    assert a.bytes_moved == (X + 8 * F32) + (X + ROW)


def test_no_reduction_read_at_another_row():
    def fn(x):
        s = x.sum(1, keepdim=True)  # (4, 1)
        return x + s.t()  # element (i, j) needs the sum of row j

    a = check(fn, torch.randn(4, 4))
    assert any(
        d.code == "fusion.refused_lowering" and "another row" in d.reason for d in refusals(a)
    )


def test_no_pointwise_kernel_with_outputs_of_different_sizes():
    def fn(x, v):
        b = v.exp()
        return b, x + b

    a = check(fn, x48(), torch.randn(8))
    assert any(
        d.code == "fusion.refused_lowering" and "different numbers of elements" in d.reason
        for d in refusals(a)
    )
    assert len(a.kernels) == 2


def test_group_size_cap():
    def chain(x):
        for _ in range(6):
            x = x * 1.5 + 0.5
        return x

    capped = check(chain, x48(), pass_options={"fusion": {"max_nodes": 4}})
    assert any(
        d.code == "fusion.refused_size" and "max_nodes=4" in d.reason for d in refusals(capped)
    )
    assert all(len(k.nodes) <= 4 for k in capped.kernels)
    free = check(chain, x48())
    assert len(free.kernels) == 1 and free.bytes_moved == 2 * X < capped.bytes_moved


def test_ops_without_lowering_stay_aten_calls():
    a = check(lambda x: torch.cumsum(x, 1) * 2, x48())
    assert sorted(k.kind for k in a.kernels) == ["aten", "aten"]
    assert a.bytes_moved == 4 * X


def test_fusion_can_be_disabled_and_fuel_limits_it():
    fn = lambda x: ((x * 2 + 1).exp() - 3).relu()  # noqa: E731
    none = check(fn, x48(), disable=["fusion"])
    assert len(none.kernels) == 5 and none.bytes_moved == 10 * X
    one = memopt.analyze(fn, x48(), fuel=1)
    assert len(one.kernels) == 4 and one.bytes_moved == 8 * X


def test_every_fusion_records_bytes_saved_and_they_add_up():
    a = check(lambda x: torch.softmax(x * 3, -1), x48())
    entry = fusion(a)
    saved = sum(d.bytes_saved for d in entry.decisions if d.applied)
    assert saved == entry.bytes_before - entry.bytes_after


def test_bias_add_that_fuses_with_nothing_goes_back_into_addmm():
    linear = torch.nn.Linear(8, 16)
    a = check(linear, x48())
    # addmm reads x, the weight and the bias once and writes the output once.
    assert [k.ops for k in a.kernels] == [("aten.addmm.default",)]
    assert a.bytes_moved == X + 16 * 8 * F32 + 16 * F32 + 4 * 16 * F32
    folded = [d for d in fusion(a).decisions if d.applied and d.code == "fusion.bias_folded"]
    assert folded and folded[0].bytes_saved == 2 * 4 * 16 * F32


@pytest.fixture
def cpp_with_library_softmax(monkeypatch):
    """The C++ backend declaring Feature.LIBRARY_SOFTMAX (it does not: its generated softmax
    is the faster one on the machine it is measured on, BENCHMARKS.md)."""
    import dataclasses

    from memopt.backends import registry
    from memopt.backends.registry import Feature

    cpp = registry.get_backend("cpp")
    assert not cpp.supports(Feature.LIBRARY_SOFTMAX)
    declared = dataclasses.replace(cpp, features=cpp.features | {Feature.LIBRARY_SOFTMAX})
    monkeypatch.setitem(registry._BACKENDS, "cpp", declared)


def test_lone_softmax_is_a_generated_kernel_on_the_cpu():
    x = x48()
    a = check(lambda x: torch.softmax(x, -1), x)
    assert [k.kind for k in a.kernels] == ["reduction"]
    assert a.bytes_moved == 2 * X
    assert not [d for d in fusion(a).decisions if d.code == "fusion.library_softmax"]


def test_lone_softmax_stays_atens_softmax_where_the_backend_says_so(cpp_with_library_softmax):
    """Must: a kernel that would be exactly one softmax runs as ATen's _softmax on a backend
    with Feature.LIBRARY_SOFTMAX (eager's own kernel: the same bits). Must not: a softmax
    fused with its scaling, or on a backend without the feature (reference)."""
    x = x48()
    a = check(lambda x: torch.softmax(x, -1), x)
    assert [k.ops for k in a.kernels] == [("aten._softmax.default",)]
    assert a.bytes_moved == 2 * X
    kept = [d for d in fusion(a).decisions if d.code == "fusion.library_softmax"]
    assert [d.applied for d in kept] == [True]
    compiled = torch.compile(lambda x: torch.softmax(x, 0), backend="memopt")
    assert torch.equal(compiled(x), torch.softmax(x, 0))

    scaled = check(lambda x: torch.softmax(x * 0.5, -1), x)
    assert [k.kind for k in scaled.kernels] == ["reduction"]
    assert scaled.bytes_moved == 2 * X
    assert not [d for d in fusion(scaled).decisions if d.code == "fusion.library_softmax"]

    reference = check(lambda x: torch.softmax(x, -1), x, backend="reference")
    assert [k.kind for k in reference.kernels] == ["reduction"]


def test_lone_transcendental_op_is_a_kernel_of_its_own_on_the_cpu():
    """Must: a lone float32 tanh (or exp, log, erf, ...) becomes a generated kernel on the
    C++ backend (Feature.LONE_MATH), the same bytes as the ATen call. Must not: a lone
    sigmoid (ATen's is as fast), a float64 tanh, a lone add, or tanh on a backend without
    the feature (reference)."""
    x = x48()
    for op in (torch.tanh, torch.exp, torch.erf, torch.sin):
        a = check(op, x)
        assert [k.kind for k in a.kernels] == ["pointwise"], op
        assert a.bytes_moved == 2 * X
        lone = [d for d in fusion(a).decisions if d.code == "fusion.lone_math"]
        assert [d.applied for d in lone] == [True]
    logs = check(torch.log1p, x.abs())
    assert [k.kind for k in logs.kernels] == ["pointwise"]

    for fn, inputs in (
        (torch.sigmoid, (x,)),
        (torch.tanh, (x.double(),)),
        (lambda x: x + 1, (x,)),
    ):
        a = check(fn, *inputs)
        assert [k.kind for k in a.kernels] == ["aten"], fn
        assert not [d for d in fusion(a).decisions if d.code == "fusion.lone_math"]
    reference = check(torch.tanh, x, backend="reference")
    assert [k.kind for k in reference.kernels] == ["aten"]

    # Lone ops kept apart by matmuls: decided in graph order (fuel goes to the first).
    w = torch.randn(8, 8)
    chain = check(lambda x, w: ((x.exp() @ w).tanh() @ w).erf(), x, w)
    lone = [d for d in fusion(chain).decisions if d.code == "fusion.lone_math"]
    assert [d.what.split("(")[-1] for d in lone] == [
        "aten.exp.default)",
        "aten.tanh.default)",
        "aten.erf.default)",
    ]
    assert [k.kind for k in chain.kernels] == ["pointwise", "extern"] * 2 + ["pointwise"]


def test_bias_add_that_fuses_stays_in_the_generated_kernel():
    linear = torch.nn.Linear(8, 16)
    # sigmoid: an activation the epilogue pass leaves to fusion (relu would be oneDNN's)
    a = check(lambda x: torch.sigmoid(linear(x)), x48())
    assert sorted(k.kind for k in a.kernels) == ["extern", "pointwise"]
    assert not [d for d in fusion(a).decisions if d.code == "fusion.bias_folded"]


# -- nested reductions: a reduction of a reduction's results over another axis --------------


def pairwise(x, y):
    return (x[:, None, :] - y[None, :, :]).abs()  # (rows of x, rows of y, features)


def test_reduction_of_a_reduction_is_one_kernel():
    """The inner (64, 48) sums never touch memory: one kernel reads x and y and writes the
    64 minima (Inductor: 1 kernel, 14,592 B); before, 2 kernels and 39,168 B."""
    x, y = torch.randn(64, 32), torch.randn(48, 32)
    a = check(lambda x, y: pairwise(x, y).sum(-1).amin(1), x, y)
    assert a.bytes_moved == 64 * 32 * F32 + 48 * 32 * F32 + 64 * F32 == 14592
    assert [k.kind for k in a.kernels] == ["reduction"]
    d, s = 64 * 48 * 32 * F32, 64 * 48 * F32  # the broadcast difference, the inner sums
    # Before fusion: sub, abs, sum and amin, each reading its input and writing its result.
    assert fusion(a).bytes_before == (8192 + 6144 + d) + 2 * d + (d + s) + (s + 64 * F32)
    assert a.bytes_moved == a.lower_bound_bytes
    double = check(lambda x, y: pairwise(x, y).sum(-1).amin(1), x.double(), y.double())
    assert double.bytes_moved == 2 * 14592 and len(double.kernels) == 1


def test_nested_argmin_and_integer_reductions_are_one_kernel():
    # Nearest neighbour: integer-valued floats, so every distance is exact and eager's
    # first-index tie rule is the one that decides.
    x, y = torch.randint(-4, 5, (16, 8)).float(), torch.randint(-4, 5, (12, 8)).float()
    a = check(lambda x, y: ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1).argmin(1), x, y)
    assert a.bytes_moved == 16 * 8 * F32 + 12 * 8 * F32 + 16 * 8
    assert len(a.kernels) == 1
    i, j = torch.randint(-9, 9, (4, 8)), torch.randint(-9, 9, (5, 8))
    ints = check(lambda a, b: (a[:, None, :] * b[None, :, :]).sum(-1).amax(1), i, j)
    assert ints.bytes_moved == (4 * 8 + 5 * 8 + 4) * 8 and len(ints.kernels) == 1


def test_nested_reduction_with_two_outputs_and_a_full_one():
    x, y = x48(), torch.randn(6, 8)
    both = check(lambda x, y: (lambda s: (s.amin(1), s.argmin(1)))(pairwise(x, y).sum(-1)), x, y)
    assert both.bytes_moved == X + 6 * 8 * F32 + ROW + 4 * 8
    assert len(both.kernels) == 1
    full = check(lambda x: x.exp().sum(-1).max(), x)  # x.max(): over every axis
    assert full.bytes_moved == X + F32 and len(full.kernels) == 1


def test_nested_reductions_refused_where_the_inner_result_leaves_the_kernel():
    """Must not fuse: the inner sums are a graph output, read at another index, or read
    by a two-pass outer reduction (logsumexp). Each stays 2 kernels, 528 B: x, y, the
    (4, 6) sums written and read once, the 4 results."""
    x, y = x48(), torch.randn(6, 8)
    sums = 4 * 6 * F32
    cases = {
        "stores only the outer reduction's rows": lambda x, y: (lambda s: (s, s.amin(1)))(
            pairwise(x, y).sum(-1)
        ),
        "read at another row": lambda x, y: (lambda s: (s - s[:, :1]).amin(1))(
            pairwise(x, y).sum(-1)
        ),
        "two passes over the outer reduction": lambda x, y: pairwise(x, y).sum(-1).logsumexp(1),
    }
    for reason, fn in cases.items():
        a = check(fn, x, y)
        assert a.bytes_moved == X + 6 * 8 * F32 + 2 * sums + ROW == 528, reason
        assert len(a.kernels) == 2, reason
        assert any(
            d.code == "fusion.refused_lowering" and reason in d.reason for d in refusals(a)
        ), reason


def test_nested_reductions_refused_where_the_backend_runs_none():
    """Triton renders no nested reduction (Feature.NESTED_REDUCTIONS): the merge is refused,
    with the bytes it would save (the (4, 6) sums written and read)."""
    pytest.importorskip("triton")
    x, y = x48(), torch.randn(6, 8)
    a = memopt.analyze(lambda x, y: pairwise(x, y).sum(-1).amin(1), x, y, backend="triton")
    assert len(a.kernels) == 2 and a.bytes_moved == 528
    (refused,) = [d for d in refusals(a) if d.code == "fusion.refused_nested"]
    assert refused.bytes_saved == 2 * 4 * 6 * F32 and "'triton'" in refused.reason


def test_equal_merges_go_to_the_earlier_consumer_on_every_run():
    def shared_by_two_reductions(x):
        p = x.exp()
        return p.sum(0), p.sum(1)

    x = torch.randn(16, 32)
    n = 16 * 32 * F32
    # exp fuses with either reduction for the same bytes: with the first in the graph,
    # never by the set order of the candidates (object ids, which differ between runs).
    # read x, write p and 32 sums; read p, write 16 sums (recompute off: no copy of exp).
    for _ in range(8):
        a = check(shared_by_two_reductions, x, disable=["recompute"])
        assert a.bytes_moved == n + n + 32 * F32 + n + 16 * F32
        assert len(a.kernels) == 2
        applied = [d.what for d in fusion(a).decisions if d.applied]
        assert applied == ["fused %exp + %sum_1"]


# -- a write to memory between the members ------------------------------------------------


def _mid_graph_write(mutate: bool):
    """p reads the counter c, then c is bumped in place (make_fx keeps the in-place op where
    it was, as a graph with its input updates in the middle has it), then q; p and q both
    read x, a horizontal pair."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from memopt.compiler.capture import decompositions
    from memopt.compiler.graph import annotate

    def fn(x, c):
        p = (x + c) * 3
        if mutate:
            c.add_(1)
        return p, (x * 2).exp()

    x, c = torch.randn(4, 8), torch.tensor(5.0)
    gm = make_fx(fn, decomposition_table=decompositions(), tracing_mode="fake")(x, c.clone())
    annotate(gm)
    return gm, fn, x, c


@pytest.mark.parametrize("mutate", [False, True])
def test_a_kernel_never_moves_a_read_past_a_write(mutate):
    """Must fuse: p and q, with nothing written between them. Must not: with c bumped
    between, one kernel placed at q would read the bumped c for p."""
    from memopt.config import Config
    from memopt.passes.pipeline import run_pipeline

    gm, fn, x, c = _mid_graph_write(mutate)
    config = Config.from_options({"backend": "reference"})
    result = run_pipeline(gm, config.pipeline(), "test", {})
    kernels = [n for n in result.gm.graph.nodes if type(n.target).__name__ == "FusedKernel"]
    decisions = [d for p in result.ledger if p.pass_name == "fusion" for d in p.decisions]
    refused = [d for d in decisions if d.code == "fusion.refused_order"]
    assert len(kernels) == (2 if mutate else 1)
    assert bool(refused) == mutate
    if mutate:
        assert refused[0].reason.startswith("%add reads %c_1 before %add_ writes it")
    mine, theirs = c.clone(), c.clone()
    for got, want in zip(result.gm(x, mine), fn(x, theirs)):
        torch.testing.assert_close(got, want)
    assert torch.equal(mine, theirs)


def _grow(cache, k):
    return torch.cat([cache, (k * 2).relu()])


def _grow_by_an_input_too(cache, k):
    return torch.cat([cache, k, (k * 2).relu()], dim=-2)


def _grow_then_exp(cache, k):
    return torch.cat([cache, (k * 2).relu()]).exp()


@pytest.mark.parametrize(
    "fn, cat_apart, at_stake",
    # the row's write and read; and k's second read (the row's kernel and the cat read it)
    [(_grow, True, 2 * 8 * F32), (_grow_by_an_input_too, True, 3 * 8 * F32)]
    + [(_grow_then_exp, False, 2 * 8 * F32)],
    ids=["row", "row_and_input", "then_exp"],
)
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_a_concatenation_growing_an_input_along_a_size_symbol(
    backend, fn, cat_apart, at_stake, tmp_path
):
    """Must not fuse on the C++ backend, which sets up a kernel's launch per size: the
    cache's growth by a row (and by an input's rows), along the size symbol Dynamo gives it
    at the second length, stays out of the row's kernel of static sizes, refused with the
    bytes at stake; ATen's cat where nothing else takes it. Must
    fuse: into its consumer (`exp`, of the symbol's size already), the same graph at static
    sizes (the first call's), and on the reference backend."""
    import json

    torch._dynamo.reset()
    compiled = torch.compile(
        fn, backend="memopt", options={"backend": backend, "report_dir": str(tmp_path)}
    )
    for length in (3, 4, 5):
        cache, k = torch.randn(length, 8), torch.randn(1, 8)
        torch.testing.assert_close(compiled(cache, k), fn(cache, k))
    names = ("inference.json", "inference.1.json")
    reports = [json.loads((tmp_path / name).read_text()) for name in names]
    for number, report in enumerate(reports):
        decisions = [d for p in report["ledger"] for d in p["decisions"]]
        refused = [d for d in decisions if d["code"] == "fusion.refused_per_size"]
        dynamic_cpp = number == 1 and backend == "cpp"
        assert ("aten.cat" in report["graph_text"]) == (dynamic_cpp and cat_apart)
        assert len(refused) == dynamic_cpp
        if dynamic_cpp:
            assert refused[0]["reason"].startswith("%cat grows input %arg")
            assert refused[0]["bytes_saved"] == at_stake
