"""The cyclic garbage collector is off while memopt compiles, and back as it was after."""

from __future__ import annotations

import gc

import pytest
import torch

import memopt.driver.dynamo as dynamo
from memopt.compiler import collector


@pytest.fixture
def collector_enabled():
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_paused_restores_the_collector_even_on_error(collector_enabled):
    with pytest.raises(RuntimeError):
        with collector.paused():
            assert not gc.isenabled()
            raise RuntimeError("a pass failed")
    assert gc.isenabled()


def test_nested_pauses_turn_it_on_only_at_the_outermost(collector_enabled):
    with collector.paused():
        with collector.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_the_caller_turned_off_stays_off(collector_enabled):
    gc.disable()
    with collector.paused():
        pass
    assert not gc.isenabled()


def test_forward_and_backward_graphs_compile_with_the_collector_off(collector_enabled, monkeypatch):
    seen: list[tuple[str, bool]] = []
    run_pipeline = dynamo.run_pipeline

    def recording(gm, pipeline, name, *args, **kwargs):
        seen.append((name, gc.isenabled()))
        return run_pipeline(gm, pipeline, name, *args, **kwargs)

    monkeypatch.setattr(dynamo, "run_pipeline", recording)
    torch._dynamo.reset()
    x = torch.randn(8, 16, requires_grad=True)
    compiled = torch.compile(lambda t: (t.sin() * 2).sum(), backend="memopt")
    compiled(x).backward()
    assert x.grad is not None
    assert seen == [("forward", False), ("backward", False)]
    assert gc.isenabled()
