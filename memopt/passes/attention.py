"""attention: scaled dot-product attention as one kernel that never writes the score matrix.

Two steps, one decision record each:

1. Dynamo stage: written-out attention (`q @ k^T -> scale -> mask -> softmax -> @ v`) is
   rewritten into `F.scaled_dot_product_attention` on Dynamo's graph, before AOTAutograd
   differentiates it (passes/attention_pattern.py: in training the backward reads the
   probabilities, so no per-graph rewrite could remove them). Capture keeps the fused op
   whole; its backward recomputes the scores blockwise. Each rewrite is a decision (it
   takes fuel) with the bytes of score-matrix traffic it saves: the
   written-out form writes and reads the scores and the probabilities (4x the score matrix
   at best, after fusion); in training its backward also reads the saved probabilities and
   writes and reads their gradient and the scores' (7x more).
2. ATen stage: where the backend kernels run on has an attention kernel (Triton, on a GPU
   or in the interpreter; "auto" on CUDA), each fused ATen attention op becomes that kernel
   (backends/triton/attention_call.py):
   the forward (backends/triton/attention.py) reads q, k, v and the mask and writes the
   output (and, when the backward needs it, the logsumexp); the backward
   (backends/triton/attention_backward.py) recomputes the scores blockwise from q, k and
   the logsumexp and writes dq, dk, dv. A bool mask is read as such (1 byte per element),
   not as the additive mask SDPA makes of it. Elsewhere (cpp and reference backends) the
   fused ATen ops run and are counted as extern ops. Refused, with the reason: dropout, head
   dims over 128 or different for q and v, masks of another dtype or over 4 dims, and CUDA
   ops in training (their backward reads their own logsumexp layout and RNG state).
3. ATen stage, grouped keys and values: where the fused CPU op stays (no backend kernel)
   and no backward reads it, keys and values that are grouped-query heads repeated
   (`kv[:, :, None].expand(b, h_kv, n_rep, s, d).reshape(b, h_kv * n_rep, s, d)`, Llama's
   `repeat_kv`) are handed to the op unrepeated: ATen's CPU flash attention reads query
   head h's keys from head h // n_rep itself (checked once a process, `_groups_heads`).
   The repeated copies are never written, and the op reads the cache once instead of
   n_rep times: in a decode step with a KV cache that is most of attention's traffic.
4. ATen stage, a cache appended in the graph: where the fused CPU op stays, has one query
   position and no backward reads it, and its keys and its values are each
   `cat([old, new], -2)` (Hugging Face's `DynamicCache` in a decode step), the three become
   one `AppendAttention` call (backends/runtime/decode_attention.py) when memopt's decode
   attention kernel runs one-position attention on this machine (the `cpu_attention`
   option; "auto" measures it once). The kernel writes the concatenations as it reads the
   old cache and attends over them from its cores' caches: the concatenations are written
   once and never read back (the saving recorded: their bytes). Refused, with the reason: a
   concatenation read by a node before the attention (the call sits where the attention
   was), one used as both keys and values, one of another layout than contiguous, a mask
   that is not float32, or ATen's attention chosen for this machine.
5. ATen stage, a constant causal mask: where the fused CPU op stays and its mask is
   computed in the graph from no input (Hugging Face's `sdpa_mask` for a prompt without
   padding: `arange`, comparisons, `full`), the mask is evaluated once at compile time; one
   equal to the causal pattern (query i sees keys 0..i: `tril`, as a bool mask or as 0 and
   -inf) is dropped for `is_causal=True`. The op no longer reads the mask, and a causal op
   skips the masked blocks (memopt's CPU causal kernel takes only that form: GPT-2 without
   a cache, 1024 tokens, 12.7 -> 5.1 ms a layer). Refused, with the reason: a mask that
   reads an input, a random op, uninitialized memory or an op outside ATen, has size
   symbols or a tensor larger than MAX_MASK_ELEMENTS, or is not the causal pattern (a
   sliding window, another alignment); a scale of 0 or below (the causal op makes NaN
   rows there). A mask shared by several attentions is evaluated once.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

import sympy
import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from memopt.backends.registry import AttentionKernels
from memopt.backends.runtime.decode_attention import AppendAttention, attention_library
from memopt.compiler.cost import readers_between
from memopt.compiler.graph import (
    META_KEY,
    evaluate,
    graph_device,
    meta_of_value,
    output_metas,
    tensor_meta,
)
from memopt.passes.attention_pattern import FLOAT_DTYPES, AttentionMatch, rewrite_attention
from memopt.passes.base import Pass, PassContext, Stage
from memopt.passes.registry import register_pass

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
        "grad_out": grad_out,
        "q": q,
        "k": k,
        "v": v,
        "out": out,
        "lse": lse,
        "mask": node.kwargs.get("attn_mask"),
        **_options(node, rest),
    }


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


_FLASH_CPU = aten._scaled_dot_product_flash_attention_for_cpu.default
_RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _repeated_heads(
    node: object, heads: object
) -> tuple[torch.fx.Node, int, list[torch.fx.Node]] | None:
    """(source, n_rep, the nodes that repeat it) where `node` is `source` [b, h_kv, s, d]
    with each head repeated n_rep times in a row to `heads` heads: a reshape of a
    contiguous copy of `source.unsqueeze(2).expand(b, h_kv, n_rep, s, d)`."""
    chain = []
    for targets in (_RESHAPES, (aten.clone.default,), (aten.expand.default,)):
        if not (isinstance(node, torch.fx.Node) and node.target in targets):
            return None
        chain.append(node)
        node = node.args[0]
    if not (
        isinstance(node, torch.fx.Node)
        and node.target is aten.unsqueeze.default
        and node.args[1] == 2
        and isinstance(node.args[0], torch.fx.Node)
    ):
        return None
    chain.append(node)
    source = node.args[0]
    metas = [tensor_meta(n) for n in (chain[0], chain[2], source)]
    if None in metas or any(len(m.shape) != n for m, n in zip(metas, (4, 5, 4))):
        return None
    reshaped, expanded, kv = metas
    b, h_kv, n_rep, s, d = expanded.shape
    if (
        not isinstance(n_rep, (int, sympy.Integer))
        or (b, h_kv, s, d) != tuple(kv.shape)
        or tuple(reshaped.shape) != (b, h_kv * n_rep, s, d)
        or heads != h_kv * n_rep
        or kv.stride[-1] != 1
    ):
        return None
    return source, int(n_rep), chain


@functools.cache
def _groups_heads() -> bool:
    """ATen's CPU flash attention takes fewer key/value heads than query heads, each serving
    a run of query heads, with the results of repeating them (checked once, on 4 heads)."""
    with unset_fake_temporarily():  # the pass runs under capture's fake mode
        generator = torch.Generator().manual_seed(0)
        q = torch.randn(1, 4, 3, 8, generator=generator)
        kv = torch.randn(2, 1, 2, 5, 8, generator=generator)
        repeated = kv[:, :, :, None].expand(2, 1, 2, 2, 5, 8).reshape(2, 1, 4, 5, 8)
        try:
            grouped = _FLASH_CPU(q, kv[0], kv[1])[0]
        except RuntimeError:
            return False
        return torch.equal(grouped, _FLASH_CPU(q, repeated[0], repeated[1])[0])


def _appended(node: object) -> torch.fx.Node | None:
    """`node` where it is `cat([old, new], 2)` of two float32 4-D tensors, else None."""
    if not (isinstance(node, torch.fx.Node) and node.target is aten.cat.default):
        return None
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if dim not in (2, -2) or len(parts) != 2:
        return None
    for part in parts:
        meta = tensor_meta(part) if isinstance(part, torch.fx.Node) else None
        if meta is None or len(meta.shape) != 4 or meta.dtype != torch.float32:
            return None
    return node


_FLOAT32_MAX = torch.finfo(torch.float32).max
# The most elements of a mask evaluated at compile time (a 4096-token prompt's, as bool).
MAX_MASK_ELEMENTS = 1 << 24


def _constant_subgraph(mask: torch.fx.Node) -> tuple[list[torch.fx.Node] | None, str]:
    """The nodes `mask` is computed from, in graph order, where each is an ATen op that
    reads no input, module attribute, random state or uninitialized memory (`empty`), and
    every tensor it makes has static sizes and at most MAX_MASK_ELEMENTS elements; else
    None and why not. (Another namespace's op may read state of its own.)"""
    seen: set[torch.fx.Node] = set()
    stack = [mask]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        target = node.target
        if node.op != "call_function":
            return None, f"the mask is computed from %{node.name}, an input of the graph"
        if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
            return None, f"the mask is computed by %{node.name}, not an ATen op"
        if torch.Tag.nondeterministic_seeded in target.tags:
            return None, f"the mask is computed from %{node.name}, a random op"
        if "empty" in target._opname:
            return None, f"the mask is computed from %{node.name}, uninitialized memory"
        meta = node.meta.get("val")
        for value in meta if isinstance(meta, (tuple, list)) else [meta]:
            if not isinstance(value, torch.Tensor):
                continue
            if not all(isinstance(size, int) for size in value.shape):
                return None, "the mask has size symbols (dynamic shapes)"
            if value.numel() > MAX_MASK_ELEMENTS:
                return None, f"%{node.name} has over {MAX_MASK_ELEMENTS} elements to evaluate"
        torch.fx.node.map_arg((node.args, node.kwargs), stack.append)
    order = {node: k for k, node in enumerate(mask.graph.nodes)}
    return sorted(seen, key=order.__getitem__), ""


def _evaluated(nodes: list[torch.fx.Node]) -> torch.Tensor:
    """The last of `nodes` computed eagerly on real tensors (the pass runs under capture's
    fake mode)."""
    values: dict[torch.fx.Node, object] = {}
    with unset_fake_temporarily():
        for node in nodes:
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
            values[node] = node.target(*args, **kwargs)
    return values[nodes[-1]]


def _is_causal_pattern(mask: torch.Tensor, length: int) -> bool:
    """Whether `mask` (bool: True where a key is seen; or additive: 0 there, -inf
    elsewhere) is query i seeing keys 0..i, in every batch and head it broadcasts over."""
    if mask.dim() < 2 or tuple(mask.shape[-2:]) != (length, length):
        return False
    with unset_fake_temporarily():
        seen = torch.ones(length, length, dtype=torch.bool).tril()
        if mask.dtype == torch.bool:
            return bool((mask == seen).all())
        if not mask.dtype.is_floating_point:
            return False
        additive = torch.zeros(length, length, dtype=mask.dtype).masked_fill(~seen, -math.inf)
        return bool((mask == additive).all())


def _lse_read(node: torch.fx.Node) -> bool:
    """Whether something reads a fused attention op's results past its output (its
    logsumexp: a backward, which also takes the op's operands as they are)."""
    return any(u.target is operator.getitem and u.args[1] > 0 and u.users for u in node.users)


def _erase_dead(graph: torch.fx.Graph, nodes: list[torch.fx.Node]) -> None:
    for node in nodes:
        if not node.users:
            graph.erase_node(node)


@register_pass(
    "attention",
    stages=(Stage.DYNAMO, Stage.ATEN),
    codes=(
        "rewritten",  # written-out attention -> scaled_dot_product_attention (Dynamo stage)
        "not_rewritten",  # ... refused, with the reason and the score bytes at stake
        "kernel",  # a fused ATen attention op -> the backend's attention kernel (ATen stage)
        "no_kernel",  # ... refused: the fused ATen op runs
        "grouped_kv",  # repeated grouped-query keys/values -> read unrepeated (ATen stage)
        "appended_kv",  # cat(cache, new) -> attention: one call writing the cat (ATen stage)
        "not_appended",  # ... refused, with the reason and the bytes at stake
        "causal_mask",  # a constant mask equal to the causal pattern -> is_causal (ATen stage)
        "not_causal_mask",  # ... refused, with the reason and the mask's bytes
    ),
)
@dataclass(frozen=True)
class Attention(Pass):
    """Attention as one kernel: written-out attention rewritten to the fused op before
    AOTAutograd, and the fused ATen ops placed as the backend's attention kernels."""

    def rewrite_dynamo_graph(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        passes = SCORE_PASSES.get(ctx.graph_name, 4)

        def decide(match: AttentionMatch) -> bool:
            saved = passes * match.score_nbytes
            names = ", ".join(f"%{n}" for n in match.nodes)
            if not match.rewritable:
                what = f"not rewritten (attention): {names}"
                ctx.refuse("not_rewritten", what, match.reason, saved, match.nodes)
                return False
            what = f"attention: {names} -> scaled_dot_product_attention"
            reason = (
                f"{match.describe()} never written: saves {passes} x {match.score_nbytes} B "
                "of score traffic (modelled, best case of the written-out form after fusion)"
            )
            return ctx.decide("rewritten", what, reason, saved, match.nodes)

        rewrite_attention(gm, decide)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        kernels = ctx.kernel_backend(graph_device(gm)).attention
        verdicts: dict = {}  # constant masks evaluated (step 5), by mask and length
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and (
                node.target in FUSED_OPS or node.target in BACKWARD_OPS
            ):
                if kernels is None and node.target is _FLASH_CPU:
                    self._causal(gm, node, ctx, verdicts)
                    self._ungroup(gm, node, ctx)
                    if self._append(gm, node, ctx):
                        continue
                self._place(gm, node, kernels, ctx)

    def _place(
        self,
        gm: torch.fx.GraphModule,
        node: torch.fx.Node,
        kernels: AttentionKernels | None,
        ctx: PassContext,
    ) -> None:
        backward = node.target in BACKWARD_OPS
        read_parts, own_lse = (BACKWARD_OPS if backward else FUSED_OPS)[node.target]
        parts = read_parts(node)
        used = sorted({u.args[1] for u in node.users if u.target is operator.getitem and u.users})
        metas = output_metas(node)
        saved = 0  # the logsumexp, when nothing reads it (the ATen op always writes it)
        if not backward and len(metas) > 1 and 1 not in used:
            saved = evaluate(metas[1].nbytes, ctx.bindings)
        what = f"attention{' backward' if backward else ''} %{node.name} as one generated kernel"
        reason = (
            self._unsupported(parts, used, own_lse, backward, ctx.bindings, kernels.max_head_dim)
            if kernels is not None
            else f"backend {ctx.backend!r} on {graph_device(gm)} has no attention "
            "kernel: the fused ATen op runs (inputs read once, outputs written once)"
        )
        if reason is not None:
            ctx.refuse("no_kernel", what, reason, saved, (node.name,))
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
        if not ctx.decide("kernel", what, why, saved, (node.name,)):
            return
        fakes = tuple(node.meta.get("val"))
        outputs = fakes if backward else fakes[: 2 if 1 in used else 1]
        kernel = kernels.make_target(
            f"{ctx.graph_name.replace('.', '_')}_attention{'_backward' if backward else ''}_"
            f"{sum(getattr(n.target, 'memopt_kind', None) == 'attention' for n in gm.graph.nodes)}",
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

    def _causal(
        self, gm: torch.fx.GraphModule, node: torch.fx.Node, ctx: PassContext, verdicts: dict
    ) -> None:
        """A constant mask equal to the causal pattern dropped for is_causal (module doc, 5).
        `verdicts`: each mask's (nodes, reason) as found, for the graph's other attentions."""
        parts = _flash_cpu(node)
        mask, q, k = parts["mask"], parts["q"], parts["k"]
        if not isinstance(mask, torch.fx.Node) or parts["causal"]:
            return
        if _lse_read(node):
            return  # a backward reads this op's outputs and takes the mask
        if parts["dropout"] not in (0, 0.0):
            return
        metas = [tensor_meta(x) if isinstance(x, torch.fx.Node) else None for x in (mask, q, k)]
        if None in metas:
            return
        mask_meta, q_meta, k_meta = metas
        saved = evaluate(mask_meta.touched_nbytes, ctx.bindings)
        what = f"attention %{node.name}: mask %{mask.name} as is_causal"
        length, scale = q_meta.shape[-2], parts["scale"]
        nodes, reason = None, ""
        if scale is not None and not 0 < scale <= _FLOAT32_MAX:
            # ATen's causal op makes NaN rows there, where the masked op does not
            reason = f"a scale of {scale} (the causal op needs one above 0)"
        elif length != k_meta.shape[-2]:
            reason = "queries and keys differ in number (another alignment)"
        elif (mask, length) in verdicts:
            nodes, reason = verdicts[mask, length]
        else:
            nodes, reason = _constant_subgraph(mask)
            if nodes is not None:
                try:
                    causal = _is_causal_pattern(_evaluated(nodes), length)
                except Exception as error:  # noqa: BLE001 - an op that cannot run here
                    causal, reason = None, f"the mask could not be evaluated ({error!r:.120})"
                if causal is False:
                    reason = "the mask, evaluated, is not the causal pattern"
                if not causal:
                    nodes = None
            verdicts[mask, length] = (nodes, reason)
        if nodes is None:
            ctx.refuse("not_causal_mask", what, reason, saved, (node.name, mask.name))
            return
        why = (
            "the mask is computed from no input and equals the causal pattern (evaluated "
            "once): the op reads no mask and skips the masked blocks"
        )
        if not ctx.decide("causal_mask", what, why, saved, (node.name, mask.name)):
            return
        node.args = (q, k, parts["v"], parts["dropout"], True)
        node.kwargs = {
            key: value
            for key, value in node.kwargs.items()
            if key not in ("attn_mask", "dropout_p", "is_causal")
        }
        _erase_dead(gm.graph, list(reversed(nodes)))

    def _ungroup(self, gm: torch.fx.GraphModule, node: torch.fx.Node, ctx: PassContext) -> None:
        """Keys and values repeated over query-head groups, read unrepeated (module doc, 3)."""
        if _lse_read(node):
            return  # a backward reads this op's outputs and takes the repeated operands
        q, k, v = node.args[:3]
        q_meta = tensor_meta(q) if isinstance(q, torch.fx.Node) else None
        if q_meta is None or len(q_meta.shape) != 4:
            return
        heads = q_meta.shape[1]
        sources = [_repeated_heads(x, heads) for x in (k, v)]
        if None in sources or sources[0][1] != sources[1][1] or not _groups_heads():
            return
        (k_source, n_rep, k_chain), (v_source, _, v_chain) = sources
        saved = sum(ctx.nbytes(n) for n in (*k_chain, *v_chain) if n.op == "call_function")
        saved += sum(
            evaluate(tensor_meta(a).nbytes - tensor_meta(b).nbytes, ctx.bindings)
            for a, b in ((k, k_source), (v, v_source))
        )
        what = f"attention %{node.name}: keys %{k.name} and values %{v.name} read unrepeated"
        reason = (
            f"{n_rep} query heads share each key/value head; the CPU op reads head h's keys "
            f"from head h // {n_rep} itself: the repeated copies are neither written nor read"
        )
        if not ctx.decide("grouped_kv", what, reason, saved, (node.name, k.name, v.name)):
            return
        node.args = (q, k_source, v_source, *node.args[3:])
        for chain in (k_chain, v_chain):
            _erase_dead(gm.graph, chain)

    def _append(self, gm: torch.fx.GraphModule, node: torch.fx.Node, ctx: PassContext) -> bool:
        """A one-position attention over caches concatenated in the graph, and the two
        concatenations, as one AppendAttention call (module doc, 4); True when it did."""
        parts = _flash_cpu(node)
        cats = [_appended(parts[x]) for x in ("k", "v")]
        q = tensor_meta(parts["q"]) if isinstance(parts["q"], torch.fx.Node) else None
        if None in cats or q is None or len(q.shape) != 4 or q.shape[2] != 1:
            return False
        if parts["dropout"] not in (0, 0.0) or parts["causal"] is not False:
            return False
        if _lse_read(node):
            return False  # a backward reads the logsumexp
        k_cat, v_cat = parts["k"], parts["v"]
        saved = sum(evaluate(tensor_meta(c).nbytes, ctx.bindings) for c in {k_cat, v_cat})
        what = f"attention %{node.name}: concatenations %{k_cat.name}, %{v_cat.name} written by it"
        reason = self._not_appendable(node, parts, ctx)
        if reason is not None:
            ctx.refuse("not_appended", what, reason, saved, (node.name, k_cat.name, v_cat.name))
            return False
        why = (
            "the old cache is read once, by the attention, which writes the concatenations "
            "as it reads them: they are not read back"
        )
        if not ctx.decide("appended_kv", what, why, saved, (node.name, k_cat.name, v_cat.name)):
            return False
        (k_old, k_new), (v_old, v_new) = (c.args[0] for c in (k_cat, v_cat))
        mask = parts["mask"]
        kwargs = {} if mask is None else {"attn_mask": mask}
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(
                AppendAttention(parts["scale"]), (parts["q"], k_old, k_new, v_old, v_new), kwargs
            )
            results = [gm.graph.call_function(operator.getitem, (call, index)) for index in (2, 3)]
        fakes = (*node.meta["val"], k_cat.meta["val"], v_cat.meta["val"])
        call.meta["val"] = fakes
        call.meta[META_KEY] = meta_of_value(list(fakes))
        for result, cat in zip(results, (k_cat, v_cat)):
            result.meta["val"] = cat.meta["val"]
            result.meta[META_KEY] = cat.meta[META_KEY]
            cat.replace_all_uses_with(result, delete_user_cb=lambda user: user is not node)
        for user in list(node.users):
            user.args = (call, user.args[1])
        gm.graph.erase_node(node)
        _erase_dead(gm.graph, [k_cat, v_cat])
        return True

    @staticmethod
    def _not_appendable(node, parts: dict[str, object], ctx: PassContext) -> str | None:
        """Why the attention and its concatenations cannot be one call, or None."""
        if parts["k"] is parts["v"]:
            return "the keys and the values are one concatenation (the call writes two)"
        for cat in (parts["k"], parts["v"]):
            meta = tensor_meta(cat)
            if meta.dtype != torch.float32 or not meta.is_contiguous():
                return f"%{cat.name} is {meta.short()}: the kernel writes float32, contiguous"
            early = readers_between(cat, cat, node)
            if early:
                return f"%{early[0].name} reads %{cat.name} before the attention runs"
        mask = tensor_meta(parts["mask"]) if parts["mask"] is not None else None
        if parts["mask"] is not None and (mask is None or mask.dtype != torch.float32):
            return "the mask is not float32 (the kernel adds a float32 mask)"
        if attention_library(ctx.pipeline.cpu_attention) != "memopt":
            return (
                "ATen's op runs one-position attention on this machine (cpu_attention "
                f"{ctx.pipeline.cpu_attention!r}): it reads the concatenations back"
            )
        return None

    @staticmethod
    def _unsupported(
        parts: dict[str, object],
        used: list[int],
        own_lse: bool,
        backward: bool,
        bindings,
        max_head_dim: int,
    ) -> str | None:
        q, k, v, mask = (
            tensor_meta(parts[x]) if parts[x] is not None else None for x in ("q", "k", "v", "mask")
        )
        if parts["dropout"] not in (0, 0.0):
            return f"dropout {parts['dropout']} (the Triton kernel draws no random mask)"
        if any(x is None or len(x.shape) != 4 for x in (q, k, v)):
            return "operands are not 4-D (batch, heads, seq, head dim)"
        if q.dtype not in FLOAT_DTYPES or not (q.dtype == k.dtype == v.dtype):
            return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: one of fp32/fp16/bf16"
        # A symbolic head dim is judged at the example sizes; a call with a larger one
        # fails the kernel's own check and runs the fused ATen op, with a warning.
        head_dim, v_dim = (evaluate(x, bindings) for x in (q.shape[-1], v.shape[-1]))
        if head_dim > max_head_dim or head_dim != v_dim:
            return f"head dim {head_dim} (v: {v_dim}): the kernel takes equal dims up to {max_head_dim}"
        if mask is not None and (len(mask.shape) > 4 or mask.dtype not in (torch.bool, q.dtype)):
            return f"mask {mask.dtype}[{len(mask.shape)} dims]: bool or {q.dtype}, at most 4 dims"
        if not own_lse:
            if backward:
                return "CUDA fused backward: it reads its own forward's logsumexp layout"
            if any(i > 0 for i in used):
                return "the backward reads this op's own logsumexp layout and RNG state"
        return None
