"""Saved activations in bfloat16 (the precision pass's `saved_activations="bf16"`) on real
models in training: the memory they hold, the bytes moved, the gradients' error, the time.

    python bench/saved_activations.py                          # every model; prints the table
    python bench/saved_activations.py --write BENCHMARKS.md    # and replaces its section
    python bench/saved_activations.py --models gpt2 --rounds 5

Models: GPT-2, BERT, Llama and T5 from transformers at the "bench" size of
tests/real_models.py (4 layers, 512 wide, 8 heads, 256 tokens, batch 4, float32, random
weights), one training step each (forward and backward of every parameter,
`memopt.driver.measure.run_step`), compiled by memopt as it is by default ("fp32") and with
`pass_options={"precision": {"saved_activations": "bf16"}}` ("bf16 saved"). Per model:

- saved MiB (measured): the distinct storages the compiled forward hands its backward,
  other than the parameters and the step's inputs, counted with
  `torch.autograd.graph.saved_tensors_hooks` during one step: the memory held from the
  forward to the backward;
- narrowed: the tensors the pass stored in bfloat16 / the saved activations it looked at
  (its ledger: the others are returned to the caller too, or not float32);
- moved MiB (modelled): memopt's bytes of the forward and backward graphs, from its report
  records;
- gradient error (measured): the largest `max |g - g_eager| / max |g_eager|` over the
  parameters' gradients (each scale at least a thousandth of the largest gradient's, as
  the pass measures), against eager float32, for fp32 and for bf16 saved, the outputs'
  gradients seeded with normal values; "pass" is the error the pass measured itself when
  it compiled;
- step (measured): the median step time over interleaved rounds, and bf16 saved's speedup
  over fp32 (the median of the rounds' ratios).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu import _load_average, interleaved, machine, table_header, write_results  # noqa: E402

from memopt.compiler.capture import backward_seeds, fresh_entry  # noqa: E402
from memopt.driver.measure import run_step  # noqa: E402
from memopt.passes.output_error import compare  # noqa: E402
from memopt.passes.saved_precision import GRADIENT_FLOOR  # noqa: E402

from models import build, paired  # noqa: E402

MODELS = ("gpt2", "bert", "llama", "t5")
VARIANTS = ("fp32", "bf16 saved")
MARK_START = "<!-- bench/saved_activations.py: start -->"
MARK_END = "<!-- bench/saved_activations.py: end -->"
MIB = 2**20


@dataclass
class Result:
    name: str
    saved_nbytes: dict[str, int] = field(default_factory=dict)
    moved_nbytes: dict[str, int] = field(default_factory=dict)
    error: dict[str, float] = field(default_factory=dict)
    pass_error: float = 0.0
    narrowed: int = 0
    looked_at: int = 0
    times: dict[str, list[float]] = field(default_factory=dict)


def options(variant: str, report_dir: str) -> dict[str, object]:
    chosen = {"report_dir": report_dir}
    if variant == "bf16 saved":
        chosen["pass_options"] = {"precision": {"saved_activations": "bf16"}}
    return chosen


def saved_nbytes(program, model, inputs) -> int:
    """Bytes of the distinct storages a step saves for its backward, other than the
    parameters' and the inputs' (measured)."""
    kept = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in kept:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run_step(program, model, inputs, True)
    # the step's own copies of the inputs are saved too (an embedding's ids): not activations
    ids = sum(x.nbytes for x in inputs if isinstance(x, torch.Tensor))
    return sum(storages.values()) - ids


def gradients(program, model, inputs) -> list[torch.Tensor | None]:
    """The parameters' gradients of one step, each output's gradient seeded with normal
    values (seeded): with ones, the sum of a LayerNorm's outputs is constant and every
    gradient below it is rounding noise."""
    parameters = list(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        outs, _ = backward_seeds(program(*inputs))
        generator = torch.Generator().manual_seed(0)
        seeds = [torch.randn(t.shape, generator=generator) for t in outs]
        return list(torch.autograd.grad(outs, parameters, seeds, allow_unused=True))


def relative_error(got: list, want: list) -> float:
    """The largest max |g - g_eager| over max |g_eager|, over the parameters, each scale
    at least a thousandth of the largest (the pass's GRADIENT_FLOOR: a key projection's
    bias has a zero gradient but for rounding)."""
    pairs = [(g, w) for g, w in zip(got, want) if g is not None and w is not None]
    return compare([w for _, w in pairs], [g for g, _ in pairs], set(), GRADIENT_FLOOR).relative


def records(report_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(report_dir.glob("*.json"))]


def run_model(name: str, rounds: int) -> Result:
    model, inputs = build(name, "training")
    result = Result(name)
    root = Path(tempfile.mkdtemp(prefix="memopt-saved-"))
    programs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for variant in VARIANTS:
            directory = root / variant.replace(" ", "-")
            programs[variant] = torch.compile(
                fresh_entry(model), backend="memopt", options=options(variant, str(directory))
            )
            run_step(programs[variant], model, inputs, True)  # compile
            graphs = records(directory)
            result.moved_nbytes[variant] = sum(r["bytes_moved"]["value"] for r in graphs)
            if variant == "bf16 saved":
                decisions = [
                    d
                    for r in graphs
                    for entry in r["ledger"]
                    if entry["pass"] == "precision"
                    for d in entry["decisions"]
                ]
                applied = [d for d in decisions if d["applied"]]
                result.narrowed, result.looked_at = len(applied), len(decisions)
                result.pass_error = max((d["figures"]["total_error"] for d in applied), default=0.0)
        expected = gradients(model, model, inputs)
        for variant, program in programs.items():
            result.saved_nbytes[variant] = saved_nbytes(program, model, inputs)
            result.error[variant] = relative_error(gradients(program, model, inputs), expected)
        steps = {v: (lambda p=p: run_step(p, model, inputs, True)) for v, p in programs.items()}
        for step in steps.values():
            step()
        result.times = interleaved(steps, rounds)
    return result


def table(results: list[Result]) -> str:
    lines = table_header(
        "model",
        "saved MiB fp32",
        "saved MiB bf16",
        "narrowed",
        "moved MiB fp32",
        "moved MiB bf16",
        "grad error fp32",
        "grad error bf16 (pass)",
        "step ms fp32",
        "step ms bf16",
        "bf16 vs fp32",
    )
    for r in results:
        fp32, bf16 = VARIANTS
        lines.append(
            f"| {r.name} | {r.saved_nbytes[fp32] / MIB:.1f} | {r.saved_nbytes[bf16] / MIB:.1f} "
            f"| {r.narrowed}/{r.looked_at} | {r.moved_nbytes[fp32] / MIB:.1f} "
            f"| {r.moved_nbytes[bf16] / MIB:.1f} | {r.error[fp32]:.1e} "
            f"| {r.error[bf16]:.1e} ({r.pass_error:.1e}) "
            f"| {statistics.median(r.times[fp32]) * 1e3:.0f} "
            f"| {statistics.median(r.times[bf16]) * 1e3:.0f} | {paired(r.times, fp32, bf16)} |"
        )
    return "\n".join(lines)


def report(results: list[Result], command: str, rounds: int, load: str) -> str:
    return "\n".join(
        [
            "### Saved activations in bf16 (bench/saved_activations.py)",
            "",
            f"`{command}` on {machine()}; {rounds} interleaved rounds; load average before "
            f"the run {load}. One training step at the bench size (4 layers, 512 wide, "
            "256 tokens, batch 4). Saved: measured; moved: modelled; errors against eager "
            "float32, measured.",
            "",
            table(results),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", metavar="FILE", help="replace this file's section")
    args = parser.parse_args(argv)
    load = _load_average()
    results = []
    for name in args.models:
        print(f"{name} ...", file=sys.stderr, flush=True)
        results.append(run_model(name, args.rounds))
        print(table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    command = "python bench/saved_activations.py " + " ".join(argv or sys.argv[1:])
    text = report(results, command.strip(), args.rounds, load)
    print(text)
    if args.write:
        write_results(Path(args.write), text, MARK_START, MARK_END)


if __name__ == "__main__":
    main()
