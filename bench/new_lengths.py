"""Decoding with a dynamic KV cache at cache lengths a compiled model has not met.

A kernel of memopt's with a size symbol (the 4-layer Llama's decode step has four: the key
rotation fused with the key cache's concatenation) works out its launch once per distinct
size and keeps it (`compiler/kernel_ir.SIZES_KEPT` sizes a kernel); the decode attention
binds the layouts it meets twice. bench/decode.py's rounds repeat one prompt, so after its
first `generate()` every step meets a length it met before: its dynamic-cache figures show
no cost of new lengths. A server's prompts have many lengths, and each step of a new one is
new. This benchmark measures that cost directly: each round takes a prompt of a length not
used before (the ranges of cache lengths the rounds meet do not overlap) and runs
`generate()` twice on it, the first meeting only new lengths, the second the same lengths
again; the two are compared within the round. TorchInductor runs the same rounds, its
dynamic-shape kernels keeping nothing per size, as the control.

    python bench/new_lengths.py --rounds 5 --write BENCHMARKS.md    # about 4 min
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode  # noqa: E402 - the decode benchmark's models and timed forward

START = "<!-- bench/new_lengths.py: start -->"
END = "<!-- bench/new_lengths.py: end -->"
NEW_TOKENS = 64
SPACING = NEW_TOKENS + 1  # prompts this far apart meet disjoint ranges of cache lengths


@dataclass
class Result:
    model: str
    context: int
    backend: str
    new: list[float] = field(default_factory=list)  # ms a token, first generate() of a prompt
    again: list[float] = field(default_factory=list)  # the same prompt's second
    new_step: list[float] = field(default_factory=list)  # median decode forward, ms
    again_step: list[float] = field(default_factory=list)


def _timed_generate(model, forward, prompt) -> tuple[float, float]:
    forward.seconds.clear()
    start = time.perf_counter()
    model.generate(prompt, **decode.generate_kwargs("dynamic", NEW_TOKENS))
    per_token = (time.perf_counter() - start) / NEW_TOKENS * 1e3
    return per_token, statistics.median(forward.seconds[1:]) * 1e3


def run(name: str, context: int, backend: str, rounds: int) -> Result:
    model = decode.build(name)
    tokens = torch.randint(
        0, model.config.vocab_size, (1, context + SPACING * (rounds + 3)),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    result = Result(name, context, backend)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        forward = decode.TimedForward(model.forward, backend, "/tmp/memopt_new_lengths")
        model.forward = forward
        # Compiles: the prefill at two prompt lengths (Dynamo makes the second dynamic), the
        # decode steps (dynamic from the second); the lengths met here are met by no round.
        for length in (context + SPACING * (rounds + 1), context + SPACING * (rounds + 2)):
            model.generate(tokens[:, :length], **decode.generate_kwargs("dynamic", NEW_TOKENS))
        gc.collect()  # the compiles' objects: not a collection inside a round
        for k in range(rounds):
            prompt = tokens[:, : context + SPACING * k]
            per_token, step = _timed_generate(model, forward, prompt)
            result.new.append(per_token)
            result.new_step.append(step)
            per_token, step = _timed_generate(model, forward, prompt)
            result.again.append(per_token)
            result.again_step.append(step)
    return result


def table(results: list[Result]) -> str:
    lines = decode.table_header(
        "model", "prompts", "backend", "ms a token, new lengths", "same prompt again",
        "new / again", "step ms, new", "step ms, again",
    )  # fmt: skip
    for r in results:
        ratios = [a / b for a, b in zip(r.new, r.again)]
        prompts = f"{r.context}-{r.context + SPACING * (len(r.new) - 1)}"
        median = statistics.median
        lines.append(
            f"| {r.model} | {prompts} | {r.backend} | {median(r.new):.2f} | "
            f"{median(r.again):.2f} | {median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) "
            f"| {median(r.new_step):.2f} | {median(r.again_step):.2f} |"
        )
    return "\n".join(lines)


def report(results: list[Result], command: str) -> str:
    return "\n".join(
        [
            "### Decoding at new cache lengths (bench/new_lengths.py)",
            "",
            f"Machine: {decode.machine()}.",
            f"Command: `{command}`. {NEW_TOKENS} new tokens a `generate()`, dynamic cache; "
            "each round a prompt of a new length (the rounds' prompts "
            f"{SPACING} tokens apart), run twice: medians over the rounds, the ratio within "
            "each round (its median, and range).",
            "",
            table(results),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="*", default=["llama", "llama-large"], choices=decode.MODELS
    )
    parser.add_argument("--contexts", nargs="*", type=int, default=[128, 1024])
    parser.add_argument("--backends", nargs="*", default=["memopt", "inductor"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", help="replace this benchmark's section of a Markdown file")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    results = []
    for name in args.models:
        for context in args.contexts:
            for backend in args.backends:
                print(f"{name}, prompts from {context}, {backend} ...", file=sys.stderr, flush=True)
                results.append(run(name, context, backend, args.rounds))
                torch._dynamo.reset()
    text = report(results, decode.command_line("new_lengths.py", argv))
    decode.publish(text, args.write, START, END)


if __name__ == "__main__":
    main()
