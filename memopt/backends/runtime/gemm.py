"""Which CPU library runs float32 GEMMs: ATen's `mm` (MKL's sgemm) or oneDNN's inner product.

Both ship with torch's CPU build and compute in float32. Which is faster depends on the
processor, not on the graph: MKL picks its code path by vendor, and on this project's AMD
EPYC machine (avx512f) ATen's `addmm` of a (1024, 512) by (512, 2048) float32 product took
9.7 ms where oneDNN's `_linear_pointwise` took 4.3 ms (measured, 2 threads); on Intel
parts the two are close. So the choice is measured, once per machine:

- `measure()` times both libraries on the GEMM shapes of a transformer layer and of a
  small batch (`SHAPES`), in alternating pairs of calls, and keeps per shape the median
  of the pairs' ratios (other work on the machine, such as the kernel compiler a compile
  starts, slows both sides of a pair alike); about a quarter of a second;
- `choose()` takes oneDNN when it is at least `MARGIN` faster in the geometric mean over
  those shapes and not slower on any of them (`ONEDNN_RULE`; memopt's GEMV kernels,
  chosen the same way in gemv.py, have a `Rule` of their own);
- `gemm_library("auto")` reads the choice from `$MEMOPT_CACHE_DIR/machine/gemm-<key>.json`
  (keyed like the machine's bandwidth figures: processor, threads, torch version; a
  record for other shapes or with unusable values is measured again), else measures and
  caches it, once per process at most. The `cpu_gemm` option ("aten", "onednn") overrides
  it; `torch.backends.mkldnn.enabled = False` keeps every GEMM on ATen.

`OneDnnMatmul` stands for one float32 `mm` or `addmm` node: `addmm(bias, a, b)` is
`_linear_pointwise(a, b.t(), bias)`, the weight read as the (N, K) view of mm's (K, N)
operand. oneDNN sums in another order than MKL: results match eager to float32 rounding,
not bit for bit (as the epilogue pass's fused linears, runtime/linear.py). A oneDNN call
costs about 12 us however small (measured here: a 1x64 by 64x64 product 12.6 us against
ATen's 1.6 us) and a matrix-vector product is slower on it (1x2048 by 2048x2048: 317 us
against 206 us), so products of one row or of fewer than `MIN_MACS` multiply-adds stay
on ATen. So does anything else oneDNN does not take: other dtypes, devices, layouts or
tensor subclasses, autograd recording, `beta`/`alpha`, a bias that is not 1-D, a weight
that is neither row- nor column-major, an empty dimension, a torch without oneDNN or with
it disabled.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from memopt.backends.cache import cache_dir, machine_key, write_atomically
from memopt.backends.runtime.linear import PLAIN_TENSORS, onednn_available, onednn_enabled
from memopt.backends.runtime.quantized import QuantizedMatmul
from memopt.compiler.graph import static_int, tensor_meta

aten = torch.ops.aten

LIBRARIES = ("aten", "onednn")
CHOICES = ("auto", *LIBRARIES)
# (M, K, N): a transformer layer's projections and MLP at 1024 tokens, and a batch of 8.
SHAPES = ((1024, 512, 512), (1024, 512, 2048), (1024, 2048, 512), (8, 1024, 1024))
MARGIN = 1.1  # oneDNN is taken when at least this much faster (geometric mean)
# Products below this many multiply-adds stay on ATen (module doc; on the EPYC the two
# break even between 0.3M and 1M: 4x256x256 0.79x, 16x256x256 0.98x, 64x256x256 1.47x).
MIN_MACS = 2**21
_PAIRS = 7
GEMM_OPS = frozenset({aten.mm.default, aten.addmm.default})
_MEASURED: dict[str, GemmTimes] = {}  # cache file -> this process's reading of it (any kind)


@dataclass(frozen=True)
class GemmTimes:
    """Per shape, ATen's and the other library's seconds (medians over the pairs, measured:
    oneDNN here, memopt's GEMV kernels in gemv.py) and the median over the pairs of ATen's
    time / the other's (which library a rule takes: `choose`)."""

    shapes: tuple[tuple[int, ...], ...]
    aten_s: tuple[float, ...]
    other_s: tuple[float, ...]
    ratios: tuple[float, ...]

    @property
    def speedup(self) -> float:
        """Geometric mean over the shapes of ATen's time / the other's (1.0 without the
        other's times)."""
        return _geometric_mean(self.ratios)

    def valid(self, shapes: tuple[tuple[int, ...], ...] | None = None) -> bool:
        """Measured on `shapes` (default SHAPES), every figure a positive finite number."""
        shapes = SHAPES if shapes is None else shapes
        figures = (*self.aten_s, *self.other_s, *self.ratios)
        return (
            self.shapes == shapes
            and len(self.aten_s) == len(shapes)
            and len(self.other_s) == len(self.ratios)
            and len(self.ratios) in (0, len(shapes))
            and all(isinstance(f, (int, float)) and math.isfinite(f) and f > 0 for f in figures)
        )


@dataclass(frozen=True)
class Rule:
    """When the measured library is taken over ATen: ATen's time / its time at least
    `margin` in the geometric mean over the shapes and at least `floor` on each."""

    margin: float = MARGIN
    floor: float = 1.0


ONEDNN_RULE = Rule()


def choose(ratios: tuple[float, ...], other: str = "onednn", rule: Rule = ONEDNN_RULE) -> str:
    """`other` where `ratios` (ATen's time / its time, per shape) meet `rule`, else
    'aten'."""
    if not ratios:
        return "aten"
    taken = _geometric_mean(ratios) >= rule.margin and min(ratios) >= rule.floor
    return other if taken else "aten"


def _geometric_mean(values: tuple[float, ...]) -> float:
    if not values:
        return 1.0
    return math.exp(sum(math.log(v) for v in values) / len(values))


def onednn_addmm(bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`addmm(bias, a, b)` (`mm(a, b)` without a bias) as oneDNN's inner product."""
    return torch.ops.mkldnn._linear_pointwise.default(a, b.t(), bias, "none", [], "")


def _seconds(gemm, *args: torch.Tensor) -> float:
    start = time.perf_counter()
    gemm(*args)
    return time.perf_counter() - start


def measure() -> GemmTimes:
    """Time ATen's and oneDNN's float32 GEMM on SHAPES, in alternating pairs."""
    # Compiles run under Dynamo's fake tensor mode and may run under a default device or
    # dtype of the caller's: these tensors are real float32 CPU tensors.
    with unset_fake_temporarily(), torch.no_grad(), torch.device("cpu"):
        return _measure()


def _measure() -> GemmTimes:
    onednn = onednn_available()
    aten_s, onednn_s, ratios = [], [], []
    generator = torch.Generator().manual_seed(0)
    for m, k, n in SHAPES:
        a, b, bias = (
            torch.randn(shape, generator=generator, dtype=torch.float32)
            for shape in ((m, k), (k, n), (n,))
        )
        torch.addmm(bias, a, b)  # warm-up: thread pool, first touch, primitive creation
        if onednn:
            onednn_addmm(bias, a, b)
        pairs = []
        for _ in range(_PAIRS):
            first = _seconds(torch.addmm, bias, a, b)
            pairs.append((first, _seconds(onednn_addmm, bias, a, b) if onednn else 0.0))
        aten_s.append(statistics.median(p[0] for p in pairs))
        if onednn:
            onednn_s.append(statistics.median(p[1] for p in pairs))
            ratios.append(statistics.median(p[0] / p[1] for p in pairs))
    return GemmTimes(SHAPES, tuple(aten_s), tuple(onednn_s), tuple(ratios))


def measured_gemm_times(refresh: bool = False) -> GemmTimes:
    """This machine's GEMM times: this process's reading, else the cache's where it has
    valid ones, else measured now and cached (a cache that cannot be written is skipped)."""
    return measured_times("gemm", SHAPES, lambda: measure(), refresh)


def measured_times(
    name: str,
    shapes: tuple[tuple[int, ...], ...],
    measure_now: Callable[[], GemmTimes],
    refresh: bool = False,
    library: str = "onednn",
    rule: Rule = ONEDNN_RULE,
) -> GemmTimes:
    """Times cached in `$MEMOPT_CACHE_DIR/machine/<name>-<machine key>.json`: this
    process's reading, else the file's where it holds valid times for `shapes`, else
    `measure_now()`, written there. `library`: the other library's name in the record,
    `rule` what chose it there."""
    path = cache_dir("machine") / f"{name}-{machine_key()}.json"
    if not refresh and str(path) in _MEASURED:
        return _MEASURED[str(path)]
    times = None
    if not refresh:
        try:
            data = json.loads(path.read_text())
            times = GemmTimes(
                tuple(tuple(s) for s in data["shapes"]),
                tuple(data["aten_s"]),
                tuple(data["other_s"]),
                tuple(data["ratios"]),
            )
        except (OSError, ValueError, TypeError, KeyError):
            times = None
        if times is not None and not times.valid(shapes):
            times = None
    if times is None:
        times = measure_now()
        chosen = choose(times.ratios, library, rule)
        record = {**asdict(times), "library": chosen, "label": "measured"}
        try:
            write_atomically(path, json.dumps(record, indent=1).encode())
        except OSError:
            pass  # measured again by the next process
    _MEASURED[str(path)] = times
    return times


def gemm_library(choice: str = "auto") -> str:
    """The library float32 CPU GEMMs run on: `choice` itself, or measured for "auto"; ATen
    wherever oneDNN is absent or disabled."""
    if choice in ("auto", "onednn") and not onednn_enabled():
        return "aten"
    return resolve_choice(
        choice, "cpu_gemm", measured_gemm_times, "onednn", "CPU GEMM libraries", "GEMMs"
    )


def resolve_choice(
    choice: str,
    option: str,
    times: Callable[[], GemmTimes],
    library: str,
    timed: str,
    products: str,
    rule: Rule = ONEDNN_RULE,
) -> str:
    """Where `option`'s products run: `choice` itself ("aten" or `library`), or for "auto"
    `library` where this machine's `times()` meet `rule` (`choose`), else "aten"; a
    measurement that fails keeps ATen, with a warning naming what was `timed`. ValueError
    naming the choices for any other `choice`."""
    choices = ("auto", "aten", library)
    if choice not in choices:
        raise ValueError(f"unknown {option} {choice!r}; expected one of {', '.join(choices)}")
    if choice != "auto":
        return choice
    try:
        return choose(times().ratios, library, rule)
    except Exception as error:  # noqa: BLE001 - a failed measurement keeps ATen's products
        warnings.warn(
            f"memopt: timing the {timed} failed ({type(error).__name__}: {error}); "
            f"float32 {products} stay on ATen",
            stacklevel=3,
        )
        return "aten"


def point_gemms(gm: torch.fx.GraphModule, cpu_gemm: str) -> int:
    """Point `gm`'s float32 CPU mm and addmm nodes at a OneDnnMatmul where `cpu_gemm` (or
    for "auto", this machine's measurement) says oneDNN; returns how many. The precision
    pass's QuantizedMatmul nodes learn the library too (for their tiles of many rows).
    "auto" is resolved only for a graph with such nodes. The caller recompiles `gm`."""
    narrow = [n for n in gm.graph.nodes if isinstance(n.target, QuantizedMatmul)]
    gemms = [n for n in gm.graph.nodes if runs_on_cpu_gemm(n) and not _static_small(n)]
    if not narrow and not gemms:
        return 0
    library = gemm_library(cpu_gemm)
    for node in narrow:  # the precision pass's matmuls: their many rows' dequantized tiles
        node.target.gemm = library
    if library != "onednn":
        return 0
    for node in gemms:
        node.target = OneDnnMatmul(node.target)
    return len(gemms)


def describe(gm: torch.fx.GraphModule, choice: str) -> str:
    """What runs `gm`'s GEMMs on oneDNN and why, or "" when none does."""
    return describe_library(
        gm, OneDnnMatmul, choice, "cpu_gemm", measured_gemm_times, "float32 GEMMs on oneDNN"
    )


def describe_library(
    gm: torch.fx.GraphModule,
    target: type | tuple[type, ...],
    choice: str,
    option: str,
    measured: Callable[[], GemmTimes],
    what: str,
) -> str:
    """ "<count> <what> (<why>)" for `gm`'s nodes pointed at `target`, or "" for none: why
    is the option's value, or for "auto" the speed the machine measured."""
    count = sum(isinstance(node.target, target) for node in gm.graph.nodes)
    if not count:
        return ""
    why = f"{option}={choice!r}"
    if choice == "auto":
        why = f"measured {measured().speedup:.2f}x ATen's speed here"
    return f"{count} {what} ({why})"


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


def _static_small(node: torch.fx.Node) -> bool:
    """A product of static sizes that stays on ATen (one row, or under MIN_MACS)."""
    a, b = node.args[1:3] if node.target is aten.addmm.default else node.args[:2]
    metas = [tensor_meta(x) if isinstance(x, torch.fx.Node) else None for x in (a, b)]
    if any(m is None or len(m.shape) != 2 for m in metas):
        return False
    sizes = [static_int(x) for x in (*metas[0].shape, metas[1].shape[1])]
    return None not in sizes and _too_small(*sizes)


def _too_small(m: int, k: int, n: int) -> bool:
    """A product oneDNN is slower on (module doc): one row, or under MIN_MACS (also an
    empty dimension)."""
    return m < 2 or m * k * n < MIN_MACS


class LibraryMatmul:
    """Callable target standing for one float32 `mm` or `addmm` node, run on another
    library where `plan` finds a way (`run(bias, a, b, way)`), else as the ATen op."""

    memopt_kind = "extern"
    library = ""  # shown in reports: "aten.mm.default (oneDNN)"

    def __init__(self, op: torch._ops.OpOverload) -> None:
        if op not in GEMM_OPS:
            raise ValueError(f"{type(self).__name__} stands for mm or addmm, not {op}")
        self.op = op
        self.__name__ = op.__name__
        self.memopt_name = f"{op} ({self.library})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.op})"

    def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
        if kwargs:  # beta, alpha
            return self.op(*args, **kwargs)
        if self.op is aten.addmm.default:
            bias, a, b = args
        else:
            (a, b), bias = args, None
        way = self.plan(a, b, bias)
        if way is not None:
            return self.run(bias, a, b, way)
        return self.op(*args)

    def plan(self, a: object, b: object, bias: object) -> object | None:
        """How the library runs these operands, or None where it does not take them."""
        raise NotImplementedError

    def run(
        self, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, way: object
    ) -> torch.Tensor:
        raise NotImplementedError


class OneDnnMatmul(LibraryMatmul):
    """An mm/addmm node on oneDNN's inner product (module doc)."""

    library = "oneDNN"

    def plan(self, a: object, b: object, bias: object) -> object | None:
        return True if _takes(a, b, bias) else None

    def run(
        self, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, way: object
    ) -> torch.Tensor:
        return onednn_addmm(bias, a, b)


def _takes(a: object, b: object, bias: object) -> bool:
    if not (type(a) in PLAIN_TENSORS and type(b) in PLAIN_TENSORS):
        return False
    if a.dtype != torch.float32 or b.dtype != torch.float32 or not (a.is_cpu and b.is_cpu):
        return False
    if a.layout != torch.strided or b.layout != torch.strided or a.dim() != 2 or b.dim() != 2:
        return False
    if _too_small(*a.shape, b.shape[1]) or not torch.backends.mkldnn.enabled:
        return False
    if not (b.is_contiguous() or b.t().is_contiguous()):
        return False
    tensors = (a, b)
    if bias is not None:
        if not (
            type(bias) in PLAIN_TENSORS
            and bias.layout == torch.strided
            and bias.is_cpu
            and bias.dtype == torch.float32
            and bias.dim() == 1
            and bias.shape[0] == b.shape[1]
            and bias.is_contiguous()
        ):
            return False
        tensors = (a, b, bias)
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
