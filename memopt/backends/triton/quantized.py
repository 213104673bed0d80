"""`x @ W^T` over narrow weights as one Triton kernel: the matmul tile loop with a
dequantizing prologue.

W (N, K) is stored as backends/narrow.py's formats (int8 and fp8 e4m3 with a scale per
row, packed int4 with a scale per group, bfloat16). Each program computes a [BLOCK_M, BLOCK_N] tile of
y; its loop over K loads a [BLOCK_K, BLOCK_N] tile of the stored weight, widens it to
float32 and applies the scales in registers (the prologue), and accumulates `tl.dot` in
float32. The float32 weight exists one tile at a time, in registers: the kernel reads the
narrow bytes once and writes y once. x is read as float32 (the CPU kernels' int8
activations are not used here).

int4 element k of a row sits in group g = k // group at position j = k - g * group; the
group's L elements (L = group, or less for the last) take L / 2 bytes, element j in the
low nibble of byte j for j < L/2 and in the high nibble of byte j - L/2 otherwise.
"""

from __future__ import annotations

import torch

from memopt.backends.narrow import QuantizedWeight
from memopt.backends.triton.launching import Launch, dot_precision, launch, on_gpu, write_source

_SOURCE = """
import triton
import triton.language as tl


@triton.jit
def memopt_dequant_matmul(
    x, w, scale, bias, y, M, N, K, group, sxm, sxk, sym, syn,
    KIND: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    n_tiles = (N + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)
    rm = (pid // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    rows = rn.to(tl.int64)  # W's element offsets pass 2**31 on large vocabularies
    xrows = rm.to(tl.int64)  # and x's and y's on long prefills
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if KIND == 8 or KIND == 9:
        row_scale = tl.load(scale + rn, nmask, other=0.0)
    groups = (K + group - 1) // group
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        a = tl.load(x + xrows[:, None] * sxm + rk[None, :] * sxk, mmask[:, None] & kmask[None, :], other=0.0)
        bmask = kmask[:, None] & nmask[None, :]
        if KIND == 8:
            q = tl.load(w + rows[None, :] * K + rk[:, None], bmask, other=0)
            b = q.to(tl.float32) * row_scale[None, :]
        elif KIND == 9:
            q = tl.load(w + rows[None, :] * K + rk[:, None], bmask, other=0.0)
            b = q.to(tl.float32) * row_scale[None, :]
        elif KIND == 4:
            g = rk // group
            j = rk - g * group
            half = tl.minimum(group, K - g * group) // 2
            high = j >= half
            byte = g * (group // 2) + tl.where(high, j - half, j)
            packed = tl.load(w + rows[None, :] * (K // 2) + byte[:, None], bmask, other=0).to(tl.int32)
            nibble = tl.where(high[:, None], packed >> 4, packed & 15) - 8
            s = tl.load(scale + rows[None, :] * groups + g[:, None], bmask, other=0.0)
            b = nibble.to(tl.float32) * s
        else:
            b = tl.load(w + rows[None, :] * K + rk[:, None], bmask, other=0.0).to(tl.float32)
        acc += tl.dot(a, b, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias + rn, nmask, other=0.0)[None, :]
    tl.store(y + xrows[:, None] * sym + rows[None, :] * syn, acc, mmask[:, None] & nmask[None, :])
"""

FORMATS = {"int8": 8, "int4": 4, "bf16": 16, "fp8_e4m3": 9}
# (BLOCK_M, BLOCK_N, BLOCK_K, warps) for M <= 16 (decode: tl.dot takes at least 16 rows, a
# step's M = 1 masks the other 15; its time is the weight's bytes either way) and above.
# The largest of the tried tiles that compile with no spills and no stack for sm_90 and
# gfx942 in every format with IEEE fp32 dots (test_triton_offline.py keeps it so): 64-wide
# K steps, or 64x64 output tiles over 4 warps, spill on sm_90.
TILES = {"decode": (16, 64, 32, 4), "prefill": (64, 32, 32, 8)}


def source() -> str:
    return _SOURCE


def matmul(
    x: torch.Tensor,
    weight: QuantizedWeight,
    int8_activations: bool = False,
    bias: torch.Tensor | None = None,
    gemm: str = "aten",  # the C++ kernels' option: not used here
) -> torch.Tensor:
    """`x @ W^T (+ bias)` (int8_activations is the C++ kernels' option: this kernel reads
    float x)."""
    out = torch.empty((x.shape[0], weight.rows), dtype=torch.float32, device=x.device)
    dequant_matmul(x, weight, out, bias)
    return out


def dequant_matmul(
    x: torch.Tensor, weight: QuantizedWeight, out: torch.Tensor, bias: torch.Tensor | None = None
) -> None:
    """`out = x @ W^T (+ bias)` for float32 x (M, K) and a QuantizedWeight W (narrow.py):
    on a GPU compiled, on the CPU interpreted (Triton's interpreter)."""
    m, k = x.shape
    block_m, block_n, block_k, warps = TILES["decode" if m <= 16 else "prefill"]
    grid = -(-m // block_m) * -(-weight.rows // block_n)
    scale = weight.scale if weight.scale is not None else weight.data  # unused for bf16
    gpu = on_gpu([x, weight.data, out])
    planned = Launch(
        source_path=str(write_source(_SOURCE)),
        fn_name="memopt_dequant_matmul",
        grid=grid,
        args=(
            x,
            weight.data,
            scale,
            bias if bias is not None else out,  # not read without HAS_BIAS
            out,
            m,
            weight.rows,
            k,
            weight.group or 1,
            *x.stride(),
            *out.stride(),
        ),
        constexprs={
            "KIND": FORMATS[weight.kind],
            "HAS_BIAS": bias is not None,
            "BLOCK_M": block_m,
            "BLOCK_N": block_n,
            "BLOCK_K": block_k,
            "DOT_PRECISION": dot_precision(gpu),
        },
        num_warps=warps,
        trips=(grid * -(-k // block_k),),
    )
    launch(planned, gpu)
