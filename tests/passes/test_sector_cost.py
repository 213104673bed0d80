"""Sectors in the cost model: a generated kernel that runs on Triton charges a strided
access the 32-byte sectors it drags in (cost.sector_nbytes, backends/triton/sectors.py),
and the layout and fusion passes price candidates with it there.

Byte counts are worked out by hand (float32: 4 B an element, 32 B a sector). The same
graphs on the C++ backend keep their bytes. Values are compared with eager through
torch.compile (the Triton kernels under Triton's interpreter on this CPU).
"""

from __future__ import annotations

import pytest
import sympy
import torch

import memopt
from memopt.backends.runtime.kernels import FusedKernel
from memopt.backends.triton.render import tile_axes
from memopt.backends.triton.runtime import render
from memopt.backends.triton.sectors import sector_bytes, strided_buffers
from memopt.compiler.cost import sector_nbytes
from memopt.compiler.graph import evaluate

import kernel_examples as examples

pytest.importorskip("triton")

F32 = 4
SECTOR = 32
BACKENDS = ("triton", "cpp")


def _fused(analysis) -> list[FusedKernel]:
    return [
        node.target
        for graph in analysis.graphs
        for node in graph.gm.graph.nodes
        if isinstance(node.target, FusedKernel)
    ]


def _decisions(analysis, pass_name: str) -> list:
    return [d for e in analysis.ledger if e.pass_name == pass_name for d in e.decisions]


def _compiled_matches(fn, *inputs, backend: str) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="memopt", options={"backend": backend})
    for got, want in zip(compiled(*inputs), fn(*inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- one kernel's bytes ------------------------------------------------------------------

# (name, fn, input shape, read bytes on Triton as a multiple of the plain read)
KERNELS = [
    ("coalesced", lambda x: x * 2 + 1, (32, 64), 1),
    ("stride2", lambda x: x[:, ::2] * 2 + 1, (32, 64), 2),  # 8 B of each 32 B sector used
    ("stride4", lambda x: x[:, ::4] * 2 + 1, (32, 64), 4),
    ("stride8", lambda x: x[:, ::8] * 2 + 1, (32, 128), 8),  # one element a sector
    ("stride16", lambda x: x[:, ::16] * 2 + 1, (32, 256), 8),  # never more than a sector
    ("column", lambda x: x[:, 3] * 2 + 1, (64, 16), 8),  # a column of a row-major matrix
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "fn", "shape", "factor"), KERNELS, ids=[k[0] for k in KERNELS])
def test_a_strided_read_costs_its_sectors_on_triton_only(name, fn, shape, factor, backend):
    x = torch.randn(shape)
    a = memopt.analyze(fn, x, backend=backend)
    (kernel,) = a.kernels
    out = fn(x)
    plain = out.numel() * F32  # one element read per element written
    assert kernel.kind == "pointwise"
    assert kernel.write_bytes == out.numel() * F32
    assert kernel.read_bytes == (factor if backend == "triton" else 1) * plain
    assert a.bytes_moved == kernel.read_bytes + kernel.write_bytes
    (fused,) = _fused(a)
    # The reports' figure (driver/gpu.py, from the rendered kernel) is the cost's.
    assert sector_bytes(fused.kernel, render(fused.kernel), {}) == plain * factor + plain


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_transposed_read_the_renderer_tiles_costs_its_bytes(backend):
    x, y = torch.randn(32, 64), torch.randn(64, 32)
    a = memopt.analyze(lambda x, y: x.t() * 2 + y, x, y, backend=backend)
    (kernel,) = a.kernels
    assert (kernel.read_bytes, kernel.write_bytes) == (2 * 2048 * F32, 2048 * F32)
    if backend == "triton":
        (fused,) = _fused(a)
        # The output takes x.t()'s strides (eager's): stored along range 0, y read along 1.
        assert tile_axes(fused.kernel) == render(fused.kernel).tile == (1, 0)
        assert strided_buffers(fused.kernel) == {}


def test_the_tile_decision_is_the_renderers():
    """tile_axes reads the decision off the Kernel IR; the renderer takes the same one."""
    for build in (examples.transposed_read, examples.add_broadcast, examples.column_sum):
        kernel, *_ = build()
        assert tile_axes(kernel) == render(kernel).tile
    kernel, *_ = examples.transposed_read()
    assert tile_axes(kernel) == (0, 1) and strided_buffers(kernel) == {}


def test_the_span_caps_a_strided_read():
    # (4, N) at strides (2, 8): lanes 8 elements apart (32 B each), but the view spans only
    # 8 N elements (every sector of an (N, 8) matrix once): its span in sectors.
    n = 64
    shape, stride = (sympy.Integer(4), sympy.Integer(n)), (sympy.Integer(2), sympy.Integer(8))
    assert sector_nbytes(shape, stride, F32, 8) == 2048  # 511 elements, 2044 B: 64 sectors
    assert sector_nbytes(shape, stride, F32, 1) == 4 * n * F32  # coalesced: its bytes
    assert sector_nbytes(shape, stride, F32, 0) == 4 * n * F32  # shared: its bytes


def test_a_column_of_a_dynamic_width_matrix_stays_symbolic():
    x = torch.randn(64, 16)
    a = memopt.analyze(lambda x: x[:, 3] * 2 + 1, x, dynamic=True, backend="triton")
    (kernel,) = a.kernels
    (graph,) = a.graphs
    by_value = {value: name for name, value in graph.symbols.items()}
    symbols = {s.name: s for s in kernel.read_expr.free_symbols}
    rows, cols = symbols[by_value[64]], symbols[by_value[16]]  # both dims, nothing else
    assert len(symbols) == 2
    assert kernel.read_bytes == 64 * SECTOR  # 16 elements apart: one element a sector

    def at(r: int, c: int) -> int:
        return evaluate(kernel.read_expr, {rows: r, cols: c})

    assert at(100, 40) == 100 * SECTOR
    assert at(100, 3) == 100 * 3 * F32  # 12 B apart: 12 B of sector an element
    assert at(100, 2) == 100 * 2 * F32  # under its span (99 * 2 + 1 elements, 800 B)
    assert evaluate(kernel.write_expr, {rows: 100, cols: 40}) == 100 * F32

    plain = memopt.analyze(lambda x: x[:, 3] * 2 + 1, x, dynamic=True, backend="cpp")
    assert plain.kernels[0].read_bytes == 64 * F32


# -- the layout pass: a copy kept because of sectors -----------------------------------------


def strided_copy_read_twice(x):
    """Every 8th column copied, then reduced along both axes: two kernels that cannot share
    a read (different reduction axes)."""
    c = x[:, ::8].contiguous()
    return c.sum(1) * 2, c.sum(0) + 1


def test_layout_keeps_a_copy_whose_source_two_kernels_would_read_strided():
    x = torch.randn(16, 128)
    n = 16 * 16 * F32  # the copied (16, 16) block: 1024 B
    rows = cols = 16 * F32
    triton = memopt.analyze(strided_copy_read_twice, x, backend="triton")
    (kept,) = _decisions(triton, "layout")
    assert kept.code == "layout.copy_kept_sectors" and not kept.applied
    # Kept: one kernel reads the columns (8 x 1024 B of sectors) and writes the copy and the
    # row sums; the other reads the copy. Removed: each kernel reads the columns itself.
    with_copy = (8 * n + n + rows) + (n + cols)
    without = 2 * (8 * n + rows)
    assert kept.figures == {"sectors_with_copy": with_copy, "sectors_without": without}
    assert kept.bytes_saved == with_copy - without == -6144
    assert "by bytes the removal would save 2048 B" in kept.reason
    assert triton.bytes_moved == with_copy
    assert [k.ops[0] for k in triton.kernels] == ["aten.clone.default", "aten.sum.dim_IntList"]

    cpp = memopt.analyze(strided_copy_read_twice, x, backend="cpp")
    (removed,) = _decisions(cpp, "layout")
    assert removed.code == "layout.copy_removed" and removed.applied
    assert removed.bytes_saved == 2 * n
    assert cpp.bytes_moved == 2 * (n + rows)

    for backend in BACKENDS:
        _compiled_matches(strided_copy_read_twice, x, backend=backend)


# -- the fusion pass: a merge chosen because of sectors ----------------------------------------


def strided_read_by_two_reductions(x, z):
    """Every 8th column read by two chains: `a` can join the column sums (sharing the
    strided read) or the row sums of `a + z` (saving `a`'s write and read), not both."""
    xs = x[:, ::8]
    a = xs * 2
    return (xs * 3).sum(0), (a + z).sum(1)


def test_fusion_shares_a_strided_read_on_triton_and_saves_an_intermediate_on_cpp():
    x, z = torch.randn(16, 128), torch.randn(16, 16)
    n = 16 * 16 * F32  # 1024 B: the strided block's bytes, and z's, and a's
    rows = cols = 16 * F32

    triton = memopt.analyze(strided_read_by_two_reductions, x, z, backend="triton")
    first = next(d for d in _decisions(triton, "fusion") if d.applied)
    assert first.code == "fusion.horizontal" and first.bytes_saved == 8 * n
    assert f"({n} B by bytes" in first.reason
    # One kernel reads the strided block once (8 x 1024 B of sectors) and z, writes a + z and
    # the column sums; the row sum of a + z stays an ATen call. The vertical choice would
    # read the block twice: 2 * 8 * n + n + rows + cols = 17536 B.
    fused, row_sum = triton.kernels
    assert (fused.read_bytes, fused.write_bytes) == (8 * n + n, n + cols)
    assert (row_sum.kind, row_sum.read_bytes, row_sum.write_bytes) == ("aten", n, rows)
    assert triton.bytes_moved == 11392 < 2 * 8 * n + n + rows + cols

    cpp = memopt.analyze(strided_read_by_two_reductions, x, z, backend="cpp")
    first = next(d for d in _decisions(cpp, "fusion") if d.applied)
    assert first.code == "fusion.vertical" and first.bytes_saved == 2 * n
    assert [len(k.ops) for k in cpp.kernels] == [2, 3]  # (xs * 3).sum(0); (a + z).sum(1)
    assert cpp.bytes_moved == (n + cols) + (2 * n + rows)

    for backend in BACKENDS:
        _compiled_matches(strided_read_by_two_reductions, x, z, backend=backend)
