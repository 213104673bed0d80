"""The attention pass: SDPA and written-out attention as one kernel, no score matrix.

Values against eager through torch.compile (Triton kernels under the interpreter; small
shapes, sequence lengths that are not multiples of the tiles); byte counts worked out by
hand from the analysis (the sequence-1024 case is analyzed, not run by the interpreter).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memopt

pytest.importorskip("triton")

TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def compiled(fn, *inputs, tmp_path, backend="triton"):
    """fn compiled by memopt, and the per-graph records it wrote (ledger, graph text)."""
    options = {"backend": backend, "report_dir": str(tmp_path)}
    out = torch.compile(fn, backend="memopt", options=options)(*inputs)
    return out, records(tmp_path)


def records(report_dir):
    return {p.stem: json.loads(p.read_text()) for p in report_dir.glob("*.json")}


def decisions(graph_record, applied=None):
    found = [
        d
        for entry in graph_record["ledger"]
        if entry["pass"] == "attention"
        for d in entry["decisions"]
    ]
    return [d for d in found if applied is None or d["applied"] == applied]


def assert_close(got, want):
    rtol, atol = TOLERANCE[want.dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def qkv(shape=(1, 2, 40, 24), dtype=torch.float32, requires_grad=False):
    return tuple(torch.randn(shape).to(dtype).requires_grad_(requires_grad) for _ in range(3))


def written_out(q, k, v, keep=None, additive=None, scale=None):
    att = q @ k.transpose(-2, -1)
    att = att * (scale if scale is not None else 1.0 / math.sqrt(k.size(-1)))
    if keep is not None:
        att = att.masked_fill(keep == 0, float("-inf"))
    if additive is not None:
        att = att + additive
    return F.softmax(att, dim=-1) @ v


# -- values against eager --------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, causal",
    [(torch.float32, True), (torch.float16, False), (torch.bfloat16, True)],
)
def test_sdpa_runs_as_the_triton_kernel(dtype, causal, tmp_path):
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    inputs = qkv(dtype=dtype)
    out, graphs = compiled(fn, *inputs, tmp_path=tmp_path)
    assert_close(out, fn(*inputs))
    text = graphs["inference"]["graph_text"]
    assert "memopt.inference_attention_" in text
    assert "aten._scaled_dot_product_flash_attention_for_cpu" not in text
    assert len(decisions(graphs["inference"], applied=True)) == 1


@pytest.mark.parametrize(
    "dtype, mask",
    [(torch.float32, "causal"), (torch.float16, None), (torch.bfloat16, "additive")],
)
def test_written_out_attention_is_one_kernel(dtype, mask, tmp_path):
    q, k, v = qkv((2, 2, 40, 24), dtype)
    keep = torch.tril(torch.ones(40, 40)) if mask == "causal" else None
    additive = torch.randn(40, 40).to(dtype) if mask == "additive" else None

    def fn(q, k, v):
        return written_out(q, k, v, keep=keep, additive=additive)

    out, graphs = compiled(fn, q, k, v, tmp_path=tmp_path)
    assert_close(out, fn(q, k, v))
    record = graphs["inference"]
    rewrite, placed = decisions(record, applied=True)
    assert rewrite["code"] == "attention.rewritten"
    assert rewrite["bytes_saved"] == 4 * (2 * 2 * 40 * 40 * dtype.itemsize)  # 4 score passes
    assert placed["code"] == "attention.kernel"
    assert "bmm" not in record["graph_text"] and "amax" not in record["graph_text"]


class TinyBlock(nn.Module):
    """nanoGPT's attention, written out, with a causal mask buffer (as examples/gpt2_block)."""

    def __init__(self, width=32, heads=2, seq=24):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.register_buffer("bias", torch.tril(torch.ones(seq, seq)).view(1, 1, seq, seq))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.heads, C // self.heads).transpose(1, 2)
            for t in self.qkv(x).split(C, dim=2)
        )
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return y.transpose(1, 2).reshape(B, T, C)


def test_training_gradients_match_eager_and_the_backward_recomputes(tmp_path):
    model = TinyBlock()
    x = torch.randn(2, 21, 32)  # 21 of 24 positions: the mask buffer is sliced
    x_eager, x_memopt = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, graphs = compiled(model, x_memopt, tmp_path=tmp_path)
    want = model(x_eager)
    assert_close(out, want)
    got_grads = torch.autograd.grad(out.square().sum(), [x_memopt, *model.parameters()])
    want_grads = torch.autograd.grad(want.square().sum(), [x_eager, *model.parameters()])
    for got, expected in zip(got_grads, want_grads):
        assert_close(got, expected)
    graphs = records(tmp_path)  # the backward graph is compiled when it first runs
    forward, backward = graphs["forward"], graphs["backward"]
    assert "memopt.forward_attention_" in forward["graph_text"]
    # The forward hands the backward the output and the logsumexp [2, 2, 21], not the
    # probabilities [2, 2, 21, 21]; the Triton backward recomputes them blockwise.
    assert "memopt.backward_attention_" in backward["graph_text"]
    assert "_scaled_dot_product" not in forward["graph_text"] + backward["graph_text"]
    assert "f32[2, 2, 21, 21]" not in forward["graph_text"] + backward["graph_text"]
    (placed,) = decisions(backward, applied=True)
    assert placed["code"] == "attention.kernel" and "blockwise" in placed["reason"]
    rewrite = decisions(forward, applied=True)[0]
    assert rewrite["bytes_saved"] == 11 * (2 * 2 * 21 * 21 * 4)  # training: 11 score passes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdpa_training_in_16_bit(dtype, tmp_path):
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    inputs = qkv((1, 2, 40, 24), dtype, requires_grad=True)
    out, _ = compiled(fn, *inputs, tmp_path=tmp_path)
    want = fn(*(t.detach().float().requires_grad_() for t in inputs))  # fp32 reference
    grad_out = torch.randn_like(want)
    got = torch.autograd.grad(out, inputs, grad_out.to(dtype))
    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
    expected = torch.autograd.grad(fn(*ref_inputs), ref_inputs, grad_out)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), want.detach(), rtol=rtol, atol=atol)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.float(), e, rtol=4 * rtol, atol=4 * atol)
    assert "memopt.backward_attention_" in records(tmp_path)["backward"]["graph_text"]


def test_hugging_face_eager_attention_is_rewritten(tmp_path):
    # transformers' "eager" attention: softmax in fp32, cast back, dropout off in eval.
    q, k, v = qkv((1, 2, 40, 24), torch.float16)
    additive = torch.randn(1, 1, 40, 40).to(torch.float16)

    def fn(q, k, v):
        att = torch.matmul(q, k.transpose(2, 3)) * 0.2 + additive
        att = F.softmax(att, dim=-1, dtype=torch.float32).to(q.dtype)
        att = F.dropout(att, p=0.0, training=False)
        return torch.matmul(att, v)

    out, graphs = compiled(fn, q, k, v, tmp_path=tmp_path)
    assert_close(out, fn(q, k, v))
    rewrite, placed = decisions(graphs["inference"], applied=True)
    assert rewrite["code"] == "attention.rewritten" and placed["code"] == "attention.kernel"
    assert "mask" in placed["reason"]


# -- bytes, worked out by hand ----------------------------------------------------------------


def test_sequence_1024_moves_qkv_output_and_mask_only():
    q, k, v = qkv((1, 4, 1024, 64), torch.float16)
    operand = 1 * 4 * 1024 * 64 * 2  # 512 KiB each: q, k, v and the output
    scores = 1 * 4 * 1024 * 1024 * 2  # 8 MiB, never written

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    a = memopt.analyze(sdpa, q, k, v, backend="triton")
    assert [k.kind for k in a.kernels] == ["attention"]
    assert a.bytes_moved == 4 * operand == 2_097_152

    # Written out with a [1024, 1024] fp32 mask buffer: one kernel reads the buffer and
    # writes the bool `buffer != 0` (1 B per element), the attention kernel reads that.
    bias = torch.tril(torch.ones(1024, 1024))

    def written(q, k, v):
        return written_out(q, k, v, keep=bias)

    a = memopt.analyze(written, q, k, v, backend="triton")
    assert sorted(k.kind for k in a.kernels) == ["aten", "attention"]
    mask = 1024 * 1024 * 4 + 2 * 1024 * 1024  # buffer read; bool written and read
    assert a.bytes_moved == 4 * operand + mask == 8_388_608
    assert a.eager_bytes > a.bytes_moved + 4 * scores  # eager writes and reads the scores


def test_cpu_backends_keep_the_fused_aten_op():
    q, k, v = qkv((1, 2, 40, 24))
    a = memopt.analyze(written_out, q, k, v, backend="auto")  # CPU tensors: cpp, no Triton
    assert [k.ops for k in a.kernels] == [
        ("aten._scaled_dot_product_flash_attention_for_cpu.default",)
    ]
    operand = 1 * 2 * 40 * 24 * 4
    lse = 1 * 2 * 40 * 4  # the ATen op writes the logsumexp too
    assert a.bytes_moved == 4 * operand + lse
    refused = [d for p in a.ledger if p.pass_name == "attention" for d in p.decisions]
    assert any(d.code == "attention.no_kernel" for d in refused)


# -- rewrites that must not fire ---------------------------------------------------------------


def ledger_attention(a):
    return [d for p in a.ledger if p.pass_name == "attention" for d in p.decisions]


def test_dropout_or_returned_probabilities_are_not_rewritten():
    q, k, v = qkv()

    def dropout(q, k, v):
        p = F.softmax((q @ k.transpose(-2, -1)) * 0.2, dim=-1)
        return F.dropout(p, 0.1, training=True) @ v

    def returned(q, k, v):
        p = F.softmax((q @ k.transpose(-2, -1)) * 0.2, dim=-1)
        return p @ v, p

    for fn, reason in ((dropout, "dropout"), (returned, "read elsewhere")):
        a = memopt.analyze(fn, q, k, v, backend="triton")
        (decision,) = ledger_attention(a)
        assert decision.code == "attention.not_rewritten" and reason in decision.reason
        assert decision.bytes_saved == 4 * (2 * 40 * 40 * 4)
        assert not any(k.kind == "attention" for k in a.kernels)


def test_head_dim_over_128_keeps_the_fused_aten_op():
    q, k, v = qkv((1, 1, 20, 160))
    a = memopt.analyze(written_out, q, k, v, backend="triton")
    rewrite, placement = ledger_attention(a)
    assert rewrite.applied and not placement.applied
    assert "head dim 160" in placement.reason
    assert [k.kind for k in a.kernels] == ["extern"]


def test_attention_pass_disabled_keeps_the_written_out_form():
    q, k, v = qkv()
    a = memopt.analyze(written_out, q, k, v, backend="triton", disable=["attention"])
    assert not any(k.kind == "attention" for k in a.kernels)
    assert any("bmm" in op for k in a.kernels for op in k.ops) or any(
        k.kind == "matmul" for k in a.kernels
    )


def test_a_failing_kernel_falls_back_to_aten_visibly(monkeypatch, tmp_path):
    import memopt.backends.triton.attention_call as kernel

    def broken(*args, **kwargs):
        raise RuntimeError("no launch")

    monkeypatch.setattr(kernel, "attention", broken)
    q, k, v = qkv()
    keep = torch.tril(torch.ones(40, 40))

    def fn(q, k, v):
        return written_out(q, k, v, keep=keep)

    with pytest.warns(UserWarning, match="running the fused ATen op"):
        out, _ = compiled(fn, q, k, v, tmp_path=tmp_path)
    assert_close(out, fn(q, k, v))


# -- the Dynamo stage: a decision like any other ----------------------------------------------


def test_the_capture_time_rewrite_obeys_fuel_and_disable():
    q, k, v = qkv()

    def fn(q, k, v):
        return written_out(q, k, v)

    def matmuls(a):
        return sum(op.startswith("aten.bmm") for k in a.kernels for op in k.ops)

    full = memopt.analyze(fn, q, k, v, backend="triton")
    first = full.graphs[0].ledger[0]
    assert first.stage == "dynamo" and first.pass_name == "attention"
    applied = [d for g in full.graphs for e in g.ledger for d in e.decisions if d.applied]
    assert applied[0].code == "attention.rewritten"  # decision 1: taken while capturing
    assert matmuls(full) == 0

    none = memopt.analyze(fn, q, k, v, backend="triton", fuel=0)
    (refused,) = [d for d in ledger_attention(none) if d.code == "attention.rewritten"]
    assert not refused.applied and "out of fuel (0)" in refused.reason
    assert matmuls(none) == 2  # the scores are written and read

    one = memopt.analyze(fn, q, k, v, backend="triton", fuel=1)
    decisions = [d for g in one.graphs for e in g.ledger for d in e.decisions]
    assert [d.code for d in decisions if d.applied] == ["attention.rewritten"]
    assert all("out of fuel" in d.reason for d in decisions if d.code == "attention.kernel")

    disabled = memopt.analyze(fn, q, k, v, backend="triton", disable=["attention"])
    assert not ledger_attention(disabled) and matmuls(disabled) == 2


# -- grouped-query keys and values on the CPU ------------------------------------------------


def _repeat_kv(x, n_rep):
    """Llama's repeat_kv: each key/value head repeated n_rep times in a row."""
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _grouped(q, k, v, mask):
    return F.scaled_dot_product_attention(q, _repeat_kv(k, 4), _repeat_kv(v, 4), attn_mask=mask)


def _gqa_inputs(requires_grad=False):
    torch.manual_seed(0)
    q = torch.randn(1, 8, 1, 64, requires_grad=requires_grad)
    k, v = torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 64)
    return q, k, v, torch.randn(1, 1, 1, 40)


def test_repeated_grouped_kv_heads_are_read_unrepeated_on_the_cpu():
    """Must: Llama's repeat_kv before SDPA. The copies are not written and the op reads
    the 2 key/value heads, not 8: bytes are q, k, v, mask read and output + lse written."""
    q, k, v, mask = _gqa_inputs()
    a = memopt.analyze(_grouped, q, k, v, mask)
    assert [k.ops for k in a.kernels] == [
        ("aten._scaled_dot_product_flash_attention_for_cpu.default",)
    ]
    assert a.bytes_moved == 4 * (8 * 64 + 2 * 2 * 40 * 64 + 40) + 4 * (8 * 64 + 8)
    (decision,) = [d for d in ledger_attention(a) if d.code == "attention.grouped_kv"]
    repeated = 4 * 8 * 40 * 64  # one repeated copy (k or v), in bytes
    unrepeated = 4 * 2 * 40 * 64
    # Per operand: the copy read once and written once, and the op's 6 extra heads.
    assert decision.applied and decision.bytes_saved == 2 * (unrepeated + 2 * repeated - unrepeated)
    compiled = torch.compile(_grouped, backend="memopt")
    torch.testing.assert_close(compiled(q, k, v, mask), _grouped(q, k, v, mask))


def test_heads_tiled_rather_than_repeated_are_not_read_unrepeated():
    """Must not: `k.repeat(1, 4, 1, 1)` tiles the heads (query head h reads head h % 2),
    which the op's grouping (h // 4) does not compute."""

    def tiled(q, k, v, mask):
        return F.scaled_dot_product_attention(
            q, k.repeat(1, 4, 1, 1), v.repeat(1, 4, 1, 1), attn_mask=mask
        )

    q, k, v, mask = _gqa_inputs()
    a = memopt.analyze(tiled, q, k, v, mask)
    assert not [d for d in ledger_attention(a) if d.code == "attention.grouped_kv"]
    compiled = torch.compile(tiled, backend="memopt")
    torch.testing.assert_close(compiled(q, k, v, mask), tiled(q, k, v, mask))


def test_grouped_kv_with_a_backward_keeps_the_repeated_operands():
    """Must not: in training the backward op reads the forward's operands."""
    q, k, v, mask = _gqa_inputs(requires_grad=True)
    a = memopt.analyze(_grouped, q, k, v, mask, training=True)
    assert not [d for d in ledger_attention(a) if d.code == "attention.grouped_kv"]
    compiled = torch.compile(_grouped, backend="memopt")
    compiled(q, k, v, mask).sum().backward()
    got = q.grad.clone()
    q.grad = None
    _grouped(q, k, v, mask).sum().backward()
    torch.testing.assert_close(got, q.grad)


# -- a cache appended before the attention on the CPU ---------------------------------------


def _appending(q, k_old, k_new, v_old, v_new, mask):
    """A dynamic cache's decode step: the cache concatenated with the new position, the
    attention over it, the concatenations returned (the cache's next state)."""
    k, v = torch.cat([k_old, k_new], dim=-2), torch.cat([v_old, v_new], dim=-2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), k, v


def _append_inputs(old=40, rows=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(1, 4, rows, 64), (1, 4, old, 64), (1, 4, rows, 64), (1, 4, old, 64)]
    shapes += [(1, 4, rows, 64), (1, 1, rows, old + rows)]
    return tuple(torch.randn(s, generator=generator) for s in shapes)


def _append_decisions(a):
    return [
        d for d in ledger_attention(a) if d.code.startswith("attention.") and "append" in d.code
    ]


def test_a_cache_appended_before_the_attention_is_written_by_it():
    """Must: the concatenations and the attention are one call. Bytes: q, the old caches,
    the new rows and the mask read; output, logsumexp and the two concatenations written,
    which are not read back (the saving: their bytes)."""
    inputs = _append_inputs()
    a = memopt.analyze(_appending, *inputs, cpu_attention="memopt")
    (kernel,) = a.kernels
    assert "memopt decode attention over an appended cache" in kernel.ops[0]
    read = 4 * (4 * 64 + 2 * 4 * 40 * 64 + 2 * 4 * 64 + 41)
    concatenations = 2 * 4 * (4 * 41 * 64)
    assert a.bytes_moved == read + 4 * (4 * 64 + 4) + concatenations
    (decision,) = _append_decisions(a)
    assert decision.code == "attention.appended_kv" and decision.applied
    assert decision.bytes_saved == concatenations
    aten = memopt.analyze(_appending, *inputs, cpu_attention="aten")
    assert aten.bytes_moved == a.bytes_moved + concatenations
    compiled = torch.compile(_appending, backend="memopt", options={"cpu_attention": "memopt"})
    got, want = compiled(*inputs), _appending(*inputs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_a_grouped_query_cache_appended_is_written_by_the_attention():
    """Must: Llama's repeat_kv over the concatenations, read unrepeated, then the three as
    one call."""

    def llama(q, k_old, k_new, v_old, v_new, mask):
        k, v = torch.cat([k_old, k_new], dim=-2), torch.cat([v_old, v_new], dim=-2)
        return _grouped(q, k, v, mask), k, v

    q, k, v, _ = _gqa_inputs()
    k_new, v_new, mask = (
        torch.randn(1, 2, 1, 64),
        torch.randn(1, 2, 1, 64),
        torch.randn(1, 1, 1, 41),
    )
    inputs = (q, k, k_new, v, v_new, mask)
    a = memopt.analyze(llama, *inputs, cpu_attention="memopt")
    codes = [d.code for d in ledger_attention(a) if d.applied]
    assert "attention.grouped_kv" in codes and "attention.appended_kv" in codes
    assert len(a.kernels) == 1
    compiled = torch.compile(llama, backend="memopt", options={"cpu_attention": "memopt"})
    for got, want in zip(compiled(*inputs), llama(*inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["aten chosen", "read before", "two positions"])
def test_a_cache_appended_stays_concatenated_otherwise(case):
    """Must not: where ATen's op runs one-position attention (it would read the
    concatenations back), where a node reads a concatenation before the attention (the
    call sits where the attention was), and for a query of two positions (a prefill's:
    not a decode kernel's)."""

    def read_before(q, k_old, k_new, v_old, v_new, mask):
        k, v = torch.cat([k_old, k_new], dim=-2), torch.cat([v_old, v_new], dim=-2)
        total = k.sum()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask) + total, k, v

    fn = read_before if case == "read before" else _appending
    inputs = _append_inputs(rows=2 if case == "two positions" else 1)
    choice = "aten" if case == "aten chosen" else "memopt"
    a = memopt.analyze(fn, *inputs, cpu_attention=choice)
    found = _append_decisions(a)
    if case == "two positions":
        assert found == []
    else:
        (decision,) = found
        assert decision.code == "attention.not_appended" and not decision.applied
        assert decision.bytes_saved == 2 * 4 * (4 * 41 * 64)
        assert ("ATen's op" if case == "aten chosen" else "before the attention") in decision.reason
    assert sum("aten.cat" in k.ops[0] for k in a.kernels) == 2
    compiled = torch.compile(fn, backend="memopt", options={"cpu_attention": choice})
    for got, want in zip(compiled(*inputs), fn(*inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _heads_concatenated(q, k_old, k_new, v_old, v_new, mask):
    k, v = torch.cat([k_old, k_new], dim=1), torch.cat([v_old, v_new], dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), k, v


def _causal(q, k_old, k_new, v_old, v_new, mask):
    k, v = torch.cat([k_old, k_new], dim=-2), torch.cat([v_old, v_new], dim=-2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True), k, v


def _logsumexp_read(q, k_old, k_new, v_old, v_new, mask):
    k, v = torch.cat([k_old, k_new], dim=-2), torch.cat([v_old, v_new], dim=-2)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    return out, lse, k, v


def _one_concatenation(q, k_old, k_new, v_old, v_new, mask):
    k = torch.cat([k_old, k_new], dim=-2)
    return F.scaled_dot_product_attention(q, k, k, attn_mask=mask), k


@pytest.mark.parametrize(
    "fn, refused",
    [
        (_heads_concatenated, None),  # along the heads: no cache appended
        (_causal, None),  # one query position over the first key only
        (_logsumexp_read, None),  # a backward's (or a caller's) logsumexp
        (_one_concatenation, "one concatenation"),  # keys and values one tensor
    ],
)
def test_other_concatenations_before_an_attention_stay(fn, refused):
    """Must not: concatenations along another dimension, a causal attention, one whose
    logsumexp is read, and one concatenation used as keys and as values (refused, its
    bytes counted once)."""
    inputs = list(_append_inputs())
    if fn is _heads_concatenated:  # 2 + 2 heads of 41 positions
        inputs[1:5] = [torch.randn(1, 2, 41, 64) for _ in range(4)]
    a = memopt.analyze(fn, *inputs, cpu_attention="memopt")
    found = _append_decisions(a)
    if refused is None:
        assert found == []
    else:
        (decision,) = found
        assert not decision.applied and refused in decision.reason
        assert decision.bytes_saved == 4 * (4 * 41 * 64)
    assert sum("aten.cat" in k.ops[0] for k in a.kernels) >= 1
    compiled = torch.compile(fn, backend="memopt", options={"cpu_attention": "memopt"})
    for got, want in zip(compiled(*inputs), fn(*inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_cache_appended_at_every_length_matches_eager():
    """Dynamic sizes: one graph over growing caches (the kernel at every length), each
    call eager's. (A decode step's tape with the call as a per-call entry: test_decode.)"""
    torch._dynamo.reset()
    compiled = torch.compile(
        _appending, backend="memopt", dynamic=True, options={"cpu_attention": "memopt"}
    )
    for old in range(40, 47):
        inputs = _append_inputs(old=old, seed=old)
        got, want = compiled(*inputs), _appending(*inputs)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


# -- a constant causal mask on the CPU ----------------------------------------------------


def _causal_mask(n, additive):
    """Query i sees keys 0..i, built in the graph from no input (as Hugging Face's
    `sdpa_mask` builds a prompt's mask without padding)."""
    seen = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
    return torch.zeros(n, n).masked_fill(~seen, -math.inf) if additive else seen


def _bool_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(q.shape[-2], False))


def _additive_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(q.shape[-2], True))


def _causal_decisions(a):
    return [d for d in ledger_attention(a) if "causal_mask" in d.code]


@pytest.mark.parametrize("fn", [_bool_causal, _additive_causal], ids=["bool", "additive"])
def test_a_constant_causal_mask_becomes_is_causal(fn):
    """Must: a mask computed from no input and equal to the causal pattern is dropped for
    is_causal. Bytes: q, k, v read, output and logsumexp written; the additive mask the op
    read (4 bytes an element) is the saving. Values as eager's, on memopt's causal kernel."""
    q, k, v = qkv((1, 2, 40, 24))
    a = memopt.analyze(fn, q, k, v)
    (decision,) = _causal_decisions(a)
    assert decision.code == "attention.causal_mask" and decision.applied
    assert decision.bytes_saved == 4 * 40 * 40
    assert [k.ops for k in a.kernels] == [
        ("aten._scaled_dot_product_flash_attention_for_cpu.default",)
    ]
    assert a.bytes_moved == 4 * 3 * (2 * 40 * 24) + 4 * (2 * 40 * 24 + 2 * 40)
    compiled = torch.compile(fn, backend="memopt", options={"cpu_attention": "memopt"})
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), rtol=1e-5, atol=1e-5)


def _window(q, k, v):
    n = q.shape[-2]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j > i - 4))


def _given_mask(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _random_mask(q, k, v):
    n = q.shape[-2]
    causal = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal | (torch.rand(n, n) < 0.0))


def _fewer_queries(q, k, v):
    n = k.shape[-2]
    seen = torch.arange(n)[None, :] <= torch.arange(n)[-q.shape[-2] :, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=seen)


@pytest.mark.parametrize(
    "fn, inputs, reason",
    [
        (_window, lambda q, k, v: (q, k, v), "not the causal pattern"),
        (_given_mask, lambda q, k, v: (q, k, v, _causal_mask(40, False)), "an input"),
        (_fewer_queries, lambda q, k, v: (q[:, :, :8], k, v), "differ in number"),
        (_random_mask, lambda q, k, v: (q, k, v), "a random op"),
    ],
    ids=["sliding window", "mask given as an input", "fewer queries than keys", "random"],
)
def test_other_masks_stay(fn, inputs, reason):
    """Must not: a sliding window (evaluated, not causal), a mask given as an input (even a
    causal one: the next call may give another), queries fewer than keys (bottom-right
    alignment, which is_causal's top-left is not), a mask made with a random op (its value
    at compile time says nothing of the next call's, even where it is causal)."""
    args = inputs(*qkv((1, 2, 40, 24)))
    a = memopt.analyze(fn, *args)
    (decision,) = _causal_decisions(a)
    assert decision.code == "attention.not_causal_mask" and not decision.applied
    assert reason in decision.reason
    compiled = torch.compile(fn, backend="memopt", options={"cpu_attention": "memopt"})
    torch.testing.assert_close(compiled(*args), fn(*args), rtol=1e-5, atol=1e-5)


def test_a_mask_that_cannot_be_evaluated_stays(monkeypatch):
    """Must not: where evaluating the mask raises, the mask stays, with the reason."""
    from memopt.passes import attention

    def fails(nodes):
        raise RuntimeError("no kernel for this op here")

    monkeypatch.setattr(attention, "_evaluated", fails)
    q, k, v = qkv((1, 2, 40, 24))
    (decision,) = _causal_decisions(memopt.analyze(_bool_causal, q, k, v))
    assert not decision.applied and "could not be evaluated" in decision.reason
    assert "no kernel for this op here" in decision.reason


def _negative_scale(q, k, v):
    n = q.shape[-2]
    seen = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=seen, scale=-1.0)


@torch.library.custom_op("memopt_test::causal_mask", mutates_args=())
def _library_mask(n: int) -> torch.Tensor:
    """An op outside ATen: it may read state of its own (here it does not)."""
    return torch.arange(n)[None, :] <= torch.arange(n)[:, None]


@_library_mask.register_fake
def _(n):
    return torch.empty(n, n, dtype=torch.bool)


def _custom_op_mask(q, k, v):
    mask = torch.ops.memopt_test.causal_mask(q.shape[-2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize(
    "fn, reason",
    [(_negative_scale, "scale of -1.0"), (_custom_op_mask, "not an ATen op")],
    ids=["scale below 0", "an op outside ATen"],
)
def test_causal_masks_the_causal_op_would_not_match_stay(fn, reason):
    """Must not: with a scale of 0 or below ATen's causal op makes NaN rows where the masked
    op does not; an op outside ATen may give another mask on the next call."""
    q, k, v = qkv((1, 2, 40, 24))
    (decision,) = _causal_decisions(memopt.analyze(fn, q, k, v))
    assert not decision.applied and reason in decision.reason
    compiled = torch.compile(fn, backend="memopt", options={"cpu_attention": "memopt"})
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), rtol=1e-5, atol=1e-5)


def test_a_mask_shared_by_attentions_is_evaluated_once(monkeypatch):
    """Must: two attentions over one constant causal mask: both take is_causal, and the
    mask is evaluated once (a model's layers share their prompt's mask)."""
    from memopt.passes import attention

    calls = []
    evaluated = attention._evaluated
    monkeypatch.setattr(attention, "_evaluated", lambda nodes: calls.append(1) or evaluated(nodes))

    def two_layers(q, k, v):
        mask = _causal_mask(q.shape[-2], False)
        first = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.scaled_dot_product_attention(first, k, v, attn_mask=mask)

    q, k, v = qkv((1, 2, 40, 24))
    decisions = _causal_decisions(memopt.analyze(two_layers, q, k, v))
    assert [d.code for d in decisions] == ["attention.causal_mask"] * 2
    assert all(d.applied for d in decisions) and len(calls) == 1
