"""Dynamic shapes: byte figures are sympy expressions of the symbolic sizes."""

from __future__ import annotations

import sympy
import torch

import memopt


def test_bytes_are_expressions_in_the_symbolic_sizes():
    x = torch.randn(6, 10)
    static = memopt.analyze(lambda x: x * 2 + 1, x)
    dynamic = memopt.analyze(lambda x: x * 2 + 1, x, dynamic=True)
    expr = dynamic.bytes_moved_expr
    symbols = sorted(expr.free_symbols, key=str)
    assert len(symbols) == 2  # both dims
    rows, cols = symbols
    # One fused kernel reads and writes rows*cols float32 elements.
    assert sympy.simplify(expr - 2 * 4 * rows * cols) == 0
    assert dynamic.bytes_moved == static.bytes_moved == 2 * 4 * 6 * 10
    assert dynamic.graphs[0].symbols == {str(rows): 6, str(cols): 10} or sorted(
        dynamic.graphs[0].symbols.values()
    ) == [6, 10]


def test_dynamic_module_training():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16))
    a = memopt.analyze(model, torch.randn(5, 8), dynamic=True, training=True)
    assert a.bytes_moved_expr.free_symbols
    batch = next(iter(a.bytes_moved_expr.free_symbols))
    # Every figure is linear in the batch size: doubling the batch adds the same again.
    per_row = a.bytes_moved_expr.diff(batch)
    assert per_row.is_number and per_row > 0
    assert a.bytes_moved == int(a.bytes_moved_expr.subs(batch, 5))


def test_lower_bound_is_symbolic_too():
    a = memopt.analyze(lambda x, y: x + y, torch.randn(3, 5), torch.randn(3, 5), dynamic=True)
    assert a.lower_bound_expr.free_symbols
    assert a.lower_bound_bytes == 3 * 3 * 5 * 4


def test_dynamic_layer_norm_is_still_one_kernel():
    """Mean and variance divide by a symbolic count: the kernel computes it from sizes."""

    def fn(x, w, b):
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b)

    x, w, b = torch.randn(6, 10), torch.randn(10), torch.randn(10)
    a = memopt.analyze(fn, x, w, b, dynamic=True, check=True)
    assert len(a.kernels) == 1
    rows, cols = sorted(a.bytes_moved_expr.free_symbols, key=str)
    # Reads x, w and b once, writes the output once.
    assert sympy.simplify(a.bytes_moved_expr - 4 * (2 * rows * cols + 2 * cols)) == 0 or (
        sympy.simplify(a.bytes_moved_expr - 4 * (2 * rows * cols + 2 * rows)) == 0
    )
    compiled = torch.compile(fn, backend="memopt", dynamic=True)
    for n in (3, 9):
        x = torch.randn(n, 10)
        torch.testing.assert_close(compiled(x, w, b), fn(x, w, b))
