"""precision: weights read narrow (int8, int4, bfloat16, fp8) and training's saved activations
stored in bfloat16, each with the error it costs. Opt-in.

A decode step reads every weight once; storing a weight in fewer bytes is the largest cut
left after fusion. This pass changes results, so it never runs unless asked for: giving
its options (`pass_options={"precision": {"weights": "int8"}}`) puts it in the pipeline,
right after cleanup.

What it rewrites, in inference graphs whose weights' values are known at compile time
(capture.GraphValues: Dynamo hands the backend the model's parameters), on a backend whose
dequantizing matmul (`Backend.quantized_matmul`: the C++ GEMV on the CPU, the Triton tile
loop on GPUs) reads the format (`Backend.quantized_formats`):

- `mm(x, w.t())` and `mm(x, w)` (a linear layer; GPT-2's (in, out) Conv1D weight), w a
  float32 parameter and x float32, become `QuantizedMatmul(x, w)` (`weight` decisions);
  a bias added to the product alone (an (N,) input) is added by the kernel as it stores;
- `w[index]` and `index_select(w, 0, index)` (an embedding lookup as capture decomposes
  it; integer row numbers) become `QuantizedEmbedding(w, index)` (`embedding` decisions).

Each parameter is quantized once, here (backends/narrow.py has the formats; the C++ GEMV
and the Triton kernel widen weights in registers, never writing a float32 copy; the C++
path for more than a few rows of x dequantizes 4 MiB tiles for the BLAS).
A parameter read by several nodes (a tied embedding and output layer) has one narrow copy.

The error is measured, not assumed: the graph runs on its example inputs as compiled and
with every chosen weight narrowed, and once with each weight alone narrowed (its share;
when those runs would take over SHARE_RUNS_S, the weight's own relative error stands in,
and the record says so).
The error of a run is the largest `max |out - ref| / max |ref|` over the graph's floating
outputs (relative to each output's scale, so logits and hidden states compare alike; a
value no longer finite is an infinite error); for an output a narrowed matmul returns, as
it is or through views (an output layer: a language model's logits), the mean KL
divergence of the softmax over its last dim is reported too. With a `max_error` budget,
weights are given back to float32, the largest share (or own error) first, until
the error is within it (`over_budget`, each with its share).

Training's saved activations (`saved_activations="bf16"`) are narrowed at the saved stage,
right after the partition, on the forward and backward graphs together:
saved_precision.py.

Refused, visibly: weights in graphs that train (`training`: a narrow copy would not get
the parameter's gradient), graphs whose inputs' values are not known at compile time
(`no_values`, one record a graph: weights can be neither told apart nor quantized), a
backend whose matmul does not read the format (fp8 on the CPU), weights that are not
float32, or rows int4 cannot pack (odd lengths; `unsupported`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx._lazy_graph_module import _LazyGraphModule

from memopt.backends.registry import Backend
from memopt.backends.runtime.quantized import (
    QuantizedEmbedding,
    QuantizedMatmul,
    QuantizedParameter,
)
from memopt.compiler.capture import GRAPH_VALUES_KEY, GraphValues
from memopt.compiler.cost import is_view
from memopt.compiler.graph import copy_graph, evaluate, graph_device, tensor_meta
from memopt.passes.base import PartitionedPair, Pass, PassContext, Stage
from memopt.passes.output_error import SHARE_RUNS_S, Error, compare
from memopt.passes.registry import register_pass
from memopt.passes.saved_precision import narrow_saved

aten = torch.ops.aten
_TRANSPOSES = (aten.permute.default, aten.t.default)


@dataclass
class _Use:
    """One node reading a candidate parameter: an mm or an embedding lookup."""

    node: torch.fx.Node
    embedding: bool
    transposed: bool  # the parameter is (K, N) as mm takes it (no transpose in between)
    original: tuple[object, tuple, dict]  # target, args, kwargs before the rewrite
    index: torch.fx.Node | None = None  # an embedding lookup's row numbers


@dataclass
class _Candidate:
    placeholder: torch.fx.Node
    label: str
    uses: list[_Use] = field(default_factory=list)
    quantized: QuantizedParameter | None = None
    share: float | None = None  # the output error with this weight alone narrowed
    weight_error: float = 0.0  # ||W - dequantize(W)|| / ||W|| (Frobenius)
    saved_nbytes: int = 0  # a run's bytes: its readers' modelled cost before less after

    @property
    def order(self) -> float:
        """What the budget gives back first: the measured share, else the weight's error."""
        return self.share if self.share is not None else self.weight_error

    def describe_share(self) -> str:
        weight = f"the weight's own error {self.weight_error:.2e} (RMS, relative)"
        if self.share is None:
            return f"{weight}; its share of the output error not measured (see the record)"
        return f"error with it alone {self.share:.2e} of the output's scale; {weight}"

    @property
    def fp32_nbytes(self) -> int:
        return int(tensor_meta(self.placeholder).nbytes)


@register_pass(
    "precision",
    stages=(Stage.SAVED, Stage.ATEN),
    codes=(
        "weight",
        "embedding",
        "saved_activation",
        "over_budget",
        "training",
        "no_values",
        "unsupported",
    ),
)
@dataclass(frozen=True)
class Precision(Pass):
    """Weights stored and read narrow, and saved activations stored narrow (module doc).
    Off unless its options are given."""

    # The storage of every weight the pass narrows; "none" leaves weights as they are.
    weights: Literal["none", "int8", "int4", "bf16", "fp8_e4m3"] = "none"
    # int4: elements per scale along a row (an even divisor of the row's length).
    group_size: int = field(default=128, metadata={"min": 2})
    # How the CPU kernels multiply int8 and int4 weights: "float32" widens the weights and
    # reads x as it is; "int8" also quantizes x, a block at a time (a row at a time where
    # many rows of int8 weights are one integer GEMM), and multiplies in integers (VNNI
    # where the CPU has it): faster, and a second source of error.
    activations: Literal["float32", "int8"] = "float32"
    # How a training forward stores the tensors it saves for the backward: "bf16" halves
    # them and the backward widens them on use (saved_precision.py); "float32" as they are.
    saved_activations: Literal["float32", "bf16"] = "float32"
    # The largest output error allowed, relative to each output's scale (module doc), and in
    # training the gradients' error with saved activations narrowed; None: no budget for
    # weights (the error is still measured and reported), saved_precision.DEFAULT_BUDGET
    # for saved activations.
    max_error: float | None = field(default=None, metadata={"min": 0})

    # The pass changes values: the pipeline's check compares later passes against its result.
    changes_values: ClassVar[bool] = True

    def capture_options(self, stage: Stage) -> object:
        """A capture depends on the saved-activation options only (the weights are
        narrowed in the ATen graphs, after capture)."""
        if stage is Stage.SAVED:
            return (
                None
                if self.saved_activations == "float32"
                else (self.saved_activations, self.max_error)
            )
        return self

    def rewrite_saved(self, pair: PartitionedPair, ctx: PassContext) -> None:
        if self.saved_activations == "bf16":
            narrow_saved(pair, ctx, self.max_error)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        if self.weights == "none":
            return
        values = gm.meta.get(GRAPH_VALUES_KEY)
        candidates = _candidates(gm, values)
        if not candidates:
            return
        if not ctx.graph_name.startswith("inference"):
            # A forward graph knows its parameters (each refused once, here); a backward
            # graph reads the same weights: nothing more to say.
            for c in candidates if values is not None else ():
                ctx.refuse(
                    "training",
                    f"{self.weights} {c.label}",
                    "the graph trains this weight: a narrow copy would not get its gradient",
                    c.fp32_nbytes,
                    (c.placeholder.name,),
                )
            return
        if values is None:  # which inputs are weights is not known either: one record
            ctx.refuse(
                "no_values",
                f"{self.weights} weights of the {ctx.graph_name} graph",
                "its inputs' values are not known at compile time (no real example inputs): "
                "weights can be neither told apart nor quantized",
                0,
            )
            return
        backend = ctx.kernel_backend(graph_device(gm))
        if self.weights not in backend.quantized_formats:
            reason = f"backend {backend.name!r} has no matmul reading {self.weights} weights" + (
                " (fp8: the Triton kernel, for GPUs)" if self.weights == "fp8_e4m3" else ""
            )
            for c in candidates:
                ctx.refuse("unsupported", f"{self.weights} {c.label}", reason, c.fp32_nbytes)
            return
        chosen = self._quantize(gm, candidates, values, ctx)
        if not chosen:
            return
        reference = copy_graph(gm)
        for c in chosen:
            before = sum(ctx.nbytes(u.node) for u in c.uses)
            _rewrite(c, backend)
            c.saved_nbytes = before - sum(ctx.nbytes(u.node) for u in c.uses)
        gm.recompile()
        try:
            measure = _Measure(reference, gm, values, chosen)
            total = measure.error(chosen)
        except Exception as error:  # noqa: BLE001 - no error measured: no weight narrowed
            first = (str(error).strip().splitlines() or [""])[0]
            for c in chosen:
                _restore(c)
                ctx.refuse(
                    "no_values",
                    f"{self.weights} {c.label}",
                    "the graph did not run on its example inputs, so its error cannot be "
                    f"measured ({type(error).__name__}: {first})",
                    c.saved_nbytes,
                    (c.placeholder.name,),
                )
            gm.recompile()
            return
        shares = len(chosen) * measure.run_s <= SHARE_RUNS_S
        if shares:
            for c in chosen:
                c.share = measure.error([c]).relative
        kept = list(chosen)
        refused: list[tuple[_Candidate, Error]] = []
        if self.max_error is not None:
            for c in sorted(chosen, key=lambda c: c.order, reverse=True):
                if total.relative <= self.max_error:
                    break
                kept.remove(c)
                refused.append((c, total))
                total = measure.error(kept)
        fuel = ctx.record.fuel
        if fuel.limit is not None and len(kept) > fuel.limit - fuel.used:
            # The decisions past the fuel are refused below: the error stated is that of
            # the weights that will be narrowed.
            total = measure.error(kept[: max(fuel.limit - fuel.used, 0)])
        for c, before in refused:
            _restore(c)
            ctx.refuse(
                "over_budget",
                f"{self.weights} {c.label}",
                f"with it the error is {before.relative:.2e} of the output's scale, over "
                f"max_error {self.max_error:g}; {c.describe_share()}",
                c.saved_nbytes,
                (c.placeholder.name,),
                figures=_figures(c, before),
            )
        for c in kept:
            narrow = c.quantized.weight.nbytes
            code = "embedding" if all(u.embedding for u in c.uses) else "weight"
            adds = _bias_adds(c)
            # the add's traffic goes; the kernel reads the bias instead
            folded = sum(
                ctx.nbytes(add) - evaluate(tensor_meta(bias).nbytes, ctx.bindings)
                for _, add, bias in adds
            )
            applied = ctx.decide(
                code,
                f"{self.weights} {c.label} {list(tensor_meta(c.placeholder).shape)}",
                f"{c.fp32_nbytes:,} B -> {narrow:,} B stored"
                + (f", bias added in the kernel ({len(adds)})" if adds else "")
                + f"; {c.describe_share()}; with every narrowed weight {total}"
                + (
                    ""
                    if shares
                    else f" (shares not measured: {len(chosen)} runs of "
                    f"{measure.run_s * 1e3:.0f} ms, over {SHARE_RUNS_S:g} s)"
                ),
                c.saved_nbytes + folded,
                (c.placeholder.name, *(u.node.name for u in c.uses)),
                figures=_figures(c, total),
            )
            if not applied:
                _restore(c)
                continue
            for node, add, bias in adds:
                node.args = (*node.args, bias)
                add.replace_all_uses_with(node)
                gm.graph.erase_node(add)
        for c in kept:
            for u in c.uses:
                if isinstance(u.node.target, (QuantizedMatmul, QuantizedEmbedding)):
                    u.node.target.exact = False
        gm.graph.eliminate_dead_code()
        gm.recompile()  # restored nodes: the module's code is the graph's again

    def _quantize(
        self,
        gm: torch.fx.GraphModule,
        candidates: list[_Candidate],
        values: GraphValues,
        ctx: PassContext,
    ) -> list[_Candidate]:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        real = dict(zip(placeholders, values.inputs))
        chosen = []
        for c in candidates:
            reason = _unsupported(c, self.weights, self.group_size)
            if reason is not None:
                ctx.refuse("unsupported", f"{self.weights} {c.label}", reason, c.fp32_nbytes)
                continue
            transposed = any(u.transposed for u in c.uses)
            with unset_fake_temporarily(), torch.no_grad():
                c.quantized = QuantizedParameter(
                    real[c.placeholder],
                    self.weights,
                    self.group_size,
                    transposed,
                    c.label,
                    int8_activations=self.activations == "int8",
                )
                matrix = c.quantized.weight.dequantize()
                exact = real[c.placeholder]
                exact = exact.t() if transposed else exact
                c.weight_error = ((matrix - exact).norm() / exact.norm().clamp(min=1e-30)).item()
            chosen.append(c)
        return chosen


def _candidates(gm: torch.fx.GraphModule, values: GraphValues | None) -> list[_Candidate]:
    """Parameters read by an mm or an embedding lookup, with those reads, in graph order."""
    found: dict[torch.fx.Node, _Candidate] = {}
    parameters = values.parameters if values is not None else {}

    def candidate(node: object) -> _Candidate | None:
        if not isinstance(node, torch.fx.Node) or node.op != "placeholder":
            return None
        if values is not None and node.name not in parameters:
            return None  # an activation or a cache, not a weight
        meta = tensor_meta(node)
        if meta is None or len(meta.shape) != 2:
            return None
        if node not in found:
            found[node] = _Candidate(node, parameters.get(node.name, node.name))
        return found[node]

    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        original = (node.target, node.args, dict(node.kwargs))
        if node.target is aten.mm.default:
            b = node.args[1]
            transposed = isinstance(b, torch.fx.Node) and b.op == "placeholder"
            if not transposed and not (
                isinstance(b, torch.fx.Node)
                and b.target in _TRANSPOSES
                and (b.target is aten.t.default or list(b.args[1]) == [1, 0])
            ):
                continue
            c = candidate(b if transposed else b.args[0])
            if c is not None:
                c.uses.append(_Use(node, False, transposed, original))
        elif node.target in (aten.index.Tensor, aten.index_select.default):
            index = _lookup_index(node)
            c = candidate(node.args[0]) if index is not None else None
            if c is not None:
                c.uses.append(_Use(node, True, False, original, index))
    return list(found.values())


def _lookup_index(node: torch.fx.Node) -> torch.fx.Node | None:
    """The row numbers of `w[index]` or `index_select(w, 0, index)` (an embedding lookup as
    capture decomposes it); None for anything else (a boolean mask, another dim)."""
    if node.target is aten.index.Tensor:
        indices = node.args[1]
        index = indices[0] if len(indices) == 1 else None
    else:
        index = node.args[2] if node.args[1] == 0 else None
    if not isinstance(index, torch.fx.Node) or tensor_meta(index) is None:
        return None
    return index if tensor_meta(index).dtype in (torch.int64, torch.int32) else None


def _unsupported(c: _Candidate, kind: str, group: int) -> str | None:
    meta = tensor_meta(c.placeholder)
    if meta.dtype != torch.float32:
        return f"the weight is {meta.dtype}; the dequantizing kernels widen to float32"
    for u in c.uses:
        x = u.node.args[0] if not u.embedding else None
        if x is not None and tensor_meta(x).dtype != torch.float32:
            return f"%{u.node.name} multiplies {tensor_meta(x).dtype} activations"
    orientations = {u.transposed for u in c.uses}
    if len(orientations) > 1 or (any(u.embedding for u in c.uses) and True in orientations):
        return "read both as (N, K) and as (K, N): one narrow copy serves one orientation"
    rows, cols = (int(s) for s in meta.shape)
    k = rows if True in orientations else cols
    if kind == "int4" and (group % 2 or k % 2):
        return f"int4 packs pairs: rows of {k} elements, groups of {group}"
    return None


def _rewrite(c: _Candidate, backend: Backend) -> None:
    for u in c.uses:
        if u.embedding:  # `w[index]` wraps a negative index; index_select raises
            wraps = u.node.target is aten.index.Tensor
            u.node.target = QuantizedEmbedding(c.quantized, backend, wraps)
            u.node.args = (c.placeholder, u.index)
        else:
            u.node.target = QuantizedMatmul(c.quantized, backend)
            u.node.args = (u.node.args[0], c.placeholder)


def _restore(c: _Candidate) -> None:
    for u in c.uses:
        u.node.target, u.node.args, u.node.kwargs = u.original[0], u.original[1], u.original[2]


def _figures(c: _Candidate, total: Error) -> dict[str, float]:
    """The decision's figures for reports (Decision.figures): the weight's bytes stored
    before and after, its own error, its share, and the output error with every narrowed
    weight."""
    figures = {
        "bytes_before": c.fp32_nbytes,
        "bytes_after": c.quantized.weight.nbytes,
        "weight_error": c.weight_error,
        "total_error": total.relative,
    }
    if c.share is not None:
        figures["share"] = c.share
    if total.kl is not None:
        figures["kl"] = total.kl
    return figures


def _bias_adds(c: _Candidate) -> list[tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]]:
    """(matmul, add, bias) for each matmul of `c` whose one user adds a float32 (N,) input to
    it: the kernel adds it as it stores (no (M, N) result written and read back)."""
    found = []
    for u in c.uses:
        if u.embedding or len(u.node.users) != 1:
            continue
        (add,) = u.node.users
        if add.target is not aten.add.Tensor or add.kwargs or len(add.args) != 2:
            continue
        bias = add.args[1] if add.args[0] is u.node else add.args[0]
        if not isinstance(bias, torch.fx.Node) or bias.op != "placeholder":
            continue  # a number, or a tensor computed in the graph
        meta, out = tensor_meta(bias), tensor_meta(u.node)
        if (
            meta is not None
            and meta.dtype == torch.float32
            and list(meta.shape) == [out.shape[1]]
            and meta.stride[0] == 1
            and tensor_meta(add).shape == out.shape
        ):
            found.append((u.node, add, bias))
    return found


def _view_of(value: torch.fx.Node, node: torch.fx.Node) -> bool:
    """Whether `value` is `node` or a chain of views of it."""
    while value is not node:
        if not is_view(value) or not value.args or not isinstance(value.args[0], torch.fx.Node):
            return False
        value = value.args[0]
    return True


class _Measure:
    """Runs of the graph on its example inputs: as compiled (the reference), and with a
    chosen set of weights narrowed (the others computed exactly)."""

    def __init__(
        self,
        reference: torch.fx.GraphModule,
        gm: torch.fx.GraphModule,
        values: GraphValues,
        chosen: list[_Candidate],
    ) -> None:
        self.gm, self.values, self.chosen = gm, values, chosen
        # Logits: the outputs a narrowed matmul returns, as they are or through views (an
        # output layer); their last dim is taken as a distribution (next-token KL).
        returned = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
        returned = list(returned) if isinstance(returned, (list, tuple)) else [returned]
        self.logits = {
            position
            for c in chosen
            for u in c.uses
            if not u.embedding
            for position, value in enumerate(returned)
            if isinstance(value, torch.fx.Node) and _view_of(value, u.node)
        }
        # The graph modules' code generated now, not in the first (timed) runs.
        _LazyGraphModule.force_recompile(reference)
        _LazyGraphModule.force_recompile(gm)
        start = time.perf_counter()
        self.expected = self._run(reference)
        # The time of one run: the fastest so far (a first run pays one-time costs: the
        # library's first calls, fresh memory).
        self.run_s = time.perf_counter() - start

    def error(self, narrowed: Sequence[_Candidate]) -> Error:
        for c in self.chosen:
            for u in c.uses:
                u.node.target.exact = c not in narrowed
        start = time.perf_counter()
        actual = self._run(self.gm)
        self.run_s = min(self.run_s, time.perf_counter() - start)
        with unset_fake_temporarily():
            return compare(self.expected, actual, self.logits)

    def _run(self, gm: torch.fx.GraphModule) -> list[object]:
        parameters = set(self.values.parameters)
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        cuda = sorted(
            {
                v.device.index or 0
                for v in self.values.inputs
                if isinstance(v, torch.Tensor) and v.is_cuda
            }
        )
        with unset_fake_temporarily(), torch.no_grad(), torch.random.fork_rng(devices=cuda):
            # Everything but the parameters is copied: the graph may update its inputs (a
            # cache).
            inputs = [
                v if name in parameters or not isinstance(v, torch.Tensor) else v.clone()
                for name, v in zip(names, self.values.inputs)
            ]
            torch.manual_seed(0)
            out = gm(*inputs)
        return list(out) if isinstance(out, (list, tuple)) else [out]
