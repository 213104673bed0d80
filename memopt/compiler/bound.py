"""The lower bound: the bytes any correct program computing a graph must move.

`lower_bound(gm)` states its rules, graph shape by graph shape; docs/architecture.md ("How
bytes are counted") summarizes them. The driver applies it to the graph as captured, so
that no rewrite moves it.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch
import torch.fx

from memopt.compiler.aten_ops import (
    GATHERS,
    PARTIAL_UPDATES,
    SCATTER_VIEWS,
    SHAPE_ONLY_OPS,
    indexed_numel,
    is_mutating,
    is_random,
    update_accumulates,
)
from memopt.compiler.cost import ZERO, buffer_users, is_view, view_base
from memopt.compiler.graph import output_metas, tensor_meta

aten = torch.ops.aten


def lower_bound(gm: torch.fx.GraphModule) -> sympy.Expr:
    """Compulsory traffic: bytes any correct program computing the graph must move.

    Meant for a graph as captured (functional ATen, input mutations as trailing `copy_`s);
    fused kernels are not looked into. Index values are unknown, so every index counts as a
    distinct element (the assumption `bytes_moved` makes for gathers too). Only nodes that
    reach an output or a mutation count. P is a graph input (placeholder); "uses" of P are
    its users through views; bytes are elements x P's itemsize.

    Reads, per input P with uses (its touched bytes, unless every use is one of these):
    - an output: P, or a view of it, returned as is, reads nothing;
    - argument 0 of an op that takes it only for its shape (functional `copy(P, src)`,
      SHAPE_ONLY_OPS: ones_like, new_zeros, ...), or of a scatter whose source covers it
      all (`slice_scatter` with a source of the result's shape, `select_scatter` along a
      dim of size 1): nothing;
    - the destination of `copy_(P or a view of P, value)`: written, not read;
    - the table of a gather (argument 0 of a GATHERS op, through views, P in no other
      argument): the gather's output elements;
    - an op that reads P only through views (a slice, say): the views' touched bytes;
    - a node of an exclusive partial update of P (below): nothing, or the updated elements
      when the update accumulates (index_put(accumulate=True), scatter_add, index_add, ...).
    P then reads min(touched bytes, the sum of those).

    Writes:
    - every graph output once (all outputs of its node; outputs computing the same op on
      the same values, up to views that change nothing, once together: what common-
      subexpression elimination makes of them), except an output that is an input or a
      view of one, and an output that is a `copy_` into an input (or a view of one, or
      a view of such a copy_): the mutated input, written below;
    - every `copy_(D, value)` with D an input or a view of one writes D once, except when
      `value` is a partial update of D: the updated elements only;
    - an in-place op on an input other than copy_ (no capture makes one; a pass might)
      writes its mutated argument once, or only the updated elements for the in-place
      PARTIAL_UPDATES ops (index_put_, scatter_, index_add_, ...).

    A partial update of a region R (R is D, or recursively a view of D):
    - `U(R, ...)` for U in PARTIAL_UPDATES: updates U's elements (index_put: the indexed
      region, or the values' elements with a boolean mask; scatter: the index's; index_add
      and index_copy: the source's; *_scatter: the src's, or the inner update's when src is
      itself a partial update of the matching view of R: `slice_scatter(R, index_put(
      slice(R, d, a, b), ...), d, a, b)` from `x[a:b, idx] = v`);
    - `where(arange(n).view(..., n, ...) == k, expand(unsqueeze(src, d)), R)`, core ATen's
      select_scatter(R, src, d, k) from `x[k] = v`: the row's elements, or the inner
      update's when src is a partial update of `select(R, d, k)` (`x[k][idx] = v`);
    - `V(U(W(R), ...))` with W, V views that undo each other (two permutes or transposes
      composing to the identity, or a reshape and a reshape back to R's shape): U's elements.
    The update is exclusive when no node of it has a live user outside it and the copy_.
    """
    live = _live_nodes(gm)
    mutations = [n for n in gm.graph.nodes if n in live and _mutated_input(n) is not None]
    free_uses: dict[torch.fx.Node, set[torch.fx.Node]] = {}
    accumulated: dict[torch.fx.Node, sympy.Expr] = {}
    total = ZERO
    for node in mutations:
        placeholder, destination, update = _mutation(node)
        meta = tensor_meta(destination)
        if meta is None:
            continue
        total += meta.nbytes if update is None else update.written * meta.itemsize
        free = free_uses.setdefault(placeholder, set())
        if node.target is aten.copy_.default:
            source = node.args[1]
            if not isinstance(source, torch.fx.Node) or view_base(source) is not placeholder:
                free.add(node)  # its destination is written, not read
            if update is None or not _exclusive(update, node, live):
                continue
        elif update is None:
            continue  # another in-place op (mul_): it reads its argument too
        free |= update.nodes
        accumulated[placeholder] = (
            accumulated.get(placeholder, ZERO) + update.accumulated * meta.itemsize
        )
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            total += _input_read(
                node, live, free_uses.get(node, set()), accumulated.get(node, ZERO)
            )
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    flat: list[torch.fx.Node] = []
    torch.fx.node.map_arg(output_node.args, flat.append)
    values = _value_numbers(gm)
    written: set[int] = set()
    for node in flat:
        base = view_base(node)
        if base.op == "placeholder" or values[base] in written or tensor_meta(base) is None:
            continue
        if _mutated_input(base) is not None:
            continue
        written.add(values[base])
        total += sum((m.nbytes for m in output_metas(base)), ZERO)
    return sympy.simplify(total)


def _value_numbers(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, int]:
    """Nodes that compute the same op on the same values (up to views that change nothing)
    share a number: the outputs common-subexpression elimination makes one tensor."""
    numbers: dict[torch.fx.Node, int] = {}
    interned: dict[tuple, int] = {}

    def freeze(value: object) -> object:
        if isinstance(value, torch.fx.Node):
            return ("node", numbers[value])
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, tuple(freeze(v) for v in value))
        if isinstance(value, dict):
            return tuple(sorted((k, freeze(v)) for k, v in value.items()))
        if isinstance(value, float):
            return ("float", repr(value))  # 0.0 and -0.0 differ; so do two nans
        return value

    for node in gm.graph.nodes:
        source = node.args[0] if node.args else None
        if node.op != "call_function" or is_random(node) or is_mutating(node):
            key: tuple = ("unique", node.name)
        elif is_view(node) and isinstance(source, torch.fx.Node) and _same_view(node, source):
            numbers[node] = numbers[source]
            continue
        else:
            key = (node.target, freeze(node.args), freeze(node.kwargs))
        try:
            numbers[node] = interned.setdefault(key, len(interned))
        except TypeError:  # an unhashable argument: a value of its own
            numbers[node] = interned.setdefault(("unique", node.name), len(interned))
    return numbers


def _same_view(view: torch.fx.Node, source: torch.fx.Node) -> bool:
    a, b = tensor_meta(view), tensor_meta(source)
    return a is not None and b is not None and a == b


@dataclass(frozen=True)
class PartialWrite:
    """A value that equals a region of an input except for `written` elements."""

    written: sympy.Expr  # elements replaced
    accumulated: sympy.Expr  # elements read back to accumulate into (zero for a plain write)
    nodes: frozenset[torch.fx.Node]  # the nodes between the region and the value


def _live_nodes(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Nodes whose result reaches an output or a side effect (a mutation)."""
    live: set[torch.fx.Node] = set()
    stack = [n for n in gm.graph.nodes if n.op == "output" or is_mutating(n)]
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(node.all_input_nodes)
    return live


def _mutated_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """The placeholder an in-place node writes (`copy_` or another mutating op), if any."""
    if node.op != "call_function" or not is_mutating(node) or not node.args:
        return None
    first = node.args[0]
    if not isinstance(first, torch.fx.Node) or not _writes_first_argument(node):
        return None
    base = view_base(first)
    return base if base.op == "placeholder" else None


def _writes_first_argument(node: torch.fx.Node) -> bool:
    arguments = node.target._schema.arguments
    alias = arguments[0].alias_info if arguments else None
    return alias is not None and alias.is_write


def _mutation(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, PartialWrite | None]:
    """(input written, destination, the partial write when only some elements change)."""
    destination = node.args[0]
    placeholder = view_base(destination)
    if node.target is aten.copy_.default:
        value = node.args[1]
        update = _partial_write(value, destination) if isinstance(value, torch.fx.Node) else None
    elif node.target in PARTIAL_UPDATES:
        update = _update_elements(node)
    else:
        update = None
    return placeholder, destination, update


def _partial_write(value: torch.fx.Node, region: torch.fx.Node) -> PartialWrite | None:
    """`value` as `region` with some elements replaced, by the graph shapes of lower_bound."""
    if value.op != "call_function":
        return None
    if value.target in PARTIAL_UPDATES and value.args and value.args[0] is region:
        if value.target in SCATTER_VIEWS:
            inner = _into_view_update(value)
            if inner is not None:
                return inner
        return _update_elements(value)
    if value.target is aten.where.self and len(value.args) == 3 and value.args[2] is region:
        return _where_select(value, region)
    inner_value = value.args[0] if value.args else None
    if is_view(value) and isinstance(inner_value, torch.fx.Node):
        inner_region = inner_value.args[0] if inner_value.args else None
        if (
            inner_value.target in PARTIAL_UPDATES
            and isinstance(inner_region, torch.fx.Node)
            and is_view(inner_region)
            and inner_region.args[0] is region
            and _undoes(value, inner_region, region)
        ):
            inner = _partial_write(inner_value, inner_region)
            if inner is not None:
                return _with_nodes(inner, value, inner_region)
    return None


_ARANGES = {aten.arange.default, aten.arange.start, aten.arange.start_step}


def _where_select(where: torch.fx.Node, region: torch.fx.Node) -> PartialWrite | None:
    """`where(arange(n).view(1, -1, 1) == k, new, R)`: select_scatter(R, src, dim, k) as
    core ATen decomposes it (`x[:, k] = v`); it replaces R's elements at index k of dim."""
    condition, region_meta = where.args[0], tensor_meta(region)
    if (
        not isinstance(condition, torch.fx.Node)
        or condition.target is not aten.eq.Scalar
        or region_meta is None
    ):
        return None
    positions, index = condition.args
    view = positions.args[0] if isinstance(positions, torch.fx.Node) else None
    if positions.target not in _RESHAPES or not isinstance(view, torch.fx.Node):
        return None
    if view.target not in _ARANGES or not isinstance(index, int):
        return None
    bounds = _full_args(view)
    start, end, step = (0, bounds[0], 1) if view.target is aten.arange.default else bounds[:3]
    shape, rank = tensor_meta(positions).shape, len(region_meta.shape)
    dims = [d for d, size in enumerate(shape, start=rank - len(shape)) if size != 1]
    if (start, step) != (0, 1) or len(dims) != 1 or not 0 <= index < end:
        return None
    if region_meta.shape[dims[0]] != end:
        return None
    row = PartialWrite(region_meta.numel / end, ZERO, frozenset({where}))
    # The new row broadcast: expand(unsqueeze(src, dim)); src may update part of the row.
    expand = where.args[1]
    unsqueeze = expand.args[0] if _is_call(expand, aten.expand.default) else None
    src = unsqueeze.args[0] if _is_call(unsqueeze, aten.unsqueeze.default) else None
    select = src.args[0] if isinstance(src, torch.fx.Node) and src.args else None
    if (
        not _is_call(select, aten.select.int)
        or select.args[0] is not region
        or unsqueeze.args[1] % rank != dims[0]
        or select.args[1] % rank != dims[0]
        or select.args[2] != index
    ):
        return row
    inner = _partial_write(src, select)
    return row if inner is None else _with_nodes(inner, where, expand, unsqueeze, select)


def _is_call(node: object, target: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.target is target


def _into_view_update(scatter: torch.fx.Node) -> PartialWrite | None:
    """`slice_scatter(R, src, *view_args)` where src updates part of `slice(R, *view_args)`."""
    src = scatter.args[1]
    view = src.args[0] if isinstance(src, torch.fx.Node) and src.args else None
    if (
        not isinstance(view, torch.fx.Node)
        or view.target is not SCATTER_VIEWS[scatter.target]
        or view.args[0] is not scatter.args[0]
        or _full_args(view)[1:] != _full_args(scatter)[2:]
    ):
        return None
    inner = _partial_write(src, view)
    return None if inner is None else _with_nodes(inner, scatter, view)


def _with_nodes(update: PartialWrite, *nodes: torch.fx.Node) -> PartialWrite:
    return PartialWrite(update.written, update.accumulated, update.nodes | frozenset(nodes))


def _update_elements(node: torch.fx.Node) -> PartialWrite | None:
    """Elements a PARTIAL_UPDATES node replaces (None when its metadata is missing)."""
    spec = PARTIAL_UPDATES[node.target]
    if spec.updated_arg is not None:
        meta = tensor_meta(node.args[spec.updated_arg])
        if meta is None:
            return None
        count = meta.numel
    else:
        base, values = tensor_meta(node.args[0]), tensor_meta(node.args[2])
        indices = [tensor_meta(i) if isinstance(i, torch.fx.Node) else None for i in node.args[1]]
        given = [i for i in node.args[1] if i is not None]
        if base is None or values is None or len(given) != sum(m is not None for m in indices):
            return None
        if any(m is not None and m.dtype in (torch.bool, torch.uint8) for m in indices):
            count = values.numel  # a mask selects a data-dependent count; the values fit it
        else:
            count = indexed_numel(base.shape, [m.shape if m else None for m in indices])
    accumulates = update_accumulates(node.target, node.args, node.kwargs)
    count = sympy.sympify(count)
    return PartialWrite(count, count if accumulates else ZERO, frozenset({node}))


def _full_args(node: torch.fx.Node) -> list[object]:
    """Every schema argument of an ATen node, defaults filled in."""
    values = []
    for position, argument in enumerate(node.target._schema.arguments):
        if position < len(node.args):
            values.append(node.args[position])
        elif argument.name in node.kwargs:
            values.append(node.kwargs[argument.name])
        else:
            values.append(argument.default_value if argument.has_default_value() else None)
    return values


_PERMUTES = {aten.permute.default, aten.transpose.int, aten.t.default}
_RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}


def _undoes(outer: torch.fx.Node, inner: torch.fx.Node, region: torch.fx.Node) -> bool:
    """outer(inner(region)) has region's elements in region's order."""
    if outer.target in _RESHAPES and inner.target in _RESHAPES:
        outer_meta, region_meta = tensor_meta(outer), tensor_meta(region)
        return (
            outer_meta is not None
            and region_meta is not None
            and (outer_meta.shape == region_meta.shape)
        )
    if outer.target in _PERMUTES and inner.target in _PERMUTES:
        region_meta = tensor_meta(region)
        if region_meta is None:
            return False
        rank = len(region_meta.shape)
        first, second = _permutation(inner, rank), _permutation(outer, rank)
        return [first[k] for k in second] == list(range(rank))
    return False


def _permutation(node: torch.fx.Node, rank: int) -> list[int]:
    """Output dim k of a permute-like view is input dim result[k]."""
    if node.target is aten.permute.default:
        return [d % rank for d in node.args[1]]
    order = list(range(rank))
    first, second = (0, 1) if node.target is aten.t.default else node.args[1:3]
    first, second = first % rank, second % rank
    order[first], order[second] = order[second], order[first]
    return order


def _exclusive(update: PartialWrite, mutation: torch.fx.Node, live: set[torch.fx.Node]) -> bool:
    """No node of the update feeds anything but the update and its write-back."""
    inside = update.nodes | {mutation}
    return all(user in inside for node in update.nodes for user in node.users if user in live)


def _input_read(
    node: torch.fx.Node,
    live: set[torch.fx.Node],
    free_uses: set[torch.fx.Node],
    accumulated: sympy.Expr,
) -> sympy.Expr:
    """Bytes a graph input must be read: whole, or only gathered and accumulated elements."""
    meta = tensor_meta(node)
    if meta is None:
        return ZERO
    partial = accumulated
    for user in dict.fromkeys(buffer_users(node)):
        if user not in live or user.op == "output" or user in free_uses:
            continue
        if (user.target in _SHAPE_OF_FIRST or _overwrites_first(user)) and _only_first(user, node):
            continue
        if user.target in GATHERS and _only_first(user, node):
            partial += sum((m.numel for m in output_metas(user)), ZERO) * meta.itemsize
            continue
        views = [a for a in user.all_input_nodes if a is not node and view_base(a) is node]
        if views and node not in user.all_input_nodes:  # reads only views (slices) of P
            partial += sum((tensor_meta(v).touched_nbytes for v in views), ZERO)
            continue
        return meta.touched_nbytes
    return ZERO if partial == ZERO else sympy.Min(meta.touched_nbytes, partial)


# Ops that take their argument 0 only for its size, dtype and device: functional copy
# (`copy(x, src)` is src broadcast to x's shape), ones_like, new_zeros, ...
_SHAPE_OF_FIRST = SHAPE_ONLY_OPS | {aten.copy.default}


def _overwrites_first(user: torch.fx.Node) -> bool:
    """A scatter whose source covers all of argument 0: `slice_scatter` of a source of the
    result's shape, `select_scatter` along a dim of size 1."""
    meta = tensor_meta(user)
    if meta is None or len(user.args) < 3:
        return False
    if user.target is aten.slice_scatter.default:
        source = tensor_meta(user.args[1]) if isinstance(user.args[1], torch.fx.Node) else None
        return source is not None and tuple(source.shape) == tuple(meta.shape)
    if user.target is aten.select_scatter.default:
        return meta.shape[user.args[2] % len(meta.shape)] == 1
    return False


def _only_first(user: torch.fx.Node, node: torch.fx.Node) -> bool:
    """`node` (through views) is `user`'s argument 0 (a gather's table) and no other input."""
    first = user.args[0] if user.args else None
    if not isinstance(first, torch.fx.Node) or view_base(first) is not node:
        return False
    return all(view_base(a) is not node for a in user.all_input_nodes if a is not first)
