"""Classes of ATen ops: what each kind of op is to memopt, defined once.

The cost model, the eager byte counter, lowering, the passes and the partitioner all ask
these questions ("is it a matmul?", "does it draw random numbers?", "is its result a graph
output?"); they ask them here, so that adding an op to a class changes every answer.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
# Ops that take a tensor argument only for its size, dtype and device: they read none of
# its elements (autograd's seed `ones_like(output)`, a backward's `new_zeros(grad, size)`).
SHAPE_ONLY_OPS = frozenset(
    {
        aten.ones_like.default,
        aten.zeros_like.default,
        aten.full_like.default,
        aten.new_zeros.default,
        aten.new_ones.default,
        aten.new_full.default,
        aten.rand_like.default,
        aten.randn_like.default,
        aten.randint_like.default,
        aten.randint_like.low_dtype,
    }
)
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

# -- partial updates ----------------------------------------------------------------------


@dataclass(frozen=True)
class PartialUpdate:
    """An op whose result is its argument 0 with some elements replaced (or accumulated
    into); every other element passes through unchanged.

    updated_arg: the argument with as many elements as the op updates (scatter's index,
    index_add's source, slice_scatter's src; functional copy's self, all of which it
    replaces by its broadcast src); None for index_put, whose updated elements
    are the region its index list (argument 1) selects: `indexed_numel`.
    accumulates: the update reads the elements it writes (add or reduce into them);
    index_put says so in its argument 3, `accumulate`.
    """

    updated_arg: int | None
    accumulates: bool = False


_INDEX_PUT = PartialUpdate(updated_arg=None)
_SCATTER = PartialUpdate(updated_arg=2)
_SCATTER_REDUCE = PartialUpdate(updated_arg=2, accumulates=True)
_INTO_VIEW = PartialUpdate(updated_arg=1)
PARTIAL_UPDATES: dict[torch._ops.OpOverload, PartialUpdate] = {
    aten.copy.default: PartialUpdate(updated_arg=0),
    aten.index_put.default: _INDEX_PUT,
    aten.index_put_.default: _INDEX_PUT,
    aten._index_put_impl_.default: _INDEX_PUT,
    aten._unsafe_index_put.default: _INDEX_PUT,
    aten.scatter.src: _SCATTER,
    aten.scatter.value: _SCATTER,
    aten.scatter_.src: _SCATTER,
    aten.scatter_.value: _SCATTER,
    aten.scatter.reduce: _SCATTER_REDUCE,
    aten.scatter.value_reduce: _SCATTER_REDUCE,
    aten.scatter_.reduce: _SCATTER_REDUCE,
    aten.scatter_.value_reduce: _SCATTER_REDUCE,
    aten.scatter_add.default: _SCATTER_REDUCE,
    aten.scatter_add_.default: _SCATTER_REDUCE,
    aten.scatter_reduce.two: _SCATTER_REDUCE,
    aten.scatter_reduce_.two: _SCATTER_REDUCE,
    aten.index_add.default: PartialUpdate(updated_arg=3, accumulates=True),
    aten.index_add_.default: PartialUpdate(updated_arg=3, accumulates=True),
    aten.index_copy.default: PartialUpdate(updated_arg=3),
    aten.index_copy_.default: PartialUpdate(updated_arg=3),
    aten.slice_scatter.default: _INTO_VIEW,
    aten.select_scatter.default: _INTO_VIEW,
    aten.diagonal_scatter.default: _INTO_VIEW,
    aten.as_strided_scatter.default: _INTO_VIEW,
}
# The view whose elements each *_scatter op replaces, taking the scatter's arguments after
# src: slice_scatter(x, src, dim, start, end, step) writes slice(x, dim, start, end, step).
SCATTER_VIEWS = {
    aten.slice_scatter.default: aten.slice.Tensor,
    aten.select_scatter.default: aten.select.int,
    aten.diagonal_scatter.default: aten.diagonal.default,
    aten.as_strided_scatter.default: aten.as_strided.default,
}


def update_accumulates(target: object, args: Sequence[object], kwargs: Mapping) -> bool:
    """The partial update `target(*args, **kwargs)` reads the elements it updates."""
    spec = PARTIAL_UPDATES[target]
    if spec.updated_arg is None:  # index_put: (self, indices, values, accumulate=False)
        return bool(args[3] if len(args) > 3 else kwargs.get("accumulate", False))
    return spec.accumulates


def indexed_numel(base_shape: Sequence, index_shapes: Sequence[Sequence | None]):  # noqa: ANN201
    """Elements of `base[indices]`: the broadcast shape of the index tensors times the
    dimensions no index covers (a None index, or past the last). Integer indices only: a
    boolean mask covers as many dimensions as it has, with a data-dependent count.
    Works on ints and on sympy sizes (a size that is not the literal 1 wins a broadcast)."""
    covered = [k for k, shape in enumerate(index_shapes) if shape is not None]
    rank = max((len(index_shapes[k]) for k in covered), default=0)
    broadcast = [1] * rank
    for k in covered:
        shape = list(index_shapes[k])
        for dim, size in enumerate(shape, start=rank - len(shape)):
            if broadcast[dim] == 1:
                broadcast[dim] = size
    count = 1
    for size in broadcast:
        count = count * size
    for dim, size in enumerate(base_shape):
        if dim not in covered:
            count = count * size
    return count


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
