"""A library GEMM with its epilogue: oneDNN's fused linear ops as an fx call target.

`x @ w + bias` followed by an activation (`act(x @ w + b)`) or by a residual add
(`x @ w + b + other`) is one oneDNN inner product with a post-op
(`torch.ops.mkldnn._linear_pointwise.default` / `.binary`, shipped with torch's CPU
build): the GEMM's result goes through the bias and the post-op in registers and is
written once, instead of written by the GEMM, read by a pointwise kernel and written
again. The epilogue pass (passes/epilogue.py) replaces such chains with one
`LinearEpilogue` node.

oneDNN reads the weight as it is ("ba": mm's (K, N) operand transposed, a view; its
verbose log shows no reorder primitive) and computes in float32. Its GEMM sums in
another order than MKL's sgemm that eager's `addmm` calls, and its GELU is its own
implementation: results match eager to float32 rounding (~1e-6 relative), not bit for
bit.

Fake tensors, tensors that require grad, other devices, or a torch built without
oneDNN run the same computation as ATen calls (`mm`, `add`, the activation), so
verification re-propagates through the node and it is never wrong.
"""

from __future__ import annotations

import torch
import torch.fx
from torch.nn import functional as F

from memopt.compiler.cost import Cost, read_bytes
from memopt.compiler.graph import tensor_meta

# activation name -> (oneDNN's post-op attr, its algorithm argument, the ATen computation)
ACTIVATIONS = {
    "gelu_tanh": ("gelu", "tanh", lambda y: F.gelu(y, approximate="tanh")),
    "gelu_erf": ("gelu", "none", F.gelu),
    "relu": ("relu", "", torch.relu),
}


# Tensors the library stand-ins hand to a library: plain ones and parameters (an inference
# graph's weights), not fake tensors or other subclasses.
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def launchable(tensors: tuple[object, ...]) -> bool:
    """Whether `tensors` can go to a bound native launch (cpp/launcher.py `bind_layouts`):
    plain tensors (the launch reads their data pointers and checks their layouts) without
    a negated view's bit (which the kernels would not see)."""
    for t in tensors:
        if type(t) not in PLAIN_TENSORS or t.is_neg():
            return False
    return True


def onednn_available() -> bool:
    """Whether this torch can run oneDNN's fused linear ops on the CPU."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(
        torch.ops.mkldnn, "_linear_pointwise"
    )


def onednn_enabled() -> bool:
    """oneDNN is built into this torch and not switched off (torch.backends.mkldnn)."""
    return onednn_available() and torch.backends.mkldnn.enabled


class LinearEpilogue:
    """Callable target: `fused(x, w, bias, other)` = `act(x @ w + bias)` or `x @ w + bias +
    other`, x (M, K) and w (K, N) as `mm` takes them, bias (N,) or None, other (M, N) or
    None; the result is a contiguous (M, N) tensor."""

    memopt_kind = "extern"

    def __init__(self, activation: str | None) -> None:
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}")
        self.activation = activation
        what = activation or "add"
        self.__name__ = f"linear_{what}"
        self.memopt_name = f"mkldnn._linear_pointwise({what})"
        self.memopt_ops = (self.memopt_name,)

    def __repr__(self) -> str:
        return f"LinearEpilogue({self.activation or 'add'})"

    def memopt_cost(self, node: torch.fx.Node) -> Cost:
        """Inputs read once, the output written once; 2*M*N*K FLOPs plus one per output."""
        inputs = [a for a in node.args if isinstance(a, torch.fx.Node)]
        out = tensor_meta(node)
        (m, k), (_, n) = tensor_meta(node.args[0]).shape, tensor_meta(node.args[1]).shape
        return Cost(read=read_bytes(node, inputs), write=out.nbytes, flops=2 * m * n * k + m * n)

    def __call__(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        bias: torch.Tensor | None,
        other: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self._library(x, w, bias, other):
            if other is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(x, other, w.t(), bias, "add")
            attr, algorithm, _ = ACTIVATIONS[self.activation]
            return torch.ops.mkldnn._linear_pointwise.default(x, w.t(), bias, attr, [], algorithm)
        y = torch.mm(x, w)
        if bias is not None:
            y = y + bias
        if other is not None:
            return y + other
        return ACTIVATIONS[self.activation][2](y)

    def _library(self, *tensors: torch.Tensor | None) -> bool:
        present = [t for t in tensors if t is not None]
        return (
            all(type(t) in PLAIN_TENSORS and t.is_cpu for t in present)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in present))
            and present[0].is_contiguous()
            and (tensors[3] is None or tensors[3].is_contiguous())
            and onednn_enabled()
        )
