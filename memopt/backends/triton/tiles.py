"""The tile sizes a matmul template launches with.

A matmul template is a Kernel IR kernel holding one `dot` (kernel kind "matmul"): the
matmul, the pointwise ops that feed its operands (prologue) and those that consume its
result (epilogue). Its traffic is counted by the rule of every kernel: each input read
once, each output written once; the tiles below decide how a GPU schedules it, not what
the cost model counts (on a GPU an operand is re-read once per tile of the other side,
from L2 in the common case, which the rule leaves out as it does for every kernel).
"""

from __future__ import annotations

# Triton's interpreter costs ~1.8 ms per program (measured on the 2-core development VM):
# on the CPU one program takes tiles up to 128 wide. tl.dot needs every block dimension >= 16.
INTERPRETER_TILE_MAX = 128
# GPU tiles and warps by operand width: the largest of a few candidates that compile with
# no spills and no stack for sm_80, sm_90 and gfx942 (GPT-2's templates, compiled offline:
# backends/triton/offline.py). 16-bit operands: 128x128 tiles read each operand half as
# often as 64x64 ones; at 4 warps 64x64 spilled 20 bytes a thread on sm_80, 128x128 spilled
# kilobytes, and 8 warps hold it. fp32 (IEEE dots, FMA loops): 64x64 over 4 warps.
GPU_TILES = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}
GPU_HALF_TILES = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}
MATMUL_WARPS = {False: 4, True: 8}  # by "16-bit operands"
MIN_TILE = 16


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def matmul_tiles(m: int, n: int, k: int, on_gpu: bool, half: bool = False) -> dict[str, int]:
    """BLOCK_M, BLOCK_N, BLOCK_K of a matmul template launch (the one place they are chosen);
    `half`: both operands are fp16 or bf16."""
    gpu = GPU_HALF_TILES if half else GPU_TILES
    cap = dict(gpu) if on_gpu else dict.fromkeys(GPU_TILES, INTERPRETER_TILE_MAX)
    return {
        name: max(MIN_TILE, min(_next_pow2(size), cap[name]))
        for name, size in (("BLOCK_M", m), ("BLOCK_N", n), ("BLOCK_K", k))
    }


def describe_tiles(tiles: dict[str, int]) -> str:
    return f"{tiles['BLOCK_M']}x{tiles['BLOCK_N']}x{tiles['BLOCK_K']}"
