"""Attention of one query position over a KV cache on the CPU: ATen's op or memopt's kernel.

In a decode step every layer attends one new query row per head to the whole cache. The
graph holds that as ATen's `_scaled_dot_product_flash_attention_for_cpu` (the attention
pass keeps it whole and hands it a grouped-query cache unrepeated). On this project's AMD
EPYC, ATen's op read a decode step's cache at 13-26 GB/s: it runs each query head on its
own (a grouped-query cache is read once per query head, from cache after the first) over
blocks sized for many query rows. memopt's kernel (backends/cpp/attention.py) reads each
cached row once for all the query heads that share it, splits the cache over the threads
and prefetches ahead. In the decode benchmark's steps (bench/decode.py, 1,055 cached
positions, per layer, timed by `memopt.profile`'s kernel timer, 2 threads): the 4-layer
Llama's (8 query heads over 2 key/value heads, 1.1 MB) 42-49 us against ATen's 72-85,
GPT-2's (8 heads, 4.3 MB) 92-105 us against 163-179.

Which is faster depends on the processor, so it is measured once per machine, like the
GEMV kernels (gemv.py): `SHAPES`, each in a mock decode step (`measure`: six layers of a
GEMV over 12 MiB of weights and an attention over the layer's own cache, so that the cache
is read from memory as in a real step), ATen's and memopt's steps alternating;
memopt's kernel is taken when at least `gemm.MARGIN` faster in the geometric mean and not
slower on any shape; cached in `$MEMOPT_CACHE_DIR/machine/attention-<key>.json`. The
`cpu_attention` option ("aten", "memopt") overrides it.

`DecodeAttention` stands for one such node whose query has one position (static) and whose
logsumexp nothing reads; `AppendAttention` for one such node together with the two
concatenations of a cache and its new positions that it reads (the attention pass makes
it: passes/attention.py), its kernel writing the concatenations as it reads the old cache.
It sums in another order than ATen (float32 rounding, not bit for bit); a NaN score makes its row NaN as in ATen's op, and a position the mask drops is not
read (a non-finite value there, which ATen's 0 x inf turns into NaN, stays out of the row).
At run time anything the kernel does not take runs the ATen op: other dtypes or devices,
tensor subclasses, autograd recording, dropout, `is_causal`, more than one query position,
a mask that is not a float32 2-D or 4-D one broadcast to (B, H, 1, L), head counts that do
not divide, head sizes that differ, a last dimension that is not contiguous, an empty
dimension.
"""

from __future__ import annotations

import ctypes
import functools
import math
import operator
import statistics
import struct
import time
from collections.abc import Callable

import sympy
import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from memopt.backends.cpp import attention as kernel
from memopt.backends.cpp import launcher
from memopt.backends.runtime.gemm import (
    GemmTimes,
    describe_library,
    measured_times,
    resolve_choice,
)
from memopt.backends.runtime.gemv import streaming_matmul
from memopt.backends.runtime.linear import PLAIN_TENSORS, launchable
from memopt.compiler.cost import Cost, read_bytes
from memopt.compiler.graph import output_metas, static_int, tensor_meta

aten = torch.ops.aten
FLASH_CPU = aten._scaled_dot_product_flash_attention_for_cpu.default

CHOICES = ("auto", "aten", "memopt")
# (query heads, key/value heads, cache positions, head dim): grouped-query and multi-head
# decode steps of small and larger models.
SHAPES = ((8, 2, 1024, 64), (8, 8, 1024, 64), (16, 4, 512, 64), (32, 8, 2048, 128))
_PAIRS = 5
# The measured step (`measure`): layers, and each one's weights (float32, streamed by
# memopt's GEMV before its attention; all of them past the last-level cache).
_LAYERS = 6
_WEIGHT_NBYTES = 12 << 20

_FLOAT32, _STRIDED, _CPU = torch.float32, torch.strided, torch.device("cpu")
_CHANNELS_LAST = torch.channels_last
_grad_enabled = torch.is_grad_enabled


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    call: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, logsumexp) of ATen's CPU flash attention for operands `plan` takes; `call`:
    plan's result when the caller has it."""
    if call is None:
        call = plan(q, k, v, mask)
        if call is None:
            raise ValueError("memopt decode attention does not take these operands (plan)")
    sizes, strides = call
    batch, heads, _, _, head_dim, v_dim = sizes
    # The layouts the graph's metadata has (ATen's meta function): a contiguous output, the
    # logsumexp (B, H, 1) over a (B, 1, H) buffer
    out = torch.empty((batch, heads, 1, v_dim), dtype=_FLOAT32, device=_CPU)
    lse = torch.empty((batch, 1, heads), dtype=_FLOAT32, device=_CPU).transpose(1, 2)
    failed = kernel.function()(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        None if mask is None else mask.data_ptr(),
        out.data_ptr(),
        lse.data_ptr(),
        sizes,
        strides,
        1.0 / math.sqrt(head_dim) if scale is None else scale,
        kernel.CHUNK,
    )
    if failed:
        raise MemoryError("memopt decode attention: no memory for its scratch")
    return out, lse


_PLANS: dict[tuple, tuple] = {}  # operand layouts -> the kernel's size and stride arrays


def plan(q: object, k: object, v: object, mask: object) -> tuple | None:
    """The kernel's (sizes, strides) arrays for these operands, or None where it does not
    take them (module doc)."""
    if type(q) not in PLAIN_TENSORS or type(k) not in PLAIN_TENSORS or type(v) not in PLAIN_TENSORS:
        return None
    if mask is not None and type(mask) not in PLAIN_TENSORS:
        return None
    if q.is_neg() or k.is_neg() or v.is_neg() or (mask is not None and mask.is_neg()):
        return None  # a negated view's bit: the kernel reads the memory
    key = (
        q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype,
        q.device, k.device, v.device, q.layout, k.layout, v.layout,
        None if mask is None else (mask.shape, mask.stride(), mask.dtype, mask.device, mask.layout),
    )  # fmt: skip
    found = _PLANS.get(key)
    if found is None:
        found = _plan(q, k, v, mask)
        if len(_PLANS) > 256:
            _PLANS.clear()
        _PLANS[key] = found
    if (
        found is None
        or torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
    ):
        return None
    return found


def _plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: object) -> tuple | None:
    tensors = (q, k, v) if mask is None else (q, k, v, mask)
    if any(t.dtype is not _FLOAT32 or t.layout is not _STRIDED or not t.is_cpu for t in tensors):
        return None
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return None
    (batch, heads, rows, head_dim), (kb, kv_heads, length, kd) = q.shape, k.shape
    vb, vh, vl, v_dim = v.shape
    if rows != 1 or (kb, vb) != (batch, batch) or (vh, vl) != (kv_heads, length):
        return None
    if kd != head_dim or v_dim != head_dim:  # ATen's op takes one head size (and raises)
        return None
    if not (batch and heads and kv_heads and length and head_dim and v_dim):
        return None
    if heads % kv_heads or q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        return None
    mask_strides = _mask_strides(mask, batch, heads, length)
    if mask_strides is None:
        return None
    sizes = (ctypes.c_int64 * 6)(batch, heads, kv_heads, length, head_dim, v_dim)
    strides = (ctypes.c_int64 * 11)(
        q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3], *mask_strides
    )
    return sizes, strides


def _mask_strides(mask: object, batch: int, heads: int, length: int) -> tuple | None:
    """The (b, h, l) strides of `mask` broadcast to (B, H, 1, L), (0, 0, 0) for no mask, or
    None where the kernels do not take it: other than 2-D or 4-D (ATen's op takes these and
    raises on others), or not broadcastable."""
    if mask is None:
        return (0, 0, 0)
    if mask.dim() not in (2, 4):
        return None
    try:
        full = mask.expand(batch, heads, 1, length)
    except RuntimeError:
        return None
    return (full.stride(0), full.stride(1), full.stride(3))


class LibraryAttention:
    """A `_scaled_dot_product_flash_attention_for_cpu` node on one of memopt's CPU kernels
    where it takes the operands, else the ATen op: ATen's signature, and the operand layouts
    planned last bound to one C call through the native launcher (cpp/launcher.py, layouts
    checked in C), which a copy binds anew. Subclasses run the call (`attend`)."""

    memopt_kind = "extern"
    __name__ = FLASH_CPU.__name__

    def __init__(self) -> None:
        self._launch: tuple | None = None
        self._planned: tuple | None = None  # the sizes and strides of the last planned call

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __getstate__(self) -> dict:
        # a launch is bound anew, not copied
        return {**self.__dict__, "_launch": None, "_planned": None}

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        *,
        attn_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attend(q, k, v, dropout_p, is_causal, attn_mask, scale)

    def attend(self, q, k, v, dropout_p, is_causal, attn_mask, scale) -> tuple:
        raise NotImplementedError


class DecodeAttention(LibraryAttention):
    """A one-position `_scaled_dot_product_flash_attention_for_cpu` node on memopt's
    kernel where it takes the operands, else the ATen op (module doc). Its launch:
    (launch, scale, masked, B, H, Dv)."""

    memopt_name = f"{FLASH_CPU} (memopt decode attention)"

    def attend(self, q, k, v, dropout_p, is_causal, attn_mask, scale) -> tuple:
        bound = self._launch
        if bound is not None and not dropout_p and not is_causal and not _grad_enabled():
            launch, bound_scale, masked, batch, heads, v_dim = bound
            operands = (q, k, v) if attn_mask is None else (q, k, v, attn_mask)
            if scale == bound_scale and masked == (attn_mask is not None) and launchable(operands):
                out = torch.empty((batch, heads, 1, v_dim), dtype=_FLOAT32, device=_CPU)
                lse = torch.empty((batch, 1, heads), dtype=_FLOAT32, device=_CPU).transpose(1, 2)
                code = launch(*operands, out, lse)
                if code == 0:
                    return out, lse
                if code == 1:
                    raise MemoryError("memopt decode attention: no memory for its scratch")
        call = None if dropout_p or is_causal else plan(q, k, v, attn_mask)
        if call is None:
            return FLASH_CPU(q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
        result = decode_attention(q, k, v, attn_mask, scale, call)
        # Bound when the layouts come again: a dynamic cache meets a new length, so new
        # layouts, every step, and binding those would be wasted.
        planned = (tuple(call[0]), tuple(call[1]))
        if planned == self._planned:
            self._bind(q, k, v, attn_mask, scale, call)
        self._planned = planned
        return result

    def _bind(self, q, k, v, mask, scale: float | None, call: tuple) -> None:
        sizes, strides = call
        operands = (q, k, v) if mask is None else (q, k, v, mask)
        value = 1.0 / math.sqrt(sizes[4]) if scale is None else scale
        try:
            bits = struct.unpack("<I", struct.pack("<f", value))[0]
        except OverflowError:  # past float32's range: the planned path each call
            return
        scalars = (*sizes, *strides, bits, kernel.CHUNK, int(mask is not None))
        launch = launcher.bind_layouts(kernel.packed_address(), operands, 2, scalars)
        if launch is not None:  # out and lse follow the operands, unchecked
            self._launch = (launch, scale, mask is not None, sizes[0], sizes[1], sizes[5])


class AppendAttention:
    """A one-position `_scaled_dot_product_flash_attention_for_cpu` over keys and values
    concatenated in the same graph (`cat([k_old, k_new], 2)`, and the same for values: a
    dynamic cache's decode step), as one call: the attention pass's fusion
    (passes/attention.py). Called as (q, k_old, k_new, v_old, v_new[, mask]); returns
    (output, logsumexp, k, v): ATen's op's two results and the two concatenations.

    memopt's kernel (`cpp/attention.py`, `memopt_decode_attention_append`) copies each work
    unit's rows into the concatenations and attends over them from its core's caches: the
    old cache is read from memory once; the concatenations have `torch.cat`'s layout
    (`_concatenation`). Anything it does not take runs the concatenations and ATen's op:
    the operands `plan` refuses, old caches that are not contiguous, a head dim of 1."""

    memopt_kind = "extern"
    __name__ = "decode_attention_append"
    memopt_name = f"cat + {FLASH_CPU} (memopt decode attention over an appended cache)"

    def __init__(self, scale: float | None = None) -> None:
        self.scale = scale

    def __repr__(self) -> str:
        return f"AppendAttention(scale={self.scale})"

    def memopt_cost(self, node: torch.fx.Node) -> Cost:
        """Each operand read once (the old cache too), the output, the logsumexp and the
        two concatenations written once; the attention's FLOPs over the whole cache."""
        outputs = output_metas(node)
        *batch, rows, head_dim = tensor_meta(node.args[0]).shape
        length = outputs[2].shape[2]
        return Cost(
            read=read_bytes(node, [a for a in node.all_input_nodes if tensor_meta(a) is not None]),
            write=sympy.Add(*(m.nbytes for m in outputs)),
            flops=4 * sympy.Mul(*batch) * rows * length * head_dim,
        )

    def __call__(self, q, k_old, k_new, v_old, v_new, attn_mask=None) -> tuple:
        call = _append_call(q, k_old, k_new, v_old, v_new, attn_mask)
        if call is None:
            k = torch.cat([k_old, k_new], 2)
            v = torch.cat([v_old, v_new], 2)
            out, lse = FLASH_CPU(q, k, v, attn_mask=attn_mask, scale=self.scale)
            return out, lse, k, v
        sizes, strides = call
        batch, heads, kv_heads, length, head_dim, v_dim, _ = sizes
        out = torch.empty((batch, heads, 1, v_dim), dtype=_FLOAT32, device=_CPU)
        lse = torch.empty((batch, 1, heads), dtype=_FLOAT32, device=_CPU).transpose(1, 2)
        k = _concatenation(k_old, k_new, (batch, kv_heads, length, head_dim))
        v = _concatenation(v_old, v_new, (batch, kv_heads, length, v_dim))
        failed = kernel.append_function()(
            q.data_ptr(), k_old.data_ptr(), k_new.data_ptr(), v_old.data_ptr(),
            v_new.data_ptr(), None if attn_mask is None else attn_mask.data_ptr(),
            out.data_ptr(), lse.data_ptr(), k.data_ptr(), v.data_ptr(), sizes, strides,
            1.0 / math.sqrt(head_dim) if self.scale is None else self.scale, kernel.CHUNK,
        )  # fmt: skip
        if failed:
            raise MemoryError("memopt decode attention: no memory for its scratch")
        return out, lse, k, v

    def bind(self, q, k_new, v_new, mask, out, k_old, v_old) -> Callable | None:
        """A call for a tape's replays (runtime/tape.py), whose q, new rows and mask are in
        memory of the tape's, as is the output (`out`, written in place): checked here once
        with the capture's old caches `k_old` and `v_old`. `call(k_old, v_old)` checks only
        the old caches (each replay's) and returns the concatenations, or None where the
        kernel does not take them (the caller then makes the full call). None where the
        kernel does not take these operands."""
        planned = _append_call(q, k_old, k_new, v_old, v_new, mask)
        if planned is None or type(out) not in PLAIN_TENSORS or out.is_neg():
            return None
        sizes, strides = planned
        batch, heads, kv_heads, length, head_dim, _, old = sizes
        new = length - old
        if tuple(out.shape) != (batch, heads, 1, head_dim) or not out.is_contiguous():
            return None
        lse = torch.empty((batch, heads, 1), dtype=_FLOAT32, device=_CPU)
        function = kernel.append_function()
        scale = ctypes.c_float(1.0 / math.sqrt(head_dim) if self.scale is None else self.scale)
        chunk = ctypes.c_int64(kernel.CHUNK)
        fixed = [ctypes.c_void_p(t.data_ptr()) for t in (q, k_new, v_new, out, lse)]
        q_ptr, k_new_ptr, v_new_ptr, out_ptr, lse_ptr = fixed
        mask_ptr = None if mask is None else ctypes.c_void_p(mask.data_ptr())
        kept = (q, k_new, v_new, mask, out, lse)  # the memory the pointers are of
        row = head_dim
        strides[13] = strides[19] = row  # the old caches' rows (contiguous, checked each call)

        def call(k_old: object, v_old: object) -> tuple | None:
            if not _cpu_float32((k_old, v_old)):
                return None
            shape = k_old.shape
            if (
                len(shape) != 4
                or shape[0] != batch
                or shape[1] != kv_heads
                or shape[3] != head_dim
                or v_old.shape != shape
                or not k_old.is_contiguous()
                or not v_old.is_contiguous()
            ):
                return None
            old = shape[2]
            length = old + new
            k = _concatenation(k_old, k_new, (batch, kv_heads, length, head_dim))
            v = _concatenation(v_old, v_new, (batch, kv_heads, length, head_dim))
            sizes[3], sizes[6] = length, old
            strides[2] = strides[5] = kv_heads * length * row
            strides[3] = strides[6] = length * row
            strides[11] = strides[17] = kv_heads * old * row
            strides[12] = strides[18] = old * row
            failed = function(
                q_ptr, k_old.data_ptr(), k_new_ptr, v_old.data_ptr(), v_new_ptr, mask_ptr,
                out_ptr, lse_ptr, k.data_ptr(), v.data_ptr(), sizes, strides, scale, chunk,
            )  # fmt: skip
            if failed:
                raise MemoryError("memopt decode attention: no memory for its scratch")
            return k, v

        call.kept = kept
        return call


def _concatenation(old: torch.Tensor, new: torch.Tensor, shape: tuple) -> torch.Tensor:
    """The memory `torch.cat([old, new], 2)` makes for its result: channels-last where both
    parts' strides are channels-last-like (ATen's rule, which for one key/value head, a
    dimension of size 1 whose stride is free, a contiguous cache can meet), else
    contiguous. The kernel's addresses are the same either way; the strides are
    torch.cat's."""
    if shape[1] == 1 and _channels_last_like(old) and _channels_last_like(new):
        return torch.empty(shape, dtype=_FLOAT32, device=_CPU, memory_format=_CHANNELS_LAST)
    return torch.empty(shape, dtype=_FLOAT32, device=_CPU)


def _channels_last_like(t: torch.Tensor) -> bool:
    """Whether ATen suggests channels-last for the 4-D `t` (c10's
    `is_channels_last_strides_2d`: the strides ordered C, W, H, N, each at least the one
    before times its size; a zero C stride, an empty dimension or an N stride equal to
    C's is not)."""
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return False
    least = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < least or (d == 0 and least == strides[1]):
            return False
        least = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True


def _cpu_float32(tensors: tuple) -> bool:
    """Whether the append kernel takes `tensors` as operands: plain float32 CPU tensors
    without a negation bit, none recording autograd."""
    for t in tensors:
        if type(t) not in PLAIN_TENSORS or t.is_neg() or t.dtype is not _FLOAT32:
            return False
        if t.layout is not _STRIDED or not t.is_cpu:
            return False
    return not (_grad_enabled() and any(t.requires_grad for t in tensors))


def _append_call(q, k_old, k_new, v_old, v_new, mask) -> tuple | None:
    """The append kernel's (sizes, strides) arrays for these operands, or None where it
    does not take them (AppendAttention's doc)."""
    operands = (
        (q, k_old, k_new, v_old, v_new) if mask is None else (q, k_old, k_new, v_old, v_new, mask)
    )
    if not _cpu_float32(operands):
        return None
    if q.dim() != 4 or k_old.dim() != 4 or k_new.dim() != 4 or v_old.dim() != 4 or v_new.dim() != 4:
        return None
    (batch, heads, rows, head_dim), (kb, kv_heads, old, kd) = q.shape, k_old.shape
    new = k_new.shape[2]
    if rows != 1 or head_dim < 2 or kd != head_dim or heads % kv_heads:
        return None
    if (
        tuple(k_new.shape) != (batch, kv_heads, new, head_dim)
        or tuple(v_old.shape) != (batch, kv_heads, old, head_dim)
        or tuple(v_new.shape) != (batch, kv_heads, new, head_dim)
        or kb != batch
    ):
        return None
    length = old + new
    if not (batch and heads and length):
        return None
    # Contiguous old caches, rows of new positions contiguous in their last dimension: the
    # kernel's copies; `_concatenation` gives the result torch.cat's layout for them.
    if not (k_old.is_contiguous() and v_old.is_contiguous()):
        return None
    if q.stride(3) != 1 or k_new.stride(3) != 1 or v_new.stride(3) != 1:
        return None
    mask_strides = _mask_strides(mask, batch, heads, length)
    if mask_strides is None:
        return None
    sizes = (ctypes.c_int64 * 7)(batch, heads, kv_heads, length, head_dim, head_dim, old)
    cache = (kv_heads * length * head_dim, length * head_dim, head_dim)
    strides = (ctypes.c_int64 * 23)(
        q.stride(0), q.stride(1), *cache, *cache, *mask_strides,
        *k_old.stride()[:3], *k_new.stride()[:3], *v_old.stride()[:3], *v_new.stride()[:3],
    )  # fmt: skip
    return sizes, strides


def measure() -> GemmTimes:
    """Time ATen's op and memopt's kernel on SHAPES as a decode step runs them (module doc):
    passes over `_LAYERS` layers, each a GEMV over its weights and an attention over its own
    cache, ATen's and memopt's passes alternating; per shape the medians of the passes'
    attention times and of the pairs' ratios."""
    # Real tensors (a compile runs under Dynamo's fake mode), on the CPU whatever the
    # caller's default device; not under a device mode, whose Python dispatch of every
    # torch call would weigh on the side making more of them.
    with unset_fake_temporarily(), torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        rand = functools.partial(torch.rand, generator=generator, device=_CPU, dtype=_FLOAT32)
        # (K, N) whose N is contiguous: the (N, K) layout of nn.Linear's weights
        weights = [rand((_WEIGHT_NBYTES // 4 // 1024, 1024)).t() for _ in range(_LAYERS)]
        row = rand((1, weights[0].shape[0]))
        aten_s, memopt_s, ratios = [], [], []
        for heads, kv_heads, length, head_dim in SHAPES:
            shapes = ((1, heads, 1, head_dim), *[(1, kv_heads, length, head_dim)] * 2)
            layers = [[rand(shape) for shape in shapes] for _ in range(_LAYERS)]
            mask = torch.zeros((1, 1, 1, length), device=_CPU, dtype=_FLOAT32)
            runs = (FLASH_CPU, DecodeAttention())
            for attention in runs:  # warm-up: thread pool, the kernel's library, first touch
                _step_seconds(attention, weights, row, layers, mask)
            pairs = [
                [_step_seconds(a, weights, row, layers, mask) for a in runs] for _ in range(_PAIRS)
            ]
            aten_s.append(statistics.median(p[0] for p in pairs) / _LAYERS)
            memopt_s.append(statistics.median(p[1] for p in pairs) / _LAYERS)
            ratios.append(statistics.median(p[0] / p[1] for p in pairs))
    return GemmTimes(SHAPES, tuple(aten_s), tuple(memopt_s), tuple(ratios))


def _step_seconds(attention, weights, row, layers, mask) -> float:
    """Seconds of `attention`'s calls in one mock decode step (`measure`)."""
    seconds = 0.0
    for weight, (q, k, v) in zip(weights, layers):
        streaming_matmul(None, row, weight)
        start = time.perf_counter()
        attention(q, k, v, attn_mask=mask)
        seconds += time.perf_counter() - start
    return seconds


def measured_attention_times(refresh: bool = False) -> GemmTimes:
    """This machine's decode attention times (cached; gemm.measured_times)."""
    return measured_times("attention", SHAPES, lambda: measure(), refresh, "memopt")


def attention_library(choice: str = "auto") -> str:
    """Where one-position CPU attention runs: `choice` itself, or measured for "auto" (a
    failed measurement keeps ATen, with a warning)."""
    return resolve_choice(
        choice,
        "cpu_attention",
        measured_attention_times,
        "memopt",
        "CPU decode attention kernels",
        "decode attention",
    )


def flash_node(node: torch.fx.Node) -> tuple[object, float, bool] | None:
    """(q's metadata, dropout, is_causal) of a float32 4-D CPU flash attention node whose
    logsumexp nothing reads (an inference graph's), or None for any other node."""
    if node.op != "call_function" or node.target is not FLASH_CPU:
        return None
    q = node.args[0]
    meta = tensor_meta(q) if isinstance(q, torch.fx.Node) else None
    if meta is None or len(meta.shape) != 4 or meta.dtype != _FLOAT32:
        return None
    values = node.meta.get("val")
    device = getattr(values[0], "device", None) if isinstance(values, (tuple, list)) else None
    if device is not None and device.type != "cpu":
        return None
    if not all(
        user.target is operator.getitem and (user.args[1] == 0 or not user.users)
        for user in node.users
    ):
        return None
    rest = list(node.args[3:])
    dropout = rest[0] if rest else node.kwargs.get("dropout_p", 0.0)
    causal = rest[1] if len(rest) > 1 else node.kwargs.get("is_causal", False)
    return meta, dropout, causal


def one_position(node: torch.fx.Node) -> bool:
    """A CPU flash attention node whose query has one static position, with no dropout, not
    causal, whose logsumexp nothing reads: a node DecodeAttention may stand for."""
    found = flash_node(node)
    if found is None:
        return False
    meta, dropout, causal = found
    return static_int(meta.shape[2]) == 1 and dropout == 0 and causal is False


def point_attention(
    gm: torch.fx.GraphModule,
    takes: Callable[[torch.fx.Node], bool],
    library: Callable[[str], str],
    choice: str,
    make: Callable[[], LibraryAttention],
) -> int:
    """Point the nodes of `gm` that `takes` at `make()` where `library(choice)` says
    memopt (for "auto", this machine's measurement); returns how many. The caller
    recompiles `gm`."""
    nodes = [n for n in gm.graph.nodes if takes(n)]
    if not nodes or library(choice) != "memopt":
        return 0
    for node in nodes:
        node.target = make()
    return len(nodes)


def point_decode_attention(gm: torch.fx.GraphModule, choice: str) -> int:
    """Point `gm`'s one-position CPU attention nodes at a DecodeAttention where `choice`
    (or for "auto", this machine's measurement) says memopt; returns how many."""
    return point_attention(gm, one_position, attention_library, choice, DecodeAttention)


def describe(gm: torch.fx.GraphModule, choice: str) -> str:
    """What runs `gm`'s attention on memopt's decode kernel and why, or "" when none does."""
    what = "one-position attentions on memopt's decode kernel"
    return describe_library(
        gm,
        (DecodeAttention, AppendAttention),
        choice,
        "cpu_attention",
        measured_attention_times,
        what,
    )


__all__ = [
    "CHOICES",
    "AppendAttention",
    "SHAPES",
    "DecodeAttention",
    "LibraryAttention",
    "attention_library",
    "flash_node",
    "point_attention",
    "decode_attention",
    "describe",
    "measure",
    "measured_attention_times",
    "one_position",
    "plan",
    "point_decode_attention",
]
