"""epilogue: a GEMM and the pointwise ops after it as one library call (oneDNN's fused linear).

Capture decomposes `addmm` and `gelu`, so a linear layer reaches the ATen stage as `mm`
followed by a bias add and the activation's primitives. Where matmul templates are formed
(triton, reference) fusion puts them in one kernel. The C++ backend has no template: the mm
writes its (M, N) result and a generated kernel reads it back for the bias and what
follows. On the CPU, oneDNN computes a GEMM with a bias and one post-op in its epilogue
(backends/runtime/linear.py), so this pass replaces, before fusion:

- `act(mm(x, w) + b)`, act one of GELU (tanh or erf form), HF's NewGELU formula, ReLU,
  matched structurally against the activation traced through capture's own
  decompositions (`activation` decisions);
- `mm(x, w) + b + other`, `other` a tensor of the result's shape: a residual add
  (`residual` decisions); the bias is optional in both.

It is priced by the cost model against what fusion would do otherwise: one dry run of
fusion on a copy of the graph gives the groups the epilogue's nodes would join; the
rewrite saves `cost(mm) + cost(those groups) - cost(linear) - cost(the groups without the
epilogue's nodes)`, where the linear call reads x, w, b (and other) once and writes its
result once, and what the groups kept of their members reads that result instead. This
assumes fusion regroups the rest as before and that candidates do not share a group.
Only rewrites that save bytes are applied.

Refused, with the bytes at stake: a GEMM output or epilogue intermediate read elsewhere
(`refused_shared`: the library call would not produce it), dtypes other than float32
(`refused_dtype`), symbolic sizes or layouts the library call does not take (a strided x,
other or result; a weight that is not dense; `refused_layout`), a rewrite that does not
save bytes (`refused_bytes`: a residual add that fuses into a layer norm reading only the
sum), and a torch without oneDNN (`no_library`). The pass acts on CPU graphs where fusion
forms no matmul templates, and on nothing else.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Literal, NamedTuple

import sympy
import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.proxy_tensor import make_fx

from memopt.backends.runtime.linear import LinearEpilogue, onednn_available
from memopt.compiler.capture import decompositions
from memopt.compiler.cost import buffer_users, is_view, read_bytes
from memopt.compiler.graph import copy_graph, evaluate, graph_device, output_metas, tensor_meta
from memopt.passes.base import Pass, PassContext
from memopt.passes.registry import register_pass

aten = torch.ops.aten
Nodes = frozenset[torch.fx.Node]

# The activations oneDNN computes as a post-op, as a model writes them. Each is traced
# through capture's decompositions; a chain of the graph matches when it prints the same.
_ACTIVATION_SOURCES = {
    "gelu_tanh": (
        lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
        # transformers' NewGELUActivation (GPT-2's "gelu_new"), as it is written there
        lambda x: (
            0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))
        ),
    ),
    "gelu_erf": (torch.nn.functional.gelu,),
    "relu": (torch.relu,),
}
_RESHAPES = frozenset({aten.view.default, aten._unsafe_view.default, aten.reshape.default})


@functools.cache
def _activation_forms() -> dict[str, str]:
    """Printed decomposed form -> activation name."""
    forms = {}
    with unset_fake_temporarily():
        for name, sources in _ACTIVATION_SOURCES.items():
            for source in sources:
                traced = make_fx(source, decomposition_table=decompositions())(torch.ones(8))
                (x,) = (n for n in traced.graph.nodes if n.op == "placeholder")
                (out,) = (n for n in traced.graph.nodes if n.op == "output")
                forms[_printed(out.args[0], x, set())] = name
    return forms


def _printed(node: object, x: torch.fx.Node, seen: set[torch.fx.Node]) -> str | None:
    """`node` as an expression of `x` (reshapes looked through), collecting its nodes in
    `seen`; None when it reads anything but x and constants."""
    if not isinstance(node, torch.fx.Node):
        if isinstance(node, (list, tuple)):
            items = [_printed(a, x, seen) for a in node]
            return None if None in items else "[" + ", ".join(items) + "]"
        return repr(node)
    if node is x:
        return "x"
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    seen.add(node)
    if node.target in _RESHAPES:
        return _printed(node.args[0], x, seen)
    args = [_printed(a, x, seen) for a in node.args]
    kwargs = {k: _printed(v, x, seen) for k, v in sorted(node.kwargs.items())}
    if None in args or None in kwargs.values():
        return None
    args += [f"{k}={v}" for k, v in kwargs.items()]
    return f"{node.target}({', '.join(args)})"


class _Match(NamedTuple):
    mm: torch.fx.Node
    bias: torch.fx.Node | None
    activation: str | None  # None: a residual add
    other: torch.fx.Node | None
    out: torch.fx.Node  # the last node of the epilogue: its value is the call's result
    epilogue: Nodes  # the bias add and the epilogue's ops (views included)


def _users(node: torch.fx.Node) -> list[torch.fx.Node]:
    return list(dict.fromkeys(buffer_users(node)))


def _root(node: torch.fx.Node) -> torch.fx.Node:
    while is_view(node) and node.target is not operator.getitem and node.args:
        node = node.args[0]
    return node


def _views_between(source: torch.fx.Node, user: torch.fx.Node) -> set[torch.fx.Node]:
    """The view nodes on the way from `source` to `user` (its buffer users through views)."""
    found = set()
    for arg in user.all_input_nodes:
        chain = []
        while arg is not source and is_view(arg) and arg.target is not operator.getitem:
            chain.append(arg)
            arg = arg.args[0]
        if arg is source:
            found.update(chain)
    return found


def _bias_add(mm: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(the add, the bias) when a user of mm adds a vector of its columns to it."""
    n = tensor_meta(mm).shape[1]
    for user in _users(mm):
        if user.target is not aten.add.Tensor or user.kwargs or len(user.args) != 2:
            continue
        for a, b in (user.args, user.args[::-1]):
            if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
                continue
            vector = tensor_meta(b)
            if _root(a) is mm and vector is not None and vector.shape == (n,):
                return user, b
    return None


def _residual(start: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(the add, the other operand) when a user of `start` adds a tensor of its full shape."""
    for user in _users(start):
        if user.target is not aten.add.Tensor or user.kwargs or len(user.args) != 2:
            continue
        for a, b in (user.args, user.args[::-1]):
            if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
                continue
            other = tensor_meta(b)
            if (
                _root(a) is start
                and not _depends_on(b, start)  # the call would read its own result
                and other is not None
                and other.shape == tensor_meta(user).shape
            ):
                return user, b
    return None


def _depends_on(node: torch.fx.Node, source: torch.fx.Node) -> bool:
    """Whether `node` is computed from `source` (searching no further back than `source`)."""
    position = {n: k for k, n in enumerate(source.graph.nodes)}
    floor = position[source]
    pending, seen = [node], set()
    while pending:
        current = pending.pop()
        if current is source:
            return True
        if current in seen or position[current] < floor:
            continue
        seen.add(current)
        pending.extend(current.all_input_nodes)
    return False


def _activation(start: torch.fx.Node) -> tuple[str, torch.fx.Node, set[torch.fx.Node]] | None:
    """(name, last node, nodes) of an activation of `start`, matched by its printed form."""
    forms = _activation_forms()
    region: list[torch.fx.Node] = []
    inside = {start}
    pending = list(start.users)
    while pending:  # the nodes computed from start alone (and constants)
        node = pending.pop(0)
        if node in inside or node.op != "call_function":
            continue
        if all(a in inside for a in node.all_input_nodes):
            inside.add(node)
            region.append(node)
            pending.extend(node.users)
    for node in reversed(region):
        if is_view(node):
            continue  # the result is the last computed value; views of it read the call's
        seen: set[torch.fx.Node] = set()
        name = forms.get(_printed(node, start, seen))
        if name is not None:
            return name, node, seen
    return None


def _match(mm: torch.fx.Node) -> _Match | None:
    """The epilogue after `mm`, if it has one this pass knows; users not yet checked."""
    if tensor_meta(mm) is None or len(tensor_meta(mm).shape) != 2:
        return None
    nodes: set[torch.fx.Node] = set()
    start, bias = mm, None
    found = _bias_add(mm)
    if found is not None:
        start, bias = found
        nodes |= {start} | _views_between(mm, start)
    residual = _residual(start)
    if residual is not None:
        add, other = residual
        nodes |= {add} | _views_between(start, add)
        return _Match(mm, bias, None, other, add, frozenset(nodes))
    activation = _activation(start)
    if activation is None:
        return None
    name, out, seen = activation
    return _Match(mm, bias, name, None, out, frozenset(nodes | seen))


def _shared(match: _Match) -> list[str]:
    """Values the fused call would not produce that something outside it reads."""
    inside = match.epilogue | {match.mm}
    return [
        f"%{node.name}"
        for node in sorted(inside - {match.out}, key=lambda n: n.name)
        if not is_view(node) and any(u not in inside for u in _users(node))
    ]


def _unsupported(match: _Match, transposed_weights: bool) -> tuple[str, str] | None:
    """(code, reason) when the library call does not take these tensors (or, without
    `transposed_weights`, a row-major (K, N) weight)."""
    x, w = match.mm.args[:2]
    tensors = {"x": x, "w": w, "result": match.out, "bias": match.bias, "other": match.other}
    metas = {k: tensor_meta(v) for k, v in tensors.items() if v is not None}
    dtypes = {k: m.dtype for k, m in metas.items()}
    if any(d != torch.float32 for d in dtypes.values()):
        return "refused_dtype", f"the library call computes float32 only ({dtypes})"
    if any(sympy.sympify(s).free_symbols for m in metas.values() for s in (*m.shape, *m.stride)):
        return "refused_layout", "symbolic sizes (the call's views are built at fixed sizes)"
    (k, n), out = metas["w"].shape, metas["result"]
    if not metas["x"].is_contiguous():
        return "refused_layout", "x is strided (the library call reads it row-major)"
    if metas["w"].stride not in ((n, 1), (1, k)):
        return "refused_layout", f"the weight's strides {metas['w'].stride} are not dense"
    if metas["w"].stride == (n, 1) and n != 1 and not transposed_weights:
        return "refused_layout", (
            "the weight is row-major (K, N): oneDNN would read it transposed "
            "(option transposed_weights='refuse')"
        )
    if not out.is_contiguous() or out.shape[-1] != n:
        return "refused_layout", "the result is strided or not (rows, N) in memory"
    if "other" in metas and not metas["other"].is_contiguous():
        return "refused_layout", "the residual is strided (the library call reads it row-major)"
    if "bias" in metas and not metas["bias"].is_contiguous():
        return "refused_layout", "the bias is strided"
    return None


@register_pass(
    "epilogue",
    codes=(
        "activation",  # mm (+ bias) + activation as one library call
        "residual",  # mm (+ bias) + a residual add as one library call
        "refused_shared",  # the GEMM output or an intermediate is read elsewhere
        "refused_dtype",  # not float32
        "refused_layout",  # symbolic sizes, or a strided operand or result
        "refused_bytes",  # fusion does at least as well without it
        "no_library",  # this torch has no oneDNN
        "off",  # the pass is off (its default): measured slower in whole models here
    ),
)
@dataclass(frozen=True)
class Epilogue(Pass):
    # mm's weight as a row-major (K, N) tensor (GPT-2's Conv1D) reaches oneDNN transposed
    # ("ba"). Measured on this project's CPU (GPT-2 at the bench size, inference): with
    # such weights the model ran at 0.82x the speed of the plan without this pass, with
    # the same weights as (N, K) copies ("ab", nn.Linear's layout) at 1.08x
    # (docs/architecture.md, Epilogue). "call" takes them (fewer bytes), "refuse" leaves
    # those GEMMs to fusion.
    transposed_weights: Literal["call", "refuse"] = "call"
    # Off by default: each fused call is as fast as the GEMM and the kernel it replaces,
    # but whole models ran slower with them on this project's CPU (GPT-2 at the bench
    # size 0.80x, BERT 0.93x; docs/architecture.md, Epilogue): fewer bytes that cost time
    # are not what memopt is for. Off, each match is recorded with the bytes at stake.
    enabled: bool = False

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        device = graph_device(gm)
        if device != "cpu" or self._templates(gm, ctx):
            return
        matches = [m for n in gm.graph.nodes if n.target is aten.mm.default if (m := _match(n))]
        if not matches:
            return
        candidates = []
        for match in matches:
            what = self._what(match)
            names = tuple(n.name for n in (match.mm, *sorted(match.epilogue, key=_order(gm))))
            at_stake = 2 * evaluate(tensor_meta(match.mm).nbytes, ctx.bindings)
            if not self.enabled:
                reason = (
                    "the pass is off (pass_options={'epilogue': {'enabled': True}}): oneDNN's "
                    "fused linear ran whole models slower on this CPU; at most the GEMM "
                    "output's write and read are at stake"
                )
                ctx.refuse("off", what, reason, at_stake, names)
                continue
            shared = _shared(match)
            if shared:
                reason = (
                    f"{', '.join(shared)} read outside the epilogue; the call does not produce it"
                )
                ctx.refuse("refused_shared", what, reason, at_stake, names)
                continue
            unsupported = _unsupported(match, self.transposed_weights == "call")
            if unsupported is None and not onednn_available():
                unsupported = ("no_library", "this torch has no oneDNN (mkldnn)")
            if unsupported is not None:
                code, reason = unsupported
                ctx.refuse(code, what, reason, at_stake, names)
                continue
            candidates.append((match, what, names))
        if not candidates:
            return
        groups = self._fusion_groups(gm, ctx)
        # Priced on the graph as it is: a rewrite leaves new nodes without metadata.
        priced = [(*c, *self._price(c[0], groups, ctx)) for c in candidates]
        replaced: dict[torch.fx.Node, torch.fx.Node] = {}  # an earlier match's result
        for match, what, names, saved, reason in priced:
            if saved <= 0:
                ctx.refuse("refused_bytes", what, reason, saved, names)
                continue
            code = "residual" if match.activation is None else "activation"
            if not ctx.decide(code, what, reason, saved, names):
                break
            replaced[match.out] = _rewrite(gm, match, replaced)

    def _templates(self, gm: torch.fx.GraphModule, ctx: PassContext) -> bool:
        """Whether fusion forms matmul templates here (they take the epilogue themselves)."""
        if not ctx.pipeline.runs("fusion"):
            return False
        return ctx.pipeline.instance("fusion").templates(gm, ctx)[0]

    def _what(self, match: _Match) -> str:
        post = match.activation or f"+ %{match.other.name}"
        bias = f" + %{match.bias.name}" if match.bias is not None else ""
        return f"%{match.mm.name}{bias} -> {post} (%{match.out.name}) as one oneDNN linear"

    def _fusion_groups(self, gm: torch.fx.GraphModule, ctx: PassContext) -> dict[str, Nodes]:
        """The groups fusion would form (a dry run on a copy), by member name."""
        if not ctx.pipeline.runs("fusion"):
            return {}
        trial = copy_graph(gm)
        fusion = ctx.pipeline.instance("fusion")  # a sibling pass, used as an estimator
        fusion.run(trial, ctx.scratch(fusion))
        by_name = {n.name: n for n in gm.graph.nodes}
        groups: dict[str, Nodes] = {}
        for node in trial.graph.nodes:
            members = getattr(node.target, "memopt_nodes", None)
            if members:
                group = frozenset(by_name[m] for m in members if m in by_name)
                groups.update(dict.fromkeys(members, group))
        return groups

    def _price(self, match: _Match, groups: dict[str, Nodes], ctx: PassContext) -> tuple[int, str]:
        """(bytes saved, the reason in words) of replacing the match with one call."""
        epilogue = {n for n in match.epilogue if not is_view(n)}
        touched = list(dict.fromkeys(groups.get(n.name, frozenset([n])) for n in epilogue))
        before = ctx.nbytes(match.mm) + sum(_group_cost(g, ctx) for g in touched)
        rest = [g - epilogue for g in touched if g - epilogue]
        x, w = match.mm.args[:2]
        inputs = [a for a in (x, w, match.bias, match.other) if a is not None]
        call = evaluate(read_bytes(match.mm, inputs) + tensor_meta(match.out).nbytes, ctx.bindings)
        after = call + sum(_group_cost(g, ctx) for g in rest)
        kept = ", ".join(f"%{n.name}" for g in rest for n in sorted(g, key=lambda n: n.name))
        reason = (
            f"mm and its epilogue's kernels move {before} B; the library call {call} B"
            + (f" and the rest of the epilogue's kernel ({kept}) {after - call} B" if rest else "")
            + " (oneDNN inner product with a post-op; its GEMM result never reaches memory)"
        )
        return before - after, reason


def _group_cost(group: Nodes, ctx: PassContext) -> int:
    """Modelled bytes of `group` as one kernel (fusion's rule): external inputs read once,
    members read outside it written once. A lone node: its own cost."""
    if len(group) == 1:
        return ctx.nbytes(next(iter(group)))
    inputs = []
    for member in group:
        for arg in member.all_input_nodes:
            if _root(arg) not in group and tensor_meta(arg) is not None and arg not in inputs:
                inputs.append(arg)
    stored = [m for m in group if any(u not in group for u in _users(m))]
    writes = sum(meta.nbytes for m in stored for meta in output_metas(m))
    return evaluate(read_bytes(next(iter(group)), inputs) + writes, ctx.bindings)


def _order(gm: torch.fx.GraphModule):
    position = {n: k for k, n in enumerate(gm.graph.nodes)}
    return position.__getitem__


def _rewrite(
    gm: torch.fx.GraphModule, match: _Match, replaced: dict[torch.fx.Node, torch.fx.Node]
) -> torch.fx.Node:
    """Replace the match with `LinearEpilogue(x, w, bias, other)` viewed to the result's
    shape, and return that; operands an earlier rewrite replaced are read from `replaced`."""
    graph = gm.graph
    x, w = (replaced.get(a, a) for a in match.mm.args[:2])
    m, n = (int(s) for s in tensor_meta(match.mm).shape)
    shape = [int(s) for s in tensor_meta(match.out).shape]
    with graph.inserting_before(match.out):
        other = replaced.get(match.other, match.other)
        if other is not None and [int(s) for s in tensor_meta(match.other).shape] != [m, n]:
            other = graph.call_function(aten.view.default, (other, [m, n]))
        bias = replaced.get(match.bias, match.bias)
        call = graph.call_function(LinearEpilogue(match.activation), (x, w, bias, other))
        result = call
        if shape != [m, n]:
            result = graph.call_function(aten.view.default, (call, shape))
    match.out.replace_all_uses_with(result)
    for node in sorted(match.epilogue | {match.mm}, key=_order(gm), reverse=True):
        if not node.users:
            graph.erase_node(node)
    return result
