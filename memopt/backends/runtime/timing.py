"""Timing every kernel of a compiled program, as it runs (measured).

While a KernelTimer is active, each CompiledGraph runs its graph node by node and times
every kernel node (the nodes `cost.is_kernel` counts: generated kernels, library calls and
ATen ops; views and size arithmetic are free) with a wall clock, synchronizing a CUDA device
around each so that a kernel's time is its own. A kernel is named by its graph and its
position among the graph's kernels: the walk `analyze.kernel_records` numbers them in,
so a timing and a KernelRecord (`<graph>.k<i>`) meet by name.

A kernel's clock brackets its call alone: the interpreter's lookups of its arguments (a
few microseconds a node) fall outside it. Program totals are timed without the timer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.fx

from memopt.compiler.cost import is_kernel

_ACTIVE: list[KernelTimer] = []


class KernelTimer:
    """Seconds per call of every kernel run while the timer is active, by kernel name."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}

    @contextmanager
    def active(self) -> Iterator[KernelTimer]:
        _ACTIVE.append(self)
        try:
            yield self
        finally:
            _ACTIVE.remove(self)

    def run(self, gm: torch.fx.GraphModule, graph_name: str, args: list[object]) -> list[object]:
        """Run `gm` on `args` node by node, timing each kernel node."""
        return _TimedInterpreter(gm, graph_name, self).run(*args)


def active_timer() -> KernelTimer | None:
    return _ACTIVE[-1] if _ACTIVE else None


class _TimedInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, graph_name: str, timer: KernelTimer) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.timer = timer
        self.names = {}
        for node in gm.graph.nodes:
            if is_kernel(node):
                self.names[node] = f"{graph_name}.k{len(self.names)}"

    def run_node(self, node: torch.fx.Node) -> object:
        name = self.names.get(node)
        if name is None:
            return super().run_node(node)
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        with self._set_current_node(node):
            # The interpreter's own work (looking up the arguments) is outside the clock:
            # it costs several microseconds a node, which a small kernel does not.
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            run = getattr(self, node.op)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = run(node.target, args, kwargs)
            if cuda:
                torch.cuda.synchronize()
            self.timer.seconds.setdefault(name, []).append(time.perf_counter() - start)
        return result
