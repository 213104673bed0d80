"""Attention of one query position over a KV cache on memopt's CPU kernel
(backends/runtime/decode_attention.py, backends/cpp/attention.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from launch_counting import kernel_calls, launches, same_as_aten

from memopt.backends.cpp import attention as kernel
from memopt.backends.cpp import launcher
from memopt.backends.runtime import decode_attention, executor
from memopt.backends.runtime.decode_attention import (
    FLASH_CPU,
    DecodeAttention,
    point_decode_attention,
)
from memopt.backends.runtime.executor import CompiledGraph
from memopt.compiler.capture import capture

from real_models import decoding_llama, generate

NEG_INF = float("-inf")


def _kernel_calls(monkeypatch):
    return kernel_calls(monkeypatch, kernel)


def _launches(monkeypatch):
    return launches(monkeypatch, decode_attention)


def _operands(batch, heads, kv_heads, length, head_dim, allocated=None, seed=0):
    """q (B, H, 1, D); k and v the first `length` positions of a cache of `allocated`."""
    generator = torch.Generator().manual_seed(seed)
    allocated = allocated or length
    q = torch.randn((batch, 1, heads, head_dim), generator=generator).transpose(1, 2)
    k = torch.randn((batch, kv_heads, allocated, head_dim), generator=generator)
    v = torch.randn((batch, kv_heads, allocated, head_dim), generator=generator)
    return q, k[:, :, :length], v[:, :, :length]


def _masks(batch, heads, length, generator):
    tail = torch.zeros((1, 1, 1, length))
    tail[..., length - length // 3 :] = NEG_INF  # a static cache's unused positions
    per_head = torch.randn((batch, heads, 1, length), generator=generator)
    per_head[:, ::2, :, : length // 4] = NEG_INF
    return {
        "none": None,
        "tail": tail,
        "per_head": per_head,
        "2-D": torch.randn((1, length), generator=generator),
    }


@pytest.mark.parametrize(
    "batch, heads, kv_heads, length, head_dim",
    [
        (1, 8, 2, 1, 64),  # one position
        (1, 8, 2, 37, 64),  # blocks of 16 and a partial one (the AVX-512 path's)
        (2, 4, 4, 600, 64),  # several units of CHUNK positions, combined
        (3, 8, 2, 530, 64),  # batches, groups and units together
        (1, 4, 1, 300, 128),
        (1, 6, 3, 50, 40),  # a head dim outside the fixed ones
    ],
)
@pytest.mark.parametrize("mask", ["none", "tail", "per_head", "2-D"])
def test_the_kernel_matches_atens_op(monkeypatch, batch, heads, kv_heads, length, head_dim, mask):
    calls = _kernel_calls(monkeypatch)
    q, k, v = _operands(batch, heads, kv_heads, length, head_dim, allocated=length + 5)
    attn_mask = _masks(batch, heads, length, torch.Generator().manual_seed(1))[mask]
    want = FLASH_CPU(q, k, v, attn_mask=attn_mask)
    got = DecodeAttention()(q, k, v, attn_mask=attn_mask)
    assert len(calls) == 1
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    # The layouts of ATen's meta function, which the graph's metadata has
    assert got[0].is_contiguous() and got[1].stride() == (heads, 1, heads)


def test_a_scale_of_its_own():
    q, k, v = _operands(1, 4, 2, 70, 64)
    want = FLASH_CPU(q, k, v, scale=0.3)
    torch.testing.assert_close(DecodeAttention()(q, k, v, scale=0.3)[0], want[0])


def test_outputs_are_cpu_tensors_under_another_default_device():
    q, k, v = _operands(1, 4, 2, 30, 64)
    want = FLASH_CPU(q, k, v)
    with torch.device("meta"):
        got = DecodeAttention()(q, k, v)
    assert got[0].device.type == "cpu" and got[1].device.type == "cpu"
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_a_fully_masked_row_gives_zeros_as_aten_does():
    q, k, v = _operands(1, 2, 2, 40, 64)
    mask = torch.full((1, 1, 1, 40), NEG_INF)
    want = FLASH_CPU(q, k, v, attn_mask=mask)
    got = DecodeAttention()(q, k, v, attn_mask=mask)
    assert torch.equal(got[0], want[0]) and torch.equal(got[0], torch.zeros_like(got[0]))
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("where", ["query", "one unit of keys", "mask"])
def test_a_nan_reaches_the_output_as_in_atens_op(where):
    """A NaN score makes its row NaN, however many of the row's positions it covers (a
    whole unit of 256 positions included)."""
    q, k, v = _operands(1, 2, 1, 600, 64)
    mask = None
    if where == "query":
        q = q.clone()
        q[0, 0, 0, 3] = float("nan")
    elif where == "one unit of keys":
        k = k.clone()
        k[0, 0, 256:512, 5] = float("nan")
    else:
        mask = torch.zeros((1, 1, 1, 600))
        mask[..., 256:512] = float("nan")
    want = FLASH_CPU(q, k, v, attn_mask=mask)
    got = DecodeAttention()(q, k, v, attn_mask=mask)
    assert want[0].isnan().any()
    assert torch.equal(got[0].isnan(), want[0].isnan())
    assert torch.equal(got[1].isnan(), want[1].isnan())


def test_masked_positions_are_not_read():
    """A non-finite value where the mask drops the position: the kernel does not read it
    (module doc), so the row stays finite and equal to attention over the kept positions."""
    q, k, v = _operands(1, 4, 2, 64, 64)
    v = v.clone()
    v[:, :, 48:] = float("nan")
    mask = torch.zeros((1, 1, 1, 64))
    mask[..., 48:] = NEG_INF
    got = DecodeAttention()(q, k, v, attn_mask=mask)[0]
    want = FLASH_CPU(q, k[:, :, :48], v[:, :, :48])[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case",
    [
        "float64",
        "two query positions",
        "causal",
        "grad",
        "bool mask",
        "1-D mask",
        "strided head dim",
        "value head size",
    ],
)
def test_anything_else_runs_the_aten_op_bit_for_bit(monkeypatch, case):
    calls = _kernel_calls(monkeypatch)
    q, k, v = _operands(1, 4, 2, 20, 64)
    kwargs, args = {}, ()
    if case == "float64":
        q, k, v = q.double(), k.double(), v.double()
    elif case == "two query positions":
        q = torch.randn(1, 4, 2, 64)
    elif case == "causal":
        args = (0.0, True)
    elif case == "grad":
        q = q.detach().requires_grad_()
    elif case == "bool mask":
        kwargs["attn_mask"] = torch.ones((1, 1, 1, 20), dtype=torch.bool)
    elif case == "1-D mask":
        kwargs["attn_mask"] = torch.zeros(20)
    elif case == "strided head dim":
        k = torch.randn(1, 2, 20, 128)[..., ::2]
    elif case == "value head size":
        v = torch.randn(1, 2, 20, 32)
    same_as_aten(DecodeAttention(), FLASH_CPU, q, k, v, *args, **kwargs)
    assert calls == []


def test_head_counts_that_do_not_divide_are_refused():
    """4 query heads over 3 key/value heads (ATen's op computes garbage there, unchecked):
    the kernel does not take them."""
    q, _, _ = _operands(1, 4, 2, 20, 64)
    k, v = torch.randn(1, 3, 20, 64), torch.randn(1, 3, 20, 64)
    assert decode_attention.plan(q, k, v, None) is None
    assert decode_attention.plan(q, k[:, :2], v[:, :2], None) is not None


def _sdpa_graph(rows=1, use_lse=False):
    def fn(q, k, v, mask):
        out, lse = FLASH_CPU(q, k, v, attn_mask=mask)
        return (out * 2, lse + 1) if use_lse else (out * 2,)

    q, k, v = _operands(1, 8, 2, 100, 64)
    q = torch.randn(1, 8, rows, 64)
    args = (q, k.contiguous(), v.contiguous(), torch.zeros(1, 1, rows, 100))
    (graph,) = capture(fn, args)
    return graph.gm, lambda: fn(*args), graph.real_inputs


def test_one_position_attention_is_pointed_at_the_kernel_when_chosen():
    """Must: the one-position attention with cpu_attention="memopt". Must not: the same
    graph with "aten", a query of two positions, or an attention whose logsumexp is read
    (a backward's)."""
    gm, fn, args = _sdpa_graph()
    assert point_decode_attention(gm, "memopt") == 1
    gm.recompile()
    assert sum(isinstance(n.target, DecodeAttention) for n in gm.graph.nodes) == 1
    torch.testing.assert_close(gm(*args)[0], fn()[0], rtol=1e-5, atol=1e-5)
    assert point_decode_attention(_sdpa_graph()[0], "aten") == 0
    assert point_decode_attention(_sdpa_graph(rows=2)[0], "memopt") == 0
    assert point_decode_attention(_sdpa_graph(use_lse=True)[0], "memopt") == 0


def test_compiled_graph_describes_its_attention():
    gm, _, _ = _sdpa_graph()
    assert CompiledGraph(gm, "forward", [None], cpu_attention="memopt").libraries == (
        "1 one-position attentions on memopt's decode kernel (cpu_attention='memopt')"
    )


def test_decoding_a_llama_on_the_kernel_gives_eagers_tokens(monkeypatch):
    """Static cache: every decode step's attention (one per layer, head dim 64: the
    AVX-512 score blocks where the CPU has them) runs on the kernel, over the whole
    allocated cache with its unused tail masked."""
    pytest.importorskip("transformers")
    calls, launched = _kernel_calls(monkeypatch), _launches(monkeypatch)
    monkeypatch.setattr(executor, "REPLAY", False)  # every step through the program's calls
    model = decoding_llama(hidden=256, layers=2)
    prompt = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    want = generate(model, prompt, "static", 8)
    torch._dynamo.reset()
    model.forward = torch.compile(
        model.forward, backend="memopt", options={"cpu_attention": "memopt"}
    )
    assert torch.equal(generate(model, prompt, "static", 8), want)
    # two layers, seven decode steps: each layer's first through ctypes, then launches
    assert len(calls) + len(launched) == 2 * 7
    assert launched or launcher.module() is None


@pytest.mark.parametrize("mask", ["none", "tail", "per_head"])
def test_a_call_with_the_layouts_planned_last_is_one_native_launch(monkeypatch, mask):
    """The first two calls of a layout plan, the second binds (a layout met once, as a
    dynamic cache's at every step, is not bound); the next, operands of those layouts, is
    one C call through the launcher (no ctypes call) with the ctypes path's values bit for
    bit; another scale, mask presence, layout or a negated view takes the planned path
    again."""
    if launcher.module() is None:
        pytest.skip("no native launcher here")
    calls = _kernel_calls(monkeypatch)
    q, k, v = _operands(1, 8, 2, 300, 64, allocated=320)
    m = _masks(1, 8, 300, torch.Generator().manual_seed(3))[mask]
    op = DecodeAttention()
    q2 = torch.randn_like(q)
    with torch.no_grad():
        want = decode_attention.decode_attention(q2, k, v, m, None)  # through ctypes
        calls.clear()
        op(q, k, v, attn_mask=m)
        assert op._launch is None  # met once: not bound
        first = op(q, k, v, attn_mask=m)
        second = op(q2, k, v, attn_mask=m)
        assert len(calls) == 2
        assert all(torch.equal(a, b) for a, b in zip(second, want))
        assert second[0].data_ptr() != first[0].data_ptr()
        op(q2, k, v, attn_mask=m, scale=0.5)
        assert len(calls) == 3  # another scale, the layouts planned last: bound for it
        op(q2, k, v, attn_mask=m, scale=0.5)
        assert len(calls) == 3
        negated = op(torch._neg_view(q2), k, v, attn_mask=m, scale=0.5)
        assert len(calls) == 3  # the ATen op
        torch.testing.assert_close(negated[0], FLASH_CPU(-q2, k, v, attn_mask=m, scale=0.5)[0])
        op(q2[:, :, :, :32].contiguous(), k[..., :32], v[..., :32], attn_mask=m)
        assert len(calls) == 4  # another head size: planned again
    twin = copy.deepcopy(op)
    assert twin._launch is None


# -- over a cache appended in the same call (AppendAttention) ---------------------------------


def _append_calls(monkeypatch):
    return kernel_calls(monkeypatch, kernel, "append_function")


def _appended(batch, heads, kv_heads, old, new, head_dim, seed=0):
    """q (B, H, 1, D), the old cache (contiguous), `new` positions of keys as a
    projection's view makes them (B, new, H_kv, D transposed) and of values contiguous:
    two layouts, so a kernel reading one with the other's strides is caught."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn((batch, 1, heads, head_dim), generator=generator).transpose(1, 2)
    k_old, v_old = (
        torch.randn((batch, kv_heads, old, head_dim), generator=generator) for _ in "kv"
    )
    k_new = torch.randn((batch, new, kv_heads, head_dim), generator=generator).transpose(1, 2)
    v_new = torch.randn((batch, kv_heads, new, head_dim), generator=generator)
    return q, k_old, k_new, v_old, v_new


@pytest.mark.parametrize(
    "batch, heads, kv_heads, old, new, head_dim",
    [
        (1, 8, 2, 0, 1, 64),  # an empty cache: every row new
        (1, 8, 2, 255, 1, 64),  # the new position opens a unit of its own
        (1, 12, 12, 600, 1, 64),  # units of old rows only (streamed) and a last one
        (2, 8, 2, 300, 3, 128),  # several new positions, batches
        (1, 6, 3, 40, 1, 40),  # a head dim outside the fixed ones (plain copies)
    ],
)
@pytest.mark.parametrize("mask", ["none", "tail", "per_head"])
def test_appended_attention_matches_the_concatenations_and_atens_op(
    monkeypatch, batch, heads, kv_heads, old, new, head_dim, mask
):
    """The concatenations bit for bit (and contiguous, as torch.cat makes them), the output
    and logsumexp to float32 rounding; on the kernel, one call."""
    calls = _append_calls(monkeypatch)
    q, k_old, k_new, v_old, v_new = _appended(batch, heads, kv_heads, old, new, head_dim)
    length = old + new
    attn_mask = _masks(batch, heads, length, torch.Generator().manual_seed(2))[mask]
    out, lse, k, v = decode_attention.AppendAttention(0.2)(
        q, k_old, k_new, v_old, v_new, attn_mask=attn_mask
    )
    want_k, want_v = torch.cat([k_old, k_new], -2), torch.cat([v_old, v_new], -2)
    assert torch.equal(k, want_k) and k.stride() == want_k.stride()
    assert torch.equal(v, want_v) and v.stride() == want_v.stride()
    want_out, want_lse = FLASH_CPU(q, want_k, want_v, attn_mask=attn_mask, scale=0.2)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1


def test_appended_attention_of_one_key_value_head_has_torch_cats_layout():
    """One key/value head: ATen's cat makes a channels-last result of parts whose strides
    are channels-last-like (the head dimension's stride is free at size 1), and so does
    the call; a contiguous cache gives a contiguous one."""
    q = torch.randn(1, 4, 1, 64)
    for permuted in (True, False):
        parts = []
        for length in (40, 40, 1, 1):
            t = torch.randn(1, length, 64, 1)
            parts.append(t.permute(0, 3, 1, 2) if permuted else t.reshape(1, 1, length, 64))
        k_old, v_old, k_new, v_new = parts
        _, _, k, v = decode_attention.AppendAttention()(q, k_old, k_new, v_old, v_new)
        want = torch.cat([k_old, k_new], 2)
        assert torch.equal(k, want) and k.stride() == want.stride()
        assert (1 in k.stride()[:2]) == permuted


@pytest.mark.parametrize(
    "case", ["float64", "strided old cache", "grad", "bool mask", "head dim 1"]
)
def test_appended_attention_runs_the_concatenations_and_atens_op_otherwise(monkeypatch, case):
    """What the kernel does not take: torch.cat and ATen's op, bit for bit."""
    calls = _append_calls(monkeypatch)
    q, k_old, k_new, v_old, v_new = _appended(1, 4, 2, 30, 1, 64)
    mask = None
    if case == "float64":
        q, k_old, k_new, v_old, v_new = (t.double() for t in (q, k_old, k_new, v_old, v_new))
    elif case == "strided old cache":  # torch.cat would not make it contiguous either way
        k_old = torch.randn(1, 30, 2, 64).transpose(1, 2)
    elif case == "grad":
        q = q.detach().requires_grad_()
    elif case == "bool mask":
        mask = torch.ones((1, 1, 1, 31), dtype=torch.bool)
    elif case == "head dim 1":
        q, k_old, k_new, v_old, v_new = _appended(1, 4, 2, 30, 1, 1)
    append = decode_attention.AppendAttention()
    k, v = torch.cat([k_old, k_new], 2), torch.cat([v_old, v_new], 2)
    try:
        want = FLASH_CPU(q, k, v, attn_mask=mask)
    except RuntimeError as error:  # ATen's refusal (a bool mask), raised as ATen raises it
        with pytest.raises(RuntimeError, match=str(error)[:40]):
            append(q, k_old, k_new, v_old, v_new, attn_mask=mask)
        assert calls == []
        return
    got = append(q, k_old, k_new, v_old, v_new, attn_mask=mask)
    for a, b in zip(got, (*want, k, v)):
        assert torch.equal(a, b) and a.stride() == b.stride()
    assert calls == []


@pytest.mark.parametrize("batch, mask", [(1, "none"), (2, "none"), (2, "per_head"), (2, "2-D")])
def test_a_bound_appended_attention_checks_each_calls_old_caches(batch, mask):
    """`AppendAttention.bind`: the static operands checked once; each call's old caches
    checked, the output written in place, the concatenations returned; old caches the
    kernel does not take give None (the tape then makes the whole call). Without a mask,
    caches of any length, the call bound on a one-position cache whose row stride is not
    its head size (a view's, contiguous all the same): later lengths read theirs. A bound
    mask fixes the length: new caches of that length."""
    q, _, k_new, _, v_new = _appended(batch, 8, 2, 20, 1, 64)
    attn_mask = _masks(batch, 8, 31, torch.Generator().manual_seed(3))[mask]
    if attn_mask is None:
        lengths = (20, 300, 7)
        k_old, v_old = (torch.randn(batch, 1, 2, 64).transpose(1, 2) for _ in "kv")
        assert k_old.is_contiguous() and k_old.stride(2) != 64
    else:
        lengths = (30, 30)
        _, k_old, _, v_old, _ = _appended(batch, 8, 2, 30, 1, 64, seed=1)
    append = decode_attention.AppendAttention()
    out = torch.empty(batch, 8, 1, 64)
    call = append.bind(q, k_new, v_new, attn_mask, out, k_old, v_old)
    for length in lengths:
        _, k_old, _, v_old, _ = _appended(batch, 8, 2, length, 1, 64, seed=length + 7)
        k, v = call(k_old, v_old)
        want = append(q, k_old, k_new, v_old, v_new, attn_mask=attn_mask)
        assert torch.equal(k, want[2]) and torch.equal(v, want[3])
        torch.testing.assert_close(out, want[0], rtol=1e-5, atol=1e-5)
    q, k_old, k_new, v_old, v_new = _appended(1, 8, 2, 20, 1, 64)
    out = torch.empty(1, 8, 1, 64)
    call = append.bind(q, k_new, v_new, None, out, k_old, v_old)
    assert call(k_old.transpose(2, 3).contiguous().transpose(2, 3), v_old) is None
    assert call(k_old.double(), v_old.double()) is None
    assert call(k_old[:, :1], v_old[:, :1]) is None  # other head counts
    assert call(k_old, v_old[:, :, :-1]) is None  # caches of two lengths
    assert append.bind(q.double(), k_new, v_new, None, out, k_old, v_old) is None
    assert append.bind(q, k_new, v_new, None, out[..., :32], k_old, v_old) is None
