"""What the real GPU compilers made of an analysis's Triton kernels, for a person: the text
`memopt report --compile-for DEVICE` prints and the report page's "compiled" section.

Labels: registers, stack, spills, shared memory, warps and memory instructions are
*compiled* (read from the machine code for the target); occupancy is *derived* from them
and the device's limits; bytes are *modelled*. Static bytes: what the code's global memory
instructions move when every lane of every program runs each once, and each loop's body once
an iteration (the launch's trip counts); their ratio to the modelled bytes is above 1 by
masked tails, by operands that every row re-reads, by the passes of a looped reduction and by
the tiles of a matmul or attention that several programs read (served by the caches, not by
memory: the modelled bytes count each buffer once). Sector bytes: the modelled
bytes when memory moves in 32-byte sectors (backends/triton/sectors.py); above 1 only for a
strided access the kernel could not make contiguous. Bandwidth share: the part of the
device's bandwidth a launch's loads in flight can draw by Little's law (*modelled*; driver/gpu.py),
which `Analysis.predict` applies.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from memopt.driver.gpu import GpuKernel
from memopt.reports.summary import format_table

HEADER = [
    "kernel",
    "function",
    "blocks",
    "warps",
    "regs",
    "stack B",
    "spill B",
    "smem B",
    "occupancy",
    "loads",
    "stores",
    "static/modelled",
    "sectors/modelled",
    "bw share",
]


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _widths(accesses: dict[int, int]) -> str:
    return " ".join(f"{n}x{bits}b" for bits, n in sorted(accesses.items(), reverse=True)) or "-"


def _blocks(row: GpuKernel) -> str:
    return ",".join(
        f"{k.removeprefix('BLOCK_')}={v}" for k, v in row.launch.constexprs.items() if "BLOCK" in k
    )


def _cells(row: GpuKernel) -> list[str]:
    c = row.compiled
    function = c.fn_name.removeprefix("memopt_")
    if c.error:
        return [row.kernel, function, _blocks(row), "failed: " + c.error, *[""] * 10]
    ratio = row.traffic_ratio
    together = "Σ " if row.modelled_bytes is None else ""  # its kernel's launches together
    shown = f"{together}{ratio:.2f}" if ratio is not None else "loops" if c.has_loop else "-"
    sectors = (
        f"{row.sector_bytes / row.modelled_bytes:.2f}"
        if row.sector_bytes is not None and row.modelled_bytes
        else "-"
    )
    return [
        row.kernel,
        function,
        _blocks(row),
        str(c.num_warps),
        str(c.registers),
        str(c.stack_bytes),
        str(c.spill_bytes),
        str(c.shared_bytes),
        f"{c.occupancy:.2f}",
        _widths(c.loads),
        _widths(c.stores),
        shown,
        sectors,
        f"{row.bandwidth_share:.2f}",
    ]


def _summary(rows: Sequence[GpuKernel]) -> str:
    failed = sum(1 for r in rows if r.compiled.error)
    spilled = sum(1 for r in rows if r.compiled.spills)
    scalar = sum(1 for r in rows if not r.compiled.error and r.compiled.widest_load_bits < 128)
    return (
        f"{len(rows)} launches: {failed} failed to compile, {spilled} spill registers, "
        f"{scalar} without a 128-bit load"
    )


def _title(rows: Sequence[GpuKernel]) -> str:
    if not rows:
        return "No Triton kernels to compile"
    c = rows[0].compiled
    return f"Triton kernels compiled for {c.device} ({c.arch}) by Triton's own compiler, offline"


def format_compiled(rows: Sequence[GpuKernel]) -> str:
    """The text table: one line a launch, then a one-line summary."""
    lines = [
        _title(rows),
        "  (compiled: from the machine code; occupancy derived; bytes modelled; "
        "static/modelled: the code's per-lane accesses x the grid (loop bodies x their trips), "
        "over the modelled bytes (Σ: a kernel's launches together); "
        "sectors/modelled: the modelled bytes in 32-byte sectors, over the modelled bytes; "
        "bw share: the part of the bandwidth its loads in flight can draw, modelled)",
    ]
    widths = [16, 28, 24, 5, 4, 7, 7, 7, 9, 16, 16, 15, 16, 8]
    lines += format_table(HEADER, [_cells(r) for r in rows], "lllrrrrrrllrrr", max_widths=widths)
    lines.append("  " + _summary(rows))
    return "\n".join(lines) + "\n"


def compiled_section(rows: Sequence[GpuKernel]) -> list[str]:
    """The report page's "compiled" section."""
    numeric = {3, 4, 5, 6, 7, 8, 11, 12, 13}
    lines = [
        '<h2 id="compiled">Compiled for a GPU</h2>',
        f"<p>{_esc(_title(rows))}. Registers, stack, spills, shared memory and memory "
        "instructions are <span class=label>compiled</span> (read from the machine code); "
        "occupancy is derived from them and the device's limits; bytes and the bandwidth "
        "share (loads in flight over the bandwidth x latency product, which the prediction "
        "uses) are modelled. "
        f"{_esc(_summary(rows))}.</p>",
        '<table id="compiled-kernels" class="sortable">',
        "<thead><tr>"
        + "".join(
            f'<th class="n">{_esc(h)}</th>' if i in numeric else f"<th>{_esc(h)}</th>"
            for i, h in enumerate(HEADER)
        )
        + "</tr></thead>",
        "<tbody>",
    ]
    for row in rows:
        cells = _cells(row)
        lines.append(
            "<tr>"
            + "".join(
                f'<td class="n">{_esc(c)}</td>' if i in numeric else f"<td>{_esc(c)}</td>"
                for i, c in enumerate(cells)
            )
            + "</tr>"
        )
    lines += ["</tbody>", "</table>"]
    return lines


__all__ = ["compiled_section", "format_compiled"]
