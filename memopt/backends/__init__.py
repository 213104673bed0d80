"""The backends generated kernels run on, registered on import (backends/registry.py).

`reference` executes Kernel IR with torch ops (the definition of the IR and the test
oracle); `cpp` renders it to C++ with OpenMP for CPUs; `triton` to Triton for GPUs (and
Triton's interpreter on CPU tensors). `runtime/` runs optimized graphs: the call targets
of generated kernels and the executor AOTAutograd calls.
"""

from memopt.backends import cpp, reference, triton

__all__ = ["cpp", "reference", "triton"]
