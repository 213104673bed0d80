"""The report page: one self-contained HTML file (inline CSS and a few lines of JS, no network).

Sections, in order: totals, predicted time per device, what was measured on this machine
(with `memopt.report(..., measure=True)`: program and kernel times, a roofline), the pass
ledger, the kernel table (sortable), one side-by-side graph diff per pipeline step, missed
opportunities, and each generated kernel's source. Every figure carries its label
(counted, modelled, measured, derived); every piece of text from the program is escaped.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from memopt.backends.runtime.kernels import FusedKernel
from memopt.compiler.devices import DEVICES, get_device
from memopt.reports.compiled import compiled_section
from memopt.reports.diff import (
    ROW_KINDS,
    DiffRow,
    PrintedNode,
    count_kinds,
    merged_names,
    pipeline_steps,
    side_by_side,
)
from memopt.reports.files import DIFFS, KERNELS, KernelSource, diff_file_name
from memopt.reports.measured import measured_section
from memopt.reports.summary import format_bytes

if TYPE_CHECKING:
    from memopt.driver.gpu import GpuKernel
    from memopt.driver.profile import Profile
    from memopt.driver.results import Analysis, KernelRecord
    from memopt.passes.ledger import Decision, LedgerEntry

CONTEXT_ROWS = 2  # unchanged rows kept around each change in a side-by-side diff
MISSED_ROWS = 100  # missed opportunities listed (the rest are counted)
DECISION_ROWS = 20  # decisions listed per pipeline step and graph
_KIND_TEXT = {"relaid": "relaid out"}  # how a row kind reads on the page

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px;
       padding: 0 1em; color: #1b1b1b; }
h1 { font-size: 1.5em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { padding: 2px 8px; border-bottom: 1px solid #eee; text-align: left;
         vertical-align: top; }
th { background: #f4f4f4; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th:after { content: " \\2195"; color: #aaa; }
code, pre, td.code { font: 12px/1.35 ui-monospace, Menlo, Consolas, monospace; }
pre { background: #f7f7f7; padding: .6em; overflow-x: auto; }
td.code { white-space: pre-wrap; word-break: break-all; max-width: 560px; }
.label { color: #666; font-size: 90%; }
tr.chosen td { font-weight: bold; }
table.diff td { border-bottom: none; }
tr.k-removed td.before, span.k-removed { background: #fdd; }
tr.k-merged td.before, span.k-merged { background: #e6dcf7; }
tr.k-added td.after, tr.k-removed td.after, tr.k-merged td.after, span.k-added
  { background: #dfd; }
tr.k-relaid td.code, span.k-relaid { background: #fff3c4; }
tr.k-changed td.code, span.k-changed { background: #dde9fb; }
tr.fold td { color: #888; text-align: center; font-style: italic; }
td.mark { font-size: 85%; color: #555; white-space: nowrap; }
td.note { font-size: 85%; color: #555; }
span.legend { padding: 0 .4em; margin-right: .4em; border: 1px solid #ddd; }
details { margin: .3em 0; } summary { cursor: pointer; }
"""

# Click a header to sort by that column; cells carry their sort key in data-sort.
_JS = """
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0], col = th.cellIndex;
    var up = th.dataset.dir !== "up"; th.dataset.dir = up ? "up" : "down";
    function key(row) {
      var cell = row.cells[col], text = cell.dataset.sort || cell.textContent;
      var number = parseFloat(text); return isNaN(number) ? text : number;
    }
    Array.from(body.rows).sort(function (a, b) {
      var x = key(a), y = key(b); return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1);
    }).forEach(function (row) { body.appendChild(row); });
  });
});
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def render_page(
    analysis: Analysis,
    device: str,
    sources: Sequence[KernelSource],
    profile: Profile | None = None,
    compiled: Sequence[GpuKernel] | None = None,
) -> str:
    """The whole page for one analysis; `device` decides memory- vs compute-bound. With a
    `profile` (`memopt.profile` of the same program), the page has a "measured" section;
    with `compiled` (`memopt.compile_for_gpu` of the analysis), a "compiled" one."""
    title = f"memopt report: {analysis.target}"
    sections = [
        _header(analysis, device, measured=profile is not None, compiled=bool(compiled)),
        _totals(analysis),
        _predictions(analysis, device),
        measured_section(profile) if profile is not None else [],
        compiled_section(compiled) if compiled else [],
        _ledger(analysis),
        _kernel_table(analysis, device, sources),
        _diffs(analysis),
        _missed(analysis),
        _sources(sources),
        [
            '<p class="label">counted: from running the program eagerly; modelled: from the '
            "graph and the device model; measured: timed on this machine; derived: computed from "
            "measured and modelled figures. Bytes are exact integers; sizes are binary units.</p>"
        ],
    ]
    body = "\n".join(line for section in sections for line in section)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"{body}\n<script>{_JS}</script>\n</body>\n</html>\n"
    )


# --- sections ----------------------------------------------------------------------------


def _header(a: Analysis, device: str, measured: bool, compiled: bool = False) -> list[str]:
    mode = "training (forward + backward)" if a.training else "inference"
    options = ", ".join(f"{k}={_option(v)}" for k, v in sorted(a.options.items())) or "defaults"
    graphs = ", ".join(g.name for g in a.graphs) or "none"
    nav = " | ".join(
        f'<a href="#{anchor}">{name}</a>'
        for anchor, name in [
            ("totals", "totals"),
            *([("measured", "measured")] if measured else []),
            *([("compiled", "compiled")] if compiled else []),
            ("ledger", "pass ledger"),
            ("kernels", "kernels"),
            ("diffs", "graph diffs"),
            ("missed", "missed opportunities"),
            ("sources", "kernel sources"),
        ]
    )
    return [
        f"<h1>memopt report: {esc(a.target)}</h1>",
        "<table>",
        _row(["mode", mode]),
        _row(["options", options]),
        _row(["graphs", graphs]),
        _row(["device", f"{device}: {get_device(device).description}"]),
        "</table>",
        f"<p>{nav}</p>",
    ]


def _totals(a: Analysis) -> list[str]:
    eager, moved, bound = a.eager_bytes, a.bytes_moved, a.lower_bound_bytes
    rows = [
        ("eager", eager, "counted"),
        ("optimized", moved, "modelled"),
        ("lower bound", bound, "modelled"),
    ]
    lines = [
        '<h2 id="totals">Totals</h2>',
        '<table id="totals-table">',
        _head(["", "bytes", "size", "source"], numeric={1, 2}),
    ]
    for name, value, label in rows:
        lines.append(
            f'<tr id="total-{name.replace(" ", "-")}"><td>{name}</td>'
            f'<td class="n">{value:,}</td><td class="n">{format_bytes(value)}</td>'
            f'<td class="label">{label}</td></tr>'
        )
    lines.append("</table>")
    lines.append(
        "<p>optimized / eager: "
        f"<b>{_ratio(moved, eager)}</b>; optimized / lower bound: <b>{_ratio(moved, bound)}</b>; "
        f"kernels: <b>{len(a.kernels)}</b> (eager ran {a.eager_ops} ATen ops, counted)</p>"
    )
    if a.bytes_moved_expr.free_symbols:
        lines.append(
            f"<p>symbolic: optimized = <code>{esc(a.bytes_moved_expr)}</code>, lower bound = "
            f"<code>{esc(a.lower_bound_expr)}</code></p>"
        )
    return lines


def _predictions(a: Analysis, device: str) -> list[str]:
    chosen = get_device(device).name
    lines = [
        "<h3>Predicted time per device (modelled)</h3>",
        "<table>",
        _head(
            [
                "device",
                "optimized (roofline)",
                "optimized bytes at bandwidth",
                "eager bytes at bandwidth",
                "description",
            ],
            numeric={1, 2, 3},
        ),
    ]
    for name, model in DEVICES.items():
        css = ' class="chosen"' if name == chosen else ""
        lines.append(
            f"<tr{css}><td>{esc(name)}</td>"
            f'<td class="n">{_us(a.predict(name))}</td>'
            f'<td class="n">{_us(model.seconds(a.bytes_moved, 0))}</td>'
            f'<td class="n">{_us(model.seconds(a.eager_bytes, 0))}</td>'
            f"<td>{esc(model.description)}</td></tr>"
        )
    lines += [
        "</table>",
        '<p class="label">roofline: per kernel max(bytes / bandwidth, FLOPs / peak), summed; '
        "at bandwidth: bytes alone, no compute, no launches.</p>",
    ]
    return lines


def _ledger(a: Analysis) -> list[str]:
    steps = pipeline_steps(a)
    lines = ['<h2 id="ledger">Pass ledger (modelled bytes, summed over graphs)</h2>']
    if not steps:
        return [*lines, "<p>No passes ran.</p>"]
    lines += [
        '<table id="ledger-table">',
        _head(
            [
                "step",
                "pass",
                "bytes before",
                "bytes after",
                "delta",
                "kernels",
                "delta",
                "applied",
                "refused",
                "ms (measured)",
            ],
            numeric={0, 2, 3, 4, 6, 7, 8, 9},
        ),
    ]
    for step, entries in enumerate(steps, start=1):
        name = entries[0].pass_name
        before, after = sum(e.bytes_before for e in entries), sum(e.bytes_after for e in entries)
        k_before = sum(e.kernels_before for e in entries)
        k_after = sum(e.kernels_after for e in entries)
        decisions = [d for e in entries for d in e.decisions]
        anchor = _diff_anchor(diff_file_name(step, name))
        lines.append(
            f'<tr><td class="n">{step}</td><td><a href="#{anchor}">{esc(name)}</a></td>'
            f'<td class="n" title="{before:,} B">{format_bytes(before)}</td>'
            f'<td class="n" title="{after:,} B">{format_bytes(after)}</td>'
            f'<td class="n">{_signed_bytes(after - before)}</td>'
            f'<td class="n">{k_before} &rarr; {k_after}</td>'
            f'<td class="n">{k_after - k_before:+d}</td>'
            f'<td class="n">{sum(d.applied for d in decisions)}</td>'
            f'<td class="n">{sum(not d.applied for d in decisions)}</td>'
            f'<td class="n">{sum(e.elapsed_ms for e in entries):,.1f}</td></tr>'
        )
    lines.append("</table>")
    return lines


def _kernel_table(a: Analysis, device: str, sources: Sequence[KernelSource]) -> list[str]:
    model = get_device(device)
    by_record = {s.record: s for s in sources}
    lines = [
        f'<h2 id="kernels">Kernels ({len(a.kernels)}, modelled; bound on {esc(model.name)})</h2>',
        '<p class="label">Click a column header to sort.</p>',
        '<table id="kernel-table" class="sortable">',
        _head(
            [
                "kernel",
                "graph",
                "kind",
                "nodes",
                "read",
                "written",
                "FLOPs",
                "FLOP/B",
                "bound",
                "predicted",
                "source",
            ],
            numeric={3, 4, 5, 6, 7, 9},
        ),
        "<tbody>",
    ]
    for k in a.kernels:
        intensity = k.flops / k.nbytes if k.nbytes else float("inf")
        source = by_record.get(k.name)
        link = f'<a href="#src-{esc(source.file_stem)}">{esc(source.name)}</a>' if source else ""
        ops = ", ".join(k.ops)
        lines.append(
            "<tr>"
            f"<td>{esc(k.name)}</td><td>{esc(k.graph)}</td><td>{esc(k.kind)}</td>"
            f'<td class="n" data-sort="{len(k.nodes)}" title="{esc(ops)}">{len(k.nodes)}</td>'
            f'<td class="n" data-sort="{k.read_bytes}">{format_bytes(k.read_bytes)}</td>'
            f'<td class="n" data-sort="{k.write_bytes}">{format_bytes(k.write_bytes)}</td>'
            f'<td class="n" data-sort="{k.flops}">{k.flops:,}</td>'
            f'<td class="n" data-sort="{intensity:.6g}">{_intensity(intensity)}</td>'
            f"<td>{_bound(k, device)}</td>"
            f'<td class="n" data-sort="{k.seconds(device):.6e}">{_us(k.seconds(device))}</td>'
            f"<td>{link}</td></tr>"
        )
    lines += ["</tbody>", "</table>"]
    return lines


def _diffs(a: Analysis) -> list[str]:
    members = fused_members(a)
    lines = [
        '<h2 id="diffs">Graph diffs, pass by pass</h2>',
        "<p>"
        + " ".join(
            f'<span class="legend k-{kind}">{_KIND_TEXT.get(kind, kind)}</span>'
            for kind in ROW_KINDS[1:]
        )
        + " &mdash; bytes are each node's modelled traffic; unchanged nodes are folded.</p>",
    ]
    steps = pipeline_steps(a)
    if not steps:
        lines.append("<p>No passes ran.</p>")
    for step, entries in enumerate(steps, start=1):
        name = entries[0].pass_name
        file_name = diff_file_name(step, name)
        before = sum(e.bytes_before for e in entries)
        after = sum(e.bytes_after for e in entries)
        lines += [
            f'<section class="pass-diff" id="{_diff_anchor(file_name)}">',
            f"<h3>{step:02d} {esc(name)}: {format_bytes(before)} &rarr; {format_bytes(after)} "
            f"({_signed_bytes(after - before)})</h3>",
            f'<p class="label">unified diff: <a href="{DIFFS}/{esc(file_name)}">'
            f"{DIFFS}/{esc(file_name)}</a></p>",
        ]
        for entry in entries:
            lines += _graph_diff(entry, members.get(entry.graph, {}))
        lines.append("</section>")
    return lines


def _graph_diff(entry: LedgerEntry, members: dict[str, tuple[str, ...]]) -> list[str]:
    head = (
        f"<h4>{esc(entry.graph)}: {format_bytes(entry.bytes_before)} &rarr; "
        f"{format_bytes(entry.bytes_after)}, kernels {entry.kernels_before} &rarr; "
        f"{entry.kernels_after}</h4>"
    )
    decisions = _decision_list(entry.decisions)
    if entry.text_before == entry.text_after:
        return [head, "<p>No change to this graph.</p>", *decisions]
    rows = side_by_side(entry.text_before, entry.text_after, merged_names(entry.decisions), members)
    counts = count_kinds(rows)
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n and kind != "same")
    lines = [
        head,
        f"<p>{esc(summary)}</p>",
        '<table class="diff">',
        _head(["", "bytes", "before", "bytes", "after", ""], numeric={1, 3}),
    ]
    lines += [_diff_row(row) for row in _fold(rows)]
    lines.append("</table>")
    return [*lines, *decisions]


def _fold(rows: list[DiffRow]) -> list[DiffRow | int]:
    """Rows with runs of unchanged ones folded to a count, CONTEXT_ROWS kept at each side."""
    keep = [False] * len(rows)
    for index, row in enumerate(rows):
        if row.kind != "same":
            for near in range(index - CONTEXT_ROWS, index + CONTEXT_ROWS + 1):
                if 0 <= near < len(rows):
                    keep[near] = True
    folded: list[DiffRow | int] = []
    for row, kept in zip(rows, keep):
        if kept:
            folded.append(row)
        elif folded and isinstance(folded[-1], int):
            folded[-1] += 1
        else:
            folded.append(1)
    return folded


def _diff_row(row: DiffRow | int) -> str:
    if isinstance(row, int):
        nodes = "node" if row == 1 else "nodes"
        return f'<tr class="fold"><td colspan="6">&hellip; {row} unchanged {nodes}</td></tr>'
    mark = "" if row.kind == "same" else _KIND_TEXT.get(row.kind, row.kind)
    return (
        f'<tr class="k-{row.kind}"><td class="mark">{mark}</td>'
        f"{_node_cells(row.before, 'before')}{_node_cells(row.after, 'after')}"
        f'<td class="note">{esc(row.note)}</td></tr>'
    )


def _node_cells(node: PrintedNode | None, side: str) -> str:
    if node is None:
        return f'<td class="n {side}"></td><td class="code {side}"></td>'
    if node.nbytes is not None:
        size = f'<td class="n {side}" title="{node.nbytes:,} B">{format_bytes(node.nbytes)}</td>'
    else:
        size = f'<td class="n {side}">{"view" if node.is_view else ""}</td>'
    text = node.text.split("  # ")[0]
    return f'{size}<td class="code {side}">{esc(text)}</td>'


def _decision_list(decisions: Sequence[Decision]) -> list[str]:
    if not decisions:
        return []
    ranked = sorted(decisions, key=lambda d: (not d.applied, -d.bytes_saved))
    applied = sum(d.applied for d in decisions)
    lines = [
        f"<details><summary>{len(decisions)} decisions ({applied} applied, "
        f"{len(decisions) - applied} refused)</summary>",
        "<table>",
        _head(["", "bytes", "what", "why"], numeric={1}),
    ]
    for d in ranked[:DECISION_ROWS]:
        lines.append(
            f"<tr><td>{'applied' if d.applied else 'refused'}</td>"
            f'<td class="n">{format_bytes(d.bytes_saved)}</td>'
            f"<td>{esc(d.what)}</td><td>{esc(d.reason)}</td></tr>"
        )
    if len(ranked) > DECISION_ROWS:
        lines.append(f'<tr><td colspan="4">&hellip; {len(ranked) - DECISION_ROWS} more</td></tr>')
    return [*lines, "</table>", "</details>"]


def _missed(a: Analysis) -> list[str]:
    refused = [d for g in a.graphs for e in g.ledger for d in e.decisions if not d.applied]
    ranked = sorted(refused, key=lambda d: (-d.bytes_saved, d.graph, d.pass_name, d.what))
    lines = [
        '<h2 id="missed">Missed opportunities (modelled bytes at stake)</h2>',
        "<p>Rewrites a pass considered and refused (fusions, recomputations, copies kept), "
        "ranked by the bytes the refusal costs.</p>",
    ]
    if not ranked:
        return [*lines, "<p>None: no pass refused a rewrite.</p>"]
    lines += [
        '<table id="missed-table" class="sortable">',
        _head(["bytes at stake", "pass", "graph", "what", "why not"], numeric={0}),
        "<tbody>",
    ]
    for d in ranked[:MISSED_ROWS]:
        lines.append(
            f'<tr><td class="n" data-sort="{d.bytes_saved}">{format_bytes(d.bytes_saved)}</td>'
            f"<td>{esc(d.pass_name)}</td><td>{esc(d.graph)}</td>"
            f"<td>{esc(d.what)}</td><td>{esc(d.reason)}</td></tr>"
        )
    lines += ["</tbody>", "</table>"]
    if len(ranked) > MISSED_ROWS:
        lines.append(f"<p>&hellip; and {len(ranked) - MISSED_ROWS} more, each costing less.</p>")
    return lines


def _sources(sources: Sequence[KernelSource]) -> list[str]:
    lines = ['<h2 id="sources">Generated kernels</h2>']
    if not sources:
        return [*lines, "<p>No generated kernels: every kernel is an ATen call.</p>"]
    for s in sources:
        stem = esc(s.file_stem)
        lines += [
            f'<details id="src-{stem}"><summary><code>{esc(s.name)}</code> ({esc(s.kind)}, '
            f"{len(s.nodes)} nodes: {esc(', '.join('%' + n for n in s.nodes))})</summary>",
            f'<p class="label">Kernel IR (<a href="{KERNELS}/{stem}.ir">{KERNELS}/{stem}.ir'
            "</a>)</p>",
            f"<pre>{esc(s.ir)}</pre>",
        ]
        if s.triton is not None:
            lines += [
                f'<p class="label">Triton (<a href="{KERNELS}/{stem}.py">{KERNELS}/{stem}.py'
                "</a>)</p>",
                f"<pre>{esc(s.triton)}</pre>",
            ]
        else:
            lines.append(f'<p class="label">No Triton source: {esc(s.triton_error)}</p>')
        lines.append("</details>")
    return lines


# --- helpers -----------------------------------------------------------------------------


def fused_members(analysis: Analysis) -> dict[str, dict[str, tuple[str, ...]]]:
    """Per graph: fused node name -> names of the nodes it computes (for diff notes)."""
    members: dict[str, dict[str, tuple[str, ...]]] = {}
    for graph in analysis.graphs:
        found = members.setdefault(graph.name, {})
        if graph.gm is None:
            continue
        for node in graph.gm.graph.nodes:  # type: ignore[attr-defined]
            if isinstance(node.target, FusedKernel):
                found[node.name] = tuple(node.target.memopt_nodes)
    return members


def _bound(k: KernelRecord, device: str) -> str:
    model = get_device(device)
    peak = model.bf16_flops_per_s if k.low_precision else model.fp32_flops_per_s
    memory_s, compute_s = k.nbytes / model.bandwidth_bytes_per_s, k.flops / peak
    return "memory" if memory_s >= compute_s else "compute"


def _diff_anchor(file_name: str) -> str:
    return "diff-" + file_name.removesuffix(".diff")


def _head(cells: Iterable[str], numeric: set[int] = frozenset()) -> str:  # type: ignore[assignment]
    numeric_th = '<th class="n">'
    return (
        "<thead><tr>"
        + "".join(
            f"{numeric_th if i in numeric else '<th>'}{esc(c)}</th>" for i, c in enumerate(cells)
        )
        + "</tr></thead>"
    )


def _row(cells: Iterable[str]) -> str:
    return "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f} &micro;s"


def _intensity(value: float) -> str:
    return "&infin;" if value == float("inf") else f"{value:.3g}"


def _ratio(numerator: int, denominator: int) -> str:
    return f"{numerator / denominator:.2f}x" if denominator else "n/a"


def _signed_bytes(n: int) -> str:
    return "+" + format_bytes(n) if n > 0 else format_bytes(n)


def _option(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)
