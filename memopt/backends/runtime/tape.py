"""A graph's step as one call: its kernels' launches replayed from a tape, without Python.

A decode step of the 4-layer Llama of bench/decode.py makes 57 kernel launches. With int4
weights they run 210 us in C; the step takes 490 us: the straight-line program around them
(views, allocations, each call target's checks, ATen's in-place cache writes) is half of it
(measured by timers inside the launcher; float32 weights: 920 us of 1,390). A tape runs
the same launches, with the same pointers, in one C loop (`launcher.tape`), the few calls
that are not launches in between as Python calls. It is what a CUDA graph is to a GPU
step, on the CPU: the memory every value lives in is fixed when the tape is made, so each
replay writes into the same buffers.

Making a tape (`Tape.capture`, on a graph's third plain call, run in place of the program
for that call): the graph runs node by node on the call's arguments, with the launcher
recording what each node launches and a dispatch mode watching the ATen ops it calls.

- A view (an ATen view op, `getitem`) is made once, as the program makes it (with the
  strides the launches were bound to): in the fixed memory it stays valid.
- A node that made exactly one launch, which ran, and computed nothing else in ATen
  (allocations and views only) becomes that launch: its function, pointers and scalars.
- Any other node (a call through ctypes, an ATen op such as a cache's `index_put_`, a
  layout the launch refused) becomes a Python entry that calls the node's target again
  on the same tensors and copies its results into the tensors the capture kept.
- Inputs whose memory moved between the calls before the capture (token ids, positions:
  new tensors each step) are copied into buffers of the tape's own, and each replay copies
  the new values in; the graph gets no tape if such an input is written or its elements
  overlap (and the copies count against COPY_NBYTES_PER_LAUNCH, below). The others
  (weights, a static KV cache) are used where they are: a replay
  needs the same memory (data pointer; a written input may move, below), dtype, shape,
  strides and no negation or conjugation bit, and for read-only ones the same version
  counter, since a narrowed weight's copy was made from the parameter's values. One C
  call checks their identity, memory and versions (`launcher.same_inputs`) and, where
  torch has it, Dynamo's C tensor check their layouts (`_layout_check`); 60 weights and
  caches take 20-30 us where attribute reads took 55-80 (GPT-2's decode step, caches
  cold after a step's weights).
- Every static value (below) is kept: the tape owns that memory (at most MAX_KEPT_NBYTES).

Graphs with size symbols (a dynamic KV cache's decode step: the cache's length is one)
replay their launches of static sizes all the same. A *varying* value (`varying_values`)
is one each call decides: an input with a size symbol, a symbolic int, a result with a
size symbol. A node that reads one or makes one is *per-call* (a `getitem` reads only its
own element: one of static layout is in the tape's memory): a Python entry that calls the
node on that replay's values (its varying arguments from the replay's frame, where its
varying result goes), and copies each result of static layout into memory of the tape's,
where the launches after it read it (a decode step's attention over the grown cache:
one row per head). Views of varying values are per-call nodes too; an alias is never made
through one. An output that varies is the call's own result, returned as it is: like the
program's, it may be a view of an input or of another output (it must not be the tape's
memory). An output of static layout made through views from a per-call node or a varying
value (a row of the cache) means no tape: its copy would lose the alias (and where such a
graph's capture makes no tape, the program runs that call again, the capture's outputs
being made from those copies). A per-call node's varying elements go into the frame from
its own entry (their `getitem`s get no entries), and an element nothing reads is not
copied. An `AppendAttention` (a dynamic cache's attention with its concatenations) is
bound once to its static operands (`AppendAttention.bind`: the query and new rows the
launches before it write, its output in the tape's memory): a replay checks and passes
only the old caches, about 10 us a layer less than the whole call and the copy of its
output. A graph with any varying value that writes in place gets no tape: a write through
a copy would miss the value it writes.

A graph gets no tape when it has a node the tape does not know (only ATen
ops, `getitem` and memopt's kernels, GEMVs, narrow matmuls and lookups, decode (also over
an appended cache) and causal attention and row writes: targets whose calls do nothing
outside their launch and ATen), an
output of static layout that shares memory with an input or with another output or
overlaps itself, more bytes of outputs and moved
inputs to copy than COPY_NBYTES_PER_LAUNCH a launch, fewer launches than
MIN_LAUNCH_SHARE of its entries or than MIN_LAUNCHES, where another thread captured at
the same time, or where the launcher is not built.

A written input given in other memory of the same layout (a static KV cache, which
Hugging Face makes anew for each `generate()`) moves the tape onto it (`Tape._rebind`,
0.1-0.3 ms): each launch's pointers into the old input's memory are moved by as much as
the input moved, each Python entry's tensors of it made again as the same views of the
new one. It moves only after REBIND_AFTER (2) replays where it is, never onto memory an
argument or the tape itself holds, and only to the same offset in the new input's storage
(`as_strided` counts from the storage's start). Without this the tape was captured again for every
sequence, and a graph out of captures (CAPTURES) ran its program from the ninth sequence
on: 30% slower steps for every later request.

A replay (`Tape.__call__`) returns None, and the program runs instead, when an argument
differs as above and cannot be moved onto, the grad or inference mode differs from the
capture's, or another thread is replaying. After MISSES such calls in a row the graph
counts its calls again and makes a new tape, at most CAPTURES times. A replay's outputs
are new tensors each call (copies of the kept ones, in their layouts), the input itself
where the graph returns one, or the call's own varying results. An output a GEMV makes
(`_fresh_outputs`: a decode step's logits) is written into new memory each call instead
of copied out of the tape's: the replay allocates it and the tape's launches that reach
the GEMV's result are pointed at it (`launcher.tape`'s patches). That needs the GEMV to
be the first entry reaching that memory, its result to be all of it (so it is written
whole before anything reads it), and no Python entry to hold a tensor of it. The copy
cost 50 us a step of the 4-layer Llama (8,000 logits) and 140 us of the large one
(32,000): the GEMV's threads have just written them. A launch returning an
error stops the tape there, as the program would have stopped: the node runs again
through Python, which raises the kernel's error.
"""

from __future__ import annotations

import functools
import operator
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx
from torch.utils._python_dispatch import TorchDispatchMode

from memopt.backends.cpp import launcher
from memopt.backends.runtime.causal_attention import CausalAttention
from memopt.backends.runtime.decode_attention import AppendAttention, DecodeAttention
from memopt.backends.runtime.extern import RowWrite
from memopt.backends.runtime.gemv import StreamingGemv
from memopt.backends.runtime.kernels import FusedKernel
from memopt.backends.runtime.program import alias_of
from memopt.backends.runtime.quantized import QuantizedEmbedding, QuantizedMatmul
from memopt.compiler.aten_ops import is_view_op
from memopt.compiler.graph import META_KEY, TensorMeta, attribute, static_int
from memopt.compiler.order import written_buffers

# Plain calls of a graph before the one that makes its tape: the first works out and binds
# each kernel's launch, the second takes them.
CAPTURE_AFTER = 2
MAX_KEPT_NBYTES = 64 << 20
# A replay copies its moved inputs in and its outputs out: at most this many bytes a launch
# it runs (a launch saves 1.5-4 us of the program's Python; 16 KiB copy in about 1 us).
COPY_NBYTES_PER_LAUNCH = 16 << 10
MIN_LAUNCH_SHARE = 0.5
# A replay's own work (its checks, copies of the moved inputs and of the outputs: about 3 us)
# costs more than the program around a few launches (measured: a one-kernel graph on 64
# elements 9.2 us a call through the program, 12.6 through a tape, Dynamo's part included).
MIN_LAUNCHES = 8
MISSES = 3
# Replays a tape makes on its inputs' memory before it moves onto written inputs given in
# other memory (`Tape._rebind`, 0.1-0.3 ms, about a program call): an input moving on every
# call is a miss, while a `generate()` of three new tokens moves it.
REBIND_AFTER = 2
# What `Tape.capture` returns for the outputs when it failed before running any node, or
# made no tape of a graph with varying values (the program runs the call).
NOT_RUN = object()
CAPTURES = 8

_TARGETS = (
    FusedKernel,
    StreamingGemv,
    QuantizedMatmul,
    QuantizedEmbedding,
    DecodeAttention,
    AppendAttention,
    CausalAttention,
    RowWrite,
)
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_empty_strided = torch.empty_strided
aten = torch.ops.aten
# ATen ops a launching node may call besides its launch: allocations (and views, by schema).
_ALLOCATIONS = {aten.empty, aten.empty_strided, aten.empty_like, aten.new_empty}


def refusal(gm: torch.fx.GraphModule) -> str | None:
    """Why `gm` can get no tape (module doc), or None: only nodes it knows, and no write in
    a graph with a varying value."""
    varying = varying_values(gm)
    for node in gm.graph.nodes:
        if node.op == "call_function":
            target = node.target
            if not (
                isinstance(target, (torch._ops.OpOverload, *_TARGETS)) or target is operator.getitem
            ):
                return f"node {node.name} calls {getattr(target, '__name__', target)}"
            if varying and written_buffers(node):
                return f"node {node.name} writes in place in a graph with size symbols"
        elif node.op not in ("placeholder", "get_attr", "output"):
            return f"node {node.name} is a {node.op}"
    return None


def _symbolic(meta: object) -> bool:
    if isinstance(meta, TensorMeta):
        values = (*meta.shape, *meta.stride, meta.storage_offset)
        return any(static_int(v) is None for v in values)
    if isinstance(meta, (tuple, list)):
        return any(_symbolic(m) for m in meta)
    return False


def varying_values(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """The values whose memory or layout each call decides: inputs with a size symbol,
    symbolic ints, and the results with a size symbol (any of a tuple's)."""
    varying = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "call_function") and (
            _symbolic(node.meta.get(META_KEY)) or isinstance(node.meta.get("val"), torch.SymInt)
        ):
            varying.add(node)
    return varying


def _per_call(gm: torch.fx.GraphModule, varying: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """The nodes a replay calls through Python with that call's values: those reading a
    varying value or making one. A getitem reads only its own element: one of a static
    layout is in the tape's memory."""
    return {
        node
        for node in gm.graph.nodes
        if node.op == "call_function"
        and (
            node in varying
            or (
                node.target is not operator.getitem
                and any(a in varying for a in node.all_input_nodes)
            )
        )
    }


class _Watch(TorchDispatchMode):
    """Notes whether an ATen op other than an allocation or a view ran under it."""

    computed = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket not in _ALLOCATIONS and not func.is_view:
            self.computed = True
        return func(*args, **(kwargs or {}))


def _tensors(value: object) -> list[torch.Tensor]:
    """The tensors `value` (a value, or a call's arguments and result, nested) holds."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _extent(tensor: torch.Tensor) -> tuple[int, int]:
    """The addresses `tensor`'s elements span: [start, end), empty for no element."""
    return _span(tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.element_size())


def _span(address: int, shape, stride, itemsize: int) -> tuple[int, int]:
    if any(size == 0 for size in shape):
        return address, address
    # a tensor's strides are not negative
    return address, address + (1 + sum((n - 1) * s for n, s in zip(shape, stride))) * itemsize


@dataclass
class _Reach:
    """What of a tape the memory of its written inputs reaches (`Tape._rebind`), worked out
    once: the rest stays where it is when those inputs move."""

    # False where two written inputs, or a written and a read one, share memory: views of
    # one could not be told from the other's. (A tape with per-call entries has no written
    # input: a graph with varying values that writes gets none, `refusal`.)
    possible: bool
    read: set[int]  # the positions of the inputs read where they are (their memory is fixed)
    fixed: set[int]  # the storages of the tape's other memory: no moved input may take one
    pointers: list[tuple[int, int, int, int]]  # (entry, pointer, input position, byte offset)
    calls: list[int]  # the entries whose call (Python entry, launch's fallback) holds one
    kept: list[int]  # the kept tensors of their memory

    @classmethod
    def of(cls, inputs: list[tuple], specs: list[tuple], kept: list[torch.Tensor]) -> _Reach:
        # the written inputs' memory as the capture (or the last move) recorded it: the
        # tensors themselves may have been given other memory since (`set_`)
        written = {
            k: how[1]
            for k, (kind, *how) in enumerate(inputs)
            if kind == "same" and how[3] is not None
        }
        read = {k for k, (kind, *how) in enumerate(inputs) if kind == "same" and how[3] is None}
        storages = {inputs[k][4] for k in written}
        possible = len(storages) == len(written) and not any(
            _storage(inputs[k][1]) in storages for k in read
        )
        extents = {
            k: (layout[0], *_span(layout[0], layout[2], layout[3], layout[1].itemsize))
            for k, layout in written.items()
        }
        pointers, calls = [], []
        for index, (kind, *rest) in enumerate(specs):
            if kind == "launch":
                for pointer, address in enumerate(rest[0][1]):
                    for position, (start, low, high) in extents.items():
                        if low <= address < high:
                            pointers.append((index, pointer, position, address - start))
            if kind != "per call" and _holds(rest[-1], storages):
                calls.append(index)
        # kept also holds the narrow weights quantized launches read: not tensors
        tensors = [(k, t) for k, t in enumerate(kept) if isinstance(t, torch.Tensor)]
        reached = [k for k, t in tensors if _storage(t) in storages]
        fixed = {_storage(t) for _, t in tensors} - storages
        return cls(possible, read, fixed, pointers, calls, reached)


def _same_table(inputs: list[tuple]) -> tuple[tuple, ...]:
    """The inputs used where they are as `launcher.same_inputs` checks them: (position,
    tensor, address, (dtype, shape, strides), version or None)."""
    return tuple(
        (k, tensor, layout[0], (layout[1], tuple(layout[2]), tuple(layout[3])), version)
        for k, (kind, *how) in enumerate(inputs)
        if kind == "same"
        for tensor, layout, version, _ in [how]
    )


def _layout_check(table: tuple[tuple, ...], same_inputs: Callable) -> Callable[[], bool] | None:
    """The layouts of a `_same_table`'s tensors checked in one C call: True while each has
    the Python type, dispatch keys (the device, negation and conjugation bits among them),
    dtype, requires_grad, shape and strides it has now. Dynamo's guards check tensors with
    it (`TensorGuards`): about 0.2 us a tensor, where `launcher.same_inputs` reads each
    attribute as a Python object (1 us). It is stricter than the table's rule
    (requires_grad; the dispatch state of the thread): where it says False the replay
    looks at the arguments in Python, which decides. None, and the layouts are checked
    with the rest, where torch lacks it, a tensor is no longer as the table recorded
    (`same_inputs`, the launcher's check, says so), or the table holds one tensor twice
    (the check refuses a repeated tensor)."""
    try:
        from torch._C._dynamo.guards import TensorGuards
    except ImportError:
        return None
    tensors = [row[1] for row in table]
    if len({id(tensor) for tensor in tensors}) < len(tensors):
        return None
    recorded = [None] * (1 + max((row[0] for row in table), default=-1))
    for position, tensor, *_ in table:
        recorded[position] = tensor
    if same_inputs(recorded, table) >= 0:
        return None
    try:
        guards = TensorGuards(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None)
    except Exception:  # noqa: BLE001 - its interface is Dynamo's own: the rule in C instead
        return None
    return functools.partial(guards.check, *tensors)


def _storages(value: object) -> set[int]:
    """The storages of the tensors `value` holds (`_tensors`)."""
    return {_storage(t) for t in _tensors(value)}


def _python_held(ran: _Ran, env: dict, per_call: set[torch.fx.Node]) -> set[int]:
    """The storages a tape's Python entries hold tensors of: a Python entry's arguments and
    results, a per-call node's static arguments and the tape's memory its results go to."""
    held = _storages(ran.owned)
    for node in per_call:
        held |= _storages([env.get(source) for source in node.all_input_nodes])
    for kind, *rest in ran.specs:
        if kind == "python":
            held |= _storages(rest[0])
    return held


def _fresh_outputs(plan: list[tuple], specs: list[tuple], held: set[int]) -> tuple[list, tuple]:
    """The plan with each output a GEMV writes whole turned from ("copy", kept) into
    ("fresh", (kept, buffer)), and the tape's patches (entry, pointer, buffer, offset)
    pointing every launch that reaches such an output's memory at the buffer a replay
    allocates (module doc)."""
    fresh_plan, patches, buffers = [], [], 0
    for kind, how in plan:
        sites = _fresh_sites(how, specs, held) if kind == "copy" else None
        if sites is None:
            fresh_plan.append((kind, how))
            continue
        patches += [(entry, pointer, buffers, offset) for entry, pointer, offset in sites]
        fresh_plan.append(("fresh", (how, buffers)))
        buffers += 1
    return fresh_plan, tuple(patches)


def _fresh_sites(
    value: torch.Tensor, specs: list[tuple], held: set[int]
) -> list[tuple[int, int, int]] | None:
    """(entry, pointer, offset) of every launch pointer into `value`'s memory, where a
    GEMV's launch is the first to reach it and makes all of it as its result, and no Python
    entry holds a tensor of it; else None."""
    start, nbytes = _storage(value), value.untyped_storage().nbytes()
    whole = (start, start + nbytes)
    if nbytes == 0 or start in held or _extent(value) != whole:
        return None
    sites = []
    for index, (kind, *rest) in enumerate(specs):
        if kind != "launch":
            continue
        (_, pointers, _), (target, _, _, result) = rest
        reached = [(p, a - start) for p, a in enumerate(pointers) if start <= a < whole[1]]
        if not reached:
            continue
        if not sites and not (
            isinstance(target, StreamingGemv)
            and isinstance(result, torch.Tensor)
            and _storage(result) == start
            and _extent(result) == whole
        ):
            return None  # something else reaches it first: it may read what the GEMV wrote
        sites += [(index, pointer, offset) for pointer, offset in reached]
    return sites or None


def _holds(value: object, storages: set[int]) -> bool:
    """Whether `value` (a call's arguments and result, nested) holds a tensor of one of
    `storages`."""
    return not _storages(value).isdisjoint(storages)


class _CannotRebind(Exception):
    """A tensor of a moved input the tape cannot make again in the new one (`_rebind`)."""


def _copy_into(kept: object, fresh: object) -> None:
    """The values a Python entry's call returned, into the tensors the capture kept."""
    if isinstance(kept, torch.Tensor):
        if fresh is not kept:
            kept.copy_(fresh)
    elif isinstance(kept, (list, tuple)):
        for k, f in zip(kept, fresh):
            _copy_into(k, f)


def _failed(error: Exception) -> str:
    """A tape that could not be made: a bug of the tape's, said once as a warning."""
    why = f"making it failed ({type(error).__name__}: {error})"
    warnings.warn(f"memopt: {why}; the graph's program runs its calls", stacklevel=4)
    return why


class _Slot:
    """A varying value in a per-call node's arguments: the replay's, from its frame."""

    __slots__ = ("node",)

    def __init__(self, node: torch.fx.Node) -> None:
        self.node = node


def _read_elements(node: torch.fx.Node) -> set[int] | None:
    """The elements of `node`'s tuple result that something reads (through a `getitem`
    that has users), or None where something takes the tuple itself."""
    read = set()
    for user in node.users:
        if user.target is not operator.getitem:
            return None
        if user.users:
            read.add(user.args[1])
    return read


def _own_static(node: torch.fx.Node, result: object, varying: set[torch.fx.Node]):
    """A per-call node's result with each element of a static layout that something reads
    in memory of the tape's own, where the tape's launches read it and each replay copies
    the call's value: (result, [(own tensor, index or None)]), or (result, None) where such
    an element overlaps itself. (An element nothing reads, a logsumexp, is not copied.)"""
    meta = node.meta.get(META_KEY)
    if isinstance(result, torch.Tensor):
        leaves, metas = [(None, result)], [meta]
    elif isinstance(result, (tuple, list)) and isinstance(meta, tuple):
        leaves, metas = list(enumerate(result)), list(meta)
    else:
        return result, []
    read = _read_elements(node) if isinstance(result, (tuple, list)) else None
    owned, values = [], list(result) if isinstance(result, (tuple, list)) else None
    for (index, value), value_meta in zip(leaves, metas):
        if not isinstance(value, torch.Tensor) or _symbolic(value_meta):
            continue
        if read is not None and index not in read:
            continue
        if torch._debug_has_internal_overlap(value) != 0:
            return result, None
        own = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype)
        own.copy_(value)
        owned.append((own, index))
        if index is None:
            return own, owned
        values[index] = own
    if values is None or not owned:
        return result, owned
    return type(result)(values), owned


def _through(node: torch.fx.Node, root: torch.fx.Node, per_call: set[torch.fx.Node]) -> bool:
    """Whether the chain of views from `root` to `node` passes a per-call node: an alias of
    the root would be of the capture's memory. (A view taken from a varying root is
    itself per-call.)"""
    current = node.args[0]
    while current is not root:
        if current in per_call:
            return True
        current = current.args[0]
    return False


def _viewed_from(node: torch.fx.Node, sources: set[torch.fx.Node]) -> bool:
    """Whether `node` is a view, through view ops, of a value in `sources`."""
    current = node
    while current.op == "call_function" and is_view_op(current):
        current = current.args[0]
        if current in sources:
            return True
    return False


def _per_call_entry(node, target, values, owned, frame, varies: bool, taken=()):
    """A node whose values each replay gives (its varying arguments from `frame`, where
    its own result goes if it `varies`); its static elements copied into the tape's
    memory; `taken`: (getitem node, index) of its varying elements, put in `frame` here
    rather than by entries of their own."""
    call = target._op if isinstance(target, torch._ops.OpOverload) else target
    args, kwargs = node.args, node.kwargs
    map_arg = torch.fx.node.map_arg

    def value(source: torch.fx.Node) -> object:
        found = values[source]
        return frame[source] if type(found) is _Slot else found

    def run() -> None:
        fresh = call(*map_arg(args, value), **map_arg(kwargs, value))
        if varies:
            frame[node] = fresh
        for item, index in taken:
            frame[item] = fresh[index]
        for own, index in owned:
            own.copy_(fresh if index is None else fresh[index])

    return run


def _taken_items(
    node: torch.fx.Node, varying: set[torch.fx.Node]
) -> list[tuple[torch.fx.Node, int]]:
    """(getitem, index) of a per-call node's elements that vary (a concatenation an
    attention call writes): its entry puts them in the replay's frame, which saves each
    one a Python entry of its own."""
    if node.target is operator.getitem:
        return []
    # (a getitem of a varying element is varying, so per-call itself)
    return [
        (user, user.args[1])
        for user in node.users
        if user.target is operator.getitem and user in varying
    ]


def _bound_append(node, target: AppendAttention, env, varying, owned, items, entry, ran):
    """An AppendAttention's per-call entry with its static operands bound once
    (`AppendAttention.bind`): each replay checks and passes only the old caches, the
    kernel writes the output into the tape's memory and the concatenations go to the
    frame; `entry` (the whole call) where the binding does not take the node, and for a
    replay whose caches the bound call does not take."""
    if len(node.args) != 5 or set(node.kwargs) - {"attn_mask"}:
        return entry
    q, k_old, k_new, v_old, v_new = node.args
    mask = node.kwargs.get("attn_mask")
    read = _read_elements(node)
    own = {index: tensor for tensor, index in owned}
    if (
        read is None
        or 1 in read  # the logsumexp: the bound call writes it into a buffer of its own
        or 0 not in own
        or sorted(index for _, index in items) != [2, 3]
        or any(n in varying for n in (q, k_new, v_new, mask) if n is not None)
    ):
        return entry
    frame = ran.frame
    k_item, v_item = (item for item, _ in sorted(items, key=lambda pair: pair[1]))
    bound = target.bind(
        env[q], env[k_new], env[v_new], None if mask is None else env[mask], own[0],
        env[k_old], env[v_old],
    )  # fmt: skip
    if bound is None:
        return entry
    ran.owned.extend(t for t in bound.kept if isinstance(t, torch.Tensor))
    k_source = (lambda: frame[k_old]) if k_old in varying else (lambda: env[k_old])
    v_source = (lambda: frame[v_old]) if v_old in varying else (lambda: env[v_old])

    def run() -> None:
        made = bound(k_source(), v_source())
        if made is None:
            entry()
        else:
            frame[k_item], frame[v_item] = made

    return run


def _python_entry(target, args, kwargs, kept):
    call = target._op if isinstance(target, torch._ops.OpOverload) else target

    def run() -> None:
        _copy_into(kept, call(*args, **kwargs))

    return run


@dataclass
class _Ran:
    """What the capture's run recorded, node by node."""

    modes: tuple[bool, bool]  # grad mode and inference mode
    entries: list[object] = field(default_factory=list)  # (address, pointers, scalars) or calls
    fallbacks: list[object] = field(default_factory=list)  # a launch's node again, or None
    narrow: list[object] = field(default_factory=list)  # the narrow weights launches read
    python_nodes: list[str] = field(default_factory=list)  # the nodes called through Python
    owned: list[torch.Tensor] = field(default_factory=list)  # per-call nodes' static values
    frame: dict = field(default_factory=dict)  # a replay's varying values, by node
    # (entry, pointer, buffer, offset): launch pointers set to the outputs a replay
    # allocates (`_fresh_outputs`)
    patches: tuple = ()
    # per entry, what it was made from, for a rebinding (`Tape._rebind`): ("launch", (address,
    # pointers, scalars), call), ("python", call) with call = (target, args, kwargs,
    # result), or ("per call", None)
    specs: list[tuple] = field(default_factory=list)


class Tape:
    """One graph's tape (module doc): `tape(args)` -> outputs, or None where it cannot."""

    def __init__(self, run, inputs, outputs, shape, ran: _Ran, kept) -> None:
        self._run = run
        self._inputs = inputs
        self._outputs = outputs
        self._shape = shape  # the outputs' container (tuple, list), None for one value
        self._frame = ran.frame  # a replay's varying values, which its per-call entries read
        fallbacks = ran.fallbacks
        # per tape position: a launch's node called again (to raise its error), or None
        self._fallbacks = fallbacks
        self._kept = kept  # every tensor the tape's pointers reach
        self._modes = ran.modes  # grad mode and inference mode at the capture
        self.python_nodes = tuple(ran.python_nodes)
        self._lock = threading.Lock()
        # the inputs used where they are, for the launcher's check (`launcher.same_inputs`),
        # and the others
        self._native = launcher.module()  # a tape is made only where it is built
        self._same_inputs = self._native.same_inputs
        self._same = _same_table(inputs)
        self._layouts = _layout_check(self._same, self._same_inputs)
        self._others = [(k, entry) for k, entry in enumerate(inputs) if entry[0] != "same"]
        self._specs = ran.specs  # what each entry was made from, for `_rebind`
        self._patches = ran.patches
        # per fresh output (`_fresh_outputs`), the kept tensor whose layout a replay's has
        self._fresh = [how[0] for kind, how in outputs if kind == "fresh"]
        self._entries = ran.entries  # as the native tape was made from them
        self._reach: _Reach | None = None  # worked out at the first `_rebind`
        self._replays = 0  # since the capture or the last rebinding
        self.rebinds = 0
        self.python_calls = sum(1 for f in fallbacks if f is None)
        self.launches = len(fallbacks) - self.python_calls

    @classmethod
    def capture(
        cls, gm: torch.fx.GraphModule, args: Sequence[object], moved: set[int]
    ) -> tuple[Tape | str, object]:
        """Run `gm` on `args` node by node (its outputs are the call's), and make its tape:
        (tape, outputs), or (why, outputs) where the graph gets none (module doc). `moved`:
        the positions of the tensor arguments whose memory differed between the calls
        before this one."""
        native = launcher.module()
        nodes = list(gm.graph.nodes)
        written = {b for n in nodes for b in written_buffers(n)}
        output = next(n for n in nodes if n.op == "output")
        returned_nodes = set(output.all_input_nodes)
        env: dict[torch.fx.Node, object] = {}
        inputs = []
        why = "" if native is not None else "the native launcher is not built here"
        placeholders = [n for n in nodes if n.op == "placeholder"]
        varying = varying_values(gm)
        per_call = _per_call(gm, varying)
        taken: set[torch.fx.Node] = set()  # getitems whose parent's entry puts them in the frame
        try:
            why = cls._take_inputs(placeholders, args, moved, written, varying, env, inputs, why)
        except Exception as error:  # noqa: BLE001 - no node has run: the program runs the call
            return _failed(error), NOT_RUN
        ran = _Ran(modes=(torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        for node in nodes:
            if node.op in ("placeholder", "output"):
                continue
            if node.op == "get_attr":
                env[node] = attribute(gm, node.target)
                continue
            call_args = torch.fx.node.map_arg(node.args, env.__getitem__)
            call_kwargs = torch.fx.node.map_arg(node.kwargs, env.__getitem__)
            target = node.target
            if node in taken:  # its parent's entry puts it in the frame
                env[node] = call_args[0][call_args[1]]
                continue
            if node in per_call:
                env[node], owned = _own_static(node, target(*call_args, **call_kwargs), varying)
                if owned is None:
                    why = why or f"node {node.name} makes a value that overlaps itself"
                    owned = []
                ran.owned.extend(own for own, _ in owned)
                slots = {n: _Slot(n) if n in varying else env[n] for n in node.all_input_nodes}
                items = _taken_items(node, varying)
                taken.update(item for item, _ in items)
                entry = _per_call_entry(
                    node, target, slots, owned, ran.frame, node in varying, items
                )
                if isinstance(target, AppendAttention):
                    entry = _bound_append(node, target, env, varying, owned, items, entry, ran)
                ran.entries.append(entry)
                ran.fallbacks.append(None)
                ran.specs.append(("per call", None))
                ran.python_nodes.append(node.name)
                continue
            if target is operator.getitem or (
                isinstance(target, torch._ops.OpOverload) and target.is_view
            ):
                # made as the program makes it (an alias of its root where the program
                # makes one): the launches bound to the program's layouts take it
                alias = alias_of(node, returned_nodes)
                if alias is not None and not _through(node, alias.root, per_call):
                    env[node] = alias.make(env[alias.root])
                else:
                    env[node] = target(*call_args, **call_kwargs)
                continue
            recorded: list[tuple] = []
            watch = _Watch()
            if native is not None:
                try:
                    native.record(recorded)
                except RuntimeError:  # another thread is capturing: this node is a Python
                    why = why or "another thread captured at the same time"  # call, no tape
            try:
                with watch:
                    result = target(*call_args, **call_kwargs)
            finally:
                if native is not None:
                    native.record(None)
            env[node] = result
            if isinstance(target, (QuantizedMatmul, QuantizedEmbedding)):
                # the narrow copy its launch reads: kept, should the target quantize anew
                ran.narrow.append(target.parameter.weight)
            call = (target, call_args, call_kwargs, result)
            entry = _python_entry(*call)
            if len(recorded) == 1 and recorded[0][3] == 0 and not watch.computed:
                ran.entries.append(recorded[0][:3])  # the one launch it made, which ran
                ran.fallbacks.append(entry)
                ran.specs.append(("launch", recorded[0][:3], call))
            else:
                ran.entries.append(entry)
                ran.fallbacks.append(None)
                ran.specs.append(("python", call))
                ran.python_nodes.append(node.name)
        returned = torch.fx.node.map_arg(output.args[0], env.__getitem__)
        try:
            made = (
                (why, returned)
                if why
                else cls._make(
                    native, args, env, placeholders, output, inputs, ran, varying, per_call
                )
            )
        except Exception as error:  # noqa: BLE001 - the call's outputs are computed: no tape
            made = _failed(error), returned
        if varying and not isinstance(made[0], Tape):
            # The run put per-call nodes' static results in copies of the tape's, so an
            # output viewed from one lost its alias: the program runs the call again (a
            # graph with varying values writes nothing: `refusal`).
            return made[0], NOT_RUN
        return made

    @classmethod
    def _make(
        cls, native, args, env, placeholders, output, inputs, ran: _Ran, varying, per_call
    ) -> tuple[Tape | str, object]:
        """The tape from what the capture ran, or why there is none."""
        returned = torch.fx.node.map_arg(output.args[0], env.__getitem__)
        # the outputs as the graph returns them: a tuple, a list or one value
        shape = type(returned) if isinstance(returned, (list, tuple)) else None
        nodes = output.args[0] if shape is not None else [output.args[0]]
        # the values each call decides, and the per-call nodes' results as they came at the
        # capture: the tape holds none of them (the latter's static ones are `ran.owned`)
        held = {n for n in varying if n.op == "placeholder"} | per_call
        kept = [t for n, v in env.items() if n not in held for t in _tensors(v)]
        kept += ran.owned
        plan = cls._outputs(nodes, placeholders, env, varying, per_call, kept)
        given = {_storage(t) for p in placeholders for t in _tensors(env[p])}
        kept_nbytes = sum(
            {
                _storage(t): t.untyped_storage().nbytes() for t in kept if _storage(t) not in given
            }.values()
        )
        launches = sum(1 for f in ran.fallbacks if f is not None)
        if plan is None:
            why = "an output is an input's memory, another output's, a view of a varying value"
            return f"{why}, or overlaps itself", returned
        if kept_nbytes > MAX_KEPT_NBYTES:
            return f"its values take {kept_nbytes} bytes", returned
        plan, ran.patches = _fresh_outputs(plan, ran.specs, _python_held(ran, env, per_call))
        calls = len(ran.entries)
        if launches < MIN_LAUNCH_SHARE * max(1, calls):
            return f"{launches} of its {calls} calls are launches", returned
        if launches < MIN_LAUNCHES:
            return f"{launches} launches: the program costs less around so few", returned
        copied = sum(how.nbytes for kind, how in plan if kind == "copy")
        copied += sum(how[0].nbytes for kind, *how in inputs if kind == "copy")
        if copied > COPY_NBYTES_PER_LAUNCH * launches:
            return f"{copied} bytes to copy a call for {launches} launches", returned
        tape = cls(
            native.tape(ran.entries, ran.patches), inputs, plan, shape, ran, [*kept, *ran.narrow]
        )
        return tape, tape._returned(args, env)  # the kept tensors are the tape's: copies

    @staticmethod
    def _take_inputs(placeholders, args, moved, written, varying, env, inputs, why: str) -> str:
        """Each argument into `env`, and how a replay takes it into `inputs` (module doc);
        the reason the graph gets no tape, or `why` as it came."""
        for position, (node, arg) in enumerate(zip(placeholders, args)):
            if node in varying:  # each call's own, read by per-call nodes only
                env[node] = arg
                if isinstance(arg, torch.Tensor):
                    if type(arg) not in _PLAIN or not arg.is_cpu or arg.is_neg() or arg.is_conj():
                        why = why or f"input {node.name} is not a plain CPU tensor"
                    inputs.append(("varying", node, arg.dtype, arg.dim()))
                else:
                    inputs.append(("varying", node, None, None))
            elif isinstance(arg, torch.Tensor):
                if type(arg) not in _PLAIN or not arg.is_cpu or arg.is_neg() or arg.is_conj():
                    why = why or f"input {node.name} is not a plain CPU tensor"
                if position in moved and (
                    node in written
                    or torch._debug_has_internal_overlap(arg) != 0  # a stride of 0: no copy
                ):
                    # new memory each call, and written or overlapping: no copy
                    why = why or f"input {node.name} is new memory each call"
                if position in moved and not why:
                    own = torch.empty_strided(arg.shape, arg.stride(), dtype=arg.dtype)
                    env[node] = own.copy_(arg)
                    inputs.append(("copy", own))
                else:
                    env[node] = arg
                    # written inputs change each call; inference tensors keep no version
                    # (and cannot be written outside inference mode)
                    version = None if node in written or arg.is_inference() else arg._version
                    layout = (arg.data_ptr(), arg.dtype, arg.shape, arg.stride())
                    # a written input may be given in other memory later (`Tape._rebind`):
                    # its storage's address as recorded, None for the others
                    home = _storage(arg) if node in written else None
                    inputs.append(("same", arg, layout, version, home))
            else:
                env[node] = arg
                inputs.append(("value", arg))
        return why

    @staticmethod
    def _outputs(nodes, placeholders, env, varying, per_call, kept) -> list[tuple] | None:
        """How a replay returns each output: ("input", k), ("copy", kept tensor), ("frame",
        node) for a varying value, or ("value", v); None where an output shares memory it
        must not (module doc)."""
        inputs = [env[p] for p in placeholders]
        input_storages = {_storage(t) for t in inputs if isinstance(t, torch.Tensor)}
        kept_storages = {_storage(t) for t in kept}
        plan, seen = [], set()
        for node in nodes:
            value = env[node] if isinstance(node, torch.fx.Node) else node
            if isinstance(node, torch.fx.Node) and node in varying and node.op != "placeholder":
                # the call's own result: new memory each call, unless it is the tape's
                if any(_storage(t) in kept_storages for t in _tensors(value)):
                    return None
                plan.append(("frame", node))
                continue
            if isinstance(node, torch.fx.Node) and _viewed_from(node, varying | per_call):
                return None  # a copy of it would lose the alias (module doc)
            if not isinstance(value, torch.Tensor):
                plan.append(("value", value))
                continue
            position = next((k for k, t in enumerate(inputs) if t is value), None)
            if position is not None:
                plan.append(("input", position))
                continue
            storage = _storage(value)
            overlapping = torch._debug_has_internal_overlap(value) != 0  # no copy of it
            if storage in input_storages or storage in seen or overlapping:
                return None
            seen.add(storage)
            plan.append(("copy", value))
        return plan

    def __call__(self, args: Sequence[object]) -> object | None:
        if not self._lock.acquire(blocking=False):
            return None  # another thread is replaying: this one runs the program
        try:
            modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
            if modes != self._modes or len(args) != len(self._inputs):
                return None
            copies, moves, frame = [], [], self._frame
            # the inputs used where they are checked in C; any other, or all where one of
            # those differs (a miss, or a written input to move onto), here
            layouts = self._layouts
            checked = self._same_inputs(args, self._same, layouts is None) < 0
            stricter = checked and layouts is not None and not layouts()
            checked = checked and not stricter
            for position, (kind, *how) in self._others if checked else enumerate(self._inputs):
                arg = args[position]
                if kind == "varying":  # Dynamo's guards hold its sizes to the graph's
                    node, dtype, dim = how
                    if dtype is None:
                        if type(arg) is not int:
                            return None
                    elif not (
                        type(arg) in _PLAIN
                        and arg.dtype == dtype
                        and arg.dim() == dim
                        and arg.is_cpu
                        and not arg.is_neg()
                        and not arg.is_conj()
                    ):
                        return None
                    frame[node] = arg
                elif kind == "copy":
                    own = how[0]
                    if not (
                        type(arg) in _PLAIN
                        and arg.dtype == own.dtype
                        and arg.shape == own.shape
                        and arg.is_cpu
                        and not arg.is_neg()
                        and not arg.is_conj()
                    ):
                        return None
                    copies.append((own, arg))
                elif kind == "same":
                    tensor, layout, version, home = how
                    if arg is tensor:  # the capture's tensor: as it was?
                        if (
                            arg.data_ptr() == layout[0]
                            and arg.dtype is layout[1]
                            and arg.shape == layout[2]
                            and arg.stride() == layout[3]
                            and not arg.is_neg()  # `.data` may have been given a view
                            and not arg.is_conj()
                            and (version is None or arg._version == version)
                        ):
                            continue
                        return None
                    if (
                        type(arg) not in _PLAIN
                        or (arg.dtype, arg.shape, arg.stride()) != layout[1:]
                        or not arg.is_cpu
                        or arg.is_neg()
                        or arg.is_conj()
                        or (version is not None and arg._version != version)
                    ):
                        return None
                    if arg.data_ptr() != layout[0]:
                        if home is None:
                            return None
                        moves.append((position, arg))
                elif arg != how[0]:
                    return None
            if moves and not self._rebind(moves, args):
                return None
            if stricter and not moves:  # as recorded, by the rule: checked as they are now
                self._layouts = _layout_check(self._same, self._same_inputs)
            self._replays += 1
            for own, arg in copies:
                own.copy_(arg)
            made = [_empty_strided(t.shape, t.stride(), dtype=t.dtype) for t in self._fresh]
            failed = self._run(*[t.data_ptr() for t in made])
            if failed is not None:
                position, code = failed
                self._fallbacks[position]()  # the node again: it raises the kernel's error
                raise RuntimeError(f"memopt: a replayed kernel returned error code {code}")
            return self._returned(args, frame, made)
        finally:
            self._frame.clear()
            self._lock.release()

    def _rebind(self, moves: list[tuple[int, torch.Tensor]], args: Sequence[object]) -> bool:
        """The tape moved onto written inputs given in other memory, of the same layout (a
        static KV cache made anew for the next `generate()`): each launch's pointers into
        such an input's memory moved by as much as the input, each Python entry's tensors
        of it made again as the same views of the new one. False, and nothing moved, where
        the tape cannot: it replayed fewer than REBIND_AFTER calls on its memory as it is
        (inputs that move every call), two of its inputs shared
        memory where one is written, a new input shares memory with another argument or
        with the tape's own or sits at another offset in its storage (`as_strided` counts
        from the storage's start), or a tensor of an input reaches beyond the input or views
        it as another dtype."""
        if self._replays < REBIND_AFTER:
            return False
        if self._reach is None:
            try:
                self._reach = _Reach.of(self._inputs, self._specs, self._kept)
            except Exception as error:  # noqa: BLE001 - a bug of the tape's: no moves
                warnings.warn(
                    f"memopt: a tape cannot move onto new inputs ({type(error).__name__}: "
                    f"{error}); their calls run the program",
                    stacklevel=4,
                )
                self._reach = _Reach(False, set(), set(), [], [], [])
        reach, positions = self._reach, {position for position, _ in moves}
        if not reach.possible:
            return False
        taken = {
            _storage(a)
            for k, a in enumerate(args)
            if isinstance(a, torch.Tensor) and k not in positions and k not in reach.read
        }
        new_storages = {_storage(new) for _, new in moves}
        if len(new_storages) < len(moves) or new_storages & (taken | reach.fixed):
            return False
        shifts = {}  # the old input's storage: (old input, its address, new input, extent)
        for position, new in moves:
            _, old, layout, _, home = self._inputs[position]
            if new.data_ptr() - _storage(new) != layout[0] - home:
                # `as_strided` offsets count from the storage's start: the same views of
                # the new input need it at the same place in its storage
                return False
            extent = _span(layout[0], layout[2], layout[3], layout[1].itemsize)
            shifts[home] = (old, layout[0], new, *extent)
        made: dict[int, torch.Tensor] = {}  # by id: a tensor used twice is made once

        def moved(value: object) -> object:
            if not isinstance(value, torch.Tensor):
                return value
            shift = shifts.get(_storage(value))
            if shift is None:
                return value
            old, address, new, low, high = shift
            if value is old:
                return new
            if id(value) not in made:
                start, end = _extent(value)
                if value.dtype != new.dtype or (start < end and not low <= start < end <= high):
                    raise _CannotRebind
                offset = (value.data_ptr() - address) // value.element_size()
                made[id(value)] = new.as_strided(
                    value.shape, value.stride(), new.storage_offset() + offset
                )
            return made[id(value)]

        specs, entries, fallbacks = list(self._specs), list(self._entries), list(self._fallbacks)
        try:
            for index in reach.calls:
                kind, *rest = specs[index]
                call = torch.fx.node.map_aggregate(rest[-1], moved)
                if kind == "launch":
                    specs[index] = ("launch", rest[0], call)
                    fallbacks[index] = _python_entry(*call)
                else:
                    specs[index] = ("python", call)
                    entries[index] = _python_entry(*call)
            kept = list(self._kept)
            for index in reach.kept:
                kept[index] = moved(kept[index])
        except (_CannotRebind, RuntimeError):  # RuntimeError: a view the new memory lacks
            return False
        addresses = {position: new.data_ptr() for position, new in moves}
        for index, pointer, position, offset in reach.pointers:
            if position in addresses:
                address, pointers, scalars = entries[index]
                pointers = (
                    *pointers[:pointer],
                    addresses[position] + offset,
                    *pointers[pointer + 1 :],
                )
                entries[index] = (address, pointers, scalars)
        self._run = self._native.tape(entries, self._patches)
        self._specs, self._entries, self._fallbacks, self._kept = specs, entries, fallbacks, kept
        for position, new in moves:
            kind, _, _, version, _ = self._inputs[position]
            layout = (new.data_ptr(), new.dtype, new.shape, new.stride())
            self._inputs[position] = (kind, new, layout, version, _storage(new))
        self._same = _same_table(self._inputs)
        self._layouts = _layout_check(self._same, self._same_inputs)
        self._replays = 0
        self.rebinds += 1
        return True

    def _returned(
        self, args: Sequence[object], frame: dict, made: list[torch.Tensor] | None = None
    ) -> object:
        """The outputs; `made`: the fresh outputs a replay allocated, None at the capture
        (where the kept ones hold the values: copied)."""
        values = []
        for kind, how in self._outputs:
            if kind == "fresh":
                kind, how = ("copy", how[0]) if made is None else ("value", made[how[1]])
            values.append(
                args[how]
                if kind == "input"
                else _empty_strided(how.shape, how.stride(), dtype=how.dtype).copy_(how)
                if kind == "copy"
                else frame[how]
                if kind == "frame"
                else how
            )
        return values[0] if self._shape is None else self._shape(values)
