"""Putting a rewritten graph back in an order that runs: every node after its inputs, and
every read of a buffer on the side of each write to it where the graph had it.

A rewrite that replaces several nodes by one (a fused kernel, placed where its last member
was) can leave users of its results before it. torch.fx's `legalize_graph` fixes that
with a topological sort that places any node as soon as its inputs are ready; a write
into a graph input (`copy_` of an updated value, an in-place update), which nothing
consumes, can then move ahead of a node that reads the input's old values (seen: a KV
cache's position counter updated before the positions were computed from it). `legalize`
keeps the original order wherever the inputs allow it, and orders each write after the
nodes that read its buffer before it and before those that read it after.
"""

from __future__ import annotations

import heapq
import operator

import torch.fx

from memopt.compiler.cost import view_base


def written_buffers(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The buffers a node writes: the arguments its ATen schema marks written (`self` of an
    in-place op, `out=`, ...), and the arguments a generated kernel stores outputs into
    (a target's `destinations`: output -> argument position)."""
    written = _schema_written(node)
    destinations = getattr(node.target, "destinations", None)
    if isinstance(destinations, dict):
        written += [node.args[p] for p in destinations.values() if p < len(node.args)]
    flat: list[torch.fx.Node] = []
    torch.fx.node.map_arg(written, flat.append)
    return [buffer_of(w) for w in flat]


def _schema_written(node: torch.fx.Node) -> list[object]:
    """The values a node passes for the arguments its ATen schema marks written."""
    target, written = node.target, []
    if isinstance(target, torch._ops.OpOverload):
        for k, arg in enumerate(target._schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            if arg.name in node.kwargs:
                written.append(node.kwargs[arg.name])
            elif not arg.kwarg_only and k < len(node.args):
                written.append(node.args[k])
    return written


def buffer_of(node: torch.fx.Node) -> torch.fx.Node:
    """The node that owns the memory `node`'s tensor lives in: up through views, through
    the pieces of an op returning views (`split`, `unbind`: `getitem` of them), and through
    the result of an op that writes a buffer and returns it (`copy_`, `add_`, `out=`)."""
    while True:
        node = view_base(node)
        if node.op != "call_function":
            return node
        source = node.args[0] if node.args else None
        if node.target is operator.getitem and isinstance(source, torch.fx.Node):
            if (
                isinstance(source.target, torch._ops.OpOverload)
                and source.target.is_view
                and source.args
                and isinstance(source.args[0], torch.fx.Node)
            ):
                node = source.args[0]
                continue
            return node
        returned = _returned_written(node)
        if returned is None:
            return node
        node = returned


def _returned_written(node: torch.fx.Node) -> torch.fx.Node | None:
    """The written argument a mutating op returns (its result aliases it), if exactly one."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return None
    returns = target._schema.returns
    if len(returns) != 1 or returns[0].alias_info is None or not returns[0].alias_info.is_write:
        return None
    written = _schema_written(node)
    if len(written) == 1 and isinstance(written[0], torch.fx.Node):
        return written[0]
    return None


def legalize(graph: torch.fx.Graph) -> None:
    """Reorder `graph` in place (module doc). Raises ValueError when no order can keep
    every read on its side of the writes (a rewrite that should have been refused)."""
    nodes = list(graph.nodes)
    index = {n: k for k, n in enumerate(nodes)}
    after: dict[torch.fx.Node, set[torch.fx.Node]] = {n: set(n.all_input_nodes) for n in nodes}
    writes = [(w, b) for w in nodes for b in written_buffers(w)]
    if writes:
        bases = {b for _, b in writes}
        readers: dict[torch.fx.Node, list[torch.fx.Node]] = {b: [] for b in bases}
        for node in nodes:
            for source in node.all_input_nodes:
                base = buffer_of(source)
                if base in readers:
                    readers[base].append(node)
        for write, base in writes:
            for reader in readers[base]:
                if reader is write:
                    continue
                if index[reader] < index[write]:
                    after[write].add(reader)
                else:
                    after[reader].add(write)
    waiting = {n: len(deps) for n, deps in after.items()}
    unblocks: dict[torch.fx.Node, list[torch.fx.Node]] = {n: [] for n in nodes}
    for node, deps in after.items():
        for dep in deps:
            unblocks[dep].append(node)
    # Ready nodes by original position: each placed as early as its inputs allow, never
    # ahead of an earlier ready node.
    ready = [index[n] for n in nodes if waiting[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        node = nodes[heapq.heappop(ready)]
        order.append(node)
        for user in unblocks[node]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, index[user])
    if len(order) != len(nodes):
        stuck = sorted((n for n in nodes if waiting[n]), key=index.__getitem__)
        raise ValueError(
            f"no order runs %{stuck[0].name} after its inputs with every read of a buffer "
            "on its side of the writes to it"
        )
    previous = graph._root
    for node in order:
        if node.prev is not previous:
            previous.append(node)
        previous = node
