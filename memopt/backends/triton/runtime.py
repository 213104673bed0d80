"""Compile and launch rendered Triton kernels: block sizes and warps, chosen in one place.

Sources are cached and modules imported by `launching.py`; on CPU tensors the kernels run
under Triton's interpreter (see its docstring), on GPU tensors compiled.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import sympy

from memopt.backends.registry import Sizes, Tensors
from memopt.backends.triton.launching import (
    WARP_THREADS,
    Launch,
    cache_dir,
    clear_memory_cache,
    launch,
    load_module,
    on_gpu,
    recording_launches,
    write_source,
)
from memopt.backends.triton.matmul import plan_matmul, render_matmul
from memopt.backends.triton.render import PERSISTENT_MAX, RenderedKernel, render_elementwise
from memopt.compiler.kernel_ir import Kernel, evaluate_size


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# Triton's interpreter costs ~1.8 ms per program instance whatever its block size
# (measured on the 2-core development VM), so on the CPU one program covers up to 64Ki
# elements. On a GPU blocks are sized for registers and occupancy instead.
INTERPRETER_TILE_ELEMENTS = 1 << 16
# GPU blocks: elements per program, and per thread. 8 fp32 elements a thread is two 128-bit
# accesses per stream, and keeps each live [XBLOCK, RBLOCK] value at 8 registers: fused
# reductions with a dozen live values stay well under the 255-register limit, unspilled
# (checked by compiling them: tests/backends/test_triton_offline.py).
GPU_POINTWISE_XBLOCK = 1024
GPU_REDUCTION_TILE_ELEMENTS = 4096
GPU_TILE_2D = 64
GPU_ACROSS_ROWS_XBLOCK = 128  # columns a program of a column reduction covers
GPU_ELEMENTS_PER_THREAD = 8
GPU_MAX_WARPS = 16


def block_sizes(
    rendered: RenderedKernel, numels: Mapping[str, int], on_gpu: bool
) -> dict[str, int]:
    """The constexpr block sizes of one launch (the one place they are chosen).

    `numels`: "xnumel" (rows of a reduction, points of a 1D pointwise kernel), "rnumel",
    and for a 2D tile "tile_x"/"tile_y" (its extents). RBLOCK was fixed when rendering: a
    persistent reduction holds a whole row, a looped one steps by LOOP_RBLOCK; except that
    on a GPU a column reduction (`across_rows`) steps by a short RBLOCK under wide columns.
    """
    budget = INTERPRETER_TILE_ELEMENTS
    if rendered.tile is not None:
        side = GPU_TILE_2D if on_gpu else 256
        xblock = min(_next_pow2(numels["tile_x"]), side)
        yblock = min(_next_pow2(numels["tile_y"]), GPU_TILE_2D if on_gpu else budget // xblock)
        return {"XBLOCK": xblock, "YBLOCK": yblock}
    if not rendered.reduction:
        cap = GPU_POINTWISE_XBLOCK if on_gpu else budget
        return {"XBLOCK": min(_next_pow2(numels["xnumel"]), cap)}
    if on_gpu and rendered.across_rows:
        # Contiguous along the rows: wide in x for full-width accesses, short in r (looped).
        xblock = min(_next_pow2(numels["xnumel"]), GPU_ACROSS_ROWS_XBLOCK)
        rblock = min(_next_pow2(numels["rnumel"]), GPU_REDUCTION_TILE_ELEMENTS // xblock)
        return {"XBLOCK": xblock, "RBLOCK": rblock}
    rblock = rendered.rblock or 1
    rows = (GPU_REDUCTION_TILE_ELEMENTS if on_gpu else budget) // rblock
    return {"XBLOCK": max(1, min(_next_pow2(numels["xnumel"]), rows)), "RBLOCK": rblock}


def num_warps(blocks: Mapping[str, int]) -> int:
    """Warps of a GPU program over a block of `blocks`' product: GPU_ELEMENTS_PER_THREAD
    elements a thread, between 1 and GPU_MAX_WARPS warps."""
    elements = 1
    for size in blocks.values():
        elements *= size
    return max(1, min(GPU_MAX_WARPS, elements // (WARP_THREADS * GPU_ELEMENTS_PER_THREAD)))


def render(kernel: Kernel) -> RenderedKernel:
    """Triton source for a Kernel IR kernel; raises Unsupported for ops it cannot render."""
    if kernel.kind == "matmul":
        return render_matmul(kernel)
    return render_elementwise(kernel)


def source_file(kernel: Kernel) -> Path:
    """The kernel's Triton source written into the cache (no compile, no GPU needed)."""
    return write_source(render(kernel).source)


class TritonKernel:
    """A Kernel rendered to Triton, its source cached on disk; call it to launch.

    `source` is the generated module's text and `source_path` its cache file. The module is
    imported at the first launch, when the tensors' device is known (see the module doc).
    """

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.rendered = render(kernel)
        self.source = self.rendered.source
        self.source_path = write_source(self.source)
        self.tiles: dict[str, int] | None = None  # a matmul template's last launch

    def __call__(self, inputs: Tensors, outputs: Tensors, sizes: Sizes) -> None:
        """Run the kernel (the CompiledKernel contract, backends/registry.py)."""
        kernel, rendered = self.kernel, self.rendered
        tensors = [*inputs, *outputs]
        gpu = on_gpu(tensors)
        if rendered.template == "matmul":
            planned = plan_matmul(kernel, rendered, str(self.source_path), tensors, sizes, gpu)
            if planned is not None:
                self.tiles = {k: v for k, v in planned.constexprs.items() if k.startswith("BLOCK_")}
                launch(planned, gpu)
            return
        xnumel = evaluate_size(sympy.Mul(*kernel.ranges), sizes)
        rnumel = evaluate_size(sympy.Mul(*kernel.reduction_ranges), sizes)
        numels = {"xnumel": xnumel, "rnumel": rnumel}
        if rendered.tile is not None:
            y_axis, x_axis = rendered.tile
            numels["tile_x"] = evaluate_size(kernel.ranges[x_axis], sizes)
            numels["tile_y"] = xnumel // max(numels["tile_x"], 1)
        if xnumel == 0:
            return  # no row, no point: nothing to store
        blocks = block_sizes(rendered, numels, gpu)
        if rendered.tile is not None:
            # One program per [YBLOCK, XBLOCK] tile, on a 1D grid (the kernel splits its id).
            x_tiles = -(-numels["tile_x"] // blocks["XBLOCK"])
            grid = x_tiles * -(-numels["tile_y"] // blocks["YBLOCK"])
        else:
            grid = -(-xnumel // blocks["XBLOCK"])
        size_args = [int(sizes[name]) for name in rendered.size_names]
        args = (*tensors, *size_args, xnumel, rnumel)
        trips = (grid * -(-rnumel // blocks["RBLOCK"]),) * rendered.loops if rendered.looped else ()
        planned = Launch(
            str(self.source_path),
            rendered.fn_name,
            grid,
            args,
            blocks,
            num_warps(blocks),
            trips=trips,
        )
        launch(planned, gpu)


def compile_kernel(kernel: Kernel) -> TritonKernel:
    """The Triton backend's entry point: render `kernel`, cache its source, return a launcher.

    Raises Unsupported (from render) for an op the backend cannot express.
    """
    return TritonKernel(kernel)


__all__ = [
    "PERSISTENT_MAX",
    "Launch",
    "TritonKernel",
    "block_sizes",
    "cache_dir",
    "clear_memory_cache",
    "compile_kernel",
    "launch",
    "load_module",
    "num_warps",
    "on_gpu",
    "recording_launches",
    "render",
    "source_file",
    "write_source",
]
