"""What `memopt.profile` measured, for a person: the text `memopt profile` prints, and the
report page's "measured" section (the program table, the kernel table, and a roofline
chart drawn as inline SVG, so the page needs no network and no plotting library).

Labels: times are *measured*, bytes and FLOPs *modelled*, rates and fractions *derived*.

The roofline: each kernel is a point at its arithmetic intensity (modelled FLOPs per
modelled byte) and its achieved FLOP/s (modelled FLOPs / measured time), under two roofs
of this machine: the measured read bandwidth times the intensity, and the measured fp32
matmul peak. A kernel with no FLOPs (a copy, a layout change) has no place on either axis;
it is drawn hollow at the chart's left edge, at the height its achieved bandwidth gives
there, so its distance below the memory roof is still its achieved fraction of bandwidth.
"""

from __future__ import annotations

import html
import math

from memopt.driver.machine import Machine
from memopt.driver.profile import KernelTiming, Profile
from memopt.reports.summary import format_bytes, format_table

CHART_LABELS = 8  # kernels named on the chart (the longest-running, where labels do not
# overlap); every point has a tooltip

# Chart geometry, in SVG user units.
_WIDTH, _HEIGHT = 720, 420
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 20, 20, 50


def format_profile(p: Profile, top: int | None = None) -> str:
    """The text `memopt profile` prints: the program totals, then the kernels by time."""
    m = p.machine
    lines = [
        f"memopt profile: {p.target}",
        f"  mode      {'training (forward + backward)' if p.training else 'inference'}",
        f"  machine   {_machine_line(m)}",
        "",
        f"Program (measured, median of {p.rounds} interleaved rounds):",
    ]
    lines += format_table(["program", "ms", "vs eager", "vs inductor"], _program_rows(p), "lrrr")
    lines += [
        "",
        f"Kernels: {len(p.kernels)}, {_ms(p.kernel_seconds)} ms in all (measured, node by "
        "node); bytes and FLOPs modelled; GB/s and fractions derived",
    ]
    ordered = _by_time(p.kernels)
    header = ["kernel", "kind", "ms", "bytes", "GB/s", "of bw", "of peak", "bound", "ops"]
    rows = [_kernel_cells(k, m) for k in (ordered[:top] if top else ordered)]
    widths = [24, 10, 10, 10, 8, 6, 7, 7, 48]
    lines += format_table(header, rows, "llrrrrrll", max_widths=widths)
    return "\n".join(lines) + "\n"


def measured_section(p: Profile) -> list[str]:
    """The report page's "measured" section: program table, roofline, kernel table."""
    m = p.machine
    lines = [
        '<h2 id="measured">Measured on this machine</h2>',
        f"<p>{_esc(_machine_line(m))}. Program times: median of {p.rounds} interleaved rounds "
        "of eager, Inductor and memopt; speedups are medians of the per-round ratios.</p>",
        '<table id="measured-program">',
        _head(["program", "ms (measured)", "vs eager", "vs inductor"], numeric={1, 2, 3}),
    ]
    for cells in _program_rows(p):
        lines.append(
            "<tr>"
            + f"<td>{_esc(cells[0])}</td>"
            + "".join(f'<td class="n">{_esc(c)}</td>' for c in cells[1:])
            + "</tr>"
        )
    lines.append("</table>")
    lines.append(roofline_svg(p))
    lines += [
        f"<p>Kernels: {len(p.kernels)}, {_ms(p.kernel_seconds)} ms in all (measured node by "
        "node, so each time includes a few microseconds of running the graph). Click a column "
        "header to sort.</p>",
        '<table id="measured-kernels" class="sortable">',
        _head(
            [
                "kernel",
                "kind",
                "ms (measured)",
                "bytes (modelled)",
                "GB/s (derived)",
                "of bandwidth",
                "of peak",
                "bound",
                "ops",
            ],
            numeric={2, 3, 4, 5, 6},
        ),
        "<tbody>",
    ]
    for k in _by_time(p.kernels):
        name, kind, ms, nbytes, gbps, of_bw, of_peak, bound, ops = _kernel_cells(k, m)
        lines.append(
            "<tr>"
            f"<td>{_esc(name)}</td><td>{_esc(kind)}</td>"
            f'<td class="n" data-sort="{k.seconds:.6e}">{ms}</td>'
            f'<td class="n" data-sort="{k.record.nbytes}">{nbytes}</td>'
            f'<td class="n">{gbps}</td>'
            f'<td class="n" data-sort="{k.bandwidth_fraction(m):.6g}">{of_bw}</td>'
            f'<td class="n" data-sort="{k.compute_fraction(m):.6g}">{of_peak}</td>'
            f'<td>{bound}</td><td class="note">{_esc(ops)}</td></tr>'
        )
    lines += ["</tbody>", "</table>"]
    return lines


def roofline_svg(p: Profile) -> str:
    """The roofline chart (module doc) as one inline `<svg>` element."""
    m = p.machine
    kernels = [k for k in p.kernels if k.seconds > 0 and k.record.nbytes > 0]
    intensities = [k.record.flops / k.record.nbytes for k in kernels if k.record.flops > 0]
    ridge = m.fp32_flops_per_s / m.read_bytes_per_s
    x_low = _decade_below(min([*intensities, ridge]) / 4)
    x_high = _decade_above(max([*intensities, ridge]) * 4)
    points = []  # (x, y, hollow, kernel)
    for k in kernels:
        if k.record.flops > 0:
            points.append((k.record.flops / k.record.nbytes, k.record.flops / k.seconds, False, k))
        else:
            points.append((x_low, k.achieved_bytes_per_s * x_low, True, k))
    y_values = [y for _, y, _, _ in points] + [m.read_bytes_per_s * x_low, m.fp32_flops_per_s]
    y_low = _decade_below(min(y_values))
    y_high = _decade_above(m.fp32_flops_per_s * 2)

    def sx(x: float) -> float:
        span = math.log10(x_high) - math.log10(x_low)
        return _LEFT + (math.log10(x) - math.log10(x_low)) / span * (_WIDTH - _LEFT - _RIGHT)

    def sy(y: float) -> float:
        span = math.log10(y_high) - math.log10(y_low)
        return (
            _HEIGHT
            - _BOTTOM
            - (math.log10(y) - math.log10(y_low)) / span * (_HEIGHT - _TOP - _BOTTOM)
        )

    out = [
        f'<svg id="roofline" xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" '
        f'height="{_HEIGHT}" viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" '
        'aria-label="roofline: achieved FLOP/s of each kernel against its arithmetic '
        'intensity" font-family="system-ui, sans-serif" font-size="11">',
        f'<rect x="{_LEFT}" y="{_TOP}" width="{_WIDTH - _LEFT - _RIGHT}" '
        f'height="{_HEIGHT - _TOP - _BOTTOM}" fill="#fcfcfc" stroke="#bbb"/>',
    ]
    for exponent in range(round(math.log10(x_low)), round(math.log10(x_high)) + 1):
        x = sx(10.0**exponent)
        out.append(
            f'<line x1="{x:.1f}" y1="{_TOP}" x2="{x:.1f}" y2="{_HEIGHT - _BOTTOM}" '
            'stroke="#eee"/>'
            f'<text x="{x:.1f}" y="{_HEIGHT - _BOTTOM + 14}" text-anchor="middle">'
            f"{_power_label(exponent)}</text>"
        )
    for exponent in range(round(math.log10(y_low)), round(math.log10(y_high)) + 1):
        y = sy(10.0**exponent)
        out.append(
            f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_WIDTH - _RIGHT}" y2="{y:.1f}" '
            'stroke="#eee"/>'
            f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{_flops_label(10.0**exponent)}</text>"
        )
    out += [
        f'<text x="{(_LEFT + _WIDTH - _RIGHT) / 2}" y="{_HEIGHT - 12}" text-anchor="middle">'
        "arithmetic intensity, FLOPs per byte (modelled)</text>",
        f'<text transform="translate(14 {(_TOP + _HEIGHT - _BOTTOM) / 2}) rotate(-90)" '
        'text-anchor="middle">achieved FLOP/s (modelled FLOPs / measured time)</text>',
    ]
    # The roofs: bandwidth * intensity up to the ridge, then the compute peak.
    out.append(
        f'<polyline class="roof" fill="none" stroke="#c0392b" stroke-width="2" points="'
        f"{sx(x_low):.1f},{sy(m.read_bytes_per_s * x_low):.1f} "
        f"{sx(ridge):.1f},{sy(m.fp32_flops_per_s):.1f} "
        f'{sx(x_high):.1f},{sy(m.fp32_flops_per_s):.1f}"/>'
        f'<text x="{sx(x_high) - 4:.1f}" y="{sy(m.fp32_flops_per_s) - 6:.1f}" '
        f'text-anchor="end" fill="#c0392b">fp32 peak '
        f"{m.fp32_flops_per_s / 1e9:.0f} GFLOP/s (measured)</text>"
        f'<text x="{sx(x_low) + 6:.1f}" y="{sy(m.read_bytes_per_s * x_low) - 8:.1f}" '
        f'fill="#c0392b">read {m.read_bytes_per_s / 1e9:.1f} GB/s (measured)</text>'
    )
    named = {id(k) for k in _by_time(p.kernels)[:CHART_LABELS]}
    total = p.kernel_seconds or 1.0
    labels: list[tuple[float, float, float, str]] = []  # seconds, x, y, name
    for x, y, hollow, k in points:
        radius = 3 + 9 * math.sqrt(k.seconds / total)  # area follows the share of time
        fill = "none" if hollow else "#2c6fbb"
        tip = (
            f"{k.record.name} ({k.record.kind}): {_ms(k.seconds)} ms measured, "
            f"{format_bytes(k.record.nbytes)} and {k.record.flops:,} FLOPs modelled, "
            f"{k.achieved_bytes_per_s / 1e9:.1f} GB/s, {k.bandwidth_fraction(m):.0%} of "
            f"bandwidth, {k.compute_fraction(m):.0%} of peak"
        )
        out.append(
            f'<circle class="kernel" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{radius:.1f}" '
            f'fill="{fill}" fill-opacity="0.55" stroke="#1d4f8a">'
            f"<title>{_esc(tip)}</title></circle>"
        )
        if id(k) in named:
            labels.append((k.seconds, sx(x) + radius + 2, sy(y) + 4, k.record.name))
    placed: list[tuple[float, float, float]] = []  # left, baseline, right of each label
    for _, x, y, name in sorted(labels, reverse=True):  # the longest-running first
        right = x + 6.5 * len(name)  # about the width of 11px text
        if any(abs(y - y0) < 12 and x < r0 and x0 < right for x0, y0, r0 in placed):
            continue  # would overlap a label already drawn: the tooltip still names it
        placed.append((x, y, right))
        out.append(f'<text x="{x:.1f}" y="{y:.1f}">{_esc(name)}</text>')
    out.append("</svg>")
    out.append(
        '<p class="label">Roofline: each kernel at its modelled FLOPs per modelled byte and '
        "its achieved FLOP/s; the area of a point is its share of the measured kernel time. "
        "Hollow points are kernels with no FLOPs (copies, layout changes), drawn at the left "
        "edge at the height their achieved bandwidth gives there.</p>"
    )
    return "\n".join(out)


# --- helpers ------------------------------------------------------------------------------


def _machine_line(m: Machine) -> str:
    return (
        f"{m.description}, {m.threads} threads: read {m.read_bytes_per_s / 1e9:.1f} GB/s, copy "
        f"{m.copy_bytes_per_s / 1e9:.1f} GB/s, fp32 {m.fp32_flops_per_s / 1e9:.0f} GFLOP/s "
        "(measured)"
    )


def _program_rows(p: Profile) -> list[list[str]]:
    rows = [["eager", _ms(p.eager_seconds), "", ""]]
    if p.inductor_seconds is not None:
        rows.append(["inductor", _ms(p.inductor_seconds), "", ""])
    versus_inductor = f"{p.speedup_vs_inductor:.2f}x" if p.speedup_vs_inductor is not None else "-"
    rows.append(["memopt", _ms(p.memopt_seconds), f"{p.speedup_vs_eager:.2f}x", versus_inductor])
    return rows


def _kernel_cells(k: KernelTiming, m: Machine) -> list[str]:
    return [
        k.record.name,
        k.record.kind,
        _ms(k.seconds),
        format_bytes(k.record.nbytes),
        f"{k.achieved_bytes_per_s / 1e9:.1f}",
        f"{k.bandwidth_fraction(m):.0%}",
        f"{k.compute_fraction(m):.0%}",
        k.bound(m),
        ", ".join(op.removeprefix("aten.") for op in k.record.ops),
    ]


def _by_time(kernels: list[KernelTiming]) -> list[KernelTiming]:
    return sorted(kernels, key=lambda k: -k.seconds)


def _head(cells: list[str], numeric: set[int]) -> str:
    return (
        "<thead><tr>"
        + "".join(
            f'<th class="n">{_esc(c)}</th>' if i in numeric else f"<th>{_esc(c)}</th>"
            for i, c in enumerate(cells)
        )
        + "</tr></thead>"
    )


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _decade_below(value: float) -> float:
    return 10.0 ** math.floor(math.log10(value))


def _decade_above(value: float) -> float:
    return 10.0 ** math.ceil(math.log10(value))


def _power_label(exponent: int) -> str:
    return f"{10.0**exponent:g}"


def _flops_label(value: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:g}{unit}"
    return f"{value:g}"
