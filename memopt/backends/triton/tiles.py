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
GPU_TILES = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}  # fp32 acc: 16 KiB of registers
MATMUL_WARPS = 4  # a 64x64 fp32 accumulator is 32 registers a thread
MIN_TILE = 16


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def matmul_tiles(m: int, n: int, k: int, on_gpu: bool) -> dict[str, int]:
    """BLOCK_M, BLOCK_N, BLOCK_K of a matmul template launch (the one place they are chosen)."""
    cap = dict(GPU_TILES) if on_gpu else dict.fromkeys(GPU_TILES, INTERPRETER_TILE_MAX)
    return {
        name: max(MIN_TILE, min(_next_pow2(size), cap[name]))
        for name, size in (("BLOCK_M", m), ("BLOCK_N", n), ("BLOCK_K", k))
    }


def describe_tiles(tiles: dict[str, int]) -> str:
    return f"{tiles['BLOCK_M']}x{tiles['BLOCK_N']}x{tiles['BLOCK_K']}"
