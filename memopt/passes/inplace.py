"""inplace: an update is written into the buffer it updates, not into a new one copied back.

A functional graph (AOTAutograd's) says `x.mul_(2)` as `copy_(x, mul(x, 2))` and
`a[idx] = v` as `copy_(a, index_put(a, [idx], v))`: the new value goes to fresh memory,
whole, and is then copied into the input. Runs last, on what fusion left (fusion leaves
the updates below alone when this pass runs), and writes where the value belongs:

- `update_in_place`: an update of some elements (index_put, scatter, scatter_add,
  index_add; slice_scatter and select_scatter, which capture keeps whole, become a copy
  into the view) of a graph input the graph copies it back into, or of fresh memory that
  nothing else reads and no output returns, is made in place (`index_put_`, ...): only
  the updated elements are written, the rest of the buffer is neither read nor written;
- `out_variant`: a library op whose result is only copied into a graph input (or into a
  view of one, or of fresh memory) runs as its out= overload into it
  (`mul.out(x, 2, out=x)`): the copy and the new buffer go;
- `kernel_destination`: a generated kernel stores such an output straight into it
  (`FusedKernel.destinations`).

Refuses (recorded with the bytes at stake) when:
- the value is also a graph output: written into the input it would alias it;
- the value and the destination differ in dtype, shape or strides;
- the producer reads the buffer other than element by element where it writes it (a
  view of it, a non-pointwise op, a kernel whose loads and stores do not line up, or a
  backend that cannot write over what it reads, Feature.IN_PLACE_OUTPUTS), or an
  update's other operands read the buffer it updates;
- a node reads the buffer's old values after the write would be made;
- an out= op that must run where it is would write a view of the input the graph makes
  only after it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

from memopt.backends.codegen.planning import may_overwrite
from memopt.backends.registry import Feature
from memopt.backends.runtime.kernels import FusedKernel, owns_fresh_memory
from memopt.compiler.aten_ops import (
    SCATTER_VIEWS,
    is_mutating,
    is_pointwise,
    returns_fresh_memory,
)
from memopt.compiler.cost import node_cost, reaches_output, readers_between, view_base
from memopt.compiler.graph import META_KEY, evaluate, graph_device, meta_of_value, tensor_meta
from memopt.passes.base import Pass, PassContext
from memopt.passes.registry import register_pass

aten = torch.ops.aten
Node = torch.fx.Node


# Functional updates of some elements of argument 0 -> the op that makes them in place.
# The *_scatter ops have no in-place op: they become a copy into the view they replace.
_IN_PLACE = {
    aten.index_put.default: aten.index_put_.default,
    aten.scatter.src: aten.scatter_.src,
    aten.scatter.value: aten.scatter_.value,
    aten.scatter_add.default: aten.scatter_add_.default,
    aten.index_add.default: aten.index_add_.default,
}
# Not as_strided_scatter: its offset is relative to the clone it makes of argument 0, an
# as_strided of the argument itself would be relative to the argument's storage.
_INTO_VIEW = {
    op: view for op, view in SCATTER_VIEWS.items() if op is not aten.as_strided_scatter.default
}


def updated_in_place(node: Node) -> Node | None:
    """The buffer `node` (an update of some of its elements) can be updated in place: a
    graph input it is copied back into, or fresh memory nothing else reads; else None.

    Fusion leaves the updates of graph inputs to this pass (`base.op == "placeholder"`):
    in a kernel they would read and write the whole input. An update of fresh memory it
    may still fuse, with the producer of that memory and its readers, so that the buffer
    is never written at all; what fusion leaves alone, this pass makes in place."""
    if node.op != "call_function" or (
        node.target not in _IN_PLACE and node.target not in _INTO_VIEW
    ):
        return None
    base = node.args[0]
    if not isinstance(base, Node):
        return None
    if base.op == "placeholder":
        copies = _copies_back(node, base)
        if copies and (not reaches_output(node) or list(node.users) == copies):
            return base
        return None
    if owns_fresh_memory(base) and list(base.users) == [node] and not reaches_output(base):
        return base
    return None


def _copies_back(update: Node, base: Node) -> list[Node]:
    """The `copy_` nodes that write `update`'s new value back into `base`."""
    return [u for u in update.users if u.target is aten.copy_.default and u.args[0] is base]


def _comes_before(node: Node, anchor: Node) -> bool:
    """Whether `node` is defined before `anchor` in its graph (an op placed at `anchor`
    can take it)."""
    if node is anchor:
        return False
    current = node.next
    while current.op != "root":
        if current is anchor:
            return True
        current = current.next
    return False


def _writers_between(start: Node, end: Node) -> list[Node]:
    """Nodes strictly between `start` and `end` that write memory (in-place ops, out=
    overloads, kernels with destinations): what a read may not move past."""
    found, inside = [], False
    for node in start.graph.nodes:
        if node is end:
            break
        writes = is_mutating(node) or (
            isinstance(node.target, FusedKernel) and bool(node.target.destinations)
        )
        if inside and writes:
            found.append(node)
        inside = inside or node is start
    return found


def _layout(node: Node) -> tuple[object, ...] | None:
    meta = tensor_meta(node)
    return None if meta is None else (meta.shape, meta.stride, meta.dtype)


def _out_overload(node: Node) -> torch._ops.OpOverload | None:
    """The out= overload of a functional ATen op returning one new tensor: the same
    arguments, plus `out`."""
    if not returns_fresh_memory(node) or len(node.target._schema.returns) != 1:
        return None
    names = [a.name for a in node.target._schema.arguments]
    packet = node.target.overloadpacket
    for overload_name in packet.overloads():
        candidate = getattr(packet, overload_name)
        if [a.name for a in candidate._schema.arguments] == [*names, "out"]:
            return candidate
    return None


@register_pass(
    "inplace",
    codes=(
        "update_in_place",  # index_put/scatter/... of some elements, made in place
        "out_variant",  # a library op writes its result into the input it updates (out=)
        "kernel_destination",  # a generated kernel stores its result into that input
        "refused_alias",  # the value is read elsewhere too: it would alias the input
        "refused_layout",  # value and input differ in dtype, shape or strides
        "refused_overlap",  # the producer reads the input elsewhere than where it writes
        "refused_order",  # the input is read after the kernel that would write it
    ),
)
@dataclass(frozen=True)
class InPlace(Pass):
    """Writes the new values of updated graph inputs into them (module docstring)."""

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        for node in list(graph.nodes):
            base = updated_in_place(node)
            if base is not None:
                # the copy back into `base` only (fresh memory updated in place and then
                # copied into an input keeps that copy)
                copies = _copies_back(node, base)
                self._rewrite_update(gm, ctx, node, base, copies[0] if copies else None)
        for copy in [n for n in graph.nodes if n.target is aten.copy_.default]:
            destination, value = copy.args[:2]
            if (
                isinstance(destination, Node)
                and _writable(destination)
                and isinstance(value, Node)
                and value.op == "call_function"
            ):
                self._input_update(gm, ctx, copy, destination, value)

    # -- an input updated and copied back ----------------------------------------------

    def _input_update(
        self, gm: torch.fx.GraphModule, ctx: PassContext, copy: Node, dst: Node, value: Node
    ) -> None:
        stake = evaluate(node_cost(copy).nbytes, ctx.bindings)
        what = f"%{value.name} into %{dst.name}"
        names = (value.name, copy.name)
        others = [u for u in value.users if u is not copy]
        if reaches_output(value):
            reason = (
                f"%{value.name} is also a graph output: written into %{dst.name} it would "
                "alias the input"
            )
            ctx.refuse("refused_alias", f"not in place: {what}", reason, stake, names)
            return
        # A pointwise library op writes an out= tensor of any strides element by element
        # (TensorIterator); anything else must write the layout it would have allocated.
        have, want = _layout(value), _layout(dst)
        if have is None or want is None:
            return
        (shape, stride, dtype), (dst_shape, dst_stride, dst_dtype) = have, want
        strided = stride != dst_stride and not (
            is_pointwise(value) and _out_overload(value) is not None
        )
        if shape != dst_shape or dtype != dst_dtype or strided:
            reason = f"%{value.name} and %{dst.name} differ in dtype, shape or strides"
            ctx.refuse("refused_layout", f"not in place: {what}", reason, stake, names)
            return
        if value.target is operator.getitem and isinstance(value.args[0].target, FusedKernel):
            self._kernel_destination(ctx, copy, dst, value, stake)
            return
        out = _out_overload(value)
        if out is None:
            return
        buffer = view_base(dst)
        # A functional copy's destination gives its layout, not its values.
        read = (
            value.all_input_nodes[1:]
            if value.target is aten.copy.default
            else value.all_input_nodes
        )
        readers = [a for a in read if view_base(a) is buffer]
        if readers and (readers != [dst] or not is_pointwise(value)):
            reason = (
                f"%{value.name} ({value.target}) reads %{dst.name} other than element by "
                "element where it writes it"
            )
            ctx.refuse("refused_overlap", f"not in place: {what}", reason, stake, names)
            return
        # Alone, and with nothing between that writes memory it might read, the op can run
        # where the copy was; else where it is, once nothing reads the old values any more.
        anchor = value if others or _writers_between(value, copy) else copy
        if not _comes_before(dst, anchor):
            reason = f"%{dst.name} is made after %{value.name}, where the op must run"
            ctx.refuse("refused_order", f"not in place: {what}", reason, stake, names)
            return
        late = readers_between(buffer, anchor, copy)
        if late:
            reason = f"%{late[0].name} reads %{dst.name} after %{value.name} would write it"
            ctx.refuse("refused_order", f"not in place: {what}", reason, stake, names)
            return
        reason = (
            f"{out} writes %{dst.name} directly: no new buffer, no copy "
            f"(saves the copy's {stake} B)"
        )
        if not ctx.decide("out_variant", f"in place: {what}", reason, stake, names):
            return
        with gm.graph.inserting_before(anchor):
            call = gm.graph.call_function(out, value.args, {**value.kwargs, "out": dst})
        call.meta.update(copy.meta)
        value.replace_all_uses_with(call)
        copy.replace_all_uses_with(call)
        gm.graph.erase_node(copy)
        gm.graph.erase_node(value)

    def _kernel_destination(
        self, ctx: PassContext, copy: Node, dst: Node, item: Node, stake: int
    ) -> None:
        call, k = item.args
        fused: FusedKernel = call.target
        what = f"in place: %{item.name} of %{call.name} into %{dst.name}"
        names = (call.name, copy.name)
        inputs = list(call.args[: len(fused.kernel.inputs)])
        buffer = view_base(dst)
        through_views = [a for a in inputs if a is not dst and view_base(a) is buffer]
        if through_views:
            reason = f"the kernel reads %{buffer.name} through %{through_views[0].name}"
            ctx.refuse("refused_overlap", what, reason, stake, names)
            return
        if dst in inputs:
            position = inputs.index(dst)
            backend = ctx.kernel_backend(graph_device(copy.graph.owning_module))
            if not backend.supports(Feature.IN_PLACE_OUTPUTS) or not may_overwrite(
                fused.kernel, k, position
            ):
                reason = (
                    f"the kernel reads %{dst.name} other than element by element where it "
                    f"writes output {k}, or its backend cannot write over what it reads"
                )
                ctx.refuse("refused_overlap", what, reason, stake, names)
                return
        else:
            position = len(call.args)
        order = {n: i for i, n in enumerate(copy.graph.nodes)}
        move = order[dst] > order[call]  # the destination is made after the kernel
        late = readers_between(buffer, call, copy)
        if move:
            late += _moved_past(call, copy, order)
        if late:
            reason = f"%{late[0].name} is between %{call.name} and %{copy.name}, which "
            reason += "the kernel's write into the destination would have to move past"
            ctx.refuse("refused_order", what, reason, stake, names)
            return
        reason = (
            f"the kernel stores output {k} into %{dst.name}: no new buffer, no copy "
            f"(saves the copy's {stake} B)"
        )
        if not ctx.decide("kernel_destination", what, reason, stake, names):
            return
        if move:
            copy.prepend(call)  # after the destination, still before anything reads it
            for out in sorted(call.users, key=order.__getitem__):
                copy.prepend(out)
        if position == len(call.args):
            call.args = (*call.args, dst)
        fused.destinations = {**fused.destinations, k: position}
        copy.replace_all_uses_with(item)
        copy.graph.erase_node(copy)

    def _rewrite_update(
        self,
        gm: torch.fx.GraphModule,
        ctx: PassContext,
        update: Node,
        base: Node,
        copy: Node | None,
    ) -> None:
        graph = gm.graph
        replaced = [update] if copy is None else [update, copy]
        what = f"in place: %{update.name} into %{base.name}"
        names = tuple(n.name for n in replaced)
        before = sum(evaluate(node_cost(n).nbytes, ctx.bindings) for n in replaced)
        aliased = [a for a in update.all_input_nodes[1:] if view_base(a) is base]
        if aliased or update.args.count(base) > 1:
            reason = f"the update reads %{base.name} through %{(aliased or [base])[0].name}"
            ctx.refuse("refused_overlap", what, reason, before, names)
            return
        # Copied back and read by nothing else, the update runs where the copy was; else
        # where it is, once nothing reads the old values any more.
        movable = copy is not None and len(update.users) == 1
        anchor = copy if movable and not _writers_between(update, copy) else update
        late = readers_between(base, anchor, copy) if copy is not None else []
        if late:
            reason = f"%{late[0].name} reads %{base.name} after %{update.name} would write it"
            ctx.refuse("refused_order", what, reason, before, names)
            return
        added: list[Node] = []
        with graph.inserting_before(anchor):
            if update.target in _IN_PLACE:
                result = graph.call_function(_IN_PLACE[update.target], update.args, update.kwargs)
                result.meta.update(update.meta)
                added.append(result)
            else:
                source, *where = update.args[1:]
                view = graph.call_function(_INTO_VIEW[update.target], (base, *where))
                val = view.target(base.meta["val"], *where)  # fake: metadata only
                view.meta.update({"val": val, META_KEY: meta_of_value(val)})
                written = graph.call_function(aten.copy_.default, (view, source))
                written.meta.update(view.meta)
                added += [view, written]
                result = base
        after = sum(evaluate(node_cost(n).nbytes, ctx.bindings) for n in added)
        reason = (
            f"{update.target} writes only the elements it updates into %{base.name}: "
            f"{before} B -> {after} B"
        )
        if not ctx.decide("update_in_place", what, reason, before - after, names):
            for node in reversed(added):
                graph.erase_node(node)
            return
        for node in replaced[::-1]:
            node.replace_all_uses_with(result)
            graph.erase_node(node)


def _moved_past(call: Node, copy: Node, order: dict[Node, int]) -> list[Node]:
    """What keeps `call` from moving to just before `copy`: a reader of its outputs before
    `copy`, or a node between them that writes memory (it might write what `call` reads)."""
    outputs = [u for u in call.users if u.target is operator.getitem]
    readers = [r for o in outputs for r in o.users if r is not copy and order[r] < order[copy]]
    return readers + _writers_between(call, copy)


def _writable(destination: Node) -> bool:
    """A copy's destination this pass may have the value written into: a graph input, or
    a slice or select of one or of fresh memory."""
    if destination.op == "placeholder":
        return True
    if destination.target not in (aten.slice.Tensor, aten.select.int):
        return False
    base = view_base(destination)
    return base.op == "placeholder" or owns_fresh_memory(base)
