"""The pass pipeline: every stage of a compilation, running the configured passes in order.

At the ATen stage (`run_pipeline`), for each pass on one graph: it prints the graph (kept
for diffs), measures bytes and kernels with the cost model and times the pass; after the
pass it lints the graph, re-propagates metadata with fake tensors and compares it with what
the nodes claim, and with `check` runs the graph on real inputs against the unoptimized
graph. The capture-time stages (`capture_hooks`) run while the program is captured: the
Dynamo stage on Dynamo's graph, the partition stage on the joint graph, the saved stage on
the forward and backward graphs it makes. Their decisions are
kept on the ATen graph they concern and come first in its ledger, so the ledger lists the
decisions of a graph in the order fuel counted them.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import sympy
import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode

from memopt.compiler.capture import STAGE_RECORDS_KEY, CaptureHooks
from memopt.compiler.cost import GraphCost, graph_cost
from memopt.compiler.graph import (
    META_KEY,
    TensorMeta,
    annotate,
    copy_graph,
    meta_of_value,
    plain_equal,
    shape_bindings,
)
from memopt.compiler.printer import format_graph
from memopt.errors import CheckError, VerificationError
from memopt.passes import partition
from memopt.passes.base import Fuel, PartitionedPair, Pass, PassContext, Pipeline, Stage
from memopt.passes.ledger import Decision, LedgerEntry


@dataclass
class PipelineResult:
    gm: torch.fx.GraphModule
    ledger: list[LedgerEntry]
    text_before: str
    text_after: str
    # A copy of the graph right after the last pass that changes values by design
    # (Pass.changes_values) changed it: what a check compares the result against. None
    # when no such pass changed anything (the graph before the passes is the reference).
    reference: torch.fx.GraphModule | None = None


@dataclass(frozen=True)
class StageRecord:
    """What one pass decided at a capture-time stage, kept for the ATen graph it concerns."""

    pass_name: str
    stage: Stage
    decisions: tuple[Decision, ...]
    elapsed_ms: float
    work: Mapping[str, int] = field(default_factory=dict)


def run_pipeline(
    gm: torch.fx.GraphModule,
    pipeline: Pipeline,
    graph_name: str,
    bindings: Mapping[sympy.Symbol, int],
    fuel: Fuel | None = None,
    check_inputs: Sequence[object] | None = None,
    probe: bool = False,
    record: bool = True,
) -> PipelineResult:
    """Optimize `gm` in place with the pipeline's passes; return it with the ledger.

    probe: only the optimized graph is wanted (an estimate of its bytes): the graph is not
    printed and its bytes are not measured between passes (the ledger's figures are 0),
    and it is not verified (nodes missing metadata get it).
    record: False where nobody reads the ledger's texts and figures (a torch.compile
    without report_dir): verified as always, but not printed or measured between passes.
    """
    quiet = probe or not record
    fuel = fuel if fuel is not None else Fuel()
    changed_values: torch.fx.GraphModule | None = None  # the graph after a pass changed values
    reference = copy_graph(gm) if pipeline.check and check_inputs is not None else None
    expected = _run_reference(reference, check_inputs) if reference is not None else None
    measure = (
        (lambda g: GraphCost(0, 0, bindings)) if quiet else (lambda g: graph_cost(g, bindings))
    )
    text = "" if quiet else format_graph(gm, bindings)
    text_before_all = text
    cost = measure(gm)
    # The capture-time stages acted before this graph existed: before and after are it.
    ledger = [
        _entry(
            record.pass_name,
            graph_name,
            (cost, cost),
            (text, text),
            record.elapsed_ms,
            tuple(replace(d, graph=graph_name) for d in record.decisions),
            record.stage,
            record.work,
        )
        for record in gm.meta.pop(STAGE_RECORDS_KEY, ())
    ]
    for pass_ in pipeline.at(Stage.ATEN):
        ctx = PassContext.for_pass(pass_, graph_name, bindings, pipeline, fuel)
        before = None if probe else _signatures(gm)
        start = time.perf_counter()
        pass_.run(gm, ctx)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        changed = ctx.record.changed
        if changed:
            gm.graph.lint()
            gm.recompile()
            if probe:
                fill_metadata(gm, after=pass_.name)
            else:
                verify_metadata(gm, after=pass_.name, before=before)
        if changed and pass_.changes_values:
            # What the program computes from here on: the check's and the executor's
            # reference (this pass measured and reported its own error).
            changed_values = copy_graph(gm)
            if expected is not None:
                expected = _run_reference(changed_values, check_inputs)
        if expected is not None:
            _compare(gm, check_inputs, expected, after=pass_.name)
        text_after = format_graph(gm, bindings) if changed and not quiet else text
        cost_after = measure(gm) if changed else cost
        ledger.append(
            _entry(
                pass_.name,
                graph_name,
                (cost, cost_after),
                (text, text_after),
                elapsed_ms,
                tuple(ctx.record.decisions),
                Stage.ATEN,
                ctx.record.work,
            )
        )
        text, cost = text_after, cost_after
    return PipelineResult(
        gm=gm,
        ledger=ledger,
        text_before=text_before_all,
        text_after=text,
        reference=changed_values,
    )


def _entry(
    pass_name: str,
    graph_name: str,
    costs: tuple[GraphCost, GraphCost],
    texts: tuple[str, str],
    elapsed_ms: float,
    decisions: tuple[Decision, ...],
    stage: Stage,
    work: Mapping[str, int],
) -> LedgerEntry:
    before, after = costs
    return LedgerEntry(
        pass_name=pass_name,
        graph=graph_name,
        bytes_before=before.nbytes,
        bytes_after=after.nbytes,
        kernels_before=before.kernels,
        kernels_after=after.kernels,
        elapsed_ms=elapsed_ms,
        decisions=decisions,
        text_before=texts[0],
        text_after=texts[1],
        stage=stage.value,
        work=dict(work),
    )


def modelled_bytes(gm: torch.fx.GraphModule, pipeline: Pipeline, graph_name: str) -> int:
    """Bytes a graph moves after `pipeline` (modelled at its example sizes): a probe, on an
    annotated copy, with unlimited fuel and no check; a pipeline failure leaves the graph
    unoptimized, as the backend would run it. `gm` itself is left as it is."""
    inputs = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    bindings = shape_bindings(inputs)
    probe = copy_graph(gm)
    annotate(probe)
    try:
        run_pipeline(probe, pipeline.without_check(), graph_name, bindings, probe=True)
    except Exception:  # noqa: BLE001 - the backend runs such a graph unoptimized
        probe = copy_graph(gm)
        annotate(probe)
    return graph_cost(probe, bindings).nbytes


# -- the capture-time stages ---------------------------------------------------------------


def capture_hooks(pipeline: Pipeline, fuel: Fuel) -> CaptureHooks:
    """The capture-time stages of `pipeline`, taking rewrite decisions from `fuel`."""

    def rewrite_dynamo_graph(gm: torch.fx.GraphModule, training: bool) -> list[StageRecord]:
        records = []
        graph_name = "forward" if training else "inference"
        for pass_ in pipeline.at(Stage.DYNAMO):
            ctx = PassContext.for_pass(pass_, graph_name, {}, pipeline, fuel)
            start = time.perf_counter()
            pass_.rewrite_dynamo_graph(gm, ctx)
            if ctx.record.decisions:
                records.append(_stage_record(pass_, Stage.DYNAMO, ctx, start))
        return records

    partitioner = next(iter(pipeline.at(Stage.PARTITION)), None)  # at most one (Config)

    def partition_joint(
        joint: torch.fx.GraphModule,
        joint_inputs: Sequence[object],
        inputs: Sequence[object] | None = None,
        **kwargs: object,
    ) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
        bindings = shape_bindings(pytree.tree_leaves(list(joint_inputs)))
        records = []
        if partitioner is None:
            forward, backward = partition.default(joint, joint_inputs, **kwargs)
        else:
            ctx = PassContext.for_pass(partitioner, "forward", bindings, pipeline, fuel)
            start = time.perf_counter()
            forward, backward = partitioner.partition(
                joint, joint_inputs, ctx, cost=modelled_bytes, **kwargs
            )
            records.append(_stage_record(partitioner, Stage.PARTITION, ctx, start))
        pair = PartitionedPair(
            forward,
            backward,
            int(kwargs["num_fwd_outputs"]),
            inputs,
            cost=lambda gm, graph_name: modelled_bytes(gm, pipeline, graph_name),
        )
        for pass_ in pipeline.at(Stage.SAVED):
            if pass_.capture_options(Stage.SAVED) is None:
                continue  # nothing to do at this stage with these options
            ctx = PassContext.for_pass(pass_, "forward", bindings, pipeline, fuel)
            start = time.perf_counter()
            kept = copy_graph(pair.forward), copy_graph(pair.backward)
            try:
                pass_.rewrite_saved(pair, ctx)
            except Exception as error:  # noqa: BLE001 - a pass bug: the pair as partitioned
                warnings.warn(
                    f"memopt: pass {pass_.name} failed on the saved tensors of a forward and "
                    f"backward ({type(error).__name__}: {error}); keeping them as partitioned",
                    stacklevel=2,
                )
                pair.forward, pair.backward = kept
                continue
            if ctx.record.decisions:
                records.append(_stage_record(pass_, Stage.SAVED, ctx, start))
        forward, backward = pair.forward, pair.backward
        forward.meta[STAGE_RECORDS_KEY] = [*forward.meta.get(STAGE_RECORDS_KEY, ()), *records]
        return forward, backward

    return CaptureHooks(
        rewrite_dynamo_graph=rewrite_dynamo_graph if pipeline.at(Stage.DYNAMO) else None,
        partition=partition_joint,
    )


def _stage_record(pass_: Pass, stage: Stage, ctx: PassContext, start: float) -> StageRecord:
    elapsed_ms = (time.perf_counter() - start) * 1e3
    decisions = tuple(ctx.record.decisions)
    return StageRecord(pass_.name, stage, decisions, elapsed_ms, ctx.record.work)


def capture_key(pipeline: Pipeline, training: bool, fuel_limit: int | None) -> tuple:
    """What a capture made with `capture_hooks(pipeline, ...)` depends on: two pipelines
    with one key can share a capture. The Dynamo stage's passes and their options; in
    training, when a pass partitions (costing candidates through every pass), the whole
    pipeline (else the passes that rewrite what is saved, and their options); and the fuel,
    when any of these stages runs (they take decisions)."""
    key: tuple = (pipeline.at(Stage.DYNAMO),)
    if training and pipeline.at(Stage.PARTITION):
        key += (pipeline.passes, pipeline.backend)
    elif training:
        saved = tuple(p.capture_options(Stage.SAVED) for p in pipeline.at(Stage.SAVED))
        if any(option is not None for option in saved):
            key += (saved,)
    if any(key[0]) or len(key) > 1:
        key += (fuel_limit,)
    return key


# -- verification ----------------------------------------------------------------------


def _fake_inputs(gm: torch.fx.GraphModule) -> list[object]:
    return [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]


def _signatures(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, tuple]:
    """What each node computes from what, and its value's metadata: a pass that leaves a
    node's signature alone and changes none of its inputs' values leaves its value alone."""
    return {n: (_signature(n), n.meta.get(META_KEY)) for n in gm.graph.nodes}


def _signature(node: torch.fx.Node) -> tuple:
    # The value object too: a pass that gives a node a new value (a layout) replaces it.
    return (node.op, node.target, node.args, node.kwargs, id(node.meta.get("val")))


def verify_metadata(
    gm: torch.fx.GraphModule, after: str, before: Mapping[torch.fx.Node, tuple] | None = None
) -> None:
    """Re-propagate fake values through the graph; every node must match its recorded metadata.

    Nodes a pass created without metadata get it here. With `before` (the signatures of
    the graph before the pass), only the nodes the pass created or changed, and those
    reading a value that changed, are propagated again: the rest keep their values.
    """
    inputs = _fake_inputs(gm)
    mode = detect_fake_mode(inputs) or FakeTensorMode(allow_non_fake_inputs=True)
    interpreter = torch.fx.Interpreter(gm)
    env_values: dict[torch.fx.Node, object] = {}
    changed: set[torch.fx.Node] = set()  # nodes whose value is not what it was
    with mode:
        placeholder_values = iter(inputs)
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                value = next(placeholder_values)
            elif node.op == "output":
                continue
            elif (
                before is not None
                and node in before
                and plain_equal(before[node][0], _signature(node))
                and "val" in node.meta
                and META_KEY in node.meta
                and not any(a in changed for a in node.all_input_nodes)
            ):
                interpreter.env[node] = env_values[node] = node.meta["val"]
                continue
            else:
                args, kwargs = interpreter.fetch_args_kwargs_from_env(node)
                try:
                    value = getattr(interpreter, node.op)(node.target, args, kwargs)
                except Exception as error:  # noqa: BLE001 - reported with the node's name
                    raise VerificationError(
                        f"after pass {after!r}: %{node.name} ({node.target}) no longer "
                        f"type-checks: {type(error).__name__}: {str(error).splitlines()[0]}"
                    ) from error
            interpreter.env[node] = value
            env_values[node] = value
            recorded = node.meta.get(META_KEY)
            fresh = meta_of_value(value)
            if recorded is not None and not _same_meta(recorded, fresh):
                raise VerificationError(
                    f"after pass {after!r}: %{node.name} ({node.target}) claims "
                    f"{_describe(recorded)} but computes {_describe(fresh)}"
                )
            if before is None or node not in before or before[node][1] != fresh:
                changed.add(node)
            node.meta[META_KEY] = fresh
            node.meta["val"] = value


def fill_metadata(gm: torch.fx.GraphModule, after: str) -> None:
    """Give nodes a pass created without metadata theirs, from their arguments' fake values:
    what a probe run needs of `verify_metadata` (which propagates the whole graph)."""
    missing = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and (META_KEY not in n.meta or "val" not in n.meta)
    ]
    if not missing:
        return
    inputs = _fake_inputs(gm)
    mode = detect_fake_mode(inputs) or FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        for node in missing:
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), _fake_value)
            try:
                value = node.target(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - reported with the node's name
                raise VerificationError(
                    f"after pass {after!r}: %{node.name} ({node.target}) no longer "
                    f"type-checks: {type(error).__name__}: {str(error).splitlines()[0]}"
                ) from error
            node.meta["val"] = value
            node.meta[META_KEY] = meta_of_value(value)


def _fake_value(node: torch.fx.Node) -> object:
    if "val" not in node.meta:
        raise VerificationError(f"%{node.name} has no value to propagate from")
    return node.meta["val"]


def _same_meta(a: object, b: object) -> bool:
    if isinstance(a, TensorMeta) and isinstance(b, TensorMeta):
        return (a.shape, a.dtype) == (b.shape, b.dtype) and all(
            sympy.simplify(x - y) == 0 or size == 1
            for x, y, size in zip(a.stride, b.stride, a.shape)
        )
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same_meta(x, y) for x, y in zip(a, b))
    return (a is None) == (b is None)


def _describe(meta: object) -> str:
    if isinstance(meta, TensorMeta):
        return f"{meta.dtype} {list(meta.shape)} strides {list(meta.stride)}"
    return repr(meta)


def _run_reference(gm: torch.fx.GraphModule, inputs: Sequence[object]) -> list[object]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return list(gm(*_clone(inputs)))


def _clone(inputs: Sequence[object]) -> list[object]:
    return [
        torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device).copy_(a)
        if isinstance(a, torch.Tensor)
        else a
        for a in inputs
    ]


def _compare(
    gm: torch.fx.GraphModule, inputs: Sequence[object], expected: list[object], after: str
) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        actual = list(gm(*_clone(inputs)))
    for index, (want, got) in enumerate(zip(expected, actual)):
        if not isinstance(want, torch.Tensor):
            continue
        try:
            torch.testing.assert_close(got, want, equal_nan=True)
        except AssertionError as error:
            first = str(error).strip().splitlines()[0]
            raise CheckError(
                f"after pass {after!r}: output {index} differs from eager: {first}"
            ) from None
