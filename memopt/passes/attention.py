"""attention: scaled dot-product attention as one kernel that never writes the score matrix.

Two steps, one decision record each:

1. Written-out attention (`q @ k^T -> scale -> mask -> softmax -> @ v`) is rewritten into
   `F.scaled_dot_product_attention` on Dynamo's graph, before AOTAutograd differentiates it
   (compiler/attention_pattern.py: in training the backward reads the probabilities, so no
   per-graph rewrite could remove them). Capture keeps the fused op whole; its backward
   recomputes the scores blockwise. This pass writes those rewrites (and the refusals, with
   their reasons) into the ledger, with the bytes of score-matrix traffic they save: the
   written-out form writes and reads the scores and the probabilities (4x the score matrix
   at best, after fusion); in training its backward also reads the saved probabilities and
   writes and reads their gradient and the scores' (7x more).
2. Where kernels run on Triton (backend "triton", on a GPU or in the interpreter; "auto" on
   CUDA), each fused ATen attention op becomes the Triton attention kernel
   (backends/triton/attention.py): q, k, v and the mask read, the output (and, when the
   backward needs it, the logsumexp) written. Elsewhere (cpp and reference backends) the
   fused ATen op runs and is counted as an extern op. Refused, with the reason: dropout,
   head dims over 128 or different for q and v, masks of another dtype or over 4 dims,
   and CUDA ops whose extra outputs (logsumexp layout, RNG state) the backward reads.

The backward stays the fused ATen backward op (extern): it reads q, k, v, the output, its
gradient and the logsumexp and writes dq, dk, dv.
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx
from torch._guards import active_fake_mode
from torch._subclasses.fake_tensor import FakeTensor

from memopt.compiler.attention_pattern import ATTENTION_META_KEY, FLOAT_DTYPES, AttentionMatch
from memopt.compiler.cost import Cost, attention_flops, read_bytes
from memopt.compiler.graph import META_KEY, evaluate, meta_of_value, output_metas, tensor_meta
from memopt.passes.base import Pass, PassContext, PassResult

aten = torch.ops.aten

MAX_HEAD_DIM = 128  # backends/triton/attention.py: one [BLOCK_M, head dim] register tile

# Score-matrix traffic of the written-out form that the fused op does not have, in score
# matrices (modelled, best case after fusion). Inference: scores written, read by the
# softmax, probabilities written, read by the second matmul. Training adds the backward:
# probabilities read twice (dV, softmax backward), dP written and read, dS written and
# read twice (dQ, dK).
SCORE_PASSES = {"inference": 4, "forward": 11}


def _flash_cpu(node: torch.fx.Node) -> dict[str, object]:
    q, k, v, *rest = node.args
    return {
        "q": q, "k": k, "v": v,
        "dropout": rest[0] if rest else node.kwargs.get("dropout_p", 0.0),
        "causal": rest[1] if len(rest) > 1 else node.kwargs.get("is_causal", False),
        "mask": node.kwargs.get("attn_mask"),
        "scale": node.kwargs.get("scale"),
    }  # fmt: skip


def _flash_cuda(node: torch.fx.Node) -> dict[str, object]:
    parts = _flash_cpu(node)
    parts["mask"] = None
    return parts


def _efficient(node: torch.fx.Node) -> dict[str, object]:
    q, k, v, bias, _lse, *rest = node.args
    return {
        "q": q, "k": k, "v": v, "mask": bias,
        "dropout": rest[0] if rest else node.kwargs.get("dropout_p", 0.0),
        "causal": rest[1] if len(rest) > 1 else node.kwargs.get("is_causal", False),
        "scale": node.kwargs.get("scale"),
    }  # fmt: skip


# The fused ATen forward ops: how to read their arguments, and whether the logsumexp they
# return (output 1) is the one the Triton kernel writes (natural log, [batch, heads, seq_q]).
FUSED_OPS = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: (_flash_cpu, True),
    aten._scaled_dot_product_flash_attention.default: (_flash_cuda, False),
    aten._scaled_dot_product_efficient_attention.default: (_efficient, False),
}


def runs_triton(backend: str, device_type: str) -> bool:
    """Whether kernels compiled for `backend` on `device_type` run on Triton."""
    return backend == "triton" or (backend == "auto" and device_type == "cuda")


class AttentionKernel:
    """Call target of an attention node: `(out[, lse]) = kernel(q, k, v[, mask])`."""

    memopt_kind = "attention"

    def __init__(self, name: str, replaced: torch.fx.Node, parts: dict[str, object],
                 fake_outputs: tuple[object, ...]) -> None:  # fmt: skip
        self.__name__ = name
        self.memopt_name = f"memopt.{name}"
        self.memopt_nodes = (replaced.name,)
        self.memopt_ops = ("triton attention",)
        self.memopt_source_path: str | None = None
        self.causal = bool(parts["causal"])
        self.scale = parts["scale"]
        self.mask_drops = bool(parts.get("mask_drops", False))
        self.fake_outputs = fake_outputs

    def __repr__(self) -> str:
        return f"AttentionKernel({self.__name__}, causal={self.causal}, scale={self.scale})"

    def memopt_cost(self, node: torch.fx.Node) -> Cost:
        read = read_bytes(node, node.all_input_nodes)
        write = sum((m.nbytes for m in output_metas(node)), 0)
        return Cost(read=read, write=write, flops=attention_flops(node))

    def triton_source_path(self) -> str | None:
        if self.memopt_source_path is None:
            from memopt.backends.triton.attention import _source
            from memopt.backends.triton.runtime import write_source

            self.memopt_source_path = str(write_source(_source()))
        return self.memopt_source_path

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:  # fmt: skip
        if active_fake_mode() is not None or isinstance(q, FakeTensor):
            return self.fake_outputs  # verification re-propagating metadata
        shapes = [(*q.shape[:-1], v.shape[-1]), tuple(q.shape[:-1])]
        outputs = tuple(
            _empty_like_layout(fake, shape, q.device)
            for fake, shape in zip(self.fake_outputs, shapes)
        )
        try:
            from memopt.backends.triton.attention import attention

            out, lse = (*outputs, None)[:2]
            attention(q, k, v, mask, self.causal, self.scale, out, lse, self.mask_drops)
        except Exception as error:  # noqa: BLE001 - no Triton, or a launch failure: ATen runs
            warnings.warn(
                f"memopt: attention kernel {self.__name__} failed ({type(error).__name__}: "
                f"{error}); running the fused ATen op",
                stacklevel=2,
            )
            if mask is not None and mask.dtype == torch.bool:
                keep = ~mask if self.mask_drops else mask
                mask = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep.cpu(), -math.inf)
            results = _aten_attention(q, k, v, mask, self.causal, self.scale)
            for target, value in zip(outputs, results):
                target.copy_(value)
        return outputs


def _aten_attention(q, k, v, mask, causal, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) from the CPU fused op (on another device: on CPU copies)."""
    device = q.device
    args = [t.cpu() for t in (q, k, v)]
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
        *args, 0.0, causal, attn_mask=mask.cpu() if mask is not None else None, scale=scale
    )
    return out.to(device), lse.to(device)


def _hint(size: object) -> int:
    node = getattr(size, "node", None)
    return int(node.hint) if node is not None and node.hint is not None else int(size)


def _empty_like_layout(fake: torch.Tensor, shape: tuple[int, ...], device) -> torch.Tensor:
    """An empty tensor of `shape` whose dims are laid out in the order `fake`'s strides give."""
    strides = [_hint(s) for s in fake.stride()]
    order = sorted(range(len(shape)), key=lambda d: (-strides[d], d))
    empty = torch.empty([shape[d] for d in order], dtype=fake.dtype, device=device)
    return empty.permute([order.index(d) for d in range(len(shape))])


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


def _graph_device(gm: torch.fx.GraphModule) -> str:
    for node in gm.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "cpu"


@dataclass(frozen=True)
class Attention(Pass):
    """Attention as one kernel: record the capture's rewrites, place the Triton kernel."""

    name: ClassVar[str] = "attention"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        for match in gm.meta.get(ATTENTION_META_KEY, ()):
            if isinstance(match, AttentionMatch):
                self._record_rewrite(match, ctx, result)
        triton = runs_triton(ctx.config.backend, _graph_device(gm))
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in FUSED_OPS:
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
        read_parts, own_lse = FUSED_OPS[node.target]
        parts = read_parts(node)
        used = sorted(
            {u.args[1] for u in node.users if u.target is operator.getitem and u.users}
        )  # fmt: skip
        fakes = node.meta.get("val")
        metas = output_metas(node)
        saved = 0  # the logsumexp, when nothing reads it (the ATen op always writes it)
        if len(metas) > 1 and 1 not in used:
            saved = evaluate(metas[1].nbytes, ctx.bindings)
        what = f"attention %{node.name} as the Triton kernel"
        reason = self._unsupported(parts, used, own_lse, ctx.bindings) if triton else (
            f"backend {ctx.config.backend!r} on {_graph_device(gm)} runs no Triton kernel: "
            "the fused ATen op runs (q, k, v, mask read; output and logsumexp written)"
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
        why = "q, k, v" + (", mask" if parts["mask"] is not None else "") + " read"
        if bypassed:
            why += " (the bool mask, 1 B per element, not the additive one SDPA makes of it)"
        why += "; output and logsumexp written" if 1 in used else "; output written (no backward)"
        if not self.decide(ctx, result, what, why, saved, (node.name,)):
            return
        outputs = tuple(fakes[: 2 if 1 in used else 1])
        kernel = AttentionKernel(
            f"{ctx.graph_name.replace('.', '_')}_attention_{node.name}", node, parts, outputs
        )
        args = [parts["q"], parts["k"], parts["v"]]
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
        parts: dict[str, object], used: list[int], own_lse: bool, bindings
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
        if any(i > 1 for i in used) or (1 in used and not own_lse):
            return "the backward reads this op's own logsumexp layout and RNG state"
        return None
