"""The pass contract: a frozen dataclass with a `name` and one `run(gm, ctx) -> PassResult`.

A pass reads nothing global: the PassContext hands it the config, the cost model's
example-size bindings and the fuel. It returns its decisions; the pipeline measures bytes,
snapshots the graph, times the pass and verifies the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import sympy
import torch.fx

from memopt.compiler.cost import node_cost
from memopt.compiler.graph import evaluate
from memopt.config import Config
from memopt.passes.ledger import Decision


@dataclass
class Fuel:
    """A cap on rewrite decisions across every pass of one compilation (for bisecting).

    `limit=None` is unlimited. Each applied rewrite takes one unit; once none is left,
    passes refuse further rewrites with the reason "out of fuel".
    """

    limit: int | None = None
    used: int = 0

    def take(self) -> bool:
        if self.limit is not None and self.used >= self.limit:
            return False
        self.used += 1
        return True


@dataclass
class PassContext:
    config: Config
    graph_name: str
    bindings: Mapping[sympy.Symbol, int]
    fuel: Fuel = field(default_factory=Fuel)

    def nbytes(self, node: torch.fx.Node) -> int:
        """Modelled bytes one node moves, at the example sizes."""
        return evaluate(node_cost(node).nbytes, self.bindings)


@dataclass
class PassResult:
    decisions: list[Decision] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(d.applied for d in self.decisions)


@dataclass(frozen=True)
class Pass:
    """Base of every pass. Subclasses set `name` and implement `run`."""

    name: ClassVar[str] = ""

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def decide(
        self,
        ctx: PassContext,
        result: PassResult,
        what: str,
        reason: str,
        bytes_saved: int,
        nodes: tuple[str, ...] = (),
    ) -> bool:
        """Take one unit of fuel for a rewrite and record the decision; False: do not rewrite."""
        applied = ctx.fuel.take()
        result.decisions.append(
            Decision(
                pass_name=self.name,
                applied=applied,
                what=what,
                reason=reason if applied else f"out of fuel ({ctx.fuel.limit}); would: {reason}",
                bytes_saved=bytes_saved,
                nodes=nodes,
                graph=ctx.graph_name,
            )
        )
        return applied

    def refuse(
        self,
        ctx: PassContext,
        result: PassResult,
        what: str,
        reason: str,
        bytes_at_stake: int,
        nodes: tuple[str, ...] = (),
    ) -> None:
        """Record a rewrite the pass chose not to make, with the bytes that costs."""
        result.decisions.append(
            Decision(
                pass_name=self.name,
                applied=False,
                what=what,
                reason=reason,
                bytes_saved=bytes_at_stake,
                nodes=nodes,
                graph=ctx.graph_name,
            )
        )
