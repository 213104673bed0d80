"""The lower bound is a bound: `lower_bound_bytes <= bytes_moved` (and `<= eager_bytes` for
inference) on the built-in examples, the real models and random programs with gathers and
input mutations; and exact bounds, worked out by hand, for gathered tables and mutated
inputs (memopt/compiler/bound.py states the rules).

Training runs are not compared with eager: the bound counts each graph's inputs and
outputs, and the tensors the partition saves are both (a forward output and a backward
input), where eager keeps them in memory.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from passes.test_fusion_properties import SETTINGS, build, step

import memopt
from memopt.compiler.eager_count import count_eager_bytes
from memopt.driver.targets import load_target
from memopt.examples import EXAMPLES

import real_models

F32, I64 = 4, 8
ROWS = 3 * 8 * F32  # three rows of an (n, 8) float32 table: 96 bytes


def assert_bounded(a: memopt.Analysis, training: bool) -> None:
    for graph in a.graphs:
        assert graph.lower_bound_bytes <= graph.bytes_moved, graph.name
    if not training:
        assert a.lower_bound_bytes <= a.eager_bytes


# -- exact bounds: gathered tables (fix 1) --------------------------------------------------

# name -> (fn, inputs, lower_bound_bytes)
GATHER_CASES = {
    # Only gathered: the 3 rows read (768 bytes), not the 100000x64 table (25.6 MB); then
    # the index (24) and the output (768). Before: 25,600,792.
    "embedding_rows_read": (
        lambda w, i: F.embedding(i, w),
        (torch.randn(100000, 64), torch.tensor([1, 5, 7])),
        3 * I64 + 3 * 64 * F32 + 3 * 64 * F32,
    ),
    "index_select_rows_read": (
        lambda w, i: w.index_select(0, i),
        (torch.randn(1000, 8), torch.tensor([1, 5, 7])),
        3 * I64 + ROWS + ROWS,
    ),
    # Gathered through a view (permute): still 3 rows of 8 elements.
    "index_through_view": (
        lambda w, i: w.t()[i],
        (torch.randn(8, 1000), torch.tensor([1, 5, 7])),
        3 * I64 + ROWS + ROWS,
    ),
    # gather reads one element per output element: 2x8 of them.
    "gather_elements_read": (
        lambda w, i: w.gather(0, i),
        (torch.randn(100, 8), torch.tensor([[1] * 8, [5] * 8])),
        2 * 8 * I64 + 2 * 8 * F32 + 2 * 8 * F32,
    ),
    # Two gathers of 3 rows from a 4-row table: 6 lookups, at most the table's 4 rows.
    "two_gathers_capped_at_table": (
        lambda w, i, j: w[i] + w[j],
        (torch.randn(4, 8), torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3])),
        4 * 8 * F32 + 2 * 3 * I64 + ROWS,
    ),
    # Must not change: the table is also read whole (the sum), so it is charged whole.
    "table_also_read_whole": (
        lambda w, i: (F.embedding(i, w), w.sum(0)),
        (torch.randn(1000, 8), torch.tensor([1, 5, 7])),
        1000 * 8 * F32 + 3 * I64 + ROWS + 8 * F32,
    ),
}


@pytest.mark.parametrize("name", list(GATHER_CASES))
def test_gathered_table_bound(name):
    fn, inputs, bound = GATHER_CASES[name]
    a = memopt.analyze(fn, *inputs)
    assert a.lower_bound_bytes == bound
    assert_bounded(a, training=False)


@pytest.mark.parametrize(
    ("fn", "inputs", "moved"),
    [
        # Must change: two gathers of one table fused in one kernel look up 2 x 24
        # elements, capped at the 4x8 table (128), not 24 (96, below the bound of 272).
        (
            lambda w, i, j: w[i] + w[j],
            (torch.randn(4, 8), torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3])),
            4 * 8 * F32 + 2 * 3 * I64 + ROWS,
        ),
        # Must not change: one gather fused with a bias: 3 rows, the index, the bias.
        (
            lambda w, i, b: w[i] + b,
            (torch.randn(1000, 8), torch.tensor([1, 5, 7]), torch.randn(8)),
            ROWS + 3 * I64 + 8 * F32 + ROWS,
        ),
    ],
    ids=["two_gathers_one_table", "one_gather"],
)
def test_fused_gathers_count_each_lookup(fn, inputs, moved):
    a = memopt.analyze(fn, *inputs, check=True)
    assert a.bytes_moved == moved
    assert len(a.kernels) == 1
    assert a.lower_bound_bytes == moved
    torch.testing.assert_close(torch.compile(fn, backend="memopt")(*inputs), fn(*inputs))


# -- exact bounds: mutated inputs (fix 2) ---------------------------------------------------

A = 256 * 256 * F32  # a (256, 256) float32 input: 262144 bytes


def scale_in_place(x):
    x.mul_(2)
    return x


def scale_in_place_no_return(x):
    x.mul_(2)


def put_rows(a, idx, v):
    a[idx] = v


def put_columns(a, idx, v):
    a[:, idx] = v


def index_put_returned(a, idx, v):
    a.index_put_((idx,), v)
    return a


def put_in_slice(a, idx, v):
    a[1:3, idx] = v  # slice_scatter(a, index_put(slice(a), ...)): 2 x 8 elements


def put_row(a, v):
    a[2] = v  # core ATen: where(arange == 2, expand(v), a)


def add_rows(a, idx, v):
    a.index_add_(0, idx, v)  # accumulates: reads the rows it writes


def put_rows_then_read(a, idx, v):
    total = a.sum()
    a[idx] = v
    return total


def put_rows_then_scale(a, idx, v):
    a[idx] = v
    return a * 2


def overwrite_slice(x, y):
    return torch.slice_scatter(x, y, 0, 0, x.shape[0]) * 2  # y covers all of x


def overwrite_select(x, y):
    return torch.select_scatter(x[None], y, 0, 0) * 2  # dim 0 has size 1: all of x


def overwrite_part(x, y):
    return torch.slice_scatter(x, y[:4], 0, 0, 4) * 2  # rows 4.. of x are still read


def idx8():
    return torch.tensor([0, 3, 9, 27, 81, 100, 200, 255])


# name -> (fn, inputs, lower_bound_bytes)
MUTATION_CASES = {
    # Read once, written once; the returned copy_ is the mutated input. Before: 786432.
    "mul_returned": (scale_in_place, (torch.randn(256, 256),), 2 * A),
    # Must not change: 524288 before and after.
    "mul_not_returned": (scale_in_place_no_return, (torch.randn(256, 256),), 2 * A),
    # Read v and idx, write the 8 rows; `a` itself is not read. Before: 532544.
    "index_put_rows": (
        put_rows,
        (torch.randn(256, 256), idx8(), torch.randn(8, 256)),
        8 * 256 * F32 + 8 * I64 + 8 * 256 * F32,
    ),
    "index_put_columns": (
        put_columns,
        (torch.randn(256, 256), idx8(), torch.randn(256, 8)),
        256 * 8 * F32 + 8 * I64 + 256 * 8 * F32,
    ),
    "index_put_returned": (
        index_put_returned,
        (torch.randn(256, 256), idx8(), torch.randn(8, 256)),
        8 * 256 * F32 + 8 * I64 + 8 * 256 * F32,
    ),
    "index_put_in_slice": (
        put_in_slice,
        (torch.randn(256, 256), idx8(), torch.randn(2, 8)),
        2 * 8 * F32 + 8 * I64 + 2 * 8 * F32,
    ),
    "select_row": (put_row, (torch.randn(256, 256), torch.randn(256)), 2 * 256 * F32),
    "index_add_rows": (
        add_rows,
        (torch.randn(256, 256), idx8(), torch.randn(8, 256)),
        8 * 256 * F32 + 8 * I64 + 2 * 8 * 256 * F32,
    ),
    # `a` is also read whole (by the sum); the write is still the 8 rows.
    "index_put_input_also_read": (
        put_rows_then_read,
        (torch.randn(256, 256), idx8(), torch.randn(8, 256)),
        A + 8 * I64 + 8 * 256 * F32 + 8 * 256 * F32 + F32,
    ),
    # The updated value is read whole (a * 2): `a` read whole, 8 rows written, the output.
    "index_put_result_read": (
        put_rows_then_scale,
        (torch.randn(256, 256), idx8(), torch.randn(8, 256)),
        A + 8 * I64 + 8 * 256 * F32 + 8 * 256 * F32 + A,
    ),
    # A destination every element of which the source overwrites is not read. Before: 3 A.
    "slice_scatter_covering": (overwrite_slice, (torch.randn(256, 256),) * 2, 2 * A),
    "select_scatter_covering": (overwrite_select, (torch.randn(256, 256),) * 2, 2 * A),
    # x is read (not all overwritten), y's 4 rows only (it is read through a slice:
    # before, y whole, 3 A, above bytes_moved), the output written.
    "slice_scatter_partial": (
        overwrite_part,
        (torch.randn(256, 256), torch.randn(256, 256)),
        A + 4 * 256 * F32 + A,
    ),
}


@pytest.mark.parametrize("name", list(MUTATION_CASES))
def test_mutated_input_bound(name):
    fn, inputs, bound = MUTATION_CASES[name]
    a = memopt.analyze(fn, *inputs)
    assert a.lower_bound_bytes == bound
    assert_bounded(a, training=False)


def test_in_place_update_without_copy():
    """A graph that updates an input in place (what a pass may make of `copy_(a,
    index_put(a, ...))`) has the same bound: the rows written, `a` not read."""
    from memopt.compiler.bound import lower_bound
    from memopt.compiler.graph import annotate

    gm = torch.fx.experimental.proxy_tensor.make_fx(put_rows, tracing_mode="fake")(
        torch.randn(256, 256), idx8(), torch.randn(8, 256)
    )
    assert torch.ops.aten.index_put_.default in {n.target for n in gm.graph.nodes}
    annotate(gm)
    assert lower_bound(gm) == 8 * 256 * F32 + 8 * I64 + 8 * 256 * F32


# -- the eager counter: rows read, rows written ---------------------------------------------


def test_eager_embedding_reads_rows():
    # The table is embedding's argument 0 (weight): 3 rows of 64 read, not 100000.
    a = memopt.analyze(
        lambda w, i: F.embedding(i, w), torch.randn(100000, 64), torch.tensor([1, 5, 7])
    )
    assert a.eager_bytes == a.bytes_moved == a.lower_bound_bytes == 1560


TABLE = 1000 * 8 * F32  # a (1000, 8) float32 table: 32000 bytes


# Per gather: the op eager runs, and the ops of its backward with (read, write) bytes.
EAGER_TRAINING = {
    # embedding_dense_backward reads the gradient (96) and index (24), writes the dense
    # table gradient.
    "embedding": (
        lambda w, i: F.embedding(i, w),
        {"embedding_dense_backward": (ROWS + 3 * I64, TABLE)},
    ),
    # new_zeros (reads nothing), then a functional accumulate into the zeros: reads them
    # whole, with the gradient and index, and writes a new table gradient.
    "index": (
        lambda w, i: w[i],
        {"new_zeros": (0, TABLE), "index_put": (TABLE + ROWS + 3 * I64, TABLE)},
    ),
    "index_select": (
        lambda w, i: w.index_select(0, i),
        {"new_zeros": (0, TABLE), "index_add": (TABLE + ROWS + 3 * I64, TABLE)},
    ),
}


@pytest.mark.parametrize("name", list(EAGER_TRAINING))
def test_eager_gather_training(name):
    fn, backward = EAGER_TRAINING[name]
    table = torch.randn(1000, 8, requires_grad=True)
    index = torch.tensor([1, 5, 7])
    count = count_eager_bytes(fn, (table, index), training=True)
    by_op = {op.split(".")[1]: (e.read_bytes, e.write_bytes) for op, e in count.by_op.items()}
    expected = {
        name: (ROWS + 3 * I64, ROWS),  # forward: 3 rows and the index read, 3 rows written
        "ones_like": (0, ROWS),  # the backward's seed reads nothing
        **backward,
    }
    assert by_op == expected
    assert count.total_bytes == sum(r + w for r, w in expected.values())
    assert memopt.analyze(fn, table, index, training=True).eager_bytes == count.total_bytes


def test_eager_in_place_partial_updates():
    # a[idx] = v runs index_put_: v and idx read, 8 rows written (not the 256x256 input).
    args = (torch.randn(256, 256), idx8(), torch.randn(8, 256))
    assert count_eager_bytes(put_rows, args).total_bytes == 8 * 1024 + 8 * I64 + 8 * 1024
    # index_add_ accumulates: the 8 rows are read too.
    assert count_eager_bytes(add_rows, args).total_bytes == 8 * 1024 + 8 * I64 + 2 * 8 * 1024
    # A mask: its elements read, its true elements written.
    a, mask = torch.randn(16, 16), torch.zeros(16, 16, dtype=torch.bool)
    mask[2, :5] = True

    def put_masked(a, m, v):
        a[m] = v

    assert count_eager_bytes(put_masked, (a, mask, torch.tensor(1.0))).total_bytes == (
        256 + F32 + 5 * F32
    )


# -- the bound holds: built-in examples ---------------------------------------------------

# convnet and gpt2_block training take 10-30 s each here: full suite only.
SLOW_EXAMPLES = {("convnet", True), ("gpt2_block", True)}
EXAMPLE_CASES = [
    pytest.param(
        name,
        training,
        marks=[pytest.mark.slow] if (name, training) in SLOW_EXAMPLES else [],
        id=f"{name}-{'training' if training else 'inference'}",
    )
    for name in EXAMPLES
    for training in (False, True)
]


@pytest.mark.parametrize(("name", "training"), EXAMPLE_CASES)
def test_examples_bounded(name, training):
    target = load_target(name)
    if training:
        target = target.for_training()
    a = memopt.analyze(target.fn, *target.inputs, training=training)
    assert_bounded(a, training)


# -- the bound holds: real models at their small size -------------------------------------


# Every real model in inference, and GPT-2 in training: a real model's training analysis
# takes up to a minute here, and the examples above cover training graphs (bench/traffic.py
# prints every model's bound beside its bytes, training included).
REAL_CASES = [(name, False) for name in real_models.MODELS] + [("gpt2", True)]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "training"),
    REAL_CASES,
    ids=[f"{n}-{'training' if t else 'inference'}" for n, t in REAL_CASES],
)
def test_real_models_bounded(name, training):
    if name in real_models.HF_MODELS:
        pytest.importorskip("transformers")
    model, inputs = real_models.build(name, "small")
    if not training:
        model.eval()
    a = memopt.analyze(model, *inputs, training=training)
    assert_bounded(a, training)


# -- the bound holds: random programs with gathers and input mutations --------------------

# What the random program does besides the pointwise / reduction / view steps it shares
# with tests/passes/test_fusion_properties.py.
GATHERS = {
    "none": None,
    "embedding": lambda table, idx: F.embedding(idx, table),
    "index": lambda table, idx: table[idx],
    "index_select": lambda table, idx: table.index_select(0, idx),
    "two_gathers": lambda table, idx: table[idx] * table[idx.flip(0)],
}
MUTATIONS = ("none", "mul_", "rows", "columns", "slice", "row", "index_add_")


def mutate(kind: str, buf: torch.Tensor, idx: torch.Tensor, value: torch.Tensor) -> None:
    if kind == "mul_":
        buf.mul_(value.mean())
    elif kind == "rows":
        buf[idx] = value
    elif kind == "columns":
        buf[:, idx] = value.t()
    elif kind == "slice":
        buf[1:3] = value[:2]
    elif kind == "row":
        buf[1] = value[0]
    elif kind == "index_add_":
        buf.index_add_(0, idx, value)


def random_program(program, gather, table_read_whole, mutation, return_buffer):
    body = build(program)

    def fn(x, row, col, table, idx, buf, value):
        first, second = body(x, row, col)
        outputs = [first, second]
        if GATHERS[gather] is not None:
            outputs.append(GATHERS[gather](table, idx) + row)
        if table_read_whole:
            outputs.append(table.sum(0))
        mutate(mutation, buf, idx, value * first.mean())
        if return_buffer and mutation != "none":
            outputs.append(buf)
        return tuple(outputs)

    return fn


@settings(max_examples=15, **SETTINGS)
@given(
    program=st.lists(step, min_size=1, max_size=5),
    gather=st.sampled_from(sorted(GATHERS)),
    table_read_whole=st.booleans(),
    mutation=st.sampled_from(MUTATIONS),
    return_buffer=st.booleans(),
)
def test_random_programs_bounded(program, gather, table_read_whole, mutation, return_buffer):
    rows, cols = 6, 8
    fn = random_program(program, gather, table_read_whole, mutation, return_buffer)
    inputs = (
        torch.randn(rows, cols),
        torch.randn(1, cols),
        torch.randn(rows, 1),
        torch.randn(40, cols),  # the table: 40 rows, 3 gathered
        torch.tensor([4, 1, 7]),
        torch.randn(rows + 2, cols),  # the mutated buffer
        torch.randn(3, cols),
    )
    a = memopt.analyze(fn, *inputs)
    assert_bounded(a, training=False)
