"""The pass pipeline: runs the configured passes in order on one graph.

Before and after every pass it prints the graph (kept for diffs), measures bytes and
kernels with the cost model and times the pass; after every pass it lints the graph,
re-propagates metadata with fake tensors and compares it with what the nodes claim, and
with `check=True` runs the graph on real inputs against the unoptimized graph.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import sympy
import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode

from memopt.compiler.cost import graph_cost
from memopt.compiler.graph import META_KEY, TensorMeta, copy_graph, meta_of_value
from memopt.compiler.printer import format_graph
from memopt.config import Config
from memopt.errors import CheckError, VerificationError
from memopt.passes import PASSES, Fuel, PassContext
from memopt.passes.ledger import LedgerEntry


@dataclass
class PipelineResult:
    gm: torch.fx.GraphModule
    ledger: list[LedgerEntry]
    text_before: str
    text_after: str


def run_pipeline(
    gm: torch.fx.GraphModule,
    config: Config,
    graph_name: str,
    bindings: Mapping[sympy.Symbol, int],
    fuel: Fuel | None = None,
    check_inputs: Sequence[object] | None = None,
) -> PipelineResult:
    """Optimize `gm` in place with the configured passes; return it with the ledger."""
    fuel = fuel if fuel is not None else Fuel(config.fuel)
    reference = copy_graph(gm) if config.check and check_inputs is not None else None
    expected = _run_reference(reference, check_inputs) if reference is not None else None
    ledger: list[LedgerEntry] = []
    text = format_graph(gm, bindings)
    text_before_all = text
    cost = graph_cost(gm, bindings)
    for name in config.pass_names():
        ctx = PassContext(config=config, graph_name=graph_name, bindings=bindings, fuel=fuel)
        start = time.perf_counter()
        result = PASSES[name](**config.pass_options.get(name, {})).run(gm, ctx)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if result.changed:
            gm.graph.lint()
            gm.recompile()
            verify_metadata(gm, after=name)
        if expected is not None:
            _compare(gm, check_inputs, expected, after=name)
        text_after = format_graph(gm, bindings) if result.changed else text
        cost_after = graph_cost(gm, bindings) if result.changed else cost
        ledger.append(
            LedgerEntry(
                pass_name=name,
                graph=graph_name,
                bytes_before=cost.nbytes,
                bytes_after=cost_after.nbytes,
                kernels_before=cost.kernels,
                kernels_after=cost_after.kernels,
                elapsed_ms=elapsed_ms,
                decisions=tuple(result.decisions),
                text_before=text,
                text_after=text_after,
            )
        )
        text, cost = text_after, cost_after
    return PipelineResult(gm=gm, ledger=ledger, text_before=text_before_all, text_after=text)


def _fake_inputs(gm: torch.fx.GraphModule) -> list[object]:
    return [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]


def verify_metadata(gm: torch.fx.GraphModule, after: str) -> None:
    """Re-propagate fake values through the graph; every node must match its recorded metadata.

    Nodes a pass created without metadata get it here.
    """
    inputs = _fake_inputs(gm)
    mode = detect_fake_mode(inputs) or FakeTensorMode(allow_non_fake_inputs=True)
    interpreter = torch.fx.Interpreter(gm)
    env_values: dict[torch.fx.Node, object] = {}
    with mode:
        placeholder_values = iter(inputs)
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                value = next(placeholder_values)
            elif node.op == "output":
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
            node.meta[META_KEY] = fresh
            node.meta["val"] = value


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
