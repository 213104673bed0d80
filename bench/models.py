"""Speed on real models and micro-blocks: eager vs TorchInductor vs memopt, on this CPU.

    python bench/models.py                           # everything; prints the tables
    python bench/models.py --write BENCHMARKS.md     # and replaces its section
    python bench/models.py --models gpt2 --modes inference --rounds 10 --no-blocks
    python bench/models.py --modes inference --no-blocks --freezing   # and Inductor, frozen

Models: GPT-2, Llama, BERT and T5 from transformers, built from configs at the "bench" size
of tests/real_models.py (4 layers, 512 wide, 8 heads, 256 tokens, batch 4, vocabulary
8192, float32, random weights), in inference (no_grad, eval mode) and training (forward
and backward of every parameter, `memopt.driver.measure.run_step`). Each is compiled with
`torch.compile(model, backend="inductor")` and `torch.compile(model, backend="memopt")`, the
way a user compiles it, and run with eager in interleaved rounds: one step of each per
round, the order rotating, so that the machine's drift falls on all three alike. Reported:
the median step time, and speedups as the median over rounds of the ratio within a round,
with the interquartile range of those ratios. Compile time: the first call's time minus a
steady call's, with fresh caches (Dynamo reset, no FX graph cache, empty on-disk caches),
in a fresh Python process ("cold", what a user's first run costs).

Micro-blocks: the pieces of those models that are memory-bound, at three sizes per input
tensor (256 KiB: in L2; 4 MiB: in L3; 128 MiB: in memory), each with memopt's default
output memory and with fresh output memory for every call (`bench/cpu.py`'s
`_with_fresh_memory`: what eager and Inductor get); plus the per-call overhead of a
3-op function on 64 elements. Each measurement repeats the call enough times to last about
2 ms, so the clock's resolution does not decide small sizes.

Every figure is measured on the machine in the header; none is comparable across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from cpu import (  # noqa: E402
    _fresh_caches,
    _load_average,
    _with_fresh_memory,
    interleaved,
    machine,
    write_results,
)

from memopt.compiler.capture import fresh_entry  # noqa: E402
from memopt.driver.measure import run_step  # noqa: E402

import real_models  # noqa: E402

MODELS = real_models.HF_MODELS
MODES = ("inference", "training")
BACKENDS = ("inductor", "memopt")
FREEZING = "inductor, freezing"  # Inductor with torch._inductor.config.freezing (--freezing)
MARK_START = "<!-- bench/models.py: start -->"
MARK_END = "<!-- bench/models.py: end -->"
MEASURE_S = 2e-3  # a micro-block measurement repeats its call to last about this long


# --- statistics ---------------------------------------------------------------------------


def paired(times: dict[str, list[float]], baseline: str, variant: str) -> str:
    """Median over rounds of baseline / variant within a round, with its interquartile range."""
    ratios = [b / v for b, v in zip(times[baseline], times[variant])]
    if len(ratios) < 4:
        return f"{statistics.median(ratios):.2f}x"
    low, _, high = statistics.quantiles(ratios, n=4)
    return f"{statistics.median(ratios):.2f}x ({low:.2f}-{high:.2f})"


# --- models -------------------------------------------------------------------------------


@dataclass
class ModelResult:
    name: str
    mode: str
    times: dict[str, list[float]]
    cold_compile_s: dict[str, float] = field(default_factory=dict)
    max_error: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def build(name: str, mode: str):
    model, inputs = real_models.build(name, "bench")
    if mode == "inference":
        model.eval()
    return model, inputs


def compile_model(model, backend: str):
    return torch.compile(fresh_entry(model), backend=backend)


def cold_compile_seconds(name: str, mode: str, backend: str) -> float:
    """First call minus a steady call, with fresh caches, in a fresh Python process."""
    command = [sys.executable, __file__, "--compile-only", name, mode, backend]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["compile_s"]


def _compile_only(name: str, mode: str, backend: str) -> float:
    model, inputs = build(name, mode)
    training = mode == "training"
    with _fresh_caches():
        program = compile_model(model, backend)
        first = run_step(program, model, inputs, training)[1]
    steady = statistics.median(run_step(program, model, inputs, training)[1] for _ in range(3))
    return max(first - steady, 0.0)


def run_model(name: str, mode: str, rounds: int, cold: bool, freezing: bool = False) -> ModelResult:
    """Eager, Inductor and memopt in interleaved rounds; with `freezing`, in inference, also
    Inductor with its opt-in `freezing` (weights folded as constants, prepacked)."""
    import torch._inductor.config as inductor_config

    training = mode == "training"
    cold_s = {b: cold_compile_seconds(name, mode, b) for b in BACKENDS} if cold else {}
    model, inputs = build(name, mode)
    programs: dict[str, Callable] = {"eager": model}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for backend in BACKENDS:
            programs[backend] = compile_model(model, backend)
            run_step(programs[backend], model, inputs, training)  # compile
        if freezing and not training:
            with inductor_config.patch(freezing=True):
                programs[FREEZING] = compile_model(model, "inductor")
                run_step(programs[FREEZING], model, inputs, training)
    notes = sorted({str(w.message) for w in caught if str(w.message).startswith("memopt")})
    expected = run_step(model, model, inputs, training)[0]
    max_error = {}
    for backend in (b for b in programs if b != "eager"):
        got = run_step(programs[backend], model, inputs, training)[0]
        max_error[backend] = max(
            float((g - e).abs().max()) for g, e in zip(got, expected) if g is not None
        )
    variants = {
        name: (lambda p=program: run_step(p, model, inputs, training))
        for name, program in programs.items()
    }
    for run in variants.values():  # warm up
        run()
    times = interleaved(variants, rounds)
    return ModelResult(name, mode, times, cold_s, max_error, notes)


def model_table(results: list[ModelResult]) -> str:
    frozen = any(FREEZING in r.times for r in results)
    extra = " memopt vs inductor with freezing |" if frozen else ""
    lines = [
        "| model | mode | eager ms | inductor ms | memopt ms | memopt vs inductor "
        f"| memopt vs eager |{extra} cold compile s, inductor | cold compile s, memopt |",
        "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if frozen else "") + "---:|---:|",
    ]
    for r in results:
        cells = [
            r.name,
            r.mode,
            *(f"{statistics.median(r.times[v]) * 1e3:.1f}" for v in ("eager", *BACKENDS)),
            paired(r.times, "inductor", "memopt"),
            paired(r.times, "eager", "memopt"),
        ]
        if frozen:
            cells.append(paired(r.times, FREEZING, "memopt") if FREEZING in r.times else "-")
        cells += [f"{r.cold_compile_s[b]:.1f}" if r.cold_compile_s else "-" for b in BACKENDS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- micro-blocks -------------------------------------------------------------------------

WIDTH = 1024  # the last dimension of every block's tensors (softmax: 256, a score row)
SIZES = {"256 KiB": 2**18, "4 MiB": 2**22, "128 MiB": 2**27}  # bytes per fp32 input tensor


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(0.79788456 * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_tanh_cube(x):
    return 0.5 * x * (1 + torch.tanh(0.79788456 * (x + 0.044715 * (x * x * x))))


def _exp(x):
    return torch.exp(x)


def _softmax(x):
    return torch.softmax(x.view(-1, 256), dim=-1)


def _residual_bias_add(x, residual, bias):
    return x + bias + residual


def _residual_layernorm(x, residual, weight, bias):
    return F.layer_norm(x + residual, (WIDTH,), weight, bias)


def _three_ops(x):
    return (x * 2 + 1).relu()


BLOCKS: dict[str, tuple[str, Callable, int]] = {  # name -> (text, fn, extra inputs kind)
    "gelu_tanh": ("GPT-2's GELU with pow(x, 3.0)", _gelu_tanh, 0),
    "gelu_tanh_cube": ("the same with x*x*x", _gelu_tanh_cube, 0),
    "exp": ("exp(x), a lone op", _exp, 0),
    "softmax": ("softmax over rows of 256 (attention scores)", _softmax, 0),
    "residual_bias_add": ("x + bias + residual", _residual_bias_add, 1),
    "residual_layernorm": ("layer_norm(x + residual)", _residual_layernorm, 2),
}


def block_inputs(kind: int, nbytes: int) -> tuple[torch.Tensor, ...]:
    x = torch.randn(nbytes // 4 // WIDTH, WIDTH)
    if kind == 0:
        return (x,)
    if kind == 1:
        return x, torch.randn_like(x), torch.randn(WIDTH)
    return x, torch.randn_like(x), torch.randn(WIDTH), torch.randn(WIDTH)


@dataclass
class BlockResult:
    name: str
    size: str
    times: dict[str, list[float]]
    max_error: float


def run_block(name: str, size: str, inputs: tuple[torch.Tensor, ...], rounds: int) -> BlockResult:
    fn = BLOCKS[name][1] if name in BLOCKS else _three_ops
    torch._dynamo.reset()
    programs = {"eager": fn, **{b: compile_model(fn, b) for b in BACKENDS}}
    with torch.no_grad():
        for program in programs.values():
            program(*inputs)
        programs["memopt, fresh memory"] = _with_fresh_memory(programs["memopt"])
        error = float((programs["memopt"](*inputs) - fn(*inputs)).abs().max())
        variants = {n: (lambda p=p: p(*inputs)) for n, p in programs.items()}
        start = time.perf_counter()
        for run in variants.values():
            run()
        per_call = (time.perf_counter() - start) / len(variants)
        calls = max(1, round(MEASURE_S / max(per_call, 1e-7)))
        times = interleaved(variants, rounds, calls)
    return BlockResult(name, size, times, error)


def block_table(results: list[BlockResult]) -> str:
    lines = [
        "| block | size per input | eager us | inductor us | memopt us | memopt vs inductor "
        "| memopt, fresh memory, vs inductor | memopt vs eager |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cells = [
            r.name,
            r.size,
            *(f"{statistics.median(r.times[v]) * 1e6:,.1f}" for v in ("eager", *BACKENDS)),
            paired(r.times, "inductor", "memopt"),
            paired(r.times, "inductor", "memopt, fresh memory"),
            paired(r.times, "eager", "memopt"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- the report ---------------------------------------------------------------------------


def report(
    models: list[ModelResult], blocks: list[BlockResult], command: str, rounds: int, load: str
) -> str:
    lines = [
        "### This run: eager, TorchInductor, memopt on this CPU",
        "",
        f"Command: `{command}` ({rounds} interleaved rounds). Machine: {machine()}. "
        f"Load average (1 min) at the start and end: {load}.",
        "",
        "Measured. Times are medians over rounds; a speedup is the median over rounds of "
        "(baseline time / memopt time) within one round, above 1.00x meaning memopt is "
        "faster, with the interquartile range in parentheses.",
    ]
    if models:
        lines += [
            "",
            "Models (transformers, built from configs: 4 layers, 512 wide, 8 heads, 256 "
            "tokens, batch 4, vocabulary 8192, fp32, random weights). A training step is "
            "forward and backward of every parameter. Cold compile: first call minus a "
            "steady call in a fresh process with empty caches.",
            "",
            model_table(models),
        ]
        errors = "; ".join(
            f"{r.name} {r.mode}: " + ", ".join(f"{b} {e:.1e}" for b, e in r.max_error.items())
            for r in models
        )
        lines += ["", f"Max |error| against eager (outputs and gradients): {errors}."]
        notes = sorted({n for r in models for n in r.notes})
        if notes:
            lines += ["", "Warnings from memopt:", "", *(f"- {n}" for n in notes)]
    if blocks:
        lines += [
            "",
            "Micro-blocks (fp32; rows of 1024; the size is that of each full input tensor; "
            "`overhead` is a 3-op function on 64 elements: the per-call cost of each "
            "compiled program). `fresh memory`: memopt without reusing an earlier call's "
            "output memory and without huge-page advice, as eager and Inductor run.",
            "",
            block_table(blocks),
            "",
            "Blocks: "
            + "; ".join(f"`{name}`: {text}" for name, (text, _, _) in BLOCKS.items())
            + ".",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma list (default all)")
    parser.add_argument("--modes", default=",".join(MODES), help="inference,training")
    parser.add_argument("--blocks", default=",".join(BLOCKS), help="comma list (default all)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--no-models", action="store_true")
    parser.add_argument("--no-blocks", action="store_true")
    parser.add_argument("--no-cold", action="store_true", help="skip fresh-process compiles")
    parser.add_argument(
        "--freezing",
        action="store_true",
        help="in inference, also time Inductor with its opt-in freezing (weights as constants)",
    )
    parser.add_argument("--write", type=Path, help="write the results into this Markdown file")
    parser.add_argument("--compile-only", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compile_only:  # a child of cold_compile_seconds
        print(json.dumps({"compile_s": _compile_only(*args.compile_only)}))
        return
    models = [m for m in args.models.split(",") if m] if not args.no_models else []
    modes = [m for m in args.modes.split(",") if m]
    blocks = [b for b in args.blocks.split(",") if b] if not args.no_blocks else []
    checks = ((models, MODELS, "model"), (modes, MODES, "mode"), (blocks, BLOCKS, "block"))
    for value, known, what in checks:
        unknown = [v for v in value if v not in known]
        if unknown:
            parser.error(f"unknown {what} {unknown[0]!r}; known: {', '.join(known)}")
    if models and not real_models.has_transformers():
        parser.error("the models need transformers: pip install -e '.[models]'")
    load_before = _load_average()
    model_results = []
    for name in models:
        for mode in modes:
            print(f"[{name} {mode}] compiling and timing ...", file=sys.stderr, flush=True)
            model_results.append(
                run_model(name, mode, args.rounds, cold=not args.no_cold, freezing=args.freezing)
            )
            print(model_table(model_results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    block_results = []
    if blocks:
        print("[overhead] ...", file=sys.stderr, flush=True)
        block_results.append(run_block("overhead", "256 B", (torch.randn(64),), args.rounds))
    for name in blocks:
        for size, nbytes in SIZES.items():
            print(f"[{name} {size}] ...", file=sys.stderr, flush=True)
            inputs = block_inputs(BLOCKS[name][2], nbytes)
            block_results.append(run_block(name, size, inputs, args.rounds))
            print(block_table(block_results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    command = "python bench/models.py " + " ".join(sys.argv[1:] if argv is None else argv)
    load = f"{load_before} and {_load_average()}"
    text = report(model_results, block_results, command.strip(), args.rounds, load)
    print(text)
    if args.write:
        write_results(args.write, text, MARK_START, MARK_END)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
