"""The torch.compile backend: `torch.compile(model, backend="memopt", options={...})`.

Registered through the `torch_dynamo_backends` entry point, so it works without
`import memopt`. Each ATen graph AOTAutograd produces runs through the pass pipeline and
comes back as a CompiledGraph. If the pipeline fails on a graph (a bug in memopt), that
graph runs unoptimized, with a warning naming it: never a wrong answer.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.fx

from memopt.backends.runtime.executor import CompiledGraph, output_layouts
from memopt.compiler import collector
from memopt.compiler.bound import lower_bound
from memopt.compiler.capture import aot_backend, release_values
from memopt.compiler.cost import graph_cost
from memopt.compiler.graph import attribute, copy_graph, evaluate, shape_bindings
from memopt.config import Config
from memopt.passes import Fuel
from memopt.passes.pipeline import capture_hooks, run_pipeline


class _GraphCopy:
    """A graph as it came, before the passes rewrite it in place: its nodes copied (about
    7 us a node; their metadata shared) and the attributes its nodes fetch, made a module
    only where optimizing fails (module())."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.graph = torch.fx.Graph()
        self.graph._codegen = copy.deepcopy(gm.graph._codegen)
        self.graph.output(self.graph.graph_copy(gm.graph, {}))
        self.attributes = {
            node.target: attribute(gm, node.target)
            for node in gm.graph.nodes
            if node.op in ("get_attr", "call_module")
        }

    def module(self) -> torch.fx.GraphModule:
        return torch.fx.GraphModule(self.attributes, self.graph)


class CompileSession:
    """State shared by the graphs of one torch.compile call: config, pipeline, fuel, graph
    names. Its capture-time stages (`hooks`) and its graphs' pipelines take decisions from
    one fuel, in compile order."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pipeline = config.pipeline()
        self.fuel = Fuel(config.fuel)
        self.hooks = capture_hooks(self.pipeline, self.fuel)
        self.counts: dict[str, int] = {}

    def compile_graph(
        self, gm: torch.fx.GraphModule, example_inputs: Sequence[object], kind: str
    ) -> Callable:
        # A backward graph is compiled on the first backward call, outside memopt_backend.
        with collector.paused():
            return self._compile_graph(gm, example_inputs, kind)

    def _compile_graph(
        self, gm: torch.fx.GraphModule, example_inputs: Sequence[object], kind: str
    ) -> Callable:
        index = self.counts.get(kind, 0)
        self.counts[kind] = index + 1
        name = kind if index == 0 else f"{kind}.{index}"
        eager_layouts = output_layouts(gm)
        reference = copy_graph(gm) if self.config.check else None
        bindings = shape_bindings(example_inputs)
        # The bound is the program's, whatever the passes make of it: taken before them.
        bound = lower_bound(gm) if self.config.report_dir else None
        # The passes rewrite `gm` in place: what a failure runs is this copy of it.
        unoptimized = _GraphCopy(gm) if reference is None else None
        try:
            # The ledger is read only by a report (report_dir).
            record = bool(self.config.report_dir)
            result = run_pipeline(gm, self.pipeline, name, bindings, fuel=self.fuel, record=record)
        except Exception as error:  # noqa: BLE001 - any pipeline bug falls back, visibly
            release_values(gm)
            warnings.warn(
                f"memopt: optimizing the {name} graph failed ({type(error).__name__}: {error}); "
                "running it unoptimized (ATen)",
                stacklevel=2,
            )
            if self.config.verbose:
                traceback.print_exc()
            fallback = reference if reference is not None else unoptimized.module()
            return CompiledGraph(fallback, name, eager_layouts)
        if self.config.verbose:
            cost = graph_cost(result.gm, bindings)
            print(
                f"memopt: {name} graph: {cost.kernels} kernels, {cost.nbytes} bytes (modelled)",
                file=sys.stderr,
            )
        if self.config.report_dir:
            self._write_report(name, result, bindings, bound)
        release_values(gm)
        if reference is not None and result.reference is not None:
            reference = result.reference  # a pass changed values by design (precision)
        compiled = CompiledGraph(
            result.gm,
            name,
            eager_layouts,
            reference=reference,
            cpu_gemm=self.config.cpu_gemm,
            cpu_gemv=self.config.cpu_gemv,
            cpu_attention=self.config.cpu_attention,
        )
        if self.config.verbose and compiled.libraries:
            print(f"memopt: {name} graph: {compiled.libraries}", file=sys.stderr)
        compiled.verbose = self.config.verbose
        return compiled

    def _write_report(self, name: str, result, bindings, bound) -> None:
        os.makedirs(self.config.report_dir, exist_ok=True)
        cost = graph_cost(result.gm, bindings)
        record = {
            "graph": _file_name(self.config.report_dir, name),
            "bytes_moved": {
                "value": cost.nbytes,
                "expr": str(cost.bytes_expr),
                "label": "modelled",
            },
            "lower_bound_bytes": {
                "value": evaluate(bound, bindings),
                "label": "modelled",
            },
            "kernels": cost.kernels,
            "ledger": [entry.to_dict() for entry in result.ledger],
            "graph_text": result.text_after,
        }
        path = os.path.join(self.config.report_dir, f"{record['graph']}.json")
        with open(path, "w") as handle:
            json.dump(record, handle, indent=2, sort_keys=True)


# Report files written by this process, per report directory. Each torch.compile'd frame
# (and each recompile of it) compiles its graphs in a session of its own, so two sessions
# name their first graphs alike ("inference"): the later file takes the next free suffix.
_WRITTEN: dict[str, set[str]] = {}


def _file_name(report_dir: str, name: str) -> str:
    written = _WRITTEN.setdefault(os.path.abspath(report_dir), set())
    unique, index = name, 0
    while unique in written:
        index += 1
        unique = f"{name}.{index}"
    written.add(unique)
    return unique


def memopt_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[object],
    options: Mapping[str, object] | None = None,
) -> Callable:
    """The Dynamo backend. `options` are memopt's options (see memopt.config.Config)."""
    config = Config.from_options(options)
    session = CompileSession(config)
    with collector.paused():
        return aot_backend(session.compile_graph, session.hooks)(gm, example_inputs)
