"""Index simplification: what the ranges of the variables make redundant goes."""

from __future__ import annotations

import sympy
import torch
from torch.utils._sympy.functions import FloorDiv, ModularIndexing

from memopt.compiler.indexing import simplify
from memopt.compiler.kernel_ir import index_var, reduction_var

from lowering_harness import fused_kernels, run_fused

i0, i1, r0 = index_var(0), index_var(1), reduction_var(0)


def test_div_and_mod_the_ranges_make_redundant_go():
    assert simplify(ModularIndexing(8 * i0 + i1, 8, 4), {i0: 4, i1: 8}) == i0
    assert simplify(FloorDiv(8 * i0 + i1, 8), {i0: 100, i1: 8}) == i0
    assert simplify(i0 * i1, {i0: 1, i1: 5}) == 0


def test_a_split_that_adds_back_up_is_one_stride():
    """A reshape of (2, 16, 256) to (32, 256) read along the 32: the div and mod of the split
    add back up to 256*r0, a plain stride; with the ranges wrong for it, they stay."""
    split = i0 + 4096 * FloorDiv(i0 + 256 * r0, 4096) + 256 * ModularIndexing(r0, 1, 16)
    assert simplify(split, {i0: 256, r0: 32}) == i0 + 256 * r0
    assert simplify(split, {i0: 512, r0: 32}).has(FloorDiv)  # i0 may carry into the div


def test_simplification_reaches_its_fixed_point():
    """The store of Llama's rotated keys, (4, 4, 2, 256, 64) written from a (4, 8, 256, 64)
    domain: one round leaves (256*i1 + i2)//512 and i1 % 2, which add back up to i1 once
    the division is reduced; the result is the plain row-major offset."""
    i2, i3 = index_var(2), index_var(3)
    ranges = {i0: 4, i1: 8, i2: 256, i3: 64}
    store = (
        ModularIndexing(i3, 1, 64)
        + 64 * ModularIndexing(64 * i2 + i3, 64, 256)
        + 16384 * ModularIndexing(16384 * i1 + 64 * i2 + i3, 16384, 2)
        + 32768 * ModularIndexing(16384 * i1 + 64 * i2 + i3, 32768, 4)
        + 131072 * ModularIndexing(131072 * i0 + 16384 * i1 + 64 * i2 + i3, 131072, 4)
    )
    assert simplify(store, ranges) == 131072 * i0 + 16384 * i1 + 64 * i2 + i3
    # The grouped-query read of the same kernel: key head i1 // 2, not a division of the
    # whole offset.
    kv = 65536 * i0 + 256 * i2 + i3 + 64 * FloorDiv(16384 * i1 + 64 * i2 + i3, 32768)
    assert simplify(kv, ranges) == 65536 * i0 + 256 * i2 + i3 + 64 * FloorDiv(i1, 2)


def test_a_reduction_over_a_reshaped_batch_loads_with_a_stride():
    """The bias gradient of a (batch, tokens, features) activation, summed over a (tokens,
    features) view of it: every load and store of the fused kernel is linear in the
    reduction variable (no div or mod per element)."""
    x, m, b = torch.randn(2, 16, 256), torch.randn(32, 256), torch.randn(256)

    def fn(x, m, b):
        g = x * (m + b).view(2, 16, 256).tanh()
        return g, g.view(32, 256).sum(0)

    got, gm = run_fused(fn, (x, m, b), "reference")
    (kernel,) = [k.kernel for k in fused_kernels(gm)]
    indices = [v.arg.index for v in kernel.values if v.op == "load"]
    indices += [s.index for s in kernel.stores]
    assert not any(sympy.sympify(e).has(FloorDiv, ModularIndexing) for e in indices), indices
    for g, w in zip(got, fn(x, m, b)):
        torch.testing.assert_close(g, w)
