"""Counting a CPU kernel's calls through ctypes and through the native launcher, for the
tests of memopt's library kernels (decode and causal attention)."""

from __future__ import annotations

import types

from memopt.backends.cpp import launcher


def kernel_calls(monkeypatch, kernel_module, name: str = "function") -> list:
    """The calls of the entry `kernel_module.<name>()` returns (a ctypes path), as they
    come: `function` by default."""
    calls = []
    entry = getattr(kernel_module, name)()

    def counted(*args):
        calls.append(args)
        return entry(*args)

    monkeypatch.setattr(kernel_module, name, lambda: counted)
    return calls


def launches(monkeypatch, runtime_module) -> list:
    """The calls of the native launches `runtime_module` binds (its `launcher` seen
    through a proxy), as they come."""
    calls = []

    def bind_layouts(*args):
        launch = launcher.bind_layouts(*args)
        if launch is None:
            return None

        def counted(*tensors):
            calls.append(tensors)
            return launch(*tensors)

        return counted

    monkeypatch.setattr(
        runtime_module, "launcher", types.SimpleNamespace(bind_layouts=bind_layouts)
    )
    return calls


def same_as_aten(op, aten_op, *args, **kwargs) -> None:
    """`op` gives `aten_op`'s output bit for bit, or raises the RuntimeError it raises."""
    import pytest
    import torch

    try:
        want = aten_op(*args, **kwargs)
    except RuntimeError as error:  # ATen's own refusal is raised as ATen raises it
        with pytest.raises(RuntimeError, match=str(error)[:40]):
            op(*args, **kwargs)
    else:
        assert torch.equal(op(*args, **kwargs)[0], want[0])
