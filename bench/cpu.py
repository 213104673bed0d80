"""CPU benchmark: eager vs TorchInductor vs memopt's C++ backend on memory-bound blocks.

    python bench/cpu.py                     # all blocks; prints a table
    python bench/cpu.py --write BENCHMARKS.md
    python bench/cpu.py --blocks softmax --repeats 5

For each block: the run time of eager, `torch.compile(backend="inductor")`,
`torch.compile(backend="memopt", options={"backend": "cpp"})` and the same memopt program
with fresh memory for every output (no huge-page advice, no reuse of an earlier call's
output memory), measured interleaved (one call of each per round, the order
rotating, so drift in the machine hits all alike), reported as median and spread (min-max
over rounds) and as paired speedups (median over rounds of the ratio within a round); and
the compile time of both compilers with fresh caches (Dynamo state, Inductor's FX graph and
C++ caches, memopt's kernel cache), in this process and in a fresh one ("cold"), as the
first call's time minus a steady-state call's.

Sizes are chosen so each block's working set exceeds the last-level cache (32 MiB L3 on the
machine the committed figures come from: `lscpu`), so the memory traffic memopt saves shows.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.gpt2_block import Block  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    memory_bound: bool
    make: Callable[[], tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]]


def _layernorm_gelu():
    rows, width = 8192, 2048  # 64 MiB per (rows, width) fp32 tensor

    def block(x, residual, weight, bias):
        return F.gelu(F.layer_norm(x + residual, (width,), weight, bias))

    inputs = (torch.randn(rows, width), torch.randn(rows, width))
    return block, (*inputs, torch.randn(width), torch.randn(width))


def _softmax():
    def block(x):
        return torch.softmax(x, dim=-1)

    return block, (torch.randn(8192, 4096),)  # 128 MiB in, 128 MiB out


class TransformerMLP(nn.Module):
    """Pre-LN transformer MLP with its residual: x + fc2(gelu(fc1(ln(x))))."""

    def __init__(self, width: int = 1024, hidden: int = 4096) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


def _mlp():
    model = TransformerMLP().eval()
    return model, (torch.randn(4096, 1024),)  # hidden activation: 64 MiB


def _gpt2():
    # GPT-2 small width (768, 12 heads), 4 sequences of 512 tokens: the attention scores are
    # 48 MiB and the MLP's hidden activation 24 MiB.
    model = Block(block_size=512).eval()
    return model, (torch.randn(4, 512, 768),)


class ConvBnRelu(nn.Module):
    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def _conv():
    model = ConvBnRelu().eval()
    with torch.no_grad():  # non-trivial running statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model, (torch.randn(32, 64, 64, 64),)  # 32 MiB per activation


CASES = {
    case.name: case
    for case in (
        Case("layernorm_gelu", "gelu(layer_norm(x + residual)), 8192x2048", True, _layernorm_gelu),
        Case("softmax", "softmax(x, -1), 8192x4096", True, _softmax),
        Case("mlp", "x + fc2(gelu(fc1(ln(x)))), 4096 tokens, 1024->4096", False, _mlp),
        Case("gpt2_block", "GPT-2 block, 768 wide, 4x512 tokens", False, _gpt2),
        Case("conv_bn_relu", "relu(bn(conv3x3(x))), 32x64x64x64", False, _conv),
    )
}


@contextlib.contextmanager
def _fresh_caches():
    """Cold compiles: fresh Dynamo state, no FX graph cache, empty on-disk caches."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    saved = {k: os.environ.get(k) for k in ("MEMOPT_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as directory:
        os.environ["MEMOPT_CACHE_DIR"] = os.path.join(directory, "memopt")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(directory, "inductor")
        torch._dynamo.reset()
        with inductor_config.patch(fx_graph_cache=False, autotune_local_cache=False):
            try:
                yield
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value


def _compile(fn, inputs, backend: str):
    """(compiled fn, compile seconds, warnings): the first call's time minus a later call's
    (the median of three).

    memopt's calls are timed with its output-memory handling off (`_with_fresh_memory`: no
    huge-page advice, no reuse of an earlier call's output memory), so that its first and
    later calls fault in their outputs as Inductor's do, and the difference is compilation.
    With the handling on, a later call reuses the memory the first one faulted in, and the
    first call's huge-page faults vary with the kernel's compaction work (0.1-0.3 s for
    softmax's 128 MiB output, measured): that is a first-call cost, reported apart in
    BENCHMARKS.md, not compile time."""
    options = {"backend": "cpp"} if backend == "memopt" else None
    with _fresh_caches(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(fn, backend=backend, options=options)
        timed = _with_fresh_memory(compiled) if backend == "memopt" else compiled
        start = time.perf_counter()
        timed(*inputs)
        first = time.perf_counter() - start
    steady_times = []
    for _ in range(3):  # the median of three: one descheduled call does not move it
        start = time.perf_counter()
        timed(*inputs)
        steady_times.append(time.perf_counter() - start)
    steady = statistics.median(steady_times)
    notes = [str(w.message) for w in caught if "memopt" in str(w.message)]
    return compiled, max(first - steady, 0.0), notes


def cold_compile_seconds(name: str, backend: str) -> float:
    """Compile time in a fresh Python process with fresh caches: what a first run costs
    (Inductor's includes starting its compile workers; memopt's its compiler probe)."""
    command = [sys.executable, __file__, "--compile-only", name, backend]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["compile_s"]


def _warm_up_compilers() -> None:
    """Compile a tiny function with both compilers once, so the in-process compile times
    that follow measure compiling the block, not importing and starting the compilers."""
    x = torch.randn(64, 64)
    for backend in ("inductor", "memopt"):
        _compile(lambda x: torch.softmax(x * 2, -1) + 1, (x,), backend)


def _with_fresh_memory(compiled: Callable) -> Callable:
    """The same compiled function with memopt's output-memory handling switched off (huge-page
    advice, reuse of an earlier call's output memory): what the kernels gain apart from the
    operating system's page faults. Outputs written over dead inputs stay (a compile-time
    plan, as Inductor's in-place kernels)."""
    from memopt.backends import memory

    def run(*args):
        saved = memory.HUGE_PAGE_OUTPUTS, memory.REUSE_OUTPUTS
        memory.HUGE_PAGE_OUTPUTS = memory.REUSE_OUTPUTS = False
        try:
            return compiled(*args)
        finally:
            memory.HUGE_PAGE_OUTPUTS, memory.REUSE_OUTPUTS = saved

    return run


@dataclass
class Result:
    case: Case
    times_ms: dict[str, list[float]]
    compile_s: dict[str, float]  # in a warmed-up process, fresh caches
    cold_compile_s: dict[str, float]  # in a fresh process, fresh caches
    max_error: dict[str, float]
    notes: list[str]

    def median(self, variant: str) -> float:
        return statistics.median(self.times_ms[variant])

    def ratios(self, baseline: str, variant: str = "memopt") -> list[float]:
        """Baseline time / variant time within each round (paired: robust to the machine
        slowing down and speeding up between rounds)."""
        return [b / m for b, m in zip(self.times_ms[baseline], self.times_ms[variant])]

    def speedup(self, baseline: str, variant: str = "memopt") -> float:
        """Median over rounds of the paired ratio."""
        return statistics.median(self.ratios(baseline, variant))

    def speedup_text(self, baseline: str, variant: str = "memopt") -> str:
        """The median paired ratio and its interquartile range over rounds."""
        ratios = self.ratios(baseline, variant)
        if len(ratios) < 4:
            return f"{statistics.median(ratios):.2f}x"
        low, _, high = statistics.quantiles(ratios, n=4)
        return f"{statistics.median(ratios):.2f}x ({low:.2f}-{high:.2f})"


def run_case(case: Case, repeats: int, cold: bool) -> Result:
    cold_compile_s = {b: cold_compile_seconds(case.name, b) for b in ("inductor", "memopt")} if cold else {}  # fmt: skip
    torch.manual_seed(0)
    fn, inputs = case.make()
    variants: dict[str, Callable] = {"eager": fn}
    compile_s: dict[str, float] = {}
    notes: list[str] = []
    with torch.no_grad():
        for backend in ("inductor", "memopt"):
            variants[backend], compile_s[backend], caught = _compile(fn, inputs, backend)
            notes += caught
        variants["memopt_fresh"] = _with_fresh_memory(variants["memopt"])
        expected = fn(*inputs)
        max_error = {
            name: float((variant(*inputs) - expected).abs().max())
            for name, variant in variants.items()
        }
        for variant in variants.values():  # warm up: page in the outputs, settle threads
            variant(*inputs)
        calls = {name: (lambda v=variant: v(*inputs)) for name, variant in variants.items()}
        seconds = interleaved(calls, repeats)
    times = {name: [t * 1e3 for t in ts] for name, ts in seconds.items()}
    return Result(case, times, compile_s, cold_compile_s, max_error, notes)


def interleaved(
    variants: dict[str, Callable[[], object]], rounds: int, calls: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each variant, one measurement of each per round (`calls` calls
    long). Who goes first rotates: a call can leave the next one freed memory to fault in,
    or caches to warm, so a fixed order would bias the paired ratios."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for index in range(rounds):
        shift = index % len(order)
        for name in order[shift:] + order[:shift]:
            run = variants[name]
            start = time.perf_counter()
            for _ in range(calls):
                run()
            times[name].append((time.perf_counter() - start) / calls)
    return times


def table_header(*columns: str, align: str = "---") -> list[str]:
    """A Markdown table's header and rule lines."""
    return ["| " + " | ".join(columns) + " |", "|" + "|".join([align] * len(columns)) + "|"]


def _spread(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}"


def format_table(results: list[Result]) -> str:
    cold = all(r.cold_compile_s for r in results)
    header = (
        "| block | eager ms | inductor ms | memopt ms | memopt, fresh memory ms "
        "| memopt vs eager | memopt vs inductor | fresh memory vs inductor "
        "| compile s inductor | compile s memopt | compile memopt/inductor |"
    )
    lines = [header, "|" + "---|" * 11]
    for r in results:
        compile_cells = []
        for backend in ("inductor", "memopt"):
            text = f"{r.compile_s[backend]:.1f}"
            if cold:
                text += f" (cold {r.cold_compile_s[backend]:.1f})"
            compile_cells.append(text)
        ratio = f"{r.compile_s['memopt'] / r.compile_s['inductor']:.2f}"
        if cold:
            ratio += f" (cold {r.cold_compile_s['memopt'] / r.cold_compile_s['inductor']:.2f})"
        cells = [
            r.case.name,
            *(
                f"{r.median(v):.1f} ({_spread(r.times_ms[v])})"
                for v in ("eager", "inductor", "memopt", "memopt_fresh")
            ),
            r.speedup_text("eager"),
            r.speedup_text("inductor"),
            r.speedup_text("inductor", "memopt_fresh"),
            *compile_cells,
            ratio,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        lscpu = ""
    fields = dict(
        (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lscpu.splitlines())
    )
    try:
        cxx = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout
        cxx = cxx.splitlines()[0]
    except (OSError, IndexError):
        cxx = "no g++"
    avx = ", ".join(f for f in ("avx2", "avx512f") if f in fields.get("Flags", "").split())
    return (
        f"{fields.get('Model name', platform.processor())}, {os.cpu_count()} cores "
        f"({avx}), L2 {fields.get('L2 cache', '?')}, L3 {fields.get('L3 cache', '?')}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), {cxx}, "
        f"Python {platform.python_version()}"
    )


def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def report(results: list[Result], command: str, repeats: int, load: str = "") -> str:
    lines = [
        f"Command: `{command}` ({repeats} interleaved rounds; {datetime.date.today().isoformat()})",
        "",
        f"Machine: {machine()}",
        "",
        *([f"Load average (1 min) at the start and end of the run: {load}.", ""] if load else []),
        "Run time: median over rounds (min-max in parentheses), measured. `memopt, fresh "
        "memory`: the same compiled memopt program with fresh memory for every output, as "
        "eager and Inductor get (`memopt.backends.memory.HUGE_PAGE_OUTPUTS` and "
        "`REUSE_OUTPUTS` off: no huge-page advice, no reuse of an earlier call's output "
        "memory once nothing holds it); writing outputs over dead inputs stays on. Speedups: median over "
        "rounds of (eager or Inductor time / memopt time) within the same round, so that "
        "the machine's drift between rounds cancels; in parentheses the interquartile range "
        "of those ratios. Compile time: first call minus a steady call (the median of three), "
        "measured, memopt's both with its output-memory handling off as in the `fresh "
        "memory` column (so that both compilers' calls fault in fresh outputs alike), "
        "with fresh caches (Dynamo reset, no FX graph cache, empty on-disk caches) in a "
        "process where both compilers have compiled something already; `cold`: the same in "
        "a fresh Python process (Inductor then also starts its compile workers, memopt "
        "probes the C++ compiler's flags).",
        "",
        format_table(results),
        "",
        "Blocks:",
        "",
    ]
    for r in results:
        kind = "memory-bound" if r.case.memory_bound else "matmul/conv-heavy"
        errors = ", ".join(f"{k} {v:.1e}" for k, v in r.max_error.items() if k != "eager")
        lines.append(
            f"- `{r.case.name}`: {r.case.description} ({kind}); max |error| vs eager: {errors}"
        )
    notes = sorted({n for r in results for n in r.notes})
    if notes:
        lines += ["", "Warnings from memopt:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


MARK_START = "<!-- bench/cpu.py: start -->"
MARK_END = "<!-- bench/cpu.py: end -->"


def write_results(path: Path, text: str, start: str = MARK_START, end: str = MARK_END) -> None:
    """Replace the generated section of `path` (between the markers); keep the prose."""
    block = f"{start}\n{text}\n{end}"
    old = path.read_text() if path.exists() else f"# Benchmarks\n\n{start}\n{end}\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old + "\n" + block + "\n"
    path.write_text(new)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=25, help="interleaved rounds")
    parser.add_argument("--write", type=Path, help="write the results into this Markdown file")
    parser.add_argument("--no-cold", action="store_true", help="skip fresh-process compiles")
    parser.add_argument(
        "--compile-only", nargs=2, metavar=("BLOCK", "BACKEND"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.compile_only:  # a child of cold_compile_seconds
        name, backend = args.compile_only
        fn, inputs = CASES[name].make()
        with torch.no_grad():
            _, seconds, _ = _compile(fn, inputs, backend)
        print(json.dumps({"compile_s": seconds}))
        return
    command = "python bench/cpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    load_before = _load_average()
    with torch.no_grad():
        _warm_up_compilers()
    results = []
    for name in args.blocks:
        print(f"[{name}] compiling and timing...", file=sys.stderr, flush=True)
        results.append(run_case(CASES[name], args.repeats, cold=not args.no_cold))
        print(format_table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    load = f"{load_before} and {_load_average()}"
    text = report(results, command.strip(), args.repeats, load)
    print(text)
    if args.write:
        write_results(args.write, text)
    if any(math.isnan(v) for r in results for v in r.max_error.values()):
        sys.exit("a compiled variant produced NaN where eager did not")


if __name__ == "__main__":
    main()
