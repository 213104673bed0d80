"""Library matmuls whose large outputs go into kept, huge-page memory (on the CPU).

ATen's `mm`, `bmm`, `addmm` and `baddbmm` allocate their result in fresh memory on every
call. For a large result, faulting that memory in costs a tenth of the matmul (GPT-2's LM
head, backends/memory.py). `KeptOutputMatmul` calls the op's `out=` overload (the same
BLAS call ATen's functional op makes, so the same values) into memory from
`memory.KeptMemory`: the previous call's result once nothing holds it, else fresh memory
with the huge-page hint.

`keep_matmul_outputs(gm)` points the graph's matmul nodes whose result can reach
`memory.LARGE_NBYTES` at one each. The node keeps its metadata, so it stays a kernel, the
same kernel, to the cost model and the timer. Anything but plain CPU tensors of one dtype
(fake tensors, a GPU, autograd recording, mixed dtypes) takes the functional op.
"""

from __future__ import annotations

import torch
import torch.fx

from memopt.backends import memory
from memopt.compiler.graph import evaluate, tensor_meta

aten = torch.ops.aten

# op -> (its out= overload, the positions of the two matrix operands)
_MATMULS = {
    aten.mm.default: (aten.mm.out, 0, 1),
    aten.bmm.default: (aten.bmm.out, 0, 1),
    aten.addmm.default: (aten.addmm.out, 1, 2),
    aten.baddbmm.default: (aten.baddbmm.out, 1, 2),
}


class KeptOutputMatmul:
    """Callable target standing for one matmul node: `op(*args, **kwargs)` (module doc)."""

    memopt_kind = "extern"

    def __init__(self, op: torch._ops.OpOverload) -> None:
        self.op = op
        self.out_op, self._a, self._b = _MATMULS[op]
        self.__name__ = op.__name__
        self.memopt_name = str(op)
        self._memory = memory.KeptMemory()

    def __repr__(self) -> str:
        return f"KeptOutputMatmul({self.op})"

    def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
        a, b = args[self._a], args[self._b]
        if not (
            type(a) is torch.Tensor
            and type(b) is torch.Tensor
            and a.is_cpu
            and b.dtype == a.dtype
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
        ):
            return self.op(*args, **kwargs)
        shape = (*a.shape[:-1], b.shape[-1])
        nbytes = a.dtype.itemsize
        for n in shape:
            nbytes *= n
        if nbytes < memory.LARGE_NBYTES:
            return self.op(*args, **kwargs)
        if self._a:  # addmm, baddbmm: the added input must be a plain CPU tensor too
            bias = args[0]
            if not (type(bias) is torch.Tensor and bias.is_cpu and bias.dtype == a.dtype):
                return self.op(*args, **kwargs)
            if torch.is_grad_enabled() and bias.requires_grad:
                return self.op(*args, **kwargs)
        out = self._memory.empty(0, shape, _contiguous(shape), a.dtype, nbytes)
        return self.out_op(*args, **kwargs, out=out)


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for n in reversed(shape):
        stride.append(step)
        step *= max(n, 1)
    return tuple(reversed(stride))


def keep_matmul_outputs(gm: torch.fx.GraphModule) -> int:
    """Point the CPU matmul nodes of `gm` whose result can be large at a KeptOutputMatmul;
    returns how many. Call after the graph's other runtime planning (it changes targets)."""
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _MATMULS:
            continue
        meta = tensor_meta(node)
        device = getattr(node.meta.get("val"), "device", None)
        if meta is None or (device is not None and device.type != "cpu"):
            continue
        try:
            nbytes = evaluate(meta.nbytes, {})
        except ValueError:
            nbytes = None  # a symbolic size: decided at run time
        if nbytes is not None and nbytes < memory.LARGE_NBYTES:
            continue
        node.target = KeptOutputMatmul(node.target)
        changed += 1
    if changed:
        gm.recompile()
    return changed
