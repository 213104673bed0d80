"""Library matmuls with their large outputs in kept memory (backends/runtime/extern.py)."""

import pytest
import torch

from memopt.backends import memory
from memopt.backends.runtime.extern import KeptOutputMatmul, keep_matmul_outputs
from memopt.compiler.capture import capture

aten = torch.ops.aten


def _matmul_targets(gm):
    return [n.target for n in gm.graph.nodes if isinstance(n.target, KeptOutputMatmul)]


@pytest.mark.parametrize(
    "op, args",
    [
        (aten.mm.default, lambda: (torch.randn(1024, 64), torch.randn(64, 2048))),
        (aten.mm.default, lambda: (torch.randn(1024, 64), torch.randn(2048, 64).t())),
        (aten.bmm.default, lambda: (torch.randn(4, 512, 32), torch.randn(4, 32, 1024))),
        (
            aten.addmm.default,
            lambda: (torch.randn(2048), torch.randn(1024, 64), torch.randn(64, 2048)),
        ),
        (
            aten.baddbmm.default,
            lambda: (torch.randn(4, 512, 1024), torch.randn(4, 512, 32), torch.randn(4, 32, 1024)),
        ),
    ],
)
def test_kept_output_matmul_is_the_library_call(op, args):
    """Same values as the functional op, bit for bit (the same BLAS call), same layout."""
    inputs = args()
    call = KeptOutputMatmul(op)
    want = op(*inputs)
    got = call(*inputs)
    assert got.stride() == want.stride() and got.dtype == want.dtype
    assert torch.equal(got, want)
    address = got.data_ptr()
    del got
    again = call(*inputs)  # nothing holds the first result: its memory again
    assert again.data_ptr() == address
    third = call(*inputs)  # `again` is held: fresh memory
    assert third.data_ptr() != again.data_ptr()
    assert torch.equal(again, want) and torch.equal(third, want)


def test_small_results_and_recorded_grads_take_the_functional_op():
    call = KeptOutputMatmul(aten.mm.default)
    a, b = torch.randn(64, 64), torch.randn(64, 64)  # 16 KiB: below memory.LARGE_NBYTES
    assert torch.equal(call(a, b), a @ b)
    big_a = torch.randn(1024, 64, requires_grad=True)
    big_b = torch.randn(64, 2048)
    with torch.enable_grad():  # out= cannot record autograd: the functional op does
        result = call(big_a, big_b)
    assert result.grad_fn is not None
    assert torch.equal(result.detach(), big_a.detach() @ big_b)
    assert not call._memory._kept  # neither call took kept memory


def test_only_matmuls_that_can_be_large_are_pointed_at_kept_memory():
    """Must: a 1024x2048 fp32 result (8 MiB). Must not: a 1024x1024 one (4 MiB)."""

    def fn(x, w_big, w_small):
        return x @ w_big, x @ w_small

    x, w_big, w_small = torch.randn(1024, 64), torch.randn(64, 2048), torch.randn(64, 1024)
    (graph,) = capture(fn, (x, w_big, w_small))
    gm = graph.gm
    assert keep_matmul_outputs(gm) == 1
    (target,) = _matmul_targets(gm)
    assert target.op is aten.mm.default
    assert memory.LARGE_NBYTES == 8 * 2**20
    for got, want in zip(gm(x, w_big, w_small), fn(x, w_big, w_small)):
        assert torch.equal(got, want)


def test_compiled_model_matmul_keeps_its_logits_memory():
    """End to end: a large-vocabulary head through torch.compile matches eager bit for bit."""
    x, w = torch.randn(512, 64), torch.randn(8192, 64)

    def fn(x, w):
        return torch.nn.functional.linear(x, w)

    compiled = torch.compile(fn, backend="memopt")
    first = compiled(x, w)
    assert torch.equal(first, fn(x, w))
    address = first.data_ptr()
    del first
    assert compiled(x, w).data_ptr() == address
