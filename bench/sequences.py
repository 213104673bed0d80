"""Many sequences in a row: the decode speed a server meets after its first requests.

bench/decode.py times four `generate()`s a backend (one compiling, three rounds). A server
runs thousands, and whatever a compiled model keeps per sequence shows only later:
Hugging Face makes a static KV cache anew for each `generate()`, in other memory, and a
decode step's tape (memopt's `backends/runtime/tape.py`) replays launches with the
cache's pointers. memopt once captured a new tape for each sequence, and from the ninth
(its limit of captures) ran the decode graph's program: every later sequence 20-30%
slower, which bench/decode.py never met.

This benchmark compiles each backend's `model.forward`, then runs `--sequences`
`generate()`s of distinct prompts of one length, the backends interleaved sequence by
sequence (the order rotating). It reports the median ms a token of the first sequences
after the compile (2-5) and of the last four, their ratio (late over early: above 1, a
backend slows as it serves), and memopt's late tokens/s against eager's and Inductor's.

    python bench/sequences.py --write BENCHMARKS.md      # about 4 min
    python bench/sequences.py --models llama --caches static --sequences 12
"""

from __future__ import annotations

import argparse
import copy
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

START = "<!-- bench/sequences.py: start -->"
END = "<!-- bench/sequences.py: end -->"
BACKENDS = ("eager", "inductor", "memopt")
EARLY = slice(1, 5)  # the sequences after the compiling one
LATE = 4  # the last this many


@dataclass
class Result:
    model: str
    cache: str
    context: int
    new_tokens: int
    per_token_ms: dict[str, list[float]] = field(default_factory=dict)  # sequence by sequence

    def early(self, backend: str) -> float:
        return statistics.median(self.per_token_ms[backend][EARLY])

    def late(self, backend: str) -> float:
        return statistics.median(self.per_token_ms[backend][-LATE:])


def run(name: str, cache: str, context: int, new_tokens: int, sequences: int) -> Result:
    model = decode.build(name)
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, model.config.vocab_size, (1, context), generator=g)
        for _ in range(sequences)
    ]
    kwargs = decode.generate_kwargs(cache, new_tokens)
    result = Result(name, cache, context, new_tokens)
    torch._dynamo.reset()
    models = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for backend in BACKENDS:
            models[backend] = copy.deepcopy(model)
            models[backend].forward = decode.TimedForward(
                models[backend].forward, backend, "/tmp/memopt_sequences"
            )
        for k, prompt in enumerate(prompts):
            if k == 1:
                gc.collect()  # the compiles' objects: not a collection inside a sequence
            shift = k % len(BACKENDS)
            tokens = {}
            for backend in BACKENDS[shift:] + BACKENDS[:shift]:
                start = time.perf_counter()
                tokens[backend] = models[backend].generate(prompt, **kwargs)
                elapsed = time.perf_counter() - start
                result.per_token_ms.setdefault(backend, []).append(elapsed / new_tokens * 1e3)
            for backend in BACKENDS[1:]:
                if not torch.equal(tokens[backend], tokens["eager"]):
                    raise SystemExit(
                        f"{name} {cache}: {backend}'s tokens differ from eager's at sequence {k}"
                    )
    return result


def table(results: list[Result]) -> str:
    lines = decode.table_header(
        "model", "cache", "backend", "ms a token, sequences 2-5", "last 4", "last / first",
        "tokens/s, last 4", "memopt vs this, last 4",
    )  # fmt: skip
    for r in results:
        for backend in BACKENDS:
            early, late = r.early(backend), r.late(backend)
            versus = "" if backend == "memopt" else f"{late / r.late('memopt'):.2f}x"
            lines.append(
                f"| {r.model} | {r.cache} | {backend} | {early:.2f} | {late:.2f} | "
                f"{late / early:.2f}x | {1e3 / late:.0f} | {versus} |"
            )
    return "\n".join(lines)


def report(results: list[Result], command: str) -> str:
    r = results[0]
    return "\n".join(
        [
            "### Many sequences in a row (bench/sequences.py)",
            "",
            f"Machine: {decode.machine()}.",
            f"Command: `{command}`. {len(r.per_token_ms['eager'])} `generate()`s a backend "
            f"(the first compiles), prompts of {r.context} tokens, {r.new_tokens} new tokens "
            "each, the backends interleaved sequence by sequence; tokens identical to eager's "
            "in every sequence (checked).",
            "",
            table(results),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["llama", "gpt2"], choices=decode.MODELS)
    parser.add_argument(
        "--caches", nargs="*", default=["static", "dynamic"], choices=("static", "dynamic")
    )
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--write", help="replace this benchmark's section of a Markdown file")
    args = parser.parse_args(argv)
    if args.sequences < EARLY.stop + LATE:
        parser.error(f"--sequences must be at least {EARLY.stop + LATE}")
    results = []
    for name in args.models:
        for cache in args.caches:
            print(f"{name}, {cache} cache ...", file=sys.stderr, flush=True)
            results.append(run(name, cache, args.context, args.new_tokens, args.sequences))
    text = report(results, decode.command_line("sequences.py", argv))
    decode.publish(text, args.write, START, END)


if __name__ == "__main__":
    main()
