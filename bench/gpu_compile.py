"""The Triton kernels of the GPT-2 block, compiled by Triton's own compilers for real GPUs.

No GPU is needed: Triton compiles for a named target on this machine (sm_90 for an H100,
gfx942 for an MI300X) and memopt reads the machine code back (memopt.compile_for_gpu). For
each launch: block sizes, warps, registers, stack and spill bytes, shared memory, the
occupancy those allow, the global load and store instructions by width, and the bytes those
instructions move over the grid against the kernel's modelled bytes.

    python bench/gpu_compile.py                       # GPT-2 block, sequence 1024, fp16
    python bench/gpu_compile.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu import write_results  # noqa: E402

import memopt  # noqa: E402
from memopt.examples.gpt2_block import Block  # noqa: E402
from memopt.reports.compiled import format_compiled  # noqa: E402

MARK_START = "<!-- bench/gpu_compile.py: start -->"
MARK_END = "<!-- bench/gpu_compile.py: end -->"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def analysis(seq: int, dtype: torch.dtype, training: bool, device: str):
    torch.manual_seed(0)
    model = Block(block_size=seq).to(dtype)
    if not training:
        model.eval()
    x = torch.randn(1, seq, 768, dtype=dtype, requires_grad=training)
    return memopt.analyze(model, x, training=training, backend="triton", device=device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=1024, help="sequence length (default 1024)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--devices", default="h100,mi300x", help="GPUs to compile for")
    parser.add_argument("--write", help="replace this benchmark's section of a Markdown file")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="(?!memopt)")
    blocks = []
    for device in args.devices.split(","):
        for training in (False, True):
            mode = "training" if training else "inference"
            start = time.perf_counter()
            analyzed = analysis(args.seq, DTYPES[args.dtype], training, device)
            rows = memopt.compile_for_gpu(analyzed, device)
            seconds = time.perf_counter() - start
            text = format_compiled(rows)
            print(
                f"{mode}, {device}: {seconds:.0f} s (analysis and compiles; cached compiles "
                "are read back)",
                file=sys.stderr,
            )
            print(f"## {mode}\n{text}")
            blocks.append((device, mode, text))
    if args.write:
        command = "python bench/gpu_compile.py " + " ".join(sys.argv[1:] if argv is None else argv)
        lines = [
            "### This run",
            "",
            f"Command: `{command.strip()}`. GPT-2 block (nanoGPT's, 768 wide, 12 heads), batch "
            f'1, sequence {args.seq}, {args.dtype}, analyzed with backend="triton". Triton '
            f"{_triton_version()}, compiled on this CPU-only machine.",
            "",
        ]
        for device, mode, text in blocks:
            lines += [f"{mode}, {device}:", "", "```", text.rstrip(), "```", ""]
        write_results(Path(args.write), "\n".join(lines), MARK_START, MARK_END)
    return 0


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    raise SystemExit(main())
