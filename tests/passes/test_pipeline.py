"""The pipeline (ledger, disable, fuel, verification, check) and the cleanup pass."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import memopt
from memopt.compiler.graph import annotate
from memopt.errors import CheckError, OptionError, VerificationError
from memopt.passes import DEFAULT_PIPELINE, Pass

aten = torch.ops.aten
F32 = 4  # bytes per float32 element
X = 4 * 8 * F32  # one float32 (4, 8) tensor: 128 bytes


def x48():
    return torch.randn(4, 8)


def only(a):
    """The cleanup pass's ledger record (fusion runs after it by default)."""
    return next(p for p in a.ledger if p.pass_name == "cleanup")


def test_cse_merges_identical_ops():
    a = memopt.analyze(lambda x: x.exp() + x.exp(), x48(), passes=["cleanup"])
    entry = only(a)
    # Before: exp (read X, write X) twice, add reads both exps (2X) and writes X.
    assert entry.bytes_before == 2 * (X + X) + 3 * X
    # After: one exp; the add reads the same buffer twice, which counts once.
    assert entry.bytes_after == (X + X) + (X + X)
    assert (entry.kernels_before, entry.kernels_after) == (3, 2)
    (decision,) = entry.decisions
    assert decision.applied and decision.code == "cleanup.cse" and decision.bytes_saved == 2 * X
    assert a.bytes_moved == entry.bytes_after


def test_noop_copies_are_removed():
    def fn(x):
        return torch.cat([x.clone()]) * 2

    a = memopt.analyze(fn, x48())
    entry = only(a)
    removed = [d for d in entry.decisions if d.applied]
    assert {d.code for d in removed} == {"cleanup.noop_removed"}
    assert {d.what.split()[2] for d in removed} == {"aten.clone.default", "aten.cat.default"}
    assert all(d.bytes_saved == 2 * X for d in removed)
    assert entry.bytes_after == 2 * X  # just the multiply
    assert a.kernels[0].ops == ("aten.mul.Tensor",)


def test_copy_that_is_returned_is_kept_and_the_refusal_recorded():
    a = memopt.analyze(lambda x: x.clone(), x48())
    (decision,) = only(a).decisions
    assert not decision.applied
    assert decision.code == "cleanup.noop_kept_output" and "alias" in decision.reason
    assert decision.bytes_saved == 2 * X  # what keeping the copy costs
    assert a.bytes_moved == 2 * X


@dataclass(frozen=True)
class AddDeadNode(Pass):
    """Test helper: plants an unused exp so that a later cleanup has dead code to remove."""

    def run(self, gm, ctx):
        first = next(n for n in gm.graph.nodes if n.op == "placeholder")
        output = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(output):
            gm.graph.call_function(aten.exp.default, (first,))
        annotate(gm)
        ctx.decide("planted", "planted %exp", "test", 0)


@dataclass(frozen=True)
class ChangeShape(Pass):
    """Test helper: sums over the wrong axis, leaving the node's recorded shape stale."""

    def run(self, gm, ctx):
        node = next(n for n in gm.graph.nodes if n.target is aten.sum.dim_IntList)
        node.args = (node.args[0], [0])
        ctx.decide("wrong_axis", "wrong axis", "test", 0)


@dataclass(frozen=True)
class WrongConstant(Pass):
    """Test helper: a miscompile that keeps every shape: multiplies by 3 instead of 2."""

    def run(self, gm, ctx):
        for node in gm.graph.nodes:
            if node.target is aten.mul.Tensor and node.args[1] == 2:
                if ctx.decide("times_3", "times 3", "test", 0):
                    node.args = (node.args[0], 3)


@pytest.fixture
def test_passes(temporary_pass):
    temporary_pass("add_dead_node", AddDeadNode, ("planted",))
    temporary_pass("change_shape", ChangeShape, ("wrong_axis",))
    temporary_pass("wrong_constant", WrongConstant, ("times_3",))


def test_dead_code_is_removed(test_passes):
    a = memopt.analyze(lambda x: x * 2, x48(), passes=["add_dead_node", "cleanup"])
    planted, cleanup = a.ledger
    assert planted.bytes_after == planted.bytes_before + 2 * X
    dead = [d for d in cleanup.decisions if d.code == "cleanup.dead_code"]
    assert len(dead) == 1 and dead[0].bytes_saved == 2 * X
    assert cleanup.bytes_after == 2 * X


def test_verification_names_the_pass_and_node(test_passes):
    with pytest.raises(VerificationError, match=r"change_shape.*%sum"):
        memopt.analyze(lambda x: x.sum(1), x48(), passes=["change_shape"])


def test_check_catches_a_miscompile(test_passes):
    memopt.analyze(lambda x: x * 2, x48(), passes=["wrong_constant"])  # unchecked: unnoticed
    with pytest.raises(CheckError, match="wrong_constant"):
        memopt.analyze(lambda x: x * 2, x48(), passes=["wrong_constant"], check=True)


def test_check_runs_the_graph_after_every_pass(monkeypatch):
    from memopt.passes import pipeline

    compared = []
    real = pipeline._compare

    def spy(gm, inputs, expected, after):
        compared.append(after)
        return real(gm, inputs, expected, after)

    monkeypatch.setattr(pipeline, "_compare", spy)
    fn = lambda x: torch.cat([x.clone()]).exp() + x.exp()  # noqa: E731
    memopt.analyze(fn, x48())
    assert compared == []  # check is off by default
    a = memopt.analyze(fn, x48(), check=True)
    assert compared == list(DEFAULT_PIPELINE)  # one comparison after each pass, in order
    assert any(d.applied for d in a.ledger[0].decisions)


def test_backend_check_falls_back_visibly_on_a_miscompile(test_passes):
    f = torch.compile(
        lambda x: x * 2, backend="memopt", options={"passes": ["wrong_constant"], "check": True}
    )
    x = torch.randn(3)
    with pytest.warns(UserWarning, match="check failed"):
        out = f(x)
    torch.testing.assert_close(out, x * 2)  # the unoptimized graph's answer


def test_a_failed_pipeline_falls_back_to_the_graph_as_it_came(test_passes):
    """The passes rewrite the graph in place: where a later one fails, the fallback is the
    graph before any of them ran, not the half-rewritten one (which multiplies by 3)."""
    f = torch.compile(
        lambda x: (x * 2).sum(1),
        backend="memopt",
        options={"passes": ["wrong_constant", "change_shape"]},
    )
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="change_shape"):
        out = f(x)
    torch.testing.assert_close(out, (x * 2).sum(1))


def fn_with_three_rewrites(x):
    return x.exp() + x.exp() + torch.cat([x.clone()])


def test_fuel_caps_rewrite_decisions():
    unlimited = only(memopt.analyze(fn_with_three_rewrites, x48()))
    applied = [d for d in unlimited.decisions if d.applied]
    assert len(applied) == 3

    none = only(memopt.analyze(fn_with_three_rewrites, x48(), fuel=0))
    assert none.bytes_after == none.bytes_before
    assert not any(d.applied for d in none.decisions)
    assert all("out of fuel" in d.reason for d in none.decisions)

    one = only(memopt.analyze(fn_with_three_rewrites, x48(), fuel=1))
    assert sum(d.applied for d in one.decisions) == 1
    assert unlimited.bytes_after < one.bytes_after < one.bytes_before


def test_disable_and_passes_options():
    x = x48()
    disabled = memopt.analyze(fn_with_three_rewrites, x, disable=list(DEFAULT_PIPELINE))
    assert disabled.ledger == []
    assert disabled.bytes_moved == only(memopt.analyze(fn_with_three_rewrites, x)).bytes_before
    empty = memopt.analyze(fn_with_three_rewrites, x, passes=[])
    assert empty.bytes_moved == disabled.bytes_moved
    no_cleanup = memopt.analyze(fn_with_three_rewrites, x, disable=["cleanup"])
    rest = [name for name in DEFAULT_PIPELINE if name != "cleanup"]
    assert [p.pass_name for p in no_cleanup.ledger] == rest
    with pytest.raises(OptionError, match="cleanup"):
        memopt.analyze(fn_with_three_rewrites, x, disable=["clean"])


def test_ledger_keeps_printed_graphs_for_diffs():
    a = memopt.analyze(fn_with_three_rewrites, x48())
    entry = a.graphs[0].ledger[0]
    assert entry.text_before != entry.text_after
    assert "aten.clone.default" in entry.text_before
    assert "aten.clone.default" not in entry.text_after
    assert entry.elapsed_ms >= 0


def test_random_ops_are_never_merged():
    # Two identical draws and two identical exps: only the exps merge.
    a = memopt.analyze(
        lambda x: torch.rand_like(x) + torch.rand_like(x) + x.exp() + x.exp(),
        x48(),
        passes=["cleanup"],
    )
    (merged,) = [d for d in only(a).decisions if d.applied]
    assert merged.code == "cleanup.cse" and "exp" in merged.what
    ops = [op for k in a.kernels for op in k.ops]
    assert ops.count("aten.rand_like.default") == 2 and ops.count("aten.exp.default") == 1


def test_neutral_arithmetic_is_removed_but_not_plus_zero():
    a = memopt.analyze(lambda x: ((x * 1) / 1 - 0).exp() + 0, x48(), passes=["cleanup"])
    removed = [d.what for d in only(a).decisions if d.applied]
    assert len(removed) == 3  # * 1, / 1, - 0; not + 0 (it turns -0.0 into +0.0)
    assert [k.ops for k in a.kernels] == [("aten.exp.default",), ("aten.add.Tensor",)]
