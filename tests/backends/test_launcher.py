"""The native launcher (backends/cpp/launcher.py) and a FusedKernel's fast call path.

A generated C++ kernel is called through one C call that checks its tensors' layouts and
reads their data pointers; a FusedKernel called with plain CPU tensors at its one set of
sizes goes straight to that launch. Every path must give eager's values and refuse what
the slow path refuses.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch.testing import assert_close

from memopt.backends.cpp import compile_kernel, launcher

from lowering_harness import fused_kernels, run_fused

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX") or "g++") is None, reason="needs a C++ compiler"
)


def _scale_shift(x, y):
    return (x * 2 + y).relu()


def test_the_launcher_builds_here():
    """This machine has a compiler and Python's headers: kernels take the native launch."""
    assert launcher.module() is not None


def test_fast_path_matches_eager_and_is_taken():
    x, y = torch.randn(5, 33), torch.randn(33)
    got, gm = run_fused(_scale_shift, (x, y), "cpp")
    assert_close(got, _scale_shift(x, y))
    (kernel,) = fused_kernels(gm)
    assert kernel._fast is not None  # worked out by the first call
    assert kernel._compiled["cpp"].bind({}).__name__ == "run_native"
    for _ in range(3):  # later calls, on new values, through the fast path
        x2 = torch.randn(5, 33)
        assert_close(gm(x2, y), _scale_shift(x2, y))


def test_fast_path_checks_layouts_like_the_slow_path():
    """Must run: a size-1 dim with another stride (the full rule allows any). Must refuse:
    another dtype or another shape, with the error the slow path gives."""
    x, y = torch.randn(1, 33), torch.randn(33)
    _, gm = run_fused(_scale_shift, (x, y), "cpp")
    (kernel,) = fused_kernels(gm)
    gm(x, y)
    odd = torch.empty_strided((1, 33), (999, 1)).copy_(x)
    assert odd.stride() != x.stride()
    assert_close(kernel(odd, y)[0], _scale_shift(x, y))
    with pytest.raises(ValueError, match="expected a cpu tensor of shape"):
        kernel(x.double(), y)
    with pytest.raises(ValueError, match="expected a cpu tensor of shape"):
        kernel(torch.randn(1, 34), torch.randn(34))


def test_parameters_take_the_fast_path():
    x, y = torch.randn(4, 16), torch.nn.Parameter(torch.randn(16))
    with torch.no_grad():
        got, gm = run_fused(_scale_shift, (x, y), "cpp")
        (kernel,) = fused_kernels(gm)
        calls = []
        slow = kernel._call
        kernel._call = lambda inputs: calls.append(1) or slow(inputs)
        assert_close(gm(x, y), _scale_shift(x, y))
    assert not calls


def test_setting_donated_inputs_or_destinations_resets_the_fast_path():
    x, y = torch.randn(4, 16), torch.randn(16)
    _, gm = run_fused(_scale_shift, (x, y), "cpp")
    (kernel,) = fused_kernels(gm)
    assert kernel._fast is not None
    kernel.donated_inputs = frozenset({0})
    assert kernel._fast is None
    gm(x, y)
    assert kernel._fast is not None
    kernel.destinations = {}
    assert kernel._fast is None


def test_an_index_outside_the_table_raises_on_every_call():
    table, ids = torch.randn(50, 32), torch.randint(0, 50, (3, 7))

    def lookup(ids, table):
        return table[ids] * 2

    got, gm = run_fused(lookup, (ids, table), "cpp")
    assert_close(got, lookup(ids, table))
    bad = ids.clone()
    bad[1, 4] = 50
    for _ in range(2):
        with pytest.raises(IndexError):
            gm(bad, table)


def test_a_launch_refuses_what_is_not_a_tensor():
    x, y = torch.randn(3, 8), torch.randn(8)
    _, gm = run_fused(_scale_shift, (x, y), "cpp")
    kernel = fused_kernels(gm)[0].kernel
    compiled = compile_kernel(kernel)
    count = len(kernel.inputs) + len(kernel.outputs)
    checks = tuple((t.dtype, t.shape, t.stride()) for t in (x, y))
    checked = launcher.module().bind(compiled._packed_address, count, (), checks)
    unchecked = launcher.module().bind(compiled._packed_address, count, (), ())
    out = torch.empty(3, 8)
    assert checked(x, y, out) == 0
    assert_close(out, _scale_shift(x, y))
    assert checked(x.double(), y, out) == launcher.LAYOUT_MISMATCH
    with pytest.raises(TypeError, match=f"expected {count} tensors"):
        checked(x)
    with pytest.raises(AttributeError):  # checked: its dtype is read first
        checked(object(), y, out)
    with pytest.raises(TypeError, match="not a tensor"):
        unchecked(object(), y, out)


def test_without_the_launcher_kernels_run_through_ctypes(monkeypatch):
    monkeypatch.setattr(launcher, "module", lambda: None)
    x, y = torch.randn(6, 20), torch.randn(20)
    got, gm = run_fused(_scale_shift, (x, y), "cpp")
    (kernel,) = fused_kernels(gm)
    assert kernel._compiled["cpp"].bind({}).__name__ == "run"  # the ctypes call
    assert_close(got, _scale_shift(x, y))
    assert_close(gm(x, y), _scale_shift(x, y))


def test_a_kernel_with_more_tensors_than_the_launcher_takes_runs_through_ctypes(monkeypatch):
    monkeypatch.setattr(launcher, "MAX_TENSORS", 2)  # the kernel below has three
    x, y = torch.randn(6, 21), torch.randn(21)
    got, gm = run_fused(_scale_shift, (x, y), "cpp")
    (kernel,) = fused_kernels(gm)
    assert kernel._compiled["cpp"].bind({}).__name__ == "run"  # the ctypes call
    assert_close(got, _scale_shift(x, y))


def test_a_cold_cache_builds_the_launcher_beside_the_kernels(tmp_path, monkeypatch):
    """Compiling a graph starts its kernels' builds and the launcher's, in the background;
    the first call then loads what was built, and kernels launch through it."""
    monkeypatch.setenv("MEMOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(launcher, "_prefetched", [])
    launcher.module.cache_clear()
    torch._dynamo.reset()
    try:
        x, y = torch.randn(4, 8), torch.randn(8)
        compiled = torch.compile(_scale_shift, backend="memopt")
        assert_close(compiled(x, y), _scale_shift(x, y))
        assert len(launcher._prefetched) == 1  # started when the graph was compiled
        built = launcher._prefetched[0].result()
        assert built.parent == tmp_path / "cpp" and built.exists()
        assert launcher.module() is not None
    finally:
        launcher.module.cache_clear()  # the next test loads the one in the usual cache
        torch._dynamo.reset()


def test_same_inputs_names_the_first_tensor_not_as_recorded():
    """A tape's check of the inputs it uses where they are (runtime/tape.py): -1 where each
    is that very tensor with its recorded address, device, dtype, shape, strides and
    version; else the position of the first that is not, whatever changed."""
    same_inputs = launcher.module().same_inputs
    x, w = torch.randn(2, 3), torch.randn(4, 5)

    def table(*tensors, versions=None):
        return tuple(
            (
                k,
                t,
                t.data_ptr(),
                (t.dtype, tuple(t.shape), t.stride()),
                None if versions is None else t._version,
            )
            for k, t in tensors
        )

    assert same_inputs([x, w], table((0, x), (1, w), versions=True)) == -1
    assert same_inputs((x, w), table((1, w))) == -1
    assert same_inputs([x, w.clone()], table((0, x), (1, w))) == 1  # another tensor
    assert same_inputs([x], table((0, x), (1, w))) == 1  # fewer arguments
    recorded = table((0, x), (1, w), versions=True)
    w.add_(1)  # a write: its version moved
    assert same_inputs([x, w], recorded) == 1
    assert same_inputs([x, w], table((0, x), (1, w))) == -1  # a written input's: not checked
    recorded = table((0, x))
    x.data = x.data.t()  # the same memory, other strides and shape, the same version
    assert same_inputs([x], recorded) == 0
    y = torch.randn(3, 3)
    recorded = table((0, y))
    y.set_(torch.randn(3, 3).untyped_storage(), 0, (3, 3), (3, 1))  # other memory
    assert same_inputs([y], recorded) == 0
    z = torch.zeros(4)
    recorded = table((0, z))
    z.data = z.data.view(torch.int32)  # the same memory and layout as another dtype
    assert same_inputs([z], recorded) == 0
    a = torch.randn(2, 3)
    recorded = table((0, a))
    a.resize_(1, 3)  # the shape alone
    assert same_inputs([a], recorded) == 0
    b = torch.randn(3, 3)
    recorded = table((0, b))
    b.as_strided_((3, 3), (1, 3))  # the strides alone
    assert same_inputs([b], recorded) == 0
    c = torch.randn(3, 3)
    recorded = table((0, c))
    assert same_inputs([c.view_as(c)], recorded) == 0  # another object, the same memory
    c.data = torch._neg_view(c.data)  # a negation bit on the same memory
    assert same_inputs([c], recorded) == 0
    d = torch.randn(3, dtype=torch.complex64)
    recorded = table((0, d))
    d.data = d.data.conj()
    assert same_inputs([d], recorded) == 0
    with pytest.raises(TypeError, match="a table row is"):
        same_inputs([x], ((0, x),))
    with pytest.raises(TypeError, match="a table row is"):
        same_inputs([x], ((0, x, x.data_ptr(), x.dtype, None),))


def test_same_inputs_leaves_layouts_to_the_caller_when_told():
    """With a false third argument the check is identity, memory and version only: the tape
    checks layouts in one call of Dynamo's (runtime/tape.py, `_layout_check`)."""
    same_inputs = launcher.module().same_inputs
    x = torch.randn(3, 3)
    recorded = ((0, x, x.data_ptr(), (x.dtype, (3, 3), (3, 1)), x._version),)
    x.data = x.data.t()  # the same memory and version, other strides
    assert same_inputs([x], recorded) == 0
    assert same_inputs([x], recorded, True) == 0
    assert same_inputs([x], recorded, False) == -1
    x.add_(1)
    assert same_inputs([x], recorded, False) == 0  # the version still counts
    assert same_inputs([x.clone()], recorded, False) == 0  # and the tensor itself
