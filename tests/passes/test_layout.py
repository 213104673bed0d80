"""The layout pass: copies folded into strided reads, matmul outputs in their reader's order,
channels_last chosen by bytes. Byte and kernel counts are worked out by hand (float32: 4 B)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memopt
from tests.models import Block

F32 = 4


def _layout_decisions(analysis) -> list:
    return [d for e in analysis.ledger if e.pass_name == "layout" for d in e.decisions]


def _copy_kernels(analysis) -> list:
    return [k for k in analysis.kernels if k.ops and all("clone" in op for op in k.ops)]


def _compiled_matches(model, *inputs, training: bool = False) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="memopt")
    eager_in = [x.detach().clone().requires_grad_(training) for x in inputs]
    mine_in = [x.detach().clone().requires_grad_(training) for x in inputs]
    want, got = model(*eager_in), compiled(*mine_in)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert got.stride() == want.stride()  # graph outputs keep eager's strides
    if training:
        want.sum().backward()
        got.sum().backward()
        for a, b in zip(mine_in, eager_in):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


# -- copies -------------------------------------------------------------------------------


def test_transposed_operand_goes_to_the_matmul_without_a_copy() -> None:
    x, w = torch.randn(16, 8), torch.randn(16, 4)

    def f(x, w):
        return x.t().contiguous() @ w

    on, off = memopt.analyze(f, x, w), memopt.analyze(f, x, w, disable=["layout"])
    mm = 8 * 16 * F32 + 16 * 4 * F32 + 8 * 4 * F32  # reads x (transposed) and w, writes 8x4
    copy = 2 * 8 * 16 * F32  # clone: reads and writes x
    assert (on.bytes_moved, len(on.kernels)) == (mm, 1)
    assert (off.bytes_moved, len(off.kernels)) == (mm + copy, 2)
    (removed,) = [d for d in _layout_decisions(on) if d.applied]
    assert removed.code == "layout.copy_removed" and removed.bytes_saved == copy
    _compiled_matches(f, x, w, training=True)


def test_permute_chain_into_bmm() -> None:
    x, w = torch.randn(8, 2, 4), torch.randn(2, 8, 3)

    def f(x, w):
        # (8, 2, 4) -> (2, 8, 4) -> (2, 4, 8): strides (4, 1, 8), which bmm reads as is.
        return torch.bmm(x.permute(1, 0, 2).permute(0, 2, 1).contiguous(), w)

    on, off = memopt.analyze(f, x, w), memopt.analyze(f, x, w, disable=["layout"])
    bmm = 64 * F32 + 48 * F32 + 24 * F32
    assert (on.bytes_moved, len(on.kernels)) == (bmm, 1)
    assert (off.bytes_moved, len(off.kernels)) == (bmm + 2 * 64 * F32, 2)
    _compiled_matches(f, x, w, training=True)


def test_copy_a_matmul_needs_is_kept_with_its_bytes() -> None:
    x, w = torch.randn(4, 8, 16), torch.randn(128, 3)

    def f(x, w):
        # (4, 16, 8) transposed cannot be viewed as (4, 128): the matmul needs the copy.
        return x.transpose(1, 2).contiguous().view(4, -1) @ w

    on = memopt.analyze(f, x, w)
    (kept,) = _layout_decisions(on)
    assert not kept.applied and kept.bytes_saved == 2 * 512 * F32
    assert "view" in kept.reason
    assert len(_copy_kernels(on)) == 1
    _compiled_matches(f, x, w)


def test_transposed_elementwise_read_into_a_reduction() -> None:
    x = torch.randn(16, 8)

    def f(x):
        return x.t().contiguous().sum(dim=1)

    on, off = memopt.analyze(f, x), memopt.analyze(f, x, disable=["layout"])
    # One kernel either way (fusion folds the clone too): reads x, writes 8 sums.
    assert (on.bytes_moved, len(on.kernels)) == (16 * 8 * F32 + 8 * F32, 1)
    assert (off.bytes_moved, len(off.kernels)) == (on.bytes_moved, 1)
    layout = next(e for e in on.ledger if e.pass_name == "layout")
    # Before fusion, the pass removes the standalone copy: its read and write of x.
    assert layout.bytes_before - layout.bytes_after == 2 * 16 * 8 * F32
    assert layout.kernels_before - layout.kernels_after == 1
    _compiled_matches(f, x, training=True)


def test_copy_feeding_a_graph_output_keeps_eager_strides() -> None:
    x = torch.randn(16, 8)

    def f(x):
        return x.t().contiguous() * 2

    on = memopt.analyze(f, x)
    (kept,) = _layout_decisions(on)
    assert not kept.applied and "graph output 0" in kept.reason
    assert (on.bytes_moved, len(on.kernels)) == (2 * 16 * 8 * F32, 1)  # fused by fusion
    _compiled_matches(f, x)


# -- attention --------------------------------------------------------------------------
# Written-out attention, kept as bmm -> softmax -> bmm (the attention pass off: it would make
# it one fused attention kernel), for the layouts around its matmuls.
NO_ATTENTION = ["attention"]


@pytest.mark.slow
def test_attention_output_reshape_is_written_by_the_matmul() -> None:
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(1, 8, 32)
    on = memopt.analyze(model, x, disable=NO_ATTENTION)
    off = memopt.analyze(model, x, disable=["layout", *NO_ATTENTION])
    # y.transpose(1, 2).reshape(1, 8, 32) after att @ v: a (1, 8, 4, 8) copy, read and written.
    copy = 2 * (1 * 8 * 4 * 8) * F32
    assert on.bytes_moved == off.bytes_moved - copy
    assert len(on.kernels) == len(off.kernels) - 1
    assert _copy_kernels(on) == [] and len(_copy_kernels(off)) == 1
    applied = [d.what for d in _layout_decisions(on) if d.applied]
    assert any("bmm" in w and "writes strides [8, 32, 1]" in w for w in applied)
    _compiled_matches(model, x)


def test_attention_copies_a_batched_matmul_forces_are_kept() -> None:
    # With batch 2, (batch, heads) is one bmm batch dim with one stride: neither the bmm
    # operands nor its output can take the (batch, seq, heads, dim) order without a copy.
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 8, 32)
    on = memopt.analyze(model, x, disable=NO_ATTENTION)
    off = memopt.analyze(model, x, disable=["layout", *NO_ATTENTION])
    assert (on.bytes_moved, len(on.kernels)) == (off.bytes_moved, len(off.kernels))
    kept = [d for d in _layout_decisions(on) if not d.applied]
    assert len(kept) == 5 and all(d.bytes_saved == 2 * 2 * 8 * 32 * F32 for d in kept)
    assert any(
        d.code == "layout.matmul_out_kept" and "stride requirements force" in d.reason for d in kept
    )


@pytest.mark.slow
def test_attention_training_values_and_gradients() -> None:
    torch.manual_seed(0)
    model, x = Block().train(), torch.randn(1, 8, 32)
    on = memopt.analyze(model, x, training=True, disable=NO_ATTENTION)
    removed = [d for d in _layout_decisions(on) if d.applied and d.code == "layout.copy_removed"]
    # The attention output's copy (forward) and the two gradient copies into cat (backward).
    assert len(removed) == 3 and all(d.bytes_saved == 2 * 8 * 32 * F32 for d in removed)
    assert _copy_kernels(on) == []
    _compiled_matches(model, x, training=True)


def test_attention_heads_reshape_around_matmuls() -> None:
    # (batch, seq, heads, dim) <-> (batch, heads, seq, dim) with batch 1: every reshape is a
    # view for the matmuls, so no copy kernel at all.
    q, k, v = (torch.randn(1, 8, 2, 4) for _ in range(3))

    def attention(q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return (att @ v).transpose(1, 2).reshape(1, 8, 8)

    on = memopt.analyze(attention, q, k, v, disable=NO_ATTENTION)
    assert _copy_kernels(on) == []
    # bmm(q, k^T): reads 64 + 64, writes 2x8x8 = 128; softmax: reads and writes 128;
    # bmm(att, v): reads 128 + 64 into strides that make the final reshape a view, writes 64.
    expected = (64 + 64 + 128) + (128 + 128) + (128 + 64 + 64)
    assert (on.bytes_moved, len(on.kernels)) == (expected * F32, 3)
    _compiled_matches(attention, q, k, v, training=True)


# -- channels_last ----------------------------------------------------------------------


class ConvBnRelu(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def _choice(analysis):
    (choice,) = [d for d in _layout_decisions(analysis) if d.code.startswith("layout.conv_layout")]
    return choice


# The graph's own bytes only: on the CPU, oneDNN's reorders of NCHW activations would also
# count (and favour channels_last here); tests/passes/test_cpu_layout.py covers that rule.
GRAPH_BYTES_ONLY = {"layout": {"onednn_reorders": False}}


def test_conv_bn_relu_nchw_keeps_nchw() -> None:
    torch.manual_seed(0)
    model, x = ConvBnRelu(4, 4, 1).eval(), torch.randn(2, 4, 4, 4)
    a = memopt.analyze(model, x, pass_options=GRAPH_BYTES_ONLY)
    act, weight, channel = 128 * F32, 16 * F32, 4 * F32
    conv = act + weight + act
    bn_relu = act + 4 * channel + act  # reads conv, mean, var, weight, bias; writes
    assert (a.bytes_moved, len(a.kernels)) == (conv + bn_relu, 2)
    choice = _choice(a)
    assert choice.code == "layout.conv_layout_kept" and "kept NCHW" in choice.what
    # channels_last would convert the input (read + write) before the convolution; the
    # conversion back to eager's NCHW output fuses into the bn-relu kernel.
    assert choice.bytes_saved == -2 * act
    assert f"NCHW: {conv + bn_relu} B" in choice.reason
    assert f"channels_last: {conv + bn_relu + 2 * act} B" in choice.reason
    _compiled_matches(model, x)


def test_channels_last_input_keeps_channels_last() -> None:
    torch.manual_seed(0)
    model = ConvBnRelu(4, 4, 1).eval()
    x = torch.randn(2, 4, 4, 4).to(memory_format=torch.channels_last)
    a = memopt.analyze(model, x, pass_options=GRAPH_BYTES_ONLY)
    choice = _choice(a)
    assert choice.code == "layout.conv_layout_kept" and "kept channels_last" in choice.what
    act = 128 * F32
    assert choice.bytes_saved == -2 * act  # NCHW would convert the input
    assert (a.bytes_moved, len(a.kernels)) == (2 * act + 16 * F32 + 2 * act + 16 * F32, 2)
    _compiled_matches(model, x)


def test_channels_last_refused_when_weights_outweigh_activations() -> None:
    # A channels_last input but a large 3x3 weight: running channels_last would make the
    # library convert the weight on every call; converting the small input is cheaper.
    torch.manual_seed(0)
    model = ConvBnRelu(16, 64, 3).eval()
    x = torch.randn(1, 16, 4, 4).to(memory_format=torch.channels_last)
    a = memopt.analyze(model, x)
    choice = _choice(a)
    x_bytes, weight = 256 * F32, 64 * 16 * 9 * F32
    out = 64 * 2 * 2 * F32
    conv = x_bytes + weight + out
    bn_relu = out + 4 * 64 * F32 + out
    assert choice.code == "layout.conv_layout" and "chose NCHW" in choice.what
    nchw = 2 * x_bytes + conv + bn_relu + 0  # output back to channels_last fuses into bn-relu
    assert f"NCHW: {nchw} B" in choice.reason
    assert f"weights the library converts: {2 * weight} B" in choice.reason
    assert choice.bytes_saved == (conv + bn_relu + 2 * weight) - nchw
    assert (a.bytes_moved, len(a.kernels)) == (nchw, 3)
    _compiled_matches(model, x)


def test_channels_last_chosen_for_channels_last_weights() -> None:
    # NCHW input, channels_last weights (model.to(channels_last)): converting the small
    # input beats converting the large weight back.
    torch.manual_seed(0)
    model = ConvBnRelu(16, 64, 3).eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 16, 4, 4)
    a = memopt.analyze(model, x)
    choice = _choice(a)
    assert choice.code == "layout.conv_layout" and "chose channels_last" in choice.what
    x_bytes, weight = 256 * F32, 64 * 16 * 9 * F32
    out = 64 * 2 * 2 * F32
    total = 2 * x_bytes + (x_bytes + weight + out) + (out + 4 * 64 * F32 + out)
    assert f"channels_last: {total} B" in choice.reason
    inserted = [d for d in _layout_decisions(a) if d.code == "layout.conversion"]
    assert [d.bytes_saved for d in inserted] == [-2 * x_bytes]
    assert a.bytes_moved == total
    _compiled_matches(model, x, training=True)


def test_channels_last_decision_with_symbolic_shapes() -> None:
    torch.manual_seed(0)
    model = ConvBnRelu(4, 4, 1).eval()
    x = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
    a = memopt.analyze(model, x, dynamic=True) if _accepts_dynamic() else None
    if a is None:
        return
    choice = _choice(a)
    assert choice.code == "layout.conv_layout_kept" and "kept channels_last" in choice.what
    assert "s" in choice.reason.split("NCHW:")[1]  # the symbolic total is in the reason


def _accepts_dynamic() -> bool:
    import inspect

    return "dynamic" in inspect.signature(memopt.analyze).parameters


def test_layout_never_option() -> None:
    torch.manual_seed(0)
    model = ConvBnRelu(16, 64, 3).eval()
    x = torch.randn(1, 16, 4, 4).to(memory_format=torch.channels_last)
    a = memopt.analyze(model, x, pass_options={"layout": {"channels_last": "never"}})
    assert not [d for d in _layout_decisions(a) if d.code.startswith("layout.conv_layout")]
