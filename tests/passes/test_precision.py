"""The precision pass: weights stored narrow (int8, int4, bf16), opt-in, with its error.

- the formats' round-trip error bounds, element by element;
- the dequantizing kernels against dequantize-then-matmul (GEMV and the tiled path);
- the pass on a small model with a tied embedding and output layer: which nodes it
  rewrites, the bytes each rewritten kernel reads (exact), values against eager within the
  error it measured;
- refusal over a `max_error` budget, in training graphs, and for a shape int4 cannot pack;
- nothing changes when the pass is off, which is the default.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import memopt
from memopt.backends.cpp import launcher
from memopt.backends.cpp import quantized as cpp_quantized
from memopt.backends.narrow import quantize
from memopt.backends.registry import get_backend
from memopt.backends.runtime.quantized import (
    QuantizedEmbedding,
    QuantizedMatmul,
    QuantizedParameter,
)
from memopt.config import Config
from memopt.errors import OptionError

V, D, H = 64, 32, 96  # vocabulary, width, hidden width


class Tiny(nn.Module):
    """An embedding, an MLP with a residual, and an output layer tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.up = nn.Linear(D, H, bias=False)
        self.down = nn.Linear(H, D, bias=False)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h)


def model() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


def ids(tokens: int) -> torch.Tensor:
    return torch.randint(0, V, (1, tokens), generator=torch.Generator().manual_seed(1))


def precision(weights: str, **options: object) -> dict[str, object]:
    return {"pass_options": {"precision": {"weights": weights, **options}}}


def analyze(m: nn.Module, tokens: int, **options: object) -> memopt.Analysis:
    with torch.no_grad():
        return memopt.analyze(m, ids(tokens), **options)


def precision_decisions(a: memopt.Analysis) -> list[tuple[str, bool, str]]:
    return [
        (d.code, d.applied, d.what.split()[1])
        for p in a.ledger
        if p.pass_name == "precision"
        for d in p.decisions
    ]


# -- formats and kernels ---------------------------------------------------------------------


@pytest.mark.parametrize("cols,group", [(64, 16), (40, 16), (10, 4)])
def test_round_trip_error_is_within_half_a_step(cols: int, group: int) -> None:
    w = torch.randn(24, cols, generator=torch.Generator().manual_seed(0))
    q8 = quantize(w, "int8")
    step8 = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((q8.dequantize() - w).abs() <= step8 / 2 + 1e-7).all()
    assert q8.nbytes == 24 * cols + 24 * 4
    q4 = quantize(w, "int4", group)
    groups = -(-cols // group)
    assert q4.data.shape == (24, cols // 2) and q4.scale.shape == (24, groups)
    for g in range(groups):
        part = w[:, g * group : (g + 1) * group]
        step4 = part.abs().amax(dim=1, keepdim=True) / 7
        err = (q4.dequantize()[:, g * group : (g + 1) * group] - part).abs()
        assert (err <= step4 / 2 + 1e-7).all()
    bf = quantize(w, "bf16")
    assert ((bf.dequantize() - w).abs() <= w.abs() * 2**-8).all()
    assert bf.nbytes == 24 * cols * 2
    # fp8 e4m3: 3 mantissa bits (half an ulp: 2^-4 relative) in its normal range (past 2^-6
    # of the row's scale), at most half its smallest subnormal step (2^-10 of it) below
    f8 = quantize(w, "fp8_e4m3")
    scale = w.abs().amax(dim=1, keepdim=True) / 448
    bound = torch.maximum(w.abs() * 2**-4, scale * 2**-10)
    assert ((f8.dequantize() - w).abs() <= bound * (1 + 1e-6)).all()
    assert f8.nbytes == 24 * cols + 24 * 4


def test_int4_needs_even_rows_and_groups() -> None:
    with pytest.raises(ValueError, match="even"):
        quantize(torch.randn(4, 9), "int4", 4)
    with pytest.raises(ValueError, match="even"):
        quantize(torch.randn(4, 8), "int4", 3)
    with pytest.raises(ValueError, match="unknown weight format"):
        quantize(torch.randn(4, 8), "int3")


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("kind", ["int8", "int4", "bf16", "fp8_e4m3"])
@pytest.mark.parametrize("m", [1, 3, cpp_quantized.GEMV_ROWS + 5])
def test_kernels_match_dequantize_then_matmul(backend: str, kind: str, m: int) -> None:
    """Every backend's dequantizing matmul (Triton's under its interpreter), for each format
    it reads (fp8: Triton and the reference only)."""
    if kind not in get_backend(backend).quantized_formats:
        assert (backend, kind) == ("cpp", "fp8_e4m3")
        return
    matmul = get_backend(backend).quantized_matmul
    g = torch.Generator().manual_seed(0)
    # odd N; a row int4's groups of 128 do not divide; a row of whole groups of 128 (the
    # C++ int4 GEMV's loop of a fixed group length)
    for n, k in ((37, 200), (8, 1376), (5, 512)):
        w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
        bias = torch.randn(n, generator=g)
        qw = quantize(w, kind, 128)
        expected = x @ qw.dequantize().t()
        torch.testing.assert_close(matmul(x, qw), expected, rtol=1e-4, atol=1e-4)
        got = matmul(x, qw, False, bias)
        torch.testing.assert_close(got, expected + bias, rtol=1e-4, atol=1e-4)
        index = torch.tensor([[3, 0], [n - 1, 3]])
        torch.testing.assert_close(qw.gather_rows(index), qw.dequantize()[index])


@pytest.mark.parametrize("library", ["onednn", "aten"])
def test_many_rows_multiply_dequantized_tiles_on_either_gemm_library(monkeypatch, library):
    """Past GEMV_ROWS rows the C++ matmul hands dequantized tiles to the graph's GEMM
    library: oneDNN (whose result is copied into the output's columns, or is the output
    where one tile holds the whole weight) or ATen (out=); the graph's planning tells each
    QuantizedMatmul which, from `cpu_gemm`."""
    if library == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    monkeypatch.setattr(cpp_quantized, "TILE_BYTES", 64 * 4 * 200)  # several tiles of 64 rows
    g = torch.Generator().manual_seed(0)
    w, x, bias = (torch.randn(s, generator=g) for s in ((150, 200), (40, 200), (150,)))
    qw = quantize(w, "int8", 128)
    expected = x @ qw.dequantize().t() + bias
    with torch.profiler.profile() as prof:
        got = cpp_quantized.matmul(x, qw, False, bias, library)
    torch.testing.assert_close(got, expected)
    onednn_calls = sum("_linear_pointwise" in e.name for e in prof.events())
    assert onednn_calls == (3 if library == "onednn" else 0)
    # the whole weight in one tile: oneDNN's result is the output, with no copy into it
    monkeypatch.setattr(cpp_quantized, "TILE_BYTES", 4 * 200 * 150)
    with torch.profiler.profile() as prof:
        got = cpp_quantized.matmul(x, qw, False, bias, library)
    torch.testing.assert_close(got, expected)
    names = [e.name for e in prof.events()]
    assert sum("_linear_pointwise" in n for n in names) == (1 if library == "onednn" else 0)
    if library == "onednn":
        assert "aten::copy_" not in names


@pytest.mark.parametrize("cpu_gemm", ["onednn", "aten"])
def test_the_graphs_cpu_gemm_choice_reaches_the_narrow_matmuls(cpu_gemm):
    from memopt.backends.runtime.gemm import point_gemms

    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 16)).eval()
    analysis = memopt.analyze(
        model, torch.randn(8, 64), pass_options={"precision": {"weights": "int8"}}
    )
    (graph,) = analysis.graphs
    targets = [n.target for n in graph.gm.graph.nodes if isinstance(n.target, QuantizedMatmul)]
    assert len(targets) == 2 and all(t.gemm == "aten" for t in targets)
    point_gemms(graph.gm, cpu_gemm)
    assert all(t.gemm == cpu_gemm for t in targets)


def _quantized_x(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as the int8-activation kernels see it: blocks rounded to 127 steps of their max."""
    out = torch.empty_like(x)
    for start in range(0, x.shape[1], block):
        part = x[:, start : start + block]
        scale = (part.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-30)
        out[:, start : start + block] = torch.round(part / scale) * scale
    return out


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("m", [1, 2, cpp_quantized.GEMV_ROWS + 3])
@pytest.mark.parametrize("integer_gemm", [True, False], ids=["int-gemm", "tiles"])
def test_int8_activation_kernels_match_quantized_x_then_matmul(
    monkeypatch, kind: str, m: int, integer_gemm: bool
) -> None:
    """The integer (VNNI where present) dot products compute exactly what x quantized per
    block times the dequantized weight gives, at any M (the tiled path quantizes x too).
    Many rows of int8 weights, where the machine has an integer GEMM, quantize x per row
    for it; without one, per block like the rest."""
    if integer_gemm and not cpp_quantized.integer_gemm():
        pytest.skip("no integer GEMM (VNNI) on this machine")
    monkeypatch.setattr(cpp_quantized, "integer_gemm", lambda: integer_gemm)
    g = torch.Generator().manual_seed(0)
    # (37, 256), (8, 1024): whole 128-blocks, odd and even rows (the paired-row VNNI path);
    # K of 1 and 2 (int8): the integer GEMM's degenerate operands
    shapes = ((37, 200), (9, 1376), (5, 64), (37, 256), (8, 1024))
    for n, k in shapes + (((6, 1), (7, 2)) if kind == "int8" else ()):
        w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
        qw = quantize(w, kind, 128)
        block = 128 if kind == "int4" else cpp_quantized.ACTIVATION_BLOCK
        rows = kind == "int8" and m > cpp_quantized.GEMV_ROWS and integer_gemm and k > 1
        block = k if rows else block
        expected = _quantized_x(x, block) @ qw.dequantize().t()
        got = cpp_quantized.matmul(x, qw, int8_activations=True)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        bias = torch.randn(n, generator=g)
        got = cpp_quantized.matmul(x, qw, int8_activations=True, bias=bias)
        torch.testing.assert_close(got, expected + bias, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("m", [1, cpp_quantized.GEMV_ROWS + 3])
def test_int8_activations_pass_a_nan_on(kind: str, m: int) -> None:
    """A NaN (or an infinity) in x makes its row's outputs NaN, as in float32, on the GEMV
    and on the many-row paths; the other rows stay finite."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(24, 256, generator=g), torch.randn(m, 256, generator=g)
    x[0, 200] = float("nan")
    got = cpp_quantized.matmul(x, quantize(w, kind, 128), int8_activations=True)
    assert got[0].isnan().all() and not got[1:].isnan().any()


def test_many_rows_of_int8_weights_and_activations_are_one_integer_gemm(monkeypatch) -> None:
    """Must: one `_int_mm` for an int8 x int8 product of many rows where the machine has an
    integer GEMM. Must not: without one (dequantized tiles), or with float32 activations."""
    if not cpp_quantized.integer_gemm():
        pytest.skip("no integer GEMM (VNNI) on this machine")
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 256, generator=g), torch.randn(40, 256, generator=g)
    qw = quantize(w, "int8", 128)

    def int_mm_calls(**kwargs) -> int:
        with torch.profiler.profile() as prof:
            cpp_quantized.matmul(x, qw, **kwargs)
        return sum(e.name == "aten::_int_mm" for e in prof.events())

    assert int_mm_calls(int8_activations=True) == 1
    assert int_mm_calls(int8_activations=False) == 0
    with torch.backends.mkldnn.flags(enabled=False):  # _int_mm's plain loops: 100x slower
        assert int_mm_calls(int8_activations=True) == 0
    monkeypatch.setattr(cpp_quantized, "integer_gemm", lambda: False)
    assert int_mm_calls(int8_activations=True) == 0


def test_many_rows_of_int4_weights_and_int8_activations_are_one_integer_gemm_a_group(
    monkeypatch,
) -> None:
    """Must: one `_int_mm` per weight group (and per chunk of rows) for int4 weights with
    int8 activations, many rows, where the machine has an integer GEMM, with the values of
    x quantized per group times the dequantized weight. Must not: float32 activations, or
    no integer GEMM (dequantized tiles)."""
    if not cpp_quantized.integer_gemm():
        pytest.skip("no integer GEMM (VNNI) on this machine")
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 328, generator=g), torch.randn(40, 328, generator=g)
    bias = torch.randn(96, generator=g)
    qw = quantize(w, "int4", 128)  # two whole groups and one of 72

    def int_mm_calls(**kwargs) -> int:
        with torch.profiler.profile() as prof:
            got = cpp_quantized.matmul(x, qw, bias=bias, **kwargs)
        want = (_quantized_x(x, 128) if kwargs["int8_activations"] else x) @ qw.dequantize().t()
        torch.testing.assert_close(got, want + bias, rtol=1e-4, atol=1e-4)
        return sum(e.name == "aten::_int_mm" for e in prof.events())

    assert int_mm_calls(int8_activations=True) == 3
    monkeypatch.setattr(cpp_quantized, "GROUP_PRODUCTS_BYTES", 4 * 96 * 16)  # 16 rows
    assert int_mm_calls(int8_activations=True) == 3 * 3  # rows 0-15, 16-31, 32-39
    assert int_mm_calls(int8_activations=False) == 0
    monkeypatch.setattr(cpp_quantized, "integer_gemm", lambda: False)
    assert int_mm_calls(int8_activations=True) == 0


def test_the_integer_gemm_takes_a_strided_bias_and_passes_a_nan_on() -> None:
    if not cpp_quantized.integer_gemm():
        pytest.skip("no integer GEMM (VNNI) on this machine")
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(4000, 16, generator=g), torch.randn(6, 16, generator=g)
    qw = quantize(w, "int8", 128)
    bias = torch.randn(8000, generator=g)[::2]
    want = cpp_quantized.matmul(x, qw, True, bias.contiguous())
    torch.testing.assert_close(cpp_quantized.matmul(x, qw, True, bias), want)
    x[2, 5] = float("nan")
    got = cpp_quantized.matmul(x, qw, True)
    assert got[2].isnan().all() and not got[[0, 1, 3, 4, 5]].isnan().any()


# -- the pass ---------------------------------------------------------------------------------


def test_off_by_default_and_on_when_its_options_are_given() -> None:
    assert "precision" not in Config().pass_names()
    on = Config.from_options(precision("int8"))
    assert on.pass_names()[:2] == ("cleanup", "precision")
    assert (
        "precision"
        not in Config.from_options({**precision("int8"), "disable": ["precision"]}).pass_names()
    )


def test_off_changes_nothing() -> None:
    m, x = model(), ids(3)
    with torch.no_grad():
        want = m(x)
        plain = torch.compile(m, backend="memopt")(x)
        torch._dynamo.reset()
        # weights "none" runs the pass (named in the options) and rewrites nothing
        none = torch.compile(m, backend="memopt", options=precision("none"))(x)
    assert torch.equal(plain, none)
    torch.testing.assert_close(plain, want)


@pytest.mark.parametrize("tokens", [3, cpp_quantized.GEMV_ROWS + 4])
def test_int8_rewrites_every_weight_read_and_reads_it_narrow(tokens: int) -> None:
    m = model()
    a = analyze(m, tokens, **precision("int8"))
    assert precision_decisions(a) == [
        # one narrow copy for the lookup and the tied head ("embedding": a table only looked up)
        ("precision.weight", True, "embed.weight"),
        ("precision.weight", True, "up.weight"),
        ("precision.weight", True, "down.weight"),
    ]
    matmuls = {k.ops[0]: k for k in a.kernels if k.ops[0] == "memopt.int8_matmul"}
    assert len([k for k in a.kernels if k.ops[0] == "memopt.int8_matmul"]) == 3
    reads = sorted(k.read_bytes for k in a.kernels if k.ops[0] == "memopt.int8_matmul")
    # x (tokens x K float32) once and the weight as int8 rows with one float32 scale each
    assert reads == sorted(
        [
            tokens * D * 4 + H * D + H * 4,  # up: x (tokens, D), W (H, D)
            tokens * H * 4 + D * H + D * 4,  # down: x (tokens, H), W (D, H)
            tokens * D * 4 + V * D + V * 4,  # head: x (tokens, D), W (V, D)
        ]
    )
    assert matmuls
    lookup = next(k for k in a.kernels if k.ops[0] == "memopt.int8_embedding")
    assert lookup.read_bytes == tokens * 8 + tokens * (D + 4)  # int64 ids, int8 rows + scales
    # The pass's own bytes: what the pipeline measured is what its decisions claim.
    entry = next(p for p in a.ledger if p.pass_name == "precision")
    assert entry.bytes_saved == sum(d.bytes_saved for d in entry.decisions)
    assert entry.bytes_saved == (
        (H * D * 4 - H * D - H * 4)
        + (D * H * 4 - D * H - D * 4)
        + (V * D * 4 - V * D - V * 4)
        + tokens * (D * 4 - D - 4)
    )


@pytest.mark.parametrize("kind,tolerance", [("int8", 0.05), ("int4", 0.5), ("bf16", 0.01)])
def test_compiled_values_are_within_the_error_it_reports(kind: str, tolerance: float) -> None:
    m, x = model(), ids(5)
    with torch.no_grad():
        want = m(x)
        got = torch.compile(m, backend="memopt", options=precision(kind))(x)
    error = (got - want).abs().max() / want.abs().max()
    assert 0 < error < tolerance
    a = analyze(m, 5, **precision(kind))
    reason = next(d.reason for p in a.ledger if p.pass_name == "precision" for d in p.decisions)
    reported = float(reason.split("(")[-1].split(" of the output's scale")[0])
    assert reported == pytest.approx(error.item(), rel=0.03)  # printed to 3 digits
    assert "next-token KL" in reason  # the head's outputs span the embedding's rows


def test_a_changed_weight_is_quantized_again() -> None:
    m, x = model(), ids(2)
    compiled = torch.compile(m, backend="memopt", options=precision("bf16"))
    with torch.no_grad():
        before = m(x)
        compiled(x)
        m.up.weight.mul_(-2.0)  # in place: same tensor, new version
        got, want = compiled(x), m(x)
    # within bf16's error of the new weights, far from the stale ones' result
    assert (got - want).abs().max() < 0.05 * (want - before).abs().max()


def test_budget_gives_weights_back_largest_share_first() -> None:
    m = model()
    a = analyze(m, 3, **precision("int4", group_size=8, max_error=0.0))
    assert {(code, applied) for code, applied, _ in precision_decisions(a)} == {
        ("precision.over_budget", False)
    }
    off = analyze(m, 3)
    assert a.bytes_moved == off.bytes_moved
    # A budget between the smallest and the largest share keeps only some weights narrow.
    loose = analyze(m, 3, **precision("int4", group_size=8))
    reasons = [d.reason for p in loose.ledger if p.pass_name == "precision" for d in p.decisions]
    shares = sorted(float(r.split("error with it alone ")[1].split()[0]) for r in reasons)
    some = analyze(m, 3, **precision("int4", group_size=8, max_error=shares[-1] * 0.999))
    codes = [code for code, _, _ in precision_decisions(some)]
    assert "precision.over_budget" in codes and (
        "precision.weight" in codes or "precision.embedding" in codes
    )
    assert off.bytes_moved > some.bytes_moved > loose.bytes_moved


def test_training_graphs_are_refused() -> None:
    m = model().train()
    a = memopt.analyze(m, ids(3), training=True, **precision("int8"))
    codes = {code for code, _, _ in precision_decisions(a)}
    assert codes == {"precision.training"}
    assert not any("int8" in k.ops[0] for k in a.kernels)


def test_bad_options_name_the_problem() -> None:
    with pytest.raises(OptionError, match="option 'weights' of pass 'precision' takes one of"):
        Config.from_options(precision("int3"))
    with pytest.raises(OptionError, match="group_size"):
        Config.from_options(precision("int4", group_size=0))


def test_matmul_target_narrow_by_default_and_exact_when_asked() -> None:
    """The target the pass leaves reads the narrow copy; `exact` (how the pass measures a
    weight's share) multiplies by the float32 parameter instead."""
    m = model()
    a = analyze(m, 3, **precision("int8"))
    targets = {
        n.target.parameter.label: n.target
        for g in a.graphs
        for n in g.gm.graph.nodes
        if isinstance(n.target, QuantizedMatmul)
    }
    assert sorted(targets) == ["down.weight", "embed.weight", "up.weight"]
    up = targets["up.weight"]
    assert up.exact is False and repr(up) == "QuantizedMatmul(int8, up.weight)"
    x, w = torch.randn(2, D), m.up.weight.detach()
    narrow = x @ up.parameter.weight.dequantize().t()
    torch.testing.assert_close(up(x, w), narrow, rtol=1e-4, atol=1e-4)
    up.exact = True
    try:
        torch.testing.assert_close(up(x, w), x @ w.t())
    finally:
        up.exact = False
    assert not torch.allclose(narrow, x @ w.t(), rtol=1e-5, atol=1e-5)  # int8 does differ


def test_triton_backend_reads_the_weights_through_its_dequantizing_kernel() -> None:
    """With backend="triton" (its interpreter on this CPU) the matmuls are the Triton tile
    loop, with the same bytes as the C++ GEMV's."""
    m = model()
    cpp = analyze(m, 3, **precision("int4", group_size=16))
    triton = analyze(m, 3, backend="triton", **precision("int4", group_size=16))
    targets = [
        n.target
        for g in triton.graphs
        for n in g.gm.graph.nodes
        if isinstance(n.target, QuantizedMatmul)
    ]
    assert len(targets) == 3 and {t.backend.name for t in targets} == {"triton"}
    narrow = [k.read_bytes for k in cpp.kernels if k.ops[0] == "memopt.int4_matmul"]
    assert narrow == [k.read_bytes for k in triton.kernels if k.ops[0] == "memopt.int4_matmul"]
    x = ids(3)
    with torch.no_grad():
        want = m(x)
        got = torch.compile(
            m, backend="memopt", options={"backend": "triton", **precision("int4", group_size=16)}
        )(x)
    assert (got - want).abs().max() / want.abs().max() < 0.5


class _Biased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, H)
        self.plain = nn.Linear(D, H, bias=False)
        self.b = nn.Parameter(torch.randn(H))

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.plain(x)  # read twice: its add cannot go into the kernel
        return self.fc(x) + r, y + self.b, y * 2


def test_a_bias_add_goes_into_the_matmul_and_a_shared_product_keeps_its_add() -> None:
    torch.manual_seed(0)
    m = _Biased().eval()
    x, r = torch.randn(3, D), torch.randn(3, H)
    with torch.no_grad():
        a = memopt.analyze(m, x, r, **precision("int8"))
        off = memopt.analyze(m, x, r)
        want = m(x, r)
        got = torch.compile(m, backend="memopt", options=precision("int8"))(x, r)
    matmuls = sorted(k.read_bytes for k in a.kernels if k.ops[0] == "memopt.int8_matmul")
    narrow = H * D + H * 4
    # fc: x, its weight narrow and its bias (folded); plain: x and its weight
    assert matmuls == sorted([3 * D * 4 + narrow + H * 4, 3 * D * 4 + narrow])
    reasons = [d.reason for p in a.ledger if p.pass_name == "precision" for d in p.decisions]
    assert sum("bias added in the kernel" in r for r in reasons) == 1
    # The folded add is gone; the residual add and the shared product's two uses remain.
    assert len(a.kernels) == len(off.kernels)
    for g, w in zip(got, want):
        assert (g - w).abs().max() / w.abs().max() < 0.02


def test_shares_too_slow_to_measure_give_way_to_each_weights_own_error(monkeypatch) -> None:
    from memopt.passes import precision as pass_module

    monkeypatch.setattr(pass_module, "SHARE_RUNS_S", 0.0)
    m = model()
    a = analyze(m, 3, **precision("int4", group_size=8))
    reasons = [d.reason for p in a.ledger if p.pass_name == "precision" for d in p.decisions]
    assert len(reasons) == 3
    assert all("share of the output error not measured" in r for r in reasons)
    assert all("shares not measured: 3 runs of" in r for r in reasons)
    # the budget still applies, in order of the weights' own errors
    none = analyze(m, 3, **precision("int4", group_size=8, max_error=0.0))
    assert {code for code, _, _ in precision_decisions(none)} == {"precision.over_budget"}


def test_fp8_weights_are_read_by_the_triton_kernel_and_refused_on_the_cpp_backend() -> None:
    m, x = model(), ids(3)
    cpp = analyze(m, 3, **precision("fp8_e4m3"))
    assert {code for code, _, _ in precision_decisions(cpp)} == {"precision.unsupported"}
    reason = next(d.reason for p in cpp.ledger if p.pass_name == "precision" for d in p.decisions)
    assert "backend 'cpp' has no matmul reading fp8_e4m3 weights" in reason
    triton = analyze(m, 3, backend="triton", **precision("fp8_e4m3"))
    assert {code for code, applied, _ in precision_decisions(triton) if applied} == {
        "precision.weight"
    }
    with torch.no_grad():
        want = m(x)
        got = torch.compile(
            m, backend="memopt", options={"backend": "triton", **precision("fp8_e4m3")}
        )(x)
    assert 0 < (got - want).abs().max() / want.abs().max() < 0.2


def test_an_output_that_turns_nan_is_an_infinite_error() -> None:
    from memopt.passes.output_error import compare as _compare

    want = torch.tensor([[1.0, 2.0], [float("nan"), 4.0]])
    same_nan = torch.tensor([[1.0, 2.5], [float("nan"), 4.0]])
    assert _compare([want], [same_nan], set()).relative == pytest.approx(0.5 / 4)
    new_nan = torch.tensor([[1.0, float("nan")], [float("nan"), 4.0]])
    assert _compare([want], [new_nan], set()).relative == float("inf")


class _PlusOne(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + 1.0


def test_a_number_added_to_a_product_stays_an_add() -> None:
    torch.manual_seed(0)
    m = _PlusOne().eval()
    with torch.no_grad():
        a = memopt.analyze(m, torch.randn(2, D), **precision("int8"))
    assert precision_decisions(a) == [("precision.weight", True, "fc.weight")]
    reasons = [d.reason for p in a.ledger if p.pass_name == "precision" for d in p.decisions]
    assert "bias added" not in reasons[0]
    (matmul,) = [k for k in a.kernels if k.ops[0] == "memopt.int8_matmul"]
    assert matmul.read_bytes == 2 * D * 4 + H * D + H * 4  # x and the weight: no bias


def test_only_integer_row_numbers_make_a_lookup() -> None:
    """On a traced graph: `w[rows]` and `index_select(w, 0, rows)` are lookups; a boolean
    mask, or index_select along another dim, is not."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from memopt.compiler.graph import annotate
    from memopt.passes.precision import _lookup_index

    w, rows, keep = torch.randn(V, D), torch.tensor([3, 1]), torch.arange(V) % 3 == 0

    def reads(w, rows, keep):
        return w[rows], torch.index_select(w, 0, rows), w[keep], torch.index_select(w, 1, rows)

    gm = make_fx(reads)(w, rows, keep)
    annotate(gm)
    found = {
        str(n.target).split(".")[1] + ("_dim1" if n.args[1] == 1 else ""): _lookup_index(n)
        for n in gm.graph.nodes
        if n.op == "call_function"
        and n.target in (torch.ops.aten.index.Tensor, torch.ops.aten.index_select.default)
    }
    rows_node = next(
        n for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("rows")
    )
    assert found["index_select"] is rows_node and found["index_select_dim1"] is None
    masked = [n for n in gm.graph.nodes if n.target is torch.ops.aten.index.Tensor]
    assert [_lookup_index(n) for n in masked] == [rows_node, None]


class _Untied(nn.Module):
    """An untied, bias-free output layer: its logits are the graph's output."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.head = nn.Linear(D, V + 3, bias=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(ids)
        return h * 2, self.head(h)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.fc = nn.Linear(D, D, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return h + self.fc(h)


def test_next_token_kl_is_taken_over_what_an_output_layer_returns() -> None:
    torch.manual_seed(0)
    m = _Untied().eval()
    with torch.no_grad():
        a = memopt.analyze(m, ids(3), **precision("int8"))
    figures = [d.figures for p in a.ledger if p.pass_name == "precision" for d in p.decisions]
    assert len(figures) == 2 and all(f["kl"] > 0 for f in figures)
    # a residual added after the matmul: what the graph returns is not a layer's logits
    with torch.no_grad():
        residual = memopt.analyze(_Residual().eval(), ids(3), **precision("int8"))
    figures = [
        d.figures for p in residual.ledger if p.pass_name == "precision" for d in p.decisions
    ]
    assert figures and not any("kl" in f for f in figures)


def test_a_lookup_by_a_vector_of_ids_is_an_index_select_read_narrow() -> None:
    """Rows looked up by a 1-D index reach the pass as index_select (capture's embedding
    decomposition): one narrow row and its scale read per id."""
    m = model()
    with torch.no_grad():
        a = memopt.analyze(m, ids(4)[0], **precision("int8"))
    lookup = next(k for k in a.kernels if k.ops[0] == "memopt.int8_embedding")
    assert lookup.read_bytes == 4 * 8 + 4 * (D + 4)
    reason = next(d.reason for p in a.ledger if p.pass_name == "precision" for d in p.decisions)
    assert "next-token KL" in reason  # the head's output is the graph's: logits


def test_dynamic_sizes_are_measured_at_their_example_values() -> None:
    """A graph compiled with dynamic sizes takes SymInts, handed over as their hints."""
    m = model()
    with torch.no_grad():
        a = memopt.analyze(m, ids(5), dynamic=True, **precision("int8"))
    assert {code for code, applied, _ in precision_decisions(a) if applied} == {"precision.weight"}
    assert any(g.symbols for g in a.graphs)  # the sizes were symbolic


def test_a_graph_that_does_not_run_on_its_example_inputs_keeps_its_weights(monkeypatch) -> None:
    from memopt.passes import precision as pass_module

    def fails(*args, **kwargs):
        raise IndexError("index 7 is out of bounds")

    monkeypatch.setattr(pass_module._Measure, "__init__", fails)
    m = model()
    a = analyze(m, 3, **precision("int8"))
    assert {code for code, _, _ in precision_decisions(a)} == {"precision.no_values"}
    reason = next(d.reason for p in a.ledger if p.pass_name == "precision" for d in p.decisions)
    assert "did not run on its example inputs" in reason and "IndexError" in reason
    assert a.bytes_moved == analyze(m, 3).bytes_moved


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_real_models_narrow_every_linear_layer_without_falling_back(name: str) -> None:
    """GPT-2 (Conv1D (in, out) weights, tied head) and T5 (encoder-decoder): every linear
    weight narrowed, no graph falling back to ATen, outputs within int8's error."""
    import warnings

    import real_models

    if not real_models.has_transformers():
        pytest.skip("needs transformers")
    m, inputs = real_models.build(name, "tiny")
    m.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "optimizing the ... graph failed"
        want = m(*inputs)
        got = torch.compile(m, backend="memopt", options=precision("int8"))(*inputs)
        a = memopt.analyze(m, *inputs, **precision("int8"))
    assert (got - want).abs().max() / want.abs().max() < 0.02
    decisions = [d for p in a.ledger if p.pass_name == "precision" for d in p.decisions]
    assert decisions and all(d.applied for d in decisions)


@pytest.mark.parametrize("kind", ["int8", "int4", "bf16"])
@pytest.mark.parametrize("a8", [False, True], ids=["f32 x", "int8 x"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["mm", "bias"])
def test_a_repeated_gemv_is_one_native_launch_with_the_same_values(
    monkeypatch, kind, a8, with_bias
):
    """The second call with the layouts of the first runs the same kernel through the
    native launcher (no Python `matmul`), bit for bit; a weight changed in place is
    quantized again and the launch bound anew; other layouts take `matmul` again."""
    if launcher.module() is None:
        pytest.skip("no native launcher here")
    if a8 and kind == "bf16":
        pytest.skip("bf16 has no int8-activation kernel")
    weight = nn.Parameter(torch.randn(48, 64))
    parameter = QuantizedParameter(weight, kind, 32, False, "w", int8_activations=a8)
    calls = []
    original = cpp_quantized.matmul
    counted = dataclasses.replace(
        get_backend("cpp"), quantized_matmul=lambda *a: calls.append(1) or original(*a)
    )
    bias = torch.randn(48) if with_bias else None
    target = QuantizedMatmul(parameter, counted)
    with torch.no_grad():
        target(torch.randn(1, 64), weight, bias)
        x = torch.randn(1, 64)
        fast = target(x, weight, bias)
        assert len(calls) == 1
        assert torch.equal(fast, original(x, parameter.weight, a8, bias))
        weight.mul_(2.0)  # in place: the version counter moves
        again = target(x, weight, bias)
        assert len(calls) == 2
        shift = 0 if bias is None else bias
        torch.testing.assert_close(again, 2 * (fast - shift) + shift, rtol=2e-2, atol=2e-2)
        target(x, weight, bias)
        assert len(calls) == 2
        two = torch.randn(2, 64)
        assert torch.equal(target(two, weight, bias), original(two, parameter.weight, a8, bias))
        assert len(calls) == 3


def test_a_launch_bound_without_a_bias_is_not_used_with_one() -> None:
    """The pass measures a node before it folds a bias into it: the launch bound then (no
    bias) must not take the call that brings one, nor the other way round."""
    weight = nn.Parameter(torch.randn(48, 64))
    target = QuantizedMatmul(QuantizedParameter(weight, "int8", 32, False, "w"), get_backend("cpp"))
    x, bias = torch.randn(1, 64), torch.randn(48)
    with torch.no_grad():
        plain = target(x, weight)
        torch.testing.assert_close(target(x, weight, bias), plain + bias)
        torch.testing.assert_close(target(x, weight), plain)


@pytest.mark.parametrize("kind", ["int8", "int4", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 70)], ids=["one token", "many"])
def test_lookups_gather_rows_in_one_call_as_torch_does(kind: str, shape: tuple) -> None:
    """The C gather gives the torch path's values bit for bit; an index it does not take
    (negative: aten.index wraps it; past the end: an IndexError) goes through torch."""
    weight = nn.Parameter(torch.randn(50, 64))
    parameter = QuantizedParameter(weight, kind, 32, False, "w")
    index = torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(0))
    got = cpp_quantized.gather_rows(parameter.weight, index)
    assert got is not None and torch.equal(got, parameter.weight.gather_rows(index))
    lookup = QuantizedEmbedding(parameter, get_backend("cpp"))
    assert torch.equal(lookup(weight, index), got)
    wrapped = torch.tensor([[-1, 3]])
    assert cpp_quantized.gather_rows(parameter.weight, wrapped) is None
    assert torch.equal(
        lookup(weight, wrapped), parameter.weight.gather_rows(torch.tensor([[49, 3]]))
    )
    with pytest.raises(IndexError):
        lookup(weight, torch.tensor([50]))


@pytest.mark.parametrize("kind", ["int8", "int4", "bf16"])
def test_a_lookup_of_the_layout_bound_last_is_one_native_launch(kind: str) -> None:
    """The first lookup gathers through ctypes and binds; the next of that index layout is
    one C call (no ctypes call) with the same values bit for bit, a negative index wrapping
    as torch's indexing does; past the end raises torch's IndexError; a weight written in
    place is quantized again and its lookups give the new rows."""
    if launcher.module() is None:
        pytest.skip("no native launcher here")
    calls = []

    def counted(weight, index):
        calls.append(index)
        return cpp_quantized.gather_rows(weight, index)

    backend = dataclasses.replace(get_backend("cpp"), quantized_gather=counted)
    weight = nn.Parameter(torch.randn(50, 64))
    parameter = QuantizedParameter(weight, kind, 32, False, "w")
    lookup = QuantizedEmbedding(parameter, backend)
    with torch.no_grad():
        first = lookup(weight, torch.tensor([[7, 3]]))
        assert len(calls) == 1
        second = lookup(weight, torch.tensor([[-1, 3]]))
        assert len(calls) == 1 and second.data_ptr() != first.data_ptr()
        assert torch.equal(second, parameter.weight.gather_rows(torch.tensor([[49, 3]])))
        with pytest.raises(IndexError):
            lookup(weight, torch.tensor([[50, 3]]))
        weight.mul_(2)
        again = lookup(weight, torch.tensor([[7, 3]]))
        assert torch.equal(again, parameter.current(weight).gather_rows(torch.tensor([[7, 3]])))
        torch.testing.assert_close(again, 2 * first, rtol=0.02, atol=0.02)
        calls.clear()
        lookup(weight, torch.tensor([[8, 9]]))
        assert calls == []  # bound again for the new weight


def test_an_index_select_lookup_raises_on_a_negative_index_as_eager_does() -> None:
    """index_select (a 1-D embedding lookup as captured) raises on a negative index where
    `w[index]` wraps it: through the native launch and through torch alike."""
    weight = nn.Parameter(torch.randn(50, 64))
    parameter = QuantizedParameter(weight, "int8", 32, False, "w")
    lookup = QuantizedEmbedding(parameter, get_backend("cpp"), wraps=False)
    with torch.no_grad():
        rows = lookup(weight, torch.tensor([7, 3]))
        torch.testing.assert_close(
            rows, weight.index_select(0, torch.tensor([7, 3])), atol=0.05, rtol=0.05
        )
        for index in (torch.tensor([-1, 3]), torch.tensor([-1])):  # bound layout, another
            with pytest.raises(IndexError):
                torch.index_select(weight, 0, index)
            with pytest.raises(IndexError):
                lookup(weight, index)


def test_the_pass_keeps_each_lookups_rule_for_negative_indices() -> None:
    """`w[index]` wraps, index_select raises: the pass's lookups keep each op's rule."""

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(40, 16))

        def forward(self, ids):
            return self.table[ids].sum() + self.table.index_select(0, ids.reshape(-1)).sum()

    with torch.no_grad():
        a = memopt.analyze(Both(), torch.tensor([[1, 2, 3]]), **precision("int8"))
    lookups = [
        n.target
        for g in a.graphs
        for n in g.gm.graph.nodes
        if isinstance(n.target, QuantizedEmbedding)
    ]
    assert sorted(t.wraps for t in lookups) == [False, True]


def test_the_pass_gives_its_lookups_the_backends_gather() -> None:
    a = analyze(model(), 3, **precision("int4", group_size=8))
    lookups = [
        n.target
        for g in a.graphs
        for n in g.gm.graph.nodes
        if isinstance(n.target, QuantizedEmbedding)
    ]
    assert lookups and all(t.backend.quantized_gather is cpp_quantized.gather_rows for t in lookups)


def test_narrow_targets_refuse_bad_operands_and_copy_without_their_launch() -> None:
    """x of another width raises as torch.mm does (the kernels would read past it), a
    negated view is read as its values, a bound target deep-copies (its launch is bound
    anew), and a lookup under another default device still returns CPU rows."""
    weight = nn.Parameter(torch.randn(16, 64))
    parameter = QuantizedParameter(weight, "int8", 32, False, "w")
    target = QuantizedMatmul(parameter, get_backend("cpp"))
    x = torch.randn(1, 64)
    with torch.no_grad():
        want = target(x, weight)
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            target(torch.randn(1, 8), weight)
        negated = torch._neg_view(x)
        torch.testing.assert_close(target(negated, weight), -want)
        twin = copy.deepcopy(target)
        assert twin._launch is None and torch.equal(twin(x, weight), want)
        lookup = QuantizedEmbedding(
            QuantizedParameter(weight, "int4", 32, False, "w"), get_backend("cpp")
        )
        with torch.device("meta"):
            rows = lookup(weight, torch.tensor([1, 2]))
        assert rows.device.type == "cpu" and rows.shape == (2, 64)
        assert lookup(weight, torch.zeros(0, dtype=torch.int32)).shape == (0, 64)
