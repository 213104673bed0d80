"""Which CPU library runs float32 GEMMs: ATen's `mm` (MKL's sgemm) or oneDNN's inner product.

Both ship with torch's CPU build and compute in float32. Which is faster depends on the
processor, not on the graph: MKL picks its code path by vendor, and on this project's AMD
EPYC machine (avx512f) ATen's `addmm` of a (1024, 512) by (512, 2048) float32 product took
9.7 ms where oneDNN's `_linear_pointwise` took 4.3 ms (measured, 2 threads); on Intel
parts the two are close. So the choice is measured, once per machine:

- `measure()` times both libraries on the GEMM shapes of a transformer layer and of
  decoding (`SHAPES`), each the best of a few runs after a warm-up, about half a second;
- `choose()` takes oneDNN when it is at least `MARGIN` faster in the geometric mean over
  those shapes and not slower on any of them;
- `gemm_library("auto")` reads the choice from `$MEMOPT_CACHE_DIR/machine/gemm-<key>.json`
  (keyed like the machine's bandwidth figures: processor, threads, torch version), else
  measures and caches it. The `cpu_gemm` option ("aten", "onednn") overrides it.

`OneDnnMatmul` stands for one float32 `mm` or `addmm` node: `addmm(bias, a, b)` is
`_linear_pointwise(a, b.t(), bias)`, the weight read as the (N, K) view of mm's (K, N)
operand. oneDNN sums in another order than MKL: results match eager to float32 rounding,
not bit for bit (as the epilogue pass's fused linears, runtime/linear.py). Anything else
(other dtypes, devices, tensor subclasses, autograd recording, `beta`/`alpha`, a bias
that is not one row, a weight that is neither row- nor column-major, an empty dimension,
a torch without oneDNN) runs the ATen op.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from memopt.backends.cache import cache_dir, machine_key, write_atomically
from memopt.backends.runtime.linear import onednn_available
from memopt.compiler.cost import Cost, op_flops, read_bytes
from memopt.compiler.graph import tensor_meta

aten = torch.ops.aten

LIBRARIES = ("aten", "onednn")
CHOICES = ("auto", *LIBRARIES)
# (M, K, N): a transformer layer's projections and MLP at 1024 tokens, and a decoding step.
SHAPES = ((1024, 512, 512), (1024, 512, 2048), (1024, 2048, 512), (8, 1024, 1024))
MARGIN = 1.1  # oneDNN is taken when at least this much faster (geometric mean)
_RUNS = 5
GEMM_OPS = frozenset({aten.mm.default, aten.addmm.default})
# Tensors oneDNN is handed: plain ones and parameters (an inference graph's weights), not
# fake tensors or other subclasses.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


@dataclass(frozen=True)
class GemmTimes:
    """Best seconds per shape of each library (measured), and the library chosen."""

    shapes: tuple[tuple[int, int, int], ...]
    aten_s: tuple[float, ...]
    onednn_s: tuple[float, ...]

    @property
    def speedup(self) -> float:
        """Geometric mean over the shapes of ATen's time / oneDNN's time."""
        ratios = [a / o for a, o in zip(self.aten_s, self.onednn_s)]
        return math.exp(sum(math.log(r) for r in ratios) / len(ratios))

    @property
    def library(self) -> str:
        return choose(self.aten_s, self.onednn_s)

    def describe(self) -> str:
        return (
            f"float32 GEMMs on the CPU: {self.library} (oneDNN measured "
            f"{self.speedup:.2f}x ATen's speed, geometric mean over {len(self.shapes)} shapes)"
        )


def choose(aten_s: tuple[float, ...], onednn_s: tuple[float, ...]) -> str:
    """'onednn' when its times are at least MARGIN faster in the geometric mean and no
    slower on any shape, else 'aten'."""
    if not onednn_s or len(aten_s) != len(onednn_s):
        return "aten"
    ratios = [a / o for a, o in zip(aten_s, onednn_s)]
    mean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    return "onednn" if mean >= MARGIN and min(ratios) >= 1.0 else "aten"


def _best_seconds(gemm: Callable[..., torch.Tensor], *args: object) -> float:
    gemm(*args)  # warm-up: primitive creation, thread pool, first touch
    best = float("inf")
    for _ in range(_RUNS):
        start = time.perf_counter()
        gemm(*args)
        best = min(best, time.perf_counter() - start)
    return best


def _onednn_addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise.default(a, b.t(), bias, "none", [], "")


def measure() -> GemmTimes:
    """Time ATen's and oneDNN's float32 GEMM on SHAPES (about half a second)."""
    # Compiles run under Dynamo's fake tensor mode: these tensors must be real.
    with unset_fake_temporarily(), torch.no_grad():
        return _measure()


def _measure() -> GemmTimes:
    aten_s, onednn_s = [], []
    generator = torch.Generator().manual_seed(0)
    for m, k, n in SHAPES:
        a = torch.randn(m, k, generator=generator)
        b = torch.randn(k, n, generator=generator)
        bias = torch.randn(n, generator=generator)
        aten_s.append(_best_seconds(torch.addmm, bias, a, b))
        if onednn_available():
            onednn_s.append(_best_seconds(_onednn_addmm, bias, a, b))
    return GemmTimes(SHAPES, tuple(aten_s), tuple(onednn_s))


def measured_gemm_times(refresh: bool = False) -> GemmTimes:
    """This machine's GEMM times, from the cache where it has them (else measured, cached)."""
    path = cache_dir("machine") / f"gemm-{machine_key()}.json"
    if not refresh:
        try:
            data = json.loads(path.read_text())
            return GemmTimes(
                tuple(tuple(s) for s in data["shapes"]),
                tuple(data["aten_s"]),
                tuple(data["onednn_s"]),
            )
        except (OSError, ValueError, TypeError, KeyError):
            pass
    times = measure()
    record = {**asdict(times), "library": times.library, "label": "measured"}
    write_atomically(path, json.dumps(record, indent=1).encode())
    return times


def gemm_library(choice: str = "auto") -> str:
    """The library float32 CPU GEMMs run on: `choice` itself, or measured for "auto"."""
    if choice not in CHOICES:
        raise ValueError(f"unknown cpu_gemm {choice!r}; expected one of {', '.join(CHOICES)}")
    if choice == "onednn" and not onednn_available():
        return "aten"
    if choice != "auto":
        return choice
    return measured_gemm_times().library if onednn_available() else "aten"


def describe(gm: torch.fx.GraphModule, choice: str) -> str:
    """What runs `gm`'s GEMMs on oneDNN and why, or "" when none does."""
    count = sum(isinstance(node.target, OneDnnMatmul) for node in gm.graph.nodes)
    if not count:
        return ""
    why = f"cpu_gemm={choice!r}"
    if choice == "auto":
        why = f"oneDNN measured {measured_gemm_times().speedup:.2f}x ATen's speed here"
    return f"{count} float32 GEMMs on oneDNN ({why})"


def runs_on_cpu_gemm(node: torch.fx.Node) -> bool:
    """A float32 mm or addmm on the CPU: a node OneDnnMatmul may stand for."""
    if node.op != "call_function" or node.target not in GEMM_OPS:
        return False
    value = node.meta.get("val")
    device = getattr(value, "device", None)
    meta = tensor_meta(node)
    return (
        (device is None or device.type == "cpu")
        and meta is not None
        and (meta.dtype == torch.float32)
    )


class OneDnnMatmul:
    """Callable target standing for one float32 `mm` or `addmm` node (module doc)."""

    memopt_kind = "extern"

    def __init__(self, op: torch._ops.OpOverload) -> None:
        if op not in GEMM_OPS:
            raise ValueError(f"OneDnnMatmul stands for mm or addmm, not {op}")
        self.op = op
        self.__name__ = op.__name__
        self.memopt_name = f"{op} (oneDNN)"

    def __repr__(self) -> str:
        return f"OneDnnMatmul({self.op})"

    def memopt_cost(self, node: torch.fx.Node) -> Cost:
        """The ATen op's cost: inputs read once, the result written once."""
        inputs = [a for a in node.all_input_nodes if tensor_meta(a) is not None]
        return Cost(
            read=read_bytes(node, inputs),
            write=tensor_meta(node).nbytes,
            flops=op_flops(node, self.op),
        )

    def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
        if kwargs:  # beta, alpha
            return self.op(*args, **kwargs)
        if self.op is aten.addmm.default:
            bias, a, b = args
        else:
            (a, b), bias = args, None
        if _takes(a, b, bias):
            return torch.ops.mkldnn._linear_pointwise.default(a, b.t(), bias, "none", [], "")
        return self.op(*args)


def _takes(a: object, b: object, bias: object) -> bool:
    if not (type(a) in _PLAIN and type(b) in _PLAIN):
        return False
    if a.dtype != torch.float32 or b.dtype != torch.float32 or not (a.is_cpu and b.is_cpu):
        return False
    if a.dim() != 2 or b.dim() != 2 or 0 in a.shape or 0 in b.shape:
        return False
    if not (b.is_contiguous() or b.t().is_contiguous()):
        return False
    tensors = (a, b)
    if bias is not None:
        if not (
            type(bias) in _PLAIN
            and bias.is_cpu
            and bias.dtype == torch.float32
            and bias.dim() == 1
            and bias.shape[0] == b.shape[1]
            and bias.is_contiguous()
        ):
            return False
        tensors = (a, b, bias)
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
