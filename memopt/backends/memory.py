"""Output memory on the CPU: huge pages for large outputs, and memory kept between calls.

A fresh output is mapped but not yet faulted in. Faulting it in 4 KiB pages on first touch
costs more than a memory-bound kernel's own traffic (128 MiB: ~60 ms in 4 KiB pages, ~25 ms
in 2 MiB pages, measured on the benchmark machine), and a tenth of a large matmul's time
(GPT-2's 1024x512 @ 512x8192 LM head, 32 MiB of logits: 55 ms into fresh memory, 47 ms with
the huge-page hint, 42 ms into kept memory, measured). Two remedies, both switchable:

- HUGE_PAGE_OUTPUTS: ask Linux for transparent huge pages (madvise MADV_HUGEPAGE) on a large
  output before its first touch. A hint only: no effect where THP is off or the memory is
  already touched.
- REUSE_OUTPUTS: keep the memory of an output of KEEP_NBYTES or more and hand it out again on
  a later call once nothing else holds it (no tensor, view or NumPy array of it is left).
  PyTorch's CUDA caching allocator makes the same trade: memory stays mapped between calls.
  At most one buffer per (owner, output position) is kept. From 1 MiB, not only from the
  hint's 8 MiB: a 1024-token prefill's 5.6 MiB SiLU-times-gate outputs took 1.1-1.3 ms each
  in fresh memory against 0.19 ms in kept memory (glibc hands such sizes back to the system
  and maps them anew), and the 4-layer Llama's prefill went from 87-106 to 73-77 ms
  (separate processes, alternating).

The C++ kernels (cpp/kernel.py) and the library matmuls (runtime/extern.py) allocate their
large outputs here. Set either switch to False to measure without it (bench/cpu.py's
"fresh memory" programs do).
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading
from collections.abc import Sequence

import torch

HUGE_PAGE_OUTPUTS = sys.platform.startswith("linux")
REUSE_OUTPUTS = True
HUGE_PAGE = 1 << 21  # x86-64 and arm64 transparent huge pages: 2 MiB
LARGE_NBYTES = 4 * HUGE_PAGE  # outputs from this size on get the hint
KEEP_NBYTES = 1 << 20  # the C++ kernels' outputs from this size on are kept (REUSE_OUTPUTS)
_MADV_HUGEPAGE = 14  # <sys/mman.h>


def advise_huge_pages(tensor: torch.Tensor, nbytes: int | None = None) -> None:
    """madvise(MADV_HUGEPAGE) on the whole 2 MiB pages of `tensor`'s first `nbytes` bytes
    (all of its storage by default), when HUGE_PAGE_OUTPUTS is on and they are many."""
    if not HUGE_PAGE_OUTPUTS:
        return
    if nbytes is None:
        nbytes = tensor.untyped_storage().nbytes()
    if nbytes < LARGE_NBYTES:
        return
    address = tensor.data_ptr()
    start = -(-address // HUGE_PAGE) * HUGE_PAGE
    end = (address + nbytes) // HUGE_PAGE * HUGE_PAGE
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


class KeptMemory:
    """The memory of one owner's large outputs, by output position (module doc)."""

    def __init__(self) -> None:
        self._kept: dict[int, torch.UntypedStorage] = {}
        self._lock = threading.Lock()  # two threads must not both take the same memory

    def empty(
        self,
        position: int,
        shape: Sequence[int],
        stride: Sequence[int],
        dtype: torch.dtype,
        nbytes: int,
    ) -> torch.Tensor:
        """An uninitialized CPU tensor for output `position`, `nbytes` long from its data
        pointer: kept memory when nothing else holds it, else fresh memory (hinted)."""
        if not REUSE_OUTPUTS or nbytes < KEEP_NBYTES:
            tensor = torch.empty_strided(shape, stride, dtype=dtype)
            advise_huge_pages(tensor, nbytes)
            return tensor
        with self._lock:
            kept = self._kept.get(position)
            if (
                kept is not None
                and kept.nbytes() == nbytes
                and torch._C._storage_Use_Count(kept._cdata) == 1  # only this reference
            ):
                return torch.empty(0, dtype=dtype).set_(kept, 0, shape, stride)
            tensor = torch.empty_strided(shape, stride, dtype=dtype)
            advise_huge_pages(tensor, nbytes)
            self._kept[position] = tensor.untyped_storage()
            return tensor
