"""The cleanup pass's no-op algebra: integer rounding, neutral arithmetic, and scatters and
copies whose destination is entirely overwritten. Each rewrite has cases that must change and
cases that must not, with exact bytes and kernels; values are compared with eager through
analyze(check=True) and torch.compile(backend="memopt").

(The pipeline's own tests, and cleanup's CSE, dead code and no-op copies and views, are in
test_pipeline.py.)
"""

from __future__ import annotations

import pytest
import torch

import memopt

F32 = 4
X = 8 * 16 * F32  # one float32 (8, 16) tensor: 512 bytes
I64 = 8 * 16 * 8  # one int64 (8, 16) tensor: 1024 bytes


def check(fn, *inputs, **options):
    """Analyze with check=True (every pass compared with eager on real inputs) and run the
    compiled program against eager, on copies of the inputs (some programs mutate them)."""
    a = memopt.analyze(fn, *[t.clone() for t in inputs], check=True, **options)
    compiled = torch.compile(fn, backend="memopt", options={"check": False, **options})
    got_inputs, want_inputs = [t.clone() for t in inputs], [t.clone() for t in inputs]
    got, want = compiled(*got_inputs), fn(*want_inputs)
    for g, w in zip(
        got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)
    ):
        if w is None:
            assert g is None
            continue
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
        assert g.dtype == w.dtype and g.stride() == w.stride()
    for g, w in zip(got_inputs, want_inputs):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
    return a


def decisions(a):
    """The cleanup pass's decisions as (code, applied, bytes)."""
    return [
        (d.code.removeprefix("cleanup."), d.applied, d.bytes_saved)
        for p in a.ledger
        if p.pass_name == "cleanup"
        for d in p.decisions
    ]


def ops(a):
    return [op for k in a.kernels for op in k.ops]


def x816(dtype=torch.float32):
    return torch.randn(8, 16).to(dtype)


def ints(dtype=torch.int64):
    low = 0 if dtype is torch.uint8 else -9
    return torch.randint(low, 9, (8, 16)).to(dtype)


# -- ceil, floor, round, trunc of integers ------------------------------------------------


@pytest.mark.parametrize(
    "rounding, dtype",
    [
        (torch.ceil, torch.int32),
        (torch.floor, torch.uint8),
        (torch.round, torch.int64),
        (torch.trunc, torch.int16),
    ],
)
def test_rounding_an_integer_tensor_costs_nothing(rounding, dtype):
    a = check(lambda i: rounding(i).cumsum(1), ints(dtype))
    nbytes = 8 * 16 * dtype.itemsize
    # Before: the rounding kernel (read + write) and the cumsum (read, write int64).
    # After: the cumsum alone, reading the input.
    assert a.bytes_moved == nbytes + I64
    assert ops(a) == ["aten.cumsum.default"]
    assert decisions(a) == [("noop_removed", True, 2 * nbytes)]


def test_rounding_floats_is_kept():
    a = check(lambda x: torch.round(x * 4).cumsum(1), x816())
    assert a.bytes_moved == (X + X) + (X + X)
    assert len(a.kernels) == 2 and decisions(a) == []


def test_rounded_integer_output_is_kept_as_a_copy():
    a = check(lambda i: torch.ceil(i), ints())
    assert a.bytes_moved == 2 * I64 and ops(a) == ["aten.ceil.default"]
    assert decisions(a) == [("noop_kept_output", False, 2 * I64)]


# -- neutral arithmetic ---------------------------------------------------------------------

# x op scalar, then a cumsum (a kernel of its own, so the op would be one too).
NEUTRAL = {
    "float x * 1": (lambda x: x * 1, torch.float32),
    "float x / 1": (lambda x: x / 1, torch.float16),
    "float x - 0": (lambda x: x - 0, torch.bfloat16),
    "float pow(x, 1)": (lambda x: torch.pow(x, 1), torch.float32),
    "float x ** 1.0": (lambda x: x**1.0, torch.float64),
    "float x + -0.0": (lambda x: x + -0.0, torch.float32),
    "int x * 1": (lambda i: i * 1, torch.int64),
    "int x - 0": (lambda i: i - 0, torch.int32),
    "int x + 0": (lambda i: i + 0, torch.int64),
    "int x ** 1": (lambda i: i**1, torch.int16),
    "int x // 1": (lambda i: i // 1, torch.int32),
}
NOT_NEUTRAL = {
    # An int tensor times 1.0 is a float tensor: a cast.
    "int x * 1.0": (lambda i: i * 1.0, torch.int64, torch.float32),
    # -0.0 + 0 is +0.0.
    "float x + 0": (lambda x: x + 0, torch.float32, torch.float32),
    # -0.0 - (-0.0) is +0.0.
    "float x - -0.0": (lambda x: x - -0.0, torch.float32, torch.float32),
    # floor(x / 1) is floor(x).
    "float x // 1": (lambda x: x // 1, torch.float32, torch.float32),
}


def _with_signed_zeros(t):
    t = t.clone()
    if t.dtype.is_floating_point:
        t[0, :4] = torch.tensor([-0.0, 0.0, float("inf"), -float("inf")])
    return t


@pytest.mark.parametrize("name", NEUTRAL)
def test_neutral_arithmetic_costs_nothing(name):
    op, dtype = NEUTRAL[name]
    x = _with_signed_zeros(ints(dtype) if not dtype.is_floating_point else x816(dtype))
    a = check(lambda x: op(x).cumsum(1), x)
    nbytes = 8 * 16 * dtype.itemsize
    out = 8 * 16 * (8 if not dtype.is_floating_point else dtype.itemsize)  # ints sum to int64
    assert a.bytes_moved == nbytes + out
    assert ops(a) == ["aten.cumsum.default"]
    assert decisions(a) == [("noop_removed", True, 2 * nbytes)]


@pytest.mark.parametrize("name", NOT_NEUTRAL)
def test_arithmetic_that_changes_a_value_or_dtype_is_kept(name):
    op, dtype, result_dtype = NOT_NEUTRAL[name]
    x = _with_signed_zeros(ints(dtype) if not dtype.is_floating_point else x816(dtype))
    a = check(lambda x: op(x).cumsum(1), x)
    nbytes, result = 8 * 16 * dtype.itemsize, 8 * 16 * result_dtype.itemsize
    assert a.bytes_moved == (nbytes + result) + (result + result)
    assert len(a.kernels) == 2 and decisions(a) == []


@pytest.mark.parametrize(
    "op, removed",
    [
        (lambda x: x + -0.0, True),
        (lambda x: x - 0.0, True),
        (lambda x: x + 0.0, False),
        (lambda x: x - -0.0, False),
    ],
)
def test_signed_zeros_survive(op, removed):
    x = _with_signed_zeros(x816())
    a = check(lambda x: op(x) * 2, x)
    assert a.bytes_moved == 2 * X and len(a.kernels) == 1
    assert bool(decisions(a)) == removed
    got = torch.compile(lambda x: op(x) * 2, backend="memopt")(x)
    assert torch.equal(torch.signbit(got), torch.signbit(op(x) * 2))


def test_neutral_arithmetic_output_is_kept():
    a = check(lambda i: i * 1, ints())
    assert a.bytes_moved == 2 * I64 and ops(a) == ["aten.mul.Tensor"]
    assert decisions(a) == [("noop_kept_output", False, 2 * I64)]


# -- slice_scatter and select_scatter over the whole destination ---------------------------


@pytest.mark.parametrize(
    "scatter",
    [
        lambda x, y: torch.slice_scatter(x, y, 0, 0, x.shape[0]),
        lambda x, y: torch.slice_scatter(x, y, 1),
        lambda x, y: torch.select_scatter(x[None], y, 0, 0),
        lambda x, y: torch.select_scatter(x[:, None], y, 1, -1),
    ],
    ids=["slice dim 0", "slice dim 1", "select dim 0", "select dim 1 index -1"],
)
def test_scatter_over_the_whole_destination_reads_only_the_source(scatter):
    a = check(lambda x, y: scatter(x, y) * 2, x816(), x816())
    # Before: one kernel read x and y and wrote the result (3X); now x is not read.
    assert a.bytes_moved == 2 * X and ops(a) == ["aten.mul.Tensor"]
    codes = [(code, applied) for code, applied, _ in decisions(a) if code != "dead_code"]
    assert ("overwritten", True) in codes and ("noop_removed", True) in codes
    overwritten = next(d for d in decisions(a) if d[0] == "overwritten")
    assert overwritten[2] in (X, X + 1)  # x; for select_scatter also its 1-byte condition


@pytest.mark.parametrize(
    "scatter, nbytes",
    [
        # Reads x (rows the source does not cover), the 4 source rows, writes the result.
        (lambda x, y: torch.slice_scatter(x, y[:4], 0, 0, 4), X + X // 2 + X),
        (lambda x, y: torch.select_scatter(x, y[0], 0, 3), X + 16 * F32 + X),
    ],
    ids=["slice", "select"],
)
def test_partial_scatter_is_kept(scatter, nbytes):
    a = check(lambda x, y: scatter(x, y) * 2, x816(), x816())
    assert a.bytes_moved == nbytes and len(a.kernels) == 1
    assert [d for d in decisions(a) if d[0] != "noop_removed"] == []


@pytest.mark.parametrize(
    "scatter, saved",
    [
        (lambda x, y: torch.slice_scatter(x, y, 0), X),
        (lambda x, y: torch.select_scatter(x[None], y, 0, 0), X),
    ],
    ids=["slice", "select"],
)
def test_scatter_of_an_input_into_the_output_becomes_a_kept_copy(scatter, saved):
    a = check(scatter, x816(), x816())
    # The result is an output; y itself would alias an input, so it is a copy of y (2X),
    # not a scatter reading x too (3X).
    assert a.bytes_moved == 2 * X and ops(a) == ["aten.clone.default"]
    got = [d for d in decisions(a) if d[0] in ("overwritten", "noop_kept_output")]
    assert got == [("overwritten", True, saved), ("noop_kept_output", False, 2 * X)]


# -- copies into a buffer whose contents are all overwritten -------------------------------


def copy_into_empty(x):
    buf = torch.empty_like(x)
    buf.copy_(x * 2)
    return buf + 1


def copy_into_zeros(x):
    return torch.zeros_like(x).copy_(x * 2) + 1


def copy_returned(x):
    buf = torch.empty_like(x)
    buf.copy_(x * 2)
    return buf


@pytest.mark.parametrize("fn", [copy_into_empty, copy_into_zeros, copy_returned])
def test_copy_into_a_fresh_buffer_costs_nothing(fn):
    a = check(fn, x816())
    # Before: the buffer's fill, the multiply, and a copy reading both (4096 or 3072 B in 3
    # or 4 kernels); now one kernel reads x and writes the result.
    assert a.bytes_moved == 2 * X and len(a.kernels) == 1
    assert ("overwritten", True, X) in decisions(a)
    assert ("noop_removed", True, 2 * X) in decisions(a)


def test_copy_with_a_cast_or_transpose_writes_the_source_once():
    def cast(x):
        buf = torch.empty(x.shape, dtype=torch.float16)
        buf.copy_(x * 2)
        return buf + 1

    def transposed(x):
        buf = torch.empty(16, 8).t()
        buf.copy_(x * 2)
        return buf + 1

    a = check(cast, x816())
    assert a.bytes_moved == X + 8 * 16 * 2 and len(a.kernels) == 1  # was 2560 B, 3 kernels
    assert ("overwritten", True, 8 * 16 * 2) in decisions(a)
    a = check(transposed, x816())
    assert a.bytes_moved == 2 * X and len(a.kernels) == 1  # was 3584 B, 3 kernels
    assert ("overwritten", True, X) in decisions(a)


def test_copy_of_an_input_that_is_returned_stays_a_copy():
    def fn(x):
        buf = torch.empty_like(x)
        buf.copy_(x)
        return buf

    a = check(fn, x816())
    assert a.bytes_moved == 2 * X and ops(a) == ["aten.clone.default"]
    assert ("noop_kept_output", False, 2 * X) in decisions(a)


def test_copy_of_a_mutated_input_into_another_input_is_kept():
    def swap(a, b):
        t = torch.empty_like(a)
        t.copy_(a)
        a.copy_(b)
        b.copy_(t)

    a = check(swap, x816(), x816())
    # A copy that keeps a's values from before; b's copy runs as clone.out straight into a
    # (the inplace pass), and the kept values are written back into b.
    assert a.bytes_moved == 3 * (2 * X)
    assert ops(a) == ["aten.clone.default", "aten.clone.out", "aten.copy_.default"]
    kept = [d for d in decisions(a) if d[0] == "noop_kept_mutated"]
    assert kept == [("noop_kept_mutated", False, 2 * X)] * 2


def test_copy_into_part_of_a_buffer_keeps_the_rest_read():
    def fn(x, y):
        buf = x + 3  # (not x * 3: the fused x * 3 + 1 may round once, as an FMA)
        buf[:4].copy_(y[:4])
        return buf + 1

    a = check(fn, x816(), x816())
    # The slice_scatter still reads the rows of buf the copy does not write (fused with the
    # multiply: x is read once); the copy of y's rows into the slice is gone (was 3072 B).
    assert a.bytes_moved == X + X // 2 + X and len(a.kernels) == 1
    assert "aten.slice_scatter.default" in ops(a)


def test_copy_broadcast_to_symbolic_sizes_is_kept_and_recorded():
    def fn(x):
        buf = torch.empty_like(x)
        buf.copy_(x[0] * 2)
        return buf + 1

    a = memopt.analyze(fn, x816(), dynamic=True, check=True)
    assert ("overwritten_kept", False, X) in decisions(a)
    assert "aten.copy.default" in ops(a)
    assert a.bytes_moved == 2752 and len(a.kernels) == 4
