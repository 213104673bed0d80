"""Property tests: random graphs of pointwise, reduction, broadcast and view ops.

Compiled equals eager (through the reference backend and through Triton's interpreter),
and fusion never increases bytes_moved.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memopt

UNARY = {
    "exp": lambda x: (x * 0.1).exp(),
    "tanh": torch.tanh,
    "relu": torch.relu,
    "neg": torch.neg,
    "sigmoid": torch.sigmoid,
    "abs": torch.abs,
}
BINARY = {"add": torch.add, "mul": torch.mul, "sub": torch.sub, "max": torch.maximum}
REDUCE = {
    "sum1": lambda x: x.sum(1, keepdim=True),
    "amax1": lambda x: x.amax(1, keepdim=True),
    "sum0": lambda x: x.sum(0, keepdim=True),
    "mean1": lambda x: x.mean(1, keepdim=True),
}
VIEW = {
    "transpose_roundtrip": lambda x: (x.t() * 2).t(),
    "reshape_roundtrip": lambda x: (x.reshape(-1) + 1).reshape(x.shape),
    "permute_exp": lambda x: x.permute(1, 0).exp().permute(1, 0) if x.dim() == 2 else x,
}

step = st.one_of(
    st.tuples(st.just("unary"), st.sampled_from(sorted(UNARY)), st.integers(0, 99)),
    st.tuples(
        st.just("binary"), st.sampled_from(sorted(BINARY)), st.integers(0, 99), st.integers(0, 99)
    ),
    st.tuples(st.just("reduce"), st.sampled_from(sorted(REDUCE)), st.integers(0, 99)),
    st.tuples(st.just("view"), st.sampled_from(sorted(VIEW)), st.integers(0, 99)),
)


def build(program):
    def fn(x, row, col):
        pool = [x, row, col]
        for op in program:
            kind, name, *picks = op
            args = [pool[p % len(pool)] for p in picks]
            if kind == "unary":
                pool.append(UNARY[name](args[0]))
            elif kind == "binary":
                pool.append(BINARY[name](args[0], args[1]))
            elif kind == "reduce":
                pool.append(REDUCE[name](args[0]))
            else:
                pool.append(VIEW[name](args[0]))
        return pool[-1], pool[len(pool) // 2 + 1]

    return fn


def inputs(rows, cols):
    return torch.randn(rows, cols), torch.randn(1, cols), torch.randn(rows, 1)


def assert_matches(fn, args, **options):
    compiled = torch.compile(fn, backend="memopt", options=options)
    for got, want in zip(compiled(*args), fn(*args)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@settings(max_examples=25, **SETTINGS)
@given(
    program=st.lists(step, min_size=1, max_size=8),
    rows=st.sampled_from([1, 3, 7]),
    cols=st.sampled_from([1, 5, 16]),
)
@pytest.mark.slow
def test_random_graphs_reference(program, rows, cols):
    torch._dynamo.reset()
    fn = build(program)
    args = inputs(rows, cols)
    fused = memopt.analyze(fn, *args, check=True, backend="reference")
    unfused = memopt.analyze(fn, *args, disable=["fusion"])
    assert fused.bytes_moved <= unfused.bytes_moved
    assert len(fused.kernels) <= len(unfused.kernels)
    assert_matches(fn, args, backend="reference")


@pytest.mark.slow
@settings(max_examples=8, **SETTINGS)
@given(
    program=st.lists(step, min_size=2, max_size=6),
    rows=st.sampled_from([3, 7]),
    cols=st.sampled_from([5, 16]),
)
def test_random_graphs_triton_interpreter(program, rows, cols):
    torch._dynamo.reset()
    fn = build(program)
    args = inputs(rows, cols)
    assert_matches(fn, args, backend="triton")
