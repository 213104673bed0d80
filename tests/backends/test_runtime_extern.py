"""Library matmuls with their large outputs in kept memory (backends/runtime/extern.py)."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from memopt.backends import memory
from memopt.backends.cpp import launcher
from memopt.backends.runtime.extern import (
    KeptOutputMatmul,
    KeptOutputSoftmax,
    RowScatterAdd,
    RowWrite,
    plan_library_calls,
)
from memopt.compiler.capture import capture

aten = torch.ops.aten


def _targets(gm, kind):
    return [n.target for n in gm.graph.nodes if isinstance(n.target, kind)]


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


@pytest.mark.parametrize("dim", [1, 0, -1])
def test_kept_output_softmax_is_atens_softmax(dim):
    """A lone softmax left to ATen, its 8 MiB result in kept memory: eager's bits; a strided
    input still gives a contiguous result, as ATen's does."""
    call = KeptOutputSoftmax()
    for x in (torch.randn(8192, 256), torch.randn(256, 8192).t()):
        want = aten._softmax.default(x, dim, False)
        got = call(x, dim, False)
        assert got.stride() == want.stride() and torch.equal(got, want)
        address = got.data_ptr()
        del got
        assert call(x, dim, False).data_ptr() == address
    small = torch.randn(16, 16)
    assert torch.equal(call(small, dim, False), torch.softmax(small, dim))


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
    assert plan_library_calls(gm) == 1
    (target,) = _targets(gm, KeptOutputMatmul)
    assert target.op is aten.mm.default
    assert memory.LARGE_NBYTES == 8 * 2**20
    for got, want in zip(gm(x, w_big, w_small), fn(x, w_big, w_small)):
        assert torch.equal(got, want)


def test_compiled_model_matmul_keeps_its_logits_memory():
    """End to end: a large-vocabulary head through torch.compile matches eager bit for bit."""
    x, w = torch.randn(512, 64), torch.randn(8192, 64)

    def fn(x, w):
        return torch.nn.functional.linear(x, w)

    # ATen's GEMM (the choice on machines where MKL is the faster library): oneDNN's has
    # no out= form (backends/runtime/gemm.py).
    compiled = torch.compile(fn, backend="memopt", options={"cpu_gemm": "aten"})
    first = compiled(x, w)
    assert torch.equal(first, fn(x, w))
    address = first.data_ptr()
    del first
    assert compiled(x, w).data_ptr() == address


# --- row scatter-adds ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    ["rows", "repeated rows", "int32 rows", "3-D table", "negative rows", "float64"],
)
def test_row_scatter_add_matches_index_put(case):
    """Same values as ATen's accumulating index_put (up to the order of float sums)."""
    dtype = torch.float64 if case == "float64" else torch.float32
    table = torch.randn(6, 3, 2) if case == "3-D table" else torch.randn(50, 8, dtype=dtype)
    high = table.shape[0]
    rows = torch.randint(0, high, (4, 5))
    if case == "repeated rows":
        rows = torch.zeros(4, 5, dtype=torch.int64)
    if case == "int32 rows":
        rows = rows.int()
    if case == "negative rows":  # index_put wraps them; index_add refuses: ATen's call runs
        rows = -rows - 1
    values = torch.randn(*rows.shape, *table.shape[1:], dtype=dtype)
    want = aten.index_put.default(table, [rows], values, True)
    got = RowScatterAdd()(table, [rows], values, True)
    torch.testing.assert_close(got, want)
    assert got.data_ptr() != table.data_ptr()  # functional: the input is left as it was


def test_row_scatter_add_errors_like_index_put():
    table, values = torch.zeros(10, 3), torch.ones(2, 3)
    with pytest.raises(IndexError, match="out of bounds"):
        RowScatterAdd()(table, [torch.tensor([10, 2])], values, True)


def test_only_accumulating_single_index_puts_run_as_index_add():
    """Must: index_put(x, [rows], v, accumulate=True). Must not: without accumulate, or with
    two index tensors (an element scatter, not rows)."""

    def fn(x, rows, cols, v, w):
        added = torch.ops.aten.index_put(x, [rows], v, True)
        replaced = torch.ops.aten.index_put(x, [rows], v, False)
        pointwise = torch.ops.aten.index_put(x, [rows, cols], w, True)
        return added, replaced, pointwise

    args = (
        torch.randn(20, 4),
        torch.randint(0, 20, (6,)),
        torch.randint(0, 4, (6,)),
        torch.randn(6, 4),
        torch.randn(6),
    )
    (graph,) = capture(fn, args)
    gm = graph.gm
    puts = [n for n in gm.graph.nodes if n.target is aten.index_put.default]
    assert len(puts) == 3
    plan_library_calls(gm)
    assert len(_targets(gm, RowScatterAdd)) == 1
    assert [n.args[3] for n in gm.graph.nodes if isinstance(n.target, RowScatterAdd)] == [True]
    for got, want in zip(gm(*graph.real_inputs), fn(*args)):
        torch.testing.assert_close(got, want)


def test_embedding_backward_through_torch_compile_matches_eager():
    emb = torch.nn.Embedding(300, 16)
    rows = torch.randint(0, 300, (4, 32))
    compiled = torch.compile(lambda r: emb(r).square().sum(), backend="memopt")
    compiled(rows).backward()
    got = emb.weight.grad.clone()
    emb.weight.grad = None
    emb(rows).square().sum().backward()
    torch.testing.assert_close(got, emb.weight.grad)


@pytest.mark.parametrize(
    "positions", [[3], [0, 5], [-1], [2, -6]], ids=["one", "two", "negative", "both"]
)
def test_row_write_matches_index_put_and_is_one_launch(positions):
    """A KV cache's rows written at positions along dim 2: ATen's values, bit for bit, the
    second call through the bound launch (negative positions count from the end)."""
    if launcher.module() is None:
        pytest.skip("no native launcher here")
    g = torch.Generator().manual_seed(0)
    index = torch.tensor(positions)
    write = RowWrite(2)
    for _ in range(2):  # binds, then launches
        cache = torch.randn(2, 3, 6, 4, generator=g)
        values = torch.randn(2, 3, len(positions), 4, generator=g)
        want = aten.index_put_.default(cache.clone(), [None, None, index], values)
        got = write(cache, [None, None, index], values)
        assert got is cache and torch.equal(cache, want)
    assert write._launch  # bound on the first call


def test_row_write_takes_atens_op_for_what_it_does_not_take():
    """Must not launch: accumulate, a non-contiguous cache, another dtype of values, an
    index outside the dimension (which raises as ATen raises)."""
    write = RowWrite(1)
    cache, values, index = torch.zeros(2, 5, 3), torch.ones(2, 1, 3), torch.tensor([4])
    write(cache, [None, index], values)  # binds
    strided = torch.zeros(2, 3, 5).transpose(1, 2)
    want = aten.index_put_.default(strided.clone(), [None, index], values)
    assert torch.equal(write(strided, [None, index], values), want)
    added = write(cache.clone(), [None, index], values, True)
    assert torch.equal(added, aten.index_put_.default(cache.clone(), [None, index], values, True))
    with pytest.raises(IndexError):
        write(cache, [None, torch.tensor([5])], values)
    doubles = torch.zeros(2, 5, 3, dtype=torch.float64)
    want = aten.index_put_.default(doubles.clone(), [None, index], values.double())
    assert torch.equal(write(doubles, [None, index], values.double()), want)


def test_only_row_writing_index_puts_are_pointed_at_row_writes():
    """Must: index_put_(x, [None, index], v). Must not: an index tensor before a None
    (elements, not rows), accumulating, or the functional index_put."""

    def fn(x, y, z, rows, cols, v, w):
        aten.index_put_.default(x, [None, rows], v)
        aten.index_put_.default(y, [rows, cols], w)
        aten.index_put_.default(z, [None, rows], v, True)
        return x + 1, y + 1, z + 1

    args = (
        torch.zeros(3, 8, 2),
        torch.zeros(8, 3, 2),
        torch.zeros(3, 8, 2),
        torch.tensor([1, 6]),
        torch.tensor([0, 2]),
        torch.ones(3, 2, 2),
        torch.ones(2, 2),
    )
    gm = make_fx(fn)(*(a.clone() for a in args))
    assert sum(n.target is aten.index_put_.default for n in gm.graph.nodes) == 3
    plan_library_calls(gm)
    assert [w.dim for w in _targets(gm, RowWrite)] == [1]
    inputs, want_inputs = [a.clone() for a in args], [a.clone() for a in args]
    for got, want in zip(gm(*inputs), fn(*want_inputs)):
        torch.testing.assert_close(got, want)
    for got, want in zip(inputs[:3], want_inputs[:3]):  # the buffers written in place
        torch.testing.assert_close(got, want)
