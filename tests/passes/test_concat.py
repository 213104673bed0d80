"""The concat pass: a library call writes its slice of a concatenation; exact bytes and
kernel counts, values against eager."""

from __future__ import annotations

import torch

import memopt

F32 = 4
N = 32
X = N * N * F32  # one float32 (32, 32) matrix: 4096 bytes


def run(fn, *inputs):
    a = memopt.analyze(fn, *inputs, check=True)
    torch.testing.assert_close(torch.compile(fn, backend="memopt")(*inputs), fn(*inputs))
    return a


def decisions(a):
    return [
        (d.code, d.applied)
        for p in a.graphs[0].ledger
        if p.pass_name == "concat"
        for d in p.decisions
    ]


def mats(k=3):
    return [torch.randn(N, N) for _ in range(k)]


def test_matmul_writes_its_slice_first():
    a = run(lambda x, w, y: torch.cat([x @ w, y.relu()]), *mats())
    # mm: x, w read, its half written; relu: y read, its half written. Nothing read back.
    assert a.bytes_moved == 2 * X + X + X + X
    assert len(a.kernels) == 2
    assert decisions(a) == [("concat.library_into_slice", True)]


def test_matmul_writes_its_slice_last_after_a_fused_part():
    a = run(lambda x, w, y: torch.cat([(y * 2).relu(), x @ w]), *mats())
    assert a.bytes_moved == 2 * X + X + X + X
    assert len(a.kernels) == 2


def test_matmul_writes_its_columns_of_a_concatenation_along_dim_1():
    a = run(lambda x, w, y: torch.cat([x @ w, y.relu()], 1), *mats())
    # The GEMM writes rows N apart from each other (its leading dimension is 2N).
    assert a.bytes_moved == 2 * X + X + X + X
    assert len(a.kernels) == 2


def test_matmul_between_other_parts_is_refused():
    a = run(lambda x, w, y: torch.cat([y.relu(), x @ w, y.exp()]), *mats())
    # mm written (X), then read with y by one kernel writing 3 X.
    assert a.bytes_moved == (2 * X + X) + (X + X + 3 * X)
    assert len(a.kernels) == 2
    assert decisions(a) == [("concat.refused_position", False)]


def test_matmul_read_elsewhere_is_left_alone():
    def both(x, w, y):
        p = x @ w
        return torch.cat([p, y]), p.sum()

    a = memopt.analyze(both, *mats(), check=True)
    assert decisions(a) == []
    # mm (read 2 X, write X), the concatenation (read 2 X, write 2 X), the sum.
    assert a.bytes_moved == 3 * X + 4 * X + (X + F32)
    assert len(a.kernels) == 3


def test_batched_matmul_along_its_last_dim_is_refused():
    def bmm_cat(x, w, y):
        return torch.cat([torch.bmm(x.view(4, 8, N), w.view(4, N, 8)), y.view(4, 8, N)], 2)

    a = run(bmm_cat, *mats())
    assert decisions(a) == [("concat.refused_layout", False)]
    # bmm written (4*8*8 floats) and read back by the concatenation kernel, with y.
    out = 4 * 8 * 8 * F32
    assert a.bytes_moved == (2 * X + out) + (out + X + (out + X))
    assert len(a.kernels) == 2


def test_linear_with_bias_writes_its_slice_as_addmm():
    bias = torch.randn(N)
    a = run(lambda x, w, y: torch.cat([torch.nn.functional.linear(x, w, bias), y]), *mats())
    # addmm reads x, w and the bias and writes its half; y is copied into the other half.
    assert a.bytes_moved == (2 * X + N * F32 + X) + (X + X)
    assert [k.ops for k in a.kernels][0] == ("aten.addmm.default into a slice",)
    assert decisions(a) == [("concat.library_into_slice", True)]
