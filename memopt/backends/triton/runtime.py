"""Compile and launch rendered Triton kernels, cached on disk by source hash.

Each source is written once to `<cache dir>/<sha256[:16]>.py` (atomically: a temporary file
in the same directory, then `os.replace`) and imported under a unique module name; imported
modules are also kept in a dict for the life of the process.

On CPU tensors the kernels run under Triton's interpreter. TRITON_INTERPRET=1 must be in the
environment when the generated module's `@triton.jit` runs (it decides between a compiled
and an interpreted function) and stay there while the kernel runs. So the runtime sets it,
and leaves it set, before importing a module for a launch that has a CPU tensor; Triton's
own jitted helpers (tl.sum, its combine function, ...), decorated when triton was imported,
are made interpretable then too (`_interpretable_language`). A module imported for a GPU
launch while the variable is set is interpreted too (correct, slow): a process that
launches on a GPU should not run kernels on CPU tensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import sympy

from memopt.backends.cache import cache_dir as backend_cache_dir
from memopt.backends.cache import write_atomically
from memopt.backends.registry import Sizes, Tensors
from memopt.backends.triton.matmul import launch_matmul, render_matmul
from memopt.backends.triton.render import PERSISTENT_MAX, RenderedKernel, render_elementwise
from memopt.compiler.kernel_ir import Kernel, evaluate_size

# (source digest, interpreted) -> the imported module: the in-process cache.
_MODULES: dict[tuple[str, bool], ModuleType] = {}


def cache_dir() -> Path:
    """`$MEMOPT_CACHE_DIR/triton`, else `~/.cache/memopt/triton`; created on first use."""
    return backend_cache_dir("triton")


def write_source(source: str) -> Path:
    """The cache file holding `source`, written atomically unless an intact one is there."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    path = cache_dir() / f"{digest}.py"
    if not path.exists() or path.read_text() != source:
        write_atomically(path, source.encode())
    return path


def clear_memory_cache() -> None:
    """Forget the imported modules (the files stay): the next launch imports from disk."""
    _MODULES.clear()


def load_module(path: Path, interpret: bool) -> ModuleType:
    """The generated module at `path`, imported once per process (see the module doc)."""
    key = (path.stem, interpret)
    module = _MODULES.get(key)
    if module is None:
        if interpret:
            os.environ["TRITON_INTERPRET"] = "1"  # before @triton.jit runs; see the docstring
            _interpretable_language()
        name = f"memopt_triton_{path.stem}_{'interpreted' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # Triton and inspect find the kernel's source through it
        spec.loader.exec_module(module)
        _MODULES[key] = module
    return module


def _interpretable_language() -> None:
    """Make triton.language's own @triton.jit helpers (tl.sum and its combine function, ...)
    callable from an interpreted kernel.

    Triton decides at decoration time: helpers decorated while TRITON_INTERPRET was unset
    are compiled-mode functions, and an interpreted kernel that calls one fails ("Cannot
    call @triton.jit'd outside of the scope of a kernel"). torch.compile imports triton
    before any backend runs, so without the variable in the environment from the start
    they are. Each such helper is replaced, once, by an interpreted function of the same
    Python function, in the modules kernels reach them through.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    modules = (tl, tl.standard, tl.math, tl.random, tl.core)
    replaced: dict[int, InterpretedFunction] = {}
    for module in modules:
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                if id(value) not in replaced:
                    replaced[id(value)] = InterpretedFunction(value.fn)
                setattr(module, name, replaced[id(value)])


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# Triton's interpreter costs ~1.8 ms per program instance whatever its block size
# (measured on the 2-core development VM), so on the CPU one program covers up to 64Ki
# elements. On a GPU blocks are sized for registers and occupancy instead.
INTERPRETER_TILE_ELEMENTS = 1 << 16
GPU_POINTWISE_XBLOCK = 1024
GPU_REDUCTION_TILE_ELEMENTS = 4096
GPU_TILE_2D = 64


def block_sizes(
    rendered: RenderedKernel, numels: Mapping[str, int], on_gpu: bool
) -> dict[str, int]:
    """The constexpr block sizes of one launch (the one place they are chosen).

    `numels`: "xnumel" (rows of a reduction, points of a 1D pointwise kernel), "rnumel",
    and for a 2D tile "tile_x"/"tile_y" (its extents). RBLOCK was fixed when rendering: a
    persistent reduction holds a whole row, a looped one steps by LOOP_RBLOCK.
    """
    budget = INTERPRETER_TILE_ELEMENTS
    if rendered.tile is not None:
        side = GPU_TILE_2D if on_gpu else 256
        xblock = min(_next_pow2(numels["tile_x"]), side)
        yblock = min(_next_pow2(numels["tile_y"]), GPU_TILE_2D if on_gpu else budget // xblock)
        return {"XBLOCK": xblock, "YBLOCK": yblock}
    if not rendered.reduction:
        cap = GPU_POINTWISE_XBLOCK if on_gpu else budget
        return {"XBLOCK": min(_next_pow2(numels["xnumel"]), cap)}
    rblock = rendered.rblock or 1
    rows = (GPU_REDUCTION_TILE_ELEMENTS if on_gpu else budget) // rblock
    return {"XBLOCK": max(1, min(_next_pow2(numels["xnumel"]), rows)), "RBLOCK": rblock}


def render(kernel: Kernel) -> RenderedKernel:
    """Triton source for a Kernel IR kernel; raises Unsupported for ops it cannot render."""
    if kernel.kind == "matmul":
        return render_matmul(kernel)
    return render_elementwise(kernel)


def source_file(kernel: Kernel) -> Path:
    """The kernel's Triton source written into the cache (no compile, no GPU needed)."""
    return write_source(render(kernel).source)


class TritonKernel:
    """A Kernel rendered to Triton, its source cached on disk; call it to launch.

    `source` is the generated module's text and `source_path` its cache file. The module is
    imported at the first launch, when the tensors' device is known (see the module doc).
    """

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.rendered = render(kernel)
        self.source = self.rendered.source
        self.source_path = write_source(self.source)
        self.tiles: dict[str, int] | None = None  # a matmul template's last launch

    def __call__(self, inputs: Tensors, outputs: Tensors, sizes: Sizes) -> None:
        """Run the kernel (the CompiledKernel contract, backends/registry.py)."""
        kernel, rendered = self.kernel, self.rendered
        if rendered.template == "matmul":
            tensors = [*inputs, *outputs]
            on_gpu = bool(tensors) and not any(t.device.type == "cpu" for t in tensors)
            fn = getattr(load_module(self.source_path, interpret=not on_gpu), rendered.fn_name)
            self.tiles = launch_matmul(fn, kernel, rendered, tensors, sizes, on_gpu)
            return
        xnumel = evaluate_size(sympy.Mul(*kernel.ranges), sizes)
        rnumel = evaluate_size(sympy.Mul(*kernel.reduction_ranges), sizes)
        numels = {"xnumel": xnumel, "rnumel": rnumel}
        if rendered.tile is not None:
            y_axis, x_axis = rendered.tile
            numels["tile_x"] = evaluate_size(kernel.ranges[x_axis], sizes)
            numels["tile_y"] = xnumel // max(numels["tile_x"], 1)
        if xnumel == 0:
            return  # no row, no point: nothing to store
        tensors = [*inputs, *outputs]
        on_gpu = bool(tensors) and not any(t.device.type == "cpu" for t in tensors)
        fn = getattr(load_module(self.source_path, interpret=not on_gpu), rendered.fn_name)
        blocks = block_sizes(rendered, numels, on_gpu)
        if rendered.tile is not None:
            # One program per [YBLOCK, XBLOCK] tile, on a 1D grid (the kernel splits its id).
            x_tiles = -(-numels["tile_x"] // blocks["XBLOCK"])
            grid = (x_tiles * -(-numels["tile_y"] // blocks["YBLOCK"]),)
        else:
            grid = (-(-xnumel // blocks["XBLOCK"]),)
        size_args = [int(sizes[name]) for name in rendered.size_names]
        fn[grid](*tensors, *size_args, xnumel, rnumel, **blocks)


def compile_kernel(kernel: Kernel) -> TritonKernel:
    """The Triton backend's entry point: render `kernel`, cache its source, return a launcher.

    Raises Unsupported (from render) for an op the backend cannot express.
    """
    return TritonKernel(kernel)


__all__ = [
    "PERSISTENT_MAX",
    "TritonKernel",
    "block_sizes",
    "cache_dir",
    "clear_memory_cache",
    "compile_kernel",
    "load_module",
    "render",
    "source_file",
    "write_source",
]
