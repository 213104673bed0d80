"""memopt.report: one analysis written out as files a person reads and a commit diffs.

    out/index.html, out/analysis.json, out/diffs/NN-<pass>.diff, out/kernels/<kernel>.ir
    and .py: the layout is in reports/files.py.

File names depend only on the program and the pipeline (step number, pass name, kernel
name), never on a time or a path, so two reports of one target at two commits diff cleanly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from memopt.backends.triton.offline import arch_for
from memopt.compiler.devices import DEVICES, get_device
from memopt.config import Config
from memopt.driver.analyze import analyze
from memopt.driver.gpu import compile_for_gpu
from memopt.driver.profile import Profile, profile
from memopt.driver.results import Analysis
from memopt.reports.diff import pass_diff, pipeline_steps
from memopt.reports.files import (
    ANALYSIS_JSON,
    DIFFS,
    INDEX,
    KERNELS,
    KernelSource,
    diff_file_name,
    kernel_sources,
)
from memopt.reports.html import render_page
from memopt.reports.summary import analysis_json


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
    measure: bool = False,
    rounds: int = 10,
    inductor: bool = True,
    progress: Callable[[str], None] | None = None,
    compile_for: str | None = None,
    **options: object,
) -> Report:
    """Analyze `fn(*example_inputs)` and write the report files to the directory `out`.

    Takes what `memopt.analyze` takes. The page classifies kernels as memory- or
    compute-bound on `options["device"]` (default h100) and predicts time on every device.
    `measure=True` also runs the program on this machine (`memopt.profile`, `rounds` timed
    rounds, against TorchInductor unless `inductor=False`) and adds the measured section.
    `compile_for="h100"` compiles the Triton kernels for that GPU with Triton's own compiler
    (`memopt.compile_for_gpu`) and adds the compiled section; analyze with
    `backend="triton"` for the kernels a GPU run would have.
    """
    device = Config.from_options(options).device
    if compile_for is not None:
        arch_for(compile_for)  # an unknown device fails before the analysis
    if not measure:
        analysis = analyze(
            fn,
            *example_inputs,
            training=training,
            dynamic=dynamic,
            compile_for=compile_for,
            **options,
        )
        return write_report(analysis, out, device=device)
    measured = profile(
        fn,
        *example_inputs,
        training=training,
        dynamic=dynamic,
        rounds=rounds,
        compare=inductor,
        progress=progress,
        **options,
    )
    assert measured.analysis is not None
    if compile_for:
        measured.analysis.compiled = compile_for_gpu(measured.analysis, compile_for)
    return write_report(measured.analysis, out, device=device, measured=measured)


def write_report(
    analysis: Analysis,
    out: str | Path,
    device: str = "h100",
    measured: Profile | None = None,
) -> Report:
    """Write the report files for an existing analysis into `out` (created if missing), with
    the measured section and `analysis.json`'s "measured" key where `measured` is given, and
    the compiled section and "compiled" key where `analysis.compiled` is.

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
    if measured is not None:
        data["measured"] = measured.to_dict()
    json_path = out / ANALYSIS_JSON
    json_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    index = out / INDEX
    index.write_text(
        render_page(analysis, device, sources, measured, analysis.compiled), encoding="utf-8"
    )
    return Report(
        analysis=analysis,
        out=out,
        index=index,
        json=json_path,
        diffs=tuple(diff_paths),
        kernel_files=tuple(kernel_paths),
    )


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
