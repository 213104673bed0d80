"""The reference backend: runs Kernel IR with plain torch ops.

It is the executable definition of the IR and the oracle every other backend is tested
against, so it favours exactness and clarity over speed. The domain is one broadcast grid
of int64 index tensors, shaped (*ranges, *reduction_ranges, *inner_ranges); every Value of the body
becomes one tensor over the part of that grid it depends on (a row Value, which depends on
no reduction variable, has size 1 on the reduction axes), and stores scatter through flat
views of the output tensors.

Semantics the IR docstrings leave open, settled here:

- Sub-32-bit floats (float16, bfloat16) are held in float32 between casts: a chain of ops
  keeps float32 intermediates, as a GPU kernel does. Rounding happens only at `cast`,
  `const` and `index` (to the Value dtype) and at stores, which convert the held value
  straight to the buffer dtype (an fp16 Value stored to an fp32 buffer is not rounded to
  fp16 first).
- Operands are converted to the Value's dtype before an op (torch's promotion is already
  in Value.dtype); comparisons and logical ops meet in the operands' promoted dtype.
- Every Value is evaluated before the first store, so a kernel that reads an output buffer
  (an in-place update) sees the buffer as it was when the kernel started.
- One store per output buffer (Kernel.verify); stores run in kernel order. Within one
  store, two lanes writing different values to one element is a race and raises ValueError.
- A row store (no reduction variable in its index) of a full Value raises ValueError: it
  has no single value per row. A row store runs once per row even when the reduction
  domain is empty.
- max/min over an empty reduction yield their identity (-inf/+inf, or the integer
  extremes) and argmax/argmin yield 0, where torch raises.
- An unmasked load or a store outside its buffer raises IndexError; integer division by
  zero raises as in torch, even in a lane a later `where` discards.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import sympy
import torch
from torch.utils._sympy import functions as torch_sympy

from memopt.backends.narrow import KINDS, QuantizedWeight
from memopt.backends.registry import Backend, Feature, Sizes, Tensors, register_backend
from memopt.compiler.kernel_ir import (
    INNER_REDUCE,
    Buffer,
    Kernel,
    Store,
    Value,
    compute_dtype,
    operand_dtypes,
    reduction_identity,
)

# --- dtypes ----------------------------------------------------------------------------


def _round_to(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Convert to `dtype` (rounding, for 16-bit floats) and hold the result in its compute dtype."""
    return tensor.to(dtype).to(compute_dtype(dtype))


# --- index expressions -----------------------------------------------------------------


def _natural_pow(base: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    # A negative exponent would make the index a fraction; sympy writes a/b as a*b**-1, which
    # is only meaningful under floor/ceiling (handled exactly in evaluate_index).
    if bool((exponent < 0).any()):
        raise ValueError("negative power in an integer index expression")
    return base**exponent


def _ceil_div(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    return -((-numerator) // denominator)


# torch's `//` and `%` on int64 tensors round toward -inf and take the divisor's sign, as
# Python and sympy do, so FloorDiv and Mod map onto them directly.
_INDEX_FUNCTIONS: dict[type, Callable[..., torch.Tensor]] = {
    sympy.Add: lambda *terms: functools.reduce(operator.add, terms),
    sympy.Mul: lambda *factors: functools.reduce(operator.mul, factors),
    sympy.Pow: _natural_pow,
    torch_sympy.PowByNatural: _natural_pow,
    torch_sympy.FloorDiv: operator.floordiv,  # and its subclass CleanDiv
    torch_sympy.ModularIndexing: lambda base, divisor, modulus: (base // divisor) % modulus,
    sympy.Mod: operator.mod,
    torch_sympy.Mod: operator.mod,
    torch_sympy.PythonMod: operator.mod,
    sympy.Min: lambda *args: functools.reduce(torch.minimum, args),
    sympy.Max: lambda *args: functools.reduce(torch.maximum, args),
    torch_sympy.Min: lambda *args: functools.reduce(torch.minimum, args),
    torch_sympy.Max: lambda *args: functools.reduce(torch.maximum, args),
    sympy.Abs: torch.abs,
    torch_sympy.Identity: lambda arg: arg,
}

# floor(p/q) and ceiling(p/q) of a rational expression, computed exactly as integer
# divisions of its numerator by its denominator (never through floating point).
_RATIONAL_ROUNDING: dict[type, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    sympy.floor: operator.floordiv,
    sympy.ceiling: _ceil_div,
}


def evaluate_index(
    expr: sympy.Expr,
    symbols: Mapping[str, torch.Tensor | int],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Evaluate an integer index expression exactly, on broadcasting int64 tensors.

    `symbols` maps symbol names (i<k>, r<k>, s<k>, t<k>) to ints or int64 tensors; the
    result broadcasts them. Raises NotImplementedError for a node it does not know.
    """
    expr = sympy.sympify(expr)
    if isinstance(expr, sympy.Symbol):
        if expr.name not in symbols:
            raise KeyError(f"index symbol {expr.name} has no value")
        return torch.as_tensor(symbols[expr.name], dtype=torch.int64, device=device)
    if isinstance(expr, sympy.Integer):
        return torch.tensor(int(expr), dtype=torch.int64, device=device)
    rounding = _RATIONAL_ROUNDING.get(type(expr))
    if rounding is not None:
        numerator, denominator = sympy.fraction(sympy.together(expr.args[0]))
        return rounding(
            evaluate_index(numerator, symbols, device), evaluate_index(denominator, symbols, device)
        )
    for cls in type(expr).__mro__:
        function = _INDEX_FUNCTIONS.get(cls)
        if function is not None:
            return function(*(evaluate_index(arg, symbols, device) for arg in expr.args))
    raise NotImplementedError(
        f"index expression {expr}: {type(expr).__name__} is not an integer index operation"
    )


# --- pointwise ops and reductions ------------------------------------------------------

POINTWISE_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "neg": torch.neg,
    "abs": torch.abs,
    "exp": torch.exp,
    "exp2": torch.exp2,
    "expm1": torch.expm1,
    "log": torch.log,
    "log2": torch.log2,
    "log1p": torch.log1p,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "sin": torch.sin,
    "cos": torch.cos,
    "tan": torch.tan,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "erf": torch.erf,
    "relu": torch.relu,
    "reciprocal": torch.reciprocal,
    "sign": torch.sign,
    "floor": torch.floor,
    "ceil": torch.ceil,
    "trunc": torch.trunc,
    "round": torch.round,
    "logical_not": torch.logical_not,
    "bitwise_not": torch.bitwise_not,
    "isnan": torch.isnan,
    "isinf": torch.isinf,
    "square": torch.square,
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "truediv": torch.true_divide,
    "floordiv": functools.partial(torch.div, rounding_mode="floor"),
    "truncdiv": functools.partial(torch.div, rounding_mode="trunc"),
    "remainder": torch.remainder,
    "fmod": torch.fmod,
    "pow": torch.pow,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "eq": torch.eq,
    "ne": torch.ne,
    "lt": torch.lt,
    "le": torch.le,
    "gt": torch.gt,
    "ge": torch.ge,
    "logical_and": torch.logical_and,
    "logical_or": torch.logical_or,
    "logical_xor": torch.logical_xor,
    "bitwise_and": torch.bitwise_and,
    "bitwise_or": torch.bitwise_or,
    "bitwise_xor": torch.bitwise_xor,
    "atan2": torch.atan2,
    "where": torch.where,
}
"""Kernel IR pointwise op -> the torch function that defines it."""

REDUCTION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # Operands arrive in their compute dtype, so a 16-bit sum accumulates in float32.
    "sum": lambda x: x.sum(-1, keepdim=True),
    "prod": lambda x: x.prod(-1, keepdim=True),
    "max": lambda x: x.amax(-1, keepdim=True),
    "min": lambda x: x.amin(-1, keepdim=True),
    "argmax": lambda x: x.argmax(-1, keepdim=True),
    "argmin": lambda x: x.argmin(-1, keepdim=True),
    "any": lambda x: x.any(-1, keepdim=True),
    "all": lambda x: x.all(-1, keepdim=True),
}
"""Reduction name -> the torch reduction over the last axis (the flattened reduction axes)."""


# torch refuses these over an empty axis; a kernel's accumulator starts at the identity.
_EMPTY_REDUCTION: dict[str, Callable[[torch.dtype], float | int | bool]] = {
    "max": lambda dtype: reduction_identity("max", dtype),
    "min": lambda dtype: reduction_identity("min", dtype),
    "argmax": lambda dtype: 0,
    "argmin": lambda dtype: 0,
}


# --- evaluating a kernel ---------------------------------------------------------------


@dataclass(frozen=True)
class _Frame:
    """What one call of a kernel sees: the grid, the symbol values and the flat buffer views."""

    symbols: dict[str, torch.Tensor]
    flat: dict[str, torch.Tensor]
    pointwise_shape: tuple[int, ...]
    reduction_shape: tuple[int, ...]
    device: torch.device
    inner_shape: tuple[int, ...] = ()  # a nested kernel's inner reduction

    @property
    def full_shape(self) -> tuple[int, ...]:
        return (*self.pointwise_shape, *self.reduction_shape, *self.inner_shape)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return (*self.pointwise_shape, *(1 for _ in (*self.reduction_shape, *self.inner_shape)))

    def index(
        self, expr: sympy.Expr, extra: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        symbols = {**self.symbols, **extra} if extra else self.symbols
        return evaluate_index(expr, symbols, self.device)


def _check_bounds(offsets: torch.Tensor, extent: int, what: str) -> None:
    if offsets.numel() and (int(offsets.min()) < 0 or int(offsets.max()) >= extent):
        raise IndexError(
            f"{what}: offsets [{int(offsets.min())}, {int(offsets.max())}] "
            f"outside the buffer's {extent} elements"
        )


def _load(value: Value, operands: list[torch.Tensor], frame: _Frame) -> torch.Tensor:
    buffer, index, indirect, masked = value.arg
    bound = {symbol.name: operand.to(torch.int64) for symbol, operand in zip(indirect, operands)}
    offsets = frame.index(index, bound)
    flat = frame.flat[buffer]
    mask = operands[-1].to(torch.bool) if masked else None
    if mask is not None:
        offsets, mask = torch.broadcast_tensors(offsets, mask)
        # A masked-out lane reads nothing: its offset may lie outside the buffer (cat, pad).
        _check_bounds(offsets[mask], flat.numel(), f"load {buffer}[{index}]")
        offsets = torch.where(mask, offsets, 0)
    else:
        _check_bounds(offsets, flat.numel(), f"load {buffer}[{index}]")
    if flat.numel() == 0:  # nothing to read: every lane is masked out or there are none
        loaded = flat.new_zeros(offsets.shape)
    else:
        loaded = flat[offsets]
    loaded = _round_to(loaded, value.dtype)
    return loaded if mask is None else torch.where(mask, loaded, loaded.new_zeros(()))


def _const(value: Value, operands: list[torch.Tensor], frame: _Frame) -> torch.Tensor:
    return _round_to(torch.tensor(value.arg, dtype=value.dtype, device=frame.device), value.dtype)


def _index(value: Value, operands: list[torch.Tensor], frame: _Frame) -> torch.Tensor:
    return _round_to(frame.index(value.arg), value.dtype)


def _cast(value: Value, operands: list[torch.Tensor], frame: _Frame) -> torch.Tensor:
    return _round_to(operands[0], value.dtype)


def _reduce(value: Value, operands: list[torch.Tensor], frame: _Frame) -> torch.Tensor:
    # Flatten the reduction axes into one, so every reduction (argmax's flat index included)
    # is one torch call over the last axis; keep size-1 axes so the result stays a row.
    # A `reduce` reduces the (outer) reduction axes, its operand constant along inner ones;
    # an `inner_reduce` the inner axes, its result one per row and outer reduced element.
    inner_ones = tuple(1 for _ in frame.inner_shape)
    if value.op == INNER_REDUCE:
        kept = (*frame.pointwise_shape, *frame.reduction_shape)
        reduced = frame.inner_shape
        operand = operands[0].expand(frame.full_shape)
    else:
        kept = frame.pointwise_shape
        reduced = frame.reduction_shape
        operand = operands[0].expand((*kept, *reduced, *inner_ones))
    count = math.prod(reduced)
    operand = operand.reshape(*kept, count)
    result_shape = (*kept, *(1 for _ in reduced), *(() if value.op == INNER_REDUCE else inner_ones))
    dtype = compute_dtype(value.dtype)
    if count == 0 and value.arg in _EMPTY_REDUCTION:
        fill = _EMPTY_REDUCTION[value.arg](operand.dtype)
        return torch.full(result_shape, fill, dtype=dtype, device=frame.device)
    return REDUCTION_FUNCTIONS[value.arg](operand).to(dtype).reshape(result_shape)


def _dot(value: Value, operands: list[torch.Tensor], frame: _Frame) -> torch.Tensor:
    """sum over the reduction axes of a * b, as one einsum (a library matmul), never the
    (rows x reduced) product grid: each operand keeps only the axes it varies along."""
    ndim = len(frame.full_shape)
    dtype = compute_dtype(value.dtype)
    reduced = range(len(frame.pointwise_shape), ndim)
    letters = "abcdefghijklmnopqrstuvwxyz"[:ndim]
    terms, tensors = [], []
    for operand in operands:
        operand = operand.to(dtype).reshape((1,) * (ndim - operand.dim()) + tuple(operand.shape))
        # The sum runs over every reduced element, even where an operand is constant.
        sizes = [frame.full_shape[d] if d in reduced else -1 for d in range(ndim)]
        operand = operand.expand(sizes)
        axes = [d for d in range(ndim) if operand.shape[d] != 1 or d in reduced]
        tensors.append(operand.reshape([operand.shape[d] for d in axes]))
        terms.append("".join(letters[d] for d in axes))
    kept = sorted({letters.index(c) for term in terms for c in term} - set(reduced))
    result = torch.einsum(f"{terms[0]},{terms[1]}->{''.join(letters[d] for d in kept)}", *tensors)
    shape = [frame.full_shape[d] if d in kept else 1 for d in range(ndim)]
    return result.reshape([*shape[: len(frame.pointwise_shape)], *(1 for _ in reduced)])


def _pointwise(value: Value, operands: list[torch.Tensor], frame: _Frame) -> torch.Tensor:
    result_dtype = compute_dtype(value.dtype)
    converted = [operand.to(dtype) for operand, dtype in zip(operands, operand_dtypes(value))]
    return POINTWISE_FUNCTIONS[value.op](*converted).to(result_dtype)


_VALUE_RULES: dict[str, Callable[[Value, list[torch.Tensor], _Frame], torch.Tensor]] = {
    "load": _load,
    "const": _const,
    "index": _index,
    "cast": _cast,
    "reduce": _reduce,
    INNER_REDUCE: _reduce,
    "dot": _dot,
    **{name: _pointwise for name in POINTWISE_FUNCTIONS},
}


def _store(store: Store, value: torch.Tensor, frame: _Frame) -> None:
    if store.is_row and not store.value.is_row:
        raise ValueError(
            f"store {store.buffer}[{store.index}]: a row store (no reduction variable in "
            "its index) of a value that varies along the reduction"
        )
    # A row store runs once per row; a full store once per point of the whole domain.
    shape = frame.row_shape if store.is_row else frame.full_shape
    flat = frame.flat[store.buffer]
    offsets = frame.index(store.index).expand(shape).reshape(-1)
    data = value.to(flat.dtype).expand(shape).reshape(-1)
    what = f"store {store.buffer}[{store.index}]"
    _check_bounds(offsets, flat.numel(), what)
    _check_single_writer(offsets, data, what)
    flat.index_put_((offsets,), data)


def _check_single_writer(offsets: torch.Tensor, data: torch.Tensor, what: str) -> None:
    """Lanes of one store may share an element only if they write the same value there."""
    if offsets.numel() < 2:
        return
    order = torch.argsort(offsets, stable=True)
    offsets, data = offsets[order], data[order]
    shared = offsets[1:] == offsets[:-1]
    first, second = data[:-1][shared], data[1:][shared]
    differ = first != second
    if data.is_floating_point():
        differ &= ~(first.isnan() & second.isnan())
    if bool(differ.any()):
        element = int(offsets[1:][shared][differ][0])
        raise ValueError(f"{what}: element {element} written with different values (a race)")


def _flat_view(tensor: torch.Tensor) -> torch.Tensor:
    """The elements from the tensor's data pointer to the last one it covers, as a 1-D view."""
    extent = 0
    if tensor.numel():
        extent = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return torch.as_strided(tensor, (extent,), (1,), tensor.storage_offset())


def _bind_buffers(
    buffers: Sequence[Buffer],
    tensors: Sequence[torch.Tensor],
    sizes: Mapping[str, torch.Tensor],
    role: str,
) -> dict[str, torch.Tensor]:
    """Check each tensor against its Buffer at `sizes` and return its flat view, by name."""
    if len(tensors) != len(buffers):
        raise ValueError(f"expected {len(buffers)} {role} tensors, got {len(tensors)}")
    flat = {}
    for buffer, tensor in zip(buffers, tensors):
        shape = tuple(int(evaluate_index(size, sizes)) for size in buffer.shape)
        stride = tuple(int(evaluate_index(step, sizes)) for step in buffer.stride)
        # A stride along an axis of size 1 (or of an empty tensor) is never used.
        stride_ok = tensor.numel() == 0 or all(
            size == 1 or have == want for size, have, want in zip(shape, tensor.stride(), stride)
        )
        if tensor.dtype != buffer.dtype or tuple(tensor.shape) != shape or not stride_ok:
            raise ValueError(
                f"{role} {buffer}: got a {tensor.dtype} tensor of shape {tuple(tensor.shape)} "
                f"and strides {tensor.stride()}, expected shape {shape} and strides {stride}"
            )
        flat[buffer.name] = _flat_view(tensor)
    return flat


class ReferenceKernel:
    """A Kernel made callable by evaluating its IR with torch ops (the semantic oracle)."""

    def __init__(self, kernel: Kernel) -> None:
        """Check that `kernel` is well formed (Kernel.verify); raise if not."""
        kernel.verify()
        self.kernel = kernel

    def __call__(self, inputs: Tensors, outputs: Tensors, sizes: Sizes) -> None:
        """Run the kernel (the CompiledKernel contract, backends/registry.py)."""
        kernel = self.kernel
        missing = [s.name for s in kernel.size_symbols if s.name not in sizes]
        if missing:
            raise ValueError(f"kernel {kernel.name}: no value for size symbols {missing}")
        tensors = (*inputs, *outputs)
        device = tensors[0].device if tensors else torch.device("cpu")
        symbols = {
            s.name: torch.tensor(int(sizes[s.name]), device=device) for s in kernel.size_symbols
        }
        flat = {
            **_bind_buffers(kernel.inputs, inputs, symbols, "input"),
            **_bind_buffers(kernel.outputs, outputs, symbols, "output"),
        }
        pointwise_shape = tuple(int(evaluate_index(n, symbols)) for n in kernel.ranges)
        reduction_shape = tuple(int(evaluate_index(n, symbols)) for n in kernel.reduction_ranges)
        inner_shape = tuple(int(evaluate_index(n, symbols)) for n in kernel.inner_ranges)
        # Each index variable is an arange along its own axis of the grid, size 1 elsewhere.
        full_shape = (*pointwise_shape, *reduction_shape, *inner_shape)
        names = [f"i{k}" for k in range(len(pointwise_shape))]
        names += [f"r{k}" for k in range(len(reduction_shape))]
        names += [f"q{k}" for k in range(len(inner_shape))]
        for axis, (name, size) in enumerate(zip(names, full_shape)):
            view = [1] * len(full_shape)
            view[axis] = size
            symbols[name] = torch.arange(size, dtype=torch.int64, device=device).view(view)
        frame = _Frame(symbols, flat, pointwise_shape, reduction_shape, device, inner_shape)

        # Memoized on the Value (structural equality): a shared subexpression runs once.
        results: dict[Value, torch.Tensor] = {}
        for value in kernel.values:  # operands before users
            operands = [results[arg] for arg in value.args]
            results[value] = _VALUE_RULES[value.op](value, operands, frame)
        for store in kernel.stores:
            _store(store, results[store.value], frame)


def compile_kernel(kernel: Kernel) -> ReferenceKernel:
    """The reference backend's entry point: a callable that runs `kernel` with torch ops."""
    return ReferenceKernel(kernel)


def quantized_matmul(
    x: torch.Tensor,
    weight: QuantizedWeight,
    int8_activations: bool = False,
    bias: torch.Tensor | None = None,
    gemm: str = "aten",  # the C++ kernels' option: not used here
) -> torch.Tensor:
    """`x @ W^T (+ bias)` as its definition: W dequantized (written out), then `mm`. Float x."""
    y = x @ weight.dequantize().to(x.device).t()
    return y if bias is None else y + bias


REFERENCE = register_backend(
    Backend(
        name="reference",
        compile=compile_kernel,
        features=frozenset(
            {Feature.MATMUL_TEMPLATES, Feature.IN_PLACE_OUTPUTS, Feature.NESTED_REDUCTIONS}
        ),
        quantized_matmul=quantized_matmul,
        quantized_formats=frozenset(KINDS),
    )
)
