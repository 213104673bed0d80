"""Graph diffs: what one pass, or one option set against another, changed in the printed graph.

Diffs are of the printed graphs the pipeline keeps in its ledger (`LedgerEntry.text_before`
and `text_after`, one line per node: `%add: f32[4, 8] = aten.add.Tensor(%x, %y)  # 384 B`),
so a diff between two stages is a diff of text. Two forms:

- `unified_diff`: the `diff -u` form, for the terminal and for `diffs/NN-<pass>.diff` files;
- `side_by_side`: rows aligned by node name, each marked `same`, `changed` (same node, new
  arguments or bytes), `relaid` (same node, new shape, dtype or strides), `removed`, `merged`
  (removed into a node that a rewrite created, e.g. a fused kernel) or `added`, for HTML.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memopt.driver.results import Analysis
    from memopt.passes.ledger import Decision, LedgerEntry

# `%name: meta = expression  # note`; placeholders print `= input`, views `# view`.
_NODE_LINE = re.compile(r"^%(?P<name>[^:\s]+): (?P<meta>.*?) = (?P<expr>.*?)(?:  # (?P<note>.*))?$")
_BYTES_NOTE = re.compile(r"^(?P<nbytes>-?\d+) B$")


@dataclass(frozen=True)
class PrintedNode:
    """One line of a printed graph, split into its parts."""

    name: str  # fx node name, or "return" for the output line
    meta: str  # "f32[4, 8](8, 1)"; "" for the return line
    expr: str  # "aten.add.Tensor(%x, %y)", "input", or the returned values
    nbytes: int | None  # modelled bytes of a kernel node; None for views, inputs, the return
    text: str  # the line as printed

    @property
    def is_view(self) -> bool:
        return self.text.endswith("  # view")


def parse_line(line: str) -> PrintedNode:
    """Split one printed node line (compiler/printer.py's format) into a PrintedNode."""
    match = _NODE_LINE.match(line)
    if match is None:
        # The output line (`return (...)`) and anything unexpected: keyed by the whole line.
        name = "return" if line.startswith("return") else line
        return PrintedNode(name=name, meta="", expr=line, nbytes=None, text=line)
    note = match["note"] or ""
    nbytes_match = _BYTES_NOTE.match(note)
    return PrintedNode(
        name=match["name"],
        meta=match["meta"],
        expr=match["expr"],
        nbytes=int(nbytes_match["nbytes"]) if nbytes_match else None,
        text=line,
    )


def parse_graph(text: str) -> list[PrintedNode]:
    """Every node line of a printed graph (comment lines, `# title`, skipped)."""
    return [parse_line(line) for line in text.splitlines() if line and not line.startswith("# ")]


# --- unified diffs ---------------------------------------------------------------------------


def unified_diff(before: str, after: str, from_label: str, to_label: str, context: int = 3) -> str:
    """`diff -u` of two printed graphs; "" when they are the same."""
    lines = difflib.unified_diff(
        before.splitlines(), after.splitlines(), from_label, to_label, n=context, lineterm=""
    )
    text = "\n".join(lines)
    return text + "\n" if text else ""


def pass_diff(entries: Sequence[LedgerEntry], step: int, context: int = 3) -> str:
    """One pass's diff over every graph it ran on: the text of `diffs/NN-<pass>.diff`.

    `entries` are the ledger entries of one pipeline step, one per graph; `step` is its
    1-based position in the pipeline. Labels name the graph and the step, never a time or a
    path, so the files of two reports diff cleanly.
    """
    chunks = []
    for entry in entries:
        label = f"{entry.graph} before {step:02d}-{entry.pass_name}"
        to_label = f"{entry.graph} after {step:02d}-{entry.pass_name}"
        text = unified_diff(entry.text_before, entry.text_after, label, to_label, context)
        chunks.append(text or f"# {entry.graph}: {entry.pass_name} changed nothing\n")
    return "".join(chunks)


def pipeline_steps(analysis: Analysis) -> list[list[LedgerEntry]]:
    """Ledger entries per pipeline step: step k holds the k-th pass's entry of every graph.

    Unlike `Analysis.ledger` (one record per pass *name*), a pass listed twice in the
    pipeline gives two steps here, in the order they ran. Entries of the capture-time
    stages change no ATen graph (they acted before it existed) and are no step.
    """
    ledgers = [[e for e in g.ledger if e.stage == "aten"] for g in analysis.graphs]
    count = max((len(ledger) for ledger in ledgers), default=0)
    return [[ledger[k] for ledger in ledgers if k < len(ledger)] for k in range(count)]


def unoptimized_text(graph_ledger: Sequence[LedgerEntry], final_text: str) -> str:
    """The printed graph before any pass ran (the final text when no pass ran)."""
    return graph_ledger[0].text_before if graph_ledger else final_text


def analysis_diff(
    before: Analysis, after: Analysis, from_name: str, to_name: str, context: int = 3
) -> str:
    """The final graphs of two analyses of one capture (two option sets), graph by graph."""
    chunks = []
    after_graphs = {g.name: g for g in after.graphs}
    for graph in before.graphs:
        other = after_graphs.get(graph.name)
        if other is None:
            continue
        text = unified_diff(
            graph.text,
            other.text,
            f"{graph.name} ({from_name})",
            f"{graph.name} ({to_name})",
            context,
        )
        chunks.append(text or f"# {graph.name}: the same graph\n")
    return "".join(chunks)


def pass_diffs(analysis: Analysis, pass_name: str, context: int = 3) -> str:
    """Every step of the pipeline that ran `pass_name`, as `pass_diff` prints it."""
    return "".join(
        pass_diff(entries, step, context)
        for step, entries in enumerate(pipeline_steps(analysis), start=1)
        if entries[0].pass_name == pass_name
    )


def pipeline_diff(analysis: Analysis, context: int = 3) -> str:
    """Each graph as captured against the same graph after the whole pipeline."""
    return "".join(
        unified_diff(
            unoptimized_text(g.ledger, g.text),
            g.text,
            f"{g.name} (captured)",
            f"{g.name} (optimized)",
            context,
        )
        or f"# {g.name}: the passes changed nothing\n"
        for g in analysis.graphs
    )


# --- side by side ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffRow:
    """One aligned row: a node before and/or after, and how it changed."""

    kind: str  # "same", "changed", "relaid", "removed", "merged", "added"
    before: PrintedNode | None
    after: PrintedNode | None
    note: str = ""  # "into %fused_0", "from %mul, %exp"


ROW_KINDS = ("same", "changed", "relaid", "removed", "merged", "added")


def merged_names(decisions: Iterable[Decision]) -> set[str]:
    """Nodes named in an applied rewrite that involved two or more nodes (a fusion, a CSE).

    Such a node, when it disappears, was merged into something rather than just removed.
    """
    names: set[str] = set()
    for decision in decisions:
        if decision.applied and len(decision.nodes) >= 2:
            names.update(decision.nodes)
    return names


def side_by_side(
    before: str,
    after: str,
    merged: set[str] | None = None,
    members: dict[str, tuple[str, ...]] | None = None,
) -> list[DiffRow]:
    """Align two printed graphs by node name and mark each row.

    merged: names of nodes that a rewrite merged (see `merged_names`); a removed node among
    them is marked `merged`. members: fused node name -> the node names it computes, to note
    on an added fused node (and on the nodes merged into it). A node that only moved (fusion
    re-sorts the graph topologically) is shown once, at its new place.
    """
    merged = merged or set()
    members = members or {}
    into = {name: fused for fused, names in members.items() for name in names}
    old, new = parse_graph(before), parse_graph(after)
    old_by_name = {n.name: n for n in old}
    new_names = {n.name for n in new}
    matcher = difflib.SequenceMatcher(
        None, [n.name for n in old], [n.name for n in new], autojunk=False
    )
    rows: list[DiffRow] = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            rows.extend(_compare(a, b) for a, b in zip(old[i1:i2], new[j1:j2]))
            continue
        # Like `diff -u`: what went, then what came. A fused node shares the row of the
        # first node merged into it, so each fusion reads left to right.
        gone = [
            DiffRow(
                "merged" if a.name in merged or a.name in into else "removed",
                a,
                None,
                _into_note(a, into),
            )
            for a in old[i1:i2]
            if a.name not in new_names
        ]
        came: list[DiffRow] = []
        for b in new[j1:j2]:
            if b.name in old_by_name:
                came.append(_compare(old_by_name[b.name], b))  # moved, not new
                continue
            added = DiffRow("added", None, b, _from_note(b, members))
            first = next(
                (k for k, row in enumerate(gone) if row.before.name in members.get(b.name, ())),
                None,
            )
            if first is None:
                came.append(added)
            else:
                gone[first] = _pair(gone[first], added)
        rows.extend(gone)
        rows.extend(came)
    return rows


def _pair(merged: DiffRow, added: DiffRow) -> DiffRow:
    # The row's mark is the left side's; the right side of such a row is always added.
    return DiffRow(merged.kind, merged.before, added.after, added.note)


def _compare(a: PrintedNode, b: PrintedNode) -> DiffRow:
    if a.text == b.text:
        return DiffRow("same", a, b)
    if a.meta != b.meta:
        return DiffRow("relaid", a, b)
    return DiffRow("changed", a, b)


def _into_note(node: PrintedNode, into: dict[str, str]) -> str:
    fused = into.get(node.name)
    return f"into %{fused}" if fused else ""


def _from_note(node: PrintedNode, members: dict[str, tuple[str, ...]]) -> str:
    names = members.get(node.name)
    return "from " + ", ".join(f"%{n}" for n in names) if names else ""


def count_kinds(rows: Iterable[DiffRow]) -> dict[str, int]:
    """How many rows of each kind (an added node paired with a removed one counts both)."""
    counts = dict.fromkeys(ROW_KINDS, 0)
    for row in rows:
        counts[row.kind] += 1
        if row.kind in ("removed", "merged") and row.after is not None:
            counts["added"] += 1
    return counts
