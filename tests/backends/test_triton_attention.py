"""The Triton attention kernel (online softmax) under the interpreter, against eager SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from memopt.backends.triton.attention import attention  # noqa: E402
from memopt.backends.triton.attention_backward import attention_backward  # noqa: E402

TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_eager_sdpa(dtype, causal):
    # seq 150: a full and a partial key block of 128; head dim 24: a padded 32-wide tile.
    q, k, v = (torch.randn(1, 2, 150, 24).to(dtype) for _ in range(3))
    got = attention(q, k, v, is_causal=causal)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_additive_and_bool_masks_and_strided_inputs():
    qkv = torch.randn(2, 20, 3, 2, 16)  # (batch, seq, q/k/v, heads, dim): strided views
    q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
    additive = torch.randn(20, 20)
    keep = torch.rand(2, 1, 20, 20) > 0.3
    keep[..., 0] = True
    for mask in (additive, keep):
        torch.testing.assert_close(
            attention(q, k, v, attn_mask=mask, scale=0.3),
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3),
            rtol=2e-5,
            atol=2e-5,
        )


def test_head_dim_128():
    q, k, v = (torch.randn(1, 1, 17, 128) for _ in range(3))
    torch.testing.assert_close(
        attention(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=2e-5, atol=2e-5
    )


@pytest.mark.parametrize(
    "dtype, causal, mask",
    [
        (torch.float32, True, None),
        (torch.float16, False, "additive"),
        (torch.bfloat16, False, "bool"),
    ],
)
def test_backward_recomputes_scores_and_matches_autograd(dtype, causal, mask):
    # seq 40 in 64-wide tiles, head dim 24 in a 32-wide one; the logsumexp as the forward writes it.
    q, k, v = (torch.randn(2, 2, 40, 24).to(dtype).requires_grad_() for _ in range(3))
    if mask == "additive":
        mask = torch.randn(40, 40).to(dtype)
    elif mask == "bool":
        mask = torch.rand(2, 1, 40, 40) > 0.3
        mask[..., 0] = True
    want_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=0.3)
    grad_out = torch.randn_like(want_out)
    want = torch.autograd.grad(want_out, (q, k, v), grad_out)
    q, k, v = q.detach(), k.detach(), v.detach()
    lse = torch.empty(2, 40, 2).transpose(1, 2)  # the strides the ATen op gives it
    out = attention(q, k, v, mask, causal, 0.3, lse=lse)
    got = attention_backward(grad_out, q, k, v, out, lse, mask, causal, 0.3)
    rtol, atol = TOLERANCE[dtype]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=4 * atol)
