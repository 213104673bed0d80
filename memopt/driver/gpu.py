"""An analysis's Triton kernels as a GPU would get them, compiled offline for a device.

Each generated kernel (and attention kernel) of the optimized graphs is launched on meta
tensors of its buffers' shapes and strides inside `recording_launches()`: the launch code
chooses the block sizes and warps of a GPU launch, which are recorded instead of run, then
compiled by Triton's real compiler for the device's target (backends/triton/offline.py).
Analyze with `backend="triton"` to get the kernels a GPU run would have (with the default
backend and CPU inputs the fusion decisions are the C++ backend's).

Figures are *compiled* (from the machine code), next to the kernel's *modelled* bytes.
`GpuKernel.bandwidth_share` is *modelled* from them: the part of the device's bandwidth a
launch can draw by Little's law (compiler/devices.py), which `Analysis.predict` uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from memopt.backends.runtime.kernels import FusedKernel
from memopt.backends.triton.attention_call import AttentionKernel
from memopt.backends.triton.launching import Launch, recording_launches
from memopt.backends.triton.offline import (
    CompiledKernel,
    arch_for,
    compile_launches,
    lane_bytes,
    traffic_ratio,
)
from memopt.backends.triton.ops import Unsupported
from memopt.backends.triton.runtime import TritonKernel
from memopt.backends.triton.sectors import sector_bytes
from memopt.compiler.cost import is_kernel
from memopt.compiler.devices import get_device
from memopt.compiler.kernel_ir import Buffer, Kernel, evaluate_size
from memopt.driver.results import Analysis, GraphResult


@dataclass(frozen=True)
class GpuKernel:
    """One launch of one kernel of an analysis, compiled for a GPU target."""

    kernel: str  # the KernelRecord's name, e.g. "forward.k3"
    kind: str
    launch: Launch
    compiled: CompiledKernel
    modelled_bytes: int | None  # the kernel's; None when it makes several launches
    sector_bytes: int | None = None  # modelled in 32-byte sectors (generated kernels only)
    # A kernel of several launches (attention's backward: dK/dV, then dQ): the static bytes
    # of all of them over the kernel's modelled bytes, on each of its rows.
    kernel_ratio: float | None = None

    @property
    def traffic_ratio(self) -> float | None:
        """Static over modelled bytes: the launch's, or its kernel's launches' together."""
        if self.modelled_bytes is None:
            return self.kernel_ratio
        return traffic_ratio(self.compiled, self.modelled_bytes)

    @property
    def bandwidth_share(self) -> float:
        """The part of the device's memory bandwidth this launch can draw: its load bytes in
        flight over the bandwidth x latency product (at most 1; *modelled*).

        In flight: the resident programs (occupancy's blocks per multiprocessor, at most the
        grid) times what one program has outstanding, which is taken to be every load of a
        loop-free program (the compiler issues them before their uses) or one loop body's
        loads, `num_stages - 1` bodies ahead when the loop is software-pipelined."""
        c = self.compiled
        if c.error:
            return 1.0
        outstanding = in_flight_per_program(c, self.launch.num_stages)
        if outstanding is None or outstanding == 0:
            return 1.0  # not known, or nothing loaded (stores do not wait)
        device, arch = get_device(c.device), arch_for(c.device)
        per_multiprocessor = c.occupancy * arch.max_warps / c.num_warps
        resident = min(c.grid, per_multiprocessor * device.multiprocessors)
        if resident <= 0:
            return 1.0  # no program fits (occupancy 0, shown as such): no share to model
        return min(1.0, resident * outstanding / device.bytes_in_flight)

    def to_dict(self) -> dict[str, object]:
        return {
            "kernel": self.kernel,
            "kind": self.kind,
            "constexprs": dict(self.launch.constexprs),
            **self.compiled.to_dict(),
            "label": "compiled",
            "modelled_bytes": self.modelled_bytes,
            "sector_bytes": self.sector_bytes,
            "static_over_modelled": self.traffic_ratio,
            "bandwidth_share": None if self.compiled.error else round(self.bandwidth_share, 4),
        }


# Triton's software-pipelining depth where a launch names none: the `num_stages` defaults
# of its NVIDIA and AMD backends (Triton 3.9).
DEFAULT_STAGES = {"cuda": 3, "hip": 2}


def in_flight_per_program(compiled: CompiledKernel, num_stages: int | None) -> int | None:
    """Load bytes one program has outstanding at once (see `GpuKernel.bandwidth_share`);
    None when its loops are not counted."""
    if not compiled.has_loop:
        return lane_bytes(compiled.loads, {}) * compiled.threads
    if compiled.traffic is None:
        return None
    stages = num_stages or DEFAULT_STAGES[arch_for(compiled.device).backend]
    ahead = max(1, stages - 1) if compiled.pipelined else 1
    body = max(lane_bytes(loop["load"], {}) for loop in compiled.traffic["loops"])
    outside = lane_bytes(compiled.traffic["outside"]["load"], {})
    return max(outside, body * ahead) * compiled.threads


def _meta(buffer: Buffer, sizes: Mapping[str, int]) -> torch.Tensor:
    shape = [evaluate_size(s, sizes) for s in buffer.shape]
    stride = [evaluate_size(s, sizes) for s in buffer.stride]
    return torch.empty_strided(shape, stride, dtype=buffer.dtype, device="meta")


def kernel_launches(kernel: Kernel, sizes: Mapping[str, int]) -> tuple[TritonKernel, list[Launch]]:
    """A Kernel IR kernel rendered to Triton, and its GPU launches at `sizes` (recorded on
    meta tensors of its buffers). Raises Unsupported for a kernel Triton cannot express."""
    compiled = TritonKernel(kernel)
    inputs = [_meta(b, sizes) for b in kernel.inputs]
    outputs = [_meta(b, sizes) for b in kernel.outputs]
    with recording_launches() as launches:
        compiled(inputs, outputs, sizes)
    return compiled, launches


def _meta_like(value: object) -> object:
    if isinstance(value, torch.Tensor):
        shape = [int(s) for s in value.shape]
        stride = [int(s) for s in value.stride()]
        return torch.empty_strided(shape, stride, dtype=value.dtype, device="meta")
    return value


def _launches(
    target: object, node: torch.fx.Node, sizes: dict[str, int]
) -> tuple[list[Launch], int | None] | None:
    """The GPU launches of one kernel node and its sector bytes (None: not a Triton kernel)."""
    if isinstance(target, FusedKernel):
        try:
            compiled, launches = kernel_launches(target.kernel, sizes)
        except Unsupported:
            return None
        if compiled.rendered.template is not None:
            return launches, None
        return launches, sector_bytes(target.kernel, compiled.rendered, sizes)
    if isinstance(target, AttentionKernel):
        args = [
            _meta_like(a.meta.get("val")) if isinstance(a, torch.fx.Node) else a for a in node.args
        ]
        with recording_launches() as launches:
            target(*args)
        return launches, None
    return None


def graph_launches(
    graph: GraphResult,
) -> list[tuple[str, str, int, list[Launch], int | None]]:
    """(kernel name, kind, modelled bytes, launches, sector bytes) for each Triton kernel of
    one graph."""
    sizes = {str(name): int(value) for name, value in graph.symbols.items()}
    records = {record.name: record for record in graph.kernels}
    found = []
    index = 0
    for node in graph.gm.graph.nodes:
        if not is_kernel(node):
            continue
        name = f"{graph.name}.k{index}"
        index += 1
        made = _launches(node.target, node, sizes)
        if made is not None and made[0]:
            launches, sectors = made
            record = records[name]
            found.append((name, record.kind, record.nbytes, launches, sectors))
    return found


def compile_for_gpu(
    analysis: Analysis, device: str | None = None, timeout_s: float = 600.0
) -> list[GpuKernel]:
    """Every Triton launch of `analysis` compiled for `device` (default: the analysis's)."""
    device = device or analysis.device
    entries = [entry for graph in analysis.graphs for entry in graph_launches(graph)]
    launches = [planned for entry in entries for planned in entry[3]]
    compiled = iter(compile_launches(launches, device, timeout_s=timeout_s))
    rows = []
    for name, kind, nbytes, planned_list, sectors in entries:
        results = [next(compiled) for _ in planned_list]
        if len(planned_list) == 1:
            rows.append(GpuKernel(name, kind, planned_list[0], results[0], nbytes, sectors))
            continue
        static = [c.static_bytes for c in results]
        together = None if None in static or not nbytes else sum(static) / nbytes
        rows += [
            GpuKernel(name, kind, planned, c, None, None, together)
            for planned, c in zip(planned_list, results)
        ]
    return rows


__all__ = ["GpuKernel", "compile_for_gpu", "graph_launches", "kernel_launches"]
