"""Built-in example programs for `memopt report NAME` (shipped as `memopt.examples`).

Each example is a single file that runs top to bottom: `example()` returns a model (or
function) and its example inputs, and `python examples/NAME.py` prints the same summary
as `memopt report NAME`.
"""

from __future__ import annotations

# Name -> one-line description, in the order `memopt examples` lists them.
EXAMPLES: dict[str, str] = {
    "gpt2_block": "GPT-2 transformer block (768 wide, 12 heads, seq 128, batch 1, float32)",
    "mlp": "2-layer MLP 1024 -> 4096 -> 1024 with GELU, batch 64",
    "convnet": "3 x (conv 3x3 -> batchnorm -> relu), 3->16->32->32 channels, pool, linear to 10",
    "layernorm_gelu": "memory-bound gelu(layer_norm(x + residual)) at (4096, 1024) float32",
    "llama_decode": "one decode step of a 4-layer Llama (512 wide, GQA 8/2, KV cache 1024)",
}

DEFAULT_EXAMPLE = "gpt2_block"

__all__ = ["DEFAULT_EXAMPLE", "EXAMPLES"]
