"""Forward/backward partitioning by bytes: which tensors the forward saves for the backward.

AOTAutograd traces one joint graph (forward and backward together) and asks a partitioner
which forward values to hand to the backward. Every saved tensor is written by the forward
(unless it is written anyway) and read again by the backward; a value that is not saved is
recomputed in the backward from values that are. The recompute pass decides that by bytes,
at the partition stage, from the candidates this module makes (`candidates`):

1. A minimum s-t cut over the joint graph (networkx), as PyTorch's min-cut partitioner
   builds it (each node split into `in -> out`), but with capacities that are the bytes
   the choice moves at the example sizes:
   - saving a node costs reading it in the backward, plus writing it in the forward
     unless the forward writes it anyway (a graph input or output, an extern op's result,
     a value an extern op reads);
   - recomputing a pointwise chain costs reading the saved values it starts from: the
     chain fuses into the backward kernel that consumes it, so its outputs are never
     written (those reads are the capacities of the saved nodes the cut goes through);
   - recomputing a node the backward must materialize (an extern op's result, or a value
     an extern op of the backward reads) costs writing and reading it again there; a view
     (the alias through which tanh's and sigmoid's backwards read their output) is
     recomputed for free;
   - matmuls, convolutions and random ops are never recomputed unless allowed;
     `never_recompute` nodes are saved, `must_recompute` nodes recomputed;
   - a budget on saved activation bytes is met by adding `lam * bytes` to every saved
     activation and searching the smallest `lam` whose cut fits (parametric min-cut).
2. The cut, PyTorch's default partition (save, never recompute) and PyTorch's min-cut
   partition are then each run through the configured pass pipeline and costed, and the
   one that moves the fewest bytes, among those that honour the options, is chosen. The
   cut's model is exact only when every recomputed chain fuses into one backward kernel;
   costing the optimized graphs makes the choice exact where the model is not.

The record of every candidate's figures is stored on the forward graph module
(`gm.meta["memopt_partition"]`, a PartitionRecord), where reports read the saved
activations. If the cut fails on a graph, it is left out, with a warning.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import networkx as nx
import sympy
import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._functorch.compile_utils import raise_getitems
from torch._functorch.partitioners import (
    _extract_fwd_bwd_modules,
    classify_nodes,
    default_partition,
    functionalize_rng_ops,
    is_not_collective,
    min_cut_rematerialization_partition,
    reordering_to_mimic_autograd_engine,
)
from torch.fx.experimental.proxy_tensor import is_sym_node

from memopt.compiler.aten_ops import CONVOLUTIONS, EXTERN_OPS, MATMULS, is_random
from memopt.compiler.capture import COUNTED_SAVED_BYTES_KEY
from memopt.compiler.cost import buffer_users, is_view, view_base
from memopt.compiler.graph import (
    annotate,
    copy_graph,
    evaluate,
    output_metas,
    shape_bindings,
    to_sympy,
)
from memopt.compiler.lower import can_lower

if TYPE_CHECKING:
    from memopt.passes.recompute import Recompute

aten = torch.ops.aten

META_KEY = "memopt_partition"

DEFAULT = "torch default"  # PyTorch's default_partition: saves, never recomputes
TORCH_MIN_CUT = "torch min-cut"  # PyTorch's min_cut_rematerialization_partition
MEMOPT = "memopt min-cut"  # this module's bytes min-cut


@dataclass(frozen=True)
class SavedTensor:
    name: str
    nbytes: int
    is_input: bool  # a graph input (or a view of one): saving it costs no memory
    reason: str  # why it is saved rather than recomputed
    storage: str = ""  # the node owning its buffer (itself, unless it is a view)
    storage_nbytes: int = 0


@dataclass(frozen=True)
class Candidate:
    """One partition of the joint graph and what it costs after the pass pipeline."""

    label: str
    saved: tuple[SavedTensor, ...]
    recomputed: tuple[str, ...]  # forward nodes the backward computes again (name: op)
    forward_bytes: int  # modelled, after the pipeline
    backward_bytes: int
    honours_options: str | None = None  # None, or why the options rule it out

    @property
    def bytes_moved(self) -> int:
        return self.forward_bytes + self.backward_bytes

    @property
    def saved_activation_bytes(self) -> int:
        """Memory the saved activations hold: each distinct buffer once (not inputs)."""
        buffers = {
            s.storage or s.name: s.storage_nbytes or s.nbytes for s in self.saved if not s.is_input
        }
        return sum(buffers.values())

    @property
    def saved_bytes(self) -> int:
        return sum(s.nbytes for s in self.saved)


@dataclass
class PartitionRecord:
    """What the partitioner chose for one joint graph, and the alternatives' figures."""

    chosen: str
    candidates: dict[str, Candidate]
    notes: list[str] = field(default_factory=list)
    budget: int | None = None

    @property
    def choice(self) -> Candidate:
        return self.candidates[self.chosen]

    @property
    def modelled_peak_bytes(self) -> int:
        """Saved activations are all alive between the forward and the backward: their sum."""
        return self.choice.saved_activation_bytes


def saved_activation_bytes(analysis: object) -> dict[str, int]:
    """Saved-activation bytes per partitioner, summed over an analysis's forward graphs.

    Keys: the candidate labels measured (DEFAULT always; TORCH_MIN_CUT and MEMOPT when the
    recompute pass ran), "chosen" (modelled) and "counted" (from the capture run, when known).
    """
    totals: dict[str, int] = {}
    for graph in getattr(analysis, "graphs", ()):
        record = getattr(graph.gm, "meta", {}).get(META_KEY)
        if record is None:
            continue
        for label, candidate in record.candidates.items():
            totals[label] = totals.get(label, 0) + candidate.saved_activation_bytes
        totals["chosen"] = totals.get("chosen", 0) + record.modelled_peak_bytes
        counted = graph.gm.meta.get(COUNTED_SAVED_BYTES_KEY)
        if counted is not None:
            totals["counted"] = totals.get("counted", 0) + counted
    return totals


# --- the partition_fn ---------------------------------------------------------------------


def default(
    joint_module: torch.fx.GraphModule,
    joint_inputs: Sequence[object],
    *,
    num_fwd_outputs: int,
    **kwargs: object,
) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """PyTorch's default partition (save, never recompute), with a record of what it saves
    on the forward graph (for the saved-activation figures of reports)."""
    fw, bw = default_partition(
        copy_graph(joint_module), joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs
    )
    bindings = _bindings(joint_inputs)
    saved = _saved_tensors(fw, num_fwd_outputs, bindings, {}, DEFAULT)
    fw.meta[META_KEY] = PartitionRecord(DEFAULT, {DEFAULT: Candidate(DEFAULT, saved, (), 0, 0)})
    return fw, bw


# What a candidate partition costs: the forward or backward graph, named, after the
# pipeline (modelled bytes at the example sizes). It must leave the graph as it is (the
# candidate may be chosen): it optimizes a copy.
GraphCost = Callable[[torch.fx.GraphModule, str], int]

Modules = tuple[torch.fx.GraphModule, torch.fx.GraphModule]


def candidates(
    joint_module: torch.fx.GraphModule,
    joint_inputs: Sequence[object],
    options: Recompute,
    cost: GraphCost,
    *,
    num_fwd_outputs: int,
    **kwargs: object,
) -> tuple[PartitionRecord, dict[str, Modules]]:
    """Every candidate partition, costed through the pipeline (`cost`), and the record of
    them with the cheapest one that honours the options chosen (see the module doc)."""
    bindings = _bindings(joint_inputs)
    joint_names = _forward_region(joint_module, num_fwd_outputs)
    joint_nodes = {n.name: n for n in joint_module.graph.nodes}
    fw, bw = default_partition(
        copy_graph(joint_module), joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs
    )
    record = PartitionRecord(chosen=DEFAULT, candidates={}, budget=options.max_saved_bytes)
    modules: dict[str, Modules] = {DEFAULT: (fw, bw)}
    reasons: dict[str, dict[str, str]] = {DEFAULT: {}}
    try:
        cut = _BytesMinCut(copy_graph(joint_module), num_fwd_outputs, bindings, options)
        modules[MEMOPT] = cut.partition()
        reasons[MEMOPT] = cut.save_reasons
        record.notes.extend(cut.notes)
    except Exception as error:  # noqa: BLE001 - never a wrong answer: default partition
        message = f"the bytes min-cut failed ({type(error).__name__}: {error})"
        warnings.warn(f"memopt: {message}; using PyTorch's default partitioner", stacklevel=2)
        record.notes.append(message)
    try:
        modules[TORCH_MIN_CUT] = min_cut_rematerialization_partition(
            copy_graph(joint_module), joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs
        )
        reasons[TORCH_MIN_CUT] = {}
    except Exception as error:  # noqa: BLE001 - only a comparison figure is lost
        record.notes.append(f"PyTorch's min-cut partitioner failed: {type(error).__name__}")

    costed: dict[tuple[str, ...], tuple[int, int]] = {}
    for label, (fw_c, bw_c) in modules.items():
        saved = _saved_tensors(fw_c, num_fwd_outputs, bindings, reasons.get(label, {}), label)
        recomputed = _recomputed(bw_c, joint_names)
        key = tuple(s.name for s in saved) + ("|",) + recomputed
        if key not in costed:
            costed[key] = (cost(fw_c, "forward"), cost(bw_c, "backward"))
        forward_bytes, backward_bytes = costed[key]
        candidate = Candidate(label, saved, recomputed, forward_bytes, backward_bytes)
        why_not = _violates(candidate, bw_c, joint_names, options, joint_nodes)
        record.candidates[label] = Candidate(
            label, saved, recomputed, forward_bytes, backward_bytes, why_not
        )
    allowed = [c for c in record.candidates.values() if c.honours_options is None]
    if not allowed:
        allowed = [record.candidates[MEMOPT if MEMOPT in record.candidates else DEFAULT]]
    # Fewest bytes; on a tie the bytes min-cut, then the default (fewer recomputed ops).
    preference = {MEMOPT: 0, DEFAULT: 1, TORCH_MIN_CUT: 2}
    best = min(allowed, key=lambda c: (c.bytes_moved, preference[c.label]))
    record.chosen = best.label
    return record, modules


def _bindings(joint_inputs: Sequence[object]) -> dict[sympy.Symbol, int]:
    return shape_bindings(pytree.tree_leaves(list(joint_inputs)))


def _forward_region(joint_module: torch.fx.GraphModule, num_fwd_outputs: int) -> set[str]:
    """Names of the joint nodes the forward outputs need: a backward that computes one of
    them recomputes it."""
    info = classify_nodes(joint_module, [], num_fwd_outputs)
    return {n.name for n in info.required_fw_nodes if n.op == "call_function"}


def _saved_tensors(
    fw: torch.fx.GraphModule,
    num_fwd_outputs: int,
    bindings: Mapping[sympy.Symbol, int],
    reasons: Mapping[str, str],
    label: str,
) -> tuple[SavedTensor, ...]:
    output = next(n for n in fw.graph.nodes if n.op == "output")
    saved = []
    for node in pytree.tree_leaves(output.args[0])[num_fwd_outputs:]:
        if not isinstance(node, torch.fx.Node):
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        nbytes = value_nbytes(value, bindings)
        base = fx_view_base(node)
        base_value = base.meta.get("val")
        storage_nbytes = (
            value_nbytes(base_value, bindings) if isinstance(base_value, torch.Tensor) else nbytes
        )
        is_input = base.op == "placeholder"
        reason = reasons.get(node.name) or ("a graph input" if is_input else f"saved by {label}")
        saved.append(SavedTensor(node.name, nbytes, is_input, reason, base.name, storage_nbytes))
    return tuple(saved)


def value_nbytes(value: torch.Tensor, bindings: Mapping[sympy.Symbol, int]) -> int:
    numel = sympy.Mul(*(to_sympy(s) for s in value.shape))
    return evaluate(numel * value.dtype.itemsize, bindings)


def fx_view_base(node: torch.fx.Node) -> torch.fx.Node:
    """view_base on graphs that carry only torch's metadata ("val")."""
    while (
        node.op == "call_function"
        and isinstance(node.target, torch._ops.OpOverload)
        and node.target.is_view
        and node.args
        and isinstance(node.args[0], torch.fx.Node)
    ):
        node = node.args[0]
    return node


def _recomputed(bw: torch.fx.GraphModule, forward_names: set[str]) -> tuple[str, ...]:
    """Forward computations the backward graph performs again: `name: op`."""
    found = []
    for node in bw.graph.nodes:
        if node.op != "call_function" or node.name not in forward_names:
            continue
        if node.target is operator.getitem or _is_view_op(node):
            continue
        found.append(f"{node.name}: {_op_name(node)}")
    return tuple(found)


def _is_view_op(node: torch.fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and node.target.is_view


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    return str(getattr(target, "_overloadpacket", target))


def _violates(
    candidate: Candidate,
    bw: torch.fx.GraphModule,
    forward_names: set[str],
    options: Recompute,
    joint_nodes: Mapping[str, torch.fx.Node],
) -> str | None:
    """Why a candidate breaks the options (budget, must/never lists, op kinds), or None."""
    if options.max_saved_bytes is not None:
        if candidate.saved_activation_bytes > options.max_saved_bytes:
            return (
                f"saves {candidate.saved_activation_bytes} B of activations, over "
                f"max_saved_bytes={options.max_saved_bytes}"
            )
    recomputed = {n for n in bw.graph.nodes if n.op == "call_function" and n.name in forward_names}
    for node in recomputed:
        if _matches(node, options.never_recompute):
            return f"recomputes %{node.name}, listed in never_recompute"
        kind = _banned_kind(node, options)
        if kind is not None and not _matches(node, options.must_recompute):
            return f"recomputes %{node.name} ({kind})"
    for tensor in candidate.saved:
        node = joint_nodes.get(tensor.name)
        if node is not None and node.op != "placeholder" and _matches(node, options.must_recompute):
            return f"saves %{tensor.name}, listed in must_recompute"
    return None


def _matches(node: torch.fx.Node, names: Sequence[str]) -> bool:
    """A node is named by its fx name or by its op ("aten.sin", "sin", "aten.sin.default")."""
    if not names:
        return False
    op = _op_name(node)
    candidates = {node.name, op, op.removeprefix("aten."), str(node.target)}
    return any(name in candidates for name in names)


def _banned_kind(node: torch.fx.Node, options: Recompute) -> str | None:
    if node.target in MATMULS and not options.recompute_matmul:
        return "matmul; recompute_matmul=False"
    if node.target in CONVOLUTIONS and not options.recompute_conv:
        return "convolution; recompute_conv=False"
    if is_random(node) and not options.recompute_random:
        return "random op; recompute_random=False"
    return None


# --- the bytes min-cut ----------------------------------------------------------------------


class _BytesMinCut:
    """The minimum cut of the joint graph whose capacities are bytes (see module doc)."""

    def __init__(
        self,
        joint_module: torch.fx.GraphModule,
        num_fwd_outputs: int,
        bindings: Mapping[sympy.Symbol, int],
        options: Recompute,
    ) -> None:
        joint_module.graph.eliminate_dead_code()
        joint_module.recompile()
        annotate(joint_module)
        self.joint = joint_module
        self.num_fwd_outputs = num_fwd_outputs
        self.bindings = bindings
        self.options = options
        self.info = classify_nodes(joint_module, [], num_fwd_outputs)
        self.save_reasons: dict[str, str] = {}
        self.notes: list[str] = []
        output = next(n for n in joint_module.graph.nodes if n.op == "output")
        forward_outputs = pytree.tree_leaves(output.args[0])[:num_fwd_outputs]
        self.forward_outputs = {
            view_base(n) for n in forward_outputs if isinstance(n, torch.fx.Node)
        }
        self.backward = set(self.info.required_bw_nodes) | set(self.info.tangents_closure)

    # bytes ------------------------------------------------------------------------------

    def nbytes(self, node: torch.fx.Node) -> int:
        return sum(evaluate(m.nbytes, self.bindings) for m in output_metas(node))

    def is_activation(self, node: torch.fx.Node) -> bool:
        return view_base(node).op != "placeholder"

    def fusible(self, node: torch.fx.Node) -> bool:
        return can_lower(node)

    def written_in_forward(self, node: torch.fx.Node) -> bool:
        """Whether the forward writes the node to memory even if nothing saves it."""
        if node.op == "placeholder" or node in self.forward_outputs:
            return True
        if node.target in EXTERN_OPS or not self.fusible(node):
            return True
        return any(
            u not in self.backward and u.op != "output" and not self.fusible(u)
            for u in buffer_users(node)
        )

    def read_from_memory_in_backward(self, node: torch.fx.Node) -> bool:
        """Whether a backward consumer needs the node materialized (an extern op reads it)."""
        return any(
            u in self.backward and u.op == "call_function" and not self.fusible(u)
            for u in buffer_users(node)
        )

    # the network --------------------------------------------------------------------------

    def ban_reason(self, node: torch.fx.Node) -> str | None:
        if node.op == "placeholder":
            return "a graph input"
        if _matches(node, self.options.must_recompute):
            return None
        if _matches(node, self.options.never_recompute):
            return "listed in never_recompute"
        return _banned_kind(node, self.options)

    def network(self, lam: float):
        graph = nx.DiGraph()
        inf = math.inf
        for node in self.joint.graph.nodes:
            if node.op == "output":
                continue
            name_in, name_out = f"{node.name}_in", f"{node.name}_out"
            if node in self.info.tangents_closure:
                graph.add_edge(name_in, "sink", capacity=inf)
                continue
            if node in self.info.required_bw_nodes:
                graph.add_edge(name_out, "sink", capacity=inf)
            if _matches(node, self.options.must_recompute) and node.op != "placeholder":
                graph.add_edge(name_in, "sink", capacity=inf)
            ban = self.ban_reason(node)
            if ban is not None:
                graph.add_edge("source", name_in, capacity=inf)
            elif (
                node.op == "call_function"
                and not is_view(node)  # a view is recomputed for free (tanh's alias)
                and (not self.fusible(node) or self.read_from_memory_in_backward(node))
            ):
                # Recomputed, it is written and read again in the backward.
                graph.add_edge("source", name_in, capacity=2 * self.nbytes(node))
            graph.add_edge(name_in, name_out, capacity=self.save_capacity(node, lam))
            for user in node.users:
                graph.add_edge(name_out, f"{user.name}_in", capacity=inf)
        return graph

    def save_capacity(self, node: torch.fx.Node, lam: float) -> float:
        value = node.meta.get("val")
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
            return 0.0  # sizes are saved on the host: free
        if not isinstance(value, torch.Tensor):
            return math.inf  # a tuple: its getitems are saved instead
        if is_view(node) and node.target is not operator.getitem:
            return math.inf  # recomputing a view is free
        nbytes = self.nbytes(node)
        write = 0 if self.written_in_forward(node) else nbytes
        penalty = lam * nbytes if self.is_activation(node) else 0.0
        return write + nbytes + penalty

    def cut(self, lam: float) -> list[torch.fx.Node]:
        _, (reachable, _) = nx.minimum_cut(self.network(lam), "source", "sink")
        by_name = {n.name: n for n in self.joint.graph.nodes}
        saved = []
        for node in self.joint.graph.nodes:
            if node.op == "output":
                continue
            if f"{node.name}_in" in reachable and f"{node.name}_out" not in reachable:
                saved.append(by_name[node.name])
        return saved

    def activation_bytes(self, saved: Sequence[torch.fx.Node]) -> int:
        return sum(
            self.nbytes(n)
            for n in saved
            if isinstance(n.meta.get("val"), torch.Tensor) and self.is_activation(n)
        )

    def choose(self) -> list[torch.fx.Node]:
        saved = self.cut(0.0)
        budget = self.options.max_saved_bytes
        if budget is None or self.activation_bytes(saved) <= budget:
            return saved
        # Parametric search: the smallest penalty per saved byte whose cut fits the budget.
        high = 1.0
        while self.activation_bytes(self.cut(high)) > budget and high < 2.0**40:
            high *= 4
        fitting = self.cut(high)
        if self.activation_bytes(fitting) > budget:
            self.notes.append(
                f"max_saved_bytes={budget} is unreachable: the fewest activation bytes any cut "
                f"saves is {self.activation_bytes(fitting)} (inputs of ops that are never "
                "recomputed)"
            )
            return fitting
        low = 0.0
        for _ in range(40):
            middle = (low + high) / 2
            if self.activation_bytes(self.cut(middle)) <= budget:
                high = middle
            else:
                low = middle
        return self.cut(high)

    def partition(self) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
        saved = self.choose()
        for node in saved:
            if isinstance(node.meta.get("val"), torch.Tensor):
                why = self.ban_reason(node)
                self.save_reasons[node.name] = (
                    f"not recomputed: {why}" if why else "recomputing it moves more bytes"
                )
        saved_sym = [n for n in saved if is_sym_node(n)]
        saved_values = [n for n in saved if not is_sym_node(n)]
        fw, bw = _extract_fwd_bwd_modules(
            self.joint,
            saved_values,
            saved_sym_nodes=saved_sym,
            num_fwd_outputs=self.num_fwd_outputs,
        )
        fw.graph.eliminate_dead_code(is_impure_node=is_not_collective)
        bw.graph.eliminate_dead_code(is_impure_node=is_not_collective)
        forward_random = {n.name for n in fw.graph.nodes if is_random(n)}
        if any(is_random(n) and n.name in forward_random for n in bw.graph.nodes):
            # A recomputed random op must draw what the forward drew: both run it from the
            # same saved generator state.
            fw, bw = functionalize_rng_ops(self.joint, fw, bw, len(saved_sym))
        bw = reordering_to_mimic_autograd_engine(bw)
        return raise_getitems(fw), raise_getitems(bw)
