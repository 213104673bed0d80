"""The C++ backend: Kernel IR rendered to OpenMP + SIMD C++, compiled by the system compiler.

`compile_kernel(kernel) -> CppKernel`, the interface every backend has. codegen.py walks the
IR (tables in ops.py, runtime helpers in prelude.py, index printing in index.py); build.py
compiles with `g++ -O3 -march=native -fopenmp`, caches libraries on disk by source hash and
loads them with ctypes; kernel.py binds tensors and calls.
"""

from memopt.backends.cpp.build import CompileError, CompilerNotFound
from memopt.backends.cpp.kernel import CppKernel, compile_kernel, prefetch_kernel
from memopt.backends.cpp.quantized import bind_gather, bind_matmul, gather_rows
from memopt.backends.cpp.quantized import matmul as quantized_matmul
from memopt.backends.registry import Backend, Feature, register_backend

CPP = register_backend(
    Backend(
        name="cpp",
        compile=compile_kernel,
        device_types=frozenset({"cpu"}),
        default_for=frozenset({"cpu"}),
        # No matmul template: the library GEMM runs the matmul, the epilogue fuses into the
        # next kernel. A lone layout conversion transposes in tiles into reused memory.
        features=frozenset(
            {
                Feature.LAYOUT_CONVERSION,
                Feature.LONE_MATH,
                Feature.IN_PLACE_OUTPUTS,
                Feature.NESTED_REDUCTIONS,
                Feature.PER_SIZE_LAUNCH,
            }
        ),
        prefetch=prefetch_kernel,
        quantized_matmul=quantized_matmul,
        quantized_launch=bind_matmul,
        quantized_gather=gather_rows,
        quantized_gather_launch=bind_gather,
        quantized_formats=frozenset({"int8", "int4", "bf16"}),
    )
)

__all__ = ["CompileError", "CompilerNotFound", "CppKernel", "compile_kernel", "prefetch_kernel"]
