"""The report directory's layout, and the generated source each kernel gets a file for.

out/index.html            one self-contained page (inline CSS and JS, no network)
out/analysis.json         the analysis (schema: docs/analysis-schema.json)
out/diffs/NN-<pass>.diff  unified diff of the printed graphs, one file per pipeline step
out/kernels/<kernel>.ir   each generated kernel's Kernel IR
out/kernels/<kernel>.py   its Triton source, where the Triton renderer can express it
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from memopt.backends.registry import get_backend
from memopt.backends.runtime.kernels import FusedKernel
from memopt.compiler.cost import is_kernel
from memopt.driver.results import Analysis

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


def diff_file_name(step: int, pass_name: str) -> str:
    """`01-cleanup.diff`: the step's 1-based position in the pipeline, then the pass."""
    return f"{step:02d}-{_file_name(pass_name)}.diff"


def kernel_sources(analysis: Analysis) -> list[KernelSource]:
    """The Kernel IR (and Triton source, where it renders) of every fused kernel.

    Read off the optimized graph modules the analysis keeps (`GraphResult.gm`); the
    record name matches the KernelRecord `kernel_records` gives the same node.
    """
    sources = []
    for graph in analysis.graphs:
        if graph.gm is None:
            continue
        kernels = [n for n in graph.gm.graph.nodes if is_kernel(n)]  # type: ignore[attr-defined]
        for index, node in enumerate(kernels):
            target = node.target
            if getattr(target, "memopt_kind", None) == "attention":
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
        render = get_backend("triton").source_file
    except KeyError as error:
        return None, f"the Triton renderer is unavailable ({error})"
    if render is None:
        return None, "the Triton renderer is unavailable (the backend writes no source)"
    try:
        source = render(kernel).read_text(encoding="utf-8")
    except ImportError as error:
        return None, f"the Triton renderer is unavailable ({type(error).__name__}: {error})"
    except Exception as error:  # noqa: BLE001 - reported on the page, next to the IR
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return None, f"{type(error).__name__}: {first}".rstrip(": ")
    return source.rstrip("\n") + "\n", None


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
