"""The printed form of a graph: one line per node, stable across runs, so diffs are text diffs.

%add_1: f32[128, 768] = aten.add.Tensor(%mm, %arg3_1)  # 1179648 B
"""

from __future__ import annotations

from collections.abc import Mapping

import sympy
import torch
import torch.fx

from memopt.compiler.cost import is_kernel, is_view, node_bytes
from memopt.compiler.graph import META_KEY, TensorMeta, evaluate, plain_equal


def _op_name(target: object) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    name = getattr(target, "memopt_name", None) or getattr(target, "__name__", None)
    module = getattr(target, "__module__", "")
    if module in ("_operator", "operator"):
        return f"operator.{name}"
    return str(name or target)


def op_name(node: torch.fx.Node) -> str:
    return _op_name(node.target) if node.op == "call_function" else node.op


def _arg(value: object) -> str:
    if isinstance(value, torch.fx.Node):
        return f"%{value.name}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_arg(v) for v in value)
        return (
            f"[{inner}]"
            if isinstance(value, list)
            else f"({inner}{',' if len(value) == 1 else ''})"
        )
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _meta_text(meta: object) -> str:
    if isinstance(meta, TensorMeta):
        return meta.short()
    if isinstance(meta, tuple):
        return "(" + ", ".join(_meta_text(m) for m in meta) + ")"
    return "?" if meta is None else str(meta)


def format_node(node: torch.fx.Node, bindings: Mapping[sympy.Symbol, int]) -> str:
    meta = _meta_text(node.meta.get(META_KEY))
    value = node.meta.get("val")
    if isinstance(value, (torch.SymInt, int)) and not isinstance(value, bool):
        meta = f"sym[{value.node.expr if isinstance(value, torch.SymInt) else value}]"
    if node.op == "placeholder":
        return f"%{node.name}: {meta} = input"
    if node.op == "output":
        return f"return {_arg(node.args[0])}"
    args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
    line = f"%{node.name}: {meta} = {op_name(node)}({', '.join(args)})"
    if is_kernel(node):
        line += f"  # {evaluate(node_bytes(node), bindings)} B"
    elif is_view(node):
        line += "  # view"
    return line


_LINE_KEY = "memopt_line"  # node.meta: (what the line depends on, the line)


def format_graph(
    gm: torch.fx.GraphModule, bindings: Mapping[sympy.Symbol, int], title: str = ""
) -> str:
    """The graph, a line per node. A node's line is kept on the node with what it depends
    on (its op, arguments, metadata, its inputs' metadata, the sizes): the pipeline prints
    the graph after every pass that changes it, and most lines do not change."""
    sizes = tuple(sorted((str(k), v) for k, v in bindings.items()))
    lines = [f"# {title}"] if title else []
    for node in gm.graph.nodes:
        key = (
            node.name,
            node.op,
            node.target,
            node.args,
            node.kwargs,
            node.meta.get(META_KEY),
            _symbol(node.meta.get("val")),
            tuple(a.meta.get(META_KEY) for a in node.all_input_nodes),
            sizes,
        )
        cached = node.meta.get(_LINE_KEY)
        if cached is None or not plain_equal(cached[0], key):
            cached = (key, format_node(node, bindings))
            node.meta[_LINE_KEY] = cached
        lines.append(cached[1])
    return "\n".join(lines) + "\n"


def _symbol(value: object) -> object:
    """What a line shows of a size value (a SymInt's expression); None for tensors."""
    if isinstance(value, torch.SymInt):
        return str(value.node.expr)
    return value if isinstance(value, int) else None
