"""Models nobody wrote for memopt, through `torch.compile(backend="memopt")`, against eager.

GPT-2, BERT, Llama and T5 from Hugging Face transformers (tiny configs, random weights, no
download) and torchvision-shaped ResNet and MobileNet blocks written with torch.nn
(tests/real_models.py). Each runs inference and a training step on the default backend
(C++ kernels on this CPU); outputs and every parameter's gradient must match eager, and
memopt must not have fallen back anywhere (a fallback warning fails the test).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn import functional as F

import real_models

pytestmark = pytest.mark.slow  # the full suite only

# float32: fused kernels reassociate sums (layer norm's mean and variance, softmax), so
# values differ from eager's in the last bits, amplified through a few layers.
RTOL = 1e-4
ATOL = 1e-5
# Gradients: some are exactly zero in exact arithmetic (a key projection's bias under
# softmax, a bias before batch norm) and float32 leaves noise there of about 1e-6 of the
# model's largest gradient in eager as in memopt, so the absolute tolerance is relative to
# that largest gradient (measured worst case ~3e-6 of it).
GRAD_RTOL = 1e-3
GRAD_ATOL_OF_MAX = 3e-5


def _needs(name: str) -> None:
    if name in real_models.HF_MODELS:
        pytest.importorskip("transformers")


def _run_checked(fn, *args):
    """fn(*args), and the memopt warnings it raised (fallbacks to unoptimized code)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args)
    notes = [str(w.message) for w in caught if str(w.message).startswith("memopt")]
    return result, notes


def _weights(shape: torch.Size) -> torch.Tensor:
    # A random projection of the output as the loss: `out.sum()` gives layer norm's input
    # a gradient that is zero in exact arithmetic, which compares only rounding noise.
    return torch.randn(shape, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("name", real_models.MODELS)
def test_inference_matches_eager(name):
    _needs(name)
    model, inputs = real_models.build(name, "tiny")
    model.eval()
    compiled = torch.compile(model, backend="memopt")
    with torch.no_grad():
        want = model(*inputs)
        got, notes = _run_checked(compiled, *inputs)
    assert not notes, notes
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", real_models.MODELS)
def test_training_step_matches_eager(name):
    _needs(name)
    model, inputs = real_models.build(name, "tiny")
    params = dict(model.named_parameters())

    def step(fn):
        out = fn(*inputs)
        loss = (out * _weights(out.shape)).sum()
        return out, torch.autograd.grad(loss, list(params.values()), allow_unused=True)

    want, want_grads = step(model)
    (got, got_grads), notes = _run_checked(step, torch.compile(model, backend="memopt"))
    assert not notes, notes
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    largest = max(g.abs().max().item() for g in want_grads if g is not None)
    assert largest > 0
    for pname, g, w in zip(params, got_grads, want_grads):
        if w is None:
            assert g is None or not g.any(), pname
            continue
        torch.testing.assert_close(
            g,
            w,
            rtol=GRAD_RTOL,
            atol=GRAD_ATOL_OF_MAX * largest,
            msg=lambda m, p=pname: f"{p}: {m}",
        )


def test_residual_stored_beside_layer_norm_keeps_its_input():
    """Found by GPT-2: `h = mm + b + r` is stored in the first pass of the layer-norm row and
    the mm output (nothing reads it afterwards) was reused as h's memory, so the later
    passes, which load the mm output again, read h instead."""
    torch.manual_seed(0)
    x, w, r = torch.randn(32, 64), torch.randn(64, 64), torch.randn(32, 64)
    b, gamma, beta = torch.randn(64), torch.randn(64), torch.randn(64)

    def block(x, w, r, b, gamma, beta):
        h = torch.mm(x, w) + b + r
        return h, F.layer_norm(h, (64,), gamma, beta)

    compiled = torch.compile(block, backend="memopt", options={"backend": "cpp"})
    got = compiled(x, w, r, b, gamma, beta)
    want = block(x, w, r, b, gamma, beta)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-4)
