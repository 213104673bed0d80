"""memopt.report: one analysis written out as files a person reads and a commit diffs.

    out/index.html          one self-contained page (inline CSS and JS, no network)
    out/analysis.json       the analysis (schema: docs/analysis-schema.json)
    out/diffs/NN-<pass>.diff  unified diff of the printed graphs, one file per pipeline step
    out/kernels/<kernel>.ir   each generated kernel's Kernel IR
    out/kernels/<kernel>.py   its Triton source, where the Triton renderer can express it

File names depend only on the program and the pipeline (step number, pass name, kernel
name), never on a time or a path, so two reports of one target at two commits diff cleanly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from memopt.compiler.devices import DEVICES, get_device
from memopt.driver.results import Analysis
from memopt.reports.diff import pass_diff, pipeline_steps
from memopt.reports.summary import analysis_json

INDEX = "index.html"
ANALYSIS_JSON = "analysis.json"
DIFFS = "diffs"
KERNELS = "kernels"


@dataclass(frozen=True)
class KernelSource:
    """The generated source of one fused kernel of the optimized program."""

    record: str  # the KernelRecord's name: "inference.k3"
    name: str  # the kernel's own name: "inference_fused_0" (its file name)
    kind: str
    nodes: tuple[str, ...]
    ir: str  # Kernel IR, printed
    triton: str | None  # Triton source; None where the renderer is missing or refuses
    triton_error: str | None = None  # why there is no Triton source

    @property
    def file_stem(self) -> str:
        return _file_name(self.name)


@dataclass(frozen=True)
class Report:
    """What `memopt.report` wrote, and the analysis it wrote it from."""

    analysis: Analysis
    out: Path
    index: Path
    json: Path
    diffs: tuple[Path, ...]
    kernel_files: tuple[Path, ...]


def report(
    fn: Callable,
    *example_inputs: object,
    out: str | Path = "memopt-report",
    training: bool = False,
    dynamic: bool = False,
    **options: object,
) -> Report:
    """Analyze `fn(*example_inputs)` and write the report files to the directory `out`.

    Takes what `memopt.analyze` takes. The page classifies kernels as memory- or
    compute-bound on `options["device"]` (default h100) and predicts time on every device.
    """
    from memopt.config import Config
    from memopt.driver.analyze import analyze

    device = Config.from_options(options).device
    analysis = analyze(fn, *example_inputs, training=training, dynamic=dynamic, **options)
    return write_report(analysis, out, device=device)


def write_report(analysis: Analysis, out: str | Path, device: str = "h100") -> Report:
    """Write the report files for an existing analysis into `out` (created if missing).

    Files this function owns that a previous report left in `out` (`diffs/*.diff`,
    `kernels/*.ir`, `kernels/*.py`) are removed first, so the directory holds one report.
    """
    get_device(device)  # an unknown name fails before anything is written
    out = Path(out)
    diffs_dir, kernels_dir = out / DIFFS, out / KERNELS
    for directory in (out, diffs_dir, kernels_dir):
        directory.mkdir(parents=True, exist_ok=True)
    for stale in (*diffs_dir.glob("*.diff"), *kernels_dir.glob("*.ir"), *kernels_dir.glob("*.py")):
        stale.unlink()

    diff_paths = []
    for step, entries in enumerate(pipeline_steps(analysis), start=1):
        path = diffs_dir / diff_file_name(step, entries[0].pass_name)
        path.write_text(pass_diff(entries, step), encoding="utf-8")
        diff_paths.append(path)

    sources = kernel_sources(analysis)
    kernel_paths = []
    for source in sources:
        path = kernels_dir / f"{source.file_stem}.ir"
        path.write_text(source.ir, encoding="utf-8")
        kernel_paths.append(path)
        if source.triton is not None:
            path = kernels_dir / f"{source.file_stem}.py"
            path.write_text(source.triton, encoding="utf-8")
            kernel_paths.append(path)

    data = report_json(analysis, device, sources)
    json_path = out / ANALYSIS_JSON
    json_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    # Imported here: the page imports this module's file layout (DIFFS, KERNELS, names).
    from memopt.reports.html import render_page

    index = out / INDEX
    index.write_text(render_page(analysis, device, sources), encoding="utf-8")
    return Report(
        analysis=analysis,
        out=out,
        index=index,
        json=json_path,
        diffs=tuple(diff_paths),
        kernel_files=tuple(kernel_paths),
    )


def diff_file_name(step: int, pass_name: str) -> str:
    """`01-cleanup.diff`: the step's 1-based position in the pipeline, then the pass."""
    return f"{step:02d}-{_file_name(pass_name)}.diff"


def report_json(
    analysis: Analysis, device: str, sources: Sequence[KernelSource]
) -> dict[str, object]:
    """`analysis.json`: `memopt report --json`'s content for every device, plus the files.

    Decision node lists are sorted: they name a set of nodes, and a fixed order keeps two
    reports of one program byte-identical where nothing changed.
    """
    data = analysis_json(analysis, list(DEVICES))
    for decision in _decision_dicts(data):
        decision["nodes"] = sorted(decision["nodes"])  # type: ignore[arg-type]
    data["report"] = {
        "device": get_device(device).name,
        "diffs": [
            {
                "step": step,
                "pass": entries[0].pass_name,
                "path": f"{DIFFS}/{diff_file_name(step, entries[0].pass_name)}",
            }
            for step, entries in enumerate(pipeline_steps(analysis), start=1)
        ],
        "kernel_sources": [
            {
                "kernel": s.record,
                "name": s.name,
                "ir": f"{KERNELS}/{s.file_stem}.ir",
                "triton": f"{KERNELS}/{s.file_stem}.py" if s.triton is not None else None,
                "triton_error": s.triton_error,
            }
            for s in sources
        ],
    }
    return data


def _decision_dicts(data: dict[str, object]) -> list[dict[str, object]]:
    found = []
    for graph in data["graphs"]:  # type: ignore[attr-defined]
        for entry in graph["ledger"]:
            found.extend(entry["decisions"])
    for summary in data["ledger"]:  # type: ignore[attr-defined]
        found.extend(summary["decisions"])
    return found


def kernel_sources(analysis: Analysis) -> list[KernelSource]:
    """The Kernel IR (and Triton source, where it renders) of every fused kernel.

    Read off the optimized graph modules the analysis keeps (`GraphResult.gm`); the
    record name matches the KernelRecord `kernel_records` gives the same node.
    """
    from memopt.backends.runtime.kernels import FusedKernel
    from memopt.backends.triton.attention_call import AttentionKernel
    from memopt.compiler.cost import is_kernel

    sources = []
    for graph in analysis.graphs:
        if graph.gm is None:
            continue
        kernels = [n for n in graph.gm.graph.nodes if is_kernel(n)]  # type: ignore[attr-defined]
        for index, node in enumerate(kernels):
            target = node.target
            if isinstance(target, AttentionKernel):
                sources.append(_attention_source(target, f"{graph.name}.k{index}"))
            if not isinstance(target, FusedKernel):
                continue
            triton, error = _triton_source(target.kernel)
            sources.append(
                KernelSource(
                    record=f"{graph.name}.k{index}",
                    name=target.kernel.name,
                    kind=target.kernel.kind,
                    nodes=tuple(target.memopt_nodes),
                    ir=str(target.kernel).rstrip("\n") + "\n",
                    triton=triton,
                    triton_error=error,
                )
            )
    return sources


def _attention_source(target: object, record: str) -> KernelSource:
    """A hand-written Triton template (attention): its source, and no Kernel IR."""
    triton, error = None, None
    try:
        triton = Path(target.triton_source_path()).read_text(encoding="utf-8")
    except Exception as error_:  # noqa: BLE001 - reported on the page
        error = f"{type(error_).__name__}: {error_}"
    return KernelSource(
        record=record,
        name=target.__name__,
        kind=target.memopt_kind,
        nodes=tuple(target.memopt_nodes),
        ir=f"{target!r}\n(a hand-written Triton kernel: no Kernel IR)\n",
        triton=triton,
        triton_error=error,
    )


def _triton_source(kernel: object) -> tuple[str | None, str | None]:
    # The Triton backend is optional here: a report must not fail because it is absent,
    # or because one kernel uses an op it cannot render.
    try:
        from memopt.backends.triton.render import render
    except Exception as error:  # noqa: BLE001 - any import failure means "no renderer"
        return None, f"the Triton renderer is unavailable ({type(error).__name__}: {error})"
    try:
        source = render(kernel).source
    except Exception as error:  # noqa: BLE001 - reported on the page, next to the IR
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return None, f"{type(error).__name__}: {first}".rstrip(": ")
    return source.rstrip("\n") + "\n", None


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
