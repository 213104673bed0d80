"""recompute: compute a cheap value again where it is needed instead of storing it.

Two decisions, both by bytes:

1. Forward/backward partition (training; the partition stage). Which tensors the forward
   saves for the backward is decided before the graphs exist, when AOTAutograd splits the
   joint graph: passes/partition.py takes a bytes min-cut and costs it against PyTorch's
   default and min-cut partitions through this pipeline; this pass keeps the cheapest that
   honours the options. Its decisions open the forward graph's ledger: the partition chosen
   (applied, with the bytes it saves against the default partition; it takes fuel), the
   alternatives (refused, with what they would cost), every saved activation and why it is
   saved. The record of every candidate stays on the forward graph (`PartitionRecord`).

2. Producer duplication (every graph). A pointwise producer that feeds several kernels is
   written once and read by each. Copying it into each consumer instead lets fusion
   compute it inside every consumer's kernel: no write, no reads of it, but each copy reads
   the producer's inputs. A copy is made when the fusion pass's model says the graph then
   moves fewer bytes (the graph after fusion is costed with and without it); refused
   duplications are recorded with the bytes they would have added. Producers run
   consumers-first, so a pointwise chain feeding several kernels is copied whole.

   A producer is first tried with the whole pointwise chain it is computed from
   (`duplicated_chain`), back to the values a kernel must read (graph inputs, reductions,
   extern results), when its consumers reading the chain's inputs would read fewer bytes
   than one of them writing the value and the others reading it: the chain's inputs are
   smaller than the value. The extreme is a broadcast product (an outer product `a * b` of
   an (N, 1) and a (1, N) tensor, and what is computed from it): in its backward, two
   reductions over different axes each recompute the N x N values from the vectors
   instead of one of them writing them for the other. Copied alone, such a producer still
   shares the rest of the chain, which is then written instead: only the whole chain
   removes the N x N store. The same fusion trial decides.

Options (`pass_options={"recompute": {...}}`): `max_saved_bytes` (a budget on saved
activation bytes), `must_recompute` / `never_recompute` (node names, e.g. "mul_3", or ops,
e.g. "aten.sin"), `recompute_matmul`, `recompute_conv`, `recompute_random` (off by default:
such ops are saved), `duplicate` (producer duplication; on by default).
Disabling the pass means PyTorch's default partition (nothing recomputed), no duplication.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx._lazy_graph_module import _use_lazy_graph_module

from memopt.compiler.aten_ops import is_pointwise, is_random
from memopt.compiler.cost import graph_cost, is_view, read_bytes
from memopt.compiler.graph import (
    copy_graph,
    evaluate,
    hashable_meta,
    node_skeleton,
    tensor_meta,
)
from memopt.compiler.lower import can_lower
from memopt.passes import partition
from memopt.passes.base import Pass, PassContext, Pipeline, Stage
from memopt.passes.partition import PartitionRecord
from memopt.passes.registry import register_pass

# Fusion trials per graph: each costs one fusion run on a copy of the graph.
MAX_DUPLICATION_TRIALS = 16


@register_pass(
    "recompute",
    stages=(Stage.PARTITION, Stage.ATEN),
    codes=(
        "partition",  # a partition that recomputes, chosen over PyTorch's default
        "partition_kept",  # PyTorch's default partition kept
        "partition_other",  # another candidate partition, not chosen (its figures)
        "saved",  # a tensor the chosen partition saves for the backward, and why
        "partition_note",  # what the partitioner could not do (an unreachable budget, ...)
        "duplicated",  # a producer copied into each consumer's kernel
        "not_duplicated",  # ... refused, with what it would cost
        "duplicated_chain",  # a producer copied with the pointwise chain it comes from
        "not_duplicated_chain",  # ... refused, with what it would cost
    ),
)
@dataclass(frozen=True)
class Recompute(Pass):
    # Most bytes of activations (not graph inputs) the forward may save; None: no budget.
    max_saved_bytes: int | None = field(default=None, metadata={"min": 0})
    # Forward nodes (fx names or ops) the backward must compute again / must never.
    must_recompute: tuple[str, ...] = ()
    never_recompute: tuple[str, ...] = ()
    recompute_matmul: bool = False
    recompute_conv: bool = False
    # A recomputed random op replays the forward's generator state (saved for it).
    recompute_random: bool = False
    # Copy cheap pointwise producers into each consumer kernel when that moves fewer bytes.
    duplicate: bool = True

    def partition(
        self,
        joint: torch.fx.GraphModule,
        joint_inputs: Sequence[object],
        ctx: PassContext,
        cost: Callable[[torch.fx.GraphModule, Pipeline, str], int],
        **kwargs: object,
    ) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
        """The partition stage: the candidate that moves the fewest bytes after the
        pipeline (costed without producer duplication: it is costed by fusion runs of its
        own, and only ever lowers the bytes of the partition chosen)."""
        if ctx.record.fuel.exhausted:
            ctx.refuse(
                "partition_kept",
                "kept PyTorch's default partition",
                f"out of fuel ({ctx.record.fuel.limit}): no partition is costed",
                0,
            )
            return partition.default(joint, joint_inputs, **kwargs)
        probe = ctx.pipeline.with_options(self.name, duplicate=False)

        def probe_cost(gm: torch.fx.GraphModule, name: str) -> int:
            ctx.record.work["partition.graphs_costed"] += 1
            return cost(gm, probe, name)

        record, modules = partition.candidates(joint, joint_inputs, self, probe_cost, **kwargs)
        if not self._record_partition(record, ctx):
            record.chosen = partition.DEFAULT
        forward, backward = modules[record.chosen]
        forward.meta[partition.META_KEY] = record
        return forward, backward

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        if self.duplicate and ctx.pipeline.runs("fusion"):
            self._duplicate_producers(gm, ctx)

    # -- 1. the partition, into the ledger -------------------------------------------------

    def _record_partition(self, record: PartitionRecord, ctx: PassContext) -> bool:
        """Decide the partition chosen (it takes fuel) and record the alternatives and every
        saved activation; False when no fuel was left for the choice (the default stays)."""
        chosen, default = record.choice, record.candidates[partition.DEFAULT]
        applied = True
        if chosen.label != partition.DEFAULT:
            reason = (
                f"moves {chosen.bytes_moved} B against {default.bytes_moved} B with PyTorch's "
                f"default partition (modelled, forward + backward after the pipeline); "
                f"saved activations: modelled peak {chosen.saved_activation_bytes} B"
            )
            applied = ctx.decide(
                "partition",
                f"partition by {chosen.label}: {_summary(chosen)}",
                reason,
                default.bytes_moved - chosen.bytes_moved,
                tuple(r.split(":")[0] for r in chosen.recomputed),
            )
            if not applied:
                chosen = default
        else:
            ctx.refuse(
                "partition_kept",
                f"kept PyTorch's default partition: {_summary(chosen)}",
                "no partition that recomputes moves fewer bytes; saved activations: "
                f"modelled peak {chosen.saved_activation_bytes} B",
                0,
            )
        for label, other in record.candidates.items():
            if label == chosen.label:
                continue
            why = other.honours_options or "moves more bytes"
            if other.honours_options is None and other.bytes_moved == chosen.bytes_moved:
                why = "moves as many bytes"
            what = (
                f"partition by {label}: saves {other.saved_activation_bytes} B of activations, "
                f"recomputes {len(other.recomputed)} ops, moves {other.bytes_moved} B"
            )
            recomputed = tuple(r.split(":")[0] for r in other.recomputed)
            ctx.refuse(
                "partition_other", what, why, chosen.bytes_moved - other.bytes_moved, recomputed
            )
        for tensor in chosen.saved:
            if not tensor.is_input:
                what = f"saved %{tensor.name} for the backward ({tensor.nbytes} B)"
                ctx.refuse("saved", what, tensor.reason, -tensor.nbytes, (tensor.name,))
        for note in record.notes:
            ctx.refuse("partition_note", "partition note", note, 0)
        return applied

    # -- 2. producer duplication -----------------------------------------------------------

    def _duplicate_producers(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        candidates = [n for n in reversed(gm.graph.nodes) if _duplicable(n)]
        if not candidates:
            return
        # The graph after fusion, costed when a candidate first needs it (None: not yet).
        kernel_of: dict[str, int] | None = None  # each node's kernel after fusion, if costed
        positions = _positions(gm)
        trials = 0
        # Trial outcomes by the structure around what was copied: a repeated layer's
        # producer gets the decision its first copy's trial made (`_neighbourhood`).
        tried: dict[tuple, tuple[str, int, str]] = {}
        for node in candidates:
            consumers = _consumers(node)
            if len(consumers) < 2:
                continue  # an earlier duplication took its other consumers
            # Two ways to copy it, tried in this order: with the whole pointwise chain it is
            # computed from (each consumer recomputes it from the chain's inputs), worth it
            # when those inputs are smaller than the value (a broadcast product: far
            # smaller); and alone (each consumer reads its inputs).
            plans = []
            chain = _chain(positions, node, ctx.pipeline.instance("fusion").max_nodes)
            if len(chain) > 1:
                plans.append(("chain", chain, _chain_gain(chain, consumers, ctx)))
            plans.append(("alone", [node], _local_gain(node, consumers, ctx)))
            what = f"duplicate %{node.name} ({node.target}) into {len(consumers)} consumers"
            if all(gain <= 0 for _, _, gain in plans):
                local = max(gain for _, _, gain in plans)
                why = f"each copy reads its inputs: {-local} B more than storing it once"
                ctx.refuse("not_duplicated", what, why, local, (node.name,))
                continue
            if kernel_of is None:
                kernel_of = _fused(gm, ctx)[1]
            kernels = {kernel_of.get(u.name) for u in [node, *_kernel_users(consumers)]}
            if len(kernels) == 1 and None not in kernels:
                why = "fusion computes it in one kernel with all its consumers"
                ctx.refuse("not_duplicated", what, why, 0, (node.name,))
                continue
            for kind, copied, local in plans:
                if local <= 0:
                    continue
                plan_what = what if kind == "alone" else _chain_what(node, chain, consumers)
                code = "duplicated" if kind == "alone" else "duplicated_chain"
                refusal = "not_duplicated" if kind == "alone" else "not_duplicated_chain"
                names = tuple(n.name for n in copied)
                shape = (kind, _neighbourhood(positions, copied))
                if shape in tried:
                    first, saved, why = tried[shape]
                    ctx.record.work["recompute.trials_reused"] += 1
                    why = f"as for %{first}, whose surroundings have the same structure: {why}"
                    if saved <= 0:
                        ctx.refuse(refusal, plan_what, why, saved, names)
                        continue
                    if not _apply(gm, ctx, (code, plan_what, why, saved), names, consumers):
                        return
                    kernel_of, positions = None, _positions(gm)
                    break
                if trials == MAX_DUPLICATION_TRIALS:
                    why = f"not costed: over {MAX_DUPLICATION_TRIALS} fusion trials per graph"
                    ctx.refuse(refusal, plan_what, why, local, names)
                    continue
                trials += 1
                ctx.record.work["recompute.trials"] += 1
                # Costed on the region around the copies: the rest of the graph fuses
                # the same way with or without them.
                centre = [*copied, *consumers]
                baseline = _fused(_region(gm, centre, positions), ctx, copy=False)[0]
                region = _region(gm, centre, positions)
                _duplicate_all(region, list(names))
                saved = baseline - _fused(region, ctx, copy=False)[0]
                if saved <= 0:
                    why = (
                        f"after fusion the graph would move {-saved} B more"
                        if saved < 0
                        else "after fusion the graph moves the same bytes (fusion already "
                        "shares it)"
                    )
                    tried[shape] = (node.name, saved, why)
                    ctx.refuse(refusal, plan_what, why, saved, names)
                    continue
                reason = f"each consumer's kernel computes it: saves {saved} B after fusion"
                if kind == "chain":
                    reason += (
                        f"; each recomputes it from {_leaf_bytes(chain, ctx)} B of inputs "
                        f"instead of one writing its {_nbytes(node, ctx)} B for the others"
                    )
                tried[shape] = (node.name, saved, reason)
                if not _apply(gm, ctx, (code, plan_what, reason, saved), names, consumers):
                    return
                kernel_of, positions = None, _positions(gm)
                break


def _apply(
    gm: torch.fx.GraphModule,
    ctx: PassContext,
    decision: tuple[str, str, str, int],
    names: tuple[str, ...],
    consumers: list[torch.fx.Node],
) -> bool:
    """Take the duplication decision (code, what, why, bytes saved) and make the copies;
    False when no fuel was left."""
    code, what, why, saved = decision
    copies = tuple(u.name for u in consumers)
    if not ctx.decide(code, what, why, saved, (*names, *copies)):
        return False
    _duplicate_all(gm, list(names))
    return True


def _summary(candidate: partition.Candidate) -> str:
    return (
        f"saves {len(candidate.saved)} tensors ({candidate.saved_activation_bytes} B of "
        f"activations, {candidate.saved_bytes} B in all), recomputes "
        f"{len(candidate.recomputed)} ops in the backward"
    )


def _duplicable(node: torch.fx.Node) -> bool:
    """A pointwise op a generated kernel can compute (not random: a copy would redraw)."""
    return (
        node.op == "call_function"
        and is_pointwise(node)
        and not is_random(node)
        and tensor_meta(node) is not None
        and can_lower(node)
    )


def _fusible_consumer(user: torch.fx.Node) -> bool:
    if is_view(user):
        return any(_fusible_consumer(u) for u in user.users)
    return can_lower(user)


def _consumers(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Direct users that could compute a copy inside their kernel (a view counts as one)."""
    return [u for u in node.users if u.op != "output" and _fusible_consumer(u)]


def _keeps_original(node: torch.fx.Node) -> bool:
    """The producer stays materialized: a graph output or an extern op reads it."""
    return any(u.op == "output" or not _fusible_consumer(u) for u in node.users)


def _local_gain(node: torch.fx.Node, consumers: list[torch.fx.Node], ctx: PassContext) -> int:
    """Bytes duplication saves if every copy fuses into its consumer (an upper bound)."""
    meta = tensor_meta(node)
    nbytes = evaluate(meta.nbytes, ctx.bindings)
    inputs = [a for a in node.all_input_nodes if tensor_meta(a) is not None]
    input_bytes = evaluate(read_bytes(node, inputs), ctx.bindings)
    gain = len(consumers) * nbytes  # no consumer reads the stored value
    if not _keeps_original(node):
        gain += nbytes + input_bytes  # the producer's own kernel is gone
    for user in consumers:
        own = set(user.all_input_nodes)
        extra = [a for a in inputs if a not in own]
        gain -= evaluate(read_bytes(node, extra), ctx.bindings)
    return gain


def _duplicate(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """Give every fusible consumer its own copy (the first keeps the original if it can)."""
    consumers = _consumers(node)
    start = 0 if _keeps_original(node) else 1
    for user in consumers[start:]:
        with gm.graph.inserting_before(user):
            clone = gm.graph.node_copy(node)
        user.replace_input_with(node, clone)


def _duplicate_all(gm: torch.fx.GraphModule, names: list[str]) -> None:
    """Duplicate the named nodes, consumers first: a producer's copies then go to every copy
    of its consumers too, so each consumer's kernel gets a whole chain of its own."""
    for name in names:
        node = _by_name(gm, name)
        if len(_consumers(node)) >= 2:
            _duplicate(gm, node)


def _recomputable(node: torch.fx.Node) -> bool:
    """A value a consumer's kernel can compute from the inputs of its producers: a
    duplicable op, or a view of one."""
    if _duplicable(node):
        return True
    source = node.args[0] if is_view(node) and node.args else None
    return isinstance(source, torch.fx.Node) and _recomputable(source)


def _chain(
    positions: dict[torch.fx.Node, int], node: torch.fx.Node, limit: int
) -> list[torch.fx.Node]:
    """The node and the pointwise values it is computed from, up to the values a kernel must
    read (graph inputs, reductions, extern results, random ops); consumers first. Only the
    node, when the chain has more than `limit` nodes: fusion puts no more in one kernel
    (and a residual stream's chain of adds would run back through every layer)."""
    chain = {node}
    work = [node]
    while work:
        for arg in work.pop().all_input_nodes:
            if arg not in chain and _recomputable(arg):
                chain.add(arg)
                work.append(arg)
                if len(chain) > limit:
                    return [node]
    return sorted(chain, key=positions.__getitem__, reverse=True)


def _leaves(chain: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """The tensors a chain reads from outside it."""
    members = set(chain)
    found: list[torch.fx.Node] = []
    for member in chain:
        for arg in member.all_input_nodes:
            if arg not in members and arg not in found and tensor_meta(arg) is not None:
                found.append(arg)
    return found


def _nbytes(node: torch.fx.Node, ctx: PassContext) -> int:
    return evaluate(tensor_meta(node).nbytes, ctx.bindings)


def _leaf_bytes(chain: list[torch.fx.Node], ctx: PassContext) -> int:
    return evaluate(read_bytes(chain[0], _leaves(chain)), ctx.bindings)


def _chain_gain(
    chain: list[torch.fx.Node], consumers: list[torch.fx.Node], ctx: PassContext
) -> int:
    """Bytes copying the whole chain into every consumer saves, if every copy fuses into
    its consumer. Stored, the chain reads its inputs once, fused with one consumer, and
    writes the value the other consumers read; copied, every consumer reads the chain's
    inputs (those it does not read already). Positive when the inputs are much smaller than
    the value: a broadcast product of vectors, a value computed from a few rows."""
    node = chain[0]
    nbytes = _nbytes(node, ctx)
    leaves = _leaves(chain)
    leaf_bytes = _leaf_bytes(chain, ctx)
    gain = len(consumers) * nbytes + leaf_bytes
    if _keeps_original(node):
        gain -= nbytes + leaf_bytes  # the chain's own kernel stays, for its other readers
    for user in consumers:
        own = set(user.all_input_nodes)
        extra = [a for a in leaves if a not in own]
        gain -= evaluate(read_bytes(node, extra), ctx.bindings)
    return gain


def _chain_what(
    node: torch.fx.Node, chain: list[torch.fx.Node], consumers: list[torch.fx.Node]
) -> str:
    members = ", ".join(f"%{n.name}" for n in reversed(chain))
    return (
        f"duplicate %{node.name} ({node.target}) with the chain it is computed from "
        f"({members}) into {len(consumers)} consumers"
    )


# How far around the copied nodes two duplication trials must look alike to share an
# outcome: the producers and consumers fusion would weigh against a copy.
NEIGHBOURHOOD_STEPS = 3


def _neighbourhood(positions: dict[torch.fx.Node, int], copied: list[torch.fx.Node]) -> tuple:
    """The structure of the graph within NEIGHBOURHOOD_STEPS edges (either way) of the
    copied nodes, without node names: each node's op, metadata, which of the others its
    arguments are, how many users it has and whether it is copied. A repeated layer's
    producer has the same one as the first layer's."""
    around = _within(copied, NEIGHBOURHOOD_STEPS, lambda node: True)
    ordered = sorted(around, key=positions.__getitem__)
    refs = {node: k for k, node in enumerate(ordered)}
    copied_set = set(copied)

    def shape(node: torch.fx.Node) -> tuple:
        if node.op != "call_function":  # an input: its metadata, not its name
            return (node.op, hashable_meta(node), len(node.users), node in copied_set)
        skeleton, args = node_skeleton(node)
        reads = tuple(refs[a] if a in refs else ("outside", hashable_meta(a)) for a in args)
        return (skeleton, reads, len(node.users), node in copied_set)

    return tuple(shape(node) for node in ordered)


# How far around the copied nodes and their consumers a duplication trial runs fusion.
TRIAL_RADIUS = 12


def _region(
    gm: torch.fx.GraphModule, centre: list[torch.fx.Node], positions: dict[torch.fx.Node, int]
) -> torch.fx.GraphModule:
    """A copy of the graph within TRIAL_RADIUS edges (either way) of `centre`: what it reads
    from outside becomes inputs (with their metadata), what is read outside it becomes
    outputs. Fusion far from the centre decides the same with or without a duplication, so
    a trial on the region sees the difference a trial on the graph sees, in a time that does
    not grow with the graph. A region of most of the graph is the graph (a copy)."""
    around = _within(centre, TRIAL_RADIUS, lambda n: n.op not in ("placeholder", "output"))
    if 2 * len(around) >= len(positions):
        return copy_graph(gm)
    members = sorted(around, key=positions.__getitem__)
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in members:  # inputs first: fx wants its placeholders ahead of the nodes
        for arg in node.all_input_nodes:
            if arg not in around and arg not in env:
                env[arg] = graph.placeholder(arg.name)
                env[arg].meta = dict(arg.meta)
    for node in members:
        env[node] = graph.node_copy(node, env.__getitem__)
    read_outside = [n for n in members if any(u not in around for u in n.users)]
    graph.output(tuple(env[n] for n in read_outside))
    with unset_fake_temporarily(), _use_lazy_graph_module(True):
        return torch.fx.GraphModule(gm, graph)


def _within(
    start: list[torch.fx.Node], steps: int, admit: Callable[[torch.fx.Node], bool]
) -> set[torch.fx.Node]:
    """The nodes at most `steps` edges (inputs or users) from `start`, among those `admit`
    lets in (and through)."""
    around = set(start)
    frontier = list(start)
    for _ in range(steps):
        step = []
        for node in frontier:
            for other in (*node.all_input_nodes, *node.users):
                if other not in around and admit(other):
                    around.add(other)
                    step.append(other)
        frontier = step
    return around


def _positions(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, int]:
    return {n: k for k, n in enumerate(gm.graph.nodes)}


def _by_name(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def _kernel_users(consumers: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """The consumers, with views replaced by the kernels that read through them."""
    found = []
    for user in consumers:
        found.extend(_kernel_users(list(user.users)) if is_view(user) else [user])
    return found


def _fused(
    gm: torch.fx.GraphModule, ctx: PassContext, copy: bool = True
) -> tuple[int, dict[str, int]]:
    """Modelled bytes of the graph after the fusion pass (on a copy, unless `copy` is False:
    a throwaway region), and the kernel (an index) each fused node ends up in."""
    # Estimator graphs never run: their Python code is generated only if something calls
    # them (lazy recompilation).
    with _use_lazy_graph_module(True):
        trial = copy_graph(gm) if copy else gm
        fusion = ctx.pipeline.instance("fusion")  # a sibling pass, used as an estimator
        fusion.run(trial, ctx.scratch(fusion))
    kernel_of = {}
    for index, node in enumerate(trial.graph.nodes):
        for name in getattr(node.target, "memopt_nodes", ()):
            kernel_of[name] = index
    return graph_cost(trial, ctx.bindings).nbytes, kernel_of
