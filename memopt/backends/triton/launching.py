"""Rendered Triton modules: cached on disk by source hash, imported, launched (or recorded).

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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from memopt.backends.cache import cache_dir as backend_cache_dir
from memopt.backends.cache import write_atomically

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


@dataclass(frozen=True, eq=False)
class Launch:
    """One kernel launch as its call site chose it: what `launch` runs, or records.

    `args` are the positional arguments (tensors, ints, floats, bools), `constexprs` the
    keyword ones, `grid` the number of programs (1D grids only). `num_warps` and
    `num_stages` are the GPU options (None: Triton's defaults); the interpreter ignores them.
    `num_warps` counts 32-lane warps: on a 64-lane target (AMD) the same threads are half as
    many wavefronts (`wavefronts`). `trips`: for each loop of the kernel's source, in order,
    its iterations summed over every program of the grid (empty for a loop-free kernel);
    what the static traffic of a looped kernel's machine code is weighed by (offline.py).
    """

    source_path: str
    fn_name: str
    grid: int
    args: tuple[object, ...]
    constexprs: dict[str, int | bool | str] = field(default_factory=dict)
    num_warps: int | None = None
    num_stages: int | None = None
    trips: tuple[int, ...] = ()


# Open `recording_launches()` blocks, innermost last.
_RECORDERS: list[list[Launch]] = []


@contextmanager
def recording_launches() -> Iterator[list[Launch]]:
    """Record the launches made inside the block instead of running them.

    With meta tensors as arguments (device "meta", which the call sites treat as a GPU),
    this gives the exact GPU launch configuration of every kernel without a GPU: what
    `offline.py` compiles for real targets.
    """
    launches: list[Launch] = []
    _RECORDERS.append(launches)
    try:
        yield launches
    finally:
        _RECORDERS.pop()


def launch(planned: Launch, on_gpu: bool) -> None:
    """Run `planned` (or record it inside `recording_launches()`)."""
    if _RECORDERS:
        _RECORDERS[-1].append(planned)
        return
    fn = getattr(load_module(Path(planned.source_path), interpret=not on_gpu), planned.fn_name)
    options: dict[str, int] = {}
    if on_gpu and planned.num_warps is not None:
        options["num_warps"] = wavefronts(planned.num_warps, 64 if torch.version.hip else 32)
    if on_gpu and planned.num_stages is not None:
        options["num_stages"] = planned.num_stages
    fn[(planned.grid,)](*planned.args, **planned.constexprs, **options)


def dot_precision(on_gpu: bool, half_inputs: bool = False) -> str:
    """tl.dot's input precision for fp32 operands: IEEE fp32, as eager computes, unless the
    user allowed TF32 for CUDA matmuls (`torch.backends.cuda.matmul.allow_tf32`, off by
    default). Triton's own default on NVIDIA targets is TF32, which rounds each operand to
    a 10-bit mantissa: fp32 results would differ from eager's by more than its own rounding.

    `half_inputs`: the kernel's tensors are fp16/bf16, upcast to fp32 in registers: they
    are exact in TF32, and intermediates (attention's probabilities) rounded to 10 bits are
    what fused 16-bit attention computes anyway (in fp16), so TF32 it is on a GPU.
    """
    if not on_gpu:
        return "ieee"
    return "tf32" if half_inputs or torch.backends.cuda.matmul.allow_tf32 else "ieee"


WARP_THREADS = 32  # lanes of the warps `num_warps` counts (NVIDIA's; an AMD wavefront: 64)


def wavefronts(num_warps: int, warp_size: int) -> int:
    """The num_warps option that gives `num_warps` 32-lane warps' threads on a target whose
    warps (wavefronts) are `warp_size` lanes wide."""
    return max(1, num_warps * WARP_THREADS // warp_size)


def on_gpu(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether a launch over `tensors` is compiled for a GPU (any non-CPU device, meta too)."""
    return bool(tensors) and not any(t.device.type == "cpu" for t in tensors)
