"""Compile and launch rendered Triton kernels, cached on disk by source hash.

On CPU tensors the kernels run under Triton's interpreter: TRITON_INTERPRET=1 must be in
the environment before the generated module's `@triton.jit` runs, so the runtime sets it
before importing a module for a CPU launch. (A process that also launches on a GPU should
set it explicitly; the interpreter is a CPU-only test vehicle.)
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import sympy
import torch

from memopt.backends.triton.render import PERSISTENT_MAX, RenderedKernel, render
from memopt.compiler.kernel_ir import Kernel, evaluate_size

_MODULES: dict[str, object] = {}


def cache_dir() -> Path:
    root = os.environ.get("MEMOPT_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "memopt"
    path = base / "triton"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_source(source: str) -> Path:
    """The cache file holding `source` (written atomically if it is not there yet)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    path = cache_dir() / f"k_{digest}.py"
    if not path.exists() or path.read_text() != source:
        handle, temp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(handle, "w") as out:
            out.write(source)
        os.replace(temp, path)
    return path


def _load(path: Path, interpret: bool) -> object:
    key = f"{path}:{interpret}"
    module = _MODULES.get(key)
    if module is None:
        if interpret:
            os.environ["TRITON_INTERPRET"] = "1"
        name = f"memopt_triton_{path.stem}_{int(interpret)}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _MODULES[key] = module
    return module


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def block_sizes(
    rendered: RenderedKernel, xnumel: int, rnumel: int, on_gpu: bool
) -> tuple[int, int | None]:
    """(XBLOCK, RBLOCK). The interpreter costs ~1.8 ms per program whatever its size, so on
    the CPU blocks are as large as memory allows; on a GPU they fit registers."""
    if not rendered.reduction:
        cap = 1024 if on_gpu else 16384
        return min(cap, _next_pow2(max(xnumel, 1))), None
    rblock = rendered.rblock or 1
    budget = 4096 if on_gpu else 1 << 16
    return max(1, min(_next_pow2(max(xnumel, 1)), max(1, budget // rblock))), rblock


class TritonKernel:
    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.rendered = render(kernel)
        self.source = self.rendered.source
        self.source_path = write_source(self.source)

    def __call__(
        self,
        inputs: Sequence[torch.Tensor],
        outputs: Sequence[torch.Tensor],
        sizes: Mapping[str, int],
    ) -> None:
        def ev(expr: sympy.Expr) -> int:
            return evaluate_size(expr, sizes)

        xnumel = ev(sympy.Mul(*self.kernel.ranges))
        rnumel = ev(sympy.Mul(*self.kernel.reduction_ranges)) if self.kernel.reduction_ranges else 1
        if xnumel == 0:
            return
        tensors = [*inputs, *outputs]
        on_gpu = any(t.is_cuda for t in tensors)
        module = _load(self.source_path, interpret=not on_gpu)
        fn = getattr(module, self.rendered.fn_name)
        args = [*tensors, *(sizes[n] for n in self.rendered.size_names), xnumel, rnumel]
        if self.rendered.tile is not None:
            y_axis, x_axis = self.rendered.tile
            ranges = [ev(r) for r in self.kernel.ranges]
            rest = math.prod(r for k, r in enumerate(ranges) if k not in (y_axis, x_axis))
            cap = 32 if on_gpu else 128
            xblock = min(cap, _next_pow2(ranges[x_axis]))
            yblock = min(cap, _next_pow2(ranges[y_axis]))
            grid = (-(-ranges[x_axis] // xblock), -(-ranges[y_axis] // yblock), rest)
            fn[grid](*args, XBLOCK=xblock, YBLOCK=yblock)
            return
        xblock, rblock = block_sizes(self.rendered, xnumel, rnumel, on_gpu)
        grid = ((xnumel + xblock - 1) // xblock,)
        if rblock is None:
            fn[grid](*args, XBLOCK=xblock)
        else:
            fn[grid](*args, XBLOCK=xblock, RBLOCK=rblock)


def compile_kernel(kernel: Kernel) -> TritonKernel:
    return TritonKernel(kernel)


__all__ = ["PERSISTENT_MAX", "TritonKernel", "compile_kernel", "write_source"]
