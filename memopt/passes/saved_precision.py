"""precision's `saved_activations="bf16"`: the tensors a training forward saves for its
backward, stored in bfloat16 and widened where the backward reads them.

Between a training step's forward and its backward every saved activation is alive: they,
not the weights, set the step's peak memory, and each is written by the forward and read
again by the backward. Right after the partition (Stage.SAVED), with both graphs in hand:

- the forward converts each chosen tensor to bfloat16 where it returns it for the backward
  (the cast fuses into the kernel that computes the tensor; a value the forward also reads
  itself stays float32 there);
- the backward takes the bfloat16 tensor in the same position and widens it to float32
  before any use (the cast fuses into the kernels that read it; a library matmul reads a
  widened copy, so its traffic grows while the memory held still halves).

Chosen: float32 tensors the forward computes. Left as they are, without a record: graph
inputs and views of them (parameters and the batch: saving them holds no memory of their
own) and tensors of other dtypes (masks, indices, sizes). Refused (`unsupported`): a tensor
the forward also returns to its caller, or whose buffer a returned tensor views (the caller
holds the float32 buffer anyway: narrowing would add memory, not save it); two saved tensors
of one buffer (a tensor and a view of it: two bf16 copies would hold as much as the buffer);
a fused attention's logsumexp, and a tensor the backward feeds
to exp, cos, sin and the like (ABSOLUTE_OPS): bfloat16 keeps 8 bits of a value's size, so
a logsumexp of 10 moves by 0.03 (every probability by 3%) and a rotary angle of 200 by 0.4
rad (the 4-layer Llama's saved rotary angles alone moved its gradients by 14% of their
scale); and a tensor the backward does not take by name.

The error is measured on the example inputs, as for weights: the forward runs once on the
model's parameters and the inputs Dynamo ran with, then the backward on what it saved and
on seeded normal values for the outputs' gradients, as partitioned and with the chosen
tensors rounded to bfloat16 as the rewrite stores them. The error is that of the backward's
outputs (the gradients), relative to each one's scale, or to a thousandth of the largest
gradient's where that is larger (GRADIENT_FLOOR). A tensor's share is the error with it
alone rounded (a backward run each, when they fit SHARE_RUNS_S). Tensors are given back to
float32, the largest share first, until the error is within `max_error`, or without one
within DEFAULT_BUDGET (2%: a cancellation in the backward, such as softmax's or a saturated
tanh's, can turn bfloat16's rounding into errors of 50-100%). The backward and forward
are paired by name (with dynamic sizes the forward returns its saved sizes last and the
backward takes them first). Without real inputs, or when the graphs do not run outside the
compiler, nothing is narrowed (`no_values`).
"""

from __future__ import annotations

import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from memopt.compiler.aten_ops import ATTENTION_FORWARD, is_view_op
from memopt.compiler.graph import copy_graph, evaluate, to_sympy
from memopt.passes import partition
from memopt.passes.base import PartitionedPair, PassContext
from memopt.passes.output_error import SHARE_RUNS_S, Error, compare

aten = torch.ops.aten
prims = torch.ops.prims
NARROW = torch.bfloat16
# Ops whose result moves with the absolute error of their input, not its relative one: a
# saved tensor the backward feeds to one (rotary angles to cos and sin, scores to exp)
# keeps float32.
ABSOLUTE_OPS = frozenset(
    {
        aten.exp.default,
        aten.exp2.default,
        aten.expm1.default,
        aten.cos.default,
        aten.sin.default,
        aten.tan.default,
        aten.pow.Scalar,
    }
)
_SUMS = frozenset({aten.add.Tensor, aten.sub.Tensor, aten.neg.default})
_SCALINGS = frozenset({aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar})
# Without `max_error`, the gradients' error allowed: bfloat16's rounding carried through a
# backward moves gradients by 0.2-1% of their scale; a tensor whose rounding moves them
# further (a cancellation: softmax's p (g - sum g p), tanh's 1 - y^2 where it saturates) is
# given back, the largest share first.
DEFAULT_BUDGET = 0.02
# A gradient's error is relative to its own scale, but not below this fraction of the
# largest gradient's: a gradient that is zero but for rounding (a key projection's bias,
# which a softmax ignores) has no scale of its own.
GRADIENT_FLOOR = 1e-3


@dataclass(eq=False)
class _Saved:
    """One tensor the forward returns for the backward, and the backward input it becomes."""

    position: int  # among the forward's outputs
    node: torch.fx.Node  # the forward's value
    placeholder: torch.fx.Node  # the backward's input
    nbytes: int  # float32 bytes at the example sizes
    share: float | None = None  # the gradients' error with this tensor alone rounded

    @property
    def label(self) -> str:
        shape = [str(s) for s in self.node.meta["val"].shape]
        return f"saved %{self.node.name} [{', '.join(shape)}]"


def narrow_saved(pair: PartitionedPair, ctx: PassContext, max_error: float | None) -> None:
    """Store the chosen saved activations of `pair` in bfloat16 (module doc); without
    `max_error`, within DEFAULT_BUDGET."""
    budget = DEFAULT_BUDGET if max_error is None else max_error
    chosen = _candidates(pair, ctx)
    if not chosen:
        return
    if pair.inputs is None:
        reason = (
            "the forward's real inputs are not known one for one (none were handed in, or "
            "AOTAutograd merged or dropped arguments)"
        )
        return _refuse_all(chosen, ctx, f"{reason}: the gradients' error cannot be measured")
    try:
        runs = _Runs(pair, chosen, ctx)
        total = runs.error(chosen)
    except Exception as error:  # noqa: BLE001 - no error measured: nothing narrowed
        first = (str(error).strip().splitlines() or [""])[0]
        reason = "the forward and backward did not run on the example inputs, so the "
        return _refuse_all(
            chosen,
            ctx,
            f"{reason}gradients' error cannot be measured ({type(error).__name__}: {first})",
        )
    shares = len(chosen) * runs.backward_s <= SHARE_RUNS_S
    if shares:
        for s in chosen:
            s.share = runs.error([s]).relative
    kept = list(chosen)
    for s in sorted(chosen, key=lambda s: s.share or 0.0, reverse=True):
        if total.relative <= budget:
            break
        before = total
        kept.remove(s)
        total = runs.error(kept)
        limit = f"max_error {budget:g}" if max_error is not None else f"the default {budget:g}"
        ctx.refuse(
            "over_budget",
            f"bf16 {s.label}",
            f"with it the gradients' error is {before.relative:.2e} of their scale, over "
            f"{limit}; {_describe_share(s)}",
            s.nbytes // 2,
            (s.node.name,),
            figures=_figures(s, before),
        )
    fuel = ctx.record.fuel
    within_fuel = kept
    if fuel.limit is not None and len(kept) > fuel.limit - fuel.used:
        # The decisions past the fuel are refused below: the figures stated are those of
        # the tensors that will be narrowed.
        within_fuel = kept[: max(fuel.limit - fuel.used, 0)]
        total = runs.error(within_fuel)
    traffic = _traffic(pair, within_fuel)
    moved = (
        ""
        if traffic is None
        else f"; forward + backward move {traffic[1]:,} B against {traffic[0]:,} B with them "
        "in float32 (modelled after the pipeline: a tensor the forward also writes in "
        "float32, or one a library matmul reads, costs a cast's bytes)"
    )
    narrowed = []
    for s in kept:
        if ctx.decide(
            "saved_activation",
            f"bf16 {s.label}",
            f"{s.nbytes:,} B -> {s.nbytes // 2:,} B held from the forward to the backward; "
            f"{_describe_share(s)}; with every narrowed tensor the gradients move by "
            f"{total.relative:.2e} of their scale (max |error| {total.absolute:.2e})"
            + ("" if shares else f" (shares not measured: {len(chosen)} backward runs)")
            + moved,
            s.nbytes // 2,
            (s.node.name,),
            figures=_figures(s, total, traffic),
        ):
            _rewrite(pair.forward, pair.backward, s)
            narrowed.append(s)
    if narrowed:
        pair.forward.recompile()
        pair.backward.recompile()
        _update_record(pair, narrowed)


def _refuse_all(chosen: list[_Saved], ctx: PassContext, reason: str) -> None:
    for s in chosen:
        ctx.refuse("no_values", f"bf16 {s.label}", reason, s.nbytes // 2, (s.node.name,))


def _candidates(pair: PartitionedPair, ctx: PassContext) -> list[_Saved]:
    output = next(n for n in pair.forward.graph.nodes if n.op == "output")
    returned = list(output.args[0])
    saved = [n for n in returned[pair.num_fwd_outputs :] if isinstance(n, torch.fx.Node)]
    # The buffers the caller gets (a returned tensor or a view of one) and, per buffer, the
    # saved values that view it.
    to_caller = {
        partition.fx_view_base(n)
        for n in returned[: pair.num_fwd_outputs]
        if isinstance(n, torch.fx.Node)
    }
    sharing: dict[torch.fx.Node, set[torch.fx.Node]] = {}
    for node in saved:
        sharing.setdefault(partition.fx_view_base(node), set()).add(node)
    backward_inputs = {n.name: n for n in pair.backward.graph.nodes if n.op == "placeholder"}
    found, seen = [], set()
    for position in range(pair.num_fwd_outputs, len(returned)):
        node = returned[position]
        if not isinstance(node, torch.fx.Node) or node in seen:
            continue
        seen.add(node)
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
            continue
        base = partition.fx_view_base(node)
        if base.op == "placeholder":
            continue  # an input or a view of one: it holds no memory of its own
        nbytes = partition.value_nbytes(value, ctx.bindings)
        placeholder = backward_inputs.get(node.name)
        others = sorted(n.name for n in sharing[base] if n is not node)
        reason = None
        if base in to_caller:
            reason = (
                "the forward also returns it (or a view of its buffer) to the caller, who "
                "holds the float32 buffer anyway: a bf16 copy would add memory"
            )
        elif others:
            reason = (
                f"it shares its buffer with {', '.join('%' + n for n in others)}, saved too: "
                "a bf16 copy of each would hold as much as the one float32 buffer"
            )
        elif _logsumexp(node):
            reason = (
                "an attention's logsumexp: the backward exponentiates it, so rounding it "
                "(by 2^-9 of its size) would move every probability by as much"
            )
        elif placeholder is not None and (op := _periodic_or_exponential_reader(placeholder)):
            reason = (
                f"the backward takes its {op}: rounding moves it by 2^-9 of its size, and "
                "what it feeds by that much absolutely (an angle of 200 by 0.4 rad)"
            )
        elif placeholder is None:
            reason = "the backward takes no input of its name"
        if reason is not None:
            ctx.refuse("unsupported", f"bf16 saved %{node.name}", reason, nbytes // 2)
            continue
        found.append(_Saved(position, node, placeholder, nbytes))
    return found


def _periodic_or_exponential_reader(placeholder: torch.fx.Node) -> str | None:
    """The name of an op in ABSOLUTE_OPS that reads `placeholder` in the backward, directly
    or through views, sums (a sum keeps the absolute error while the value may shrink: a
    softmax recomputed as exp(s - max s)) and scalings by a number; None if none does.
    A product of two tensors ends the walk (GELU's exp(-x^2 / 2) reads x^2, whose error
    matters only where x is small)."""
    pending, seen = [placeholder], set()
    while pending:
        node = pending.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.target in ABSOLUTE_OPS:
                return user.target.__name__.split(".")[0]
            if is_view_op(user) or user.target in _SUMS or _scaled(user):
                pending.append(user)
    return None


def _scaled(node: torch.fx.Node) -> bool:
    """A tensor multiplied or divided by a number (an angle by a frequency)."""
    return node.target in _SCALINGS and any(isinstance(a, (int, float)) for a in node.args)


def _logsumexp(node: torch.fx.Node) -> bool:
    """Whether `node` is the logsumexp a fused attention returns (its second output)."""
    if node.target is not operator.getitem or node.args[1] != 1:
        return False
    source = node.args[0]
    return isinstance(source, torch.fx.Node) and source.target in _ATTENTIONS


# Fused attentions whose second output is the logsumexp: those capture keeps whole, and
# cuDNN's (a GPU's SDPA may pick it).
_ATTENTIONS = ATTENTION_FORWARD | {
    op.default
    for op in (getattr(aten, "_scaled_dot_product_cudnn_attention", None),)
    if op is not None
}


class _Runs:
    """The forward run once on the example inputs; the backward run on what it saved, with
    a chosen set of saved tensors rounded to bfloat16 (the others as they are)."""

    def __init__(self, pair: PartitionedPair, chosen: list[_Saved], ctx: PassContext) -> None:
        self.pair, self.chosen = pair, chosen
        forward_inputs = list(pair.inputs)
        self.cuda = sorted(
            {
                v.device.index or 0
                for v in forward_inputs
                if isinstance(v, torch.Tensor) and v.is_cuda
            }
        )
        with unset_fake_temporarily(), torch.no_grad(), torch.random.fork_rng(self.cuda):
            # A training forward may update what it is given (batch norm's running
            # statistics): everything but the parameters is copied.
            inputs = [
                v.clone() if isinstance(v, torch.Tensor) and not v.requires_grad else v
                for v in forward_inputs
            ]
            torch.manual_seed(0)
            returned = pair.forward(*inputs)
            output = next(n for n in pair.forward.graph.nodes if n.op == "output")
            by_name = {
                n.name: v for n, v in zip(output.args[0], returned) if isinstance(n, torch.fx.Node)
            }
            generator = torch.Generator().manual_seed(0)
            self.backward_inputs = []
            for node in (n for n in pair.backward.graph.nodes if n.op == "placeholder"):
                if node.name in by_name:
                    self.backward_inputs.append(by_name[node.name])
                elif node.name.startswith("tangents"):
                    self.backward_inputs.append(_tangent(node, ctx, generator))
                else:
                    raise ValueError(f"the backward's input %{node.name} is not a saved value")
        placeholders = pair.backward.graph.find_nodes(op="placeholder")
        self.positions = {s: placeholders.index(s.placeholder) for s in chosen}
        start = time.perf_counter()
        self.expected = self._backward(())
        self.backward_s = time.perf_counter() - start

    def error(self, narrowed: Sequence[_Saved]) -> Error:
        start = time.perf_counter()
        actual = self._backward(narrowed)
        self.backward_s = min(self.backward_s, time.perf_counter() - start)
        with unset_fake_temporarily():
            return compare(self.expected, actual, set(), floor=GRADIENT_FLOOR)

    def _backward(self, narrowed: Sequence[_Saved]) -> list[object]:
        with unset_fake_temporarily(), torch.no_grad(), torch.random.fork_rng(self.cuda):
            inputs = list(self.backward_inputs)
            for s in narrowed:
                i = self.positions[s]
                inputs[i] = inputs[i].to(NARROW).to(inputs[i].dtype)
            torch.manual_seed(0)
            out = self.pair.backward(*inputs)
        return list(out) if isinstance(out, (list, tuple)) else [out]


def _tangent(node: torch.fx.Node, ctx: PassContext, generator: torch.Generator) -> object:
    """Seeded normal values of a gradient input's shape and dtype: not ones, whose
    gradient through a softmax (its rows sum to one) is exactly zero."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return evaluate(to_sympy(value), ctx.bindings)
    shape = [evaluate(to_sympy(s), ctx.bindings) for s in value.shape]
    with unset_fake_temporarily():
        sample = torch.randn(shape, generator=generator, dtype=torch.float64)
        return sample.to(dtype=value.dtype, device=value.device)


def _rewrite(forward: torch.fx.GraphModule, backward: torch.fx.GraphModule, s: _Saved) -> None:
    """Narrow `s` in `forward` and `backward` (the pair, or copies of it: nodes by name)."""
    output = next(n for n in forward.graph.nodes if n.op == "output")
    value = next(n for n in forward.graph.nodes if n.name == s.node.name)
    with forward.graph.inserting_before(output):
        cast = forward.graph.call_function(prims.convert_element_type.default, (value, NARROW))
    _set_value(cast, prims.convert_element_type.default(value.meta["val"], NARROW))
    returned = list(output.args[0])
    returned[s.position] = cast
    output.args = (tuple(returned), *output.args[1:])

    placeholders = backward.graph.find_nodes(op="placeholder")
    placeholder = next(n for n in placeholders if n.name == s.placeholder.name)
    wide = placeholder.meta["val"]
    _set_value(placeholder, prims.convert_element_type.default(wide, NARROW))
    with backward.graph.inserting_after(placeholders[-1]):
        widen = backward.graph.call_function(
            prims.convert_element_type.default, (placeholder, wide.dtype)
        )
    _set_value(widen, wide)
    placeholder.replace_all_uses_with(widen, delete_user_cb=lambda user: user is not widen)


def _traffic(pair: PartitionedPair, kept: list[_Saved]) -> tuple[int, int] | None:
    """Modelled bytes the forward and backward move after the pipeline, as partitioned (the
    partitioner's own figure where it costed its choice) and with `kept` narrowed (on
    copies); None without a cost model or where costing fails (the figure is left out)."""
    if pair.cost is None or not kept:
        return None
    try:
        record = pair.forward.meta.get(partition.META_KEY)
        chosen = record.choice if record is not None else None
        if chosen is not None and chosen.bytes_moved > 0:
            before = chosen.bytes_moved
        else:
            before = pair.cost(pair.forward, "forward") + pair.cost(pair.backward, "backward")
        forward, backward = copy_graph(pair.forward), copy_graph(pair.backward)
        for s in kept:
            _rewrite(forward, backward, s)
        forward.recompile()
        backward.recompile()
        return before, pair.cost(forward, "forward") + pair.cost(backward, "backward")
    except Exception:  # noqa: BLE001 - a figure for the record, not a decision
        return None


def _set_value(node: torch.fx.Node, value: torch.Tensor) -> None:
    node.meta["val"] = value
    if "tensor_meta" in node.meta:
        node.meta["tensor_meta"] = _extract_tensor_metadata(value)


def _update_record(pair: PartitionedPair, narrowed: list[_Saved]) -> None:
    """The partition's record (reports' saved-activation figures) with the narrowed
    tensors at their stored size, each its own buffer now."""
    record = pair.forward.meta.get(partition.META_KEY)
    if record is None:
        return
    names = {s.node.name for s in narrowed}
    chosen = record.choice
    saved = tuple(
        replace(
            t,
            nbytes=t.nbytes // 2,
            storage=t.name,
            storage_nbytes=t.nbytes // 2,
            reason=f"{t.reason}; stored as bf16 (precision)",
        )
        if t.name in names
        else t
        for t in chosen.saved
    )
    record.candidates[record.chosen] = replace(chosen, saved=saved)


def _describe_share(s: _Saved) -> str:
    if s.share is None:
        return "its share of the gradients' error not measured"
    return f"the gradients' error with it alone {s.share:.2e}"


def _figures(s: _Saved, total: Error, traffic: tuple[int, int] | None = None) -> dict[str, float]:
    figures = {
        "bytes_before": s.nbytes,
        "bytes_after": s.nbytes // 2,
        "total_error": total.relative,
    }
    if s.share is not None:
        figures["share"] = s.share
    if traffic is not None:
        figures["moved_before"], figures["moved_after"] = traffic
    return figures
