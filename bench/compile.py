"""Compile time as models grow: memopt against TorchInductor, both cold (issue 16).

    python bench/compile.py                          # every row; prints the tables
    python bench/compile.py --write BENCHMARKS.md    # and replaces its section (+ the plot)
    python bench/compile.py --layers 2,6 --modes inference --no-synthetic
    python bench/compile.py --no-models              # only the 10,000-node graph

Rows: GPT-2 from transformers (GPT2LMHeadModel built from a config: 768 wide, 12 heads,
sequence 128, batch 1, vocabulary 50257, fp32, random weights, dropout off) at 2, 6, 12 and
24 layers, in inference (no_grad, eval mode) and training (forward and backward of every
parameter), compiled with `torch.compile(model, backend=...)` as a user compiles it.

Cold: every compile runs in a fresh Python process with empty on-disk caches, Dynamo reset
and Inductor's FX graph cache off (bench/cpu.py's `_fresh_caches`). Compile time is the
first call's time minus a steady call's (the median of three).

Per-pass breakdown: in the same fresh process, after the timed compile, `memopt.analyze`
of the same model with memopt's lowering-probe cache emptied: the capture (Dynamo,
AOTAutograd; in training it includes the partition stage, which costs candidate
partitions through the pipeline) and each pass of the ATen pipeline, summed over the
graphs, with the modelled bytes and kernels of the result.

The synthetic graph: `BLOCKS` identical blocks (LayerNorm, Linear, GELU, Linear, residual
add; 64 wide, written with torch.nn), about 10,000 ATen nodes, in inference, through every
pass (`memopt.analyze`).

Measured on the machine in the header; none of it is comparable across machines.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from cpu import _fresh_caches, _load_average, machine, write_results  # noqa: E402

from memopt.driver.measure import run_step  # noqa: E402
from memopt.passes import DEFAULT_PIPELINE  # noqa: E402

import real_models  # noqa: E402

MARK_START = "<!-- bench/compile.py: start -->"
MARK_END = "<!-- bench/compile.py: end -->"
PLOT = ROOT / "docs" / "compile-time.svg"
LAYERS = (2, 6, 12, 24)
MODES = ("inference", "training")
BACKENDS = ("inductor", "memopt")
BLOCKS = 270  # synthetic blocks: about 10,000 ATen nodes
PASS_ORDER = DEFAULT_PIPELINE


# --- one compile, in a fresh process -----------------------------------------------------


def gpt2(layers: int, training: bool):
    """GPT-2 small's width (768, 12 heads) at `layers` layers, 128 tokens, batch 1."""
    size = real_models.Size(
        vocab=50257,
        hidden=768,
        layers=layers,
        heads=12,
        seq=128,
        batch=1,
        image=0,
        width=0,
        stages=0,
    )
    model, inputs = real_models.build("gpt2", size)
    model.train(training)
    return model, inputs


class Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.fc1 = torch.nn.Linear(width, 2 * width)
        self.fc2 = torch.nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


def breakdown(analysis) -> dict[str, object]:
    """Seconds of the capture, the partition stage and each ATen pass, summed over graphs."""
    passes: dict[str, float] = {}
    partition = 0.0
    for graph in analysis.graphs:
        for entry in graph.ledger:
            if entry.stage == "partition":
                partition += entry.elapsed_ms / 1e3
            elif entry.stage == "aten":
                passes[entry.pass_name] = passes.get(entry.pass_name, 0.0) + entry.elapsed_ms / 1e3
    return {
        "capture_s": analysis.capture_ms / 1e3,
        "partition_s": partition,
        "pipeline_s": analysis.pipeline_ms / 1e3,
        "passes": passes,
        "bytes_moved": analysis.bytes_moved,
        "kernels": sum(len(g.kernels) for g in analysis.graphs),
        "nodes": sum(g.ledger[0].text_before.count("\n") for g in analysis.graphs if g.ledger),
    }


def _child_model(layers: int, mode: str, backend: str) -> dict[str, object]:
    import memopt
    from memopt.passes import fusion

    training = mode == "training"
    model, inputs = gpt2(layers, training)
    with _fresh_caches():
        program = torch.compile(model, backend=backend)
        first = run_step(program, model, inputs, training)[1]
    steady = statistics.median(run_step(program, model, inputs, training)[1] for _ in range(3))
    result: dict[str, object] = {"compile_s": max(first - steady, 0.0)}
    if backend == "memopt":
        torch._dynamo.reset()
        fusion._PROBES.clear()
        with _fresh_caches():
            grad = torch.enable_grad() if training else torch.no_grad()
            with grad:
                result |= breakdown(memopt.analyze(model, *inputs, training=training))
    return result


def _child_synthetic(blocks: int) -> dict[str, object]:
    import memopt

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[Block(64) for _ in range(blocks)]).eval()
    x = torch.randn(8, 16, 64)
    with _fresh_caches(), torch.no_grad():
        start = time.perf_counter()
        analysis = memopt.analyze(model, x)
        total = time.perf_counter() - start
    return breakdown(analysis) | {"total_s": total}


def in_fresh_process(*args: str) -> dict[str, object]:
    command = [sys.executable, __file__, "--child", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def fastest(repeats: int, *args: str) -> dict[str, object]:
    """The run with the shortest compile of `repeats` fresh processes: on a shared machine
    other jobs only ever add time, to either compiler alike."""
    runs = [in_fresh_process(*args) for _ in range(repeats)]
    return min(runs, key=lambda r: r["compile_s"])


# --- the tables --------------------------------------------------------------------------


@dataclass
class Row:
    layers: int
    mode: str
    compile_s: dict[str, float]
    memopt: dict[str, object] = field(default_factory=dict)


def row_table(rows: list[Row]) -> str:
    lines = [
        "| layers | mode | inductor s | memopt s | memopt / inductor | ATen nodes | "
        "capture s | of which partition s | pipeline s | recompute s | fusion s | "
        "other passes s | bytes moved (modelled) | kernels |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r.memopt
        passes = m.get("passes", {})
        other = sum(v for k, v in passes.items() if k not in ("recompute", "fusion"))
        ratio = r.compile_s["memopt"] / r.compile_s["inductor"]
        lines.append(
            f"| {r.layers} | {r.mode} | {r.compile_s['inductor']:.1f} | "
            f"{r.compile_s['memopt']:.1f} | {ratio:.2f}x | {m['nodes']:,} | "
            f"{m['capture_s']:.1f} | {m['partition_s']:.1f} | {m['pipeline_s']:.1f} | "
            f"{passes.get('recompute', 0):.2f} | {passes.get('fusion', 0):.2f} | {other:.2f} | "
            f"{m['bytes_moved']:,} | {m['kernels']} |"
        )
    return "\n".join(lines)


def synthetic_table(result: dict[str, object]) -> str:
    passes = result["passes"]
    header = " | ".join(PASS_ORDER)
    cells = " | ".join(f"{passes.get(p, 0):.2f}" for p in PASS_ORDER)
    return "\n".join(
        [
            f"| ATen nodes | capture s | pipeline s | {header} |",
            "|---:|---:|---:|" + "---:|" * len(PASS_ORDER),
            f"| {result['nodes']:,} | {result['capture_s']:.1f} | {result['pipeline_s']:.1f} | "
            f"{cells} |",
        ]
    )


def targets(rows: list[Row], synthetic: dict[str, object] | None) -> str:
    by = {(r.layers, r.mode): r for r in rows}
    lines = ["| target | this run |", "|---|---|"]
    twelve = by.get((12, "training"))
    if twelve:
        ratio = twelve.compile_s["memopt"] / twelve.compile_s["inductor"]
        lines.append(
            f"| GPT-2 12-layer training compile at most 0.5x Inductor's | {ratio:.2f}x "
            f"({twelve.compile_s['memopt']:.1f} s against {twelve.compile_s['inductor']:.1f} s): "
            f"{'met' if ratio <= 0.5 else 'not met'} |"
        )
    for mode in MODES:
        low, high = by.get((12, mode)), by.get((24, mode))
        if low and high:
            growth = high.compile_s["memopt"] / low.compile_s["memopt"]
            lines.append(
                f"| 24 layers at most 2.2x the 12-layer time, {mode} | {growth:.2f}x: "
                f"{'met' if growth <= 2.2 else 'not met'} |"
            )
    if synthetic:
        seconds = synthetic["pipeline_s"]
        lines.append(
            f"| the {synthetic['nodes']:,}-node graph through all passes in at most 10 s | "
            f"{seconds:.1f} s: {'met' if seconds <= 10 else 'not met'} |"
        )
    inference = [r for r in rows if r.mode == "inference"]
    if inference:
        worst = max(r.compile_s["memopt"] / r.compile_s["inductor"] for r in inference)
        lines.append(
            f"| inference compile at most 0.25x Inductor's | at most {worst:.2f}x over the "
            f"rows: {'met' if worst <= 0.25 else 'not met'} |"
        )
    return "\n".join(lines)


# --- the plot: an SVG written here (no plotting library) ---------------------------------

_W, _H, _L, _R, _T, _B = 560, 360, 64, 150, 20, 48
_STYLE = {
    ("memopt", "inference"): ("#2c6fbb", ""),
    ("memopt", "training"): ("#2c6fbb", "6 4"),
    ("inductor", "inference"): ("#c0392b", ""),
    ("inductor", "training"): ("#c0392b", "6 4"),
}


def plot(rows: list[Row]) -> str:
    """Compile seconds against layers, both axes logarithmic, one line per backend and mode."""
    xs = sorted({r.layers for r in rows})
    ys = [s for r in rows for s in r.compile_s.values() if s > 0]
    x0, x1 = math.log10(min(xs)) - 0.05, math.log10(max(xs)) + 0.05
    y0, y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))

    def sx(x: float) -> float:
        return _L + (math.log10(x) - x0) / (x1 - x0) * (_W - _L - _R)

    def sy(y: float) -> float:
        return _H - _B - (math.log10(y) - y0) / (y1 - y0) * (_H - _T - _B)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
        f'viewBox="0 0 {_W} {_H}" font-family="sans-serif" font-size="11">',
        f'<rect x="{_L}" y="{_T}" width="{_W - _L - _R}" height="{_H - _T - _B}" '
        'fill="#fcfcfc" stroke="#bbb"/>',
    ]
    for x in xs:
        out.append(
            f'<line x1="{sx(x):.1f}" y1="{_T}" x2="{sx(x):.1f}" y2="{_H - _B}" stroke="#eee"/>'
            f'<text x="{sx(x):.1f}" y="{_H - _B + 14}" text-anchor="middle">{x}</text>'
        )
    for exponent in range(y0, y1 + 1):
        for mantissa in (1, 2, 5):
            y = mantissa * 10.0**exponent
            if not 10.0**y0 <= y <= 10.0**y1:
                continue
            out.append(
                f'<line x1="{_L}" y1="{sy(y):.1f}" x2="{_W - _R}" y2="{sy(y):.1f}" '
                'stroke="#eee"/>'
                f'<text x="{_L - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:g}</text>'
            )
    out += [
        f'<text x="{(_L + _W - _R) / 2}" y="{_H - 12}" text-anchor="middle">'
        "GPT-2 layers (768 wide, 128 tokens)</text>",
        f'<text transform="translate(16 {(_T + _H - _B) / 2}) rotate(-90)" '
        'text-anchor="middle">cold compile, seconds (measured)</text>',
    ]
    for k, ((backend, mode), (colour, dash)) in enumerate(_STYLE.items()):
        points = sorted((r.layers, r.compile_s[backend]) for r in rows if r.mode == mode)
        if not points:
            continue
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        out.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
            f'stroke-dasharray="{dash}" points="{coords}"/>'
        )
        out += [
            f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>' for x, y in points
        ]
        ly = _T + 14 + 18 * k
        out.append(
            f'<line x1="{_W - _R + 10}" y1="{ly - 4}" x2="{_W - _R + 34}" y2="{ly - 4}" '
            f'stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}"/>'
            f'<text x="{_W - _R + 40}" y="{ly}">{backend}, {mode}</text>'
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def report(rows, synthetic, command: str, load: str) -> str:
    lines = [
        "### This run",
        "",
        f"Command: `{command}`. Machine: {machine()}. Load average (1 min) at the start and "
        f"end: {load}.",
        "",
        "Measured: cold compile seconds (a fresh process, empty caches; the first call minus "
        "a steady call; with `--repeats N`, the fastest of N such processes). The breakdown columns come from `memopt.analyze` of the same model "
        "in the same process, also cold: capture (Dynamo and AOTAutograd; in training it "
        "includes the partition stage, which costs candidate partitions through the "
        "pipeline), then the ATen pipeline and its two costliest passes. Bytes and kernels "
        "are modelled.",
    ]
    if rows:
        lines += ["", row_table(rows)]
        if PLOT.exists():
            lines += ["", f"![cold compile time against depth, log-log]({PLOT.relative_to(ROOT)})"]
    if synthetic:
        lines += [
            "",
            f"The synthetic graph: {BLOCKS} blocks of LayerNorm, Linear, GELU, Linear and a "
            "residual add (64 wide, batch 8 x 16 tokens), inference, `memopt.analyze`; "
            f"seconds per pass. Whole analysis: {synthetic['total_s']:.1f} s.",
            "",
            synthetic_table(synthetic),
        ]
    lines += ["", "Against issue 16's targets:", "", targets(rows, synthetic)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default=",".join(map(str, LAYERS)), help="comma list")
    parser.add_argument("--modes", default=",".join(MODES), help="inference,training")
    parser.add_argument("--no-models", action="store_true", help="only the synthetic graph")
    parser.add_argument("--no-synthetic", action="store_true")
    parser.add_argument(
        "--repeats", type=int, default=1, help="fresh-process compiles per cell; the fastest"
    )
    parser.add_argument("--write", type=Path, help="write the results into this Markdown file")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.child[0] == "synthetic":
            print(json.dumps(_child_synthetic(int(args.child[1]))))
        else:
            layers, mode, backend = args.child
            print(json.dumps(_child_model(int(layers), mode, backend)))
        return
    command = "python bench/compile.py " + " ".join(sys.argv[1:] if argv is None else argv)
    load_before = _load_average()
    rows: list[Row] = []
    if not args.no_models:
        for mode in args.modes.split(","):
            for layers in map(int, args.layers.split(",")):
                compile_s, memopt = {}, {}
                for backend in BACKENDS:
                    print(f"GPT-2, {layers} layers, {mode}, {backend} ...", file=sys.stderr)
                    result = fastest(args.repeats, str(layers), mode, backend)
                    compile_s[backend] = result.pop("compile_s")
                    memopt |= result
                rows.append(Row(layers, mode, compile_s, memopt))
                print(row_table(rows[-1:]).splitlines()[-1], file=sys.stderr)
    synthetic = None
    if not args.no_synthetic:
        print(f"the synthetic graph ({BLOCKS} blocks) ...", file=sys.stderr)
        synthetic = in_fresh_process("synthetic", str(BLOCKS))
    if args.write and rows:
        PLOT.write_text(plot(rows))
    text = report(rows, synthetic, command, f"{load_before} and {_load_average()}")
    print(text)
    if args.write:
        write_results(args.write, text, MARK_START, MARK_END)


if __name__ == "__main__":
    main()
