"""Scaled dot-product attention as one Triton kernel with an online softmax.

out = softmax(q @ k^T * scale + mask) @ v, computed per [BLOCK_M] rows of queries: a loop
over [BLOCK_N] blocks of keys keeps a running row maximum, a running sum of exponentials
and an fp32 accumulator, rescaled when the maximum grows (the flash-attention recurrence).
The score matrix exists one [BLOCK_M, BLOCK_N] tile at a time, in registers: its bytes
never reach memory. Traffic: q, k, v and the mask read, the output written.

Causal masks skip the key blocks past the diagonal; a mask is read through its strides (a
broadcast mask has stride 0 and is read once per distinct element): additive, or bool
(1 byte per element, keeping or dropping where true) turned into -inf in registers. Head dims
up to 128 (one [BLOCK_M, BLOCK_D] register tile); fp16/bf16/fp32 inputs, computed in fp32
(Triton's interpreter gets bf16 arithmetic wrong, and a GPU kernel should anyway).

Forward only; it also writes each query row's logsumexp when asked, which is what the
fused ATen backward (`_scaled_dot_product_flash_attention_for_cpu_backward`) recomputes
the probabilities from. The attention pass (passes/attention.py) puts it in graphs.
"""

from __future__ import annotations

import math

import torch

from memopt.backends.triton.launching import (
    Launch,
    dot_precision,
    launch,
    on_gpu,
    write_source,
)
from memopt.backends.triton.ops import HALF, bf16_round

MAX_HEAD_DIM = 128
# GPU launch shapes, (warps, BLOCK_M, BLOCK_N), by tl.dot precision ("tf32": 16-bit inputs,
# "ieee": fp32), BLOCK_D and direction: the largest of a list of candidates that compile
# with no spills and no stack for sm_80, sm_90 and gfx942, over causal, additive and bool
# masks, fp16 and bf16, sequences 256 and 512 (found by compiling the candidates offline;
# test_triton_offline.py keeps it so).
# IEEE fp32 dots are FMA loops holding their operands in registers: smaller tiles. In the
# backward, BLOCK_M is the query rows of a step and BLOCK_N the keys of a dK/dV program.
GPU_ATTENTION_SHAPES: dict[tuple[str, int], dict[str, tuple[int, int, int]]] = {
    ("tf32", 32): {"fwd": (4, 64, 64), "bwd": (8, 64, 32)},
    ("tf32", 64): {"fwd": (4, 64, 64), "bwd": (8, 64, 32)},
    ("tf32", 128): {"fwd": (8, 64, 64), "bwd": (8, 16, 32)},
    ("ieee", 32): {"fwd": (8, 64, 32), "bwd": (8, 32, 16)},
    ("ieee", 64): {"fwd": (8, 32, 32), "bwd": (16, 16, 16)},
    ("ieee", 128): {"fwd": (8, 32, 16), "bwd": (8, 16, 16)},
}
_SOURCE = """
import triton
import triton.language as tl


@triton.jit
def memopt_attention_fwd(
    q, k, v, mask, out, lse, heads, seq_q, seq_k, head_dim, scale,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    smb, smh, smm, smn, sob, soh, som, sod, slb, slh, slm,
    MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, STORE_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    m_tiles = (seq_q + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    bh = pid // m_tiles
    b = bh // heads
    h = bh % heads
    rm = (pid % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    mmask = rm < seq_q
    dmask = rd < head_dim
    q_tile = tl.load(
        q + b * sqb + h * sqh + rm[:, None] * sqm + rd[None, :] * sqd,
        mmask[:, None] & dmask[None, :], other=0,
    ).to(tl.float32)
    q_tile = q_tile * scale
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    end = seq_k
    if CAUSAL:
        # Keys past the block's last query row are all masked (the diagonal is seq_k - seq_q
        # to the right of the main one, as torch aligns it to the top left).
        end = tl.minimum(seq_k, (tl.program_id(0) % m_tiles + 1) * BLOCK_M)
    for n0 in range(0, end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nmask = rn < seq_k
        k_tile = tl.load(
            k + b * skb + h * skh + rn[None, :] * skn + rd[:, None] * skd,
            dmask[:, None] & nmask[None, :], other=0,
        ).to(tl.float32)
        scores = tl.dot(q_tile, k_tile, input_precision=DOT_PRECISION)
        keep = mmask[:, None] & nmask[None, :]
        if CAUSAL:
            keep = keep & (rn[None, :] <= rm[:, None])
        if MASK_MODE != 0:
            m = tl.load(
                mask + b * smb + h * smh + rm[:, None] * smm + rn[None, :] * smn,
                keep, other=0,
            )
            if MASK_MODE == 1:  # additive
                scores = scores + m.to(tl.float32)
            elif MASK_MODE == 2:  # bool: keep where true
                keep = keep & (m != 0)
            else:  # bool: drop where true
                keep = keep & (m == 0)
        scores = tl.where(keep, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # A row with every key masked so far keeps max -inf: shift by 0 instead (no nan).
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(row_max - shift)
        p = tl.exp(scores - shift[:, None])
        row_sum = row_sum * rescale + tl.sum(p, 1)
        v_tile = tl.load(
            v + b * svb + h * svh + rn[:, None] * svn + rd[None, :] * svd,
            nmask[:, None] & dmask[None, :], other=0,
        ).to(tl.float32)
        acc = acc * rescale[:, None] + tl.dot(p, v_tile, input_precision=DOT_PRECISION)
        row_max = new_max
    result = acc / tl.where(mmask, row_sum, 1.0)[:, None]  # padded rows: no 0/0
    if STORE_LSE:
        # log of the row's sum of exp(scores), as the fused backward reads it (natural log)
        row_lse = row_max + tl.log(tl.where(mmask, row_sum, 1.0))
        tl.store(lse + b * slb + h * slh + rm * slm, row_lse, mmask)
    ROUND_BF16
    tl.store(
        out + b * sob + h * soh + rm[:, None] * som + rd[None, :] * sod,
        result.to(out.dtype.element_ty), mmask[:, None] & dmask[None, :],
    )
"""


def source() -> str:
    """The forward kernel's Triton module."""
    # The interpreter's fp32 -> bf16 conversion truncates; round to nearest even first
    # (a no-op for other output dtypes: the rounded value converts exactly).
    rounding = f"if out.dtype.element_ty == tl.bfloat16:\n        result = {bf16_round('result')}"
    return _SOURCE.replace("ROUND_BF16", rounding)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def attention_shape(
    seq_q: int,
    seq_k: int,
    head_dim: int,
    on_gpu: bool,
    precision: str = "tf32",
    direction: str = "fwd",
) -> tuple[dict[str, int], int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D tiles, warps) of one launch (tl.dot needs every dimension
    >= 16). The interpreter costs per program: few, large tiles (warps unused). On a GPU,
    GPU_ATTENTION_SHAPES."""
    block_d = max(16, _next_pow2(head_dim))
    if on_gpu:
        warps, cap_m, cap_n = GPU_ATTENTION_SHAPES[(precision, max(32, block_d))][direction]
    else:
        warps, cap_m, cap_n = 4, 128, 128
    tiles = {
        "BLOCK_M": max(16, min(_next_pow2(seq_q), cap_m)),
        "BLOCK_N": max(16, min(_next_pow2(seq_k), cap_n)),
        "BLOCK_D": block_d,
    }
    return tiles, warps


def mask_mode(mask: torch.Tensor | None, drops: bool) -> int:
    """0: no mask; 1: additive; 2: bool, keep where true; 3: bool, drop where true."""
    if mask is None:
        return 0
    if mask.dtype != torch.bool:
        return 1
    return 3 if drops else 2


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    mask_drops: bool = False,
) -> torch.Tensor:
    """softmax(q @ k^T * scale + attn_mask) @ v for [batch, heads, seq, head_dim] tensors,
    as aten.scaled_dot_product_attention computes it (a bool mask keeps where True).

    Written into `out` when given (any strides); `lse` (float32 [batch, heads, seq_q], any
    strides), when given, receives each query row's logsumexp of its scaled, masked scores:
    what the fused attention backward recomputes the probabilities from. `mask_drops`: a
    bool mask marks the keys to drop (masked_fill's convention) instead of those to keep."""

    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    if head_dim > MAX_HEAD_DIM or v.shape[-1] != head_dim:
        raise ValueError(f"head dim {head_dim} (v: {v.shape[-1]}): at most {MAX_HEAD_DIM}, equal")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if attn_mask is not None:
        attn_mask = attn_mask.expand(batch, heads, seq_q, seq_k)
    gpu = on_gpu([q])
    precision = dot_precision(gpu, q.dtype in HALF)
    tiles, warps = attention_shape(seq_q, seq_k, head_dim, gpu, precision)
    grid = batch * heads * -(-seq_q // tiles["BLOCK_M"])
    mask = attn_mask if attn_mask is not None else q
    mask_strides = attn_mask.stride() if attn_mask is not None else (0, 0, 0, 0)
    lse_strides = lse.stride() if lse is not None else (0, 0, 0)
    if out.numel():
        args = (
            q,
            k,
            v,
            mask,
            out,
            lse if lse is not None else out,
            heads,
            seq_q,
            seq_k,
            head_dim,
            scale,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *mask_strides,
            *out.stride(),
            *lse_strides,
        )
        flags = {
            "MASK_MODE": mask_mode(attn_mask, mask_drops),
            "CAUSAL": is_causal,
            "STORE_LSE": lse is not None,
            **tiles,
            "DOT_PRECISION": precision,
        }
        path = str(write_source(source()))
        trips = (batch * heads * key_blocks(seq_q, seq_k, tiles, is_causal),)
        launch(Launch(path, "memopt_attention_fwd", grid, args, flags, warps, trips=trips), gpu)
    return out


def key_blocks(seq_q: int, seq_k: int, tiles: dict[str, int], causal: bool) -> int:
    """Key blocks the query-row programs of one (batch, head) visit, all together: each
    program's loop runs over the keys up to the causal diagonal of its last row, or all."""
    block_m, block_n = tiles["BLOCK_M"], tiles["BLOCK_N"]
    ends = (min(seq_k, (t + 1) * block_m) if causal else seq_k for t in range(-(-seq_q // block_m)))
    return sum(-(-end // block_n) for end in ends)


__all__ = ["MAX_HEAD_DIM", "attention", "attention_shape", "key_blocks"]
