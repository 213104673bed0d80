"""Classes of ATen ops: what each kind of op is to memopt, defined once.

The cost model, the eager byte counter, lowering, the passes and the partitioner all ask
these questions ("is it a matmul?", "does it draw random numbers?", "is its result a graph
output?"); they ask them here, so that adding an op to a class changes every answer.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

aten = torch.ops.aten
prims = torch.ops.prims

# -- ops that move nothing ---------------------------------------------------------------

# Graph nodes that move no bytes and launch nothing although torch does not mark them as
# views: allocations, size queries, and tuple indexing (one output of a multi-output op).
FREE_OPS = frozenset(
    {
        aten._unsafe_view.default,
        aten.empty.memory_format,
        aten.empty_strided.default,
        aten.empty_like.default,
        aten.sym_size.int,
        aten.sym_stride.int,
        aten.sym_numel.default,
        aten.sym_storage_offset.default,
        operator.getitem,
    }
)
# Size queries: a kernel reads sizes as symbols, not the queried tensor's data.
SHAPE_QUERIES = frozenset({aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default})
# What eager PyTorch runs that moves no bytes (the eager counter sees these at run time).
EAGER_FREE_OPS = frozenset(
    {
        aten.detach.default,
        aten.alias.default,
        aten._unsafe_view.default,
        aten.lift_fresh.default,
        aten.empty.memory_format,
        aten.empty_like.default,
        aten.empty_strided.default,
        aten.new_empty.default,
        aten.new_empty_strided.default,
        aten.sym_size.int,
        aten.sym_stride.int,
        aten.sym_numel.default,
        aten.sym_storage_offset.default,
        aten.is_same_size.default,
        aten.set_.source_Storage_storage_offset,
    }
)
# Ops that write their output without reading it (fill, zero).
WRITE_ONLY_OPS = frozenset({aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default})
# Ops that make a tensor from nothing but sizes and a value.
FILL_OPS = frozenset({aten.empty.memory_format, aten.full.default, aten.zeros.default})

# -- library calls (extern) --------------------------------------------------------------

MATMULS = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default})
# A matmul writing into a strided buffer (the layout pass's out= rewrite), by its op.
MATMUL_OUT_VARIANTS = {aten.mm.default: aten.mm.out, aten.bmm.default: aten.bmm.out}
# Matmuls a template kernel can compute with the pointwise ops around them.
TEMPLATE_MATMULS = frozenset({aten.mm.default, aten.bmm.default})
CONVOLUTIONS = frozenset({aten.convolution.default, aten.convolution_backward.default})
# Fused attention (kept whole by capture): reads q, k, v (and a mask), writes the output
# and the logsumexp; its backward recomputes the scores blockwise. No score matrix in memory.
ATTENTION_FORWARD = frozenset(
    {
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_flash_attention.default,
    }
)
ATTENTION_BACKWARD = frozenset(
    {
        aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
        aten._scaled_dot_product_efficient_attention_backward.default,
        aten._scaled_dot_product_flash_attention_backward.default,
    }
)
# Ops that run as library calls and are never lowered to generated kernels: inputs read
# once, outputs written once.
EXTERN_OPS = frozenset(
    {
        *MATMULS,
        *MATMUL_OUT_VARIANTS.values(),
        *CONVOLUTIONS,
        *ATTENTION_FORWARD,
        *ATTENTION_BACKWARD,
    }
)

# -- gathers -----------------------------------------------------------------------------

# Gathers read their table (argument 0) at most once per output element.
GATHERS = frozenset(
    {
        aten.index_select.default,
        aten.index.Tensor,
        aten._unsafe_index.Tensor,
        aten.gather.default,
        aten.embedding.default,
    }
)

# -- properties of one node --------------------------------------------------------------


def _overload(node: torch.fx.Node) -> torch._ops.OpOverload | None:
    target = node.target
    return target if isinstance(target, torch._ops.OpOverload) else None


def is_random(node: torch.fx.Node) -> bool:
    """The op draws random numbers: each call differs, so it is never merged, copied or
    recomputed without its generator state."""
    target = _overload(node)
    return target is not None and torch.Tag.nondeterministic_seeded in target.tags


def is_mutating(node: torch.fx.Node) -> bool:
    """The op writes one of its arguments in place."""
    target = _overload(node)
    return target is not None and target._schema.is_mutable


def is_pointwise(node: torch.fx.Node) -> bool:
    target = _overload(node)
    return target is not None and torch.Tag.pointwise in target.tags


def is_view_op(node: torch.fx.Node) -> bool:
    """torch marks the op a view (its result aliases its first argument)."""
    target = _overload(node)
    return target is not None and target.is_view


def returns_fresh_memory(node: torch.fx.Node) -> bool:
    """An ATen op whose results are new tensors: no view, no alias annotation, no mutation."""
    target = _overload(node)
    if target is None or target.is_view:
        return False
    schema = target._schema
    return not schema.is_mutable and all(r.alias_info is None for r in schema.returns)
