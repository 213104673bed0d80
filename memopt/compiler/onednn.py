"""Traffic that ATen's CPU convolution (oneDNN) moves beyond reading its operands once and
writing its results once: the reorders of NCHW activations to oneDNN's blocked layout.

The cost model counts an extern convolution as its inputs read once and its outputs written
once. On a CPU, ATen hands a float32 convolution to oneDNN, which computes in a
channel-blocked layout (16 channels per block on AVX-512 parts, `aBcd16b`; 8 on AVX2). Given
NCHW activations it converts each one it reads to that layout before the convolution and
converts the result back after it: each conversion reads and writes the whole tensor.
Given channels_last (NHWC) activations it reads and writes them as they are. The weight is
converted to a blocked layout in both cases (equal bytes on both sides of a layout choice,
so not counted here).

Counted from oneDNN's own log of the primitives it runs (`torch.backends.mkldnn.verbose`,
torch 2.13.0+cpu, Xeon with AVX-512; `docs/architecture.md`, "Layout"):

- forward, NCHW: reorder `abcd -> aBcd16b` of the input, the convolution, reorder
  `aBcd16b -> abcd` of the output. Exception: a non-1x1, ungrouped convolution with fewer
  input channels than one block reads the NCHW input directly (oneDNN's "first convolution"
  kernels); its output is still converted back.
- backward, NCHW: the output gradient is converted once per primitive (data gradient,
  weight gradient), the input once for the weight gradient (same exception), the input
  gradient back once.
- channels_last: no activation reorders, forward or backward.

Which convolutions ATen sends to oneDNN follows `ConvParams::use_mkldnn`
(aten/src/ATen/native/Convolution.cpp): float32 on the CPU, oneDNN built and enabled, not
transposed, and either grouped, a kernel larger than 3x3, a batch larger than 1, or an input
of more than 20480 elements; a 1x1 kernel, unstrided and undilated, with a batch under 16
goes to oneDNN only when ATen runs more than one thread. Other convolutions (ATen's own
kernels) move no hidden bytes in this model.
"""

from __future__ import annotations

from collections.abc import Mapping

import sympy
import torch
import torch.fx

from memopt.compiler.graph import META_KEY, TensorMeta, evaluate, tensor_meta

aten = torch.ops.aten

# ATen's thresholds in ConvParams::use_mkldnn (torch 2.13).
_SMALL_INPUT_ELEMENTS = 20480
_SMALL_1X1_BATCH = 16


def block_channels() -> int:
    """Channels per block of oneDNN's blocked layout on this CPU: one SIMD register of floats."""
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


def _ints(values: object, bindings: Mapping[sympy.Symbol, int]) -> list[int]:
    return [evaluate(v, bindings) for v in values]


def _is_nchw(meta: TensorMeta) -> bool:
    """Dense NCHW (the layout oneDNN reorders); a tensor also dense in channels_last (one
    channel, or 1x1 images) is NCHW to ATen too (`suggest_memory_format`)."""
    return len(meta.shape) == 4 and meta.is_contiguous()


def runs_on_onednn(node: torch.fx.Node, bindings: Mapping[sympy.Symbol, int]) -> bool:
    """Whether ATen runs this convolution (forward or backward) through oneDNN."""
    if node.target is aten.convolution.default:
        activation, weight, stride, dilation, transposed, groups = (
            node.args[0],
            node.args[1],
            node.args[3],
            node.args[5],
            node.args[6],
            node.args[8],
        )
    elif node.target is aten.convolution_backward.default:
        activation, weight, stride, dilation, transposed, groups = (
            node.args[1],
            node.args[2],
            node.args[4],
            node.args[6],
            node.args[7],
            node.args[9],
        )
    else:
        return False
    value = activation.meta.get("val") if isinstance(activation, torch.fx.Node) else None
    meta, weight_meta = tensor_meta(activation), tensor_meta(weight)
    if not isinstance(value, torch.Tensor) or meta is None or weight_meta is None:
        return False
    if value.device.type != "cpu" or meta.dtype != torch.float32 or len(meta.shape) != 4:
        return False
    if transposed or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    batch, channels, height, width = _ints(meta.shape, bindings)
    kernel_h, kernel_w = _ints(weight_meta.shape[-2:], bindings)
    one_by_one = kernel_h == 1 and kernel_w == 1
    strided = any(s != 1 for s in stride)
    dilated = any(d != 1 for d in dilation)
    if one_by_one and not (strided or dilated or batch >= _SMALL_1X1_BATCH):
        if torch.get_num_threads() <= 1:
            return False
    return (
        groups > 1
        or (kernel_h > 3 and kernel_w > 3)
        or batch > 1
        or batch * channels * height * width > _SMALL_INPUT_ELEMENTS
    )


def _reads_plain_input(node: torch.fx.Node, bindings: Mapping[sympy.Symbol, int]) -> bool:
    """oneDNN's "first convolution" case: it reads an NCHW input without reordering it."""
    position, weight = (0, 1) if node.target is aten.convolution.default else (1, 2)
    groups = node.args[8] if node.target is aten.convolution.default else node.args[9]
    channels = evaluate(tensor_meta(node.args[position]).shape[1], bindings)
    kernel = _ints(tensor_meta(node.args[weight]).shape[-2:], bindings)
    return groups == 1 and kernel != [1, 1] and channels < block_channels()


def hidden_reorder_bytes(node: torch.fx.Node, bindings: Mapping[sympy.Symbol, int]) -> int:
    """Bytes oneDNN moves reordering this convolution's NCHW activations (read + write of
    each tensor it converts); 0 for channels_last activations or a convolution ATen runs
    itself."""
    if not runs_on_onednn(node, bindings):
        return 0

    def both_ways(operand: object) -> int:
        meta = tensor_meta(operand) if isinstance(operand, torch.fx.Node) else None
        return 2 * evaluate(meta.nbytes, bindings) if meta is not None else 0

    if node.target is aten.convolution.default:
        source = node.args[0]
        if not _is_nchw(tensor_meta(source)):
            return 0
        moved = both_ways(node)  # the result, blocked -> NCHW
        if not _reads_plain_input(node, bindings):
            moved += both_ways(source)
        return moved
    grad_output, source = node.args[0], node.args[1]
    if not (_is_nchw(tensor_meta(grad_output)) and _is_nchw(tensor_meta(source))):
        return 0
    grad_input_wanted, grad_weight_wanted = node.args[10][0], node.args[10][1]
    moved = 0
    if grad_input_wanted:  # output gradient in, input gradient back out
        grad_input = node.meta.get(META_KEY)
        grad_input = grad_input[0] if isinstance(grad_input, tuple) else None
        moved += both_ways(grad_output)
        if isinstance(grad_input, TensorMeta):
            moved += 2 * evaluate(grad_input.nbytes, bindings)
    if grad_weight_wanted:  # output gradient and input in
        moved += both_ways(grad_output)
        if not _reads_plain_input(node, bindings):
            moved += both_ways(source)
    return moved
