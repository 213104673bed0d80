"""One decode step of a Llama-style language model: the token-by-token workload.

4 layers, 512 wide, grouped-query attention (8 query heads, 2 key/value heads of 64),
SwiGLU MLP 1376 wide, vocabulary 8000, float32: 19.3 M parameters. One token at position
POSITION reads every weight once (the embedding table only at its row) and the KV cache up
to the position, writes its keys and values into the cache in place and returns the
next-token logits. Written as Hugging Face's Llama computes it: RMSNorm, rotary embedding,
`repeat_kv` of the cache before SDPA (what memopt's attention pass undoes: the op reads
the 2 cached heads itself, not 8 copies), the output projection and the residual.

A decode step is memory-bound by construction: about 2 FLOPs per weight byte read over 4
bytes, so its time is its bytes over the bandwidth. The report shows its bytes against the
lower bound, which here is the weights plus the KV cache read and written.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

LAYERS = 4
WIDTH = 512
HEADS = 8
KV_HEADS = 2
HEAD_DIM = WIDTH // HEADS
MLP = 1376
VOCAB = 8000
MAX_LEN = 1024  # the static cache's length
POSITION = 512  # the step's token position: positions 0..511 are cached


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, heads, length, dim = x.shape
    x = x[:, :, None, :, :].expand(batch, heads, n_rep, length, dim)
    return x.reshape(batch, heads * n_rep, length, dim)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn_norm = nn.Parameter(torch.ones(WIDTH))
        self.q = nn.Linear(WIDTH, HEADS * HEAD_DIM, bias=False)
        self.k = nn.Linear(WIDTH, KV_HEADS * HEAD_DIM, bias=False)
        self.v = nn.Linear(WIDTH, KV_HEADS * HEAD_DIM, bias=False)
        self.o = nn.Linear(HEADS * HEAD_DIM, WIDTH, bias=False)
        self.mlp_norm = nn.Parameter(torch.ones(WIDTH))
        self.gate = nn.Linear(WIDTH, MLP, bias=False)
        self.up = nn.Linear(WIDTH, MLP, bias=False)
        self.down = nn.Linear(MLP, WIDTH, bias=False)

    def forward(self, x, cos, sin, position, mask, k_cache, v_cache):
        h = rms_norm(x, self.attn_norm)
        q = self.q(h).view(1, 1, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k(h).view(1, 1, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v(h).view(1, 1, KV_HEADS, HEAD_DIM).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache.index_copy_(2, position, k)  # the cache, updated in place
        v_cache.index_copy_(2, position, v)
        n_rep = HEADS // KV_HEADS
        attn = F.scaled_dot_product_attention(
            q, repeat_kv(k_cache, n_rep), repeat_kv(v_cache, n_rep), attn_mask=mask
        )
        x = x + self.o(attn.transpose(1, 2).reshape(1, 1, WIDTH))
        h = rms_norm(x, self.mlp_norm)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class LlamaDecodeStep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.norm = nn.Parameter(torch.ones(WIDTH))
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, token, position, *caches):
        """token, position: int64 [1]; caches: each layer's keys, then its values, [1, kv
        heads, MAX_LEN, head dim], one tensor each as Hugging Face's caches keep them,
        updated in place at `position`. Returns the logits [1, 1, VOCAB]."""
        freqs = position.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos()[None, None], angles.sin()[None, None]
        # Attend to the cached positions up to this one: an additive mask over the cache.
        visible = torch.arange(MAX_LEN) <= position
        mask = torch.zeros(1, 1, 1, MAX_LEN).masked_fill(~visible, float("-inf"))
        x = self.embed(token)[None]
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, position, mask, caches[2 * index], caches[2 * index + 1])
        return self.lm_head(rms_norm(x, self.norm))


def example() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model and its inputs (token, position, then each layer's key and value cache)."""
    torch.manual_seed(0)
    model = LlamaDecodeStep().eval()
    caches = []
    for _ in range(2 * LAYERS):
        cache = torch.zeros(1, KV_HEADS, MAX_LEN, HEAD_DIM)
        cache[:, :, :POSITION] = torch.randn(1, KV_HEADS, POSITION, HEAD_DIM)
        caches.append(cache)
    return model, (torch.tensor([17]), torch.tensor([POSITION]), *caches)


if __name__ == "__main__":
    import memopt
    from memopt.reports.summary import format_analysis

    model, inputs = example()
    with torch.no_grad():
        print(format_analysis(memopt.analyze(model, *inputs)))
