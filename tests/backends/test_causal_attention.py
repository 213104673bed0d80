"""Causal attention of many query positions on memopt's CPU kernel
(backends/runtime/causal_attention.py, backends/cpp/causal_attention.py)."""

from __future__ import annotations

import pytest
import torch
from launch_counting import kernel_calls, launches, same_as_aten

from memopt.backends.cpp import causal_attention as kernel
from memopt.backends.cpp import launcher
from memopt.backends.runtime import causal_attention
from memopt.backends.runtime.causal_attention import (
    FLASH_CPU,
    CausalAttention,
    point_causal_attention,
)
from memopt.backends.runtime.executor import CompiledGraph
from memopt.compiler.capture import capture

from real_models import decoding_llama, generate


def _kernel_calls(monkeypatch):
    return kernel_calls(monkeypatch, kernel)


def _launches(monkeypatch):
    return launches(monkeypatch, causal_attention)


def _operands(batch, heads, kv_heads, rows, length, head_dim, allocated=None, seed=0):
    """q (B, H, L, D) laid out (B, L, H, D), as a model's projection leaves it; k and v the
    first `length` positions of a cache of `allocated`."""
    generator = torch.Generator().manual_seed(seed)
    allocated = allocated or length
    q = torch.randn((batch, rows, heads, head_dim), generator=generator).transpose(1, 2)
    k = torch.randn((batch, kv_heads, allocated, head_dim), generator=generator)
    v = torch.randn((batch, kv_heads, allocated, head_dim), generator=generator)
    return q, k[:, :, :length], v[:, :, :length]


@pytest.mark.parametrize(
    "batch, heads, kv_heads, rows, length, head_dim, allocated",
    [
        (1, 8, 2, 300, 300, 64, 320),  # grouped-query, a static cache's slice
        (2, 4, 4, 37, 50, 128, None),  # fewer rows than keys: the top-left mask
        (1, 3, 1, 70, 45, 80, None),  # more rows than keys; a head dim of no fixed path
        (1, 2, 2, 1, 9, 64, None),  # one row: it sees the first key only
        (1, 4, 2, 65, 65, 64, None),  # a last unit and a last key tile of one row
    ],
)
def test_the_kernel_matches_atens_op(batch, heads, kv_heads, rows, length, head_dim, allocated):
    q, k, v = _operands(batch, heads, kv_heads, rows, length, head_dim, allocated)
    want = FLASH_CPU(q, k, v, 0.0, True)
    got = causal_attention.causal_attention(q, k, v, None)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert a.stride() == b.stride()


def test_a_contiguous_query_gives_a_contiguous_output_and_a_scale_of_its_own():
    q, k, v = _operands(1, 4, 2, 40, 40, 64)
    q = q.contiguous()
    want = FLASH_CPU(q, k, v, 0.0, True, scale=0.3)
    got = CausalAttention()(q, k, v, 0.0, True, scale=0.3)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert got[0].stride() == want[0].stride() == q.stride()


def test_a_nan_reaches_the_rows_that_see_it_as_in_atens_op():
    """A NaN key at position 5: rows from 5 on are NaN, the rows before it are not."""
    q, k, v = _operands(1, 2, 2, 70, 70, 64)
    k = k.clone()
    k[0, 0, 5, 3] = float("nan")
    want = FLASH_CPU(q, k, v, 0.0, True)[0]
    got = CausalAttention()(q, k, v, 0.0, True)[0]
    assert torch.equal(got.isnan(), want.isnan())
    assert got[0, 0, 5:].isnan().all() and not got[0, 0, :5].isnan().any()
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=1e-5, atol=1e-5)


def test_a_scale_the_kernel_does_not_take_gets_atens_values(monkeypatch):
    """0 and below, NaN, past float32's range: ATen's op (which makes NaN rows where keys
    are masked at a scale of 0 or below), not the kernel."""
    calls = _kernel_calls(monkeypatch)
    q, k, v = _operands(1, 4, 2, 40, 40, 64)
    for scale in (-0.5, 0.0, float("nan"), 1e39):
        got = CausalAttention()(q, k, v, 0.0, True, scale=scale)[0]
        want = FLASH_CPU(q, k, v, 0.0, True, scale=scale)[0]
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
    assert calls == []


def test_an_infinite_score_gives_atens_logsumexp_and_nan_rows():
    q, k, v = _operands(1, 2, 1, 30, 30, 64)
    q, k = q.abs(), k.clone()
    k[0, 0, 3] = float("inf")
    got, want = CausalAttention()(q, k, v, 0.0, True), FLASH_CPU(q, k, v, 0.0, True)
    assert torch.equal(got[1].isinf(), want[1].isinf()) and got[1][0, 0, 3:].isinf().all()
    assert torch.equal(got[0].isnan(), want[0].isnan())


@pytest.mark.parametrize(
    "case",
    ["not causal", "a mask", "float64", "grad", "strided head dim", "value head size"],
)
def test_anything_else_runs_the_aten_op_bit_for_bit(monkeypatch, case):
    calls = _kernel_calls(monkeypatch)
    q, k, v = _operands(1, 4, 2, 20, 20, 64)
    args, kwargs = (0.0, True), {}
    if case == "not causal":
        args = (0.0, False)
    elif case == "a mask":
        args, kwargs = (0.0, False), {"attn_mask": torch.zeros(1, 1, 20, 20)}
    elif case == "float64":
        q, k, v = q.double(), k.double(), v.double()
    elif case == "grad":
        q = q.detach().requires_grad_()
    elif case == "strided head dim":
        k = torch.randn(1, 2, 20, 128)[..., ::2]
    elif case == "value head size":
        v = torch.randn(1, 2, 20, 32)
    same_as_aten(CausalAttention(), FLASH_CPU, q, k, v, *args, **kwargs)
    assert calls == []


def test_head_counts_that_do_not_divide_are_refused():
    q, _, _ = _operands(1, 4, 2, 20, 20, 64)
    k, v = torch.randn(1, 3, 20, 64), torch.randn(1, 3, 20, 64)
    assert causal_attention.plan(q, k, v) is None
    assert causal_attention.plan(q, k[:, :2], v[:, :2]) is not None


def _sdpa_graph(causal=True, use_lse=False, rows=48):
    def fn(q, k, v):
        out, lse = FLASH_CPU(q, k, v, 0.0, causal)
        return (out * 2, lse + 1) if use_lse else (out * 2,)

    q, k, v = _operands(1, 8, 2, rows, rows, 64)
    args = (q, k.contiguous(), v.contiguous())
    (graph,) = capture(fn, args)
    return graph.gm, lambda: fn(*args), graph.real_inputs


def test_causal_attention_is_pointed_at_the_kernel_when_chosen():
    """Must: a causal attention with cpu_attention="memopt". Must not: the same graph with
    "aten", an attention that is not causal, or one whose logsumexp is read (a backward's)."""
    gm, fn, args = _sdpa_graph()
    assert point_causal_attention(gm, "memopt") == 1
    gm.recompile()
    assert sum(isinstance(n.target, CausalAttention) for n in gm.graph.nodes) == 1
    torch.testing.assert_close(gm(*args)[0], fn()[0], rtol=1e-5, atol=1e-5)
    assert point_causal_attention(_sdpa_graph()[0], "aten") == 0
    assert point_causal_attention(_sdpa_graph(causal=False)[0], "memopt") == 0
    assert point_causal_attention(_sdpa_graph(use_lse=True)[0], "memopt") == 0


def test_compiled_graph_describes_its_attention():
    gm, _, _ = _sdpa_graph()
    assert CompiledGraph(gm, "forward", [None], cpu_attention="memopt").libraries == (
        "1 causal attentions on memopt's kernel (cpu_attention='memopt')"
    )


@pytest.mark.slow
def test_a_llama_prefill_on_the_kernel_gives_eagers_tokens(monkeypatch):
    """Dynamic cache: the prefill's attentions (one per layer; the decode steps' have one
    query row and no causal flag) run on the kernel; the tokens are eager's."""
    pytest.importorskip("transformers")
    calls, launched = _kernel_calls(monkeypatch), _launches(monkeypatch)
    model = decoding_llama(hidden=256, layers=2)
    prompt = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    want = generate(model, prompt, "dynamic", 6)
    torch._dynamo.reset()
    model.forward = torch.compile(
        model.forward, backend="memopt", options={"cpu_attention": "memopt"}
    )
    assert torch.equal(generate(model, prompt, "dynamic", 6), want)
    assert len(calls) + len(launched) == 2  # two layers, one prefill


def test_a_call_with_the_layouts_planned_last_is_one_native_launch(monkeypatch):
    """The first call plans and binds; the next, operands of those layouts, is one C call
    through the launcher (no ctypes call) with the ctypes path's values bit for bit; another
    scale or row count takes the planned path again."""
    if launcher.module() is None:
        pytest.skip("no native launcher here")
    calls = _kernel_calls(monkeypatch)
    q, k, v = _operands(1, 8, 2, 100, 100, 64, allocated=128)
    q2 = torch.randn_like(q)
    op = CausalAttention()
    with torch.no_grad():
        want = causal_attention.causal_attention(q2, k, v, None)  # through ctypes
        calls.clear()
        first = op(q, k, v, 0.0, True)
        second = op(q2, k, v, 0.0, True)
        assert len(calls) == 1
        assert all(torch.equal(a, b) and a.stride() == b.stride() for a, b in zip(second, want))
        assert second[0].data_ptr() != first[0].data_ptr()
        op(q2, k, v, 0.0, True, scale=0.5)
        assert len(calls) == 2  # another scale: planned, and bound for it
        shorter = op(q2[:, :, :60], k[:, :, :60], v[:, :, :60], 0.0, True, scale=0.5)
        assert len(calls) == 3  # another row count: planned again
        torch.testing.assert_close(
            shorter[0],
            FLASH_CPU(q2[:, :, :60], k[:, :, :60], v[:, :, :60], 0.0, True, scale=0.5)[0],
        )
