"""AttentionKernel: the Triton attention kernels as fx call targets (placed by passes/attention).

Forward: `(out[, lse]) = kernel(q, k, v[, mask])`; backward:
`(dq, dk, dv) = kernel(grad_out, q, k, v, out, lse[, mask])`. Like a FusedKernel, a target
models its own cost (`memopt_cost`: each input read once, each output written once, no
score matrix), answers fake tensors with the replaced op's output metadata (so the
pipeline's verification re-propagates through it), and on real tensors allocates its
outputs in the layouts the replaced ATen op gives them. A launch that fails runs the
fused ATen op instead, with a warning naming the kernel.
"""

from __future__ import annotations

import math
import warnings

import sympy
import torch
import torch.fx
from torch._guards import active_fake_mode
from torch._subclasses.fake_tensor import FakeTensor

from memopt.backends.triton.attention import attention
from memopt.backends.triton.attention import source as forward_source
from memopt.backends.triton.attention_backward import attention_backward
from memopt.backends.triton.attention_backward import source as backward_source
from memopt.backends.triton.runtime import write_source
from memopt.compiler.cost import Cost, read_bytes
from memopt.compiler.graph import numel, output_metas, tensor_meta

aten = torch.ops.aten


class AttentionKernel:
    """Call target of an attention node (forward, or backward with `backward=True`)."""

    memopt_kind = "attention"

    def __init__(
        self,
        name: str,
        replaced: str,
        causal: bool,
        scale: float | None,
        mask_drops: bool,
        fake_outputs: tuple[object, ...],
        backward: bool = False,
    ) -> None:
        self.__name__ = name
        self.memopt_name = f"memopt.{name}"
        self.memopt_nodes = (replaced,)
        self.memopt_ops = ("triton attention backward" if backward else "triton attention",)
        self.memopt_source_path: str | None = None
        self.causal = causal
        self.scale = scale
        self.mask_drops = mask_drops  # a bool mask marks keys to drop, not keys to keep
        self.fake_outputs = fake_outputs
        self.backward = backward

    def __repr__(self) -> str:
        kind = "backward" if self.backward else "forward"
        return f"AttentionKernel({self.__name__}, {kind}, causal={self.causal}, scale={self.scale})"

    def memopt_cost(self, node: torch.fx.Node) -> Cost:
        read = read_bytes(node, node.all_input_nodes)
        write = sum((m.nbytes for m in output_metas(node)), sympy.Integer(0))
        # Forward: two matmuls over (batch, heads, Sq, Sk, D); backward: the scores again,
        # dV, dP, dQ, dK (five). Causal masks skip about half: not modelled.
        query, key = node.args[1:3] if self.backward else node.args[:2]
        *batch, seq_q, head_dim = tensor_meta(query).shape
        matmuls = 5 if self.backward else 2
        flops = 2 * matmuls * numel(batch) * seq_q * tensor_meta(key).shape[-2] * head_dim
        return Cost(read=read, write=write, flops=flops)

    def triton_source_path(self) -> str | None:
        if self.memopt_source_path is None:
            source = backward_source() if self.backward else forward_source()
            self.memopt_source_path = str(write_source(source))
        return self.memopt_source_path

    def __call__(self, *inputs: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        if active_fake_mode() is not None or any(isinstance(t, FakeTensor) for t in inputs):
            return self.fake_outputs  # verification re-propagating metadata
        if self.backward:
            grad_out, q, k, v, out, lse, mask = (*inputs, None)[:7]
            shapes = [q.shape, k.shape, v.shape]
        else:
            q, k, v, mask = (*inputs, None)[:4]
            shapes = [(*q.shape[:-1], v.shape[-1]), tuple(q.shape[:-1])]
        outputs = tuple(
            _empty_like_layout(fake, shape, q.device)
            for fake, shape in zip(self.fake_outputs, shapes)
        )
        try:
            if self.backward:
                attention_backward(
                    grad_out,
                    q,
                    k,
                    v,
                    out,
                    lse,
                    mask,
                    self.causal,
                    self.scale,
                    outputs,
                    self.mask_drops,
                )
            else:
                out, lse = (*outputs, None)[:2]
                attention(q, k, v, mask, self.causal, self.scale, out, lse, self.mask_drops)
        except Exception as error:  # noqa: BLE001 - no Triton, or a launch failure: ATen runs
            warnings.warn(
                f"memopt: attention kernel {self.__name__} failed ({type(error).__name__}: "
                f"{error}); running the fused ATen op",
                stacklevel=2,
            )
            mask = self._additive(mask, q.dtype)
            if self.backward:
                results = _aten_attention_backward(
                    grad_out, q, k, v, out, lse, mask, self.causal, self.scale
                )
            else:
                results = _aten_attention(q, k, v, mask, self.causal, self.scale)
            for target, value in zip(outputs, results):
                target.copy_(value)
        return outputs

    def _additive(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """The fused ATen op takes additive masks (or bool ones that keep where true)."""
        if mask is None or mask.dtype != torch.bool:
            return mask
        keep = ~mask if self.mask_drops else mask
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(
            ~keep, -math.inf
        )


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.cpu() if t is not None else None


def _aten_attention(q, k, v, mask, causal, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) from the CPU fused op (on another device: on CPU copies)."""
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
        _cpu(q), _cpu(k), _cpu(v), 0.0, causal, attn_mask=_cpu(mask), scale=scale
    )
    return out.to(q.device), lse.to(q.device)


def _aten_attention_backward(grad_out, q, k, v, out, lse, mask, causal, scale):
    grads = aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *(_cpu(t) for t in (grad_out, q, k, v, out, lse)),
        0.0,
        causal,
        attn_mask=_cpu(mask),
        scale=scale,
    )
    return tuple(g.to(q.device) for g in grads)


def _hint(size: object) -> int:
    node = getattr(size, "node", None)
    return int(node.hint) if node is not None and node.hint is not None else int(size)


def _empty_like_layout(fake: torch.Tensor, shape, device) -> torch.Tensor:
    """An empty tensor of `shape` whose dims are laid out in the order `fake`'s strides give."""
    strides = [_hint(s) for s in fake.stride()]
    order = sorted(range(len(shape)), key=lambda d: (-strides[d], d))
    empty = torch.empty([shape[d] for d in order], dtype=fake.dtype, device=device)
    return empty.permute([order.index(d) for d in range(len(shape))])
