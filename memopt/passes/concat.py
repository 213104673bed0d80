"""concat: a library call's result written straight into its slice of a concatenation.

`torch.cat([x @ w, y.relu()])` runs the matmul into a buffer of its own, then a kernel
reads that buffer and writes it again into the concatenation. A library call with an
out= overload can write its slice of the concatenation itself: the matmul (or an mm under
a bias add, as addmm) at the start or the end of the concatenation becomes `IntoSlice` (backends/runtime/extern.py: the whole
buffer allocated, the matmul's out= overload run into its slice), and the other parts are
written into the rest by a `slice_scatter`, which the inplace pass turns into a write
into the view (by the kernel that computes them, where it can). The matmul's result is
then written once and never read back: the concatenation's read and write of it go.

Runs before fusion, which would otherwise fuse the concatenation into a kernel that reads
the matmul's result.

Refuses (recorded with the bytes at stake) when:
- the slice's strides are not the ones the call writes (a concatenation along an inner
  dimension of a matrix: each row of the slice is apart from the next);
- the call sits between other parts (its slice would split the rest in two);
- the concatenation's sizes are symbolic (the buffer is allocated at a static shape).
A call whose result is read elsewhere too, or that has no out= overload, is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch
import torch.fx

from memopt.backends.runtime.extern import IntoSlice
from memopt.compiler.aten_ops import MATMULS
from memopt.compiler.graph import META_KEY, TensorMeta, evaluate, meta_of_value, tensor_meta
from memopt.passes.base import Pass, PassContext
from memopt.passes.fusion import bias_add
from memopt.passes.registry import register_pass

aten = torch.ops.aten
Node = torch.fx.Node

# Library calls that can write into a slice: op -> its out= overload.
_OUT_OVERLOADS = {op: op.overloadpacket.out for op in MATMULS}


@register_pass(
    "concat",
    codes=(
        "library_into_slice",  # a library call writes its slice of a concatenation
        "refused_layout",  # the slice's strides are not the call's
        "refused_position",  # the call sits between other parts
        "refused_dynamic",  # the concatenation's sizes are symbolic
    ),
)
@dataclass(frozen=True)
class Concat(Pass):
    """Library calls write their slices of concatenations (module docstring)."""

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        for node in list(gm.graph.nodes):
            if node.target is aten.cat.default:
                self._concatenation(gm, ctx, node)

    def _concatenation(self, gm: torch.fx.GraphModule, ctx: PassContext, cat: Node) -> None:
        parts = list(cat.args[0])
        meta = tensor_meta(cat)
        if meta is None or len(parts) < 2:
            return
        dim = (cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)) % len(meta.shape)
        calls = [
            (k, p)
            for k, p in enumerate(parts)
            if isinstance(p, Node)
            and _library_call(p) is not None
            and list(p.users) == [cat]
            and parts.count(p) == 1
        ]
        if not calls:
            return
        k, call = calls[0] if calls[0][0] == 0 else calls[-1]
        op, args, kwargs, consumed = _library_call(call)
        part = tensor_meta(call)
        stake = 2 * evaluate(part.nbytes, ctx.bindings)  # the cat's read and write of it
        what = f"%{call.name} into its slice of %{cat.name}"
        names = (call.name, cat.name)
        if not all(isinstance(n, (int, sympy.Integer)) for n in (*meta.shape, *part.shape)):
            reason = "the concatenation's sizes are symbolic: its buffer has no static shape"
            ctx.refuse("refused_dynamic", f"not {what}", reason, stake, names)
            return
        if k not in (0, len(parts) - 1):
            reason = f"%{call.name} sits between other parts of the concatenation"
            ctx.refuse("refused_position", f"not {what}", reason, stake, names)
            return
        shape = tuple(int(n) for n in meta.shape)
        if not _writes_into(call, part, meta):
            reason = (
                f"its slice of %{cat.name} has strides {tuple(meta.stride)}, the call writes "
                f"{tuple(part.stride)}"
            )
            ctx.refuse("refused_layout", f"not {what}", reason, stake, names)
            return
        length = int(part.shape[dim])
        start = 0 if k == 0 else shape[dim] - length
        reason = (
            f"{op}'s out= overload writes its slice of the concatenation: its result "
            f"is not written, read and written again ({stake} B)"
        )
        if not ctx.decide("library_into_slice", what, reason, stake, names):
            return
        graph = gm.graph
        rest = parts[1:] if k == 0 else parts[:-1]
        target = IntoSlice(op, _OUT_OVERLOADS[op], shape, dim, start, length)
        with graph.inserting_before(cat):
            into = graph.call_function(target, args, kwargs)
            into.meta.update(cat.meta)
            source = rest[0]
            if len(rest) > 1:
                source = graph.call_function(aten.cat.default, (rest, dim))
                _annotate(source, aten.cat.default(_vals(rest), dim))
            span = (length, shape[dim]) if k == 0 else (0, start)
            written = graph.call_function(aten.slice_scatter.default, (into, source, dim, *span))
            written.meta.update(cat.meta)
        cat.replace_all_uses_with(written)
        graph.erase_node(cat)
        for node in consumed:  # the call, then what it is made of (an mm under a bias add)
            graph.erase_node(node)


def _library_call(part: Node) -> tuple[object, tuple, dict, list[Node]] | None:
    """(op, args, kwargs, the nodes it replaces) when a part of a concatenation is a library
    call with an out= overload: a matmul, or an mm under a bias add (capture splits addmm
    into the two; as addmm the GEMM adds the bias while writing its slice)."""
    if part.target in _OUT_OVERLOADS:
        return part.target, part.args, dict(part.kwargs), [part]
    match = bias_add(part) if part.target is aten.add.Tensor else None
    if match is None or list(match[0].users) != [part]:
        return None  # not a bias add, or the mm reaches it through a view
    mm, bias = match
    return aten.addmm.default, (bias, *mm.args[:2]), {}, [part, mm]


def _writes_into(call: Node, part: TensorMeta, whole: TensorMeta) -> bool:
    """Whether the call's out= overload writes its slice of `whole` (contiguous) in place:
    the slice has the call's own strides, or, for a 2-D GEMM, rows of unit stride set
    further apart (BLAS's leading dimension; ATen's CPU addmm writes such an out= matrix
    directly)."""
    if not (whole.is_contiguous() and part.is_contiguous()):
        return False
    if all(a == b for n, a, b in zip(part.shape, part.stride, whole.stride) if n != 1):
        return True
    return (
        _library_call(call)[0] in (aten.mm.default, aten.addmm.default)
        and whole.stride[-1] == 1
        and whole.stride[-2] >= part.shape[-1]
    )


def _vals(nodes: list[Node]) -> list[object]:
    return [n.meta["val"] for n in nodes]


def _annotate(node: Node, val: object) -> None:
    node.meta.update({"val": val, META_KEY: meta_of_value(val)})
