"""The backends generated kernels run on, each registered with what it can do.

A backend turns a Kernel IR kernel into a callable, `compile(kernel)`, called as
`compiled(inputs, outputs, sizes)`: it reads `inputs`, writes `outputs` (allocated by the
caller in the kernel's output layouts) and takes the value of each size symbol by name.
Callers ask a backend for a capability (`Feature`) instead of comparing its name: the
fusion pass asks "does the backend these kernels run on take matmul templates?", the
attention pass "does it have an attention kernel, and up to which head dim?".

The `backend` option names one of them or "auto": on each device the backend registered
as that device's default (`default_for`), else the reference backend. A named backend
that does not run on the tensors' device (C++ on a GPU) gives way to auto's choice.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from memopt.compiler.kernel_ir import Kernel

AUTO = "auto"
# The backend "auto" falls back to on a device no backend claims as its default.
FALLBACK = "reference"


class Feature(enum.Enum):
    """What a backend can do beyond running pointwise and reduction kernels."""

    # Template kernels holding one matmul (`dot`) with its prologue and epilogue.
    MATMUL_TEMPLATES = "matmul templates"
    # A kernel for a lone layout-changing copy that beats ATen's strided copy (the C++
    # backend transposes in cache-sized tiles into memory it reuses).
    LAYOUT_CONVERSION = "layout conversion"
    # A kernel that is exactly one softmax is better left to ATen's `_softmax` on a backend
    # whose generated softmax is slower than ATen's vectorized kernel (eager's own). No
    # backend declares it now: the C++ backend's generated softmax is the faster since its
    # shorter exp (docs/architecture.md, "Fusion").
    LIBRARY_SOFTMAX = "library softmax"
    # A kernel of its own for a lone float32 transcendental op (exp, tanh, ...): the C++
    # backend's vector math (libmvec) beats ATen's on some CPUs by far (AMD EPYC, 1M
    # elements, measured: tanh 1104 us in ATen, 91 us generated; exp 320 us, 138 us;
    # passes/fusion.py's _MATH_OPS has the list and the figures).
    LONE_MATH = "lone math"
    # A kernel may write an output over an input it reads where every load of that input
    # reads the element the store writes (`planning.may_overwrite`): the C++ skeletons read
    # each element before they write it; the reference backend evaluates every value before
    # its first store.
    IN_PLACE_OUTPUTS = "in-place outputs"
    # Kernels with nested reductions (Kernel.inner_ranges: a reduction over another axis of
    # a reduction's results, `d.sum(-1).amin(1)`), the inner results never in memory.
    NESTED_REDUCTIONS = "nested reductions"
    # Kernels run on a GPU's memory, which moves 32-byte sectors: a strided access the
    # renderer cannot tile costs the sectors it touches (backends/triton/sectors.py). A
    # CPU's 64-byte cache lines are not modelled, so the CPU backends do not declare it.
    SECTOR_MEMORY = "32-byte sector memory"
    # A kernel with a size symbol works out and binds its launch once per distinct size (the
    # C++ backend: about 11 us in isolation, 30 us in a decode step's cold caches). A
    # concatenation that grows a graph input by a few rows along a size symbol (a dynamic
    # KV cache's `torch.cat`) meets a new size every call: fused, it would pay that at each
    # call to save only its other parts' write and read; ATen's cat sets nothing up.
    PER_SIZE_LAUNCH = "per-size launch setup"


Tensors = Sequence[torch.Tensor]
Sizes = Mapping[str, int]  # each size symbol's value, by name


class CompiledKernel(Protocol):
    """What `Backend.compile` returns: a kernel ready to launch."""

    def __call__(self, inputs: Tensors, outputs: Tensors, sizes: Sizes) -> None:
        """Read `inputs`, write `outputs` in place.

        inputs[k] / outputs[k] have the shape and strides of kernel.inputs[k] /
        kernel.outputs[k] at `sizes` (size symbol name -> int); element 0 is at the tensor's
        data pointer. Outputs are allocated by the caller.

        A kernel may also offer `bind(sizes, outputs_checked)`: a callable
        `run(inputs, outputs)` for every call at those sizes, with what they share worked
        out once (runtime/kernels.py uses it where present, with outputs it allocated in
        the kernel's layouts: outputs_checked=True).
        """


@dataclass(frozen=True)
class AttentionKernels:
    """A backend's fused attention: the largest head dim it takes, and a factory for the
    graph call target that runs it (the attention pass places one per fused ATen op)."""

    max_head_dim: int
    make_target: Callable[..., object]


@dataclass(frozen=True)
class Backend:
    name: str
    # Kernel IR -> a CompiledKernel; raises for a kernel it cannot express (the caller falls
    # back to the reference backend, with a warning naming the kernel).
    compile: Callable[[Kernel], CompiledKernel]
    # Device types its kernels run on; None: any.
    device_types: frozenset[str] | None = None
    # Device types on which `backend="auto"` picks it.
    default_for: frozenset[str] = frozenset()
    features: frozenset[Feature] = frozenset()
    # Start compiling in the background (the first call waits for it).
    prefetch: Callable[[Kernel], None] | None = None
    # Write the kernel's source into the cache without compiling it, for reports.
    source_file: Callable[[Kernel], Path] | None = None
    attention: AttentionKernels | None = None
    # `x @ W^T (+ bias)` for float32 x (M, K) over a narrow weight (backends/narrow.py),
    # with int8 activations where the backend has them: the precision pass's matmuls.
    # Called (x, weight, int8_activations, bias, gemm): `gemm` names the CPU GEMM library
    # ("aten", "onednn") a backend that multiplies dequantized tiles may hand them to.
    quantized_matmul: Callable[..., object] | None = None
    # A native launch of that matmul for operands of these layouts (x, weight,
    # int8_activations, bias) -> (launch, M, N) or None: `launch(x[, bias], *stored, y)`
    # returns 0, or non-zero without running where x's or the bias's layout differs.
    quantized_launch: Callable[..., tuple[object, int, int] | None] | None = None
    # Rows `index` of a narrow weight as float32, `index.shape + (K,)` (weight, index), or
    # None where it does not take them (the caller gathers with torch ops).
    quantized_gather: Callable[..., object] | None = None
    # A native launch of that lookup for an index of this layout (weight, index, whether a
    # negative index counts from the end) -> (launch, output shape) or None:
    # `launch(index, *stored, out)` returns 0, or non-zero without writing (an index out of
    # range, another layout).
    quantized_gather_launch: Callable[..., tuple[object, tuple] | None] | None = None
    # The narrow formats that matmul reads (backends/narrow.py KINDS).
    quantized_formats: frozenset[str] = frozenset()
    # How the backend schedules a matmul template of (M, N, K; 16-bit operands), for decision
    # records.
    describe_template: Callable[[int, int, int, bool], str] | None = None
    notes: tuple[str, ...] = field(default=(), compare=False)

    def supports(self, feature: Feature) -> bool:
        return feature in self.features

    def runs_on(self, device_type: str) -> bool:
        return self.device_types is None or device_type in self.device_types


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Add a backend to the registry (each backend package registers itself on import)."""
    if backend.name in _BACKENDS or backend.name == AUTO:
        raise ValueError(f"backend {backend.name!r} is registered twice")
    _BACKENDS[backend.name] = backend
    return backend


def backend_names() -> tuple[str, ...]:
    """The values the `backend` option takes: "auto" and every registered backend."""
    return (AUTO, *_BACKENDS)


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise KeyError(f"no backend {name!r}; registered: {', '.join(_BACKENDS)}")
    return _BACKENDS[name]


def backend_for(option: str, device_type: str) -> Backend:
    """The backend generated kernels run on, for the `backend` option and the device type
    of the graph's tensors."""
    if option != AUTO:
        backend = get_backend(option)
        if backend.runs_on(device_type):
            return backend
    for backend in _BACKENDS.values():
        if device_type in backend.default_for:
            return backend
    return get_backend(FALLBACK)
