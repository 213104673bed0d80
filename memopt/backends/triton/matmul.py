"""Kernel IR matmul templates -> Triton: tiles of `tl.dot` with a fused prologue and epilogue.

A template kernel (kind "matmul") iterates over its matmul's output (*batch, M, N) and
reduces K; its one `dot(a, b)` value is the contraction. The skeleton:

- one program per [BLOCK_M, BLOCK_N] output tile of one batch element, on a 1D grid (the
  program id splits into batch, m tile and n tile; GPU grids allow 65535 programs on y/z);
- a loop over K in steps of BLOCK_K: the values of `a` (a [BLOCK_M, BLOCK_K] tile: loads
  through the operand's own strides, so a transposed operand is read in place, and the
  prologue's pointwise ops) and of `b` ([BLOCK_K, BLOCK_N]) are computed from the IR with
  the shared op tables, lanes past K are zeroed, and `acc += tl.dot(a, b)` in fp32;
- after the loop the epilogue: every other value, at the tile's (m, n) points, with the
  accumulator standing for the dot, stored (several stores when the kernel has several
  outputs) with masks for any size.

Values that do not depend on K (a row scale of the prologue) are computed once per tile,
before the loop. 16-bit operands: their values are held in fp32 as everywhere else; with
LOW_PRECISION_DOT (set on a GPU) two fp16 or two bf16 operands, or fp32 casts of them
(`half_operands`), go to tl.dot in that dtype (exact: the held values are already rounded),
for the tensor cores, with 128x128 tiles and 8 warps (`tiles.py`); in Triton's
interpreter the dot runs in fp32 (its bf16 arithmetic is wrong).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import sympy
import torch

from memopt.backends.triton.launching import Launch, dot_precision
from memopt.backends.triton.ops import HALF, Unsupported, tl_dtype
from memopt.backends.triton.render import (
    RenderedKernel,
    Renderer,
    Scope,
    function_name,
    module_source,
)
from memopt.backends.triton.tiles import MATMUL_WARPS, matmul_tiles
from memopt.compiler.kernel_ir import (
    DOT,
    Kernel,
    Value,
    evaluate_size,
    index_var,
    reduction_var,
)


def _exact_width(value: Value) -> torch.dtype | None:
    """The 16-bit float type that holds `value` exactly: its own, or its source's when it is
    a cast of a 16-bit value to fp32 (a widened operand); None otherwise."""
    if value.dtype in HALF:
        return value.dtype
    if value.op == "cast" and value.dtype == torch.float32 and value.args[0].dtype in HALF:
        return value.args[0].dtype
    return None


def half_operands(kernel: Kernel) -> torch.dtype | None:
    """The 16-bit type both operands of the kernel's dot hold exactly, else None. Such a dot
    runs in that type on a GPU with fp32 accumulation: the products of two 16-bit values
    are exact in fp32, so only the order of the sum can differ from an fp32 dot."""
    (dot,) = [v for v in kernel.values if v.op == DOT]
    a, b = (_exact_width(v) for v in dot.args)
    return a if a is not None and a == b else None


class MatmulRenderer(Renderer):
    def __init__(self, kernel: Kernel) -> None:
        super().__init__(kernel)
        dots = [v for v in kernel.values if v.op == DOT]
        if len(dots) != 1 or len(kernel.reduction_ranges) != 1 or len(kernel.ranges) < 2:
            raise Unsupported("a matmul template has one dot over (*batch, M, N) x K")
        (self.dot,) = dots
        self.reduction = False  # no reduce() values; the K loop is the template's own
        self.persistent = False
        count = len(kernel.ranges)
        self.m_var, self.n_var = index_var(count - 2), index_var(count - 1)
        self.k_var = reduction_var(0)
        self.zero_block = "zero"

    def mask_for(self, symbols: set[sympy.Symbol]) -> str:
        # Masks shaped like what the value varies along: a row value of the prologue is
        # [BLOCK_M, 1], an operand tile [BLOCK_M, BLOCK_K], the epilogue [BLOCK_M, BLOCK_N].
        parts = [
            name
            for var, name in ((self.m_var, "mmask"), (self.n_var, "nmask"), (self.k_var, "kmask"))
            if var in symbols
        ]
        return " & ".join(parts) if parts else "one_mask"

    def operand(self, value, k_axis: str, shape: str, body: Scope) -> str:
        scope = Scope(indent="        ")
        scope.emit(f"r0 = k0 + tl.arange(0, BLOCK_K){k_axis}")
        scope.emit("kmask = r0 < knumel")
        name = self.value(value, scope)
        scope.emit(f"{name}_tile = tl.where(kmask, tl.broadcast_to({name}, {shape}), 0.0)")
        body.lines.extend(scope.lines)
        return f"{name}_tile"

    def render(self) -> RenderedKernel:
        kernel = self.kernel
        size_names = [s.name for s in kernel.size_symbols]
        buffers = [b.name for b in (*kernel.inputs, *kernel.outputs)]
        blocks = ["BLOCK_M", "BLOCK_N", "BLOCK_K", "LOW_PRECISION_DOT", "DOT_PRECISION"]
        args = [*buffers, *size_names, "bnumel", "mnumel", "nnumel", "knumel"]
        args += [f"{b}: tl.constexpr" for b in blocks]
        wide = self.needs_int64()
        body = self.outer
        body.emit(f"pid = {'tl.program_id(0).to(tl.int64)' if wide else 'tl.program_id(0)'}")
        body.emit("m_tiles = (mnumel + BLOCK_M - 1) // BLOCK_M")
        body.emit("n_tiles = (nnumel + BLOCK_N - 1) // BLOCK_N")
        body.emit("pid_b = pid // (m_tiles * n_tiles)")
        body.emit("pid_m = (pid // n_tiles) % m_tiles")
        body.emit("pid_n = pid % n_tiles")
        batch = kernel.ranges[:-2]
        if batch:
            self.decompose("pid_b", batch, "i", body)
        m, n = len(kernel.ranges) - 2, len(kernel.ranges) - 1
        body.emit(f"i{m} = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]")
        body.emit(f"i{n} = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]")
        body.emit(f"mmask = i{m} < mnumel")
        body.emit(f"nmask = i{n} < nnumel")
        body.emit("zero = tl.full([1, 1], 0, tl.int32)")
        body.emit("one_mask = zero == 0")
        body.emit("acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)")
        loop = Scope(indent="        ")
        a, b = self.dot.args
        a_tile = self.operand(a, "[None, :]", "[BLOCK_M, BLOCK_K]", loop)
        b_tile = self.operand(b, "[:, None]", "[BLOCK_K, BLOCK_N]", loop)
        low = half_operands(self.kernel)
        if low is not None:
            target = tl_dtype(low)
            loop.emit("if LOW_PRECISION_DOT:")
            loop.emit(f"    acc += tl.dot({a_tile}.to({target}), {b_tile}.to({target}))")
            loop.emit("else:")
            loop.emit(f"    acc += tl.dot({a_tile}, {b_tile}, input_precision=DOT_PRECISION)")
        else:
            loop.emit(f"acc += tl.dot({a_tile}, {b_tile}, input_precision=DOT_PRECISION)")
        body.lines.append("    for k0 in range(0, knumel, BLOCK_K):")
        body.lines.extend(loop.lines)
        name = self.name(self.dot)
        body.emit(f"{name} = acc")
        body.names[self.dot] = name
        for store in kernel.stores:
            if not store.is_row:
                raise Unsupported("a matmul template stores only (m, n) values")
            self.store(store, body)
        fn_name = function_name(kernel)
        return RenderedKernel(
            source=module_source(fn_name, args, body.lines),
            fn_name=fn_name,
            arg_names=buffers,
            size_names=size_names,
            reduction=False,
            persistent=False,
            rblock=None,
            ranges=kernel.ranges,
            reduction_ranges=kernel.reduction_ranges,
            template="matmul",
        )


def render_matmul(kernel: Kernel) -> RenderedKernel:
    """Triton source for a matmul template kernel; raises Unsupported if it is not one."""
    return MatmulRenderer(kernel).render()


def plan_matmul(
    kernel: Kernel,
    rendered: RenderedKernel,
    source_path: str,
    tensors: Sequence[torch.Tensor],
    sizes: Mapping[str, int],
    on_gpu: bool,
) -> Launch | None:
    """The launch of a rendered matmul template (None when its result is empty)."""
    *batch, m, n = (evaluate_size(r, sizes) for r in kernel.ranges)
    k = evaluate_size(kernel.reduction_ranges[0], sizes)
    bnumel = 1
    for size in batch:
        bnumel *= size
    half = half_operands(kernel) is not None
    tiles = matmul_tiles(m, n, k, on_gpu, half)
    if bnumel * m * n == 0:
        return None
    grid = bnumel * -(-m // tiles["BLOCK_M"]) * -(-n // tiles["BLOCK_N"])
    size_args = [int(sizes[name]) for name in rendered.size_names]
    args = (*tensors, *size_args, bnumel, m, n, k)
    constexprs = {**tiles, "LOW_PRECISION_DOT": on_gpu, "DOT_PRECISION": dot_precision(on_gpu)}
    trips = (grid * -(-k // tiles["BLOCK_K"]),)
    return Launch(
        source_path, rendered.fn_name, grid, args, constexprs, MATMUL_WARPS[half], trips=trips
    )


__all__ = ["plan_matmul", "render_matmul"]
