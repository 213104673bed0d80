"""Kept output memory on the CPU (backends/memory.py): a C++ kernel's output of KEEP_NBYTES
or more takes the memory of its previous call's output once nothing holds it, a smaller
one and one still held take fresh memory, and REUSE_OUTPUTS off keeps nothing."""

from __future__ import annotations

import torch

from memopt.backends import memory
from memopt.backends.memory import KeptMemory


def test_kept_memory_is_handed_out_again_only_when_free_and_large_enough(monkeypatch):
    kept = KeptMemory()
    large = memory.KEEP_NBYTES // 4  # float32 elements

    def take():
        return kept.empty(0, (large,), (1,), torch.float32, memory.KEEP_NBYTES)

    first = take()
    address = first.data_ptr()
    del first
    again = take()
    assert again.data_ptr() == address  # nothing held it: the same memory
    held = take()
    assert held.data_ptr() != address  # `again` still holds it: fresh memory
    small = memory.KEEP_NBYTES // 8
    kept.empty(1, (small,), (1,), torch.float32, small * 4)
    assert 1 not in kept._kept  # below KEEP_NBYTES: never kept
    monkeypatch.setattr(memory, "REUSE_OUTPUTS", False)
    address = held.data_ptr()
    del held
    assert take().data_ptr() != address


def _silu_times(x, y):
    return (torch.nn.functional.silu(x) * y,)


def test_a_compiled_kernels_mid_sized_output_reuses_its_memory():
    """A 2 MiB output (under the huge-page hint's 8 MiB): once the first call's output is
    dropped, the next call's output is the same memory, with the right values; an output
    still held is not written over."""
    compiled = torch.compile(_silu_times, backend="memopt")
    x, y = torch.randn(512, 1024), torch.randn(512, 1024)
    first = compiled(x, y)[0]
    torch.testing.assert_close(first, _silu_times(x, y)[0])
    address = first.data_ptr()
    del first
    second = compiled(x * 2, y)[0]
    assert second.data_ptr() == address
    torch.testing.assert_close(second, _silu_times(x * 2, y)[0])
    values = second.clone()
    third = compiled(x, y)[0]  # the second still held: other memory
    assert third.data_ptr() != address and torch.equal(second, values)
    torch.testing.assert_close(third, _silu_times(x, y)[0])
