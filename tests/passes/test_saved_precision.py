"""The precision pass's `saved_activations="bf16"`: a training forward's saved tensors
stored in bfloat16 and widened where the backward reads them.

- which saved tensors are narrowed (computed float32 activations) and which are not
  (parameters and the batch, a tensor the caller also gets, masks), with the graphs'
  dtypes and the saved-activation bytes exact;
- gradients against eager within bfloat16's rounding, the forward's outputs unchanged;
- the error measured and reported, a `max_error` budget giving tensors back, a graph that
  cannot run keeping them; inference graphs and the pass off untouched;
- the ablation's row.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memopt
from memopt.compiler.aten_ops import ATTENTION_FORWARD
from memopt.config import Config
from memopt.errors import OptionError
from memopt.passes import partition, saved_precision
from memopt.passes.output_error import compare
from memopt.passes.pipeline import capture_key
from memopt.reports.summary import format_analysis

B, D, H = 16, 32, 64


class MLP(nn.Module):
    """Two layers and a LayerNorm: GELU's input, LayerNorm's statistics and tanh's output
    are saved for the backward; the batch and the weights are saved as they are."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D, H)
        self.norm = nn.LayerNorm(H)
        self.down = nn.Linear(H, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.down(self.norm(nn.functional.gelu(self.up(x)))))


def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


def batch() -> torch.Tensor:
    return torch.randn(B, D, generator=torch.Generator().manual_seed(1))


def saved(**options: object) -> dict[str, object]:
    return {"pass_options": {"precision": {"saved_activations": "bf16", **options}}}


def decisions(a: memopt.Analysis) -> list[tuple[str, bool, str]]:
    return [
        (d.code, d.applied, d.what)
        for p in a.ledger
        if p.pass_name == "precision"
        for d in p.decisions
    ]


def reasons(a: memopt.Analysis, code: str) -> list[str]:
    return [
        d.reason
        for p in a.ledger
        if p.pass_name == "precision"
        for d in p.decisions
        if d.code == code
    ]


def graph(a: memopt.Analysis, name: str) -> torch.fx.GraphModule:
    return next(g.gm for g in a.graphs if g.name == name)


def placeholder_dtypes(gm: torch.fx.GraphModule) -> list[torch.dtype]:
    return [n.meta["val"].dtype for n in gm.graph.nodes if n.op == "placeholder"]


def train_step(model: nn.Module, x: torch.Tensor, **options: object):
    compiled = torch.compile(model, backend="memopt", options=options or None)
    out = compiled(x)
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out.detach(), grads


def test_computed_activations_are_saved_in_bf16_and_inputs_as_they_are() -> None:
    off = memopt.analyze(mlp(), batch(), training=True)
    on = memopt.analyze(mlp(), batch(), training=True, **saved())
    forward = graph(off, "forward")
    record = forward.meta[partition.META_KEY]
    # tanh's output is saved (its backward reads it) and is the model's output too: the
    # caller holds it in float32, so it stays.
    returned = "tanh"
    activations = [t for t in record.choice.saved if not t.is_input and t.name != returned]
    assert len(activations) == 2  # the first matmul's output and the LayerNorm's
    applied = [d for d in decisions(on) if d[0] == "precision.saved_activation"]
    assert len(applied) == len(activations) and all(ok for _, ok, _ in applied)
    assert {d[2].split("%")[1].split()[0] for d in applied} == {t.name for t in activations}
    refused = [d for d in decisions(on) if d[0] == "precision.unsupported"]
    assert [d[2] for d in refused] == [f"bf16 saved %{returned}"]
    # The backward takes the narrowed tensors as bf16, the parameters and the batch as
    # float32: one bf16 input for each narrowed tensor, the other inputs unchanged.
    before = placeholder_dtypes(graph(off, "backward"))
    after = placeholder_dtypes(graph(on, "backward"))
    assert after.count(torch.bfloat16) == len(activations)
    assert after.count(torch.float32) == before.count(torch.float32) - len(activations)
    # The memory the saved activations hold: the narrowed ones at exactly half.
    narrowed = sum(t.nbytes for t in activations)
    assert narrowed == 2 * B * H * 4
    off_bytes = partition.saved_activation_bytes(off)["chosen"]
    assert partition.saved_activation_bytes(on)["chosen"] == off_bytes - narrowed // 2


def test_gradients_are_within_bf16_rounding_and_the_forward_is_unchanged() -> None:
    x = batch()
    eager_model = mlp()
    eager = eager_model(x)
    (eager * torch.linspace(-1, 1, eager.numel()).view(eager.shape)).sum().backward()
    exact_out, exact = train_step(mlp(), x)
    out, grads = train_step(mlp(), x, **saved())
    assert torch.equal(out, exact_out)
    torch.testing.assert_close(out, eager.detach())
    narrowed = 0
    for got, want, p in zip(grads, exact, eager_model.parameters()):
        torch.testing.assert_close(want, p.grad)
        error = ((got - p.grad).abs().max() / p.grad.abs().max()).item()
        assert error < 2e-2
        narrowed += not torch.equal(got, want)
    assert narrowed  # rounding the saved tensors moved the gradients


def test_the_error_is_measured_and_reported() -> None:
    on = memopt.analyze(mlp(), batch(), training=True, **saved())
    records = [d for p in on.ledger if p.pass_name == "precision" for d in p.decisions if d.applied]
    for d in records:
        assert "with every narrowed tensor the gradients move by" in d.reason
        assert "alone" in d.reason
        assert 0 < d.figures["share"] <= d.figures["total_error"] * 1.5
        assert 0 < d.figures["total_error"] < 2e-2
        assert d.figures["bytes_after"] * 2 == d.figures["bytes_before"]
        assert d.figures["moved_before"] > 0 and d.figures["moved_after"] > 0


def test_a_budget_gives_every_tensor_back_and_the_gradients_are_exact() -> None:
    x = batch()
    a = memopt.analyze(mlp(), x, training=True, **saved(max_error=0.0))
    codes = [(code, ok) for code, ok, _ in decisions(a)]
    assert codes == [("precision.unsupported", False)] + [("precision.over_budget", False)] * 2
    assert torch.bfloat16 not in placeholder_dtypes(graph(a, "backward"))
    _, exact = train_step(mlp(), x)
    _, grads = train_step(mlp(), x, **saved(max_error=0.0))
    assert all(torch.equal(g, e) for g, e in zip(grads, exact))


def test_a_budget_between_the_shares_keeps_some() -> None:
    on = memopt.analyze(mlp(), batch(), training=True, **saved())
    applied = [d for p in on.ledger if p.pass_name == "precision" for d in p.decisions if d.applied]
    shares = sorted(d.figures["share"] for d in applied)
    # Over the budget, the largest share goes back first; the other's error is within it.
    assert shares[0] < shares[-1] <= applied[0].figures["total_error"]
    budget = (shares[0] + shares[-1]) / 2
    some = memopt.analyze(mlp(), batch(), training=True, **saved(max_error=budget))
    codes = [code for code, _, _ in decisions(some)]
    assert "precision.over_budget" in codes and "precision.saved_activation" in codes
    assert len(codes) == len(shares) + 1  # and tanh's output, which the caller gets


class ReturnsHidden(nn.Module):
    """The hidden state is both saved for the backward and returned to the caller; the
    dropout mask is saved as booleans."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D, H)
        self.down = nn.Linear(H, D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.relu(self.up(x))
        return self.down(nn.functional.dropout(hidden * hidden, 0.5)), hidden


def test_a_tensor_the_caller_also_gets_and_masks_stay_as_they_are() -> None:
    torch.manual_seed(0)
    off = memopt.analyze(ReturnsHidden(), batch(), training=True)
    torch.manual_seed(0)
    on = memopt.analyze(ReturnsHidden(), batch(), training=True, **saved())
    refused = [what for code, _, what in decisions(on) if code == "precision.unsupported"]
    assert len(refused) == 1
    forward = graph(on, "forward")
    returned = next(n for n in forward.graph.nodes if n.op == "output").args[0]
    user = returned[0].meta["val"], returned[1].meta["val"]
    assert [v.dtype for v in user] == [torch.float32, torch.float32]
    before = placeholder_dtypes(graph(off, "backward"))
    after = placeholder_dtypes(graph(on, "backward"))
    assert after.count(torch.bool) == before.count(torch.bool) >= 1
    applied = [d for d in decisions(on) if d[0] == "precision.saved_activation"]
    assert after.count(torch.bfloat16) == len(applied) >= 1


def test_graphs_that_do_not_run_keep_their_saved_tensors(monkeypatch) -> None:
    def fails(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no run here")

    monkeypatch.setattr(saved_precision._Runs, "__init__", fails)
    a = memopt.analyze(mlp(), batch(), training=True, **saved())
    codes = [(code, ok) for code, ok, _ in decisions(a)]
    assert codes == [("precision.unsupported", False)] + [("precision.no_values", False)] * 2
    assert torch.bfloat16 not in placeholder_dtypes(graph(a, "backward"))


def test_inference_and_the_pass_off_are_untouched() -> None:
    with torch.no_grad():
        a = memopt.analyze(mlp(), batch(), **saved())
    assert decisions(a) == []
    off = memopt.analyze(mlp(), batch(), training=True)
    assert "precision" not in [p.pass_name for p in off.ledger]
    assert torch.bfloat16 not in placeholder_dtypes(graph(off, "backward"))


def test_a_bad_option_names_the_choices() -> None:
    with pytest.raises(OptionError, match="saved_activations.*takes one of"):
        Config.from_options({"pass_options": {"precision": {"saved_activations": "fp8"}}})


def test_the_ablation_has_a_row_for_saved_activations() -> None:
    result = memopt.ablate(mlp(), batch(), training=True, precision=("saved-bf16",))
    full, narrowed = result.row("all passes"), result.row("all passes, bf16 saved activations")
    assert narrowed.precision == "saved-bf16" and full.precision is None
    assert "precision" in narrowed.passes and "precision" not in full.passes
    # The rows' bytes are the figures the pass states in its decisions, to the byte: the
    # float32 program's, and the program with every narrowed tensor.
    on = memopt.analyze(mlp(), batch(), training=True, **saved())
    figures = [d.figures for p in on.ledger if p.pass_name == "precision" for d in p.decisions]
    moved = {(f["moved_before"], f["moved_after"]) for f in figures if "moved_after" in f}
    assert moved == {(full.bytes_moved, narrowed.bytes_moved)}
    assert narrowed.bytes_moved == on.bytes_moved != full.bytes_moved


def test_the_report_lists_each_saved_tensor_with_its_bytes_and_share() -> None:
    on = memopt.analyze(mlp(), batch(), training=True, **saved())
    text = format_analysis(on)
    section = text.split("Saved activations (the precision pass")[1].split("\n\n")[0]
    rows = [line for line in section.splitlines() if "bf16 saved %" in line]
    assert len(rows) == 2 and all("4.0 KiB  2.0 KiB" in row for row in rows)
    assert "gradients' error with every narrowed tensor" in section
    assert "forward + backward move" in section and "..." not in section
    assert "Narrowed weights" not in text


def test_a_gradient_zero_but_for_rounding_is_measured_against_the_floor() -> None:
    """A key projection's bias gets a gradient of rounding noise (a softmax ignores it):
    against its own scale any change is a large error, against a thousandth of the
    largest gradient's it is what it is worth."""
    want = [torch.tensor([1.0, -2.0]), torch.tensor([1e-9, 0.0])]
    got = [torch.tensor([1.0, -2.0]), torch.tensor([3e-9, 0.0])]
    assert compare(want, got, set()).relative == pytest.approx(2.0)
    floor = saved_precision.GRADIENT_FLOOR
    assert compare(want, got, set(), floor).relative == pytest.approx(2e-9 / (2 * floor))
    # an output at its own scale is still measured against it
    got[0] = torch.tensor([1.0, -2.2])
    assert compare(want, got, set(), floor).relative == pytest.approx(0.1, rel=1e-6)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.out = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(2, B // 2, 3, 4, D // 4).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(2, B // 2, D))


def test_an_attentions_logsumexp_stays_float32() -> None:
    """The backward exponentiates the logsumexp: rounded, it would move every probability;
    the attention's output beside it is narrowed."""
    torch.manual_seed(0)
    x = torch.randn(2, B // 2, D, generator=torch.Generator().manual_seed(1))
    a = memopt.analyze(Attention(), x, training=True, **saved())
    forward = graph(a, "forward")
    assert any(
        n.target in ATTENTION_FORWARD for n in forward.graph.nodes if n.op == "call_function"
    )
    refused = reasons(a, "precision.unsupported")
    assert len(refused) == 1 and "logsumexp" in refused[0]
    applied = [d for d in decisions(a) if d[0] == "precision.saved_activation"]
    assert applied
    torch.manual_seed(0)
    exact, _ = Attention(), None
    torch.manual_seed(0)
    model = Attention()
    _, narrowed = train_step(model, x, **saved())
    (exact(x) * torch.linspace(-1, 1, x.numel()).view(x.shape)).sum().backward()
    for got, p in zip(narrowed, exact.parameters()):
        assert ((got - p.grad).abs().max() / p.grad.abs().max()).item() < 2e-2


class Periodic(nn.Module):
    """sin of scaled projections: the backward takes the sine and cosine of the saved
    angles, so they stay float32; the tanh output beside them (its backward is 1 - y^2) is
    narrowed."""

    def __init__(self) -> None:
        super().__init__()
        self.angle = nn.Linear(D, H)
        self.gate = nn.Linear(D, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.angle(x) * 50.0) * torch.tanh(self.gate(x))


def test_a_tensor_the_backward_takes_the_cosine_of_stays_float32() -> None:
    torch.manual_seed(0)
    a = memopt.analyze(Periodic(), batch(), training=True, **saved())
    refused = reasons(a, "precision.unsupported")
    # it recomputes the sine as well as the cosine: either names the tensor's reader
    assert len(refused) == 1 and any(f"takes its {op}" in refused[0] for op in ("sin", "cos"))
    applied = [d for d in decisions(a) if d[0] == "precision.saved_activation"]
    assert len(applied) == 1
    torch.manual_seed(0)
    exact = Periodic()
    torch.manual_seed(0)
    _, narrowed = train_step(Periodic(), batch(), **saved())
    out = exact(batch())
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    for got, p in zip(narrowed, exact.parameters()):
        assert ((got - p.grad).abs().max() / p.grad.abs().max()).item() < 2e-2


class ReturnsTransposed(nn.Module):
    """tanh's output is saved for its backward and returned to the caller as a view."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.up(x)).t()


class SavesAView(nn.Module):
    """A saved slice of a sigmoid's output beside the output itself (two saved tensors of
    one buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D, H)
        self.w = nn.Parameter(torch.randn(8, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.up(x))
        t = h.t()[:D]
        return torch.tanh(self.w @ t * t.sum())


def test_a_buffer_the_caller_gets_or_two_saved_tensors_share_stays_float32() -> None:
    torch.manual_seed(0)
    a = memopt.analyze(ReturnsTransposed(), batch(), training=True, **saved())
    refused = [(code, what) for code, _, what in decisions(a) if code == "precision.unsupported"]
    assert refused == [("precision.unsupported", "bf16 saved %tanh")]
    torch.manual_seed(0)
    a = memopt.analyze(SavesAView(), batch(), training=True, **saved())
    shared = reasons(a, "precision.unsupported")
    assert sum("shares its buffer with" in r for r in shared) == 2


class MaskedSoftmax(nn.Module):
    """Attention written out: the backward reads the saved probabilities through
    p * (g - sum g p), whose cancellation turns bf16's rounding into a 50% error."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = (self.q(x) @ self.k(x).transpose(-1, -2)) * 3.0
        mask = torch.ones(scores.shape[-1], scores.shape[-1], dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.tanh(torch.softmax(scores, -1) @ self.v(x))


def test_without_a_budget_the_default_one_gives_back_a_cancelling_tensor() -> None:
    x = torch.randn(2, B, D, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    a = memopt.analyze(MaskedSoftmax(), x, training=True, **saved())
    over = [
        d
        for p in a.ledger
        if p.pass_name == "precision"
        for d in p.decisions
        if d.code == "precision.over_budget"
    ]
    assert len(over) == 1 and "over the default 0.02" in over[0].reason
    assert over[0].figures["share"] > 0.1
    applied = [d for p in a.ledger if p.pass_name == "precision" for d in p.decisions if d.applied]
    assert applied and all(
        d.figures["total_error"] <= saved_precision.DEFAULT_BUDGET for d in applied
    )
    loose = memopt.analyze(MaskedSoftmax(), x, training=True, **saved(max_error=1.0))
    assert not [d for d in decisions(loose) if d[0] == "precision.over_budget"]


def test_the_capture_depends_on_the_saved_options_only() -> None:
    def key(options: dict) -> tuple:
        # no partitioner (recompute costs its candidates through the whole pipeline)
        chosen = {"passes": ["cleanup", "precision", "fusion"]}
        pipeline = Config.from_options({**chosen, "pass_options": {"precision": options}})
        return capture_key(pipeline.pipeline(), True, None)

    assert key({"weights": "int8"}) == key({"weights": "bf16"})
    assert key({"weights": "int8"}) != key({"saved_activations": "bf16"})
    assert key({"saved_activations": "bf16"}) != key(
        {"saved_activations": "bf16", "max_error": 0.5}
    )


def test_the_ablation_asks_for_training_before_a_saved_row() -> None:
    with pytest.raises(OptionError, match="training=True"):
        memopt.ablate(mlp(), batch(), precision=("saved-bf16",))


class TwoGraphs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = MLP(), MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        torch._dynamo.graph_break()
        return self.second(h)


def test_the_report_gives_each_graphs_figures() -> None:
    torch.manual_seed(0)
    a = memopt.analyze(TwoGraphs(), batch(), training=True, **saved())
    section = format_analysis(a).split("Saved activations (the precision pass")[1]
    section = section.split("\n\n")[0]
    graphs = sorted(
        {d.graph for p in a.ledger if p.pass_name == "precision" for d in p.decisions if d.applied}
    )
    assert len(graphs) == 2
    for graph in graphs:
        assert f"{graph}: gradients' error with every narrowed tensor" in section
        assert f"{graph}: forward + backward move" in section


def test_a_failing_saved_stage_warns_and_keeps_the_graphs_as_partitioned(monkeypatch) -> None:
    """A bug after some rewrites: the pair goes on as partitioned, with a warning, and
    the gradients are the float32 program's."""
    real_rewrite = saved_precision._rewrite
    calls = []

    def breaks(forward, backward, s) -> None:
        real_rewrite(forward, backward, s)
        calls.append(s)
        if len(calls) == 2:
            raise RuntimeError("a bug")

    monkeypatch.setattr(saved_precision, "_rewrite", breaks)
    monkeypatch.setattr(saved_precision, "_traffic", lambda pair, kept: None)
    x = batch()
    _, exact = train_step(mlp(), x)
    with pytest.warns(UserWarning, match="failed on the saved tensors"):
        _, grads = train_step(mlp(), x, **saved())
    assert len(calls) == 2
    assert all(torch.equal(g, e) for g, e in zip(grads, exact))
