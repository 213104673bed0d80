"""A GPT-2 transformer block, as nanoGPT writes it: pre-LayerNorm, attention by hand.

    x = x + attn(ln_1(x))
    x = x + mlp(ln_2(x))

GPT-2 small sizes (n_embd 768, 12 heads), one sequence of 128 tokens, float32, inference
(dropout omitted). Run `python examples/gpt2_block.py` for memopt's report on it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

N_EMBD = 768
N_HEAD = 12
SEQ_LEN = 128
BATCH = 1


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd)
        # A buffer, not a parameter: the causal mask is state but not learned.
        mask = torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)
        self.register_buffer("bias", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads back side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU.
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, n_embd: int = N_EMBD, n_head: int = N_HEAD, block_size: int = SEQ_LEN):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


def example() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The block in eval mode and one (BATCH, SEQ_LEN, N_EMBD) float32 input."""
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(BATCH, SEQ_LEN, N_EMBD)
    return model, (x,)


if __name__ == "__main__":
    import memopt
    from memopt.reports.summary import format_analysis

    model, inputs = example()
    print(format_analysis(memopt.analyze(model, *inputs)))
