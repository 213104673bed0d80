"""memopt bisect: fuel-bisecting finds a rewrite decision planted to be wrong."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import memopt
from memopt.cli import main
from memopt.passes import Pass
from memopt.tools.bisect import applied_decisions, bisect

aten = torch.ops.aten
PIPELINE = ["cleanup", "planted", "fusion"]


@dataclass(frozen=True)
class Planted(Pass):
    """Test helper: one harmless rewrite (x * 2 -> x + x) and one miscompile (x * 3 -> x * 4)."""

    def run(self, gm, ctx):
        for node in list(gm.graph.nodes):
            if node.target is not aten.mul.Tensor or node.args[1] not in (2, 3):
                continue
            if node.args[1] == 2:
                if ctx.decide("harmless", f"%{node.name}: x*2 -> x+x", "harmless", 0):
                    node.target = aten.add.Tensor
                    node.args = (node.args[0], node.args[0])
            elif ctx.decide("bug", f"%{node.name}: x*3 -> x*4", "planted bug", 0):
                node.args = (node.args[0], 4)


@pytest.fixture
def planted(temporary_pass):
    temporary_pass("planted", Planted, ("harmless", "bug"))


def program(x):
    # cleanup: a CSE and a no-op copy; planted: x*2 (fine), then x*3 (wrong); fusion after.
    return (x * 2).exp() + x.exp() + x.exp() + torch.cat([x.clone()]) * 3


def x48():
    return torch.randn(4, 8)


def test_bisect_finds_the_planted_decision(planted):
    x = x48()
    applied = applied_decisions(memopt.analyze(program, x, passes=PIPELINE))
    planted_at = next(k for k, d in enumerate(applied, start=1) if d.code == "planted.bug")
    assert 1 < planted_at < len(applied)  # decisions before it (cleanup) and after (fusion)

    messages: list[str] = []
    result = bisect(program, x, passes=PIPELINE, backend="reference", progress=messages.append)
    assert result.status == "found"
    assert result.decisions == len(applied)
    assert result.first_bad == planted_at
    assert result.decision.pass_name == "planted"
    assert result.decision.what.endswith("x*3 -> x*4")
    assert result.decision.reason == "planted bug"
    assert result.mismatch.startswith("tensor 0")
    # The probes bracket it: fuel=k-1 matches, fuel=k does not.
    outcome = {p.fuel: p.matches for p in result.probes}
    assert outcome[0] and not outcome[len(applied)]
    assert outcome.get(planted_at - 1, True) and not outcome.get(planted_at, False)
    # The graph diff shows the one rewrite.
    assert "-%mul_1: f32[4, 8] = aten.mul.Tensor(%arg0_1, 3)" in result.graph_diff
    assert "+%mul_1: f32[4, 8] = aten.mul.Tensor(%arg0_1, 4)" in result.graph_diff
    text = result.format()
    assert f"First bad decision: #{planted_at} of {len(applied)}" in text
    assert any(m.startswith("fuel=") for m in messages)


def test_bisect_of_a_correct_program_is_clean():
    result = bisect(program, x48(), backend="reference")
    assert result.status == "clean" and result.first_bad is None
    assert [p.fuel for p in result.probes] == [result.decisions]  # one probe: everything
    assert "No miscompile" in result.format()


def test_bisect_blames_no_decision_when_the_unoptimized_program_differs():
    def differs_when_compiled(x):
        return x * 2 + (1.0 if torch.compiler.is_compiling() else 0.0)

    result = bisect(differs_when_compiled, x48(), backend="reference")
    assert result.status == "unoptimized"
    assert result.first_bad is None and result.mismatch
    assert "no rewrite at all" in result.format()


TARGET = """\
import torch


def example():
    def program(x):
        return (x * 2).exp() + x.exp() + x.exp() + torch.cat([x.clone()]) * 3

    return program, (torch.randn(4, 8),)
"""


def test_cli_bisect_prints_the_decision(planted, tmp_path, capsys):
    path = tmp_path / "target.py"
    path.write_text(TARGET)
    args = ["bisect", str(path), "--passes", ",".join(PIPELINE), "--backend", "reference"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"memopt bisect: {path}")
    assert "First bad decision: #" in captured.out
    assert "pass    planted" in captured.out
    assert "memopt: fuel=" in captured.err


def test_cli_bisect_errors_are_one_line(capsys):
    assert main(["bisect", "mlp", "--passes", "cleanup,nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memopt: error: unknown pass 'nope'") and err.count("\n") == 1
