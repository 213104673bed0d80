"""The pass contract: a registered frozen dataclass that decides through its context.

A pass is a frozen dataclass whose fields are its typed options (checked when the Config
is built, passes/registry.py). It acts at one or more stages of a compilation:

- `Stage.DYNAMO`: `rewrite_dynamo_graph(gm, ctx)` on Dynamo's torch-level graph, before
  AOTAutograd differentiates it (a rewrite the backward must see, like attention);
- `Stage.PARTITION`: `partition(joint, joint_inputs, ctx, **kwargs)` splits the joint
  graph into the forward and backward graphs (which tensors are saved for the backward);
- `Stage.SAVED`: `rewrite_saved(pair, ctx)` rewrites the forward and backward graphs
  together, right after the partition and before either is compiled (how the tensors
  saved for the backward are stored: precision's `saved_activations`);
- `Stage.ATEN`: `run(gm, ctx)` rewrites one ATen graph in place.

A pass reads nothing global: the PassContext hands it the example-size bindings, the
pipeline it is part of (the other passes' options, the backend option) and the decision
record, which owns the fuel. Every rewrite goes through `ctx.decide` (it takes one unit of
fuel; with none left the rewrite is refused, "out of fuel") and every rewrite not made
through `ctx.refuse`, with the bytes that costs. Each decision carries a code from the
pass's declared `codes`, which tools and tests match on. The pipeline, not the pass,
measures bytes before and after, snapshots the graph, times the pass and verifies it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import sympy
import torch.fx

from memopt.backends.registry import Backend, backend_for
from memopt.compiler.cost import node_cost
from memopt.compiler.graph import evaluate
from memopt.passes.ledger import Decision


class Stage(enum.Enum):
    """Where in a compilation a pass acts (see the module doc)."""

    DYNAMO = "dynamo"
    PARTITION = "partition"
    SAVED = "saved"
    ATEN = "aten"


# The method a pass implements for each stage it registers.
STAGE_METHODS = {
    Stage.DYNAMO: "rewrite_dynamo_graph",
    Stage.PARTITION: "partition",
    Stage.SAVED: "rewrite_saved",
    Stage.ATEN: "run",
}


@dataclass
class Fuel:
    """A cap on rewrite decisions across every pass and stage of one compilation (for
    bisecting): `limit=None` is unlimited; each applied rewrite takes one unit."""

    limit: int | None = None
    used: int = 0

    def take(self) -> bool:
        if self.exhausted:
            return False
        self.used += 1
        return True

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.used >= self.limit


@dataclass
class DecisionRecord:
    """The decisions one pass took at one stage on one graph, in the order it took them."""

    pass_name: str
    graph: str
    fuel: Fuel
    codes: frozenset[str]
    decisions: list[Decision] = field(default_factory=list)
    # Units of work the pass did ("fusion.cycle_checks": 120, ...), counted, not timed:
    # what the compile-time tests bound, independent of the machine's speed.
    work: Counter[str] = field(default_factory=Counter)

    def decide(
        self,
        code: str,
        what: str,
        reason: str,
        bytes_saved: int,
        nodes: tuple[str, ...] = (),
        figures: Mapping[str, float] | None = None,
    ) -> bool:
        """Take one unit of fuel for a rewrite and record it; False: do not rewrite."""
        applied = self.fuel.take()
        if not applied:
            reason = f"out of fuel ({self.fuel.limit}); would: {reason}"
        self._add(code, applied, what, reason, bytes_saved, nodes, figures)
        return applied

    def refuse(
        self,
        code: str,
        what: str,
        reason: str,
        bytes_at_stake: int,
        nodes: tuple[str, ...] = (),
        figures: Mapping[str, float] | None = None,
    ) -> None:
        """Record a rewrite the pass chose not to make, with the bytes that costs."""
        self._add(code, False, what, reason, bytes_at_stake, nodes, figures)

    def _add(
        self,
        code: str,
        applied: bool,
        what: str,
        reason: str,
        nbytes: int,
        nodes: tuple[str, ...],
        figures: Mapping[str, float] | None = None,
    ) -> None:
        if code not in self.codes:
            raise ValueError(
                f"pass {self.pass_name!r} decided with code {code!r}, which it does not "
                f"declare; its codes: {', '.join(sorted(self.codes))}"
            )
        self.decisions.append(
            Decision(
                pass_name=self.pass_name,
                code=f"{self.pass_name}.{code}",
                applied=applied,
                what=what,
                reason=reason,
                bytes_saved=nbytes,
                nodes=tuple(nodes),
                graph=self.graph,
                figures=dict(figures or {}),
            )
        )

    @property
    def changed(self) -> bool:
        return any(d.applied for d in self.decisions)


@dataclass(frozen=True)
class Pass:
    """Base of every pass; `register_pass` sets the class variables."""

    name: ClassVar[str] = ""
    stages: ClassVar[frozenset[Stage]] = frozenset()
    # Decision codes the pass uses (without its name: "vertical" is "fusion.vertical").
    codes: ClassVar[frozenset[str]] = frozenset()
    # Whether the pass's rewrites change results by design (precision): the pipeline's
    # check then compares later passes against its result, not against the graph before.
    changes_values: ClassVar[bool] = False

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        raise NotImplementedError

    def capture_options(self, stage: Stage) -> object:
        """What a capture made with this pass at `stage` depends on (`capture_key`): by
        default the pass with all its options; None where, with these options, the pass
        does nothing at that stage (the pipeline then skips it there)."""
        return self


@dataclass(frozen=True)
class Pipeline:
    """What one compilation runs, as the Config built it: the passes in order with their
    options, every registered pass with its options (run or not: a pass may use another
    as an estimator), the backend option, and whether to check each pass against eager."""

    passes: tuple[Pass, ...]
    configured: Mapping[str, Pass]
    backend: str = "auto"
    check: bool = False
    # Where one-position CPU attention runs (the cpu_attention option): the attention pass
    # fuses a dynamic cache's concatenations into memopt's kernel only.
    cpu_attention: str = "aten"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.passes)

    def runs(self, name: str) -> bool:
        return name in self.names

    def instance(self, name: str) -> Pass:
        """The pass `name` with its configured options (whether or not this pipeline runs it)."""
        return self.configured[name]

    def at(self, stage: Stage) -> tuple[Pass, ...]:
        return tuple(p for p in self.passes if stage in p.stages)

    def with_options(self, name: str, **changes: object) -> Pipeline:
        """The same pipeline with some options of pass `name` changed."""
        changed = dataclasses.replace(self.configured[name], **changes)
        return dataclasses.replace(
            self,
            passes=tuple(changed if p.name == name else p for p in self.passes),
            configured={**self.configured, name: changed},
        )

    def without_check(self) -> Pipeline:
        return dataclasses.replace(self, check=False)


@dataclass
class PartitionedPair:
    """The forward and backward graphs a partition made of one joint graph (Stage.SAVED).

    The forward returns its `num_fwd_outputs` outputs, then the values saved for the
    backward; the backward takes those saved values before the outputs' gradients, each as
    a placeholder named as the forward's node (the orders differ: with dynamic sizes the
    forward returns its saved sizes last and the backward takes them first). `inputs` are the forward's real inputs (the model's
    parameters and the example inputs Dynamo ran with), one for each placeholder; None
    where they are not known. `cost(gm, graph_name)`: the modelled bytes a graph moves after
    the pipeline (on a copy).
    """

    forward: torch.fx.GraphModule
    backward: torch.fx.GraphModule
    num_fwd_outputs: int
    inputs: Sequence[object] | None = None
    cost: Callable[[torch.fx.GraphModule, str], int] | None = None


@dataclass
class PassContext:
    """What a pass sees of the compilation: one graph, its sizes, its pipeline, its record."""

    graph_name: str
    bindings: Mapping[sympy.Symbol, int]
    pipeline: Pipeline
    record: DecisionRecord

    @classmethod
    def for_pass(
        cls,
        pass_: Pass,
        graph_name: str,
        bindings: Mapping[sympy.Symbol, int],
        pipeline: Pipeline,
        fuel: Fuel,
    ) -> PassContext:
        record = DecisionRecord(pass_.name, graph_name, fuel, pass_.codes)
        return cls(graph_name, bindings, pipeline, record)

    def scratch(self, pass_: Pass) -> PassContext:
        """A context for running `pass_` as an estimator on a trial graph: unlimited fuel,
        and its decisions go nowhere; its work counts as this pass's."""
        ctx = PassContext.for_pass(pass_, self.graph_name, self.bindings, self.pipeline, Fuel())
        ctx.record.work = self.record.work
        return ctx

    @property
    def backend(self) -> str:
        """The `backend` option (auto, triton, cpp, reference)."""
        return self.pipeline.backend

    def kernel_backend(self, device_type: str) -> Backend:
        """The backend generated kernels of a graph on `device_type` run on."""
        return backend_for(self.pipeline.backend, device_type)

    def nbytes(self, node: torch.fx.Node) -> int:
        """Modelled bytes one node moves, at the example sizes."""
        return evaluate(node_cost(node).nbytes, self.bindings)

    def decide(
        self,
        code: str,
        what: str,
        reason: str,
        bytes_saved: int,
        nodes: tuple[str, ...] = (),
        figures: Mapping[str, float] | None = None,
    ) -> bool:
        return self.record.decide(code, what, reason, bytes_saved, nodes, figures)

    def refuse(
        self,
        code: str,
        what: str,
        reason: str,
        bytes_at_stake: int,
        nodes: tuple[str, ...] = (),
        figures: Mapping[str, float] | None = None,
    ) -> None:
        self.record.refuse(code, what, reason, bytes_at_stake, nodes, figures)
