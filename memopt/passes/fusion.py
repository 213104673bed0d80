"""fusion: group nodes into generated kernels, chosen by the bytes each merge saves.

Kinds of fusion, all found by one greedy loop over candidate pairs of groups:
- vertical: a producer and a consumer (pointwise chains; pointwise into a reduction's input;
  a reduction into the pointwise ops that read its result; a reduction into a reduction of
  its results over another axis, a nested kernel where the backend runs one), so the
  intermediate never touches memory;
- horizontal: independent groups that read the same buffer (two reductions over the same
  axis of one input, a value and its square), so the buffer is read once;
- multi-output: a group whose values are needed outside it stores each of them.

Each round merges the legal candidate pair that saves the most bytes (modelled: cost(a) +
cost(b) - cost(a + b); where the kernels run on Triton a read with no unit-stride dim
counts the 32-byte sectors it drags in, so sharing a strided read is worth more). The pairs wait in a heap that each merge updates with the pairs it
creates, and the cycle check searches only between the two groups in a topological
numbering of the grouped graph kept under merges: work near-linear in the graph, the same
choices as rescoring every pair each round. A merge is refused when it would create a cycle
through a node outside the group (an extern matmul between producer and consumer), when
the group would exceed `max_nodes`, when lowering says the group cannot be one kernel
(different domains, different reduction axes, a reduction read at another row, an op with
no lowering), or when it would bring a concatenation that grows a graph input by rows of
static count along a size symbol (a dynamic KV cache's `torch.cat`) into a group of static
sizes, where the backend sets up a kernel's launch per size (Feature.PER_SIZE_LAUNCH, the
C++ backend: a new size every call, 11-30 us each, to save the other parts' write and
read; a consumer of the grown value, of the symbol's size already, may take it in).
Refusals are recorded with their reason and the bytes they cost.

Groups of one node stay ATen calls: a generated kernel for a single op moves the same
bytes. The exception is a layout conversion (`clone` to another memory format) whose
kernels run on the C++ backend: ATen copies it element by element through strides, while
the C++ backend transposes in tiles into memory it reuses across calls (a (32, 64, 64, 64)
NCHW -> channels_last conversion: ~55-75 ms in ATen, ~26 ms generated, measured); and a
lone float32 transcendental op (exp, log, tanh, erf, ...; `_MATH_OPS`) where the backend's
vector math beats ATen's (Feature.LONE_MATH, the C++ backend: tanh over 1M elements
1104 us in ATen, 91 us generated on an AMD EPYC, measured). And a group that is exactly
one softmax goes back to ATen's `_softmax` where the backend says ATen's is faster
(Feature.LIBRARY_SOFTMAX, which no backend declares now): the same bytes, eager's own kernel.

Matmul templates (`matmul_templates`): an mm or bmm may join a group too, which becomes a
template kernel (kind "matmul"): its epilogue (the pointwise ops that consume the product:
bias, activation, residual add, scaling, casts; several stores when the graph needs more
than the last value) and its prologue (pointwise ops whose result only the matmul reads:
casts, scaling) never touch memory. One matmul per kernel, no reduction beside it. They
are formed only for backends that run templates (triton, reference): with "auto" that is
decided by the backend the kernels will run on (config.backend, and for backend="auto"
the device of the graph's inputs: CUDA -> triton, CPU -> cpp, which has no template); the
merges they would have made are then recorded as refusals with the bytes at stake.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx

from memopt.backends.registry import Feature
from memopt.backends.runtime.kernels import FusedKernel
from memopt.backends.triton.sectors import moves_sectors
from memopt.compiler.aten_ops import SHAPE_QUERIES, TEMPLATE_MATMULS
from memopt.compiler.cost import buffer_users, is_view, touched_sector_nbytes, view_base
from memopt.compiler.graph import (
    META_KEY,
    evaluate,
    graph_device,
    hashable_meta,
    meta_of_value,
    node_skeleton,
    output_metas,
    static_int,
    tensor_meta,
)
from memopt.compiler.lower import (
    Lowered,
    NotLowerable,
    can_lower,
    can_lower_matmul,
    lower_group,
)
from memopt.compiler.order import buffer_of, legalize, written_buffers
from memopt.compiler.printer import op_name
from memopt.passes.base import Pass, PassContext
from memopt.passes.inplace import updated_in_place
from memopt.passes.registry import register_pass

Group = frozenset[torch.fx.Node]
aten = torch.ops.aten


def _grown_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """The graph input `node` grows, where it is a concatenation of that input (sized along
    the dim by a size symbol) and parts of static size along the dim, from anywhere (a KV
    cache and the new positions); None otherwise."""
    if node.target is not aten.cat.default or not node.args:
        return None
    parts = node.args[0]
    out = tensor_meta(node)
    if out is None or not isinstance(parts, (list, tuple)) or not parts:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    dim %= len(out.shape)
    metas = [tensor_meta(p) if isinstance(p, torch.fx.Node) else None for p in parts]
    if any(m is None or len(m.shape) != len(out.shape) for m in metas):
        return None
    symbolic = [p for p, m in zip(parts, metas) if static_int(m.shape[dim]) is None]
    if len(symbolic) != 1 or _view_root(symbolic[0]).op != "placeholder":
        return None
    return _view_root(symbolic[0])


def _static_group(group: Group) -> bool:
    """No node of the group has a size symbol in its result's shape."""
    for node in group:
        meta = tensor_meta(node)
        if meta is not None and any(static_int(n) is None for n in meta.shape):
            return False
    return True


def _view_root(node: torch.fx.Node) -> torch.fx.Node:
    while is_view(node) and node.args and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


class _State:
    """The grouping being built, and the cost model over groups (at the example sizes)."""

    def __init__(self, gm: torch.fx.GraphModule, ctx: PassContext, templates: bool) -> None:
        self.ctx = ctx
        self.nodes = list(gm.graph.nodes)
        self.order = {n: k for k, n in enumerate(self.nodes)}
        # Updates of some elements of a graph input (or of a buffer a library call wrote a
        # slice of) stay out of kernels, which would read and write the whole buffer: the
        # inplace pass writes only those elements.
        in_place = ctx.pipeline.runs("inplace")
        self.fusible = [
            n
            for n in self.nodes
            if (can_lower(n) or (templates and can_lower_matmul(n)))
            and not (in_place and _updates_an_input(n))
        ]
        self.group_of: dict[torch.fx.Node, Group] = {n: frozenset([n]) for n in self.fusible}
        self.consumers = {
            n: [u for u in buffer_users(n) if u in self.group_of] for n in self.fusible
        }
        # The graph does not change while groups are searched: users, view roots and bases
        # are looked up once per node.
        self.users = functools.cache(buffer_users)
        self.data_users = functools.cache(_data_users)
        self.root = functools.cache(_view_root)
        self.base = functools.cache(view_base)
        self.roots = {
            n: [r for r in map(self.root, n.all_input_nodes) if tensor_meta(r) is not None]
            for n in self.fusible
        }
        # Writes to memory in graph order (copy_ into an input, in-place and out= ops): a
        # kernel runs where its last member was, so an earlier member that reads what one
        # of these writes would read it after the write (`read_moved_past_write`).
        self.writes = [(k, b) for k, n in enumerate(self.nodes) for b in written_buffers(n)]
        self.buffer = functools.cache(buffer_of)
        self.first_memo: dict[Group, int] = {}
        self.cost_memo: dict[tuple[Group, bool], int] = {}
        self.parts_memo: dict[Group, tuple[set[torch.fx.Node], list[torch.fx.Node]]] = {}
        self.touched_memo: dict[tuple[torch.fx.Node, bool], int] = {}
        self.written_memo: dict[torch.fx.Node, int] = {}
        self.saved_memo: dict[tuple[Group, Group, bool], int] = {}
        self.lower_memo: dict[Group, str | None] = {}
        self.shapes = _Shapes()
        self.work = ctx.record.work
        self._condense()
        # The groups that read each buffer (horizontal candidates), and the fusible
        # producers of each node (vertical candidates into a merged group).
        self.readers: dict[torch.fx.Node, set[Group]] = {}
        self.producers: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        for node in self.fusible:
            for root in self.roots[node]:
                self.readers.setdefault(root, set()).add(self.group_of[node])
            for consumer in self.consumers[node]:
                self.producers.setdefault(consumer, []).append(node)
        self.nested: set[Group] = set()  # groups that lower to nested reductions
        device = graph_device(gm)
        backend = ctx.kernel_backend(device)
        # Kernels on a GPU (Triton) read in 32-byte sectors: a group is priced with its
        # strided reads' sectors, whether it becomes a generated kernel or stays an ATen
        # call (whose GPU kernel moves the same sectors), so merges compare like with like.
        self.sectors = moves_sectors(backend)
        self.no_nested = None
        # Concatenations that grow a graph input along a size symbol, and why each stays
        # out of kernels (Feature.PER_SIZE_LAUNCH, module doc).
        self.grows: dict[torch.fx.Node, str] = {}
        if backend.supports(Feature.PER_SIZE_LAUNCH):
            for node in self.fusible:
                grown = _grown_input(node)
                if grown is not None:
                    self.grows[node] = (
                        f"%{node.name} grows input %{grown.name} by rows of static count along "
                        f"a size symbol: a kernel of static sizes would take the symbol, and "
                        f"backend {backend.name!r} would set up its launch at each new size, "
                        "every call; ATen's cat sets up nothing"
                    )
        if not backend.supports(Feature.NESTED_REDUCTIONS):
            self.no_nested = (
                f"backend {backend.name!r} on {device} runs no nested reductions (a "
                "reduction of a reduction's results over another axis)"
            )

    def groups(self) -> set[Group]:
        return set(self.group_of.values())

    def external_inputs(self, group: Group) -> set[torch.fx.Node]:
        """The tensors the group's kernel reads (not members, nor views of members)."""
        return self.parts(group)[0]

    def stored(self, group: Group) -> list[torch.fx.Node]:
        """The members the kernel stores: read outside the group."""
        return self.parts(group)[1]

    def parts(
        self, group: Group, halves: tuple[Group, Group] | None = None
    ) -> tuple[set[torch.fx.Node], list[torch.fx.Node]]:
        """(external inputs, stored members) of a group; of a union, from its halves'."""
        if group not in self.parts_memo:
            if halves is not None:
                # The halves' inputs are tensors already.
                inputs = set().union(*(self.parts(h)[0] for h in halves))
                candidates = [m for h in halves for m in self.parts(h)[1]]
            else:
                inputs = {a for m in group for a in m.all_input_nodes if tensor_meta(a) is not None}
                candidates = list(group)
            inputs = {a for a in inputs if a not in group and self.root(a) not in group}
            stored = [m for m in candidates if any(u not in group for u in self.users(m))]
            self.parts_memo[group] = (inputs, stored)
        return self.parts_memo[group]

    def first(self, group: Group) -> int:
        """The group's first node's position in the graph."""
        if group not in self.first_memo:
            self.first_memo[group] = min(self.order[n] for n in group)
        return self.first_memo[group]

    def cost(self, group: Group, plain: bool = False) -> int:
        """Modelled bytes of a group as one kernel: inputs read once, outputs written once
        (cost.read_bytes and the outputs' bytes, on per-node figures evaluated once). Reads
        are in 32-byte sectors where the kernels run on a GPU, unless `plain`."""
        key = (group, plain and self.sectors)
        if key not in self.cost_memo:
            per_base: dict[torch.fx.Node, list[int]] = {}
            for arg in self.external_inputs(group):
                per_base.setdefault(self.base(arg), []).append(self.touched(arg, key[1]))
            reads = 0
            for base, touched in per_base.items():
                total = sum(touched)
                if len(touched) > 1 and tensor_meta(base) is not None:
                    total = min(total, self.written(base))  # each element read once
                reads += total
            writes = sum(self.written(n) for n in self.stored(group))
            self.cost_memo[key] = reads + writes
        return self.cost_memo[key]

    def touched(self, node: torch.fx.Node, plain: bool = False) -> int:
        """Bytes reading a tensor costs: its distinct elements; on a GPU, the 32-byte
        sectors they drag in when no dim of it has unit stride (cost.touched_sector_nbytes)."""
        key = (node, plain or not self.sectors)
        if key not in self.touched_memo:
            meta = tensor_meta(node)
            nbytes = meta.touched_nbytes if key[1] else touched_sector_nbytes(meta)
            self.touched_memo[key] = evaluate(nbytes, self.ctx.bindings)
        return self.touched_memo[key]

    def written(self, node: torch.fx.Node) -> int:
        """Bytes of every tensor a node produces: what storing it costs."""
        if node not in self.written_memo:
            total = sum(m.nbytes for m in output_metas(node))
            self.written_memo[node] = evaluate(total, self.ctx.bindings)
        return self.written_memo[node]

    def saved(self, a: Group, b: Group, plain: bool = False) -> int:
        # Keyed by the pair: a group's hash is cached, a fresh union's is not.
        key = (a, b, plain and self.sectors)
        if key not in self.saved_memo:
            union = a | b
            self.parts(union, (a, b))
            cost = functools.partial(self.cost, plain=key[2])
            self.saved_memo[key] = cost(a) + cost(b) - cost(union)
        return self.saved_memo[key]

    def describe_saving(self, a: Group, b: Group) -> str:
        """The bytes a merge saves, for its decision: in sectors, and by bytes where those differ."""
        saved = self.saved(a, b)
        plain = self.saved(a, b, plain=True)
        if plain == saved:
            return f"saves {saved} B of traffic"
        return (
            f"saves {saved} B of traffic in 32-byte sectors ({plain} B by bytes: a read "
            "with no unit-stride dim costs the sectors it drags in)"
        )

    def _condense(self) -> None:
        """The condensed graph: a vertex per group (a node in no group is a vertex alone),
        an edge where a member's value is data another vertex's member reads (views looked
        through: a view between two members is folded into indexing), and a topological
        number per vertex, kept valid under merges. Groups stay a DAG: that is what the
        cycle check keeps true."""
        vertex = {node: self.group_of.get(node) or frozenset([node]) for node in self.nodes}
        self.succ: dict[Group, set[Group]] = {v: set() for v in vertex.values()}
        self.pred: dict[Group, set[Group]] = {v: set() for v in vertex.values()}
        for node in self.nodes:
            for user in self.data_users(node):
                if vertex[user] is not vertex[node]:
                    self.succ[vertex[node]].add(vertex[user])
                    self.pred[vertex[user]].add(vertex[node])
        self.topo: dict[Group, int] = {vertex[n]: self.order[n] for n in self.nodes}

    def _between(self, low: Group, high: Group, edges: dict, ahead: bool) -> set[Group]:
        """Vertices strictly between `low` and `high` in topological number that `low`
        reaches (ahead) or that reach `high` (not ahead): only they can lie on a path
        between the two."""
        lo, hi = self.topo[low], self.topo[high]
        start = low if ahead else high
        pending = [v for v in edges[start] if lo < self.topo[v] < hi]
        seen: set[Group] = set()
        while pending:
            vertex = pending.pop()
            if vertex in seen:
                continue
            seen.add(vertex)
            self.work["fusion.vertices_visited"] += 1
            pending.extend(v for v in edges[vertex] if lo < self.topo[v] < hi and v not in seen)
        return seen

    def read_moved_past_write(self, group: Group) -> str | None:
        """Why `group` cannot run at its last member: a member before a write to memory
        (strictly between the group's first and last members) reads what it writes."""
        first, last = self.first(group), max(self.order[n] for n in group)
        for k, buffer in self.writes:
            if not first < k < last:
                continue
            for member in group:
                if self.order[member] < k and any(
                    self.buffer(a) is buffer for a in member.all_input_nodes
                ):
                    return (
                        f"%{member.name} reads %{buffer.name} before %{self.nodes[k].name} "
                        "writes it; the kernel would run after the write"
                    )
        return None

    def creates_cycle(self, a: Group, b: Group) -> bool:
        """Would a path leave a | b and come back (through an extern op or another group)?

        Only a path from the earlier of the two (topologically) through other vertices to
        the later one can: the search visits only vertices numbered between them.
        """
        self.work["fusion.cycle_checks"] += 1
        low, high = sorted((a, b), key=self.topo.__getitem__)
        return any(high in self.succ[v] for v in self._between(low, high, self.succ, True))

    def lowering_error(self, group: Group) -> str | None:
        if group not in self.lower_memo:
            members = sorted(group, key=self.order.__getitem__)
            key, names = _structure(members, self.shapes, self.users)
            probe = _PROBES.get(key)
            if probe is None:
                self.work["fusion.lowerings"] += 1
                error, nested = self._lower(group, members, key, names)
                probe = (_template(error, names), nested)
                if len(_PROBES) < MAX_PROBES and (error is None or probe[0] is not None):
                    _PROBES[key] = probe
                self.lower_memo[group] = error
            else:
                self.work["fusion.lowerings_reused"] += 1
                self.lower_memo[group] = _filled(probe[0], names)
            if probe[1]:
                self.nested.add(group)
        return self.lower_memo[group]

    def _lower(
        self, group: Group, members: list[torch.fx.Node], key: tuple, names: list[torch.fx.Node]
    ) -> tuple[str | None, bool]:
        """(why the group cannot be one kernel or None, whether it nests reductions)."""
        try:
            lowered = lower_group(members, "probe")
        except NotLowerable as error:
            return str(error), False
        _remember(key, names, lowered)
        for node in lowered.input_nodes:
            if _view_root(node) in group:
                # A view the lowering could not fold (as_strided, say) of a member: the
                # kernel would read what it computes (a cycle).
                root = _view_root(node)
                why = f"%{node.name} reads member %{root.name} through a view that is not lowered"
                return why, bool(lowered.kernel.inner_ranges)
        return None, bool(lowered.kernel.inner_ranges)

    def candidates(self) -> set[tuple[Group, Group, str]]:
        """Every candidate pair of the current grouping: (a, b, kind)."""
        pairs: set[tuple[Group, Group, str]] = set()
        for node in self.fusible:
            for consumer in self.consumers[node]:
                a, b = self.group_of[node], self.group_of[consumer]
                if a != b:
                    pairs.add((a, b, "vertical"))
        for root in self.readers:
            pairs.update(self.horizontal(root))
        return {p for p in pairs if p[2] == "vertical" or not self.vertical(p[0], p[1])}

    def horizontal(self, root: torch.fx.Node) -> list[tuple[Group, Group, str]]:
        """Pairs of groups that read `root`: all pairs, or, for a buffer many groups read (a
        weight, an input), each with the next: linear in the readers, and repeated merges
        still join them all."""
        ordered = sorted(self.readers[root], key=self.first)
        window = len(ordered) if len(ordered) <= 8 else 2
        return [
            (a, b, "horizontal") for k, a in enumerate(ordered) for b in ordered[k + 1 : k + window]
        ]

    def vertical(self, a: Group, b: Group) -> bool:
        """Whether a member of either group produces a value the other's members read."""
        return any(
            self.group_of.get(c) in (a, b) and self.group_of[c] != self.group_of[n]
            for n in (a if len(a) <= len(b) else b)
            for c in (*self.consumers.get(n, ()), *self.producers.get(n, ()))
        )

    def is_candidate(self, a: Group, b: Group, kind: str) -> bool:
        """Whether (a, b, kind) is still in `candidates()`, checked on its own."""
        if self.group_of.get(next(iter(a))) != a or self.group_of.get(next(iter(b))) != b:
            return False  # one of them was merged since
        if kind == "vertical":
            return True  # its edge is still there
        if self.vertical(a, b):
            return False
        shared = {r for n in a for r in self.roots[n]} & {r for n in b for r in self.roots[n]}
        return any((a, b, kind) in self.horizontal(root) for root in shared)

    def merge(self, a: Group, b: Group) -> Group:
        merged = a | b
        for node in merged:
            self.group_of[node] = merged
        # Number the condensed graph anew between the two: the vertices that reach the
        # later one, then the merged group, then those the earlier one reaches (no vertex
        # is both: the merge is legal); every other vertex keeps its number.
        low, high = sorted((a, b), key=self.topo.__getitem__)
        behind = sorted(self._between(low, high, self.pred, False), key=self.topo.__getitem__)
        ahead = sorted(self._between(low, high, self.succ, True), key=self.topo.__getitem__)
        slots = sorted(self.topo[v] for v in (low, high, *behind, *ahead))
        for vertex, slot in zip((*behind, merged, *ahead), slots):
            self.topo[vertex] = slot
        for old in (a, b):
            del self.topo[old]
        self.succ[merged] = (self.succ.pop(a) | self.succ.pop(b)) - {a, b}
        self.pred[merged] = (self.pred.pop(a) | self.pred.pop(b)) - {a, b}
        for vertex in self.succ[merged]:
            self.pred[vertex] -= {a, b}
            self.pred[vertex].add(merged)
        for vertex in self.pred[merged]:
            self.succ[vertex] -= {a, b}
            self.succ[vertex].add(merged)
        for root in {r for n in merged for r in self.roots.get(n, ())}:
            self.readers[root] -= {a, b}
            self.readers[root].add(merged)
        return merged

    def new_candidates(self, merged: Group) -> set[tuple[Group, Group, str]]:
        """The candidates a merge can have made: the merged group's vertical pairs, and the
        horizontal pairs of every buffer it reads (a merge can make two other readers of a
        buffer neighbours)."""
        pairs: set[tuple[Group, Group, str]] = set()
        for node in merged:
            for consumer in self.consumers.get(node, ()):
                if self.group_of[consumer] != merged:
                    pairs.add((merged, self.group_of[consumer], "vertical"))
            for producer in self.producers.get(node, ()):
                if self.group_of[producer] != merged:
                    pairs.add((self.group_of[producer], merged, "vertical"))
        for root in {r for n in merged for r in self.roots.get(n, ())}:
            pairs.update(p for p in self.horizontal(root) if not self.vertical(p[0], p[1]))
        return pairs

    def key(self, pair: tuple[Group, Group, str]) -> tuple:
        """Best first: most bytes saved, then kind, then the pair that starts first, then
        both positions: never set order (object ids), so a graph fuses the same way on
        every run."""
        a, b, kind = pair
        self.work["fusion.pairs_scored"] += 1
        first_a, first_b = self.first(a), self.first(b)
        return (-self.saved(a, b), kind, min(first_a, first_b), first_a, first_b)


# Lowering probes, shared by every fusion run in the process (the recompute pass's trials,
# the partition's candidates, each repeated layer of a model): keyed by a group's
# structure (`_structure`), the error with its node names as placeholders (`_template`).
_PROBES: dict[tuple, tuple[str | None, bool]] = {}
MAX_PROBES = 100_000
_NAME = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)")


class _Shapes:
    """graph.node_skeleton of each node, and whether lowering folds it (a view), looked up
    once per node while its arguments stay the same objects."""

    def __init__(self) -> None:
        self.memo: dict[torch.fx.Node, tuple] = {}

    def __call__(self, node: torch.fx.Node) -> tuple[tuple, tuple[torch.fx.Node, ...], bool]:
        entry = self.memo.get(node)
        if entry is None or entry[3] is not node.args or entry[4] is not node.kwargs:
            skeleton, args = node_skeleton(node)
            folded = is_view(node) and node.target is not operator.getitem
            entry = (skeleton, args, folded, node.args, node.kwargs)
            self.memo[node] = entry
        return entry[0], entry[1], entry[2]


def _structure(
    members: list[torch.fx.Node], shapes: _Shapes, users: Callable
) -> tuple[tuple, list[torch.fx.Node]]:
    """What lowering a group depends on, with node identities replaced by positions: each
    member's op, arguments, metadata and whether the kernel stores it (`users`: a node's
    buffer users); each input's metadata (a view outside the group, with its own
    arguments: lowering folds it). And the nodes in the order their positions number them."""
    member_set = set(members)
    refs = {node: k for k, node in enumerate(members)}
    nodes = list(members)
    inputs: list[tuple] = []
    key = []
    for member in members:
        skeleton, args, _ = shapes(member)
        stored = any(u not in member_set for u in users(member))
        key.append((skeleton, tuple(_ref(a, refs, nodes, inputs, shapes) for a in args), stored))
    return (tuple(key), tuple(inputs)), nodes


def _ref(
    node: torch.fx.Node,
    refs: dict[torch.fx.Node, int],
    nodes: list[torch.fx.Node],
    inputs: list[tuple],
    shapes: _Shapes,
) -> int:
    """A node's position in a structure (`_structure`), numbering it and describing it as an
    input when it is new. A module function: a recursive closure would be a reference cycle
    per call, garbage only the cyclic collector frees."""
    position = refs.get(node)
    if position is None:
        position = refs[node] = len(nodes)
        nodes.append(node)
        skeleton, args, folded = shapes(node)
        if folded:
            viewed = tuple(_ref(a, refs, nodes, inputs, shapes) for a in args)
            inputs.append(("view", position, skeleton, viewed))
        else:
            inputs.append(("input", position, hashable_meta(node)))
    return position


# Lowered groups by structure (`_structure`), their nodes as positions: a group of a
# repeated layer, or one a probe lowered, is not lowered again when it is rewritten.
_LOWERINGS: dict[tuple, tuple] = {}


def _remember(key: tuple, nodes: list[torch.fx.Node], lowered: Lowered) -> None:
    position = {node: k for k, node in enumerate(nodes)}
    named = [*lowered.input_nodes, *lowered.output_nodes, *lowered.gather_sources]
    named += list(lowered.gathers_per_source)
    if len(_LOWERINGS) >= MAX_PROBES or any(n not in position for n in named):
        return
    _LOWERINGS[key] = (
        lowered.kernel,
        tuple(position[n] for n in lowered.input_nodes),
        tuple(position[n] for n in lowered.output_nodes),
        frozenset(position[n] for n in lowered.gather_sources),
        {position[n]: count for n, count in lowered.gathers_per_source.items()},
        lowered.flops,
    )


def _lowered(members: list[torch.fx.Node], name: str, state: _State) -> Lowered:
    """lower_group(members, name), from a group of the same structure when one was lowered."""
    # The graph is being rewritten: users are looked up now (earlier groups' members are
    # kernel calls already), not from the search's memo.
    key, nodes = _structure(members, state.shapes, buffer_users)
    known = _LOWERINGS.get(key)
    if known is None:
        lowered = lower_group(members, name)
        _remember(key, nodes, lowered)
        return lowered
    state.work["fusion.kernels_reused"] += 1
    kernel, inputs, outputs, gathers, per_gather, flops = known
    return Lowered(
        kernel=dataclasses.replace(kernel, name=name),
        input_nodes=[nodes[k] for k in inputs],
        output_nodes=[nodes[k] for k in outputs],
        gather_sources=frozenset(nodes[k] for k in gathers),
        gathers_per_source={nodes[k]: count for k, count in per_gather.items()},
        flops=flops,
    )


def _template(error: str | None, nodes: list[torch.fx.Node]) -> str | None:
    """The error with each node's name replaced by its position; None when it names a
    node the structure does not number (then it is not shared)."""
    if error is None:
        return None
    position = {node.name: k for k, node in enumerate(nodes)}
    if any(name not in position for name in _NAME.findall(error)):
        return None
    return _NAME.sub(lambda m: "%\x00" + str(position[m.group(1)]) + "\x00", error)


def _filled(template: str | None, nodes: list[torch.fx.Node]) -> str | None:
    if template is None:
        return None
    return re.sub("%\x00([0-9]+)\x00", lambda m: "%" + nodes[int(m.group(1))].name, template)


def _updates_an_input(node: torch.fx.Node) -> bool:
    """An update the inplace pass makes of a buffer that already holds values a kernel
    would have to read back: a graph input, or a library call's slice of a concatenation."""
    base = updated_in_place(node)
    return base is not None and (
        base.op == "placeholder" or getattr(base.target, "memopt_fresh", False)
    )


def _data_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users that need the node's data: not shape queries (lowering reads sizes as symbols)."""
    return [u for u in buffer_users(node) if u.target not in SHAPE_QUERIES]


def bias_add(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(mm, bias) when `node` adds a vector to the only use of an mm (possibly via views)."""
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
        return None
    for operand, bias in (node.args, reversed(node.args)):
        if not isinstance(operand, torch.fx.Node) or not isinstance(bias, torch.fx.Node):
            continue
        mm = operand
        while is_view(mm) and mm.target is not operator.getitem and len(mm.users) == 1:
            mm = mm.args[0]
        out, vector = tensor_meta(node), tensor_meta(bias)
        if mm.target is not aten.mm.default or len(mm.users) != 1 or vector is None:
            continue
        mm_meta = tensor_meta(mm)
        if (
            vector.dtype == mm_meta.dtype == out.dtype
            and len(vector.shape) == 1
            and vector.shape[0] == mm_meta.shape[1]
            and tensor_meta(operand).shape == out.shape
        ):
            return mm, bias
    return None


def _ordered_names(group: Group, order: dict[torch.fx.Node, int]) -> tuple[str, ...]:
    return tuple(n.name for n in sorted(group, key=order.__getitem__))


def _names(group: Group, order: dict[torch.fx.Node, int]) -> str:
    return ", ".join(f"%{n.name}" for n in sorted(group, key=order.__getitem__))


def _lone_conversion(group: Group, state: _State) -> bool:
    """A group of one layout-changing clone that lowers (a kernel of its own on the C++ backend)."""
    (node,) = group if len(group) == 1 else (None,)
    if node is None or node.target is not aten.clone.default:
        return False
    if node.kwargs.get("memory_format") in (None, torch.preserve_format):
        return False
    source = node.args[0] if isinstance(node.args[0], torch.fx.Node) else None
    before, after = tensor_meta(source) if source is not None else None, tensor_meta(node)
    if before is None or after is None or before.stride == after.stride:
        return False
    return state.lowering_error(group) is None


# Transcendental ops whose ATen CPU kernels a generated kernel's vector math beats
# (Feature.LONE_MATH): a lone one becomes a kernel of its own. Measured over 1M float32
# elements on an AMD EPYC (2 threads), the compiled op against ATen's: exp 138/320 us,
# expm1 157/393, log 136/404, log1p 143/250, log2 101/421, tanh 91/1104, sin 120/543,
# cos 117/592, erf 93/539. Not here: sigmoid (144/115) and exp2 (120/126), where ATen's
# kernel is as fast or faster.
_MATH_OPS = frozenset(
    {
        aten.exp.default,
        aten.expm1.default,
        aten.log.default,
        aten.log1p.default,
        aten.log2.default,
        aten.tanh.default,
        aten.sin.default,
        aten.cos.default,
        aten.erf.default,
    }
)


def _lone_math(group: Group, state: _State, ctx: PassContext) -> bool:
    """A group of one float32 transcendental op that lowers (Feature.LONE_MATH), recorded
    as a decision (it takes fuel)."""
    (node,) = group if len(group) == 1 else (None,)
    if node is None or node.target not in _MATH_OPS:
        return False
    meta = tensor_meta(node)
    if meta is None or meta.dtype != torch.float32 or state.lowering_error(group) is not None:
        return False
    what = f"kernel of its own for the lone %{node.name} ({op_name(node)})"
    reason = (
        "the backend's vector math beats ATen's CPU kernel for it (the same bytes: its input "
        "read once, its output written once)"
    )
    return ctx.decide("lone_math", what, reason, 0, (node.name,))


def _matmul_of(group: Group) -> torch.fx.Node | None:
    return next((n for n in group if n.target in TEMPLATE_MATMULS), None)


def _schedule(matmul: torch.fx.Node, ctx: PassContext, device: str) -> str:
    """How the backend running the template schedules it (tiles), at the example sizes."""
    describe = ctx.kernel_backend(device).describe_template
    if describe is None:
        return ""
    *_, m, n = tensor_meta(matmul).shape
    k = tensor_meta(matmul.args[0]).shape[-1]
    m, n, k = (evaluate(x, ctx.bindings) for x in (m, n, k))
    widths = {_exact_width(a) for a in matmul.args[:2]}
    return f"; {describe(m, n, k, None not in widths and len(widths) == 1)}"


_WIDENING = (torch.ops.prims.convert_element_type.default, aten._to_copy.default)


def _exact_width(node: object) -> torch.dtype | None:
    """The 16-bit float type that holds a matmul operand exactly (its own, or its source's
    when it is a cast to fp32 of a 16-bit tensor), as the template kernel decides it."""
    half = (torch.float16, torch.bfloat16)
    if not isinstance(node, torch.fx.Node):
        return None
    dtype = tensor_meta(node).dtype
    if dtype in half:
        return dtype
    source = node.args[0] if node.target in _WIDENING and node.args else None
    if dtype == torch.float32 and isinstance(source, torch.fx.Node):
        return tensor_meta(source).dtype if tensor_meta(source).dtype in half else None
    return None


def _side(matmul: torch.fx.Node, other: Group) -> str:
    """Whether a group joins a matmul as its prologue (feeds an operand) or epilogue."""
    operands = {_view_root(a) for a in matmul.all_input_nodes}
    return "prologue" if operands & other else "epilogue"


@register_pass(
    "fusion",
    codes=(
        "vertical",  # a producer and its consumer in one kernel
        "horizontal",  # two groups that read the same buffer in one kernel
        "refused_size",  # the group would be over max_nodes
        "refused_cycle",  # a path between the two leaves the group
        "refused_order",  # a member would read memory after a write it ran before
        "refused_lowering",  # the group cannot be one kernel (NotLowerable's reason)
        "refused_nested",  # nested reductions, where the backend runs none
        "refused_per_size",  # a concatenation growing an input along a size symbol
        "refused_template",  # a matmul's prologue/epilogue merge, where templates are off
        "bias_folded",  # a bias add that fused with nothing, back into the GEMM (addmm)
        "library_softmax",  # a kernel that is exactly one softmax, as ATen's _softmax
        "lone_math",  # a lone float32 transcendental op as a kernel of its own
    ),
)
@dataclass(frozen=True)
class Fusion(Pass):
    # Largest number of nodes in one kernel (long kernels spill registers on a GPU).
    max_nodes: int = field(default=64, metadata={"min": 1})
    # Matmul template kernels: "auto" where the backend that runs them has templates
    # (triton, reference), "on" always (elsewhere they fall back to the reference backend),
    # "off" never.
    matmul_templates: Literal["auto", "on", "off"] = "auto"

    def templates(self, gm: torch.fx.GraphModule, ctx: PassContext) -> tuple[bool, str]:
        """Whether to form matmul templates here, and why not when not."""
        if self.matmul_templates == "off":
            return False, "matmul templates are off (pass option matmul_templates='off')"
        if self.matmul_templates == "on":
            return True, ""
        device = graph_device(gm)
        if ctx.kernel_backend(device).supports(Feature.MATMUL_TEMPLATES):
            return True, ""
        return False, (
            f"backend {ctx.backend!r} on {device} runs no matmul templates "
            "(the matmul stays a library call)"
        )

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        templates, no_templates = self.templates(gm, ctx)
        state = _State(gm, ctx, templates)
        refused: dict[tuple[Group, Group], tuple[str, str, int, str]] = {}
        # The candidates in a heap, best first (State.key). A merge adds the pairs it makes;
        # pairs it ends are dropped when they come up (State.is_candidate). Each round
        # merges the best legal candidate: the same choices as scoring every pair anew.
        heap = [(state.key(p), p) for p in state.candidates()]
        heapq.heapify(heap)
        queued = {p for _, p in heap}
        while heap:
            (negative_saved, *_), pair = heapq.heappop(heap)
            queued.discard(pair)
            a, b, kind = pair
            if not state.is_candidate(a, b, kind):
                continue
            saved = -negative_saved
            if saved <= 0:
                break
            if (a, b) in refused:
                # Still refused: merging other groups only adds paths between nodes,
                # and the lowering and size limits depend on a | b alone.
                continue
            illegal = self._illegal(state, a, b)
            if illegal is not None:
                refused[(a, b)] = (*illegal, saved, kind)
                continue
            what = f"fused {_names(a, state.order)} + {_names(b, state.order)}"
            why = f"{kind}: {state.describe_saving(a, b)}"
            matmul = _matmul_of(a | b)
            if matmul is not None:
                side = _side(matmul, a if matmul in b else b)
                schedule = _schedule(matmul, ctx, graph_device(gm))
                why += f" (matmul template {side}{schedule})"
            if not ctx.decide(kind, what, why, saved, _ordered_names(a | b, state.order)):
                break
            merged = state.merge(a, b)
            for new in state.new_candidates(merged) - queued:
                heapq.heappush(heap, (state.key(new), new))
                queued.add(new)
        groups = state.groups()
        for (a, b), (code, reason, saved, kind) in sorted(
            refused.items(),
            key=lambda item: (-item[1][2], _names(item[0][0] | item[0][1], state.order)),
        ):
            if a in groups and b in groups:
                what = f"not fused ({kind}): {_names(a, state.order)} + {_names(b, state.order)}"
                ctx.refuse(code, what, reason, saved, _ordered_names(a | b, state.order))
        if not templates:
            self._refuse_templates(state, ctx, no_templates)
        self._fold_bias_adds(gm, ctx, state)
        self._rewrite(gm, ctx, state)

    def _refuse_templates(self, state: _State, ctx: PassContext, reason: str) -> None:
        """Record, for each matmul, the epilogue and prologue merges templates would make."""
        for matmul in state.nodes:
            if not can_lower_matmul(matmul):
                continue
            alone = frozenset([matmul])
            neighbours = [state.group_of[u] for u in buffer_users(matmul) if u in state.group_of]
            neighbours += [
                state.group_of[_view_root(a)]
                for a in matmul.all_input_nodes
                if _view_root(a) in state.group_of
            ]
            for group in dict.fromkeys(neighbours):
                saved = state.saved(alone, group)
                if saved > 0:
                    side = _side(matmul, group)
                    what = (
                        f"not fused (matmul {side}): %{matmul.name} + {_names(group, state.order)}"
                    )
                    names = _ordered_names(group | alone, state.order)
                    ctx.refuse("refused_template", what, reason, saved, names)

    def _fold_bias_adds(self, gm: torch.fx.GraphModule, ctx: PassContext, state: _State) -> None:
        """A bias add that fused with nothing goes back into the library matmul (addmm).

        The decomposition table splits addmm into mm + add so the add can fuse with what
        follows; when it did not, the GEMM's own epilogue adds the bias and the matmul's
        output is written once instead of written, read and written again.
        """
        for node in list(gm.graph.nodes):
            if node.target is not aten.add.Tensor or len(state.group_of.get(node, ())) != 1:
                continue
            match = bias_add(node)
            if match is None:
                continue
            mm, bias = match
            if len(state.group_of.get(mm, ())) > 1:
                continue  # the matmul is in a template kernel
            saved = 2 * evaluate(tensor_meta(mm).nbytes, ctx.bindings)
            what = f"folded bias add %{node.name} into %{mm.name} (addmm)"
            reason = "the add fused with nothing; the library GEMM adds the bias in its epilogue"
            if not ctx.decide("bias_folded", what, reason, saved, (node.name, mm.name)):
                return
            with gm.graph.inserting_before(mm):
                addmm = gm.graph.call_function(aten.addmm.default, (bias, *mm.args[:2]))
            addmm.meta.update(mm.meta)
            mm.replace_all_uses_with(addmm)
            gm.graph.erase_node(mm)
            source = next(a for a in node.args if a is not bias)
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            del state.group_of[node]

    def _illegal(self, state: _State, a: Group, b: Group) -> tuple[str, str] | None:
        """(code, reason) when a and b cannot be one kernel; None when they can."""
        if len(a) + len(b) > self.max_nodes:
            size = len(a) + len(b)
            return "refused_size", f"group would have {size} nodes, over max_nodes={self.max_nodes}"
        if state.grows:
            # Into a group of static sizes only: that kernel would take the size symbol and
            # its launch set up per size (a consumer of the grown value has it already).
            for grows, other in ((a, b), (b, a)):
                cat = next((n for n in grows if n in state.grows), None)
                if cat is not None and _static_group(other):
                    return "refused_per_size", state.grows[cat]
        if state.creates_cycle(a, b):
            return "refused_cycle", (
                "a path from one to the other leaves the group "
                "(through an extern op or another kernel)"
            )
        moved = state.read_moved_past_write(a | b)
        if moved is not None:
            return "refused_order", moved
        error = state.lowering_error(a | b)
        if error is not None:
            return "refused_lowering", error
        if state.no_nested is not None and a | b in state.nested:
            return "refused_nested", state.no_nested
        return None

    def _rewrite(self, gm: torch.fx.GraphModule, ctx: PassContext, state: _State) -> None:
        backend = ctx.kernel_backend(graph_device(gm))
        conversions = backend.supports(Feature.LAYOUT_CONVERSION)
        library_softmax = backend.supports(Feature.LIBRARY_SOFTMAX)
        lone_math = backend.supports(Feature.LONE_MATH)
        # In graph order before filtering: `_lone_math` takes decisions (and fuel), which
        # must come in the same order on every run, never in set order.
        groups = [
            g
            for g in sorted(state.groups(), key=state.first)
            if len(g) > 1
            or (conversions and _lone_conversion(g, state))
            or (lone_math and _lone_math(g, state, ctx))
        ]
        if not groups:
            return
        graph = gm.graph
        for number, group in enumerate(groups):
            members = sorted(group, key=state.order.__getitem__)
            if library_softmax and _library_softmax(graph, members, ctx):
                continue
            name = f"{ctx.graph_name.replace('.', '_')}_fused_{number}"
            lowered = _lowered(members, name, state)
            fused = FusedKernel(
                lowered,
                backend=ctx.backend,
                member_names=[m.name for m in members],
                member_ops=[op_name(m) for m in members],
                fake_outputs=[n.meta.get("val") for n in lowered.output_nodes],
            )
            with graph.inserting_after(members[-1]):
                call = graph.call_function(fused, tuple(lowered.input_nodes))
            call.meta["val"] = fused.fake_outputs
            call.meta[META_KEY] = meta_of_value(list(fused.fake_outputs))
            for k, output in enumerate(lowered.output_nodes):
                with graph.inserting_after(call):
                    item = graph.call_function(operator.getitem, (call, k))
                item.meta.update(
                    {"val": output.meta.get("val"), META_KEY: output.meta.get(META_KEY)}
                )
                output.replace_all_uses_with(
                    item, delete_user_cb=lambda user, group=group: user not in group
                )
            for member in reversed(members):
                _erase_with_dead_views(graph, member)
        for node in reversed(list(graph.nodes)):
            if is_view(node) and not node.users:
                graph.erase_node(node)  # views that only members read
        legalize(gm.graph)


def _library_softmax(graph: torch.fx.Graph, members: list[torch.fx.Node], ctx: PassContext) -> bool:
    """Replace a group that is exactly softmax's decomposition with ATen's `_softmax`
    (Feature.LIBRARY_SOFTMAX); False, changing nothing, for any other group."""
    match = _softmax_of(members)
    if match is None:
        return False
    source, dim = match
    out = members[-1]
    what = f"kept the softmax %{out.name} an ATen call (_softmax)"
    reason = (
        "the kernel would be exactly one softmax: ATen's vectorized softmax is faster on "
        "this backend's device and moves the same bytes"
    )
    if not ctx.decide("library_softmax", what, reason, 0, tuple(m.name for m in members)):
        return False
    with graph.inserting_after(out):
        call = graph.call_function(aten._softmax.default, (source, dim, False))
    call.meta.update({"val": out.meta.get("val"), META_KEY: out.meta.get(META_KEY)})
    out.replace_all_uses_with(call)
    for member in reversed(members):
        _erase_with_dead_views(graph, member)
    return True


def _softmax_of(members: list[torch.fx.Node]) -> tuple[torch.fx.Node, int] | None:
    """(x, dim) when the members are amax, sub, exp, sum, div computing softmax(x, dim) of
    a float32/float64 x, only the last read outside the group; else None."""
    targets = [aten.amax.default, aten.sub.Tensor, aten.exp.default]
    targets += [aten.sum.dim_IntList, aten.div.Tensor]
    if [m.target for m in members] != targets:
        return None
    amax, sub, exp, total, div = members
    if len(amax.args) < 3 or len(total.args) < 3 or amax.kwargs or total.kwargs:
        return None
    source, dims, keepdim = amax.args[:3]
    meta = tensor_meta(source) if isinstance(source, torch.fx.Node) else None
    if meta is None or meta.dtype not in (torch.float32, torch.float64) or not keepdim:
        return None
    if not (isinstance(dims, (list, tuple)) and len(dims) == 1):
        return None
    rank = len(meta.shape)
    dim = dims[0] % rank if rank else 0
    other = total.args[1]
    if not (
        isinstance(other, (list, tuple)) and len(other) == 1 and other[0] % max(rank, 1) == dim
    ):
        return None
    if not (
        total.args[2] is True
        and sub.args == (source, amax)
        and exp.args == (sub,)
        and total.args[0] is exp
        and div.args == (exp, total)
        and not (sub.kwargs or exp.kwargs or div.kwargs)
    ):
        return None
    inside = set(members)
    if any(set(buffer_users(m)) - inside for m in members[:-1]):
        return None  # an intermediate is read outside the group
    return source, dim


def _erase_with_dead_views(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Erase a fused member; views of it that only other (erased) members read go first."""
    for user in list(node.users):
        if is_view(user):
            _erase_with_dead_views(graph, user)
    graph.erase_node(node)
