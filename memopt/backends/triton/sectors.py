"""Coalescing: the bytes a Triton kernel moves when memory is read in 32-byte sectors.

A GPU's memory system moves whole sectors: on NVIDIA GPUs a warp's global access is served
as the 32-byte sectors its lanes touch (CUDA C++ Best Practices Guide, "Coalesced Access
to Global Memory"); AMD's CDNA3 L2 line is 128 bytes, filled in 64-byte halves, and
32-byte sectors are the finer of the two, so the figure here is a lower bound there.

Lanes of a Triton program run along a block dimension of the access (Triton's coalescing
pass orders each access's layout by the dimension its address is contiguous in): the
flat block of a pointwise kernel, whose innermost range is its last index variable; the
x and y axes of a 2D tile (`render.tile_axes`, the renderer's own decision, read off the
Kernel IR without rendering); the kept and reduced axes of a reduction. For each load and
store of the Kernel IR:

- unit stride along one of those innermost variables: coalesced, it costs its bytes;
- no step along any of them (a value every lane of a row shares): its bytes, from cache;
- otherwise a stride of s elements along the lanes: each element costs the bytes of the
  sector part it drags in, min(32, s x itemsize), and a buffer never more than its span
  rounded up to sectors (`cost.sector_nbytes`). A symbolic stride (a column of a matrix of
  dynamic width) stays symbolic.

Gathered (indirect) loads cost their modelled bytes. The cost model's bytes (*modelled*,
each buffer read once and written once) are the coalesced case; the sector figures are
*modelled* too, by this rule, and are what `FusedKernel.memopt_cost` charges a kernel that
runs on Triton (`buffer_lane_strides`). memopt's renderer tiles transposed reads (2D
tiles), so the two agree for every kernel it tiles; a strided access it cannot tile (every
other element, a column of a row-major matrix inside a pointwise kernel) costs more.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import sympy

from memopt.backends.codegen.index import linear_coefficient
from memopt.backends.registry import Backend, Feature
from memopt.backends.triton.render import RenderedKernel, tile_axes
from memopt.compiler.cost import SECTOR_BYTES, sector_nbytes
from memopt.compiler.kernel_ir import Buffer, Kernel, evaluate_size, index_var, reduction_var

ZERO = sympy.Integer(0)
ONE = sympy.Integer(1)


@dataclass(frozen=True)
class BufferSectors:
    """One buffer's modelled bytes, coalesced and by sectors, and its accesses' lane stride."""

    buffer: str
    nbytes: int  # read once (or written once): the cost model's figure
    sector_bytes: int
    lane_stride: int  # elements between neighbouring lanes: 1 coalesced, 0 shared


def moves_sectors(backend: Backend) -> bool:
    """Whether kernels on `backend` are priced in 32-byte sectors (`Feature.SECTOR_MEMORY`:
    Triton's, GPU kernels, under the interpreter too, which stands in for a GPU). The C++ and
    reference backends' keep their bytes: a CPU moves 64-byte cache lines, not modelled."""
    return backend.supports(Feature.SECTOR_MEMORY)


def _lane_vars(kernel: Kernel, tile: tuple[int, int] | None) -> list[sympy.Symbol]:
    """The innermost variable of each block dimension lanes may run along."""
    kept = [index_var(k) for k in range(len(kernel.ranges))]
    reduced = [reduction_var(k) for k in range(len(kernel.reduction_ranges))]
    if tile is not None:
        y_axis, x_axis = tile
        return [kept[x_axis], kept[y_axis]]
    lanes = [kept[-1]] if kept else []
    return lanes + ([reduced[-1]] if reduced else [])


def _lane_stride(
    index: sympy.Expr, lanes: list[sympy.Symbol], sizes: frozenset[sympy.Symbol]
) -> sympy.Expr | None:
    """Elements between neighbouring lanes (the smallest step over `lanes`, a number or an
    expression of the size symbols `sizes`); None when the index is not linear in them (a
    gather, a division)."""
    steps = []
    for var in lanes:
        coefficient = linear_coefficient(index, var)
        if coefficient is None or not coefficient.free_symbols <= sizes:
            return None
        steps.append(abs(coefficient) if coefficient.is_number else coefficient)
    if any(step == 1 for step in steps):
        return ONE
    moving = [step for step in steps if step != 0]
    return sympy.Min(*moving) if moving else ZERO


def buffer_lane_strides(
    kernel: Kernel, tile: tuple[int, int] | None
) -> dict[str, sympy.Expr | None]:
    """Each buffer's widest lane stride over its loads and stores, when the kernel renders
    with `tile`: 1 coalesced, 0 shared by the lanes, None for a gathered or non-affine
    access (all three cost their bytes)."""
    lanes = _lane_vars(kernel, tile)
    sizes = frozenset(kernel.size_symbols)
    strides: dict[str, sympy.Expr | None] = {}

    def note(buffer: str, index: sympy.Expr, indirect: bool) -> None:
        stride = None if indirect else _lane_stride(sympy.sympify(index), lanes, sizes)
        previous = strides.get(buffer, ONE)
        if stride is None or previous is None:
            strides[buffer] = None
        else:
            strides[buffer] = sympy.Max(previous, stride)

    for value in kernel.values:
        if value.op == "load":
            buffer, index, indirect, _masked = value.arg
            note(buffer, index, bool(indirect))
    for store in kernel.stores:
        note(store.buffer, store.index, False)
    return strides


def strided_buffers(kernel: Kernel) -> dict[str, sympy.Expr]:
    """The buffers a Triton kernel reads or writes with lanes more than one element apart,
    and that stride: what a kernel costs beyond its bytes. Empty for a matmul template (its
    own tiles) and a kernel Triton does not run (nested reductions)."""
    if kernel.kind == "matmul" or kernel.inner_ranges:
        return {}
    strides = buffer_lane_strides(kernel, tile_axes(kernel))
    return {
        name: stride
        for name, stride in strides.items()
        if stride is not None and not (stride.is_number and stride <= 1)
    }


def _sector_figure(buffer: Buffer, stride: sympy.Expr | None) -> sympy.Expr:
    return sector_nbytes(buffer.shape, buffer.stride, buffer.dtype.itemsize, stride)


def kernel_sectors(
    kernel: Kernel, rendered: RenderedKernel, sizes: Mapping[str, int]
) -> list[BufferSectors]:
    """Each buffer's bytes, coalesced and by sectors, at `sizes`."""
    strides = buffer_lane_strides(kernel, rendered.tile)
    found = []
    for buffer in (*kernel.inputs, *kernel.outputs):
        stride = strides.get(buffer.name, ONE)
        plain = _sector_figure(buffer, None)
        nbytes = evaluate_size(plain, sizes)
        sector = evaluate_size(_sector_figure(buffer, stride), sizes)
        lane_stride = 1 if stride is None else evaluate_size(stride, sizes)
        found.append(BufferSectors(buffer.name, nbytes, sector, lane_stride))
    return found


def sector_bytes(kernel: Kernel, rendered: RenderedKernel, sizes: Mapping[str, int]) -> int:
    """The kernel's modelled bytes when memory moves in 32-byte sectors."""
    return sum(b.sector_bytes for b in kernel_sectors(kernel, rendered, sizes))


__all__ = [
    "SECTOR_BYTES",
    "BufferSectors",
    "buffer_lane_strides",
    "kernel_sectors",
    "moves_sectors",
    "sector_bytes",
    "strided_buffers",
]
