"""float32 products of a few rows (a decode step's GEMVs): ATen's or memopt's streaming kernels.

A decode step multiplies one activation row by every weight matrix: each weight element is
read once and used once, so the product's time is the weight's bytes over the bandwidth it
streams at. ATen hands such a product to MKL's sgemv (sgemm for a few rows), which on this
project's AMD EPYC streams far below the machine's bandwidth: a 1x1024 by 1024x32000
product (131 MB of weights, from memory) 21.5 GB/s, where memopt's kernel reads 52 GB/s;
at four rows ATen's falls to 8 GB/s and memopt's holds 42 (measured, 2 threads). The
kernels (backends/cpp/quantized.py, `memopt_f32_matmul*`) are the narrow-weight GEMVs'
loops without the widening: a dot product per weight row with software prefetches for an
(N, K) weight (nn.Linear's; mm reads its transposed view), and for a (K, N) one (Conv1D's,
mm's operand as stored) each thread streams a contiguous block of rows into private sums,
added at the end.

Which is faster depends on the processor: on an Intel Xeon (2 threads) MKL streams a
one-row product as fast as memopt's kernels (0.93-1.04x), though not four rows (1.5x
slower). So it is measured once per machine, like the GEMM libraries (gemm.py), as a
decode step runs them: for each of `SHAPES`, one pass over `STEP_NBYTES` of distinct
weights of that shape (past the per-core caches, as a step's weights are), ATen's `addmm`
called from Python and memopt's kernel through its bound native launch, in alternating
pairs, the median of the pairs' ratios. memopt's kernels are taken by `RULE`: at least as
fast in the geometric mean and at most 10% slower on any shape. The tie goes to them
because a replayed step (runtime/tape.py) runs each of their products as one native
launch with no Python, where each of ATen's is a Python call (3-4 us, a sixth of a
512x512 product's time) and enough such calls keep a graph from getting a tape at all.
Measured on Llama's decode step on that Xeon: 1.86 -> 1.57 ms with memopt's kernels where
the per-shape rule alone had kept ATen's. Cached in
`$MEMOPT_CACHE_DIR/machine/gemv-<key>.json`. The `cpu_gemv` option ("aten", "memopt")
overrides it.

`StreamingGemv` stands for one float32 `mm`/`addmm` node of at most `GEMV_ROWS` rows (static):
it sums in another order than MKL, so results match eager to float32 rounding, not bit for
bit. Anything else runs the ATen op: other dtypes, devices or tensor subclasses, autograd
recording, `beta`/`alpha`, a bias that is not a contiguous (N,) vector, a weight that is
neither row- nor column-major, more rows, an empty dimension.
"""

from __future__ import annotations

import functools
import statistics

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from memopt.backends.cpp import launcher, quantized
from memopt.backends.runtime.gemm import (
    GemmTimes,
    LibraryMatmul,
    Rule,
    _seconds,
    describe_library,
    measured_times,
    resolve_choice,
    runs_on_cpu_gemm,
)
from memopt.backends.runtime.linear import PLAIN_TENSORS, launchable
from memopt.compiler.graph import static_int, tensor_meta

aten = torch.ops.aten

CHOICES = ("auto", "aten", "memopt")
# Rows of x at most this many: the kernels read each weight row once for all of them.
GEMV_ROWS = quantized.GEMV_ROWS
# (M, K, N, layout): layout 0 an (N, K) weight read through its transposed view, 1 a (K, N)
# weight as stored. A decode step's projections (in and out of an MLP, attention's of a
# small model), a few rows.
SHAPES = (
    (1, 1024, 4096, 0),
    (1, 4096, 1024, 0),
    (4, 1024, 4096, 0),
    (1, 1024, 4096, 1),
    (1, 4096, 1024, 1),
    (1, 512, 512, 0),
    (1, 512, 2048, 1),
)
STEP_NBYTES = 32 << 20  # each shape's pass: this many bytes of distinct weights
RULE = Rule(margin=1.0, floor=0.9)  # (module doc)
_PAIRS = 7


def streaming_matmul(
    bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, kernel: str | None = None
) -> torch.Tensor:
    """`addmm(bias, a, b)` (`mm(a, b)` without a bias) on memopt's streaming kernels, for
    a float32 a (M, K) and b (K, N) whose rows or columns are contiguous (`_kernel_for`);
    `kernel`: the one `_kernel_for` named, when the caller has it."""
    if not a.is_contiguous():
        a = a.contiguous()
    m, k = a.shape
    n = b.shape[1]
    out = torch.empty((m, n), dtype=torch.float32, device=a.device)
    if kernel is None:
        kernel = _NK if b.t().is_contiguous() else _KN
    bias_address = None if bias is None else bias.data_ptr()
    quantized.functions()[kernel](a.data_ptr(), b.data_ptr(), bias_address, out.data_ptr(), m, n, k)
    return out


def measure() -> GemmTimes:
    """Time ATen's addmm and memopt's kernels on SHAPES as a decode step runs them, in
    alternating pairs (module doc); seconds a product."""
    # Real CPU tensors whatever the caller's default device, not under a device mode (its
    # Python dispatch of every torch call would weigh on the side making more of them).
    with unset_fake_temporarily(), torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        randn = functools.partial(
            torch.randn, generator=generator, device="cpu", dtype=torch.float32
        )
        aten_s, memopt_s, ratios = [], [], []
        for m, k, n, layout in SHAPES:
            a, bias = (randn(s) for s in ((m, k), (n,)))
            count = max(1, STEP_NBYTES // (4 * k * n))
            weights = [randn((n, k) if layout == 0 else (k, n)) for _ in range(count)]
            products = [(w.t() if layout == 0 else w) for w in weights]
            kernels = [StreamingGemv(aten.addmm.default) for _ in products]

            def run_aten(products=products, a=a, bias=bias) -> None:
                for b in products:
                    torch.addmm(bias, a, b)

            def run_memopt(products=products, kernels=kernels, a=a, bias=bias) -> None:
                for kernel, b in zip(kernels, products):
                    kernel(bias, a, b)  # the first call plans and binds, the others launch

            run_aten()  # warm-up: thread pool, first touch, the launches bound
            run_memopt()
            pairs = [(_seconds(run_aten), _seconds(run_memopt)) for _ in range(_PAIRS)]
            aten_s.append(statistics.median(p[0] for p in pairs) / count)
            memopt_s.append(statistics.median(p[1] for p in pairs) / count)
            ratios.append(statistics.median(p[0] / p[1] for p in pairs))
    return GemmTimes(SHAPES, tuple(aten_s), tuple(memopt_s), tuple(ratios))


def measured_gemv_times(refresh: bool = False) -> GemmTimes:
    """This machine's GEMV times (cached; gemm.measured_times)."""
    return measured_times("gemv", SHAPES, lambda: measure(), refresh, "memopt", RULE)


def gemv_library(choice: str = "auto") -> str:
    """Where float32 CPU products of a few rows run: `choice` itself, or measured for
    "auto" (a failed measurement keeps ATen, with a warning)."""
    return resolve_choice(
        choice, "cpu_gemv", measured_gemv_times, "memopt", "CPU GEMV kernels", "GEMVs", RULE
    )


def point_gemvs(gm: torch.fx.GraphModule, cpu_gemv: str) -> int:
    """Point `gm`'s float32 CPU mm and addmm nodes of at most GEMV_ROWS static rows at a
    StreamingGemv where `cpu_gemv` (or for "auto", this machine's measurement) says memopt;
    returns how many. The caller recompiles `gm`."""
    gemvs = [n for n in gm.graph.nodes if runs_on_cpu_gemm(n) and few_rows(n)]
    if not gemvs or gemv_library(cpu_gemv) != "memopt":
        return 0
    for node in gemvs:
        node.target = StreamingGemv(node.target)
    return len(gemvs)


def describe(gm: torch.fx.GraphModule, choice: str) -> str:
    """What runs `gm`'s GEMVs on memopt's kernels and why, or "" when none does."""
    what = "float32 GEMVs on memopt's streaming kernels"
    return describe_library(gm, StreamingGemv, choice, "cpu_gemv", measured_gemv_times, what)


def few_rows(node: torch.fx.Node) -> bool:
    """An mm/addmm whose left operand has a static row count of 1 to GEMV_ROWS."""
    a = node.args[1] if node.target is aten.addmm.default else node.args[0]
    meta = tensor_meta(a) if isinstance(a, torch.fx.Node) else None
    if meta is None or len(meta.shape) != 2:
        return False
    rows = static_int(meta.shape[0])
    return rows is not None and 1 <= rows <= GEMV_ROWS


class StreamingGemv(LibraryMatmul):
    """An mm/addmm node of a few rows on memopt's streaming kernels (module doc).

    The operands' layouts planned last are bound to a native launch
    (`launcher.module()`): the next call whose operands have those dtypes, shapes and
    strides (checked in C) is one C call, about 4 us less Python than the plan and a ctypes
    call (a decode step makes 17-29 of them). Anything else, and any call while autograd
    records, goes through `plan` as before."""

    library = "memopt GEMV"

    def __init__(self, op: torch._ops.OpOverload) -> None:
        super().__init__(op)
        self._launch: tuple | None = None  # (launch, M, N) for the layouts planned last

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_launch": None}  # a launch is bound anew, not copied

    def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
        bound = self._launch
        if bound is not None and not kwargs and not _grad_enabled() and launchable(args):
            launch, m, n = bound
            out = _empty((m, n), dtype=_FLOAT32, device=_CPU)
            if launch(*args, out) == 0:
                return out
        return super().__call__(*args, **kwargs)

    def plan(self, a: object, b: object, bias: object) -> object | None:
        return _kernel_for(a, b, bias)  # the layout found once: its kernel

    def run(
        self, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, way: object
    ) -> torch.Tensor:
        if a.is_contiguous():
            self._bind(bias, a, b, way)
        return streaming_matmul(bias, a, b, way)

    def _bind(self, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, way: str) -> None:
        operands = (a, b) if bias is None else (bias, a, b)
        (m, k), n = a.shape, b.shape[1]
        scalars = (m, n, k, int(bias is not None))
        launch = launcher.bind_layouts(quantized.packed_address(way), operands, 1, scalars)
        self._launch = None if launch is None else (launch, m, n)


_NK, _KN = "memopt_f32_matmul", "memopt_f32_matmul_kn"
_FLOAT32, _STRIDED, _CPU = torch.float32, torch.strided, torch.device("cpu")
_empty, _grad_enabled = torch.empty, torch.is_grad_enabled


def _kernel_for(a: object, b: object, bias: object) -> str | None:
    """The kernel that reads these operands (`_NK` for a weight whose columns are
    contiguous, `_KN` for one whose rows are), or None: the ATen op runs (module doc)."""
    if type(a) not in PLAIN_TENSORS or type(b) not in PLAIN_TENSORS:
        return None
    if a.dtype is not _FLOAT32 or b.dtype is not _FLOAT32 or not (a.is_cpu and b.is_cpu):
        return None
    if a.layout is not _STRIDED or b.layout is not _STRIDED or a.dim() != 2 or b.dim() != 2:
        return None
    if a.is_neg() or b.is_neg():  # a negated view's bit: the kernels read the memory
        return None
    (m, k), (k_b, n) = a.shape, b.shape
    if k != k_b or not (1 <= m <= GEMV_ROWS and k and n):
        return None
    grads = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    if bias is not None:
        if type(bias) not in PLAIN_TENSORS or bias.dtype is not _FLOAT32 or not bias.is_cpu:
            return None
        if bias.layout is not _STRIDED or bias.shape != (n,) or not bias.is_contiguous():
            return None
        if bias.is_neg():
            return None
        grads = grads or (torch.is_grad_enabled() and bias.requires_grad)
    if grads:
        return None
    if b.t().is_contiguous():
        return _NK
    return _KN if b.is_contiguous() else None


__all__ = [
    "CHOICES",
    "GEMV_ROWS",
    "RULE",
    "SHAPES",
    "STEP_NBYTES",
    "StreamingGemv",
    "describe",
    "gemv_library",
    "measure",
    "measured_gemv_times",
    "point_gemvs",
    "streaming_matmul",
]
