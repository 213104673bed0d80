"""Memory traffic of real models and the built-in examples: eager, TorchInductor, memopt.

    python bench/traffic.py                              # every program; prints the table
    python bench/traffic.py --write BENCHMARKS.md        # and replaces its traffic section
    python bench/traffic.py --programs gpt2,mlp --modes inference

For each program (tests/real_models.py at the "small" size, and memopt.examples) and mode
(inference; training = forward + backward):

- eager: bytes eager PyTorch moves, counted by memopt's byte-counting dispatch mode
  (`Analysis.eager_bytes`); kernels = non-view ATen ops executed (`Analysis.eager_ops`).
- Inductor: TorchInductor's own estimate for the kernels it generates on this CPU: the
  sum of `BaseSchedulerNode.get_read_write_buffers_sizes()` over the scheduler's nodes after
  fusion (torch/_inductor/scheduler.py; `GraphLowering.count_bytes` in
  torch/_inductor/graph.py sums the same thing for `torch._inductor.metrics`), read by
  wrapping `Scheduler.codegen`, with the FX graph cache off so every graph is scheduled.
  Per buffer it takes min(buffer size, elements iterated x accesses); extern kernels
  (matmul, convolution) count their buffers whole; a MultiOutput node counts 0.
  Kernels = scheduler nodes that launch something (not no-op nodes).
- memopt: `Analysis.bytes_moved` (modelled), kernels = `len(Analysis.kernels)`, with the
  default pipeline and `backend="auto"` (C++ kernels on this CPU: no matmul templates).
- bound: `Analysis.lower_bound_bytes` (every graph input read once, output written once).
- H100 ms: each byte count divided by H100 SXM HBM3 bandwidth, 3.35 TB/s (datasheet;
  memopt.compiler.devices), memory time only (modelled; FLOPs are ignored).

The two compilers count with different rules (Inductor's min(size, iterations) per buffer
vs memopt's touched elements), so compare them as estimates, not to the byte.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import memopt  # noqa: E402
from memopt.compiler.devices import DEVICES  # noqa: E402

import real_models  # noqa: E402

START = "<!-- bench/traffic.py: start -->"
END = "<!-- bench/traffic.py: end -->"
EXAMPLES = ("gpt2_block", "mlp", "convnet", "layernorm_gelu")
MODES = ("inference", "training")


@dataclass
class Row:
    program: str
    mode: str
    eager_bytes: int
    eager_ops: int
    inductor_bytes: int | None
    inductor_kernels: int | None
    memopt_bytes: int
    memopt_kernels: int
    bound_bytes: int
    note: str = ""


def programs(names: list[str] | None) -> dict[str, Callable[[], tuple]]:
    found: dict[str, Callable[[], tuple]] = {}
    for name in real_models.MODELS:
        if name in real_models.HF_MODELS and not real_models.has_transformers():
            continue
        found[name] = lambda name=name: real_models.build(name, "small")
    for name in EXAMPLES:
        found[name] = lambda name=name: _example(name)
    if names:
        unknown = [n for n in names if n not in found]
        if unknown:
            raise SystemExit(f"unknown programs {unknown}; known: {', '.join(found)}")
        found = {n: found[n] for n in names}
    return found


def _example(name: str) -> tuple:
    import importlib

    return importlib.import_module(f"memopt.examples.{name}").example()


class InductorBytes:
    """Sums Inductor's per-node byte estimates over every graph it schedules."""

    def __init__(self) -> None:
        self.nbytes = 0
        self.kernels = 0

    def __enter__(self) -> InductorBytes:
        from torch._inductor import config
        from torch._inductor import scheduler as sched

        self._patches = [
            (config, "fx_graph_cache", config.fx_graph_cache),
            (sched.Scheduler, "codegen", sched.Scheduler.codegen),
        ]
        config.fx_graph_cache = False
        original = sched.Scheduler.codegen
        counter = self

        def codegen(scheduler: sched.Scheduler) -> None:
            for node in scheduler.nodes:
                if isinstance(node, sched.NopKernelSchedulerNode):
                    continue
                counter.nbytes += node.get_read_write_buffers_sizes()
                counter.kernels += 1
            return original(scheduler)

        sched.Scheduler.codegen = codegen
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, value in self._patches:
            setattr(owner, name, value)


def _step(fn: Callable, inputs: tuple, training: bool) -> None:
    if training:
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
    else:
        with torch.no_grad():
            fn(*inputs)


def inductor_bytes(model: object, inputs: tuple, training: bool) -> tuple[int, int]:
    import torch._dynamo

    torch._dynamo.reset()
    with InductorBytes() as counter:
        _step(torch.compile(model, backend="inductor"), inputs, training)
    if isinstance(model, torch.nn.Module):
        model.zero_grad(set_to_none=True)
    return counter.nbytes, counter.kernels


def measure(name: str, make: Callable[[], tuple], mode: str, inductor: bool) -> Row:
    model, inputs = make()
    training = mode == "training"
    if isinstance(model, torch.nn.Module):
        model.train(training)
    elif training:  # a plain function: train with respect to its floating-point inputs
        inputs = tuple(t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs)
    analysis = memopt.analyze(model, *inputs, training=training)
    row = Row(
        name,
        mode,
        analysis.eager_bytes,
        analysis.eager_ops,
        None,
        None,
        analysis.bytes_moved,
        len(analysis.kernels),
        analysis.lower_bound_bytes,
    )
    if inductor:
        try:
            row.inductor_bytes, row.inductor_kernels = inductor_bytes(model, inputs, training)
        except Exception as error:  # noqa: BLE001 - the table says why the cell is empty
            row.note = f"Inductor failed: {type(error).__name__}"
    return row


def _mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.2f}"


def _ms(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    return f"{nbytes / DEVICES['h100'].bandwidth_bytes_per_s * 1e3:.4f}"


def _ratio(a: int | None, b: int | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def table(rows: list[Row]) -> str:
    head = (
        "| program | mode | eager MiB | Inductor MiB | memopt MiB | bound MiB "
        "| memopt / Inductor | kernels eager / Inductor / memopt "
        "| H100 ms eager / Inductor / memopt / bound |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        kernels = f"{r.eager_ops} / {r.inductor_kernels or '-'} / {r.memopt_kernels}"
        times = " / ".join(
            _ms(b) for b in (r.eager_bytes, r.inductor_bytes, r.memopt_bytes, r.bound_bytes)
        )
        lines.append(
            f"| {r.program} | {r.mode} | {_mib(r.eager_bytes)} | {_mib(r.inductor_bytes)} "
            f"| {_mib(r.memopt_bytes)} | {_mib(r.bound_bytes)} "
            f"| {_ratio(r.memopt_bytes, r.inductor_bytes)} | {kernels} | {times} |"
            + (f" {r.note}" if r.note else "")
        )
    return "\n".join(lines)


def section(rows: list[Row], command: str) -> str:
    size = real_models.SIZES["small"]
    return "\n".join(
        [
            START,
            "## Memory traffic: eager, TorchInductor, memopt (bench/traffic.py)",
            "",
            f"Regenerate: `{command}`. Generated {datetime.date.today().isoformat()} with "
            f"torch {torch.__version__}, Python {platform.python_version()}, on a CPU "
            f"({platform.machine()}).",
            "",
            "Eager is *counted* (every ATen op's inputs and outputs, views free); Inductor is "
            "*its own estimate* (`get_read_write_buffers_sizes()` summed over its scheduler's "
            "nodes for the kernels it generates on this CPU); memopt and the bound are "
            "*modelled* (memopt's cost model; memopt on CPU runs matmuls as library calls, "
            "no matmul templates). H100 ms = bytes / 3.35 TB/s (memory time only, "
            "modelled). Real models (tests/real_models.py, random weights, float32): "
            f"hidden {size.hidden}, {size.layers} layers, {size.heads} heads, sequence "
            f"{size.seq}, batch {size.batch}, vocabulary {size.vocab}; conv nets: "
            f"{size.image}x{size.image} images, batch {size.batch}, first width {size.width}, "
            f"{size.stages} blocks. Training = forward + backward (loss seeded with ones).",
            "",
            table(rows),
            END,
        ]
    )


def write_section(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: text, old)
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + text + "\n"
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--programs", help="comma-separated program names")
    parser.add_argument("--modes", default=",".join(MODES), help="inference,training")
    parser.add_argument("--no-inductor", action="store_true", help="skip TorchInductor")
    parser.add_argument("--write", help="replace the traffic section of this Markdown file")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", message="(?!memopt)")
    rows = []
    for name, make in programs(args.programs.split(",") if args.programs else None).items():
        for mode in args.modes.split(","):
            start = time.perf_counter()
            row = measure(name, make, mode, not args.no_inductor)
            rows.append(row)
            print(
                f"{name} {mode}: memopt {_mib(row.memopt_bytes)} MiB, Inductor "
                f"{_mib(row.inductor_bytes)} MiB ({time.perf_counter() - start:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    print(table(rows))
    if args.write:
        command = "python bench/traffic.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write_section(Path(args.write), section(rows, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
