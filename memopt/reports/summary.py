"""The terminal summary of an Analysis (what `memopt report` prints) and its JSON form.

Every figure is labelled with its source: *counted* (from running eager PyTorch) or
*modelled* (from the graph and a device model). The two never share a column.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from memopt.compiler.devices import get_device

if TYPE_CHECKING:
    from memopt.driver.results import Analysis
    from memopt.passes.ledger import Decision, PassSummary

MAX_WIDTH = 110  # no line of the report is longer
DECISIONS_PER_PASS = 5
_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n: int) -> str:
    """A byte count in binary units: `512 B` (exact under 1 KiB), `1.5 KiB`, `12.0 MiB`."""
    sign = "-" if n < 0 else ""
    n = abs(int(n))
    if n < 1024:
        return f"{sign}{n} B"
    value = float(n)
    for unit in _UNITS:
        value /= 1024
        # Compare the rounded figure, so 1048575 reads 1.0 MiB rather than 1024.0 KiB.
        if round(value, 1) < 1024 or unit == _UNITS[-1]:
            return f"{sign}{value:.1f} {unit}"
    raise AssertionError("unreachable")


def format_analysis(a: Analysis, device: str = "h100", top: int = 10) -> str:
    """A readable report: totals, predicted time on `device`, top nodes, the pass ledger.

    Plain text (no colour codes), columns aligned, no line longer than 110 characters.
    """
    sections = [
        _header(a),
        _totals(a),
        _prediction(a, device),
        _top_nodes(a, top),
        _narrowed_weights(a),
        _narrowed_saved(a),
        _ledger(a),
        ["counted: from running the program eagerly; modelled: from the graph and device model"],
    ]
    lines = [line for section in sections if section for line in (*section, "")]
    return "\n".join(_clip(line.rstrip()) for line in lines[:-1]) + "\n"


def analysis_json(a: Analysis, devices: Sequence[str]) -> dict[str, object]:
    """`a.to_dict()` plus `"predictions"`: device -> {"seconds", "label": "modelled"}."""
    data = a.to_dict()
    data["predictions"] = {
        name: {"seconds": a.predict(name), "label": "modelled"} for name in devices
    }
    return data


# --- sections ----------------------------------------------------------------------------


def _header(a: Analysis) -> list[str]:
    mode = "training (forward + backward)" if a.training else "inference"
    options = ", ".join(f"{k}={_option(v)}" for k, v in sorted(a.options.items()))
    graphs = ", ".join(g.name for g in a.graphs) or "none"
    return [
        f"memopt report: {a.target}",
        f"  mode      {mode}",
        f"  options   {options or 'defaults'}",
        f"  graphs    {graphs}  (capture {a.capture_ms:,.0f} ms, passes {a.pipeline_ms:,.0f} ms)",
    ]


def _totals(a: Analysis) -> list[str]:
    eager, moved, bound = a.eager_bytes, a.bytes_moved, a.lower_bound_bytes
    rows = [
        ["eager", f"{eager:,}", format_bytes(eager), "counted"],
        ["optimized", f"{moved:,}", format_bytes(moved), "modelled"],
        ["lower bound", f"{bound:,}", format_bytes(bound), "modelled"],
    ]
    lines = ["Totals", *format_table(["", "bytes", "size", "source"], rows, "lrrl")]
    change = moved - eager
    vs_eager = f"{_ratio(moved, eager)}  ({_signed_bytes(change)}, {_percent(change, eager, True)})"
    lines += [
        f"  optimized / eager        {vs_eager}",
        f"  optimized / lower bound  {_ratio(moved, bound)}",
        f"  kernels                  {len(a.kernels)}  (eager ran {a.eager_ops} ATen ops, counted)",
    ]
    if any(
        d.applied and d.code != "precision.saved_activation"
        for p in a.ledger
        if p.pass_name == "precision"
        for d in p.decisions
    ):
        lines.append(
            "  (the lower bound is the program's as written, float32 weights; the precision "
            "pass reads them narrower)"
        )
    expr = a.bytes_moved_expr
    if expr.free_symbols:
        symbols: dict[str, int] = {}
        for graph in a.graphs:
            symbols.update(graph.symbols)
        at = ", ".join(f"{name}={value}" for name, value in sorted(symbols.items()))
        where = f", here {at}" if at else ""
        lines += [
            f"  symbolic (bytes as expressions of the dynamic sizes{where})",
            *_wrap("optimized   = ", str(expr)),
            *_wrap("lower bound = ", str(a.lower_bound_expr)),
        ]
    return lines


def _prediction(a: Analysis, device: str) -> list[str]:
    model = get_device(device)
    optimized_s = a.predict(device)
    # Bytes alone at the device's bandwidth (no compute, no launches): eager's counted bytes
    # next to the optimized program's modelled bytes, the same measure for both.
    optimized_bw_s = model.seconds(a.bytes_moved, 0, False)
    eager_bw_s = model.seconds(a.eager_bytes, 0, False)
    rows = [
        ["optimized", _microseconds(optimized_s), "roofline per kernel: max(bytes/bw, flops/peak)"],
        [
            "optimized bytes at bandwidth",
            _microseconds(optimized_bw_s),
            "modelled bytes, no compute",
        ],
        ["eager bytes at bandwidth", _microseconds(eager_bw_s), "counted bytes, no compute"],
    ]
    return [
        f"Predicted time on {device} (modelled): {model.description}",
        *format_table(["", "time", ""], rows, "lrl"),
    ]


def _top_nodes(a: Analysis, top: int) -> list[str]:
    nodes = a.top_nodes(top) if top > 0 else []
    if not nodes:
        return []
    total = a.bytes_moved
    # A program that carries some of its inputs into its next state (a decode step's KV
    # cache, updated in place or concatenated into an output) gets the split of each node's
    # reads: from inputs it only reads (weights), from those (state).
    state = any(c.state_read_bytes for g in a.graphs for c in g.node_costs)
    rows = [
        [
            c.graph,
            c.node,
            c.op,
            format_bytes(c.read_bytes),
            *(
                [format_bytes(c.input_read_bytes), format_bytes(c.state_read_bytes)]
                if state
                else []
            ),
            format_bytes(c.write_bytes),
            _percent(c.nbytes, total),
        ]
        for c in nodes
    ]
    header = ["graph", "node", "op", "read", *(["of inputs", "of state"] if state else [])]
    header += ["write", "share"]
    lines = [
        f"Top {len(nodes)} nodes by bytes (modelled)",
        *format_table(header, rows, "lll" + "r" * (len(header) - 3), max_widths=[12, 28, 36]),
    ]
    if state:
        costs = [c for g in a.graphs for c in g.node_costs]
        inputs = sum(c.input_read_bytes for c in costs)
        updated = sum(c.state_read_bytes for c in costs)
        computed = sum(c.read_bytes for c in costs) - inputs - updated
        lines.append(
            f"  reads: {format_bytes(inputs)} of read-only inputs (weights), "
            f"{format_bytes(updated)} of state (a cache), {format_bytes(computed)} computed"
        )
    return lines


def _ledger(a: Analysis) -> list[str]:
    ledger = a.ledger
    if not ledger:
        return ["Pass ledger (modelled): no passes ran"]
    rows = [
        [
            p.pass_name,
            format_bytes(p.bytes_before),
            "->",
            format_bytes(p.bytes_after),
            _signed_bytes(-p.bytes_saved),
            f"{p.kernels_before} -> {p.kernels_after}",
            str(sum(d.applied for d in p.decisions)),
            str(sum(not d.applied for d in p.decisions)),
            f"{p.elapsed_ms:,.1f}",
        ]
        for p in ledger
    ]
    header = ["pass", "before", "", "after", "delta", "kernels", "applied", "refused", "ms"]
    table = format_table(header, rows, "lrcrrrrrr")
    lines = ["Pass ledger (modelled bytes, summed over graphs)", table[0]]
    for summary, row_line in zip(ledger, table[1:]):
        lines.append(row_line)
        lines += _decisions(summary)
    return lines


def _narrowed_weights(a: Analysis) -> list[str]:
    """The precision pass's weights, each with its bytes stored before and after, its own
    error and its share of the output error (measured). What a run reads of them is in the
    ledger: a whole matrix a matmul, one row a lookup."""
    decisions = _precision_figures(a, weights=True)
    rows = [
        [d.what, _verdict(d), *_bytes_stored(d), f"{d.figures['weight_error']:.2e}", _share(d)]
        for d in decisions
    ]
    if not rows:
        return []
    header = ["weight", "", "before", "after", "own error", "share of output error"]
    lines = ["Narrowed weights (the precision pass; bytes stored, errors measured)"]
    lines += format_table(header, rows, "llrrrr", max_widths=[48])
    for graph, d in _final_by_graph(decisions).items():
        f = d.figures
        if not d.applied:
            lines.append(f"  {graph}: no weight narrowed")
            continue
        kl = f", next-token KL {f['kl']:.2e} nats" if "kl" in f else ""
        lines.append(
            f"  {graph}: output error with every narrowed weight {f['total_error']:.2e} of the "
            f"output's scale{kl}"
        )
    lines.append(
        "  own error: ||W - narrow W|| / ||W||; share: the output error with it alone narrowed"
    )
    return lines


def _narrowed_saved(a: Analysis) -> list[str]:
    """The precision pass's saved activations (training), each with the bytes it holds from
    the forward to the backward before and after, and its share of the gradients' error;
    per graph, the gradients' error with every narrowed tensor and the bytes moved."""
    decisions = _precision_figures(a, weights=False)
    rows = [[d.graph, d.what, _verdict(d), *_bytes_stored(d), _share(d)] for d in decisions]
    if not rows:
        return []
    header = ["graph", "saved tensor", "", "held", "as bf16", "share of gradients' error"]
    lines = ["Saved activations (the precision pass; bytes held, errors measured)"]
    lines += format_table(header, rows, "lllrrr", max_widths=[12, 40])
    for graph, d in _final_by_graph(decisions).items():
        if not d.applied:
            lines.append(f"  {graph}: no saved activation narrowed")
            continue
        f = d.figures
        lines.append(
            f"  {graph}: gradients' error with every narrowed tensor {f['total_error']:.2e} "
            "of their scale"
        )
        if "moved_after" in f:
            lines.append(
                f"  {graph}: forward + backward move {format_bytes(int(f['moved_after']))} "
                f"against {format_bytes(int(f['moved_before']))} with them in float32 (modelled)"
            )
    return lines


def _final_by_graph(decisions: list) -> dict[str, object]:
    """Per graph, the decision whose figures are the graph's final ones: an applied one's
    (a refusal carries the figures from before it gave its value back), else a refusal."""
    final: dict[str, object] = {}
    for d in sorted(decisions, key=lambda d: not d.applied):
        final.setdefault(d.graph, d)
    return final


def _precision_figures(a: Analysis, weights: bool) -> list:
    """The precision pass's decisions with figures: its weights' or its saved tensors'."""
    return [
        d
        for p in a.ledger
        if p.pass_name == "precision"
        for d in p.decisions
        if d.figures and ("weight_error" in d.figures) == weights
    ]


def _bytes_stored(d: object) -> list[str]:
    return [
        format_bytes(int(d.figures["bytes_before"])),
        format_bytes(int(d.figures["bytes_after"])),
    ]


def _share(d: object) -> str:
    return f"{d.figures['share']:.2e}" if "share" in d.figures else "not measured"


def _verdict(d: Decision) -> str:
    if d.applied:
        return "narrowed"
    return "kept (over budget)" if d.code.endswith("over_budget") else "kept (out of fuel)"


def _decisions(p: PassSummary) -> list[str]:
    # The biggest savings, and the costliest refusals (the ones worth a look): up to two
    # refusals are shown even when many applied decisions save more.
    applied = sorted((d for d in p.decisions if d.applied), key=lambda d: -d.bytes_saved)
    refused = sorted((d for d in p.decisions if not d.applied), key=lambda d: -d.bytes_saved)
    n_refused = min(len(refused), max(2, DECISIONS_PER_PASS - len(applied)))
    n_applied = min(len(applied), DECISIONS_PER_PASS - n_refused)
    n_refused = min(len(refused), DECISIONS_PER_PASS - n_applied)
    lines = [_decision_line(d) for d in (*applied[:n_applied], *refused[:n_refused])]
    hidden_applied, hidden_refused = len(applied) - n_applied, len(refused) - n_refused
    if hidden_applied or hidden_refused:
        lines.append(
            f"      ... {hidden_applied + hidden_refused} more"
            f" ({hidden_applied} applied, {hidden_refused} refused)"
        )
    return lines


def _decision_line(d: Decision) -> str:
    verdict, verb = ("applied", "saves") if d.applied else ("refused", "costs")
    text = f"{d.what}: {d.reason}" if d.reason else d.what
    lead = f"      {verdict}  {verb} {format_bytes(d.bytes_saved):>10}  "
    return lead + _fit(" ".join(text.split()), MAX_WIDTH - len(lead))


# --- helpers -----------------------------------------------------------------------------


def format_table(
    header: list[str],
    rows: list[list[str]],
    align: str,
    max_widths: Sequence[int] = (),
    indent: int = 2,
) -> list[str]:
    """Rows under a header, columns two spaces apart; align is one of l/r/c per column.

    A cell longer than its column's entry in `max_widths` is cut with "...".
    """
    cells = [
        [_fit(cell, max_widths[i]) if i < len(max_widths) else cell for i, cell in enumerate(row)]
        for row in [header, *rows]
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    justify = {"l": str.ljust, "r": str.rjust, "c": str.center}
    return [
        " " * indent
        + "  ".join(justify[align[i]](cell, widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in cells
    ]


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 3, 0)] + "..."


def _clip(line: str) -> str:
    return _fit(line, MAX_WIDTH)


def _wrap(label: str, text: str) -> list[str]:
    """`label text`, continued under the text at most MAX_WIDTH wide (for long expressions)."""
    lead = "    " + label
    room = MAX_WIDTH - len(lead)
    chunks = [text[i : i + room] for i in range(0, len(text), room)] or [""]
    return [lead + chunks[0], *(" " * len(lead) + chunk for chunk in chunks[1:])]


def _ratio(numerator: int, denominator: int) -> str:
    return f"{numerator / denominator:.2f}x" if denominator else "n/a"


def _percent(part: int, whole: int, signed: bool = False) -> str:
    if not whole:
        return "n/a"
    return f"{100 * part / whole:+.1f}%" if signed else f"{100 * part / whole:.1f}%"


def _signed_bytes(n: int) -> str:
    return "+" + format_bytes(n) if n > 0 else format_bytes(n)


def _microseconds(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f} us"


def _option(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)
