"""cleanup: dead code, common subexpressions, and no-op copies, casts, views, slices, cats
and neutral arithmetic (x * 1, x / 1, x - 0, x ** 1).

Runs first, so later passes see one node per distinct computation.

Refuses to:
- merge or drop random ops (each draw is distinct) or ops that mutate their inputs;
- remove a no-op copy (clone, same-dtype cast, single-input cat) whose result reaches a graph
  output, because the output would then alias the input where eager returned a fresh tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from memopt.compiler.aten_ops import is_mutating, is_random
from memopt.compiler.cost import reaches_output
from memopt.compiler.graph import tensor_meta
from memopt.passes.base import Pass, PassContext
from memopt.passes.registry import register_pass

aten = torch.ops.aten
prims = torch.ops.prims

# Ops that copy their input; when the copy changes nothing, it can read the input instead.
_COPY_OPS = {
    aten.clone.default,
    aten._to_copy.default,
    prims.convert_element_type.default,
    aten.cat.default,
}
# Arithmetic with a neutral scalar (the addmm decomposition multiplies by alpha = beta = 1).
# Not x + 0: -0.0 + 0 is +0.0, so that one changes a value.
_NEUTRAL_SCALAR = {
    aten.mul.Tensor: 1,
    aten.div.Tensor: 1,
    aten.sub.Tensor: 0,
    aten.pow.Tensor_Scalar: 1,
}
# Views that can be the identity.
_IDENTITY_VIEW_OPS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.expand.default,
    aten.alias.default,
    aten.permute.default,
    aten.slice.Tensor,
    aten.squeeze.dim,
    aten.squeeze.dims,
}


def _same_layout(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    ma, mb = tensor_meta(a), tensor_meta(b)
    return (
        ma is not None
        and mb is not None
        and (ma.shape, ma.stride, ma.dtype) == (mb.shape, mb.stride, mb.dtype)
    )


def _noop_source(node: torch.fx.Node) -> torch.fx.Node | None:
    """The input a node merely passes through, or None if the node does real work."""
    if node.op != "call_function" or not node.args or tensor_meta(node) is None:
        return None
    target = node.target
    if target is aten.cat.default:
        inputs = node.args[0]
        source = inputs[0] if isinstance(inputs, (list, tuple)) and len(inputs) == 1 else None
    elif target in _COPY_OPS or target in _IDENTITY_VIEW_OPS:
        source = node.args[0]
    elif target in _NEUTRAL_SCALAR:
        operand = node.args[1] if len(node.args) > 1 else None
        neutral = _NEUTRAL_SCALAR[target]
        if isinstance(operand, bool) or not isinstance(operand, (int, float)) or operand != neutral:
            return None
        if node.kwargs.get("alpha", 1) != 1:
            return None
        source = node.args[0]
    else:
        return None
    if not isinstance(source, torch.fx.Node) or not _same_layout(node, source):
        return None
    if target is aten._to_copy.default and any(
        key in node.kwargs and node.kwargs[key] is not None for key in ("device", "layout")
    ):
        return None
    if target is aten.slice.Tensor:
        step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
        if step != 1:
            return None
    return source


def _cse_key(node: torch.fx.Node) -> tuple | None:
    if node.op != "call_function" or is_random(node) or is_mutating(node):
        return None

    def freeze(value: object) -> object:
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, tuple(freeze(v) for v in value))
        if isinstance(value, dict):
            return tuple(sorted((k, freeze(v)) for k, v in value.items()))
        if isinstance(value, float):
            # 0.0 and -0.0 compare equal but are different constants; so are nan and nan.
            return ("float", repr(value))
        return value

    try:
        key = (node.target, freeze(node.args), freeze(node.kwargs))
        hash(key)
    except TypeError:
        return None
    return key


@register_pass(
    "cleanup",
    codes=(
        "noop_removed",  # a copy, cast, view or neutral arithmetic that changes nothing
        "noop_kept_output",  # such a copy kept: its result is a graph output
        "cse",  # a node merged into an identical earlier one
        "dead_code",  # a node whose result nothing uses
    ),
)
@dataclass(frozen=True)
class Cleanup(Pass):
    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        self._remove_noops(gm, ctx)
        self._merge_common_subexpressions(gm, ctx)
        self._remove_dead_code(gm, ctx)

    def _remove_noops(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        for node in list(gm.graph.nodes):
            source = _noop_source(node)
            if source is None:
                continue
            label = f"no-op {node.target} %{node.name}"
            nbytes = ctx.nbytes(node)
            copies = node.target in _COPY_OPS or node.target in _NEUTRAL_SCALAR
            if copies and reaches_output(node):
                ctx.refuse(
                    "noop_kept_output",
                    f"keep {label}",
                    "its result is a graph output; without the copy it would alias its input",
                    nbytes,
                    (node.name,),
                )
                continue
            if node.target in _NEUTRAL_SCALAR:
                reason = "arithmetic with a neutral scalar: same values, shape, strides and dtype"
            elif copies:
                reason = "copies nothing: same shape, strides and dtype"
            else:
                reason = "identity view"
            if ctx.decide("noop_removed", f"removed {label}", reason, nbytes, (node.name,)):
                node.replace_all_uses_with(source)
                gm.graph.erase_node(node)

    def _merge_common_subexpressions(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        seen: dict[tuple, torch.fx.Node] = {}
        for node in list(gm.graph.nodes):
            key = _cse_key(node)
            if key is None:
                continue
            first = seen.get(key)
            if first is None:
                seen[key] = node
                continue
            what = f"merged %{node.name} into %{first.name} ({node.target})"
            reason = "same op on the same inputs"
            if ctx.decide("cse", what, reason, ctx.nbytes(node), (node.name, first.name)):
                node.replace_all_uses_with(first)
                gm.graph.erase_node(node)

    def _remove_dead_code(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        # Users before producers, so a whole dead chain goes in one sweep.
        for node in reversed(list(gm.graph.nodes)):
            if node.op != "call_function" or node.users or node.is_impure():
                continue
            if is_random(node):
                # Dropping a draw would shift every later draw from the generator.
                continue
            what = f"removed dead %{node.name} ({node.target})"
            if ctx.decide("dead_code", what, "result unused", ctx.nbytes(node), (node.name,)):
                gm.graph.erase_node(node)
