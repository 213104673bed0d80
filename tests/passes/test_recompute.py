"""The recompute pass: bytes-optimal forward/backward partition and producer duplication."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import memopt
from memopt.compiler.capture import COUNTED_SAVED_BYTES_KEY
from memopt.config import Config
from memopt.errors import OptionError
from memopt.passes import partition as partition_module
from memopt.passes.partition import (
    DEFAULT,
    MEMOPT,
    META_KEY,
    TORCH_MIN_CUT,
    saved_activation_bytes,
)

from models import MLP, model_and_input

F32 = 4  # bytes per float32 element


def sin_cos_sum(x: torch.Tensor) -> torch.Tensor:
    return x.sin().cos().sum()


def activations(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(torch.sigmoid(x.exp() * 0.5).relu() + x).sum(-1)


def recompute_decisions(analysis: memopt.driver.results.Analysis) -> list:
    return [d for p in analysis.ledger if p.pass_name == "recompute" for d in p.decisions]


def _grads(module: nn.Module, x: torch.Tensor, compiled: object) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    compiled(x).sum().backward()
    return [x.grad, *(p.grad for p in module.parameters())]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "block", "convnet"])
def test_gradients_match_eager(name: str) -> None:
    model, x = model_and_input(name)
    model.train()
    torch.manual_seed(1)
    expected = _grads(model, x, model)
    compiled = torch.compile(model, backend="memopt", options={"backend": "reference"})
    torch.manual_seed(1)
    got = _grads(model, x, compiled)
    for want, have in zip(expected, got):
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [{}, {"pass_options": {"recompute": {"recompute_matmul": True, "max_saved_bytes": 0}}}],
)
def test_gradients_of_activation_chains_and_budgets(options: dict) -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 32, requires_grad=True)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return activations(x @ w).sum() + sin_cos_sum(x)

    x = torch.randn(8, 32, requires_grad=True)
    want = torch.autograd.grad(fn(x), (x, w))
    compiled = torch.compile(fn, backend="memopt", options={"backend": "reference", **options})
    got = torch.autograd.grad(compiled(x), (x, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sin_cos_sum_bytes_by_hand() -> None:
    x = torch.randn(16, 32, requires_grad=True)
    n = 16 * 32 * F32  # 2048 B: one [16, 32] float32 tensor
    # Default partition: the forward saves sin(x) for cos's backward.
    #   forward  fused sin+cos: read x, write sin (saved) and cos  = n + 2n
    #            sum: read cos, write a scalar                      = n + 4
    #   backward fused -sin(sin(x)) * cos(x) * grad: read the scalar gradient (4 B,
    #            broadcast), sin and x; write grad x                = 4 + 3n
    default = memopt.analyze(sin_cos_sum, x, training=True, disable=["recompute"])
    assert default.bytes_moved == (3 * n) + (n + 4) + (4 + 3 * n)
    assert saved_activation_bytes(default)[DEFAULT] == n
    assert saved_activation_bytes(default)["counted"] == n
    # Recomputing sin in the backward: the forward writes only cos, the backward reads x.
    #   forward  fused sin+cos: n + n;  sum: n + 4
    #   backward fused: 4 + n (x) + n (grad x)
    ours = memopt.analyze(sin_cos_sum, x, training=True)
    assert ours.bytes_moved == (2 * n) + (n + 4) + (4 + 2 * n)
    figures = saved_activation_bytes(ours)
    assert figures["chosen"] == figures["counted"] == 0
    assert figures[DEFAULT] == n
    applied = [d for d in recompute_decisions(ours) if d.applied]
    assert len(applied) == 1 and applied[0].bytes_saved == n + n
    assert "sin" in applied[0].nodes


def _with_partitioner(partitioner: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make memopt's capture use one of PyTorch's partitioners (for comparisons)."""

    def partition_fn(joint, inputs, **kwargs):
        return partitioner(joint, inputs, **kwargs)

    # Without the recompute pass the partition stage takes the default partition.
    monkeypatch.setattr(partition_module, "default", partition_fn)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "block", "convnet"])
def test_no_more_bytes_than_torch_partitioners(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._functorch.partitioners import (
        default_partition,
        min_cut_rematerialization_partition,
    )

    model, x = model_and_input(name)
    model.train()
    # Each candidate partition is costed through the whole pipeline, layout included (on the
    # CPU the convnet's backward goes channels_last, with conversions that depend on what
    # each partition saves).
    ours = memopt.analyze(model, x, training=True)
    with monkeypatch.context() as patch:
        _with_partitioner(default_partition, patch)
        default = memopt.analyze(model, x, training=True, disable=["recompute"])
    with monkeypatch.context() as patch:
        _with_partitioner(min_cut_rematerialization_partition, patch)
        min_cut = memopt.analyze(model, x, training=True, disable=["recompute"])
    assert ours.bytes_moved <= default.bytes_moved
    assert ours.bytes_moved <= min_cut.bytes_moved
    record = ours.graphs[0].gm.meta[META_KEY]
    assert set(record.candidates) == {DEFAULT, TORCH_MIN_CUT, MEMOPT}
    assert record.modelled_peak_bytes == ours.graphs[0].gm.meta[COUNTED_SAVED_BYTES_KEY]
    # The ledger lists every saved activation with its bytes.
    listed = {d.nodes[0] for d in recompute_decisions(ours) if d.code == "recompute.saved"}
    assert listed == {s.name for s in record.choice.saved if not s.is_input}


def test_disable_means_default_partition_and_no_duplication() -> None:
    x = torch.randn(16, 32, requires_grad=True)
    plain = memopt.analyze(sin_cos_sum, x, training=True, disable=["recompute"])
    assert "recompute" not in [p.pass_name for p in plain.ledger]
    record = plain.graphs[0].gm.meta[META_KEY]
    assert record.chosen == DEFAULT and record.choice.recomputed == ()


def test_budget_is_honoured() -> None:
    model = MLP(width=16, hidden=32)
    x = torch.randn(4, 16)
    free = saved_activation_bytes(memopt.analyze(model, x, training=True))["chosen"]
    assert free > 0  # the matmul results are saved
    options = {"recompute": {"recompute_matmul": True, "max_saved_bytes": free // 2}}
    tight = memopt.analyze(model, x, training=True, pass_options=options)
    figures = saved_activation_bytes(tight)
    assert figures["chosen"] <= free // 2
    assert figures["counted"] == figures["chosen"]
    # Out of reach (matmuls are never recomputed): the cut with the fewest saved bytes, and
    # a note in the ledger.
    unreachable = {"recompute": {"max_saved_bytes": 0}}
    result = memopt.analyze(model, x, training=True, pass_options=unreachable)
    notes = [d for d in recompute_decisions(result) if d.code == "recompute.partition_note"]
    assert any("unreachable" in d.reason for d in notes)


def test_must_and_never_recompute() -> None:
    x = torch.randn(16, 32, requires_grad=True)
    kept = memopt.analyze(
        sin_cos_sum, x, training=True, pass_options={"recompute": {"never_recompute": ["sin"]}}
    )
    record = kept.graphs[0].gm.meta[META_KEY]
    assert record.chosen == MEMOPT
    assert not any(r.startswith("sin:") for r in record.choice.recomputed)

    def normed(x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (32,)).sin().sum()

    forced = memopt.analyze(
        normed, x, training=True, pass_options={"recompute": {"must_recompute": ["aten.rsqrt"]}}
    )
    record = forced.graphs[0].gm.meta[META_KEY]
    assert not any(s.name.startswith("rsqrt") for s in record.choice.saved)
    assert any(r.endswith("aten.rsqrt") for r in record.choice.recomputed)


def test_option_validation() -> None:
    with pytest.raises(OptionError, match="max_saved_bytes"):
        Config.from_options({"pass_options": {"recompute": {"max_saved_bytes": "1k"}}})
    with pytest.raises(OptionError, match="must_recompute"):
        Config.from_options({"pass_options": {"recompute": {"must_recompute": 7}}})
    with pytest.raises(OptionError, match="valid options"):
        Config.from_options({"pass_options": {"recompute": {"budget": 1}}})


def two_reductions(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = x.sin()
    return p.sum(0), p.sum(1)


def test_producer_duplication_saves_the_write() -> None:
    x = torch.randn(16, 32)
    n = 16 * 32 * F32
    # Stored once: the sin kernel (fused with one reduction) writes p, the other reads it.
    stored = memopt.analyze(two_reductions, x, pass_options={"recompute": {"duplicate": False}})
    # Duplicated: each reduction computes sin(x) itself and reads x instead of p.
    copied = memopt.analyze(two_reductions, x)
    assert stored.bytes_moved - copied.bytes_moved == n
    applied = [d for d in recompute_decisions(copied) if d.applied]
    assert len(applied) == 1 and applied[0].bytes_saved == n
    assert len(copied.kernels) == 2
    out = torch.compile(two_reductions, backend="memopt", options={"backend": "reference"})(x)
    for got, want in zip(out, two_reductions(x)):
        torch.testing.assert_close(got, want)


def test_refused_duplication_is_recorded_with_bytes() -> None:
    def shared(x: torch.Tensor) -> torch.Tensor:
        p = x.exp()
        return p * 2 + p.relu()  # both consumers fuse with p into one kernel

    result = memopt.analyze(shared, torch.randn(16, 32))
    (refused,) = [d for d in recompute_decisions(result) if not d.applied]
    assert refused.code == "recompute.not_duplicated" and refused.bytes_saved == 0
    assert "one kernel with all its consumers" in refused.reason

    def four_consumers(a, b):
        p = a * b  # read by four reductions over different axes: three or four kernels
        return p.sum(0), p.sum(1), p.sum(2), p.amax(2)

    n = 4 * 8 * 16 * F32
    result = memopt.analyze(four_consumers, torch.randn(4, 8, 16), torch.randn(4, 8, 16))
    (refused,) = [d for d in recompute_decisions(result) if not d.applied]
    # Stored: p written once and read four times (5n), its kernel reads a and b (2n): 7n.
    # Copied into each consumer: four times a and b (8n): n more.
    assert refused.code == "recompute.not_duplicated" and refused.bytes_saved == -n
    assert f"{n} B more than storing it once" in refused.reason


def test_the_partition_stage_obeys_fuel() -> None:
    x = torch.randn(16, 32, requires_grad=True)
    full = memopt.analyze(sin_cos_sum, x, training=True)
    first = full.graphs[0].ledger[0]
    assert first.stage == "partition" and first.pass_name == "recompute"
    assert first.decisions[0].code == "recompute.partition" and first.decisions[0].applied
    assert full.graphs[0].gm.meta[META_KEY].chosen == MEMOPT

    none = memopt.analyze(sin_cos_sum, x, training=True, fuel=0)
    (kept,) = [d for d in recompute_decisions(none) if d.code == "recompute.partition_kept"]
    assert not kept.applied and "out of fuel (0)" in kept.reason
    assert none.graphs[0].gm.meta[META_KEY].chosen == DEFAULT
    assert none.bytes_moved > full.bytes_moved


# -- broadcast products: each consumer recomputes them from the small inputs ---------------


def outer_cos_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).cos().sum(1)


def outer_tanh_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.tanh(a * b).mean(1)


def batched_outer_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.exp(a * b).sum(-1)


def _trains_like_eager(fn, *inputs: torch.Tensor) -> None:
    """Values and gradients of the compiled program (default backend) against eager."""
    results = []
    grad_out = None
    for run in (fn, torch.compile(fn, backend="memopt")):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = run(*leaves)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        out.backward(grad_out)
        results.append([out.detach(), *(t.grad for t in leaves)])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("fn", "a_shape", "b_shape"),
    [
        (outer_cos_rows, (256, 1), (1, 256)),
        (outer_tanh_mean, (64, 1), (1, 48)),
        (batched_outer_exp, (4, 32, 1), (4, 1, 24)),
    ],
)
def test_broadcast_product_is_recomputed_by_each_gradient_reduction(
    fn, a_shape: tuple, b_shape: tuple
) -> None:
    torch.manual_seed(0)
    a = torch.randn(a_shape, requires_grad=True)
    b = torch.randn(b_shape, requires_grad=True)
    rows, cols = a.numel(), b.numel()  # the output has `rows` elements
    product = torch.broadcast_shapes(a_shape, b_shape).numel() * F32
    # forward   one reduction: read a and b, write the output          = (2 rows + cols)
    # backward  two reductions over different axes, each reading the incoming gradient,
    #           a and b and writing one gradient: nothing of the product's size is saved
    #           or written                                              = 2 (2 rows + cols)
    #                                                                   + rows + cols
    result = memopt.analyze(fn, a, b, training=True)
    assert result.bytes_moved == (3 * (2 * rows + cols) + rows + cols) * F32
    assert [len(g.kernels) for g in result.graphs] == [1, 2]
    assert {k.kind for k in result.kernels} == {"reduction"}
    assert max(k.write_bytes for k in result.kernels) == max(rows, cols) * F32
    figures = saved_activation_bytes(result)
    assert figures["chosen"] == 0
    # Without copies the backward's first reduction writes the product's gradient for the
    # other one to read: the copies save that write and read, less their reads of a and b.
    stored = memopt.analyze(
        fn, a, b, training=True, pass_options={"recompute": {"duplicate": False}}
    )
    assert [len(g.kernels) for g in stored.graphs] == [1, 2]
    (chain,) = [d for d in recompute_decisions(result) if d.applied and d.graph == "backward"]
    assert chain.code == "recompute.duplicated_chain"
    assert chain.bytes_saved == stored.bytes_moved - result.bytes_moved
    assert chain.bytes_saved > product
    assert f"from {(2 * rows + cols) * F32} B of inputs" in chain.reason
    _trains_like_eager(fn, a, b)


def test_product_of_full_inputs_is_not_copied() -> None:
    x = torch.randn(64, 48, requires_grad=True)
    y = torch.randn(64, 48, requires_grad=True)
    n = 64 * 48 * F32
    # forward   read x and y, write 64 sums                                = 2n + 64
    # backward  one kernel: read the gradient, x and y; write both gradients: each gradient
    #           is pointwise, there is no product to share                 = 64 + 2n + 2n
    result = memopt.analyze(outer_cos_rows, x, y, training=True)
    assert result.bytes_moved == (2 * n + 64 * F32) + (64 * F32 + 4 * n)
    assert [len(g.kernels) for g in result.graphs] == [1, 1]
    copied = [d for d in recompute_decisions(result) if d.code.startswith("recompute.dup")]
    assert copied == []
    _trains_like_eager(outer_cos_rows, x, y)


def sin_product_by_rows_and_columns(
    a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    p = (a * b).sin()
    return p.sum(0), p.sum(1)


N_SUMS = (16 + 32) * F32  # the two reductions' outputs


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "nbytes", "code"),
    [
        # Stored: one kernel reads a and b and writes p (n) for the other, which reads it:
        # the copies each read the vectors instead.
        ((16, 1), (1, 32), 2 * (16 + 32) * F32 + N_SUMS, "recompute.duplicated_chain"),
        # One full input (n): the copies read it twice (2n) instead of writing p and reading
        # it again (2n) after reading it once (n).
        ((16, 1), (16, 32), 2 * (16 + 16 * 32) * F32 + N_SUMS, "recompute.duplicated_chain"),
        # Two full inputs: the copies would read 4n, as much as storing p moves (2n + n + n):
        # the chain is not tried; sin alone, tried, moves the same bytes.
        ((16, 32), (16, 32), 4 * 16 * 32 * F32 + N_SUMS, "recompute.not_duplicated"),
    ],
)
def test_chain_copy_by_the_bytes_of_its_inputs(
    a_shape: tuple, b_shape: tuple, nbytes: int, code: str
) -> None:
    a, b = torch.randn(a_shape), torch.randn(b_shape)
    result = memopt.analyze(sin_product_by_rows_and_columns, a, b, check=True)
    assert result.bytes_moved == nbytes
    assert len(result.kernels) == 2
    (decision,) = recompute_decisions(result)
    assert decision.code == code
    assert decision.applied == (code == "recompute.duplicated_chain")
    compiled = torch.compile(sin_product_by_rows_and_columns, backend="memopt")
    for got, want in zip(compiled(a, b), sin_product_by_rows_and_columns(a, b)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_bytes_min_cut_recomputes_through_views() -> None:
    # tanh's backward reads its output through an alias (a view): recomputing the view is
    # free, so the bytes min-cut recomputes tanh(x * b) from x and b (which the backward
    # reads anyway) instead of saving it.
    x = torch.randn(64, 48, requires_grad=True)
    b = torch.randn(1, 48, requires_grad=True)
    n = 64 * 48 * F32
    result = memopt.analyze(outer_tanh_mean, x, b, training=True)
    record = result.graphs[0].gm.meta[META_KEY]
    assert record.candidates[MEMOPT].saved_activation_bytes == 0
    assert record.candidates[DEFAULT].saved_activation_bytes == n
    assert record.chosen == MEMOPT
    # forward   read x and b, write 64 means                               = n + 48 + 64
    # backward  one kernel: read the gradient, x and b; write both gradients = 64 + n + 48
    #                                                                         + n + 48
    assert result.bytes_moved == (n + 112 * F32) + (2 * n + 160 * F32)
    assert [len(g.kernels) for g in result.graphs] == [1, 1]
    _trains_like_eager(outer_tanh_mean, x, b)
