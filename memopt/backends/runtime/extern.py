"""Faster ways to run some ATen calls on the CPU, with the same results.

Matmuls and softmaxes whose large outputs go into kept, huge-page memory:

ATen's `mm`, `bmm`, `addmm` and `baddbmm` allocate their result in fresh memory on every
call. For a large result, faulting that memory in costs a tenth of the matmul (GPT-2's LM
head, backends/memory.py). `KeptOutputMatmul` calls the op's `out=` overload (the same
BLAS call ATen's functional op makes, so the same values) into memory from
`memory.KeptMemory`: the previous call's result once nothing holds it, else fresh memory
with the huge-page hint. `KeptOutputSoftmax` does the same for `_softmax` (a lone softmax
the fusion pass left to ATen, Feature.LIBRARY_SOFTMAX).

Row scatter-adds as `index_add`: AOTAutograd decomposes an embedding's backward into
`index_put(zeros, [indices], grad, accumulate=True)`, which ATen's CPU kernel runs one
element at a time (8192x512 table, 1024 rows added: 3.5 ms; `index_add` 0.6 ms, eager's
`embedding_dense_backward` 0.7 ms, measured). `RowScatterAdd` runs an index_put that adds
whole rows along the first dimension as the functional `index_add` (the same sums, each
row's in index order). Negative or out-of-range indices, which index_add refuses, go to
index_put, which wraps or raises as eager does.

Rows written in place: a KV cache's update in a decode step is `index_put_(cache, [None,
None, positions], values)`, through ATen's generic indexing (3-4 us a call with the graph's
shapes). `RowWrite` copies the rows in one C call through the native launcher
(backends/cpp/rows.py), bound to the layouts of its first call, and so is one launch on a
decode step's tape (runtime/tape.py): contiguous tensors of one dtype, one int64 index
tensor on one dimension after only None indices. An index outside the dimension, which
ATen raises on, goes to ATen's op; negative ones count from the end, as in ATen.

`plan_library_calls(gm)` points the graph's matmul and softmax nodes whose result can reach
`memory.LARGE_NBYTES`, its accumulating single-index index_puts and its row-writing
in-place ones at one each. A node
keeps its metadata, so it stays a kernel, the same kernel, to the cost model and the timer.
Anything but plain CPU tensors of one dtype (fake tensors, a GPU, autograd recording, mixed
dtypes) takes the ATen op as it was.
"""

from __future__ import annotations

import math

import torch
import torch.fx

from memopt.backends import memory
from memopt.backends.cpp import launcher
from memopt.backends.cpp import rows as rows_kernel
from memopt.backends.runtime.causal_attention import describe as describe_causal
from memopt.backends.runtime.causal_attention import point_causal_attention
from memopt.backends.runtime.decode_attention import describe as describe_attention
from memopt.backends.runtime.decode_attention import point_decode_attention
from memopt.backends.runtime.gemm import describe as describe_gemms
from memopt.backends.runtime.gemm import point_gemms
from memopt.backends.runtime.gemv import describe as describe_gemvs
from memopt.backends.runtime.gemv import point_gemvs
from memopt.backends.runtime.linear import PLAIN_TENSORS as _PLAIN
from memopt.backends.runtime.linear import launchable
from memopt.compiler.cost import Cost, op_flops, read_bytes
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
            type(a) in _PLAIN
            and type(b) in _PLAIN
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
            if not (type(bias) in _PLAIN and bias.is_cpu and bias.dtype == a.dtype):
                return self.op(*args, **kwargs)
            if torch.is_grad_enabled() and bias.requires_grad:
                return self.op(*args, **kwargs)
        out = self._memory.empty(0, shape, _contiguous(shape), a.dtype, nbytes)
        return self.out_op(*args, **kwargs, out=out)


class IntoSlice:
    """Callable target for a library call that writes its result straight into its slice of
    a concatenation (the concat pass): `into(*args, **kwargs)` allocates the concatenation's
    buffer (static, contiguous `shape`), calls `out_op(*args, **kwargs, out=<the slice
    [start, start + length) along dim>)` and returns the whole buffer, whose other elements
    the graph writes next (a slice_scatter the inplace pass makes a write into the view)."""

    memopt_kind = "extern"
    memopt_fresh = True  # the buffer is new memory no other value aliases

    def __init__(
        self,
        op: torch._ops.OpOverload,
        out_op: torch._ops.OpOverload,
        shape: tuple[int, ...],
        dim: int,
        start: int,
        length: int,
    ) -> None:
        self.op, self.out_op = op, out_op
        self.shape, self.dim, self.start, self.length = shape, dim, start, length
        self.__name__ = f"{op.__name__}_into_slice"
        self.memopt_name = f"{op} into a slice"

    def __repr__(self) -> str:
        return f"IntoSlice({self.op}, dim={self.dim}, [{self.start}:{self.start + self.length}])"

    def memopt_cost(self, node: torch.fx.Node) -> Cost:
        """The library call's own cost: its inputs read once, its result (the slice)
        written once."""
        meta = tensor_meta(node)
        written = meta.numel / meta.shape[self.dim] * self.length
        return Cost(
            read=read_bytes(node, [a for a in node.all_input_nodes if tensor_meta(a) is not None]),
            write=written * meta.itemsize,
            flops=op_flops(node, self.op),
        )

    def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
        first = next(a for a in args if isinstance(a, torch.Tensor))
        buffer = first.new_empty(self.shape)
        self.out_op(*args, **kwargs, out=buffer.narrow(self.dim, self.start, self.length))
        return buffer


class KeptOutputSoftmax:
    """Callable target standing for `_softmax(x, dim, half_to_float)` (module doc)."""

    memopt_kind = "extern"
    __name__ = "_softmax.default"
    memopt_name = "aten._softmax.default"

    def __init__(self) -> None:
        self._memory = memory.KeptMemory()

    def __repr__(self) -> str:
        return "KeptOutputSoftmax(aten._softmax.default)"

    def __call__(self, x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
        if (
            type(x) is torch.Tensor
            and x.is_cpu
            and not half_to_float
            and x.dtype in (torch.float32, torch.float64)
            and not (torch.is_grad_enabled() and x.requires_grad)
        ):
            nbytes = x.numel() * x.dtype.itemsize
            if nbytes >= memory.LARGE_NBYTES:  # ATen's result: contiguous, x's shape
                shape = tuple(x.shape)
                out = self._memory.empty(0, shape, _contiguous(shape), x.dtype, nbytes)
                return aten._softmax.out(x, dim, half_to_float, out=out)
        return aten._softmax.default(x, dim, half_to_float)


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for n in reversed(shape):
        stride.append(step)
        step *= max(n, 1)
    return tuple(reversed(stride))


class RowScatterAdd:
    """Callable target standing for `index_put(x, [rows], values, accumulate=True)`."""

    memopt_kind = "extern"
    __name__ = "index_put.default"
    memopt_name = "aten.index_put.default"

    def __repr__(self) -> str:
        return "RowScatterAdd(aten.index_put.default)"

    def __call__(
        self, x: torch.Tensor, indices: list, values: torch.Tensor, accumulate: bool = False
    ) -> torch.Tensor:
        rows = indices[0] if len(indices) == 1 else None
        if (
            accumulate
            and type(x) is torch.Tensor
            and type(rows) is torch.Tensor
            and type(values) is torch.Tensor
            and x.is_cpu
            and x.dim() >= 1
            and x.is_floating_point()
            and values.dtype == x.dtype
            and rows.dtype in (torch.int64, torch.int32)
            and values.shape == (*rows.shape, *x.shape[1:])
            and not (torch.is_grad_enabled() and (x.requires_grad or values.requires_grad))
        ):
            try:
                return torch.index_add(x, 0, rows.reshape(-1), values.reshape(-1, *x.shape[1:]))
            except (RuntimeError, IndexError):
                pass  # a negative or out-of-range index: index_put wraps it or raises
        return aten.index_put.default(x, indices, values, accumulate)


class RowWrite:
    """Callable target standing for `index_put_(x, [None] * dim + [positions], values)`
    (module doc): the rows through one native launch where it takes the operands."""

    memopt_kind = "extern"
    __name__ = "index_put_.default"
    memopt_name = "aten.index_put_.default"

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.destinations = {0: 0}  # its output is its first argument, written in place
        # bound to the layouts of its first call, or False where it took none (ATen's op)
        self._launch: object | None = None

    def __repr__(self) -> str:
        return f"RowWrite(aten.index_put_.default, dim={self.dim})"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_launch": None}  # a launch is bound anew, not copied

    def __call__(
        self, x: torch.Tensor, indices: list, values: torch.Tensor, accumulate: bool = False
    ) -> torch.Tensor:
        if not accumulate and len(indices) == self.dim + 1:
            operands = (x, indices[self.dim], values)
            plain = launchable(operands)
            if self._launch is None and plain:
                self._launch = self._bind(x, indices, values) or False
            if self._launch and plain and not _records(x, values):
                if self._launch(*operands) == 0:
                    return x
        return aten.index_put_.default(x, indices, values, accumulate)

    def _bind(self, x: torch.Tensor, indices: list, values: torch.Tensor) -> object | None:
        index, dim = indices[self.dim], self.dim
        rows = (*x.shape[:dim], index.shape[0] if index.dim() == 1 else -1, *x.shape[dim + 1 :])
        if (
            any(i is not None for i in indices[:dim])
            or not (x.is_cpu and index.is_cpu and values.is_cpu)
            or index.dtype != torch.int64
            or index.dim() != 1
            or values.dtype != x.dtype
            or tuple(values.shape) != rows
            or not (x.is_contiguous() and values.is_contiguous() and index.is_contiguous())
            or x.is_conj()
            or values.is_conj()
            or _records(x, values)
        ):
            return None
        outer = math.prod(x.shape[:dim])
        row_bytes = math.prod(x.shape[dim + 1 :]) * x.element_size()
        scalars = (outer, x.shape[dim], index.shape[0], row_bytes)
        return launcher.bind_layouts(rows_kernel.packed_address(), (x, index, values), 0, scalars)


def _records(x: torch.Tensor, values: torch.Tensor) -> bool:
    """Autograd records this write: ATen's op does it."""
    return torch.is_grad_enabled() and (x.requires_grad or values.requires_grad)


def point_libraries(
    gm: torch.fx.GraphModule,
    cpu_gemm: str = "aten",
    cpu_gemv: str = "aten",
    cpu_attention: str = "aten",
) -> int:
    """Point `gm`'s float32 CPU mm and addmm nodes of a few rows at a StreamingGemv where
    `cpu_gemv` says memopt (runtime/gemv.py), its other float32 CPU mm and addmm nodes at
    a OneDnnMatmul where `cpu_gemm` says oneDNN (runtime/gemm.py), its one-position CPU
    attentions at a DecodeAttention and its causal ones at a CausalAttention where
    `cpu_attention` says memopt (runtime/decode_attention.py, runtime/causal_attention.py);
    returns how many. The caller recompiles `gm`."""
    changed = point_gemvs(gm, cpu_gemv)
    changed += point_gemms(gm, cpu_gemm)
    changed += point_decode_attention(gm, cpu_attention)
    return changed + point_causal_attention(gm, cpu_attention)


def describe_libraries(
    gm: torch.fx.GraphModule, cpu_gemm: str, cpu_gemv: str, cpu_attention: str
) -> str:
    """What of `gm` runs on another library than ATen and why ("" for nothing): the
    verbose line of `point_libraries`' work."""
    described = (
        describe_gemvs(gm, cpu_gemv),
        describe_gemms(gm, cpu_gemm),
        describe_attention(gm, cpu_attention),
        describe_causal(gm, cpu_attention),
    )
    return "; ".join(d for d in described if d)


def plan_library_calls(
    gm: torch.fx.GraphModule,
    cpu_gemm: str = "aten",
    cpu_gemv: str = "aten",
    cpu_attention: str = "aten",
) -> int:
    """`point_libraries`, then point `gm`'s other CPU matmuls and softmaxes whose result
    can be large at a KeptOutputMatmul or KeptOutputSoftmax, and its accumulating
    single-index index_puts at a RowScatterAdd; returns how many nodes changed, and
    recompiles `gm` if any did. Call before the graph's kernels start compiling: "auto" may
    time the libraries."""
    changed = point_libraries(gm, cpu_gemm, cpu_gemv, cpu_attention)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        device = getattr(node.meta.get("val"), "device", None)
        if device is not None and device.type != "cpu":
            continue
        if node.target in _MATMULS and _can_be_large(node):
            node.target = KeptOutputMatmul(node.target)
        elif node.target is aten._softmax.default and _can_be_large(node):
            node.target = KeptOutputSoftmax()
        elif node.target is aten.index_put.default and _adds_rows(node):
            node.target = RowScatterAdd()
        elif node.target is aten.index_put_.default and _writes_rows(node) is not None:
            node.target = RowWrite(_writes_rows(node))
        else:
            continue
        changed += 1
    if changed:
        gm.recompile()
    return changed


def _can_be_large(node: torch.fx.Node) -> bool:
    meta = tensor_meta(node)
    if meta is None:
        return False
    try:
        return evaluate(meta.nbytes, {}) >= memory.LARGE_NBYTES
    except ValueError:
        return True  # a symbolic size: decided at run time


def _writes_rows(node: torch.fx.Node) -> int | None:
    """index_put_(x, [None] * dim + [index tensor], values) without accumulating: its dim,
    the call RowWrite may run; else None."""
    args = list(node.args) + [node.kwargs.get("accumulate", False)] * (4 - len(node.args))
    indices, accumulate = args[1], args[3]
    if accumulate is not False or not isinstance(indices, (list, tuple)) or not indices:
        return None
    *before, last = indices
    if any(i is not None for i in before) or not isinstance(last, torch.fx.Node):
        return None
    return len(before)


def _adds_rows(node: torch.fx.Node) -> bool:
    """index_put(x, [one index tensor], values, True): the call RowScatterAdd may run."""
    args = list(node.args) + [node.kwargs.get("accumulate", False)] * (4 - len(node.args))
    indices, accumulate = args[1], args[3]
    return (
        accumulate is True
        and isinstance(indices, (list, tuple))
        and len(indices) == 1
        and isinstance(indices[0], torch.fx.Node)
    )
