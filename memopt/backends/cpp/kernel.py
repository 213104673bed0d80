"""CppKernel: a Kernel compiled to C++, called through the native launcher (launcher.py)
or, where that is not available, through ctypes."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from memopt.backends import memory
from memopt.backends.codegen import planning
from memopt.backends.cpp import build, codegen, launcher
from memopt.backends.registry import Sizes, Tensors
from memopt.compiler.kernel_ir import SIZES_KEPT, Buffer, Kernel, layout_function

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
        packed = getattr(library, codegen.PACKED_NAME)
        self._packed_address = ctypes.cast(packed, ctypes.c_void_p).value
        self._buffers = (*kernel.inputs, *kernel.outputs)
        self._layouts = layout_function(self._buffers)  # the buffers' layouts at given sizes
        self._bound: dict[tuple[object, ...], Callable[[Tensors, Tensors], None]] = {}
        # Output position -> input position whose memory that output may reuse, when the
        # caller knows nothing reads the input afterwards (FusedKernel.donated_inputs).
        self.in_place: dict[int, int] = planning.in_place_outputs(kernel)
        self._memory = memory.KeptMemory()  # large outputs' memory, kept between calls
        self._output_nbytes: dict[tuple[object, ...], int] = {}  # by (shape, stride, dtype)

    def allocate(
        self, position: int, shape: Sequence[int], stride: Sequence[int], dtype: torch.dtype
    ) -> torch.Tensor:
        """A CPU tensor for output `position`: kept memory of an earlier call's output when
        nothing else holds it any more, else fresh memory (backends/memory.py)."""
        key = (tuple(shape), tuple(stride), dtype)
        nbytes = self._output_nbytes.get(key)
        if nbytes is None:
            extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
            nbytes = self._output_nbytes[key] = extent * dtype.itemsize
        return self._memory.empty(position, shape, stride, dtype, nbytes)

    def __call__(self, inputs: Tensors, outputs: Tensors, sizes: Sizes) -> None:
        """Run the kernel (the CompiledKernel contract, backends/registry.py)."""
        kernel = self.kernel
        if len(inputs) != len(kernel.inputs) or len(outputs) != len(kernel.outputs):
            raise ValueError(
                f"kernel {kernel.name}: expected {len(kernel.inputs)} inputs and "
                f"{len(kernel.outputs)} outputs, got {len(inputs)} and {len(outputs)}"
            )
        self.bind(sizes)(inputs, outputs)

    def bind(
        self, sizes: Sizes, outputs_checked: bool = False
    ) -> Callable[[Tensors, Tensors], None]:
        """`run(inputs, outputs)` at `sizes`: the layouts to check and the size and extent
        arguments worked out once per distinct sizes; per call only the checks, the data
        pointers and the C call. `outputs_checked`: the caller allocates every output in
        the kernel's layouts (FusedKernel does), so only the inputs are checked."""
        names = self.signature.size_names
        try:
            size_values = tuple(int(sizes[name]) for name in names) if names else ()
        except KeyError as error:
            missing = [n for n in names if n not in sizes]
            raise ValueError(
                f"kernel {self.kernel.name}: no value for size symbols {missing}"
            ) from error
        key = (*size_values, outputs_checked)
        run = self._bound.get(key)
        if run is None:
            layout = _Layout(
                self._buffers,
                self._layouts,
                dict(zip(names, size_values)),
                self.signature.extent_buffers,
            )
            checked = len(self.kernel.inputs) if outputs_checked else len(self._buffers)
            if len(self._bound) >= SIZES_KEPT:
                self._bound.clear()
            run = self._bound[key] = self._runner(
                layout, (*layout.extent_args, *size_values), checked
            )
        return run

    def _runner(
        self, layout: _Layout, scalars: tuple[int, ...], checked: int
    ) -> Callable[[Tensors, Tensors], None]:
        function, name = self._function, self.kernel.name
        checks = tuple(zip(layout.expected, self._buffers))[:checked]
        snapshot_outputs = self.signature.snapshot_outputs
        native = launcher.module()
        count = len(self._buffers)
        if native is not None and not snapshot_outputs and count <= launcher.MAX_TENSORS:
            expected = tuple(layout_check for layout_check, _ in checks)
            checked_launch = native.bind(self._packed_address, count, scalars, expected)
            address = self._packed_address
            unchecked: list[Callable[..., int]] = []  # bound on the first mismatch

            def run_native(inputs: Tensors, outputs: Tensors) -> None:
                code = checked_launch(*inputs, *outputs)
                if code == launcher.LAYOUT_MISMATCH:
                    # The full rule: size-1 and empty dims may have any stride.
                    for tensor, ((_, shape, stride), buffer) in zip((*inputs, *outputs), checks):
                        _check(buffer, tensor, shape, stride)
                    if not unchecked:
                        unchecked.append(native.bind(address, count, scalars, ()))
                    code = unchecked[0](*inputs, *outputs)
                if code:
                    error, message = _ERRORS.get(code, (RuntimeError, f"error code {code}"))
                    raise error(f"kernel {name}: {message}")

            return run_native

        def run(inputs: Tensors, outputs: Tensors) -> None:
            tensors = (*inputs, *outputs)
            for tensor, ((dtype, shape, stride), buffer) in zip(tensors, checks):
                # The common case in one comparison; the full rule (size-1 and empty dims
                # may have any stride) only when it fails.
                if not (
                    tensor.dtype == dtype
                    and tensor.is_cpu
                    and tensor.shape == shape
                    and tensor.stride() == stride
                ):
                    _check(buffer, tensor, shape, stride)
            pointers = [tensor.data_ptr() for tensor in tensors]
            # A kernel that reads an output sees it as it was before the kernel: read a copy.
            if snapshot_outputs:
                snapshots = [_flat_copy(outputs[k]) for k in snapshot_outputs]
                pointers += [s.data_ptr() for s in snapshots]
            code = function(*pointers, *scalars)
            if code:
                error, message = _ERRORS.get(code, (RuntimeError, f"error code {code}"))
                raise error(f"kernel {name}: {message}")

        return run


class _Layout:
    """Buffer layouts at given sizes: what the launch checks (dtype, shape, strides) and the
    extent arguments (elements from the data pointer) of the buffers the kernel takes
    them for. Worked out once per distinct sizes, so kept to straight loops."""

    def __init__(
        self,
        buffers: Sequence[Buffer],
        layouts: Callable[[Mapping[str, int]], list],
        sizes: Mapping[str, int],
        extent_buffers: Sequence[str],
    ) -> None:
        found = layouts(sizes)
        self.expected = [
            (buffer.dtype, torch.Size(shape), stride)
            for buffer, (shape, stride) in zip(buffers, found)
        ]
        by_name = {buffer.name: layout for buffer, layout in zip(buffers, found)}
        self.extent_args = [_extent(*by_name[name]) for name in extent_buffers]


def _extent(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    extent = 1
    for n, s in zip(shape, stride):
        if n == 0:
            return 0
        extent += (n - 1) * s
    return extent


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
    launcher.prefetch()  # what calls the kernel, when the cache has no launcher yet


def compile_kernel(kernel: Kernel) -> CppKernel:
    """The C++ backend's entry point: `kernel` compiled for the CPU.

    Raises build.CompilerNotFound or build.CompileError when it cannot be built, and
    NotImplementedError for IR it cannot express; FusedKernel then runs the kernel on the
    reference backend with a warning.
    """
    return CppKernel(kernel)
