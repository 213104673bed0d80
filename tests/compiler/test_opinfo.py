"""A slice of the OpInfo sweep (bench/opinfo_sweep.py runs all of op_db): torch's own sample
inputs for the ops memopt lowers most, compiled with the default backend (C++ kernels on this
CPU) and compared with eager. A mismatch or an error fails; a visible fallback passes
(never a wrong answer). The known-failure list is checked against op_db.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

pytest.importorskip("expecttest")  # torch.testing._internal imports it

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))

import opinfo_sweep  # noqa: E402

from opinfo_known_failures import KNOWN_FAILURES  # noqa: E402

pytestmark = pytest.mark.slow  # the full suite only

# One or two ops of each kind the lowering handles: pointwise (unary, binary, ternary,
# comparisons, casts), reductions (including var/softmax/norms, which decompose into
# several), views, gathers, cat, fills, and composites decomposed by capture.
OPS = (
    "add",
    "mul",
    "div.floor_rounding",
    "sub",
    "pow",
    "maximum",
    "where",
    "clamp",
    "exp",
    "log1p",
    "tanh",
    "sigmoid",
    "erf",
    "rsqrt",
    "abs",
    "ne",
    "logical_and",
    "nn.functional.gelu",
    "nn.functional.silu",
    "nn.functional.hardswish",
    "nn.functional.leaky_relu",
    "softmax",
    "log_softmax",
    "nn.functional.layer_norm",
    "nn.functional.group_norm",
    "nn.functional.batch_norm",
    "sum",
    "mean",
    "var",
    "var_mean",
    "amax",
    "argmax",
    "prod",
    "any",
    "transpose",
    "permute",
    "expand",
    "index_select",
    "gather",
    "nn.functional.embedding",
    "cat",
    "full_like",
    "arange",
    "masked_fill",
    "addcmul",
    "lerp",
    "nn.functional.embedding_bag",
)
SAMPLES_PER_OP = 2


def _ops():
    ops = opinfo_sweep.float32_ops(OPS)
    found = {opinfo_sweep.op_label(op) for op in ops} | {op.name for op in ops}
    missing = [name for name in OPS if name not in found]
    assert not missing, f"not OpInfo names with float32 CPU samples: {missing}"
    return ops


@pytest.mark.parametrize("name", OPS)
def test_opinfo_samples_match_eager(name):
    ops = [op for op in _ops() if name in (op.name, opinfo_sweep.op_label(op))]
    assert ops
    results = opinfo_sweep.sweep(ops, max_samples=SAMPLES_PER_OP, backend="auto")
    compared = [r for r in results if r.outcome in ("pass", "fallback")]
    bad = [
        f"{r.op}[{r.sample}] {r.outcome}: {r.detail}"
        for r in results
        if r.outcome in ("mismatch", "error")
    ]
    assert not bad, "\n".join(bad)
    assert compared, [f"{r.outcome}: {r.detail}" for r in results]


def test_known_failures_name_real_opinfos_with_a_reason():
    from torch.testing._internal.common_methods_invocations import op_db

    labels = {opinfo_sweep.op_label(op) for op in op_db}
    assert set(KNOWN_FAILURES) <= labels, set(KNOWN_FAILURES) - labels
    for label, reason in KNOWN_FAILURES.items():
        category, _, why = reason.partition(":")
        assert category and why.strip(), label


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: torch.var(x, dim=0, correction=2),  # N - correction < 0: eager gives nan
        lambda x: torch.std(x[:1], correction=1),  # 0 / 0
        lambda x: torch.logsumexp(x[0], 0),  # a 0-dim tensor reduced along dim 0
    ],
    ids=["var_correction_past_n", "std_one_element", "logsumexp_0dim"],
)
def test_reduction_edge_samples_from_the_sweep(fn):
    """Samples the full sweep found past the first two of their ops."""
    x = torch.randn(1, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(fn, backend="memopt")(x)
    assert not [w for w in caught if str(w.message).startswith("memopt")]
    torch.testing.assert_close(got, fn(x), equal_nan=True)


def test_graph_with_a_tensor_constant_is_optimized():
    """masked.* reductions (found by the sweep) build a tensor constant in the program; the
    passes copy graphs under AOTAutograd's fake mode, where copying it used to fail."""
    fn = lambda x: torch.where(x > 0, x, torch.tensor(-1.0)).sum(0)  # noqa: E731
    x = torch.randn(4, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(fn, backend="memopt")(x)
    assert not [w for w in caught if str(w.message).startswith("memopt")]
    torch.testing.assert_close(got, fn(x))


def test_group_norm_of_a_small_input_is_optimized():
    """The sweep's group_norm samples: fusion grouped a member with an as_strided view of
    another member that the lowering does not fold; the kernel would have read what it
    computes. Such a group is refused now, and the rest of the graph is still fused."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(1, 6, 3), torch.randn(6), torch.randn(6)

    def fn(x, weight, bias):
        return torch.nn.functional.group_norm(x, 2, weight, bias, eps=0.5)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(fn, backend="memopt")(x, weight, bias)
    assert not [w for w in caught if str(w.message).startswith("memopt")]
    torch.testing.assert_close(got, fn(x, weight, bias))


def test_copy_is_kept_for_a_view_its_source_strides_cannot_express():
    """The sweep's max_unpool2d samples: an input at strides (6, 1, 6, 2) is copied to
    contiguous and then viewed as a vector. The layout pass removed the copy, because
    torch's fake tensors accept that view; the real tensor refuses it. The pass now checks
    every view's strides itself."""
    from memopt.passes.layout import view_strides

    assert view_strides([1, 2, 1, 3], [6, 1, 6, 2], [6]) is None
    assert view_strides([1, 2, 1, 3], [6, 3, 3, 1], [6]) == [1]
    assert view_strides([2, 3], [1, 2], [3, 2]) is None
    assert view_strides([4, 3], [3, 1], [2, 2, 3]) == [6, 3, 1]
    x = torch.randn(1, 3, 1, 2).permute(0, 3, 2, 1)  # (1, 2, 1, 3) at strides (6, 1, 6, 2)
    fn = lambda x: x.contiguous().view(6) * 2  # noqa: E731
    got = torch.compile(fn, backend="memopt")(x)
    torch.testing.assert_close(got, fn(x))
