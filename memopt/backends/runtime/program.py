"""The executor's program: an optimized graph as straight-line Python that calls each node
by its cheapest equivalent.

torch.fx's generated forward calls every ATen op as `torch.ops.aten.<op>.<overload>(...)`:
three attribute lookups and a Python frame (`OpOverload.__call__`) before the dispatcher.
A decode step of a small language model is a few hundred such calls around 30 matmuls of
one row each, so the Python around the kernels is a third of the step (measured: 5.8 us a
`view` through `torch.ops`, 2.6 us through the overload's C++ callable, 0.8 us as an alias
made without the dispatcher; a 512x512 one-row matmul takes 18 us). The program differs
from fx's forward in these ways only, each with the same results:

- **ATen ops** are called through `OpOverload._op`, the C++ callable `OpOverload.__call__`
  itself calls.
- **Strided views of static layout** (`STRIDED_VIEWS`; every size, stride and offset of
  the view and of the tensor it views known when the graph was compiled) are made as
  aliases of the first non-view tensor up their chain, with the view's sizes and strides
  and its offset from that tensor (`_reinterpret_tensor`, which Inductor's generated code
  uses for the same reason), after checking that tensor's strides are those the graph was
  compiled for (along its dims of more than one element: the stride of a dim of size 1
  moves nothing, and ATen's and the fake tensors' may differ there). Where they are not,
  the chain of view ops runs as the graph has it. A view the graph returns stays an ATen
  view: AOTAutograd regenerates outputs that alias inputs from their `_base`.
- **Views nothing reads** any more, once their users alias further up, are not made.
- **Generated kernels** are called through `FusedKernel.program_call`, without the checks
  each call of a kernel makes (plain tensors, no fake mode: 3 us a call); the program
  checks once a call that no fake mode is active, and under one runs fx's forward.

Graphs with nodes other than placeholders, ATen or Python calls, constants read with
`get_attr` and the output, or with graph values inside an argument other than a list or
tuple, run fx's forward instead (`straight_line` returns None).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import sympy
import torch
import torch.fx
from torch._C._dynamo.guards import _reinterpret_tensor
from torch._subclasses.fake_tensor import FakeTensor

from memopt.backends.runtime.kernels import FusedKernel
from memopt.compiler.aten_ops import is_view_op
from memopt.compiler.graph import attribute, tensor_meta

_SUPPORTED = {"placeholder", "call_function", "get_attr", "output"}
_FAKE = torch._C._TorchDispatchModeKey.FAKE
aten = torch.ops.aten
# Ops whose result is exactly the input's elements at other sizes, strides and offset.
# Not every op torch marks a view: `_conj` and `_neg_view` set a bit an alias would lose,
# `reshape`-like ops copy when the input does not fit, and `as_strided`'s offset is
# absolute where an alias's is relative to its root.
STRIDED_VIEWS = {
    aten.view,
    aten._unsafe_view,
    aten.slice,
    aten.select,
    aten.narrow,
    aten.permute,
    aten.t,
    aten.transpose,
    aten.expand,
    aten.squeeze,
    aten.unsqueeze,
    aten.alias,
    aten.detach,
    aten.diagonal,
    aten.unfold,
}


def _strided_view(node: torch.fx.Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target.overloadpacket in STRIDED_VIEWS


class _Unsupported(Exception):
    """An argument the program cannot spell (a slice or dict holding graph values)."""


_LITERALS = (bool, int, str, type(None))


def straight_line(gm: torch.fx.GraphModule) -> Callable[..., object] | None:
    """The program for `gm`, called as `gm.forward` is; None where fx's forward must run."""
    if any(node.op not in _SUPPORTED for node in gm.graph.nodes):
        return None
    try:
        return _Emitter(gm).program()
    except _Unsupported:
        return None


def _static(values: tuple[sympy.Expr, ...]) -> tuple[int, ...] | None:
    if all(isinstance(v, (int, sympy.Integer)) for v in values):
        return tuple(int(v) for v in values)
    return None


class _Alias:
    """How a view of static layout is made from its root (the first non-view up its chain)."""

    def __init__(self, root: torch.fx.Node, chain: list[torch.fx.Node]) -> None:
        view, base = tensor_meta(chain[-1]), tensor_meta(root)
        self.root = root
        self.size = _static(view.shape)
        self.stride = _static(view.stride)
        self.offset = int(view.storage_offset - base.storage_offset)
        # The root's strides that matter: a dim of size 1 is only ever indexed at 0, so its
        # stride (which torch leaves free: ATen and fake tensors may differ there) moves no
        # element; an empty root has none to move.
        shape, stride = _static(base.shape), _static(base.stride)
        self.checked_dims = tuple(k for k, n in enumerate(shape) if n > 1)
        self.root_stride = tuple(stride[k] for k in self.checked_dims)
        if 0 in shape:
            self.checked_dims = self.root_stride = ()
        # The chain as the graph has it, for a root whose strides differ from the compiled ones.
        steps = [(n.target, n.args[1:], dict(n.kwargs)) for n in chain]

        def replay(tensor: torch.Tensor) -> torch.Tensor:
            for op, rest, kwargs in steps:
                tensor = op(tensor, *rest, **kwargs)
            return tensor

        self.replay = replay

    def make(self, root: torch.Tensor) -> torch.Tensor:
        """The view, from the root's tensor, as the program's line for it makes it."""
        if self.checked_dims:
            stride = root.stride()
            if tuple(stride[k] for k in self.checked_dims) != self.root_stride:
                return self.replay(root)
        return _reinterpret_tensor(root, self.size, self.stride, self.offset)


def alias_of(node: torch.fx.Node, returned: set[torch.fx.Node]) -> _Alias | None:
    """The alias that makes `node`, a view, from its root; None where it must stay a view op."""
    if node in returned or not _strided_view(node):
        return None
    chain = []
    current = node
    while current.op == "call_function" and _strided_view(current):
        if (
            not current.args
            or not isinstance(current.args[0], torch.fx.Node)
            or _has_node((current.args[1:], current.kwargs))
        ):
            return None  # a view whose sizes come from the graph's values at run time
        chain.append(current)
        current = current.args[0]
    view, base = tensor_meta(node), tensor_meta(current)
    if view is None or base is None or view.dtype != base.dtype:
        return None
    layouts = (
        view.shape,
        view.stride,
        base.shape,
        base.stride,
        (view.storage_offset, base.storage_offset),
    )
    if any(_static(tuple(values)) is None for values in layouts):
        return None
    return _Alias(current, chain[::-1])


def _has_node(value: object) -> bool:
    found = []
    torch.fx.node.map_arg(value, found.append)
    return bool(found)


class _Emitter:
    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.globals: dict[str, object] = {"_reinterpret": _reinterpret_tensor}
        self._names: dict[int, str] = {}

    def program(self) -> Callable[..., object]:
        nodes = list(self.gm.graph.nodes)
        output = nodes[-1]
        returned = set(output.all_input_nodes)
        aliases = {}
        for node in nodes:
            if node.op == "call_function":
                alias = alias_of(node, returned)
                if alias is not None:
                    aliases[node] = alias
        inputs = {
            node: [aliases[node].root] if node in aliases else node.all_input_nodes
            for node in nodes
        }
        live = self._live(nodes, inputs)
        last_use: dict[torch.fx.Node, torch.fx.Node] = {}
        for node in nodes:
            if node in live:
                for source in inputs[node]:
                    last_use[source] = node
        freed_after: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        for source, user in last_use.items():
            if user.op != "output":
                freed_after.setdefault(user, []).append(source)

        params = [self.name(n) for n in nodes if n.op == "placeholder"]
        body = []
        for node in nodes:
            if node.op == "placeholder" or node not in live:
                continue
            if node.op == "output":
                body.append(f"return {self.expr(node.args[0])}")
                break
            body.append(f"{self.name(node)} = {self.call(node, aliases.get(node))}")
            dead = [self.name(n) for n in freed_after.get(node, ()) if n.op != "placeholder"]
            if dead:
                body.append(" = ".join(dead) + " = None")
        # Under a fake mode (metadata propagated through the graph) fx's forward runs:
        # the program's kernels skip the checks that would send fake tensors elsewhere.
        self.globals.update(
            _dispatch_mode=torch._C._get_dispatch_mode,
            _FAKE=_FAKE,
            _FakeTensor=FakeTensor,
            _fx=self.gm.forward,
        )
        fake = "_dispatch_mode(_FAKE) is not None"
        tensors = [n for n in nodes if n.op == "placeholder" and tensor_meta(n) is not None]
        if tensors:  # fake tensors passed in outside their mode
            fake += f" or type({self.name(tensors[0])}) is _FakeTensor"
        guard = f"if {fake}: return _fx({', '.join(params)})"
        body.insert(0, guard)
        source = f"def program({', '.join(params)}):\n" + "".join(f"    {s}\n" for s in body)
        namespace = dict(self.globals)
        exec(compile(source, f"<memopt program {id(self.gm):x}>", "exec"), namespace)  # noqa: S102
        program = namespace["program"]
        program.memopt_source = source
        return program

    @staticmethod
    def _live(nodes, inputs) -> set[torch.fx.Node]:
        """Nodes the program runs: the output, whatever it reads, and every node that is not
        a view (a view nothing reads is free to leave out; any other op may have effects)."""
        live: set[torch.fx.Node] = set()
        for node in reversed(nodes):
            needed = (
                node.op in ("output", "placeholder")
                or not (node.op == "call_function" and is_view_op(node))
                or any(user in live and node in inputs[user] for user in node.users)
            )
            if needed:
                live.add(node)
        return live

    def name(self, node: torch.fx.Node) -> str:
        return f"v_{node.name}"

    def constant(self, value: object) -> str:
        key = f"_c{len(self.globals)}"
        self.globals[key] = value
        return key

    def callable(self, target: object) -> str:
        name = self._names.get(id(target))
        if name is None:
            name = self._names[id(target)] = f"_f{len(self._names)}"
            self.globals[name] = target
        return name

    def expr(self, value: object) -> str:
        if isinstance(value, torch.fx.Node):
            return self.name(value)
        if isinstance(value, tuple):
            items = ", ".join(self.expr(v) for v in value)
            return f"({items},)" if len(value) == 1 else f"({items})"
        if isinstance(value, list):
            return "[" + ", ".join(self.expr(v) for v in value) + "]"
        if isinstance(value, _LITERALS) or (isinstance(value, float) and math.isfinite(value)):
            return repr(value)
        if _has_node(value):
            raise _Unsupported(type(value).__name__)
        return self.constant(value)  # dtypes, devices, infinities, slices, anything else

    def call(self, node: torch.fx.Node, alias: _Alias | None) -> str:
        if node.op == "get_attr":
            return self.constant(attribute(self.gm, node.target))
        if alias is not None:
            root = self.name(alias.root)
            made = f"_reinterpret({root}, {alias.size}, {alias.stride}, {alias.offset})"
            if not alias.checked_dims:
                return made
            if len(alias.checked_dims) == len(tensor_meta(alias.root).shape):
                strides = f"{root}.stride()"
                expected = alias.root_stride
            else:  # only the dims of size > 1, picked by a C-level itemgetter
                pick = self.constant(operator.itemgetter(*alias.checked_dims))
                strides = f"{pick}({root}.stride())"
                expected = (
                    alias.root_stride if len(alias.checked_dims) > 1 else alias.root_stride[0]
                )
            return f"{made} if {strides} == {expected} else {self.callable(alias.replay)}({root})"
        target = node.target
        if target is operator.getitem and isinstance(node.args[1], int) and not node.kwargs:
            return f"{self.expr(node.args[0])}[{node.args[1]}]"
        if isinstance(target, torch._ops.OpOverload):
            target = target._op  # what OpOverload.__call__ calls, without its frame
        elif isinstance(target, FusedKernel):
            target = target.program_call  # no per-call checks: the program made them
        args = [self.expr(a) for a in node.args]
        args += [f"{k}={self.expr(v)}" for k, v in node.kwargs.items()]
        return f"{self.callable(target)}({', '.join(args)})"
