"""cleanup: dead code, common subexpressions, and no-op copies, casts, views, slices, cats,
neutral arithmetic (x * 1, x / 1, x - 0, x ** 1, integer x + 0), integer rounding, and
reads of a destination that is entirely overwritten.

Runs first, so later passes see one node per distinct computation.

A scatter or copy whose source covers its whole destination (`slice_scatter` of a
full-size source, `select_scatter` into a dim of size 1, which capture decomposes into a
`where` on a condition the graph fixes, `aten.copy` into a fresh buffer) is first turned into
a copy of its source (decision `overwritten`: the destination is no longer read); that copy
is then an ordinary no-op copy when it changes neither dtype nor layout.

Refuses to:
- merge or drop random ops (each draw is distinct) or ops that mutate their inputs;
- remove a no-op copy (clone, same-dtype cast, single-input cat, integer rounding, neutral
  arithmetic) whose result reaches a graph output when the output would then alias a graph
  input or another output, where eager returned a fresh tensor.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx
from torch._guards import detect_fake_mode

from memopt.compiler.aten_ops import is_mutating, is_random, returns_fresh_memory
from memopt.compiler.cost import buffer_users, reaches_output, view_base
from memopt.compiler.graph import META_KEY, evaluate, meta_of_value, static_int, tensor_meta
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
# Rounding an integer tensor returns its values: ATen copies them. (torch has no bool kernels
# for these; a float tensor is really rounded.)
_ROUNDING_OPS = {aten.ceil.default, aten.floor.default, aten.round.default, aten.trunc.default}
# Arithmetic with a neutral scalar (the addmm decomposition multiplies by alpha = beta = 1).
# Each is exact for a real x whose dtype the result keeps (checked: an integer tensor times
# 1.0 is a float tensor, so that one is a cast):
# - x * 1 and x / 1: IEEE multiplication and division by 1 return x, signed zeros,
#   infinities and NaNs included (16-bit floats compute in fp32 and round back, exact for a
#   value of that dtype; only a NaN's payload may differ). torch.set_flush_denormal(True)
#   would flush subnormals; it is off by default, and Inductor drops these too.
# - x ** 1: ATen's pow copies its base for an exponent of 1.
# - x - 0.0: -0.0 - 0.0 is -0.0. Not x - (-0.0): that is x + 0.0.
# - x + (-0.0): exact. Not x + 0.0: -0.0 + 0.0 is +0.0.
# - integers: x + 0, x - 0, x // 1 and x / 1 rounded toward zero are exact.
# Complex x is excluded: (a + bi) * (1 + 0i) computes b * 0, which is NaN for an infinite b.
_NEUTRAL_SCALAR = {
    aten.mul.Tensor: 1,
    aten.div.Tensor: 1,
    aten.div.Tensor_mode: 1,
    aten.pow.Tensor_Scalar: 1,
    aten.sub.Tensor: 0,
    aten.add.Tensor: 0,
}
# For floating-point x: the sign the zero must have (x - (+0.0), x + (-0.0)).
_FLOAT_ZERO_SIGN = {aten.sub.Tensor: 1.0, aten.add.Tensor: -1.0}
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
# Views that keep a constant tensor constant, and comparisons of a constant with a scalar:
# what a decomposed select_scatter's condition is made of (arange(0, 1) == index).
_CONSTANT_VIEWS = _IDENTITY_VIEW_OPS | {
    aten.unsqueeze.default,
    aten.squeeze.default,
    aten.select.int,
}
_COMPARISONS: dict[object, Callable[[object, object], bool]] = {
    aten.eq.Scalar: operator.eq,
    aten.ne.Scalar: operator.ne,
    aten.lt.Scalar: operator.lt,
    aten.le.Scalar: operator.le,
    aten.gt.Scalar: operator.gt,
    aten.ge.Scalar: operator.ge,
}


def _same_layout(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    ma, mb = tensor_meta(a), tensor_meta(b)
    return (
        ma is not None
        and mb is not None
        and (ma.shape, ma.stride, ma.dtype) == (mb.shape, mb.stride, mb.dtype)
    )


def _neutral_operand(node: torch.fx.Node) -> bool:
    """The node is x op scalar with a scalar that leaves every x of the result's dtype alone."""
    operand = node.args[1] if len(node.args) > 1 else None
    if isinstance(operand, bool) or not isinstance(operand, (int, float)):
        return False
    if operand != _NEUTRAL_SCALAR[node.target] or node.kwargs.get("alpha", 1) != 1:
        return False
    dtype = tensor_meta(node).dtype
    if dtype.is_complex:
        return False
    if dtype.is_floating_point:
        if node.target is aten.div.Tensor_mode:
            return node.kwargs.get("rounding_mode") is None  # floor(x / 1) is floor(x)
        sign = _FLOAT_ZERO_SIGN.get(node.target)
        return sign is None or math.copysign(1.0, operand) == sign
    return True


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
    elif target in _ROUNDING_OPS:
        dtype = tensor_meta(node).dtype
        source = node.args[0] if not (dtype.is_floating_point or dtype.is_complex) else None
    elif target in _NEUTRAL_SCALAR:
        source = node.args[0] if _neutral_operand(node) else None
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


def _owns_its_memory(node: torch.fx.Node) -> bool:
    """The node's result is memory the graph allocated, not an input's or an alias of one."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return isinstance(node.args[0], torch.fx.Node) and _owns_its_memory(node.args[0])
    return returns_fresh_memory(node)


def _why_kept(node: torch.fx.Node, source: torch.fx.Node) -> tuple[str, str] | None:
    """Why a copy must stay although it changes nothing (a decision code and the reason),
    or None where its source can stand in for it."""
    base = view_base(source)
    owned = _owns_its_memory(base)
    if reaches_output(node):
        if not owned:
            return "noop_kept_output", (
                "its result is a graph output; without the copy it would alias a graph input"
            )
        if any(user.op == "output" for user in buffer_users(base)):
            return "noop_kept_output", (
                "its result is a graph output; without the copy it would alias another output"
            )
    # A functional graph writes mutated inputs back at its end (copy_): there a copy of an
    # input still holds the input's values from before, and the input itself may not.
    if (
        not owned
        and any(is_mutating(user) for user in buffer_users(node))
        and any(is_mutating(user) for user in buffer_users(base))
    ):
        return "noop_kept_mutated", (
            "its result is written into an input, and its source is an input the graph "
            "mutates: the copy keeps the source's values from before"
        )
    return None


# -- destinations that are entirely overwritten --------------------------------------------


def _constant(node: object) -> int | None:
    """The one value every element of an integer or bool node holds, where the graph fixes
    it; None where it does not (or where it could be a float, compared inexactly)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    meta = tensor_meta(node)
    if meta is None or meta.dtype.is_floating_point or meta.dtype.is_complex:
        return None
    target, args = node.target, node.args
    if target in _CONSTANT_VIEWS:
        return _constant(args[0])
    if target in _COMPARISONS:
        left, right = _constant(args[0]), args[1]
        if left is None or not isinstance(right, int):
            return None
        return int(_COMPARISONS[target](left, right))
    if target is aten.logical_not.default:
        value = _constant(args[0])
        return None if value is None else int(not value)
    if target is aten.arange.start_step:
        start, end, step = (*args, 1)[:3]
        if (
            all(isinstance(v, int) for v in (start, end, step))
            and len(range(start, end, step)) == 1
        ):
            return start
        return None
    if target is aten.full.default and isinstance(args[1], int):
        return int(args[1])
    return None


def _overwriting_source(
    node: torch.fx.Node,
) -> tuple[torch.fx.Node, torch.fx.Node, list[tuple]] | None:
    """For a node whose result holds its source's values in every element (the destination
    it scatters or copies into is entirely overwritten): the source, the destination, and the
    views (target, args after the tensor) that give the source the result's shape."""
    if node.op != "call_function" or tensor_meta(node) is None:
        return None
    target, args = node.target, node.args
    views: list[tuple] = []
    destination = args[0] if args else None
    if target is aten.copy.default:
        # copy(dst, src): src broadcast to dst's shape and cast to its dtype, at dst's strides.
        source = args[1]
    elif target is aten.slice_scatter.default:
        # A source of the destination's shape fills every index of the sliced dim.
        source = args[1]
        if tensor_meta(source) is None or tensor_meta(source).shape != tensor_meta(node).shape:
            return None
    elif target is aten.select_scatter.default:
        # Selecting from a dim of size 1 selects all of it.
        source, dim = args[1], args[2]
        shape = tensor_meta(node).shape
        if shape[dim] != 1:
            return None
        views.append((aten.unsqueeze.default, (dim % len(shape),)))
    elif target is aten.where.self:
        condition = _constant(args[0])
        if condition is None:
            return None
        source, destination = (args[1], args[2]) if condition else (args[2], args[1])
    else:
        return None
    if not isinstance(source, torch.fx.Node) or tensor_meta(source) is None:
        return None
    shape = tensor_meta(node).shape
    source_shape = tensor_meta(source).shape
    if views:
        source_shape = shape
    if source_shape != shape:
        sizes = [static_int(size) for size in shape]
        # Symbolic sizes would have to come from the graph's size values: not built here.
        views.append((aten.expand.default, None if None in sizes else (sizes,)))
    return source, destination, views


def _read_nbytes(node: object, ctx: PassContext) -> int:
    meta = tensor_meta(node) if isinstance(node, torch.fx.Node) else None
    return evaluate(meta.touched_nbytes, ctx.bindings) if meta is not None else 0


def _insert(
    gm: torch.fx.GraphModule, target: object, args: tuple, kwargs: dict | None = None
) -> torch.fx.Node | None:
    """A new node (at the graph's insertion point) with its fake value and metadata, or None
    where the op refuses its arguments."""
    node = gm.graph.call_function(target, args, kwargs or {})
    values = torch.fx.node.map_arg((args, kwargs or {}), lambda n: n.meta.get("val"))
    mode = detect_fake_mode([n.meta.get("val") for n in node.all_input_nodes])
    if mode is None:
        gm.graph.erase_node(node)
        return None
    try:
        with mode:
            value = target(*values[0], **values[1])
    except Exception:  # noqa: BLE001 - the rewrite is simply not made
        gm.graph.erase_node(node)
        return None
    node.meta["val"] = value
    node.meta[META_KEY] = meta_of_value(value)
    return node


def _copy_as(
    gm: torch.fx.GraphModule, value: torch.fx.Node, like: torch.fx.Node
) -> list[torch.fx.Node] | None:
    """The nodes of a copy of `value` with `like`'s dtype and layout, the copy last: a clone
    (a cast where the dtype differs) that keeps value's strides, or one written in the order
    of like's strides (permuted, copied row-major, permuted back). None if neither has them."""
    want = tensor_meta(like)
    if value.meta["val"].device != like.meta["val"].device:
        return None
    strides = [static_int(stride) for stride in want.stride]
    orders: list[list[int] | None] = [None]
    if None not in strides:
        orders.append(sorted(range(len(strides)), key=lambda d: -strides[d]))
    for order in orders:
        nodes: list[torch.fx.Node | None] = []
        source = value
        if order is not None and order != sorted(order):
            nodes.append(_insert(gm, aten.permute.default, (source, order)))
            source = nodes[-1]
        if source is not None:
            kwargs = {} if order is None else {"memory_format": torch.contiguous_format}
            if tensor_meta(source).dtype == want.dtype:
                nodes.append(_insert(gm, aten.clone.default, (source,), kwargs))
            else:
                kwargs["dtype"] = want.dtype
                nodes.append(_insert(gm, aten._to_copy.default, (source,), kwargs))
        if nodes[-1] is not None and order is not None and order != sorted(order):
            inverse = sorted(range(len(order)), key=order.__getitem__)
            nodes.append(_insert(gm, aten.permute.default, (nodes[-1], inverse)))
        if nodes[-1] is not None and _same_layout(nodes[-1], like):
            return nodes
        for node in reversed(nodes):
            if node is not None:
                gm.graph.erase_node(node)
    return None


def _cse_key(node: torch.fx.Node) -> tuple | None:
    if node.op != "call_function" or is_random(node) or is_mutating(node):
        return None
    try:
        key = (node.target, _freeze(node.args), _freeze(node.kwargs))
        hash(key)
    except TypeError:
        return None
    return key


def _freeze(value: object) -> object:
    """An argument as a CSE key: lists, tuples and dicts as tuples (a module function: a
    recursive closure would be a reference cycle per call)."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, float):
        # 0.0 and -0.0 compare equal but are different constants; so are nan and nan.
        return ("float", repr(value))
    return value


@register_pass(
    "cleanup",
    codes=(
        "overwritten",  # a scatter or copy whose destination is all overwritten: a copy
        "overwritten_kept",  # such a node kept: no copy of its source has its layout
        "noop_removed",  # a copy, cast, view, rounding or neutral arithmetic that changes nothing
        "noop_kept_output",  # such a copy kept: without it an output would alias
        "noop_kept_mutated",  # such a copy kept: its source is an input written back later
        "cse",  # a node merged into an identical earlier one
        "dead_code",  # a node whose result nothing uses
    ),
)
@dataclass(frozen=True)
class Cleanup(Pass):
    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        self._stop_reading_overwritten(gm, ctx)
        self._remove_noops(gm, ctx)
        self._merge_common_subexpressions(gm, ctx)
        self._remove_dead_code(gm, ctx)

    def _stop_reading_overwritten(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        """A scatter or copy whose source covers its destination becomes a copy of the
        source (which `_remove_noops` then removes where it changes nothing)."""
        for node in list(gm.graph.nodes):
            found = _overwriting_source(node)
            if found is None:
                continue
            source, destination, views = found
            inserted: list[torch.fx.Node] = []
            with gm.graph.inserting_before(node):
                value = source
                for target, args in views:
                    value = None if args is None else _insert(gm, target, (value, *args))
                    if value is None:
                        break
                    inserted.append(value)
                copy = _copy_as(gm, value, node) if value is not None else None
            if copy is None:
                for unused in inserted[::-1]:
                    gm.graph.erase_node(unused)
                ctx.refuse(
                    "overwritten_kept",
                    f"keep %{node.name} ({node.target}) reading its destination",
                    f"%{source.name} overwrites all of it, but no copy of %{source.name} with "
                    "the result's shape, layout and device is built (a broadcast to symbolic "
                    "sizes, a layout no permutation gives, another device)",
                    _read_nbytes(destination, ctx),
                    (node.name,),
                )
                continue
            saved = ctx.nbytes(node) - sum(ctx.nbytes(n) for n in copy)
            if saved > 0:
                what = f"%{node.name} ({node.target}) reads only %{source.name}"
                reason = (
                    f"%{source.name} overwrites every element of the destination, "
                    "which is no longer read: a copy of the source"
                )
                if ctx.decide("overwritten", what, reason, saved, (node.name,)):
                    node.replace_all_uses_with(copy[-1])
                    gm.graph.erase_node(node)
                    continue
            for unused in [*copy[::-1], *inserted[::-1]]:
                gm.graph.erase_node(unused)

    def _remove_noops(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        for node in list(gm.graph.nodes):
            source = _noop_source(node)
            if source is None:
                continue
            label = f"no-op {node.target} %{node.name}"
            nbytes = ctx.nbytes(node)
            copies = node.target not in _IDENTITY_VIEW_OPS
            kept = _why_kept(node, source) if copies else None
            if kept is not None:
                ctx.refuse(kept[0], f"keep {label}", kept[1], nbytes, (node.name,))
                continue
            if node.target in _NEUTRAL_SCALAR:
                reason = "arithmetic with a neutral scalar: same values, shape, strides and dtype"
            elif node.target in _ROUNDING_OPS:
                reason = "rounds integers: same values, shape, strides and dtype"
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
