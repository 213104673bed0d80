"""The decision record: what each pass decided on each graph, as the pipeline ledgers it.

A Decision is one rewrite a pass applied or refused (with the reason and the bytes at
stake); a LedgerEntry is one pass over one graph, measured by the pipeline; a PassSummary
is one pass over every graph of a program. Bytes are *modelled* at the example sizes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Decision:
    """One decision a pass made: a rewrite it applied, or one it refused and why.

    `bytes_saved` is what the rewrite saved (applied) or what refusing it costs (refused),
    modelled at the example sizes.
    """

    pass_name: str
    applied: bool
    what: str  # "removed no-op clone %clone_3", "fused %add, %mul"
    reason: str  # why applied or refused
    bytes_saved: int = 0
    nodes: tuple[str, ...] = ()
    graph: str = ""
    # Machine-readable: "<pass>.<kind>", e.g. "fusion.vertical", "layout.copy_kept_output".
    code: str = ""
    # Figures beyond the bytes, by name, for reports: the precision pass's bytes before and
    # after each weight and the errors it measured ("weight_error", "share", ...).
    figures: Mapping[str, float] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, object]:
        figures = {"figures": dict(self.figures)} if self.figures else {}
        return {
            "pass": self.pass_name,
            "code": self.code,
            "applied": self.applied,
            "what": self.what,
            "reason": self.reason,
            "bytes_saved": self.bytes_saved,
            "nodes": list(self.nodes),
            "graph": self.graph,
            **figures,
        }


@dataclass(frozen=True)
class LedgerEntry:
    """What one pass did to one graph, measured by the pipeline (not by the pass)."""

    pass_name: str
    graph: str
    bytes_before: int
    bytes_after: int
    kernels_before: int
    kernels_after: int
    elapsed_ms: float
    decisions: tuple[Decision, ...]
    text_before: str  # the printed graph, for diffs
    text_after: str
    # Where the pass acted: "aten" (on this graph), or "dynamo" / "partition" (while the
    # graph was captured: the graph before and after is the captured one).
    stage: str = "aten"
    # Units of work the pass counted (DecisionRecord.work), estimator runs included.
    work: Mapping[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "pass": self.pass_name,
            "stage": self.stage,
            "graph": self.graph,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "kernels_before": self.kernels_before,
            "kernels_after": self.kernels_after,
            "elapsed_ms": round(self.elapsed_ms, 3),
            "work": dict(self.work),
            "decisions": [d.to_dict() for d in self.decisions],
        }


@dataclass(frozen=True)
class PassSummary:
    """One pass over all graphs of a program: the design's "one record per pass"."""

    pass_name: str
    bytes_before: int
    bytes_after: int
    kernels_before: int
    kernels_after: int
    elapsed_ms: float
    decisions: tuple[Decision, ...]

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def to_dict(self) -> dict[str, object]:
        return {
            "pass": self.pass_name,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "kernels_before": self.kernels_before,
            "kernels_after": self.kernels_after,
            "elapsed_ms": round(self.elapsed_ms, 3),
            "applied": sum(d.applied for d in self.decisions),
            "refused": sum(not d.applied for d in self.decisions),
            "decisions": [d.to_dict() for d in self.decisions],
        }
