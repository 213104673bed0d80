"""channels_last on the CPU: the layout pass counts the reorders oneDNN makes of NCHW
activations (`compiler/onednn.py`). Bytes are worked out by hand (float32: 4 B); the rule
itself is checked against oneDNN's own log of the reorders it runs."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import memopt
from memopt.compiler.onednn import hidden_reorder_bytes

F32 = 4

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN"
)


class ConvBnRelu(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


# The decision on the convolutions' layout: changed, or kept.
CONV_LAYOUT = ("layout.conv_layout", "layout.conv_layout_kept")


def _choice(analysis):
    decisions = [d for e in analysis.ledger if e.pass_name == "layout" for d in e.decisions]
    (choice,) = [d for d in decisions if d.code in CONV_LAYOUT]
    return choice


def _compiled_matches(model, x, training: bool = False) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="memopt")
    eager_in, mine_in = (x.detach().clone().requires_grad_(training) for _ in range(2))
    want, got = model(eager_in), compiled(mine_in)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got.stride() == want.stride()  # graph outputs keep eager's strides
    if training:
        want.square().sum().backward()
        got.square().sum().backward()
        torch.testing.assert_close(mine_in.grad, eager_in.grad, rtol=1e-4, atol=1e-4)


def test_channels_last_chosen_for_onednn_reorders() -> None:
    # 16 channels, batch 2: oneDNN runs it and, in NCHW, reorders input and output to its
    # blocked layout and back (4 activation passes); channels_last converts the input once
    # (2 passes) and makes ATen convert the weight (read + write).
    model, x = ConvBnRelu(16, 16, 3).eval(), torch.randn(2, 16, 16, 16)
    a = memopt.analyze(model, x)
    act, weight, channel = 2 * 16 * 16 * 16 * F32, 16 * 16 * 9 * F32, 16 * F32
    conv = act + weight + act
    bn_relu = act + 4 * channel + act  # the conversion back to NCHW fuses into it
    nchw = conv + bn_relu + 4 * act
    channels_last = 2 * act + conv + bn_relu + 2 * weight
    choice = _choice(a)
    assert choice.code == "layout.conv_layout" and "channels_last" in choice.what
    assert f"NCHW: {nchw} B" in choice.reason
    assert f"activations oneDNN reorders: {4 * act} B" in choice.reason
    assert f"channels_last: {channels_last} B" in choice.reason
    assert choice.bytes_saved == nchw - channels_last
    # bytes_moved counts the graph only (the contract): the conversion is in it, oneDNN's
    # reorders are not, so it rises by the conversion while the modelled total falls.
    assert (a.bytes_moved, len(a.kernels)) == (2 * act + conv + bn_relu, 3)
    _compiled_matches(model, x, training=True)


def test_channels_last_refused_when_weights_outweigh_reorders() -> None:
    # oneDNN runs it (batch 2), but the 3x3 64->64 weight ATen would convert to channels_last
    # on every call outweighs the small activations' reorders.
    model, x = ConvBnRelu(64, 64, 3).eval(), torch.randn(2, 64, 2, 2)
    a = memopt.analyze(model, x)
    act, weight = 2 * 64 * 2 * 2 * F32, 64 * 64 * 9 * F32
    choice = _choice(a)
    assert choice.code == "layout.conv_layout_kept" and "NCHW" in choice.what
    assert f"activations oneDNN reorders: {4 * act} B" in choice.reason
    assert choice.bytes_saved == -((2 * act + 2 * weight) - 4 * act)
    _compiled_matches(model, x)


def test_no_reorders_counted_where_aten_runs_the_convolution() -> None:
    # Batch 1, a 3x3 kernel and 1024 input elements: ATen's own kernel, not oneDNN
    # (ConvParams::use_mkldnn), so NCHW costs nothing extra and is kept.
    model, x = ConvBnRelu(16, 16, 3).eval(), torch.randn(1, 16, 8, 8)
    choice = _choice(memopt.analyze(model, x))
    assert choice.code == "layout.conv_layout_kept" and "NCHW" in choice.what
    assert "oneDNN" not in choice.reason


def test_option_off_prices_the_graph_alone() -> None:
    model, x = ConvBnRelu(16, 16, 3).eval(), torch.randn(2, 16, 16, 16)
    a = memopt.analyze(model, x, pass_options={"layout": {"onednn_reorders": False}})
    choice = _choice(a)
    assert choice.code == "layout.conv_layout_kept" and "NCHW" in choice.what
    assert "oneDNN" not in choice.reason


# -- the rule against oneDNN's own log ----------------------------------------------------

_REORDER = re.compile(r"onednn_verbose,.*,exec,cpu,reorder,.*,(\d+(?:x\d+)*),[\d.]+\s*$")


def _logged_activation_reorder_bytes(capfd, run, activation_shapes) -> int:
    """Bytes of the reorders oneDNN logs for tensors of the given shapes (read + write)."""
    capfd.readouterr()
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        run()
    lines = capfd.readouterr().out.splitlines()
    if not any(line.startswith("onednn_verbose") for line in lines):
        pytest.skip("this oneDNN build logs nothing")
    total = 0
    for line in lines:
        match = _REORDER.match(line)
        if match:
            dims = tuple(int(d) for d in match.group(1).split("x"))
            if dims in activation_shapes:
                total += 2 * F32 * torch.Size(dims).numel()
    return total


@pytest.mark.parametrize(
    "shape, c_out, kernel, channels_last",
    [
        ((2, 16, 16, 16), 16, 3, False),  # input and output reordered
        ((2, 3, 16, 16), 16, 3, False),  # few input channels: input read as it is
        ((2, 16, 8, 8), 32, 1, False),  # 1x1: input reordered whatever its channels
        ((2, 16, 16, 16), 16, 3, True),  # channels_last: nothing reordered
    ],
)
def test_rule_matches_onednn_log(capfd, shape, c_out, kernel, channels_last) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape)
    weight = torch.randn(c_out, shape[1], kernel, kernel)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        weight = weight.contiguous(memory_format=torch.channels_last)

    def conv(x):
        return nn.functional.conv2d(x, weight, padding=kernel // 2)

    a = memopt.analyze(conv, x, pass_options={"layout": {"channels_last": "never"}})
    (node,) = [
        n for n in a.graphs[0].gm.graph.nodes if n.target is torch.ops.aten.convolution.default
    ]
    modelled = hidden_reorder_bytes(node, {})
    conv(x)  # oneDNN builds its primitives on the first call
    out_shape = (shape[0], c_out, *shape[2:])
    logged = _logged_activation_reorder_bytes(capfd, lambda: conv(x), {shape, out_shape})
    assert modelled == logged
