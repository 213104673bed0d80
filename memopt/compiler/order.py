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

import torch.fx

from memopt.compiler.aten_ops import is_mutating
from memopt.compiler.cost import view_base


def written_buffer(node: torch.fx.Node) -> torch.fx.Node | None:
    """The buffer a mutating node writes (its out= argument, else its first), through views."""
    if not is_mutating(node):
        return None
    written = node.kwargs.get("out", node.args[0] if node.args else None)
    return view_base(written) if isinstance(written, torch.fx.Node) else None


def legalize(graph: torch.fx.Graph) -> None:
    """Reorder `graph` in place (module doc). Raises ValueError when no order can keep
    every read on its side of the writes (a rewrite that should have been refused)."""
    nodes = list(graph.nodes)
    index = {n: k for k, n in enumerate(nodes)}
    after: dict[torch.fx.Node, set[torch.fx.Node]] = {n: set(n.all_input_nodes) for n in nodes}
    writes = [(w, b) for w in nodes if (b := written_buffer(w)) is not None]
    if writes:
        bases = {b for _, b in writes}
        readers: dict[torch.fx.Node, list[torch.fx.Node]] = {b: [] for b in bases}
        for node in nodes:
            for source in node.all_input_nodes:
                base = view_base(source)
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
    ready = [(index[n], n.name) for n in nodes if waiting[n] == 0]
    heapq.heapify(ready)
    by_name = {n.name: n for n in nodes}
    order = []
    while ready:
        _, name = heapq.heappop(ready)
        node = by_name[name]
        order.append(node)
        for user in unblocks[node]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, (index[user], user.name))
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
