"""The Triton kernels the test suite renders, as GPU launches: what the offline compile test
builds for real targets (tests/backends/test_triton_offline.py, bench/gpu_compile.py).

Three sources, each at sizes where a GPU launch has full blocks:
- every hand-built Kernel IR example (kernel_examples.py) the backend tests run, in fp32,
  fp16 and bf16 where the example takes a dtype: pointwise, transposed (2D tiles), inner
  reductions (persistent and looped), an outer (column) reduction, argmax, gathers,
  symbolic sizes;
- the attention kernels (forward with and without masks, causal; backward) in each dtype at
  head dim 64, and at head dims 32 and 128 (`ATTENTION_CASES`);
- every kernel the pipeline generates for the GPT-2 block with backend="triton"
  (`GPT2_CASES`): matmul templates with epilogues, LayerNorm and GELU forward and backward,
  bias-gradient column sums, softmax, attention.

Each entry is (name, Launch, contiguous): `contiguous` marks launches with a stream that
walks its buffer contiguously in runs a 128-bit access can take (every launch but a
gather's, one whose sizes are runtime arguments not known divisible by 16, and the fp32
attention backward: see `_vectorized`).
"""

from __future__ import annotations

import functools

import torch

import memopt
from memopt.backends.triton.attention import attention
from memopt.backends.triton.attention_backward import attention_backward
from memopt.backends.triton.launching import Launch, recording_launches
from memopt.driver.gpu import graph_launches, kernel_launches
from memopt.examples.gpt2_block import Block

import kernel_examples as examples

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _kernel_launches(build) -> list[Launch]:
    kernel, _inputs, _expected, sizes = build()
    return kernel_launches(kernel, sizes)[1]


# (name, builder, contiguous) for the Kernel IR examples, at GPU-sized shapes.
def _examples():
    for tag, dtype in DTYPES.items():
        yield f"add_broadcast_{tag}", lambda d=dtype: examples.add_broadcast(512, 768, d), True
        yield f"softmax_{tag}", lambda d=dtype: examples.softmax(64, 1024, d), True
        yield f"softmax_tail_{tag}", lambda d=dtype: examples.softmax(64, 1000, d), True
        yield f"softmax_looped_{tag}", lambda d=dtype: examples.softmax(8, 8192, d), True
        yield f"mixed_precision_{tag}", lambda d=dtype: examples.mixed_precision(65536, d), True
    yield "transposed_read", lambda: examples.transposed_read(512, 256), True
    yield "layer_norm", lambda: examples.layer_norm(64, 768), True
    yield "column_sum", lambda: examples.column_sum(1024, 768), True
    yield "argmax_rows", lambda: examples.argmax_rows(64, 1024), True
    yield "cat_rows", lambda: examples.cat_rows(256, 256, 768), True
    yield "gather_rows", lambda: examples.gather_rows(1000, 768, 64), False
    yield "dynamic_scale", lambda: examples.dynamic_scale(512, 768), False


def _attention_launches(dtype: torch.dtype, head_dim: int = 64) -> list[tuple[str, Launch]]:
    batch, heads, seq = 2, 4, 256

    def meta(*shape, d=dtype):
        return torch.empty(shape, dtype=d, device="meta")

    q, k, v = (meta(batch, heads, seq, head_dim) for _ in range(3))
    out, lse = meta(batch, heads, seq, head_dim), meta(batch, heads, seq, d=torch.float32)
    found = []
    cases = [
        ("attention_causal", None, True),
        ("attention_additive_mask", meta(1, 1, seq, seq), False),
        ("attention_bool_mask", meta(1, 1, seq, seq, d=torch.bool), False),
    ]
    for name, mask, causal in cases:
        with recording_launches() as launches:
            attention(q, k, v, mask, causal, None, out, lse)
            attention_backward(out, q, k, v, out, lse, mask, causal, None, (q, k, v))
        suffix = "" if head_dim == 64 else f"_d{head_dim}"
        found += [
            (f"{name}{suffix}_{p.fn_name.removeprefix('memopt_attention_')}", p) for p in launches
        ]
    return found


def _gpt2_launches(dtype: torch.dtype, training: bool) -> list[tuple[str, Launch]]:
    torch.manual_seed(0)
    seq = 128
    model = Block(block_size=seq).to(dtype)
    if not training:
        model.eval()
    x = torch.randn(2, seq, 768, dtype=dtype, requires_grad=training)
    analysis = memopt.analyze(model, x, training=training, backend="triton", device="h100")
    found = []
    for graph in analysis.graphs:
        for name, _kind, _nbytes, launches, _sectors in graph_launches(graph):
            found += [(f"gpt2_{name}_{p.fn_name.removeprefix('memopt_')}", p) for p in launches]
    return found


def quantized_launches() -> list[tuple[str, Launch]]:
    """The precision pass's dequantizing matmul for each weight format, at a decode step
    (M = 1) and a prefill (M = 256) of a 4096-wide layer."""
    from memopt.backends.narrow import QuantizedWeight
    from memopt.backends.triton.quantized import dequant_matmul

    n = k = 4096
    group = 128

    def meta(*shape, d):
        return torch.empty(shape, dtype=d, device="meta")

    weights = {
        "int8": QuantizedWeight("int8", n, k, meta(n, k, d=torch.int8), meta(n, d=torch.float32)),
        "int4": QuantizedWeight(
            "int4",
            n,
            k,
            meta(n, k // 2, d=torch.uint8),
            meta(n, k // group, d=torch.float32),
            group,
        ),
        "bf16": QuantizedWeight("bf16", n, k, meta(n, k, d=torch.bfloat16), None),
        "fp8_e4m3": QuantizedWeight(
            "fp8_e4m3", n, k, meta(n, k, d=torch.float8_e4m3fn), meta(n, d=torch.float32)
        ),
    }
    found = []
    for kind, weight in weights.items():
        for m in (1, 256):
            with recording_launches() as launches:
                dequant_matmul(meta(m, k, d=torch.float32), weight, meta(m, n, d=torch.float32))
            found += [(f"dequant_matmul_{kind}_m{m}", p) for p in launches]
    return found


def _vectorized(name: str, tag: str) -> bool:
    """Whether a launch's contiguous streams get 128-bit accesses: all but the fp32
    attention backward, whose IEEE dots are spill-free only in 16x16 tiles over 16 warps,
    two elements a thread (backends/triton/attention_backward.py)."""
    return not (tag == "fp32" and "attention" in name and "bwd" in name)


# What the corpus compiles beyond the examples: (dtype, head dim, masks) of attention, and
# (dtype, training) of the GPT-2 block. Everything at the main configurations (head dim 64,
# fp16); enough beside them that every kind of kernel is compiled in fp32, fp16 and bf16
# within the suite's time (about two minutes cold on 2 cores for both targets).
ATTENTION_CASES = [
    *((tag, 64, None) for tag in DTYPES),
    ("fp16", 128, ("attention_additive_mask",)),
    ("fp32", 128, ("attention_additive_mask",)),
    ("fp16", 32, ("attention_causal",)),
]
GPT2_CASES = [("fp16", False), ("fp16", True), ("fp32", False), ("bf16", False)]


@functools.cache
def corpus() -> list[tuple[str, Launch, bool]]:
    """Every launch of the corpus, named uniquely."""
    entries = []
    for name, build, contiguous in _examples():
        for planned in _kernel_launches(build):
            entries.append((name, planned, contiguous))
    for tag, head_dim, cases in ATTENTION_CASES:
        entries += [
            (f"{n}_{tag}", p, _vectorized(n, tag))
            for n, p in _attention_launches(DTYPES[tag], head_dim)
            if cases is None or n.startswith(cases)
        ]
    for tag, training in GPT2_CASES:
        mode = "training" if training else "inference"
        entries += [
            (f"{n}_{mode}_{tag}", p, _vectorized(n, tag))
            for n, p in _gpt2_launches(DTYPES[tag], training)
        ]
    return entries
