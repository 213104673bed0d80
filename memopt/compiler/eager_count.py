"""The eager byte counter: what eager PyTorch moves, *counted* by running the program.

A TorchDispatchMode sees every ATen op eager executes (after autograd, so the backward's
ops too). For each it adds the bytes of its tensor inputs and outputs by the rules of the
cost model (docs/architecture.md): each distinct input's touched elements once (a broadcast
input counts its real elements), each output once; views and allocations move nothing;
gathers read at most one table element per output element (an embedding's table is its
argument 0, `weight`, as for every gather); `copy_` reads only its source; ops that take a
tensor only for its shape (ones_like, new_zeros, ...) read nothing; an in-place partial
update (index_put_, scatter_, index_add_, ... from `x[idx] = v`) reads its indices and
values and writes only the elements it updates (reading them too when it accumulates);
any other in-place op reads and writes its mutated argument once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from memopt.compiler.aten_ops import (
    EAGER_FREE_OPS,
    GATHERS,
    PARTIAL_UPDATES,
    SHAPE_ONLY_OPS,
    WRITE_ONLY_OPS,
    indexed_numel,
    update_accumulates,
)
from memopt.compiler.capture import backward_seeds, clone_inputs, restore_grads, saved_grads
from memopt.compiler.graph import touched_elements

aten = torch.ops.aten


def _read_nbytes(tensor: torch.Tensor) -> int:
    return int(touched_elements(tensor.shape, tensor.stride())) * tensor.element_size()


def _key(tensor: torch.Tensor) -> tuple:
    return (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def _tensors(values: object) -> list[torch.Tensor]:
    found: dict[tuple, torch.Tensor] = {}
    for leaf in pytree.tree_leaves(values):
        if isinstance(leaf, torch.Tensor):
            found.setdefault(_key(leaf), leaf)
    return list(found.values())


@dataclass
class OpBytes:
    calls: int = 0
    read_bytes: int = 0
    write_bytes: int = 0


class ByteCounter(TorchDispatchMode):
    """Counts the bytes every executed ATen op reads and writes."""

    def __init__(self) -> None:
        super().__init__()
        self.read_bytes = 0
        self.write_bytes = 0
        self.ops = 0
        self.by_op: dict[str, OpBytes] = {}
        self.records: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in EAGER_FREE_OPS or func.is_view:
            return out
        read, write = self._count(func, args, kwargs, out)
        name = str(func)
        self.read_bytes += read
        self.write_bytes += write
        self.ops += 1
        entry = self.by_op.setdefault(name, OpBytes())
        entry.calls += 1
        entry.read_bytes += read
        entry.write_bytes += write
        self.records.append((name, read, write))
        return out

    def _count(self, func, args, kwargs, out) -> tuple[int, int]:  # noqa: ANN001
        if func is aten._local_scalar_dense.default:
            return args[0].element_size(), 0  # .item(): reads one element
        mutated = self._mutated(func, args, kwargs)
        inputs = _tensors((args, kwargs))
        if func is aten.copy_.default:
            return _read_nbytes(args[1]), args[0].numel() * args[0].element_size()
        if func in SHAPE_ONLY_OPS:
            return 0, sum(t.numel() * t.element_size() for t in _tensors(out))
        if func in PARTIAL_UPDATES and func._schema.is_mutable:
            target = args[0]
            updated = _updated_elements(func, args) * target.element_size()
            read = sum(_read_nbytes(t) for t in inputs if _key(t) != _key(target))
            if update_accumulates(func, args, kwargs):
                read += updated
            return read, updated
        if func in WRITE_ONLY_OPS:
            inputs = [t for t in inputs if _key(t) not in {_key(m) for m in mutated}]
        if func in GATHERS:
            source = args[0]  # the table (embedding's weight is its first argument too)
            outputs = _tensors(out)
            written = sum(t.numel() for t in outputs)
            others = [t for t in inputs if _key(t) != _key(source)]
            read = sum(_read_nbytes(t) for t in others)
            read += min(_read_nbytes(source), written * source.element_size())
        else:
            read = sum(_read_nbytes(t) for t in inputs)
        outputs = {_key(t): t for t in _tensors(out)}
        for tensor in mutated:  # an in-place op writes its argument once, returned or not
            outputs.setdefault(_key(tensor), tensor)
        write = sum(t.numel() * t.element_size() for t in outputs.values())
        return read, write

    @staticmethod
    def _mutated(func, args, kwargs) -> list[torch.Tensor]:  # noqa: ANN001
        mutated = []
        schema = func._schema
        for position, argument in enumerate(schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            if argument.kwarg_only or position >= len(args):
                value = kwargs.get(argument.name)
            else:
                value = args[position]
            mutated.extend(_tensors(value))
        return mutated


def _updated_elements(func, args) -> int:  # noqa: ANN001
    """Elements an in-place partial update writes (every index counts, repeated or not)."""
    spec = PARTIAL_UPDATES[func]
    if spec.updated_arg is not None:
        return args[spec.updated_arg].numel()
    shapes: list[tuple[int, ...] | None] = []
    for index in args[1]:
        if index is None:
            shapes.append(None)
        elif index.dtype in (torch.bool, torch.uint8):  # a mask: its true elements, its dims
            shapes.append((int(index.count_nonzero()),))
            shapes.extend([()] * (index.dim() - 1))
        else:
            shapes.append(tuple(index.shape))
    return int(indexed_numel(args[0].shape, shapes))


@dataclass(frozen=True)
class EagerCount:
    """Bytes eager PyTorch moved running a program (counted)."""

    read_bytes: int
    write_bytes: int
    ops: int
    by_op: dict[str, OpBytes] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.read_bytes + self.write_bytes


def count_eager_bytes(
    fn: Callable, example_inputs: Sequence[object], training: bool = False
) -> EagerCount:
    """Run `fn(*example_inputs)` eagerly (and its backward when training) and count bytes.

    Runs on copies of the inputs; a module's parameters keep their gradients.
    """
    inputs = clone_inputs(example_inputs)
    saved = saved_grads(fn)
    counter = ByteCounter()
    try:
        with torch.enable_grad() if training else torch.no_grad(), counter:
            output = fn(*inputs)
            if training:
                outs, seeds = backward_seeds(output)
                torch.autograd.backward(outs, grad_tensors=seeds)
    finally:
        restore_grads(saved)
    return EagerCount(counter.read_bytes, counter.write_bytes, counter.ops, dict(counter.by_op))
