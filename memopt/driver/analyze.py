"""memopt.analyze: the backend's pipeline on a program and example inputs, without torch.compile.

Counts what eager PyTorch moves (by running it under a byte-counting dispatch mode),
captures the ATen graphs the backend would see, runs the pipeline on each, and models what
the optimized program moves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import sympy
import torch
import torch.fx

from memopt.backends.triton.offline import arch_for
from memopt.compiler import collector
from memopt.compiler.bound import lower_bound
from memopt.compiler.capture import CapturedGraph, capture
from memopt.compiler.cost import (
    graph_cost,
    is_kernel,
    is_low_precision,
    kernel_inputs,
    kernel_kind,
    node_cost,
    read_bytes,
)
from memopt.compiler.eager_count import count_eager_bytes
from memopt.compiler.graph import copy_graph, evaluate
from memopt.compiler.order import buffer_of, written_buffers
from memopt.compiler.printer import op_name
from memopt.config import Config
from memopt.driver.gpu import compile_for_gpu
from memopt.driver.results import Analysis, GraphResult, KernelRecord, NodeCost
from memopt.passes import Fuel, Pipeline
from memopt.passes.pipeline import capture_hooks, capture_key, run_pipeline


def kernel_records(
    gm: torch.fx.GraphModule, graph: str, bindings: Mapping[sympy.Symbol, int]
) -> list[KernelRecord]:
    records = []
    for node in gm.graph.nodes:
        if not is_kernel(node):
            continue
        cost = node_cost(node)
        nodes = getattr(node.target, "memopt_nodes", None) or (node.name,)
        ops = getattr(node.target, "memopt_ops", None) or (op_name(node),)
        records.append(
            KernelRecord(
                name=f"{graph}.k{len(records)}",
                kind=kernel_kind(node),
                graph=graph,
                nodes=tuple(nodes),
                ops=tuple(ops),
                read_bytes=evaluate(cost.read, bindings),
                write_bytes=evaluate(cost.write, bindings),
                flops=evaluate(cost.flops, bindings),
                read_expr=sympy.simplify(cost.read),
                write_expr=sympy.simplify(cost.write),
                flops_expr=sympy.simplify(cost.flops),
                low_precision=is_low_precision(node),
                source_path=_source_path(node.target),
            )
        )
    return records


def _source_path(target: object) -> str | None:
    render = getattr(target, "triton_source_path", None)
    return render() if callable(render) else None


def node_costs(
    gm: torch.fx.GraphModule,
    graph: str,
    bindings: Mapping[sympy.Symbol, int],
    carried: set[str] = frozenset(),
) -> list[NodeCost]:
    """Each kernel node's modelled traffic, its reads split by source: read-only inputs,
    and state (inputs the graph updates, or those named in `carried`: carried_inputs)."""
    placeholders = {n for n in gm.graph.nodes if n.op == "placeholder"}
    updated = {b for n in gm.graph.nodes for b in written_buffers(n)} & placeholders
    updated |= {p for p in placeholders if p.name in carried}
    costs = []
    for node in gm.graph.nodes:
        if is_kernel(node):
            cost = node_cost(node)
            read = evaluate(cost.read, bindings)
            # What the node writes is not among its reads (an in-place update's buffer, a
            # kernel's destinations); each role is capped so that the roles never add up to
            # more than the node's reads (a gathered table counts whole in read_bytes, only
            # its looked-up rows in a kernel's own cost).
            writes = set(written_buffers(node))
            inputs = [a for a in kernel_inputs(node) if buffer_of(a) not in writes]
            state = [a for a in inputs if buffer_of(a) in updated]
            read_only = [a for a in inputs if buffer_of(a) in placeholders - updated]
            state_read = min(read, evaluate(read_bytes(node, state), bindings))
            input_read = min(read - state_read, evaluate(read_bytes(node, read_only), bindings))
            costs.append(
                NodeCost(
                    graph=graph,
                    node=node.name,
                    op=op_name(node),
                    read_bytes=read,
                    write_bytes=evaluate(cost.write, bindings),
                    flops=evaluate(cost.flops, bindings),
                    input_read_bytes=input_read,
                    state_read_bytes=state_read,
                )
            )
    return costs


def carried_inputs(gm: torch.fx.GraphModule) -> set[str]:
    """The names of the inputs a graph carries into an output it returns by concatenation:
    a dynamic KV cache, `cat([cache, new])` returned as the next cache. State, like the
    inputs a graph updates in place (a reading of the graph's shape, for the report's split
    of reads: any returned concatenation that begins with an input counts; the caller
    asks only of inference graphs). Read off the graph before the passes, where the
    concatenation is a node of its own (after them a kernel or memopt's appended attention
    may write it)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    returned = set(output.all_input_nodes)
    carried = set()
    for node in returned:
        if node.op == "call_function" and node.target is torch.ops.aten.cat.default:
            first = node.args[0][0]
            if isinstance(first, torch.fx.Node) and buffer_of(first).op == "placeholder":
                carried.add(buffer_of(first).name)
    return carried


@dataclass
class Captured:
    """A program's ATen graphs as one configuration's capture-time stages left them."""

    graphs: list[CapturedGraph]
    training: bool
    fuel_used: int  # rewrite decisions the capture-time stages took
    key: tuple  # what the capture depends on (passes.pipeline.capture_key)


def capture_program(
    fn: Callable,
    example_inputs: Sequence[object],
    config: Config,
    training: bool = False,
    dynamic: bool = False,
) -> Captured:
    """Capture `fn` with the capture-time stages of `config`'s pipeline."""
    pipeline = config.pipeline()
    fuel = Fuel(config.fuel)
    with collector.paused():
        graphs = capture(
            fn,
            example_inputs,
            training=training,
            dynamic=dynamic,
            hooks=capture_hooks(pipeline, fuel),
        )
    return Captured(graphs, training, fuel.used, capture_key(pipeline, training, config.fuel))


class Captures:
    """Captures of one program, made on demand, one per capture key: configurations whose
    capture-time stages would make the same capture share it (ablations, bisecting,
    diffs of two option sets)."""

    def __init__(
        self,
        fn: Callable,
        example_inputs: Sequence[object],
        training: bool = False,
        dynamic: bool = False,
    ) -> None:
        self.fn, self.example_inputs = fn, example_inputs
        self.training, self.dynamic = training, dynamic
        self._made: dict[tuple, Captured] = {}

    def for_config(self, config: Config) -> Captured:
        key = capture_key(config.pipeline(), self.training, config.fuel)
        if key not in self._made:
            self._made[key] = capture_program(
                self.fn, self.example_inputs, config, self.training, self.dynamic
            )
        return self._made[key]


def optimize_graph(captured: CapturedGraph, pipeline: Pipeline, fuel: Fuel) -> GraphResult:
    """Run the pipeline on a copy of one captured graph and model the result."""
    gm = copy_graph(captured.gm)
    bindings = captured.bindings
    with collector.paused():
        result = run_pipeline(
            gm, pipeline, captured.name, bindings, fuel=fuel, check_inputs=captured.real_inputs
        )
    cost = graph_cost(result.gm, bindings)
    bound = lower_bound(captured.gm)  # the program's bound, whatever the passes make of it
    return GraphResult(
        name=captured.name,
        text=result.text_after,
        kernels=kernel_records(result.gm, captured.name, bindings),
        ledger=result.ledger,
        node_costs=node_costs(
            result.gm,
            captured.name,
            bindings,
            # a training forward returns what its backward saves: not a next state
            carried_inputs(captured.gm) if captured.name.startswith("inference") else set(),
        ),
        bytes_expr=cost.bytes_expr,
        lower_bound_expr=bound,
        bytes_moved=cost.nbytes,
        lower_bound_bytes=evaluate(bound, bindings),
        symbols={str(s): v for s, v in sorted(bindings.items(), key=lambda kv: str(kv[0]))},
        gm=result.gm,
    )


def describe_target(fn: object) -> str:
    if isinstance(fn, torch.nn.Module):
        return type(fn).__name__
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def analyze(
    fn: Callable,
    *example_inputs: object,
    training: bool = False,
    dynamic: bool = False,
    compile_for: str | None = None,
    **options: object,
) -> Analysis:
    """Analyze `fn(*example_inputs)`: eager bytes (counted), optimized bytes (modelled), why.

    fn: a function or nn.Module. training=True analyzes forward and backward (the backward
    of every output that requires grad, seeded with ones). dynamic=True captures with
    symbolic sizes, so byte figures are also sympy expressions of them. compile_for="h100"
    (any GPU device model with a Triton target) also compiles every Triton kernel for that
    GPU with Triton's own compiler, offline, into `Analysis.compiled` (registers, spills,
    occupancy, load widths; analyze with backend="triton" for a GPU run's kernels).
    options: memopt's options (passes, disable, fuel, device, check, backend, ...).
    """
    config = Config.from_options(options)
    if compile_for is not None:
        arch_for(compile_for)  # an unknown GPU fails before the analysis
    start = time.perf_counter()
    eager = count_eager_bytes(fn, tuple(example_inputs), training=training)
    captured = capture_program(fn, example_inputs, config, training=training, dynamic=dynamic)
    capture_ms = (time.perf_counter() - start) * 1e3
    analysis = analyze_captured(
        captured,
        config,
        target=describe_target(fn),
        eager_bytes=eager.total_bytes,
        eager_ops=eager.ops,
        capture_ms=capture_ms,
    )
    if compile_for is not None:
        analysis.compiled = compile_for_gpu(analysis, compile_for)
    return analysis


def analyze_captured(
    captured: Captured,
    config: Config,
    *,
    target: str,
    eager_bytes: int,
    eager_ops: int,
    capture_ms: float = 0.0,
) -> Analysis:
    """The pipeline over already-captured graphs: one capture serves every configuration
    whose capture-time stages would have made the same one (the same `capture_key`)."""
    pipeline = config.pipeline()
    if capture_key(pipeline, captured.training, config.fuel) != captured.key:
        raise ValueError(
            "the capture was made with other capture-time passes or fuel than this "
            "configuration's (attention rewrites, the partition): capture it again"
        )
    start = time.perf_counter()
    # The ATen stage continues the fuel count of the capture-time stages.
    fuel = Fuel(config.fuel, used=captured.fuel_used)
    graphs = [optimize_graph(graph, pipeline, fuel) for graph in captured.graphs]
    return Analysis(
        target=target,
        training=captured.training,
        eager_bytes=eager_bytes,
        eager_ops=eager_ops,
        graphs=graphs,
        options={k: v for k, v in config.as_dict().items() if k in config.sources},
        capture_ms=capture_ms,
        pipeline_ms=(time.perf_counter() - start) * 1e3,
        device=config.device,
    )
