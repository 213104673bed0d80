"""CppKernel: a Kernel compiled to C++ and called through ctypes."""

from __future__ import annotations

import ctypes
import functools
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import sympy
import torch

from memopt.backends.codegen import planning
from memopt.backends.cpp import build, codegen
from memopt.backends.registry import Sizes, Tensors
from memopt.compiler.kernel_ir import Buffer, Kernel

# Ask Linux for transparent huge pages on large outputs before the kernel first touches
# them. A fresh output is mapped but not yet faulted in; faulting in 4 KiB pages costs more
# than the kernel's own memory traffic (128 MiB: ~60 ms in 4 KiB pages, ~25 ms in 2 MiB
# pages, measured on the benchmark machine). A hint only: no effect where THP is off or
# the memory is already touched. Set to False to measure without it.
HUGE_PAGE_OUTPUTS = sys.platform.startswith("linux")
_HUGE_PAGE = 1 << 21  # x86-64 and arm64 transparent huge pages: 2 MiB
_HUGE_PAGE_MIN_NBYTES = 4 * _HUGE_PAGE
_MADV_HUGEPAGE = 14  # <sys/mman.h>
# A kernel keeps the memory of its large outputs and hands it out again on a later call
# once nothing else holds it (no tensor, view or NumPy array of it is left): fresh memory
# costs a page fault on first touch, more than a memory-bound kernel's own traffic (see
# above). PyTorch's CUDA caching allocator makes the same trade: memory stays mapped
# between calls (at most one set of large outputs per kernel). Set to False to measure
# without it.
REUSE_OUTPUTS = True
_REUSE_MIN_NBYTES = _HUGE_PAGE_MIN_NBYTES

# Error codes the generated code returns (prelude.py: MO_ERR_*).
_ERRORS = {
    1: (RuntimeError, "ZeroDivisionError: integer division by zero"),
    2: (IndexError, "a data-dependent index (gather) lies outside its buffer"),
}


class CppKernel:
    """A Kernel as a compiled C++ function: `kernel(inputs, outputs, sizes)` writes `outputs`.

    `source` is the generated C++ and `source_path` its copy in the cache directory.
    """

    def __init__(self, kernel: Kernel) -> None:
        """Generate, compile (or find in the cache) and load; raises if any step fails."""
        generated = codegen.generate(kernel)
        self.kernel = kernel
        self.source: str = generated.source
        self.signature = generated.signature
        library, source_path = build.library(self.source)
        self.source_path: Path = source_path
        function = getattr(library, codegen.FUNCTION_NAME)
        pointers = len(kernel.inputs) + len(kernel.outputs) + len(self.signature.snapshot_outputs)
        integers = len(self.signature.extent_buffers) + len(self.signature.size_names)
        function.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int64] * integers
        function.restype = ctypes.c_int32
        self._function = function
        self._buffers = (*kernel.inputs, *kernel.outputs)
        self._layouts: dict[tuple[int, ...], _Layout] = {}
        # Output position -> input position whose memory that output may reuse, when the
        # caller knows nothing reads the input afterwards (FusedKernel.donated_inputs).
        self.in_place: dict[int, int] = planning.in_place_outputs(kernel)
        self._kept: dict[int, torch.UntypedStorage] = {}  # output position -> its memory
        self._kept_lock = threading.Lock()
        self._output_nbytes: dict[tuple[object, ...], int] = {}  # by (shape, stride, dtype)

    def allocate(
        self, position: int, shape: Sequence[int], stride: Sequence[int], dtype: torch.dtype
    ) -> torch.Tensor:
        """A CPU tensor for output `position`: the memory of an earlier call's output when
        nothing else holds it any more (REUSE_OUTPUTS), else fresh memory."""
        key = (tuple(shape), tuple(stride), dtype)
        nbytes = self._output_nbytes.get(key)
        if nbytes is None:
            extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
            nbytes = self._output_nbytes[key] = extent * dtype.itemsize
        if not REUSE_OUTPUTS or nbytes < _REUSE_MIN_NBYTES:
            return torch.empty_strided(shape, stride, dtype=dtype)
        with self._kept_lock:  # two threads must not both take the same memory
            kept = self._kept.get(position)
            if (
                kept is not None
                and kept.nbytes() == nbytes
                and torch._C._storage_Use_Count(kept._cdata) == 1  # only this reference
            ):
                return torch.empty(0, dtype=dtype).set_(kept, 0, shape, stride)
            tensor = torch.empty_strided(shape, stride, dtype=dtype)
            self._kept[position] = tensor.untyped_storage()
            return tensor

    def __call__(self, inputs: Tensors, outputs: Tensors, sizes: Sizes) -> None:
        """Run the kernel (the CompiledKernel contract, backends/registry.py)."""
        kernel = self.kernel
        if len(inputs) != len(kernel.inputs) or len(outputs) != len(kernel.outputs):
            raise ValueError(
                f"kernel {kernel.name}: expected {len(kernel.inputs)} inputs and "
                f"{len(kernel.outputs)} outputs, got {len(inputs)} and {len(outputs)}"
            )
        names = self.signature.size_names
        try:
            size_values = tuple(int(sizes[name]) for name in names) if names else ()
        except KeyError as error:
            missing = [n for n in names if n not in sizes]
            raise ValueError(
                f"kernel {kernel.name}: no value for size symbols {missing}"
            ) from error
        layout = self._layouts.get(size_values)
        if layout is None:
            sizes_by_name = dict(zip(names, size_values))
            layout = _Layout(
                self._buffers, len(kernel.inputs), sizes_by_name, self.signature.extent_buffers
            )
            self._layouts[size_values] = layout
        tensors = (*inputs, *outputs)
        pointers = []
        for tensor, (dtype, shape, stride), buffer in zip(tensors, layout.expected, self._buffers):
            # The common case in one comparison; the full rule (size-1 and empty dims
            # may have any stride) only when it fails.
            if not (
                tensor.dtype == dtype
                and tensor.is_cpu
                and tensor.shape == shape
                and tensor.stride() == stride
            ):
                _check(buffer, tensor, shape, stride)
            pointers.append(tensor.data_ptr())
        if HUGE_PAGE_OUTPUTS:
            for k in layout.large_outputs:
                _advise_huge_pages(pointers[len(inputs) + k], outputs[k].nbytes)
        # A kernel that reads an output sees it as it was before the kernel: read a copy.
        if self.signature.snapshot_outputs:
            snapshots = [_flat_copy(outputs[k]) for k in self.signature.snapshot_outputs]
            pointers += [s.data_ptr() for s in snapshots]
        code = self._function(*pointers, *layout.extent_args, *size_values)
        if code:
            error, message = _ERRORS.get(code, (RuntimeError, f"error code {code}"))
            raise error(f"kernel {kernel.name}: {message}")


class _Layout:
    """Buffer shapes, strides and extents (elements from the data pointer) at given sizes."""

    def __init__(
        self,
        buffers: Sequence[Buffer],
        first_output: int,
        sizes: Mapping[str, int],
        extent_buffers: Sequence[str],
    ) -> None:
        def ev(expr: sympy.Expr) -> int:
            expr = sympy.sympify(expr)
            return int(expr.xreplace({s: sympy.Integer(sizes[s.name]) for s in expr.free_symbols}))

        self.shapes = [tuple(ev(s) for s in b.shape) for b in buffers]
        self.strides = [tuple(ev(s) for s in b.stride) for b in buffers]
        self.extents = {}
        for buffer, shape, stride in zip(buffers, self.shapes, self.strides):
            empty = any(size == 0 for size in shape)
            extent = 0 if empty else 1 + sum((n - 1) * s for n, s in zip(shape, stride))
            self.extents[buffer.name] = extent
        self.extent_args = [self.extents[name] for name in extent_buffers]
        self.expected = [
            (buffer.dtype, torch.Size(shape), stride)
            for buffer, shape, stride in zip(buffers, self.shapes, self.strides)
        ]
        # Outputs large enough for a huge-page hint, by output position.
        self.large_outputs = tuple(
            k
            for k, buffer in enumerate(buffers[first_output:])
            if self.extents[buffer.name] * buffer.dtype.itemsize >= _HUGE_PAGE_MIN_NBYTES
        )


def _check(buffer: Buffer, tensor: torch.Tensor, shape: tuple[int, ...], stride: tuple[int, ...]):
    # A wrong layout would read or write outside the tensor: refuse it.
    ok = (
        tensor.dtype == buffer.dtype
        and tensor.is_cpu
        and tuple(tensor.shape) == shape
        and (
            tensor.numel() == 0
            or all(n == 1 or a == b for n, a, b in zip(shape, tensor.stride(), stride))
        )
    )
    if not ok:
        raise ValueError(
            f"{buffer}: got a {tensor.dtype} {tensor.device.type} tensor of shape "
            f"{tuple(tensor.shape)} and strides {tensor.stride()}, expected a cpu tensor of "
            f"shape {shape} and strides {stride}"
        )


def _advise_huge_pages(address: int, nbytes: int) -> None:
    """madvise(MADV_HUGEPAGE) on the whole 2 MiB pages inside [address, address + nbytes)."""
    if nbytes < _HUGE_PAGE_MIN_NBYTES:
        return
    start = -(-address // _HUGE_PAGE) * _HUGE_PAGE
    end = (address + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    madvise = _madvise()
    if madvise is not None and end > start:
        madvise(start, end - start, _MADV_HUGEPAGE)  # a hint: its result does not matter


@functools.cache
def _madvise():
    try:
        function = ctypes.CDLL(None).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def _flat_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of the elements from the tensor's data pointer to its last one, as 1-D."""
    extent = 0
    if tensor.numel():
        extent = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()))
    return torch.as_strided(tensor, (extent,), (1,)).clone()


def prefetch_kernel(kernel: Kernel) -> None:
    """Start compiling `kernel` in the background; `compile_kernel` later picks it up.

    Does nothing for IR the C++ backend cannot express (`compile_kernel` reports that).
    """
    try:
        source = codegen.generate(kernel).source
    except (NotImplementedError, ValueError):
        return
    try:
        build.prefetch(source)
    except build.CompilerNotFound:
        return


def compile_kernel(kernel: Kernel) -> CppKernel:
    """The C++ backend's entry point: `kernel` compiled for the CPU.

    Raises build.CompilerNotFound or build.CompileError when it cannot be built, and
    NotImplementedError for IR it cannot express; FusedKernel then runs the kernel on the
    reference backend with a warning.
    """
    return CppKernel(kernel)
