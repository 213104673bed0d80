"""The precision pass's call targets: matmuls and embedding lookups over narrow weights.

`QuantizedMatmul` (`x @ W^T` for an `mm` whose weight operand is a parameter) and
`QuantizedEmbedding` (rows of a table gathered by index) read a `QuantizedParameter`: the
narrow copy of one parameter (backends/narrow.py has the formats), shared by every node
that reads it. They take the original parameter as an argument but do not read it: they
check that it is the tensor they quantized, unchanged (its identity, memory and version
counter), and quantize it again if not, so a changed weight is never served stale. Fake tensors
(shape propagation) get a result of the right shape; `exact = True` computes with the
original weight (the precision pass measures each weight's share of the error that way).

The matmul runs the dequantizing kernel of the backend the pass chose for the graph's
device (`Backend.quantized_matmul`): on the CPU the C++ GEMV (backends/cpp/quantized.py),
on GPUs (and under Triton's interpreter) the Triton tile loop (backends/triton/quantized.py).
"""

from __future__ import annotations

import weakref

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor

from memopt.backends.narrow import QuantizedWeight, quantize
from memopt.backends.registry import Backend
from memopt.backends.runtime.linear import launchable
from memopt.compiler.cost import Cost, read_bytes
from memopt.compiler.graph import numel, tensor_meta


class QuantizedParameter:
    """One parameter's narrow copy, shared by every node that reads the parameter (a tied
    embedding and output layer), quantized again if the parameter changes."""

    def __init__(
        self,
        parameter: torch.Tensor,
        kind: str,
        group: int,
        transposed: bool,
        label: str,
        int8_activations: bool = False,
    ) -> None:
        self.kind, self.group, self.label = kind, group, label
        self.int8_activations = int8_activations  # how matmuls multiply it (`matmul`)
        # The parameter is (K, N) as mm takes it when `transposed`; W is (N, K) either way.
        self.transposed = transposed
        self._quantize(parameter)

    def _quantize(self, parameter: torch.Tensor) -> None:
        matrix = parameter.t() if self.transposed else parameter
        self.weight = quantize(matrix, self.kind, self.group)
        self._source = weakref.ref(parameter)
        self._version = parameter._version
        self._address = parameter.data_ptr()

    def current(self, parameter: torch.Tensor) -> QuantizedWeight:
        """The narrow weight of `parameter` as it is now: quantized again if it is another
        tensor, has other memory (`p.data = t`) or was written in place (its version
        counter: optimizer steps, `copy_`, `load_state_dict`). Writes through `p.data`
        (`p.data.copy_(t)`) bump no counter of `p`'s and are not seen, as with any weight
        transformed at compile time: compile again after them."""
        if (
            parameter is not self._source()
            or parameter._version != self._version
            or parameter.data_ptr() != self._address
        ):
            self._quantize(parameter)
        return self.weight


_FLOAT32, _CPU = torch.float32, torch.device("cpu")


def _fake(value: torch.Tensor) -> bool:
    return isinstance(value, FakeTensor) or value.device.type == "meta"


class _NarrowTarget:
    """What both targets share: the parameter's narrow copy, the name reports show
    ("memopt.int8_matmul"), and `exact` (compute with the original weight)."""

    memopt_kind = "extern"
    operation = ""

    def __init__(self, parameter: QuantizedParameter) -> None:
        self.parameter = parameter
        self.exact = False
        self.__name__ = f"{parameter.kind}_{self.operation}"
        self.memopt_name = f"memopt.{self.__name__}"
        self.memopt_ops = (self.memopt_name,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.parameter.kind}, {self.parameter.label})"


class QuantizedMatmul(_NarrowTarget):
    """Callable target: `qmm(x, w[, bias])` = `mm(x, w.t()) (+ bias)` (or `mm(x, w)` for a
    (K, N) parameter), x (M, K) float32, with w read as its narrow copy; the bias (N,), when
    the pass folded the add after the mm in, added as the kernel stores each output."""

    operation = "matmul"

    def __init__(self, parameter: QuantizedParameter, backend: Backend) -> None:
        super().__init__(parameter)
        self.backend = backend
        # The CPU GEMM library for many rows' dequantized tiles: set with the graph's other
        # GEMMs (runtime/gemm.py `point_gemms`).
        self.gemm = "aten"
        # (weight, launch, M, N, stored tensors): the backend's native launch for the
        # operands' layouts of the last call (`Backend.quantized_launch`), for that narrow
        # weight: the next call with those layouts is one C call, not the Python of `matmul`
        # and a ctypes call (about 3 us less; a decode step makes 17-29 of them).
        self._launch: tuple | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_launch": None}  # a launch is bound anew, not copied

    def memopt_cost(self, node: torch.fx.Node) -> Cost:
        """x (and the bias) read once, the narrow weight once, the output written once."""
        x, out = node.args[0], tensor_meta(node)
        m = tensor_meta(x).shape[0]
        weight = self.parameter.weight
        return Cost(
            read=read_bytes(node, [x, *node.args[2:]]) + weight.nbytes,
            write=out.nbytes,
            flops=2 * m * weight.rows * weight.cols,
        )

    def __call__(
        self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if _fake(x) or self.exact:
            y = torch.mm(x, w if self.parameter.transposed else w.t())
            return y if bias is None else y + bias
        weight = self.parameter.current(w)
        bound = self._launch
        if bound is not None and bound[0] is weight and bound[1] == (bias is not None):
            _, _, launch, m, n, stored = bound
            operands = (x,) if bias is None else (x, bias)
            if launchable(operands):
                out = torch.empty((m, n), dtype=_FLOAT32, device=_CPU)
                if launch(*operands, *stored, out) == 0:
                    return out
        int8 = self.parameter.int8_activations
        out = self.backend.quantized_matmul(x, weight, int8, bias, self.gemm)
        bind = self.backend.quantized_launch
        if bind is not None and x.device.type == "cpu" and x.dtype == _FLOAT32:
            made = bind(x, weight, int8, bias)
            stored = (weight.data,) if weight.scale is None else (weight.data, weight.scale)
            self._launch = None if made is None else (weight, bias is not None, *made, stored)
        return out


class QuantizedEmbedding(_NarrowTarget):
    """Callable target: `qembedding(w, index)` = `w[index]` (`wraps`: a negative index
    counts from the end, as indexing does) or `index_select(w, 0, index)` (not `wraps`: a
    negative index raises, as index_select and embedding do), read from w's narrow copy (by
    the backend's gather where it has one, `Backend.quantized_gather`)."""

    operation = "embedding"

    def __init__(
        self, parameter: QuantizedParameter, backend: Backend | None = None, wraps: bool = True
    ) -> None:
        super().__init__(parameter)
        self.backend = backend
        self.wraps = wraps
        # (weight, launch, output shape, stored tensors): the backend's native launch for
        # the index's layout of the last call (`Backend.quantized_gather_launch`), for that
        # narrow weight: the next such call is one C call, not a ctypes call through
        # Python (a decode step's lookup 16 -> 3 us, and a launch a tape replays).
        self._launch: tuple | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_launch": None}  # a launch is bound anew, not copied

    def memopt_cost(self, node: torch.fx.Node) -> Cost:
        """The index read, one narrow row per index, the output written once."""
        index, out = node.args[1], tensor_meta(node)
        count = numel(tensor_meta(index).shape)
        return Cost(
            read=read_bytes(node, [index]) + count * self.parameter.weight.row_nbytes,
            write=out.nbytes,
            flops=out.numel,
        )

    def __call__(self, w: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if _fake(w) or _fake(index) or self.exact:
            if self.wraps:
                return w[index]
            return w.index_select(0, index.reshape(-1)).view(*index.shape, w.shape[1])
        weight = self.parameter.current(w)
        bound = self._launch
        if bound is not None and bound[0] is weight and launchable((index,)):
            _, launch, shape, stored = bound
            out = torch.empty(shape, dtype=_FLOAT32, device=_CPU)
            if launch(index, *stored, out) == 0:
                return out
        gather = None if self.backend is None else self.backend.quantized_gather
        rows = None
        if gather is not None:  # one C call (a decode step's int4 row: 26.5 us -> 3.8)
            rows = gather(weight, index)
            bind = self.backend.quantized_gather_launch
            if rows is not None and bind is not None:
                made = bind(weight, index, self.wraps)
                stored = (weight.data,) if weight.scale is None else (weight.data, weight.scale)
                self._launch = None if made is None else (weight, *made, stored)
        return weight.gather_rows(index, self.wraps) if rows is None else rows
