"""Models nobody wrote for memopt: Hugging Face transformers built from config objects
(random weights, no download) and torchvision-style convolutional nets written with torch.nn.

Shared by tests/driver/test_models.py (at the "tiny" size), bench/traffic.py (at "small") and
bench/models.py (at "bench").
torchvision's wheels for torch 2.13 are CUDA builds whose extension fails to load beside
the CPU build of torch, so the convolutional nets are written out here, layer for layer in
the shape of torchvision's ResNet BasicBlock and MobileNetV3 inverted residual.

`build(name, size, attention=...)` returns `(module, example_inputs)`; every module takes
tensors positionally and returns one tensor, so it runs through `memopt.analyze`,
`torch.compile` and the eager byte counter alike.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

# Models are built from config objects: nothing may reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class Size:
    vocab: int
    hidden: int
    layers: int
    heads: int
    seq: int
    batch: int
    image: int  # conv nets: image side in pixels
    width: int  # conv nets: channels of the first stage
    stages: int  # conv nets: residual blocks (ResNet stages, MobileNet inverted residuals)


SIZES = {
    # Tests: one layer (compile time grows faster than linearly with the graph), so a
    # forward and backward through memopt take seconds.
    "tiny": Size(
        vocab=128, hidden=64, layers=1, heads=4, seq=16, batch=2, image=16, width=8, stages=1
    ),
    # The traffic benchmark: large enough that activations, not weights, dominate traffic.
    "small": Size(
        vocab=2048, hidden=256, layers=2, heads=8, seq=128, batch=4, image=64, width=32, stages=4
    ),
    # The speed benchmark (bench/models.py): 4 layers, 512 wide, 8 heads, 256 tokens, batch 4;
    # activations of 2-8 MiB per tensor, past this class of machine's L2 and near its L3.
    "bench": Size(
        vocab=8192, hidden=512, layers=4, heads=8, seq=256, batch=4, image=128, width=64, stages=4
    ),
}

HF_MODELS = ("gpt2", "bert", "llama", "t5")
CONV_MODELS = ("resnet", "mobilenet")
MODELS = HF_MODELS + CONV_MODELS


def decoding_llama(hidden: int = 64, layers: int = 1) -> nn.Module:
    """A tiny Hugging Face Llama for decoding tests: 4 query heads over 2 key/value heads
    (head dim hidden / 4), vocabulary 128, seeded."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return transformers.LlamaForCausalLM(config).eval()


def generate(model: nn.Module, prompt: torch.Tensor, cache: str, new_tokens: int) -> torch.Tensor:
    """Greedy `generate()` of exactly `new_tokens` with the "static" or default ("dynamic")
    KV cache; a memopt warning (a fallback) is an error."""
    import warnings

    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames
        warnings.filterwarnings("error", message="memopt")
        return model.generate(prompt, **kwargs)


def has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


class LanguageModel(nn.Module):
    """A transformers model behind a tensor-in, tensor-out forward (logits or hidden states)."""

    def __init__(self, model: nn.Module, output: str) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, input_ids: torch.Tensor, *decoder_ids: torch.Tensor) -> torch.Tensor:
        kwargs = {"decoder_input_ids": decoder_ids[0]} if decoder_ids else {}
        result = self.model(input_ids=input_ids, use_cache=False, return_dict=True, **kwargs)
        return getattr(result, self.output)


def _gpt2(size: Size, attention: str) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=size.vocab,
        n_positions=size.seq,
        n_embd=size.hidden,
        n_layer=size.layers,
        n_head=size.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attention,
    )
    return LanguageModel(GPT2LMHeadModel(config), "logits")


def _bert(size: Size, attention: str) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        intermediate_size=4 * size.hidden,
        max_position_embeddings=size.seq,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation=attention,
    )
    return LanguageModel(BertModel(config, add_pooling_layer=False), "last_hidden_state")


def _llama(size: Size, attention: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=4 * size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads // 2,  # grouped-query attention, as Llama 2/3 have
        max_position_embeddings=size.seq,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        attn_implementation=attention,
    )
    return LanguageModel(LlamaForCausalLM(config), "logits")


def _t5(size: Size, attention: str) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=size.vocab,
        d_model=size.hidden,
        d_kv=size.hidden // size.heads,
        d_ff=4 * size.hidden,
        num_layers=size.layers,
        num_decoder_layers=size.layers,
        num_heads=size.heads,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        attn_implementation=attention,
    )
    return LanguageModel(T5ForConditionalGeneration(config), "logits")


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 conv-bn, relu, identity or 1x1 downsample."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """A ResNet-10 layout (stem, up to 4 stages of one BasicBlock each, pool, fc)."""

    def __init__(self, width: int, stages: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        widths = [width, 2 * width, 4 * width, 8 * width][:stages]
        blocks, c_in = [], width
        for index, c_out in enumerate(widths):
            blocks.append(BasicBlock(c_in, c_out, stride=1 if index == 0 else 2))
            c_in = c_out
        self.stages = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(scale))))
        return x * scale


class InvertedResidual(nn.Module):
    """MobileNetV3's block: 1x1 expand, depthwise 3x3, squeeze-excite, 1x1 project."""

    def __init__(self, c_in: int, expanded: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.use_residual = stride == 1 and c_in == c_out
        self.expand = nn.Sequential(
            nn.Conv2d(c_in, expanded, 1, bias=False), nn.BatchNorm2d(expanded), nn.Hardswish()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(expanded, expanded, 3, stride, 1, groups=expanded, bias=False),
            nn.BatchNorm2d(expanded),
            nn.Hardswish(),
        )
        self.se = SqueezeExcitation(expanded, max(8, expanded // 4))
        self.project = nn.Sequential(
            nn.Conv2d(expanded, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return out + x if self.use_residual else out


class MobileNet(nn.Module):
    """A MobileNetV3-small-like net: stem, four inverted residual blocks, pool, classifier."""

    def __init__(self, width: int, stages: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.Hardswish()
        )
        # (input, expanded, output channels as multiples of width; stride)
        layout = [(1, 4, 1, 1), (1, 4, 2, 2), (2, 6, 2, 1), (2, 6, 4, 2)][:stages]
        self.blocks = nn.Sequential(
            *(InvertedResidual(i * width, e * width, o * width, s) for i, e, o, s in layout)
        )
        c_out = layout[-1][2] * width
        self.classifier = nn.Sequential(
            nn.Linear(c_out, 8 * width), nn.Hardswish(), nn.Linear(8 * width, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


_BUILDERS: dict[str, Callable[[Size, str], nn.Module]] = {
    "gpt2": _gpt2,
    "bert": _bert,
    "llama": _llama,
    "t5": _t5,
    "resnet": lambda size, attention: ResNet(size.width, size.stages),
    "mobilenet": lambda size, attention: MobileNet(size.width, size.stages),
}


def build(
    name: str, size: str | Size = "tiny", *, attention: str = "sdpa", seed: int = 0
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model (random weights from `seed`, float32, train mode) and example inputs, at
    one of SIZES or at a Size of the caller's.

    Dropout is off (probability 0) in every model, so training runs are deterministic and
    compiled gradients can be compared with eager ones.

    attention: the transformers attention implementation, "sdpa" (their default) or
    "eager" (attention written out as matmul, softmax, matmul).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    dims = SIZES[size] if isinstance(size, str) else size
    torch.manual_seed(seed)
    model = _BUILDERS[name](dims, attention)
    generator = torch.Generator().manual_seed(seed + 1)
    if name in CONV_MODELS:
        inputs = (torch.randn(dims.batch, 3, dims.image, dims.image, generator=generator),)
    else:
        shape = (dims.batch, dims.seq)
        inputs = (torch.randint(0, dims.vocab, shape, generator=generator),)
        if name == "t5":  # an encoder-decoder: the decoder reads half as many tokens
            half = (dims.batch, dims.seq // 2)
            inputs += (torch.randint(0, dims.vocab, half, generator=generator),)
    return model, inputs
