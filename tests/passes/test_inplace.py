"""The inplace pass: updates of graph inputs and of dead buffers written where they
belong, with exact bytes and kernel counts, and eager's values and mutations."""

from __future__ import annotations

import torch

import memopt

F32 = 4
N = 16
X = N * N * F32  # one float32 (16, 16) tensor: 1024 bytes
ROW = N * F32
I64 = 8


def run(fn, *inputs):
    """Analyze (each pass checked against the unoptimized graph on real inputs) and run the
    compiled program: its outputs and the inputs it mutates must match eager's."""
    a = memopt.analyze(fn, *[t.clone() for t in inputs], check=True)
    mine, theirs = [t.clone() for t in inputs], [t.clone() for t in inputs]
    got = torch.compile(fn, backend="memopt")(*mine)
    want = fn(*theirs)
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip((*got, *mine), (*want, *theirs)):
        torch.testing.assert_close(g, w)
    return a


def decisions(a, pass_name):
    return [
        (d.code, d.applied)
        for p in a.graphs[0].ledger
        if p.pass_name == pass_name
        for d in p.decisions
    ]


def x16():
    return torch.randn(N, N)


# -- inplace: new values of inputs written into them -----------------------------------------


def test_lone_op_runs_as_its_out_variant_into_the_input():
    def scale(x):
        x.mul_(2)
        return x

    a = run(scale, x16())
    # mul.out(x, 2, out=x): x read once and written once; no new buffer, no copy back.
    assert a.bytes_moved == 2 * X
    assert [k.ops for k in a.kernels] == [("aten.mul.out",)]
    assert decisions(a, "inplace") == [("inplace.out_variant", True)]


def test_out_argument_gets_the_result_directly():
    a = run(lambda x, y: torch.mul(y, 2, out=x), x16(), x16())
    assert a.bytes_moved == 2 * X  # y read, x written: x itself is not read
    assert len(a.kernels) == 1


def test_kernel_stores_into_the_input_it_reads():
    def step(x):
        x.mul_(2).add_(1).relu_()
        return x

    a = run(step, x16())
    assert a.bytes_moved == 2 * X
    assert [k.kind for k in a.kernels] == ["pointwise"]
    assert decisions(a, "inplace") == [("inplace.kernel_destination", True)]


def test_kernel_stores_into_an_input_it_does_not_read():
    a = run(lambda x, y: torch.add(y.relu(), 1, out=x), x16(), x16())
    assert a.bytes_moved == 2 * X
    assert len(a.kernels) == 1


def test_momentum_step_updates_two_inputs_in_one_kernel():
    def momentum(p, g, m):
        m.mul_(0.9).add_(g)
        p.add_(m, alpha=-0.1)
        return p

    a = run(momentum, x16(), x16(), x16())
    # Reads p, g, m once; writes p and m once, each in place.
    assert a.bytes_moved == 5 * X
    assert len(a.kernels) == 1
    assert decisions(a, "inplace") == [("inplace.kernel_destination", True)] * 2


def test_updated_input_read_again_by_the_same_kernel():
    def update_then_sum(x, y):
        x.mul_(2).add_(y)
        return x.sum(0)

    a = run(update_then_sum, x16(), x16())
    assert a.bytes_moved == 2 * X + X + ROW  # x, y read; x written; the sums
    assert len(a.kernels) == 1


def test_kernel_reading_the_input_transposed_is_not_written_into_it():
    def transposed(x):
        y = x.t() * 2
        x.add_(y)
        return x

    a = run(transposed, x16())
    # Writing x while reading x.t() would read elements already overwritten: a new
    # buffer (read x, write) and the copy back (read, write).
    assert a.bytes_moved == 4 * X
    assert len(a.kernels) == 2
    assert decisions(a, "inplace") == [("inplace.refused_overlap", False)]


def test_value_that_is_also_an_output_is_not_written_into_the_input():
    def alias(x):
        y = x.mul_(2)
        return y.view(-1)

    a = run(alias, x16())
    assert a.bytes_moved == 4 * X
    assert len(a.kernels) == 2
    assert decisions(a, "inplace") == [("inplace.refused_alias", False)]


def test_lower_precision_input_takes_the_converted_result():
    def add16(x, y):
        x.add_(y)
        return x

    a = run(add16, torch.randn(N, N).half(), x16())
    # The add and the conversion to half are one kernel, storing into x.
    assert a.bytes_moved == X // 2 + X + X // 2
    assert len(a.kernels) == 1


# -- updates of some elements, in place ---------------------------------------------------------


def test_row_assignment_into_an_input_writes_only_the_rows():
    def assign(a, idx, v):
        a[idx] = v
        return a

    idx = torch.tensor([1, 7, 3])
    a = run(assign, x16(), idx, torch.randn(3, N))
    assert a.bytes_moved == 3 * I64 + 3 * ROW + 3 * ROW  # indices, values, the rows
    assert [k.ops for k in a.kernels] == [("aten.index_put_.default",)]
    assert decisions(a, "inplace") == [("inplace.update_in_place", True)]


def test_column_assignment_into_an_input_writes_only_the_columns():
    def assign(a, idx, v):
        a[:, idx] = v
        return a

    a = run(assign, x16(), torch.tensor([0, 9]), torch.randn(N, 2))
    assert a.bytes_moved == 2 * I64 + 2 * (N * F32) * 2
    assert len(a.kernels) == 1


def test_accumulating_rows_into_an_input():
    def accumulate(a, idx, v):
        a.index_add_(0, idx, v)
        return a

    a = run(accumulate, x16(), torch.tensor([2, 5]), torch.randn(2, N))
    # The two rows are read (accumulated) and written; values and indices read.
    assert a.bytes_moved == 2 * I64 + 2 * ROW + 2 * ROW + 2 * ROW
    assert len(a.kernels) == 1


def test_scatter_into_a_dead_buffer_is_made_in_place():
    def scatter(a, idx, src):
        return (a * 2).scatter_(1, idx, src)

    idx = torch.tensor([[3], [0]])
    a = run(scatter, x16(), idx, torch.randn(2, 1))
    # a * 2 (read, write), then two elements written, two indices and values read.
    assert a.bytes_moved == 2 * X + 2 * I64 + 2 * F32 + 2 * F32
    assert len(a.kernels) == 2
    assert decisions(a, "inplace") == [("inplace.update_in_place", True)]


def test_scatter_into_a_buffer_read_afterwards_stays_functional():
    def scatter(a, idx, src):
        b = a * 2
        return b.scatter(1, idx, src) + b

    idx = torch.tensor([[3], [0]])
    a = run(scatter, x16(), idx, torch.randn(2, 1))
    # b is read again: the scatter reads it and writes a new buffer.
    assert a.bytes_moved == 7192
    assert len(a.kernels) == 3
    assert decisions(a, "inplace") == []


def test_select_assignment_into_an_input():
    def assign(a, v):
        a[3] = v
        return a

    a = run(assign, x16(), torch.randn(N))
    assert decisions(a, "inplace")[0] == ("inplace.update_in_place", True)
    assert a.bytes_moved == 2 * ROW  # v read, one row of a written: not the whole input
    assert len(a.kernels) == 1


def test_slice_assignment_into_an_input():
    def assign(a, v):
        a[2:5] = v
        return a

    a = run(assign, x16(), torch.randn(3, N))
    assert a.bytes_moved == 2 * 3 * ROW
    assert len(a.kernels) == 1


def _cache_rows_reset_after_the_attention_reads_them(q, k_old, k_new, v_old, v_new):
    """Rows of two inputs overwritten after concatenations read them, an attention (a
    library op) between: the second row write's destination view is made late in the
    graph, after the op that would write it."""
    k = torch.cat([k_old, k_new], dim=-2)
    v = torch.cat([v_old, v_new], dim=-2)
    k_old[:, :, 3] = 0.0
    v_old[:, :, 5] = 7.0
    return torch.nn.functional.scaled_dot_product_attention(q, k, v), k, v


def test_an_out_variant_whose_destination_is_made_later_stays_in_its_place():
    """Must not: an op run as its out= overload where it is, into a view of an input that
    the graph makes only after it (the call would read the view before it exists; it
    broke the graph, which then fell back). Refused; eager's values and mutations."""
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 4, 1, 64), (1, 4, 40, 64), (1, 4, 1, 64), (1, 4, 40, 64), (1, 4, 1, 64)]
    inputs = [torch.randn(s, generator=g) for s in shapes]
    fn = _cache_rows_reset_after_the_attention_reads_them
    a = memopt.analyze(fn, *[t.clone() for t in inputs], cpu_attention="aten")
    refused = [
        d.reason
        for p in a.graphs[0].ledger
        if p.pass_name == "inplace"
        for d in p.decisions
        if d.code == "inplace.refused_order"
    ]
    assert any("is made after" in r for r in refused)
    mine, theirs = [t.clone() for t in inputs], [t.clone() for t in inputs]
    compiled = torch.compile(fn, backend="memopt", options={"cpu_attention": "aten"})
    for got, want in zip((*compiled(*mine), *mine), (*fn(*theirs), *theirs)):
        torch.testing.assert_close(got, want)


def _fresh_rows_copied_into_an_input(x, index, values):
    buffer = torch.zeros(N)
    buffer[index] = values
    x.copy_(buffer)
    return x.sum()


def test_fresh_memory_updated_then_copied_into_an_input_keeps_the_copy():
    """Must: rows written into fresh memory in place. Must not: take the copy of the new
    value into the input for the update's own copy back (it copies into another buffer):
    the input is written, as in eager (it once kept its old values)."""
    a = run(_fresh_rows_copied_into_an_input, torch.randn(N), torch.tensor([1, 3]), torch.ones(2))
    assert ("inplace.update_in_place", True) in decisions(a, "inplace")
