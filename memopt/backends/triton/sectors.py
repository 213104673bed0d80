"""Coalescing: the bytes a Triton kernel moves when memory is read in 32-byte sectors.

A GPU's memory system moves whole sectors: on NVIDIA GPUs a warp's global access is served
as the 32-byte sectors its lanes touch (CUDA C++ Best Practices Guide, "Coalesced Access
to Global Memory"); AMD's CDNA3 L2 line is 128 bytes, filled in 64-byte halves, and
32-byte sectors are the finer of the two, so the figure here is a lower bound there.

Lanes of a Triton program run along a block dimension of the access (Triton's coalescing
pass orders each access's layout by the dimension its address is contiguous in): the
flat block of a pointwise kernel, whose innermost range is its last index variable; the
x and y axes of a 2D tile; the kept and reduced axes of a reduction. For each load and
store of the Kernel IR:

- unit stride along one of those innermost variables: coalesced, it costs its bytes;
- no step along any of them (a value every lane of a row shares): its bytes, from cache;
- otherwise a stride of s elements along the lanes: each element costs the bytes of the
  sector part it drags in, min(32, s x itemsize), and a buffer never more than its span
  rounded up to sectors.

Gathered (indirect) loads cost their modelled bytes. The cost model's bytes (*modelled*,
each buffer read once and written once) are the coalesced case; `sector_bytes` is
*modelled* too, by this rule. memopt's renderer tiles transposed reads (2D tiles), so the
two agree for every kernel it tiles; a strided access it cannot tile (every other element,
a column of a row-major matrix inside a pointwise kernel) costs more.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import sympy

from memopt.backends.codegen.index import linear_coefficient
from memopt.backends.triton.render import RenderedKernel
from memopt.compiler.kernel_ir import Buffer, Kernel, evaluate_size, index_var, reduction_var

SECTOR_BYTES = 32


@dataclass(frozen=True)
class BufferSectors:
    """One buffer's modelled bytes, coalesced and by sectors, and its accesses' lane stride."""

    buffer: str
    nbytes: int  # read once (or written once): the cost model's figure
    sector_bytes: int
    lane_stride: int  # elements between neighbouring lanes: 1 coalesced, 0 shared


def _lane_vars(kernel: Kernel, rendered: RenderedKernel) -> list[sympy.Symbol]:
    """The innermost variable of each block dimension lanes may run along."""
    kept = [index_var(k) for k in range(len(kernel.ranges))]
    reduced = [reduction_var(k) for k in range(len(kernel.reduction_ranges))]
    if rendered.tile is not None:
        y_axis, x_axis = rendered.tile
        return [kept[x_axis], kept[y_axis]]
    lanes = [kept[-1]] if kept else []
    return lanes + ([reduced[-1]] if reduced else [])


def _lane_stride(index: sympy.Expr, lanes: list[sympy.Symbol]) -> int | None:
    """Elements between neighbouring lanes (the smallest step over `lanes`); None when the
    index is not linear in them (a gather)."""
    steps = []
    for var in lanes:
        coefficient = linear_coefficient(index, var)
        if coefficient is None or not coefficient.is_number:
            return None
        steps.append(abs(int(coefficient)))
    if 1 in steps:
        return 1
    moving = [s for s in steps if s]
    return min(moving) if moving else 0


def _span_bytes(buffer: Buffer, sizes: Mapping[str, int]) -> int:
    extent = 1 + sum(
        (evaluate_size(size, sizes) - 1) * evaluate_size(stride, sizes)
        for size, stride in zip(buffer.shape, buffer.stride)
    )
    nbytes = extent * buffer.dtype.itemsize
    return -(-nbytes // SECTOR_BYTES) * SECTOR_BYTES


def kernel_sectors(
    kernel: Kernel, rendered: RenderedKernel, sizes: Mapping[str, int]
) -> list[BufferSectors]:
    """Each buffer's bytes, coalesced and by sectors, at `sizes`."""
    lanes = _lane_vars(kernel, rendered)
    strides: dict[str, int | None] = {}

    def note(buffer: str, index: sympy.Expr, indirect: bool) -> None:
        stride = None if indirect else _lane_stride(sympy.sympify(index), lanes)
        previous = strides.get(buffer, 1)
        if stride is None or previous is None:
            strides[buffer] = None
        else:
            strides[buffer] = max(previous, stride)

    for value in kernel.values:
        if value.op == "load":
            buffer, index, indirect, _masked = value.arg
            note(buffer, index, bool(indirect))
    for store in kernel.stores:
        note(store.buffer, store.index, False)
    found = []
    for buffer in (*kernel.inputs, *kernel.outputs):
        numel = 1
        for size in buffer.shape:
            numel *= evaluate_size(size, sizes)
        itemsize = buffer.dtype.itemsize
        nbytes = numel * itemsize
        stride = strides.get(buffer.name, 1)
        if stride is None or stride <= 1:
            sector = nbytes
        else:
            sector = min(numel * min(SECTOR_BYTES, stride * itemsize), _span_bytes(buffer, sizes))
            sector = max(sector, nbytes)
        found.append(BufferSectors(buffer.name, nbytes, sector, 1 if stride is None else stride))
    return found


def sector_bytes(kernel: Kernel, rendered: RenderedKernel, sizes: Mapping[str, int]) -> int:
    """The kernel's modelled bytes when memory moves in 32-byte sectors."""
    return sum(b.sector_bytes for b in kernel_sectors(kernel, rendered, sizes))


__all__ = ["SECTOR_BYTES", "BufferSectors", "kernel_sectors", "sector_bytes"]
