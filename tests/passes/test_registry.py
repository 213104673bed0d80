"""The pass registry: typed options checked when the Config is built, declared decision
codes, the stages a pass acts at, and writing a pass as one decorated class."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import torch

import memopt
from memopt.config import Config
from memopt.errors import OptionError
from memopt.passes import (
    DEFAULT_PIPELINE,
    OPT_IN_PASSES,
    PASSES,
    Pass,
    Stage,
    make_pass,
    register_pass,
)

aten = torch.ops.aten


def test_a_list_of_names_may_be_a_comma_separated_string():
    pipeline = Config.from_options(
        {"pass_options": {"recompute": {"must_recompute": "sin, mul_3"}}}
    )
    assert pipeline.pipeline().instance("recompute").must_recompute == ("sin", "mul_3")


@pytest.mark.parametrize(
    ("pass_options", "message"),
    [
        (
            {"layout": {"channels_last": "sometimes"}},
            "'channels_last' of pass 'layout' takes one of",
        ),
        ({"fusion": {"max_nodes": 0}}, "'max_nodes' of pass 'fusion' takes an integer >= 1"),
        ({"fusion": {"max_nodes": True}}, "an integer >= 1, got True"),
        ({"fusion": {"matmul_templates": "maybe"}}, "'matmul_templates'"),
        ({"recompute": {"max_saved_bytes": -1}}, "'max_saved_bytes' of pass 'recompute'"),
        (
            {"recompute": {"must_recompute": 3}},
            "a list of names (or a comma-separated string), got 3",
        ),
        (
            {"precision": {"max_error": float("nan")}},
            "'max_error' of pass 'precision' takes a number",
        ),
        ({"recompute": {"duplicate": 1}}, "'duplicate' of pass 'recompute' takes True or False"),
        ({"layout": {"onednn": True}}, "unknown option 'onednn' of pass 'layout'"),
    ],
)
def test_a_bad_pass_option_is_an_error_before_anything_compiles(pass_options, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Config.from_options({"pass_options": pass_options})
    compiled = torch.compile(
        lambda x: x + 1, backend="memopt", options={"pass_options": pass_options}
    )
    with pytest.raises(Exception, match="of pass"):
        compiled(torch.randn(3))  # an error, never a silently unoptimized graph


def test_options_are_built_into_the_passes_the_pipeline_runs():
    config = Config.from_options(
        {
            "pass_options": {
                "recompute": {"must_recompute": ["sin"], "max_saved_bytes": 0},
                "layout": {"channels_last": "never"},
            },
            "disable": ["fusion"],
        }
    )
    pipeline = config.pipeline()
    assert pipeline.names == tuple(n for n in DEFAULT_PIPELINE if n != "fusion")
    recompute = pipeline.instance("recompute")
    assert recompute.must_recompute == ("sin",)  # a list, stored as a tuple
    assert recompute.max_saved_bytes == 0
    assert pipeline.instance("layout").channels_last == "never"
    assert not pipeline.runs("fusion") and pipeline.instance("fusion").max_nodes == 64


def test_every_pass_declares_its_stages_and_codes():
    # every pass runs by default, or joins the pipeline when its options are given
    assert set(DEFAULT_PIPELINE) | set(OPT_IN_PASSES) == set(PASSES)
    assert not set(DEFAULT_PIPELINE) & set(OPT_IN_PASSES)
    assert set(OPT_IN_PASSES.values()) <= set(DEFAULT_PIPELINE)
    for name, cls in PASSES.items():
        assert cls.name == name and cls.codes and Stage.ATEN in cls.stages
    assert PASSES["attention"].stages == {Stage.DYNAMO, Stage.ATEN}
    assert PASSES["recompute"].stages == {Stage.PARTITION, Stage.ATEN}


def test_a_decision_with_an_undeclared_code_is_refused(temporary_pass):
    @dataclass(frozen=True)
    class Sloppy(Pass):
        def run(self, gm, ctx):
            ctx.decide("typo", "nothing", "test", 0)

    temporary_pass("sloppy", Sloppy, ("declared",))
    with pytest.raises(ValueError, match="code 'typo', which it does not declare"):
        memopt.analyze(lambda x: x + 1, torch.randn(3), passes=["sloppy"])


def test_registration_checks_the_class(temporary_pass):
    class NotFrozen(Pass):
        def run(self, gm, ctx):
            pass

    with pytest.raises(TypeError, match="frozen dataclass"):
        temporary_pass("not_frozen", NotFrozen)

    @dataclass(frozen=True)
    class NoDynamoStage(Pass):
        def run(self, gm, ctx):
            pass

    with pytest.raises(TypeError, match="rewrite_dynamo_graph"):
        register_pass("no_dynamo_stage", stages=(Stage.DYNAMO, Stage.ATEN))(NoDynamoStage)


def test_a_new_pass_is_one_decorated_class(temporary_pass):
    """A pass with a typed option, registered: configurable, checked, in the ledger."""

    @dataclass(frozen=True)
    class ScaleTwice(Pass):
        """Rewrites x * 2 to x + x (or keeps it, with mode "keep")."""

        mode: Literal["rewrite", "keep"] = "rewrite"
        limit: int = field(default=10, metadata={"min": 1})

        def run(self, gm, ctx):
            for node in list(gm.graph.nodes):
                if node.target is aten.mul.Tensor and node.args[1] == 2:
                    if self.mode == "keep":
                        ctx.refuse("kept", f"kept %{node.name}", "mode keep", 0)
                    elif ctx.decide("doubled", f"%{node.name}: x*2 -> x+x", "test", 0):
                        node.target = aten.add.Tensor
                        node.args = (node.args[0], node.args[0])

    temporary_pass("scale_twice", ScaleTwice, ("doubled", "kept"))
    x = torch.randn(4)
    a = memopt.analyze(lambda x: x * 2, x, passes=["scale_twice"])
    (decision,) = a.ledger[0].decisions
    assert decision.applied and decision.code == "scale_twice.doubled"
    assert a.kernels[0].ops == ("aten.add.Tensor",)
    kept = memopt.analyze(
        lambda x: x * 2, x, passes=["scale_twice"], pass_options={"scale_twice": {"mode": "keep"}}
    )
    assert kept.ledger[0].decisions[0].code == "scale_twice.kept"
    with pytest.raises(OptionError, match="'limit' of pass 'scale_twice' takes an integer >= 1"):
        make_pass("scale_twice", {"limit": 0})
