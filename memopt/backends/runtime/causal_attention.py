"""Causal attention of many query positions on the CPU (a prefill's): ATen's op or memopt's.

A prefill attends every prompt position to those before it. Hugging Face's models hand
that to ATen's `_scaled_dot_product_flash_attention_for_cpu` with `is_causal=True` and no
mask (a static cache's prefill slices the cache to the prompt's length first). Its time is
arithmetic: on this project's AMD EPYC ATen's op ran a 1024-token prefill's attention of the
decode benchmark's Llama (8 query heads over 2 key/value heads, head dim 64) at 118 GFLOP/s,
8.5-9.1 ms a layer, a third of the whole float32 prefill. memopt's kernel
(backends/cpp/causal_attention.py) transposes each tile of keys once for all the query heads
that share it and sums four query rows by 64 keys in registers: 4.4 ms there, 9.3 against
17.4 for the large Llama's 16 heads over 4, 5.1 against 8.5 for GPT-2's 8 heads (measured, 2
threads).

Which is faster depends on the processor, so it is measured once per machine, like the
decode kernel (decode_attention.py): `SHAPES`, ATen's op and memopt's kernel alternating in
pairs; memopt's taken when at least `gemm.MARGIN` faster in the geometric mean and not
slower on any shape; cached in `$MEMOPT_CACHE_DIR/machine/causal-attention-<key>.json`. The
`cpu_attention` option ("aten", "memopt") overrides it, for this kernel and the decode one.

`CausalAttention` stands for one such node: causal, no mask, no dropout, its logsumexp read
by nothing, on the CPU. It sums in another order than ATen (float32 rounding, not bit for
bit); a NaN score makes its row NaN as in ATen's op. At run time anything the kernel does not
take runs the ATen op: other dtypes or devices, tensor subclasses, autograd recording, head
counts that do not divide, head sizes that differ, a last dimension that is not contiguous,
an empty dimension.
"""

from __future__ import annotations

import ctypes
import functools
import math
import statistics
import struct

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from memopt.backends.cpp import causal_attention as kernel
from memopt.backends.cpp import launcher
from memopt.backends.runtime.decode_attention import (
    CHOICES,
    LibraryAttention,
    flash_node,
    point_attention,
)
from memopt.backends.runtime.gemm import (
    GemmTimes,
    _seconds,
    describe_library,
    measured_times,
    resolve_choice,
)
from memopt.backends.runtime.linear import PLAIN_TENSORS, launchable

aten = torch.ops.aten
FLASH_CPU = aten._scaled_dot_product_flash_attention_for_cpu.default

# (query heads, key/value heads, positions, head dim): grouped-query and multi-head prefills
# of small and larger models.
SHAPES = ((8, 2, 1024, 64), (8, 8, 512, 64), (16, 4, 1024, 64), (32, 8, 256, 128))
_PAIRS = 5

_FLOAT32, _STRIDED, _CPU = torch.float32, torch.strided, torch.device("cpu")
_grad_enabled, _empty_like = torch.is_grad_enabled, torch.empty_like
_FLOAT32_MAX = torch.finfo(torch.float32).max


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None,
    sizes: ctypes.Array | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, logsumexp) of ATen's CPU flash attention with `is_causal=True`, for operands
    `plan` takes; `sizes`: plan's result when the caller has it."""
    if sizes is None:
        sizes = plan(q, k, v)
        if sizes is None:
            raise ValueError("memopt causal attention does not take these operands (plan)")
    out, lse = _outputs(q, sizes)
    strides = (ctypes.c_int64 * 15)(*_strides(q, k, v, out, lse))
    failed = kernel.function()(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        out.data_ptr(),
        lse.data_ptr(),
        sizes,
        strides,
        _scale(scale, sizes[5]),
    )
    if failed:
        raise MemoryError("memopt causal attention: no memory for its tiles")
    return out, lse


def _strides(q, k, v, out, lse) -> tuple[int, ...]:
    """The kernel's strides: batch, head and row of q, k, v, the output and the logsumexp."""
    return (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride())


def _scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


def _outputs(q: torch.Tensor, sizes) -> tuple[torch.Tensor, torch.Tensor]:
    """The layouts of ATen's op (its meta function): the output in q's (one head size for
    both), the logsumexp (B, H, L) over a (B, L, H) buffer."""
    batch, heads, _, rows = sizes[:4]
    out = _empty_like(q)
    lse = torch.empty((batch, rows, heads), dtype=_FLOAT32, device=_CPU).transpose(1, 2)
    return out, lse


def plan(q: object, k: object, v: object) -> ctypes.Array | None:
    """The kernel's sizes for these operands, or None where it does not take them (module
    doc)."""
    if type(q) not in PLAIN_TENSORS or type(k) not in PLAIN_TENSORS or type(v) not in PLAIN_TENSORS:
        return None
    tensors = (q, k, v)
    if any(t.dtype is not _FLOAT32 or t.layout is not _STRIDED or not t.is_cpu for t in tensors):
        return None
    if any(t.is_neg() or t.dim() != 4 or t.stride(3) != 1 for t in tensors):
        return None  # a negated view's bit: the kernel reads the memory
    if _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    (batch, heads, rows, head_dim), (kb, kv_heads, length, kd) = q.shape, k.shape
    vb, vh, vl, v_dim = v.shape
    if (kb, vb) != (batch, batch) or (vh, vl) != (kv_heads, length):
        return None
    if kd != head_dim or v_dim != head_dim:  # ATen's op takes one head size (and raises)
        return None
    if not (batch and heads and kv_heads and rows and length and head_dim):
        return None
    if heads % kv_heads:
        return None
    return (ctypes.c_int64 * 7)(batch, heads, kv_heads, rows, length, head_dim, v_dim)


class CausalAttention(LibraryAttention):
    """A causal `_scaled_dot_product_flash_attention_for_cpu` node on memopt's kernel where
    it takes the operands, else the ATen op (module doc). Its launch: (launch, scale,
    sizes)."""

    memopt_name = f"{FLASH_CPU} (memopt causal attention)"

    def attend(self, q, k, v, dropout_p, is_causal, attn_mask, scale) -> tuple:
        # A scale of 0 or below (or NaN) goes to ATen's op, which then makes NaN rows
        # where keys are masked: eager's values, not the kernel's; one past float32's
        # range too (the kernel's scale is a float).
        takes = not dropout_p and is_causal and attn_mask is None
        takes = takes and (scale is None or 0 < scale <= _FLOAT32_MAX)
        bound = self._launch
        if bound is not None and takes and not _grad_enabled():
            launch, bound_scale, sizes = bound
            if scale == bound_scale and launchable((q, k, v)):
                out, lse = _outputs(q, sizes)
                code = launch(q, k, v, out, lse)
                if code == 0:
                    return out, lse
                if code == 1:
                    raise MemoryError("memopt causal attention: no memory for its tiles")
        sizes = plan(q, k, v) if takes else None
        if sizes is None:
            return FLASH_CPU(q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
        result = causal_attention(q, k, v, scale, sizes)
        self._bind(q, k, v, scale, sizes, result)
        return result

    def _bind(self, q, k, v, scale: float | None, sizes: ctypes.Array, result: tuple) -> None:
        bits = struct.unpack("<I", struct.pack("<f", _scale(scale, sizes[5])))[0]
        scalars = (*sizes, *_strides(q, k, v, *result), bits)
        launch = launcher.bind_layouts(kernel.packed_address(), (q, k, v), 2, scalars)
        if launch is not None:  # out and lse follow the operands, unchecked
            self._launch = (launch, scale, tuple(sizes))


def measure() -> GemmTimes:
    """Time ATen's op and memopt's kernel on SHAPES in alternating pairs: per shape the
    medians of their times and of the pairs' ratios."""
    # Real CPU tensors (a compile runs under Dynamo's fake mode), not under a device mode.
    with unset_fake_temporarily(), torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        randn = functools.partial(torch.randn, generator=generator, device=_CPU, dtype=_FLOAT32)
        aten_s, memopt_s, ratios = [], [], []
        for heads, kv_heads, length, head_dim in SHAPES:
            q = randn((1, heads, length, head_dim))
            k, v = (randn((1, kv_heads, length, head_dim)) for _ in range(2))
            runs = (FLASH_CPU, CausalAttention())
            for attention in runs:  # warm-up: thread pool, the kernel's library, first touch
                attention(q, k, v, 0.0, True)
            pairs = [[_seconds(a, q, k, v, 0.0, True) for a in runs] for _ in range(_PAIRS)]
            aten_s.append(statistics.median(p[0] for p in pairs))
            memopt_s.append(statistics.median(p[1] for p in pairs))
            ratios.append(statistics.median(p[0] / p[1] for p in pairs))
    return GemmTimes(SHAPES, tuple(aten_s), tuple(memopt_s), tuple(ratios))


def measured_causal_attention_times(refresh: bool = False) -> GemmTimes:
    """This machine's causal attention times (cached; gemm.measured_times)."""
    return measured_times("causal-attention", SHAPES, lambda: measure(), refresh, "memopt")


def causal_attention_library(choice: str = "auto") -> str:
    """Where causal CPU attention runs: `choice` itself, or measured for "auto" (a failed
    measurement keeps ATen, with a warning)."""
    return resolve_choice(
        choice,
        "cpu_attention",
        measured_causal_attention_times,
        "memopt",
        "CPU causal attention kernels",
        "causal attention",
    )


def causal_rows(node: torch.fx.Node) -> bool:
    """A CPU flash attention node, causal, with no dropout and no mask, whose logsumexp
    nothing reads: a node CausalAttention may stand for."""
    found = flash_node(node)
    if found is None:
        return False
    _, dropout, causal = found
    return dropout == 0 and causal is True and node.kwargs.get("attn_mask") is None


def point_causal_attention(gm: torch.fx.GraphModule, choice: str) -> int:
    """Point `gm`'s causal CPU attention nodes at a CausalAttention where `choice` (or for
    "auto", this machine's measurement) says memopt; returns how many."""
    return point_attention(gm, causal_rows, causal_attention_library, choice, CausalAttention)


def describe(gm: torch.fx.GraphModule, choice: str) -> str:
    """What runs `gm`'s attention on memopt's causal kernel and why, or "" when none does."""
    what = "causal attentions on memopt's kernel"
    return describe_library(
        gm, CausalAttention, choice, "cpu_attention", measured_causal_attention_times, what
    )


__all__ = [
    "CHOICES",
    "SHAPES",
    "CausalAttention",
    "causal_attention",
    "causal_attention_library",
    "causal_rows",
    "describe",
    "measure",
    "measured_causal_attention_times",
    "plan",
    "point_causal_attention",
]
