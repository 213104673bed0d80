"""The backward of scaled dot-product attention as two Triton kernels that recompute scores.

Given the forward's output O and per-row logsumexp L (backends/triton/attention.py writes
it), the probabilities of a [BLOCK_M, BLOCK_N] tile are exp(s - L) with s the scaled,
masked scores recomputed from q and k: nothing of size Sq x Sk is read or written.
With delta = rowsum(dO * O) (recomputed per query tile from dO and O):

    dV = P^T dO        dP = dO V^T        dS = P * (dP - delta)
    dQ = scale * dS K  dK = scale * dS^T Q

`dkdv`: one program per [BLOCK_N] block of keys of one (batch, head), looping over query
blocks (from the diagonal on, when causal). `dq`: one program per [BLOCK_M] block of
queries, looping over key blocks (up to the diagonal, when causal). Each recomputes the
scores it needs: two kernels, no atomics. Traffic: q, k, v, O, dO, L and the mask read;
dq, dk, dv written. Masks as in the forward (additive; bool keeping or dropping where true),
head dims up to 128, fp16/bf16/fp32 computed in fp32.
"""

from __future__ import annotations

import math
import textwrap

import torch

from memopt.backends.triton.attention import (
    MAX_HEAD_DIM,
    attention_shape,
    key_blocks,
    mask_mode,
)
from memopt.backends.triton.launching import (
    Launch,
    dot_precision,
    launch,
    on_gpu,
    write_source,
)
from memopt.backends.triton.ops import HALF, bf16_round

_MASKED_PROBABILITIES = """
        s = tl.dot(q_tile * scale, tl.trans(k_tile), input_precision=DOT_PRECISION)
        keep = mmask[:, None] & nmask[None, :]
        if CAUSAL:
            keep = keep & (rn[None, :] <= rm[:, None])
        if MASK_MODE != 0:
            m = tl.load(
                mask + b * smb + h * smh + rm[:, None] * smm + rn[None, :] * smn,
                keep, other=0,
            )
            if MASK_MODE == 1:
                s = s + m.to(tl.float32)
            elif MASK_MODE == 2:
                keep = keep & (m != 0)
            else:
                keep = keep & (m == 0)
        # A row with every key masked has L = -inf and no gradient (not nan).
        live = keep & (row_lse[:, None] != float("-inf"))
        p = tl.where(live, tl.exp(s - tl.where(live, row_lse[:, None], 0.0)), 0.0)
        dp = tl.dot(do_tile, tl.trans(v_tile), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
"""

_LOAD_QUERY_ROWS = """
        q_tile = tl.load(q + b * sqb + h * sqh + rm[:, None] * sqm + rd[None, :] * sqd,
                         mmask[:, None] & dmask[None, :], other=0).to(tl.float32)
        do_tile = tl.load(do + b * sdob + h * sdoh + rm[:, None] * sdom + rd[None, :] * sdod,
                          mmask[:, None] & dmask[None, :], other=0).to(tl.float32)
        o_tile = tl.load(o + b * sob + h * soh + rm[:, None] * som + rd[None, :] * sod,
                         mmask[:, None] & dmask[None, :], other=0).to(tl.float32)
        delta = tl.sum(do_tile * o_tile, 1)
        row_lse = tl.load(lse + b * slb + h * slh + rm * slm, mmask, other=0.0)
"""

_LOAD_KEY_ROWS = """
        k_tile = tl.load(k + b * skb + h * skh + rn[:, None] * skn + rd[None, :] * skd,
                         nmask[:, None] & dmask[None, :], other=0).to(tl.float32)
        v_tile = tl.load(v + b * svb + h * svh + rn[:, None] * svn + rd[None, :] * svd,
                         nmask[:, None] & dmask[None, :], other=0).to(tl.float32)
"""

_ARGS = """
    q, k, v, do, o, lse, mask, heads, seq_q, seq_k, head_dim, scale,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod, sob, soh, som, sod, slb, slh, slm, smb, smh, smm, smn,
"""

_SOURCE = """
import triton
import triton.language as tl


@triton.jit
def memopt_attention_bwd_dkdv(
    ARGS
    dk, dv, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    n_tiles = (seq_k + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)
    bh = pid // n_tiles
    b = bh // heads
    h = bh % heads
    n_start = (pid % n_tiles) * BLOCK_N
    rn = n_start + tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    nmask = rn < seq_k
    dmask = rd < head_dim
    LOAD_KEY_ROWS
    dk_acc = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv_acc = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    start = 0
    if CAUSAL:
        start = (n_start // BLOCK_M) * BLOCK_M  # query rows above the block see none of it
    for m0 in range(start, seq_q, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mmask = rm < seq_q
        LOAD_QUERY_ROWS
        MASKED_PROBABILITIES
        dv_acc += tl.dot(tl.trans(p), do_tile, input_precision=DOT_PRECISION)
        dk_acc += tl.dot(tl.trans(ds), q_tile, input_precision=DOT_PRECISION)
    dk_acc = dk_acc * scale
    ROUND_BF16_DK
    ROUND_BF16_DV
    tile = nmask[:, None] & dmask[None, :]
    tl.store(dk + b * sdkb + h * sdkh + rn[:, None] * sdkn + rd[None, :] * sdkd,
             dk_acc.to(dk.dtype.element_ty), tile)
    tl.store(dv + b * sdvb + h * sdvh + rn[:, None] * sdvn + rd[None, :] * sdvd,
             dv_acc.to(dv.dtype.element_ty), tile)


@triton.jit
def memopt_attention_bwd_dq(
    ARGS
    dq, sdqb, sdqh, sdqm, sdqd,
    MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr,
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
    LOAD_QUERY_ROWS
    dq_acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    end = seq_k
    if CAUSAL:
        end = tl.minimum(seq_k, (pid % m_tiles + 1) * BLOCK_M)
    for n0 in range(0, end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nmask = rn < seq_k
        LOAD_KEY_ROWS
        MASKED_PROBABILITIES
        dq_acc += tl.dot(ds, k_tile, input_precision=DOT_PRECISION)
    dq_acc = dq_acc * scale
    ROUND_BF16_DQ
    tl.store(dq + b * sdqb + h * sdqh + rm[:, None] * sdqm + rd[None, :] * sdqd,
             dq_acc.to(dq.dtype.element_ty), mmask[:, None] & dmask[None, :])
"""


def source() -> str:
    """The backward kernels' Triton module (dK and dV; dQ)."""
    source = _SOURCE.replace("ARGS", _ARGS.strip())
    for name, snippet in (
        ("LOAD_KEY_ROWS", _LOAD_KEY_ROWS),
        ("LOAD_QUERY_ROWS", _LOAD_QUERY_ROWS),
        ("MASKED_PROBABILITIES", _MASKED_PROBABILITIES),
    ):
        # Each snippet goes in at the indentation of its placeholder's line.
        lines = []
        for line in source.splitlines():
            if line.strip() == name:
                indent = line[: len(line) - len(line.lstrip())]
                lines.append(textwrap.indent(textwrap.dedent(snippet).strip("\n"), indent))
            else:
                lines.append(line)
        source = "\n".join(lines) + "\n"
    for name, acc in (("DK", "dk_acc"), ("DV", "dv_acc"), ("DQ", "dq_acc")):
        # The interpreter's fp32 -> bf16 conversion truncates: round to nearest even first.
        target = name.lower()
        rounding = (
            f"if {target}.dtype.element_ty == tl.bfloat16:\n        {acc} = {bf16_round(acc)}"
        )
        source = source.replace(f"ROUND_BF16_{name}", rounding)
    return source


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    mask_drops: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `attention(q, k, v, attn_mask, is_causal, scale)` given its output,
    logsumexp and the output's gradient; written into `grads` when given (any strides)."""
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    if head_dim > MAX_HEAD_DIM or v.shape[-1] != head_dim:
        raise ValueError(f"head dim {head_dim} (v: {v.shape[-1]}): at most {MAX_HEAD_DIM}, equal")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    dq, dk, dv = grads if grads is not None else tuple(torch.empty_like(t) for t in (q, k, v))
    if attn_mask is not None:
        attn_mask = attn_mask.expand(batch, heads, seq_q, seq_k)
    mask = attn_mask if attn_mask is not None else q
    mask_strides = attn_mask.stride() if attn_mask is not None else (0, 0, 0, 0)
    gpu = on_gpu([q])
    path = str(write_source(source()))
    precision = dot_precision(gpu, q.dtype in HALF)
    tiles, warps = attention_shape(seq_q, seq_k, head_dim, gpu, precision, "bwd")
    common = (
        q,
        k,
        v,
        grad_out,
        out,
        lse,
        mask,
        heads,
        seq_q,
        seq_k,
        head_dim,
        scale,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *grad_out.stride(),
        *out.stride(),
        *lse.stride(),
        *mask_strides,
    )
    flags = {
        "MASK_MODE": mask_mode(attn_mask, mask_drops),
        "CAUSAL": is_causal,
        **tiles,
        "DOT_PRECISION": precision,
    }
    if dk.numel():
        grid = batch * heads * -(-seq_k // tiles["BLOCK_N"])
        args = (*common, dk, dv, *dk.stride(), *dv.stride())
        query_blocks = 0  # what the key-row programs of one (batch, head) visit, together
        for t in range(-(-seq_k // tiles["BLOCK_N"])):
            start = (
                (t * tiles["BLOCK_N"] // tiles["BLOCK_M"]) * tiles["BLOCK_M"] if is_causal else 0
            )
            query_blocks += max(0, -(-(seq_q - start) // tiles["BLOCK_M"]))
        trips = (batch * heads * query_blocks,)
        launch(
            Launch(path, "memopt_attention_bwd_dkdv", grid, args, flags, warps, trips=trips),
            gpu,
        )
    if dq.numel():
        grid = batch * heads * -(-seq_q // tiles["BLOCK_M"])
        args = (*common, dq, *dq.stride())
        trips = (batch * heads * key_blocks(seq_q, seq_k, tiles, is_causal),)
        launch(
            Launch(path, "memopt_attention_bwd_dq", grid, args, flags, warps, trips=trips),
            gpu,
        )
    return dq, dk, dv


__all__ = ["attention_backward"]
