"""Written-out attention -> `F.scaled_dot_product_attention`, on Dynamo's graph, before AOTAutograd.

    s = q @ k.transpose(-2, -1) [* c | / c]      (a Python number)
    s = s.masked_fill(cond, -inf) | s + mask     (optional)
    p = softmax(s, dim=-1[, dtype=float32])   (then, optionally, casts to q's dtype and
    y = p @ v                                   dropout that is off: HF "eager" attention)

becomes `y = F.scaled_dot_product_attention(q, k, v, attn_mask=~cond | mask, scale=c)`.
AOTAutograd then traces the fused op (capture keeps it whole): the forward reads q, k, v
and the mask and writes the output and a logsumexp per query row; its backward recomputes
the scores blockwise from them. The score matrix is never written, in either graph.

Why here and not in an ATen pass: in training the forward saves the probabilities for the
backward and the backward's matmuls and softmax-backward read them. A per-graph pass can
remove neither without the other; rewritten before AOTAutograd differentiates, the
backward is the fused op's own.

Refused (recorded with the reason and the score-matrix bytes at stake): dropout between
softmax and the second matmul (its random mask would not be reproduced); an intermediate
read elsewhere (returned, or read by another op: it must exist); operands that are not
4-D (batch, heads, seq, dim) of one float dtype; a softmax over another dim, or in a
precision other than q's or fp32, or probabilities that reach the matmul in another dtype;
a scale that is not a number; a masked_fill value other than -inf; an additive mask of
another dtype.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_MATMULS = {operator.matmul, torch.matmul}
_SOFTMAXES = {F.softmax, torch.softmax, torch.Tensor.softmax}
_DROPOUTS = {F.dropout, torch.dropout, torch.nn.functional.dropout}


@dataclass(frozen=True)
class AttentionMatch:
    """One written-out attention found in a Dynamo graph: rewritten, or why not."""

    nodes: tuple[str, ...]  # Dynamo graph names, first matmul to second
    rewritable: bool
    reason: str  # why not, when it is not rewritable
    score_shape: tuple[int, ...]  # (batch, heads, seq_q, seq_k)
    score_nbytes: int  # one score matrix, at the example sizes
    masked: bool = False

    def describe(self) -> str:
        shape = "x".join(str(s) for s in self.score_shape)
        return f"score matrix [{shape}] ({self.score_nbytes} B)"


def _is(node: object, functions: set, method: str) -> bool:
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target == method


def _value(node: object) -> object:
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None


def _is_bool(node: object) -> bool:
    value = _value(node)
    return isinstance(value, torch.Tensor) and value.dtype == torch.bool


def _arg(node: torch.fx.Node, index: int, name: str, default: object = None) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


_CAST_METHODS = {"to", "type", "float", "half", "bfloat16"}


def _between_softmax_and_matmul(p: object) -> list[torch.fx.Node]:
    """Dropouts and casts between the softmax and the second matmul, nearest first."""
    found: list[torch.fx.Node] = []
    while isinstance(p, torch.fx.Node) and p.args:
        is_cast = p.op == "call_method" and p.target in _CAST_METHODS
        if is_cast and any(
            not isinstance(a, torch.dtype) for a in (*p.args[1:], *p.kwargs.values())
        ):
            is_cast = False  # .to(device), .to(other_tensor), .type(str): not a plain cast
        if not (is_cast or _is(p, _DROPOUTS, "dropout")):
            break
        found.append(p)
        p = p.args[0]
    return found


def _transposed_source(node: object, ndim: int) -> torch.fx.Node | None:
    """k when `node` is k with its last two dims swapped (transpose, permute, mT)."""
    if not isinstance(node, torch.fx.Node) or not node.args:
        return None
    source = node.args[0]
    if _is(node, {torch.transpose}, "transpose"):
        dims = sorted(d % ndim for d in node.args[1:3])
        return source if dims == [ndim - 2, ndim - 1] else None
    if _is(node, {torch.permute}, "permute"):
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        swapped = [*range(ndim - 2), ndim - 1, ndim - 2]
        return source if [d % ndim for d in dims] == swapped else None
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return source
    return None


def _scale_of(node: torch.fx.Node) -> tuple[torch.fx.Node, float] | None:
    """(scores, c) for `scores * c`, `c * scores` or `scores / c` with c a number."""
    a, b = (node.args + (None, None))[:2]
    if _is(node, {operator.mul, torch.mul}, "mul"):
        if isinstance(b, (int, float)) and isinstance(a, torch.fx.Node):
            return a, float(b)
        if isinstance(a, (int, float)) and isinstance(b, torch.fx.Node):
            return b, float(a)
    if _is(node, {operator.truediv, torch.div}, "div") and not node.kwargs:
        if isinstance(b, (int, float)) and isinstance(a, torch.fx.Node) and b != 0:
            return a, 1.0 / float(b)
    return None


class _Refused(Exception):
    pass


def _match(y: torch.fx.Node) -> dict[str, object] | None:
    """The parts of a written-out attention ending at `y` (a matmul), or None.

    Raises _Refused (with the reason) for a chain that is attention but cannot be rewritten.
    """
    if not _is(y, _MATMULS, "matmul") or len(y.args) != 2:
        return None
    p, v = y.args
    chain = [y]
    between = _between_softmax_and_matmul(p)
    p = between[-1].args[0] if between else p
    if not _is(p, _SOFTMAXES, "softmax"):
        return None
    chain.extend(between)
    chain.append(p)
    s = p.args[0]
    mask = cond = None
    if _is(s, {torch.masked_fill}, "masked_fill"):
        chain.append(s)
        cond, fill = _arg(s, 1, "mask"), _arg(s, 2, "value")
        s = s.args[0]
        mask_kind = ("fill", fill)
    elif _is(s, {operator.add, torch.add}, "add") and len(s.args) == 2 and not s.kwargs:
        chain.append(s)
        a, b = s.args
        s, mask = (a, b) if _is(a, _MATMULS, "matmul") or _scale_of(a) else (b, a)
        mask_kind = ("add", None)
    else:
        mask_kind = None
    scaled = _scale_of(s) if isinstance(s, torch.fx.Node) else None
    scale = 1.0
    if scaled is not None:
        chain.append(s)
        s, scale = scaled
    if not _is(s, _MATMULS, "matmul") or len(s.args) != 2:
        return None
    chain.append(s)
    q, kt = s.args
    q_value = _value(q)
    ndim = q_value.dim() if isinstance(q_value, torch.Tensor) else 0
    k = _transposed_source(kt, ndim) if ndim >= 2 else None
    if k is None:
        return None  # not q @ k^T: some other matmul -> softmax -> matmul
    parts = {"q": q, "k": k, "v": v, "chain": chain[::-1], "scale": scale, "kt": kt}
    scores = _value(s)
    parts["scores"] = scores
    for node in between:
        if _is(node, _DROPOUTS, "dropout"):
            p_drop, training = _arg(node, 1, "p", 0.5), _arg(node, 2, "training", True)
            if training is not False and p_drop != 0:
                raise _Refused("dropout between softmax and the second matmul (its random mask)")
    for node in parts["chain"][:-1]:
        if len(node.users) != 1:
            raise _Refused(f"%{node.name} is read elsewhere: it must be materialized")
    values = [_value(x) for x in (q, k, v)]
    if not all(isinstance(t, torch.Tensor) for t in values):
        raise _Refused("operand shapes unknown")
    if any(t.dim() != 4 for t in values):
        raise _Refused("operands are not 4-D (batch, heads, seq, head dim)")
    if len({t.dtype for t in values}) != 1 or values[0].dtype not in FLOAT_DTYPES:
        raise _Refused(f"operand dtypes {[str(t.dtype) for t in values]}: one float dtype")
    if len({t.device for t in values}) != 1:
        raise _Refused("operands on several devices")
    qv, kv, vv = values
    if qv.shape[:2] != kv.shape[:2] or kv.shape[:3] != vv.shape[:3] or qv.shape[3] != kv.shape[3]:
        raise _Refused("q, k, v shapes do not line up without broadcasting")
    dim = _arg(p, 1, "dim")
    if dim not in (-1, 3):
        raise _Refused(f"softmax over dim {dim}, not the keys' (-1)")
    # softmax in fp32 and cast back (Hugging Face's eager attention): the fused op
    # computes its softmax in fp32 too. Any other precision differs from what it computes.
    positional = [a for a in p.args[2:] if isinstance(a, torch.dtype)]
    softmax_dtype = p.kwargs.get("dtype") or (positional[0] if positional else None)
    probabilities = _value(y.args[0])
    if softmax_dtype not in (None, torch.float32, qv.dtype) or not (
        isinstance(probabilities, torch.Tensor) and probabilities.dtype == qv.dtype
    ):
        raise _Refused("softmax or its probabilities in another precision than q, k, v")
    if mask_kind is not None and mask_kind[0] == "fill":
        if not (isinstance(mask_kind[1], float) and mask_kind[1] == -math.inf):
            raise _Refused(f"masked_fill with {mask_kind[1]!r}, not -inf")
        cond_value = _value(cond)
        if not isinstance(cond_value, torch.Tensor) or cond_value.dtype != torch.bool:
            raise _Refused("masked_fill condition is not a bool tensor")
        parts["cond"] = cond
    if mask is not None:
        mask_value = _value(mask)
        if not isinstance(mask_value, torch.Tensor) or mask_value.dtype != qv.dtype:
            raise _Refused("additive mask is not a tensor of the operands' dtype")
        if mask_value.requires_grad:
            raise _Refused("additive mask requires grad")
        parts["mask"] = mask
    return parts


def _rewrite(gm: torch.fx.GraphModule, parts: dict[str, object]) -> None:
    graph = gm.graph
    y = parts["chain"][-1]
    with graph.inserting_before(y):
        mask = parts.get("mask")
        cond = parts.get("cond")
        if _is(cond, {torch.logical_not, operator.invert}, "logical_not") and _is_bool(
            cond.args[0]
        ):
            mask = cond.args[0]  # masked_fill(~keep, -inf): SDPA keeps where `keep`
        elif cond is not None:
            mask = graph.call_function(torch.logical_not, (cond,))
            mask.meta["example_value"] = torch.logical_not(_value(cond))
        out = graph.call_function(
            F.scaled_dot_product_attention,
            (parts["q"], parts["k"], parts["v"]),
            {"attn_mask": mask, "dropout_p": 0.0, "is_causal": False, "scale": parts["scale"]},
        )
    out.meta.update(y.meta)
    y.replace_all_uses_with(out)
    for node in reversed(parts["chain"]):
        graph.erase_node(node)
    for node in (parts["kt"], cond):
        if isinstance(node, torch.fx.Node) and not node.users:
            graph.erase_node(node)


def rewrite_attention(
    gm: torch.fx.GraphModule, decide: Callable[[AttentionMatch], bool]
) -> list[AttentionMatch]:
    """Find every written-out attention in a Dynamo graph, in order, and rewrite those that
    can be rewritten and that `decide(match)` accepts (it is told every match)."""
    found: list[AttentionMatch] = []
    rewritten = False
    for node in list(gm.graph.nodes):
        if node.graph is not gm.graph or node.op not in ("call_function", "call_method"):
            continue
        try:
            parts = _match(node)
        except _Refused as refusal:
            found.append(_record(node, None, str(refusal)))
            decide(found[-1])
            continue
        if parts is None:
            continue
        found.append(_record(node, parts, ""))
        if decide(found[-1]):
            _rewrite(gm, parts)
            rewritten = True
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return found


def _record(y: torch.fx.Node, parts: dict[str, object] | None, reason: str) -> AttentionMatch:
    if parts is None:
        between = _between_softmax_and_matmul(y.args[0])
        p = between[-1].args[0] if between else y.args[0]
        scores = _value(p)
        names: tuple[str, ...] = (y.name,)
    else:
        scores = parts["scores"]
        names = tuple(n.name for n in parts["chain"])
    shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else ()
    nbytes = scores.numel() * scores.element_size() if isinstance(scores, torch.Tensor) else 0
    return AttentionMatch(
        nodes=names,
        rewritable=parts is not None,
        reason=reason,
        score_shape=tuple(int(s) for s in shape),
        score_nbytes=int(nbytes),
        masked=parts is not None and ("cond" in parts or "mask" in parts),
    )
