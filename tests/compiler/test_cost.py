"""Exact byte counts, worked out by hand: modelled (analyze) and counted (eager dispatch).

These test the cost model one ATen node at a time, so fusion is disabled; tests/passes/test_fusion.py
has the fused counts.
"""

from __future__ import annotations

import pytest
import torch

import memopt
from memopt.compiler.eager_count import count_eager_bytes

F32, I64 = 4, 8
X = 4 * 8 * F32  # a float32 (4, 8) tensor: 128 bytes


def x48():
    return torch.randn(4, 8)


# name -> (fn, inputs, bytes_moved, kernels, lower_bound_bytes, eager_bytes)
CASES = {
    # mul reads x and writes t; add reads t and writes y.
    "pointwise": (lambda x: x * 2 + 1, (x48(),), 4 * X, 2, 2 * X, 4 * X),
    # The (8,) bias is broadcast over 4 rows but read once: 8 elements.
    "broadcast": (
        lambda x, b: x + b,
        (x48(), torch.randn(8)),
        X + 8 * F32 + X,
        1,
        X + 8 * F32 + X,
        X + 8 * F32 + X,
    ),
    # Reads 32 elements, writes 4.
    "reduction": (lambda x: x.sum(1), (x48(),), X + 4 * F32, 1, X + 4 * F32, X + 4 * F32),
    # mean decomposes to sum then divide: two kernels where eager runs one.
    "mean": (
        lambda x: x.mean(1),
        (x48(),),
        (X + 4 * F32) + (4 * F32 + 4 * F32),
        2,
        X + 4 * F32,
        X + 4 * F32,
    ),
    # (4, 8) @ (8, 16): reads both operands once, writes (4, 16).
    "matmul": (
        lambda a, b: a @ b,
        (x48(), torch.randn(8, 16)),
        X + 8 * 16 * F32 + 4 * 16 * F32,
        1,
        X + 8 * 16 * F32 + 4 * 16 * F32,
        X + 8 * 16 * F32 + 4 * 16 * F32,
    ),
    # Views (view, permute) are free; only the exp moves bytes.
    "view_permute": (lambda x: x.view(2, 16).t().exp().t(), (x48(),), 2 * X, 1, 2 * X, 2 * X),
    # cat reads both inputs and writes their sum.
    "cat": (lambda x, y: torch.cat([x, y]), (x48(), x48()), 4 * X, 1, 4 * X, 4 * X),
    # Gathering 3 rows of a (10, 8) table reads those 3 rows (not the whole table) and the
    # index, and writes 3 rows. The bound too: an input used only as a gather's table is
    # charged the rows read.
    "indexing": (
        lambda t, i: t[i],
        (torch.randn(10, 8), torch.tensor([1, 5, 7])),
        (3 * I64 + 3 * 8 * F32) + 3 * 8 * F32,
        1,
        3 * I64 + 3 * 8 * F32 + 3 * 8 * F32,
        (3 * I64 + 3 * 8 * F32) + 3 * 8 * F32,
    ),
    "index_select": (
        lambda t, i: t.index_select(0, i),
        (torch.randn(10, 8), torch.tensor([2, 3])),
        (2 * I64 + 2 * 8 * F32) + 2 * 8 * F32,
        1,
        2 * I64 + 2 * 8 * F32 + 2 * 8 * F32,
        (2 * I64 + 2 * 8 * F32) + 2 * 8 * F32,
    ),
    # An embedding lookup of 3 rows in a (1000, 8) table: the table is the weight (argument
    # 0): 3 rows read, not 1000.
    "embedding": (
        lambda t, i: torch.nn.functional.embedding(i, t),
        (torch.randn(1000, 8), torch.tensor([1, 5, 7])),
        (3 * I64 + 3 * 8 * F32) + 3 * 8 * F32,
        1,
        3 * I64 + 3 * 8 * F32 + 3 * 8 * F32,
        (3 * I64 + 3 * 8 * F32) + 3 * 8 * F32,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_exact_bytes(name):
    fn, inputs, moved, kernels, bound, eager = CASES[name]
    a = memopt.analyze(fn, *inputs, disable=["fusion"])
    assert a.bytes_moved == moved
    assert len(a.kernels) == kernels
    assert a.lower_bound_bytes == bound
    assert a.eager_bytes == eager
    assert count_eager_bytes(fn, inputs).total_bytes == eager
    assert sum(k.nbytes for k in a.kernels) == a.bytes_moved


def test_lower_bound_skips_outputs_that_alias_inputs():
    # The view is returned without a write; only the exp's output is compulsory.
    a = memopt.analyze(lambda x: (x.view(32), x.exp()), x48(), disable=["fusion"])
    assert a.lower_bound_bytes == X + X


def test_matmul_flops_and_prediction():
    a = memopt.analyze(lambda a, b: a @ b, torch.randn(64, 32), torch.randn(32, 16))
    (kernel,) = a.kernels
    assert kernel.kind == "extern"
    assert kernel.flops == 2 * 64 * 32 * 16
    from memopt.compiler.devices import get_device

    h100 = get_device("h100")
    expected = max(kernel.nbytes / h100.bandwidth_bytes_per_s, kernel.flops / h100.fp32_flops_per_s)
    assert a.predict("h100") == pytest.approx(expected)


def test_training_counts_forward_and_backward():
    w = torch.randn(8, 16, requires_grad=True)
    x = torch.randn(4, 8)

    def fn(x, w):
        return (x @ w).relu()

    a = memopt.analyze(fn, x, w, training=True, disable=["fusion"])
    assert [g.name for g in a.graphs] == ["forward", "backward"]
    assert a.bytes_moved == sum(g.bytes_moved for g in a.graphs)
    # The backward reads the saved relu output (or mask) and the gradient seed at least.
    backward = a.graphs[1]
    assert backward.bytes_moved > 0
    assert w.grad is None  # analyze leaves no gradients behind
    # eager: forward (mm, relu) and backward all counted
    assert a.eager_bytes == count_eager_bytes(fn, (x, w), training=True).total_bytes
    assert a.eager_bytes > count_eager_bytes(fn, (x, w)).total_bytes


def test_module_training_leaves_grads_untouched():
    model = torch.nn.Linear(8, 4)
    a = memopt.analyze(model, torch.randn(2, 8), training=True)
    assert all(p.grad is None for p in model.parameters())
    assert len(a.graphs) == 2


def test_analyze_json_is_labelled():
    a = memopt.analyze(lambda x: x * 2 + 1, x48())
    totals = a.to_dict()["totals"]
    assert totals["eager_bytes"]["label"] == "counted"
    assert totals["bytes_moved"]["label"] == "modelled"
    assert totals["lower_bound_bytes"]["label"] == "modelled"
