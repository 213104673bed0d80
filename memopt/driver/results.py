"""What an analysis produces: kernels, pass ledger records, decisions, and the totals.

All figures here are *modelled* from the graph (bytes by the rules in docs/architecture.md),
except `Analysis.eager_bytes`, which is *counted* by running the program eagerly.
Each integer figure has a sympy twin (`*_expr`) in the symbolic sizes of dynamic dims.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import sympy

from memopt.compiler.devices import get_device
from memopt.passes.ledger import LedgerEntry, PassSummary

if TYPE_CHECKING:
    from memopt.driver.gpu import GpuKernel


@dataclass(frozen=True)
class KernelRecord:
    """One unit the optimized program launches: an extern ATen call or a generated kernel."""

    name: str  # stable within an analysis: "<graph>.k<index>", e.g. "forward.k3"
    kind: str  # "aten" (one ATen op), "extern" (matmul, convolution), or a fused kind
    graph: str  # "inference", "forward" or "backward", with a suffix for later graph breaks
    nodes: tuple[str, ...]  # fx node names the kernel computes
    ops: tuple[str, ...]  # their ATen op names, e.g. "aten.add.Tensor"
    read_bytes: int
    write_bytes: int
    flops: int
    read_expr: sympy.Expr
    write_expr: sympy.Expr
    flops_expr: sympy.Expr
    low_precision: bool = False  # 16-bit matmul/conv: predicted against the bf16 peak
    source_path: str | None = None  # generated source, for kernels a backend rendered

    @property
    def nbytes(self) -> int:
        return self.read_bytes + self.write_bytes

    def seconds(self, device: str, bandwidth_share: float = 1.0) -> float:
        return get_device(device).seconds(
            self.nbytes, self.flops, self.low_precision, bandwidth_share
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "graph": self.graph,
            "nodes": list(self.nodes),
            "ops": list(self.ops),
            "read_bytes": self.read_bytes,
            "write_bytes": self.write_bytes,
            "flops": self.flops,
            "read_expr": str(self.read_expr),
            "write_expr": str(self.write_expr),
            "flops_expr": str(self.flops_expr),
            "low_precision": self.low_precision,
            "source_path": self.source_path,
        }


@dataclass(frozen=True)
class NodeCost:
    """Modelled traffic of one fx node of the final graph (for "top nodes by bytes")."""

    graph: str
    node: str
    op: str
    read_bytes: int
    write_bytes: int
    flops: int
    # Of read_bytes, read from graph inputs: those the graph only reads (weights, token
    # ids) and those it carries into its next state (updated in place, or concatenated
    # into an output it returns: a KV cache, running statistics).
    input_read_bytes: int = 0
    state_read_bytes: int = 0

    @property
    def nbytes(self) -> int:
        return self.read_bytes + self.write_bytes


@dataclass
class GraphResult:
    """One captured graph after the pipeline."""

    name: str  # "inference", "forward", "backward" (+ ".1", ".2" after graph breaks)
    text: str  # printed final graph
    kernels: list[KernelRecord]
    ledger: list[LedgerEntry]
    node_costs: list[NodeCost]
    bytes_expr: sympy.Expr
    lower_bound_expr: sympy.Expr
    bytes_moved: int
    lower_bound_bytes: int
    symbols: dict[str, int] = field(default_factory=dict)  # example value of each symbol
    gm: object = field(default=None, repr=False)  # the optimized torch.fx.GraphModule


@dataclass
class Analysis:
    """The result of memopt.analyze: what eager moves, what memopt moves, and why."""

    target: str
    training: bool
    eager_bytes: int  # counted
    eager_ops: int  # counted: non-view ATen ops eager ran
    graphs: list[GraphResult]
    options: dict[str, object]
    capture_ms: float
    pipeline_ms: float
    device: str = "h100"  # the `device` option: the device model predictions default to
    # With analyze(..., compile_for=GPU): each Triton launch compiled for that GPU
    # (driver/gpu.py's GpuKernel rows; figures compiled). None when not asked for.
    compiled: list[GpuKernel] | None = None

    @property
    def bytes_moved(self) -> int:
        return sum(g.bytes_moved for g in self.graphs)

    @property
    def bytes_moved_expr(self) -> sympy.Expr:
        return sympy.Add(*(g.bytes_expr for g in self.graphs))

    @property
    def lower_bound_bytes(self) -> int:
        return sum(g.lower_bound_bytes for g in self.graphs)

    @property
    def lower_bound_expr(self) -> sympy.Expr:
        return sympy.Add(*(g.lower_bound_expr for g in self.graphs))

    @property
    def kernels(self) -> list[KernelRecord]:
        return [k for g in self.graphs for k in g.kernels]

    @property
    def ledger(self) -> list[PassSummary]:
        """One record per pass, summed over the program's graphs, in pipeline order.

        Bytes and kernels are those of the ATen stage (the capture-time stages change no
        ATen graph); decisions and time are of every stage.
        """
        order: list[str] = []
        entries: dict[str, list[LedgerEntry]] = {}
        for graph in self.graphs:
            for entry in graph.ledger:
                if entry.stage == "aten" and entry.pass_name not in order:
                    order.append(entry.pass_name)
                entries.setdefault(entry.pass_name, []).append(entry)
        order += [name for name in entries if name not in order]

        def total(name: str, field: str) -> int:
            return sum(getattr(e, field) for e in entries[name] if e.stage == "aten")

        return [
            PassSummary(
                pass_name=name,
                bytes_before=total(name, "bytes_before"),
                bytes_after=total(name, "bytes_after"),
                kernels_before=total(name, "kernels_before"),
                kernels_after=total(name, "kernels_after"),
                elapsed_ms=sum(e.elapsed_ms for e in entries[name]),
                decisions=tuple(d for e in entries[name] for d in e.decisions),
            )
            for name in order
        ]

    def predict(self, device: str | None = None) -> float:
        """Roofline-predicted seconds on a named device (default: the `device` option) as
        the sum over kernels of max(bytes / bandwidth, flops / peak). When the analysis was
        compiled for that device (`analyze(..., compile_for=device)`), a kernel whose
        launches cannot keep enough loads in flight gets only its share of the bandwidth
        (`bandwidth_shares`)."""
        device = device or self.device
        shares = self.bandwidth_shares(device)
        return sum(k.seconds(device, shares.get(k.name, 1.0)) for k in self.kernels)

    def bandwidth_shares(self, device: str) -> dict[str, float]:
        """Kernel name -> the part of `device`'s bandwidth its compiled launches can draw
        (the smallest over a kernel's launches; driver/gpu.py), for the kernels compiled for
        that device; empty when none were."""
        name = get_device(device).name
        shares: dict[str, float] = {}
        for row in self.compiled or ():
            if get_device(row.compiled.device).name == name:
                shares[row.kernel] = min(shares.get(row.kernel, 1.0), row.bandwidth_share)
        return shares

    def top_nodes(self, n: int = 10) -> list[NodeCost]:
        nodes = [c for g in self.graphs for c in g.node_costs]
        return sorted(nodes, key=lambda c: (-c.nbytes, c.graph, c.node))[:n]

    def to_dict(self) -> dict[str, object]:
        return {
            "target": self.target,
            "training": self.training,
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()},
            "totals": {
                "eager_bytes": {"value": self.eager_bytes, "label": "counted"},
                "bytes_moved": {
                    "value": self.bytes_moved,
                    "expr": str(self.bytes_moved_expr),
                    "label": "modelled",
                },
                "lower_bound_bytes": {
                    "value": self.lower_bound_bytes,
                    "expr": str(self.lower_bound_expr),
                    "label": "modelled",
                },
                "kernels": len(self.kernels),
                "eager_ops": self.eager_ops,
            },
            "capture_ms": round(self.capture_ms, 3),
            "pipeline_ms": round(self.pipeline_ms, 3),
            "graphs": [
                {
                    "name": g.name,
                    "bytes_moved": g.bytes_moved,
                    "bytes_expr": str(g.bytes_expr),
                    "lower_bound_bytes": g.lower_bound_bytes,
                    "symbols": g.symbols,
                    "kernels": [k.to_dict() for k in g.kernels],
                    "ledger": [e.to_dict() for e in g.ledger],
                    "text": g.text,
                }
                for g in self.graphs
            ],
            "ledger": [p.to_dict() for p in self.ledger],
            **({"compiled": [row.to_dict() for row in self.compiled]} if self.compiled else {}),
        }
