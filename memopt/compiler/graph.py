"""Tensor metadata on fx nodes, symbolic sizes, and the printed form of a graph.

Every node of a captured graph carries `node.meta["memopt"]`: a TensorMeta (or a tuple of
them for multi-output ops, or None for non-tensor values). Sizes and strides are sympy
expressions: integers for static shapes, expressions of the symbols torch.compile's shape
environment created (s0, s1, ...) for dynamic ones.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import sympy
import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

META_KEY = "memopt"


def copy_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy of `gm`, made outside any active fake mode: AOTAutograd compiles under
    one, and copying a real tensor constant inside it fails (its storage would move to the
    meta device)."""
    with unset_fake_temporarily():
        return copy.deepcopy(gm)


def attribute(gm: torch.fx.GraphModule, target: str) -> object:
    """What a `get_attr` (or `call_module`) node of `gm` with this dotted target fetches."""
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def graph_device(gm: torch.fx.GraphModule) -> str:
    """The device type of the graph's tensor inputs (fake tensors carry it); "cpu" if none."""
    for node in gm.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "cpu"


def to_sympy(value: object) -> sympy.Expr:
    """An int or SymInt as a sympy expression."""
    if isinstance(value, torch.SymInt):
        return sympy.sympify(value.node.expr)
    if isinstance(value, int):
        return sympy.Integer(value)
    if isinstance(value, sympy.Expr):
        return value
    raise TypeError(f"not a size: {value!r}")


def static_int(expr: object) -> int | None:
    """The integer a size or stride is at every binding, or None if it is symbolic."""
    if isinstance(expr, int):
        return expr
    return int(expr) if getattr(expr, "is_Integer", False) else None


def evaluate(expr: object, bindings: Mapping[sympy.Symbol, int]) -> int:
    """A size expression as an int at the example sizes."""
    if isinstance(expr, int):
        return expr
    value = sympy.sympify(sympy.sympify(expr).xreplace(dict(bindings)))
    if not value.is_number:
        missing = sorted(str(s) for s in value.free_symbols)
        raise ValueError(f"no example value for symbol(s) {', '.join(missing)} in {expr}")
    return int(value)


def touched_elements(shape: Sequence[object], stride: Sequence[object]) -> object:
    """Distinct elements a tensor view touches: broadcast (stride-0) dims count once.

    Works on ints (eager tensors) and sympy expressions (graph metadata) alike.
    """
    count: object = 1
    for size, step in zip(shape, stride):
        if size == 0:
            return 0
        if step != 0:
            count = count * size
    return count


def numel(shape: Iterable[object]) -> object:
    return math.prod(shape, start=sympy.Integer(1))


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[sympy.Expr, ...]
    stride: tuple[sympy.Expr, ...]
    storage_offset: sympy.Expr
    dtype: torch.dtype

    @classmethod
    def from_tensor(cls, value: torch.Tensor) -> TensorMeta:
        return cls(
            shape=tuple(to_sympy(s) for s in value.shape),
            stride=tuple(to_sympy(s) for s in value.stride()),
            storage_offset=to_sympy(value.storage_offset()),
            dtype=value.dtype,
        )

    def __hash__(self) -> int:
        # Computed once: the passes key dicts by metadata (fusion's structures, CSE), and a
        # tuple of sympy sizes is hashed anew on every lookup otherwise.
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.shape, self.stride, self.storage_offset, self.dtype))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __getstate__(self) -> dict[str, object]:
        # Not pickled: a hash holds only within one process.
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def numel(self) -> sympy.Expr:
        return numel(self.shape)

    @property
    def nbytes(self) -> sympy.Expr:
        """Bytes of every element the tensor has (what writing it costs)."""
        return self.numel * self.itemsize

    @property
    def touched_nbytes(self) -> sympy.Expr:
        """Bytes of the distinct elements the tensor touches (what reading it costs)."""
        return sympy.sympify(touched_elements(self.shape, self.stride)) * self.itemsize

    def is_contiguous(self) -> bool:
        expected = sympy.Integer(1)
        for size, step in reversed(list(zip(self.shape, self.stride))):
            if size != 1 and step != expected:
                difference = sympy.sympify(step - expected)
                if not difference.is_number:  # symbolic: simplify (slow) only here
                    difference = sympy.simplify(difference)
                if difference != 0:
                    return False
            expected = expected * size
        return True

    def short(self) -> str:
        """`f32[s0, 768]`, plus strides when they are not contiguous."""
        dims = ", ".join(str(s) for s in self.shape)
        text = f"{DTYPE_NAMES.get(self.dtype, str(self.dtype))}[{dims}]"
        if not self.is_contiguous():
            text += "(" + ", ".join(str(s) for s in self.stride) + ")"
        return text


DTYPE_NAMES = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "b8",
    torch.complex64: "c64",
    torch.complex128: "c128",
}


def meta_of_value(value: object) -> object:
    """TensorMeta for a tensor, a tuple of them for tuples, None for anything else."""
    if isinstance(value, torch.Tensor):
        return TensorMeta.from_tensor(value)
    if isinstance(value, (tuple, list)):
        return tuple(meta_of_value(v) for v in value)
    return None


def annotate(gm: torch.fx.GraphModule) -> None:
    """Store a TensorMeta under node.meta["memopt"] from the fake value torch traced."""
    for node in gm.graph.nodes:
        if "val" in node.meta:
            node.meta[META_KEY] = meta_of_value(node.meta["val"])
        elif node.op != "output":
            node.meta[META_KEY] = None


def tensor_meta(node: torch.fx.Node) -> TensorMeta | None:
    meta = node.meta.get(META_KEY)
    return meta if isinstance(meta, TensorMeta) else None


def output_metas(node: torch.fx.Node) -> list[TensorMeta]:
    """Every tensor a node produces (one for most ops, several for tuple-returning ones)."""
    meta = node.meta.get(META_KEY)
    if isinstance(meta, TensorMeta):
        return [meta]
    if isinstance(meta, tuple):
        return [m for m in meta if isinstance(m, TensorMeta)]
    return []


def shape_bindings(values: Iterable[object]) -> dict[sympy.Symbol, int]:
    """Example values of the symbols in fake tensors' sizes, from their shape environment."""
    for value in values:
        if not isinstance(value, torch.Tensor):
            continue
        for size in (*value.shape, *value.stride()):
            if isinstance(size, torch.SymInt):
                shape_env = size.node.shape_env
                # torch >= 2.10 renamed var_to_val (hints of backed symbols).
                hints = getattr(shape_env, "backed_var_to_val", None)
                if hints is None:
                    hints = shape_env.var_to_val
                return {sym: int(val) for sym, val in hints.items()}
    return {}


# -- structure without identity (caches keyed by what a node computes, not which node) --

SLOT = "<node>"  # where a node stood in a skeleton's arguments


def hashable_meta(node: torch.fx.Node) -> object:
    """A node's metadata in a form a dict key can hold (its repr when not hashable)."""
    meta = node.meta.get(META_KEY)
    try:
        hash(meta)
    except TypeError:
        return repr(meta)
    return meta


def node_skeleton(node: torch.fx.Node) -> tuple[tuple, tuple[torch.fx.Node, ...]]:
    """What a node computes without which nodes it reads: its op, its arguments with every
    node replaced by SLOT, and its metadata; and the nodes read, in slot order."""
    found: list[torch.fx.Node] = []
    args, kwargs = _canon(node.args, found), _canon(node.kwargs, found)
    return (node.target, args, kwargs, hashable_meta(node)), tuple(found)


def _canon(value: object, found: list[torch.fx.Node]) -> object:
    """`value` with each node replaced by SLOT (appended to `found`), hashable. A module
    function: a recursive closure would be a reference cycle per call."""
    if isinstance(value, torch.fx.Node):
        found.append(value)
        return SLOT
    if isinstance(value, (list, tuple)):
        return tuple(_canon(v, found) for v in value)
    if isinstance(value, dict):
        return tuple((k, _canon(v, found)) for k, v in value.items())
    if isinstance(value, float):
        return ("float", repr(value))  # -0.0 and 0.0 are equal, and differ
    try:
        hash(value)
    except TypeError:
        return ("repr", repr(value))
    return (type(value).__name__, value)


def plain_equal(a: object, b: object) -> bool:
    """a == b, and False where equality is not plain (a tensor argument compares
    elementwise)."""
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - any comparison that is not a plain bool
        return False
