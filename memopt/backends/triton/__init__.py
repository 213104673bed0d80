"""The Triton backend: Kernel IR -> Triton source -> GPU kernels (or the interpreter on CPU)."""

from memopt.backends.triton.render import RenderedKernel, Unsupported, render
from memopt.backends.triton.runtime import TritonKernel, compile_kernel

__all__ = ["RenderedKernel", "TritonKernel", "Unsupported", "compile_kernel", "render"]
