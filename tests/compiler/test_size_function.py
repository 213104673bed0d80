"""Layouts at run time for kernels with size symbols (compiler/kernel_ir.py: size_function,
layout_function): compiled Python for polynomial sizes, sympy for the rest, and per-kernel
caches bounded by SIZES_KEPT."""

from __future__ import annotations

import sympy
import torch
from torch.utils._sympy.functions import FloorDiv

from memopt.backends.cpp import kernel as cpp_kernel
from memopt.backends.runtime import kernels
from memopt.backends.runtime.kernels import FusedKernel
from memopt.compiler.kernel_ir import Buffer, layout_function, size_function

s0, s1 = sympy.symbols("s0 s1", integer=True, positive=True)


def test_polynomials_and_anything_else_give_sympys_values():
    exprs = (
        64 * s0 + 128,
        2 * s0 * s1 - 3,
        s0**2,
        sympy.Integer(5),
        7,
        FloorDiv(s0, 2) + 1,
        s0 - 1,
    )
    for values in ({"s0": 7, "s1": 3}, {"s0": 1, "s1": 1000}, {"s0": 2**40, "s1": 5}):
        want = tuple(
            int(sympy.sympify(e).xreplace({s: sympy.Integer(values[s.name]) for s in (s0, s1)}))
            for e in exprs
        )
        assert size_function(exprs)(values) == want
        assert all(type(v) is int for v in size_function(exprs)(values))


def test_rationals_negative_powers_max_mod_and_odd_names_give_sympys_values():
    odd = sympy.Symbol("s'0\\x", integer=True, positive=True)
    exprs = (
        sympy.Rational(1, 2) * s0 * 4,
        s0**-1 * s0**2,
        sympy.Max(s0, s1) + sympy.Mod(s0, 3),
        odd * 2 + 1,
    )
    values = {"s0": 10, "s1": 7, odd.name: 5}
    want = tuple(
        int(sympy.sympify(e).xreplace({s: sympy.Integer(values[s.name]) for s in e.free_symbols}))
        for e in exprs
    )
    assert size_function(exprs)(values) == want == (20, 10, 11, 11)


def test_static_layouts_compile_nothing_and_layouts_split_per_buffer():
    assert size_function((3, sympy.Integer(4)))({}) == (3, 4)
    a = Buffer("a", torch.float32, (s0, sympy.Integer(64)), (sympy.Integer(64), sympy.Integer(1)))
    b = Buffer("b", torch.float32, (s0 + 1,), (sympy.Integer(1),))
    assert layout_function((a, b))({"s0": 9}) == [((9, 64), (64, 1)), ((10,), (1,))]


def _recorded_kernels():
    """The FusedKernels called, and a __call__ that records them."""
    found = []
    original = FusedKernel.__call__

    def recording(self, *inputs):
        if self not in found:
            found.append(self)
        return original(self, *inputs)

    return found, recording


def test_a_kernel_with_size_symbols_keeps_at_most_sizes_kept(monkeypatch):
    """Every new size is worked out once and kept, up to SIZES_KEPT; past it the kept
    sizes are forgotten and the values stay right."""
    monkeypatch.setattr(kernels, "SIZES_KEPT", 4)
    monkeypatch.setattr(cpp_kernel, "SIZES_KEPT", 4)
    found, recording = _recorded_kernels()
    monkeypatch.setattr(FusedKernel, "__call__", recording)

    def fn(x, y):
        return ((x * 2 + y).relu() * 3,)

    compiled = torch.compile(fn, backend="memopt", dynamic=True)
    for rows in range(3, 13):
        x, y = torch.randn(rows, 9), torch.randn(9)
        torch.testing.assert_close(compiled(x, y)[0], fn(x, y)[0])
    symbolic = [k for k in found if k._symbol_slots]
    assert symbolic
    for k in symbolic:
        assert 1 <= len(k._launches) <= 4
        for runner in k._compiled.values():
            assert 1 <= len(getattr(runner, "_bound", {0: 0})) <= 4
