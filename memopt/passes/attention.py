"""attention: scaled dot-product attention as one kernel that never writes the score matrix.

Two steps, one decision record each:

1. Written-out attention (`q @ k^T -> scale -> mask -> softmax -> @ v`) is rewritten into
   `F.scaled_dot_product_attention` on Dynamo's graph, before AOTAutograd differentiates it
   (passes/attention_pattern.py: in training the backward reads the probabilities, so no
   per-graph rewrite could remove them). Capture keeps the fused op whole; its backward
   recomputes the scores blockwise. This pass writes those rewrites (and the refusals, with
   their reasons) into the ledger, with the bytes of score-matrix traffic they save: the
   written-out form writes and reads the scores and the probabilities (4x the score matrix
   at best, after fusion); in training its backward also reads the saved probabilities and
   writes and reads their gradient and the scores' (7x more).
2. Where kernels run on Triton (backend "triton", on a GPU or in the interpreter; "auto" on
   CUDA), each fused ATen attention op becomes a Triton kernel (backends/triton/attention_call.py):
   the forward (backends/triton/attention.py) reads q, k, v and the mask and writes the
   output (and, when the backward needs it, the logsumexp); the backward
   (backends/triton/attention_backward.py) recomputes the scores blockwise from q, k and
   the logsumexp and writes dq, dk, dv. A bool mask is read as such (1 byte per element),
   not as the additive mask SDPA makes of it. Elsewhere (cpp and reference backends) the
   fused ATen ops run and are counted as extern ops. Refused, with the reason: dropout, head
   dims over 128 or different for q and v, masks of another dtype or over 4 dims, and CUDA
   ops in training (their backward reads their own logsumexp layout and RNG state).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx

from memopt.backends.triton.attention import MAX_HEAD_DIM  # imports no Triton
from memopt.backends.triton.attention_call import AttentionKernel
from memopt.compiler.graph import (
    META_KEY,
    evaluate,
    graph_device,
    meta_of_value,
    output_metas,
    tensor_meta,
)
from memopt.config import kernel_backend
from memopt.passes.attention_pattern import ATTENTION_META_KEY, FLOAT_DTYPES, AttentionMatch
from memopt.passes.base import Pass, PassContext, PassResult

aten = torch.ops.aten

# Score-matrix traffic of the written-out form that the fused op does not have, in score
# matrices (modelled, best case after fusion). Inference: scores written, read by the
# softmax, probabilities written, read by the second matmul. Training adds the backward:
# probabilities read twice (dV, softmax backward), dP written and read, dS written and
# read twice (dQ, dK).
SCORE_PASSES = {"inference": 4, "forward": 11}


def _options(node: torch.fx.Node, rest: list[object]) -> dict[str, object]:
    """dropout_p and is_causal (positional after the operands, or keywords), and scale."""
    return {
        "dropout": rest[0] if rest else node.kwargs.get("dropout_p", 0.0),
        "causal": rest[1] if len(rest) > 1 else node.kwargs.get("is_causal", False),
        "scale": node.kwargs.get("scale"),
    }


def _flash_cpu(node: torch.fx.Node) -> dict[str, object]:
    q, k, v, *rest = node.args
    return {"q": q, "k": k, "v": v, "mask": node.kwargs.get("attn_mask"), **_options(node, rest)}


def _flash_cuda(node: torch.fx.Node) -> dict[str, object]:
    parts = _flash_cpu(node)
    parts["mask"] = None
    return parts


def _efficient(node: torch.fx.Node) -> dict[str, object]:
    q, k, v, bias, _lse, *rest = node.args
    return {"q": q, "k": k, "v": v, "mask": bias, **_options(node, rest)}


# The fused ATen forward ops: how to read their arguments, and whether the logsumexp they
# return (output 1) is the one the Triton kernel writes (natural log, [batch, heads, seq_q]).
FUSED_OPS = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: (_flash_cpu, True),
    aten._scaled_dot_product_flash_attention.default: (_flash_cuda, False),
    aten._scaled_dot_product_efficient_attention.default: (_efficient, False),
}


def _flash_cpu_backward(node: torch.fx.Node) -> dict[str, object]:
    grad_out, q, k, v, out, lse, *rest = node.args
    return {
        "grad_out": grad_out, "q": q, "k": k, "v": v, "out": out, "lse": lse,
        "mask": node.kwargs.get("attn_mask"), **_options(node, rest),
    }  # fmt: skip


def _cuda_backward(node: torch.fx.Node) -> dict[str, object]:
    q, k, v = node.args[1:4]
    return {"q": q, "k": k, "v": v, "mask": None, "dropout": 0.0, "causal": False, "scale": None}


# The fused ATen backward ops; the CUDA ones read their own forward's outputs (refused).
BACKWARD_OPS = {
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: (_flash_cpu_backward, True),
    aten._scaled_dot_product_flash_attention_backward.default: (_cuda_backward, False),
    aten._scaled_dot_product_efficient_attention_backward.default: (_cuda_backward, False),
}


def _describe(parts: dict[str, object], backward: bool, lse: bool, bool_mask: bool) -> str:
    mask = ""
    if parts["mask"] is not None:
        mask = (
            ", the bool mask (1 B per element, not SDPA's additive copy)"
            if bool_mask
            else ", the mask"
        )
    if backward:
        return (
            f"recomputes the scores blockwise: q, k, v, output, its gradient, logsumexp{mask} "
            "read; dq, dk, dv written"
        )
    written = "output and logsumexp" if lse else "output (no backward: no logsumexp)"
    return f"q, k, v{mask} read; {written} written"


def runs_triton(backend: str, device_type: str) -> bool:
    """Whether kernels compiled for `backend` on `device_type` run on Triton."""
    return kernel_backend(backend, device_type) == "triton"


def _is_scalar(node: object, value: float) -> bool:
    return (
        isinstance(node, torch.fx.Node)
        and node.target is aten.scalar_tensor.default
        and node.args[0] == value
    )


def _read_bool_mask(parts: dict[str, object]) -> list[torch.fx.Node]:
    """Read a bool mask itself, not the additive one SDPA made of it (where(b, 0, -inf)).

    The kernel turns the bool into -inf in registers: 1 byte per element read instead of an
    additive mask written and read. Returns the nodes bypassed (erased when dead).
    """
    where = parts["mask"]
    if not (
        isinstance(where, torch.fx.Node)
        and where.target is aten.where.self
        and _is_scalar(where.args[1], 0.0)
        and _is_scalar(where.args[2], -math.inf)
    ):
        return []
    keep = where.args[0]
    meta = tensor_meta(keep)
    if meta is None or meta.dtype != torch.bool:
        return []
    parts["mask"], parts["mask_drops"] = keep, False
    bypassed = [where, where.args[1], where.args[2]]
    negated = keep.args[0] if keep.target is aten.logical_not.default else None
    if (
        isinstance(negated, torch.fx.Node)
        and getattr(tensor_meta(negated), "dtype", None) is torch.bool
    ):
        parts["mask"], parts["mask_drops"] = negated, True
        bypassed.append(keep)
    return bypassed


def _erase_dead(graph: torch.fx.Graph, nodes: list[torch.fx.Node]) -> None:
    for node in nodes:
        if not node.users:
            graph.erase_node(node)


@dataclass(frozen=True)
class Attention(Pass):
    """Attention as one kernel: record the capture's rewrites, place the Triton kernel."""

    name: ClassVar[str] = "attention"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        for match in gm.meta.get(ATTENTION_META_KEY, ()):
            if isinstance(match, AttentionMatch):
                self._record_rewrite(match, ctx, result)
        triton = runs_triton(ctx.config.backend, graph_device(gm))
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and (
                node.target in FUSED_OPS or node.target in BACKWARD_OPS
            ):
                self._place(gm, node, triton, ctx, result)
        return result

    def _record_rewrite(self, match: AttentionMatch, ctx: PassContext, result: PassResult) -> None:
        passes = SCORE_PASSES.get(ctx.graph_name.split(".")[0], 4)
        saved = passes * match.score_nbytes
        names = ", ".join(f"%{n}" for n in match.nodes)
        if match.applied:
            what = f"attention: {names} -> scaled_dot_product_attention"
            reason = (
                f"{match.describe()} never written: saves {passes} x {match.score_nbytes} B "
                "of score traffic (modelled, best case of the written-out form after fusion)"
            )
            self.decide(ctx, result, what, reason, saved, match.nodes)
        else:
            what = f"not rewritten (attention): {names}"
            self.refuse(ctx, result, what, match.reason, saved, match.nodes)

    def _place(self, gm: torch.fx.GraphModule, node: torch.fx.Node, triton: bool,
               ctx: PassContext, result: PassResult) -> None:  # fmt: skip
        backward = node.target in BACKWARD_OPS
        read_parts, own_lse = (BACKWARD_OPS if backward else FUSED_OPS)[node.target]
        parts = read_parts(node)
        used = sorted(
            {u.args[1] for u in node.users if u.target is operator.getitem and u.users}
        )  # fmt: skip
        metas = output_metas(node)
        saved = 0  # the logsumexp, when nothing reads it (the ATen op always writes it)
        if not backward and len(metas) > 1 and 1 not in used:
            saved = evaluate(metas[1].nbytes, ctx.bindings)
        what = f"attention{' backward' if backward else ''} %{node.name} as the Triton kernel"
        reason = self._unsupported(parts, used, own_lse, backward, ctx.bindings) if triton else (
            f"backend {ctx.config.backend!r} on {graph_device(gm)} runs no Triton kernel: "
            "the fused ATen op runs (inputs read once, outputs written once)"
        )  # fmt: skip
        if reason is not None:
            self.refuse(ctx, result, what, reason, saved, (node.name,))
            return
        additive = parts["mask"]
        bypassed = _read_bool_mask(parts)
        if bypassed:
            # The additive mask is neither written nor read; the bool one is read instead.
            dead = {node, *bypassed}
            saved += sum(ctx.nbytes(n) for n in bypassed if set(n.users) <= dead)
            saved += evaluate(
                tensor_meta(additive).touched_nbytes - tensor_meta(parts["mask"]).touched_nbytes,
                ctx.bindings,
            )
        why = _describe(parts, backward, 1 in used, bool(bypassed))
        if not self.decide(ctx, result, what, why, saved, (node.name,)):
            return
        fakes = tuple(node.meta.get("val"))
        outputs = fakes if backward else fakes[: 2 if 1 in used else 1]
        kernel = AttentionKernel(
            f"{ctx.graph_name.replace('.', '_')}_attention{'_backward' if backward else ''}_"
            f"{sum(isinstance(n.target, AttentionKernel) for n in gm.graph.nodes)}",
            node.name,
            causal=bool(parts["causal"]),
            scale=parts["scale"],
            mask_drops=bool(parts.get("mask_drops", False)),
            fake_outputs=outputs,
            backward=backward,
        )
        names = ("grad_out", "q", "k", "v", "out", "lse") if backward else ("q", "k", "v")
        args = [parts[name] for name in names]
        if parts["mask"] is not None:
            args.append(parts["mask"])
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(kernel, tuple(args))
        call.meta["val"] = outputs
        call.meta[META_KEY] = meta_of_value(list(outputs))
        for user in list(node.users):
            if user.target is operator.getitem and user.args[1] < len(outputs):
                user.args = (call, user.args[1])
        for user in list(node.users):
            gm.graph.erase_node(user)  # getitems nothing reads
        gm.graph.erase_node(node)
        _erase_dead(gm.graph, bypassed)

    @staticmethod
    def _unsupported(
        parts: dict[str, object], used: list[int], own_lse: bool, backward: bool, bindings
    ) -> str | None:
        q, k, v, mask = (tensor_meta(parts[x]) if parts[x] is not None else None
                         for x in ("q", "k", "v", "mask"))  # fmt: skip
        if parts["dropout"] not in (0, 0.0):
            return f"dropout {parts['dropout']} (the Triton kernel draws no random mask)"
        if any(x is None or len(x.shape) != 4 for x in (q, k, v)):
            return "operands are not 4-D (batch, heads, seq, head dim)"
        if q.dtype not in FLOAT_DTYPES or not (q.dtype == k.dtype == v.dtype):
            return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: one of fp32/fp16/bf16"
        # A symbolic head dim is judged at the example sizes; a call with a larger one
        # fails the kernel's own check and runs the fused ATen op, with a warning.
        head_dim, v_dim = (evaluate(x, bindings) for x in (q.shape[-1], v.shape[-1]))
        if head_dim > MAX_HEAD_DIM or head_dim != v_dim:
            return f"head dim {head_dim} (v: {v_dim}): the kernel takes equal dims up to {MAX_HEAD_DIM}"
        if mask is not None and (len(mask.shape) > 4 or mask.dtype not in (torch.bool, q.dtype)):
            return f"mask {mask.dtype}[{len(mask.shape)} dims]: bool or {q.dtype}, at most 4 dims"
        if not own_lse:
            if backward:
                return "CUDA fused backward: it reads its own forward's logsumexp layout"
            if any(i > 0 for i in used):
                return "the backward reads this op's own logsumexp layout and RNG state"
        return None
