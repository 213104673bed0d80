"""FusedKernel: a generated kernel as an fx call target.

The fusion pass replaces a group of nodes with one `call_function` node whose target is a
FusedKernel. It carries the Kernel IR, models its own cost (`memopt_cost`), answers fake
tensors with the group's recorded output metadata (so the pipeline's verification can
re-propagate through it), and, on real tensors, allocates the outputs in the layouts eager
would give them and runs the kernel on the configured backend.
"""

from __future__ import annotations

import functools
import operator
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import sympy
import torch
import torch.fx
from torch._guards import active_fake_mode
from torch._subclasses.fake_tensor import FakeTensor

from memopt.backends.memory import KEEP_NBYTES
from memopt.backends.registry import FALLBACK, backend_for, get_backend
from memopt.backends.triton.sectors import moves_sectors, strided_buffers
from memopt.compiler.aten_ops import returns_fresh_memory
from memopt.compiler.cost import Cost, read_bytes, sector_nbytes
from memopt.compiler.graph import tensor_meta
from memopt.compiler.kernel_ir import SIZES_KEPT, layout_function
from memopt.compiler.lower import Lowered

_FAKE = torch._C._TorchDispatchModeKey.FAKE
# torch.empty_strided for the CPU without the Python argument parsing (0.5 us, not 1.1 us a
# call); TorchInductor's generated code allocates with it too. Absent: torch.empty_strided.
_EMPTY_STRIDED_CPU = getattr(torch._C._dynamo.guards, "_empty_strided_cpu", None)
_CPU = torch.device("cpu")
_PARAMETER = torch.nn.Parameter


class _Launch(NamedTuple):
    """A FusedKernel's calls on one device at one set of sizes, worked out on the first:
    how to get each output, and the compiled kernel bound to the sizes (None when every
    output is empty)."""

    # Per output: shape, strides, dtype, the input whose memory it may take when that input
    # is donated (or None), and a call that allocates it: the backend's allocator for a
    # large CPU output, else fresh memory.
    outputs: tuple[
        tuple[tuple[int, ...], tuple[int, ...], torch.dtype, int | None, Callable[[], object]],
        ...,
    ]
    run: Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], None] | None


class FusedKernel:
    """Callable target of a fused node: `outputs = fused(*inputs)` (a tuple of tensors)."""

    def __init__(
        self,
        lowered: Lowered,
        backend: str,
        member_names: Sequence[str],
        member_ops: Sequence[str],
        fake_outputs: Sequence[object],
    ) -> None:
        self.kernel = lowered.kernel
        self.backend = backend
        self.__name__ = lowered.kernel.name
        self.memopt_name = f"memopt.{lowered.kernel.name}"
        self.memopt_kind = lowered.kernel.kind
        self.memopt_nodes = tuple(member_names)
        self.memopt_ops = tuple(member_ops)
        self.memopt_source_path: str | None = None
        self.flops = lowered.flops
        self.gather_positions = frozenset(
            k for k, node in enumerate(lowered.input_nodes) if node in lowered.gather_sources
        )
        # Gathers of one table in the kernel: each looks up its own elements.
        self.gathers_at = {
            k: lowered.gathers_per_source[lowered.input_nodes[k]] for k in self.gather_positions
        }
        self.fake_outputs = tuple(fake_outputs)
        self._compiled: dict[str, object] = {}
        self._symbol_slots = self._find_symbol_slots()
        # By (device, *sizes): a kernel with size symbols keeps one a distinct size, at most
        # SIZES_KEPT, then forgets them (a dynamic KV cache's decode step meets a new length
        # every step); the compiled function of the sizes that gives the outputs' layouts.
        self._launches: dict[tuple[object, ...], _Launch] = {}
        self._layout_of: Callable | None = None
        # What a call of plain CPU tensors runs, once the first such call has worked it
        # out (`_fast_call`); None until then, and for kernels with size symbols or
        # destinations. Setting either attribute below resets it.
        self._fast: Callable[[Sequence[torch.Tensor]], tuple[torch.Tensor, ...]] | None = None
        # Input positions whose tensors nothing reads after this kernel (set by the executor,
        # which sees the whole graph): an output may be written over one of them instead of
        # into fresh memory, when the backend says that is safe (its `in_place` map).
        self.donated_inputs: frozenset[int] = frozenset()
        # Outputs stored into a tensor the caller passes (the inplace pass: an input the
        # graph updates): output position -> argument position. An argument past the
        # kernel's inputs is a destination only, never read. The call returns the
        # destination itself for such an output.
        self.destinations: dict[int, int] = {}

    def __setattr__(self, name: str, value: object) -> None:
        if name in ("donated_inputs", "destinations"):
            object.__setattr__(self, "_fast", None)
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return (
            f"FusedKernel({self.kernel.name}, {self.kernel.kind}, {len(self.memopt_nodes)} nodes)"
        )

    # -- cost -------------------------------------------------------------------------

    def memopt_cost(self, node: torch.fx.Node) -> Cost:
        """Inputs read once (gathered tables: at most one element per lookup), outputs written once.

        On Triton (a GPU's memory, in 32-byte sectors) a buffer whose neighbouring lanes
        are more than one element apart, where the renderer cannot tile it contiguous,
        costs its sectors (`cost.sector_nbytes`); every other buffer costs its bytes."""
        strided = self._strided_buffers()
        inputs = node.args[: len(self.kernel.inputs)]  # past them: destinations, not read
        direct = [a for k, a in enumerate(inputs) if k not in self.gather_positions]
        charged = {}
        for buffer, arg in zip(self.kernel.inputs, inputs):
            meta = tensor_meta(arg) if buffer.name in strided else None
            if meta is not None:
                stride = strided[buffer.name]
                charged[arg] = sector_nbytes(meta.shape, meta.stride, meta.itemsize, stride)
        read = read_bytes(node, direct, charged or None)
        lookups = sympy.Mul(*self.kernel.ranges) * sympy.Mul(*self.kernel.reduction_ranges)
        for k in self.gather_positions:
            meta = tensor_meta(node.args[k])
            read += sympy.Min(meta.touched_nbytes, self.gathers_at[k] * lookups * meta.itemsize)
        write = sympy.Add(
            *(
                sector_nbytes(b.shape, b.stride, b.dtype.itemsize, strided[b.name])
                if b.name in strided
                else sympy.Mul(*b.shape) * b.dtype.itemsize
                for b in self.kernel.outputs
            )
        )
        return Cost(read=read, write=write, flops=self.flops)

    def _strided_buffers(self) -> dict[str, sympy.Expr]:
        """The buffers charged in sectors (strided_buffers), when the kernel runs on a
        backend that moves them, worked out once: the kernel and its backend never change."""
        strided = getattr(self, "_strided", None)
        if strided is None:
            value = next((v for v in self.fake_outputs if isinstance(v, torch.Tensor)), None)
            device = value.device.type if value is not None else "cpu"
            # The rule is the Triton backend's own (its lanes and tiles: sectors.py).
            on_gpu_memory = moves_sectors(backend_for(self.backend, device))
            strided = strided_buffers(self.kernel) if on_gpu_memory else {}
            self._strided = strided
        return strided

    def triton_source_path(self) -> str | None:
        """The kernel's Triton source, rendered into the cache (for reports); None if it has none.

        Rendering is cheap and needs no GPU; a kernel Triton cannot express returns None.
        """
        if self.memopt_source_path is None:
            try:
                self.memopt_source_path = str(get_backend("triton").source_file(self.kernel))
            except Exception:  # noqa: BLE001 - no triton, or an op it cannot render
                return None
        return self.memopt_source_path

    # -- running ----------------------------------------------------------------------

    def _find_symbol_slots(self) -> dict[str, tuple[int, str, int]]:
        """Where each size symbol can be read off the inputs: (input, "shape"|"stride", dim)."""
        slots: dict[str, tuple[int, str, int]] = {}
        for k, buffer in enumerate(self.kernel.inputs):
            for kind, exprs in (("shape", buffer.shape), ("stride", buffer.stride)):
                for dim, expr in enumerate(exprs):
                    if isinstance(expr, sympy.Symbol) and expr.name not in slots:
                        slots[expr.name] = (k, kind, dim)
        return slots

    def _sizes(self, inputs: Sequence[torch.Tensor]) -> dict[str, int]:
        sizes = {}
        for symbol in self.kernel.size_symbols:
            k, kind, dim = self._symbol_slots[symbol.name]
            tensor = inputs[k]
            sizes[symbol.name] = tensor.shape[dim] if kind == "shape" else tensor.stride(dim)
        return sizes

    def _backend_for(self, device: torch.device) -> str:
        return backend_for(self.backend, device.type).name

    def prefetch(self, device: torch.device) -> None:
        """Start compiling this kernel for `device` in the background, where the backend can
        (the C++ backend: its compiler runs in another process); the first call waits for it."""
        backend = backend_for(self.backend, device.type)
        if backend.prefetch is not None and backend.name not in self._compiled:
            try:
                backend.prefetch(self.kernel)
            except Exception:  # noqa: BLE001 - the first call compiles again, and falls back
                pass  # to the reference backend with a warning if that fails too (_runner)

    def _runner(self, backend: str):
        runner = self._compiled.get(backend)
        if runner is None:
            try:
                runner = get_backend(backend).compile(self.kernel)
            except Exception as error:  # noqa: BLE001 - any compiler failure falls back, visibly
                if backend == FALLBACK:
                    raise
                warnings.warn(
                    f"memopt: kernel {self.kernel.name} failed to compile for {backend} "
                    f"({type(error).__name__}: {error}); running it on the reference backend",
                    stacklevel=3,
                )
                runner = get_backend(FALLBACK).compile(self.kernel)
            self._compiled[backend] = runner
            path = getattr(runner, "source_path", None)
            if path:
                self.memopt_source_path = str(path)
        return runner

    def program_call(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`__call__` from the executor's program (runtime/program.py), which checks once a
        call that no fake mode is active; its tensors are the graph's (plain tensors, the
        subclasses unwrapped by AOTAutograd, on the one device Dynamo guards): the launch
        worked out on the first call runs without `__call__`'s per-call checks (3 us)."""
        fast = self._fast
        if fast is not None:
            return fast(inputs)
        return self(*inputs)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # The common call (plain CPU tensors, outside a fake mode, at the one set of sizes a
        # kernel without size symbols has) goes straight to the launch worked out on the
        # first (`_fast_call`); the checks are C-level calls, not `active_fake_mode()`.
        fast = self._fast
        if fast is not None and torch._C._get_dispatch_mode(_FAKE) is None:
            for t in inputs:
                if type(t) is not torch.Tensor and type(t) is not _PARAMETER:
                    break
            else:
                if not inputs or inputs[0].is_cpu:
                    return fast(inputs)
        return self._call(inputs)

    def _call(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        plain = torch._C._get_dispatch_mode(_FAKE) is None
        for t in inputs:
            if type(t) is not torch.Tensor:
                plain = False
        if not plain and (
            active_fake_mode() is not None or any(isinstance(t, FakeTensor) for t in inputs)
        ):
            return self.fake_outputs  # verification re-propagating metadata
        device = inputs[0].device if inputs else _CPU
        if self._symbol_slots:
            sizes = self._sizes(inputs)
            launch = self._launches.get((device, *sizes.values()))
        else:
            sizes = {}
            launch = self._launches.get(device)
        if launch is None:
            launch = self._launch(device, sizes)
        if self._fast is None and device.type == "cpu" and not self._symbol_slots:
            if not self.destinations:
                self._fast = _fast_call(launch, self.donated_inputs)
        if self.destinations:
            return self._run_into_destinations(inputs, launch)
        return _outputs(launch, inputs, self.donated_inputs)

    def _run_into_destinations(
        self, args: Sequence[torch.Tensor], launch: _Launch
    ) -> tuple[torch.Tensor, ...]:
        """A call whose outputs go (some of them) into tensors it was given. A destination
        in another layout than the kernel's gets the result through a copy."""
        inputs = args[: len(self.kernel.inputs)]
        outputs, copies = [], []
        for k, (shape, stride, dtype, donor, allocate) in enumerate(launch.outputs):
            position = self.destinations.get(k)
            if position is None:
                reuse = donor in self.donated_inputs and _reusable(
                    inputs[donor], *launch.outputs[k][:3]
                )
                outputs.append(inputs[donor] if reuse else allocate())
                continue
            target = args[position]
            if target.dtype == dtype and tuple(target.shape) == shape and target.stride() == stride:
                outputs.append(target)
            else:
                outputs.append(allocate())
                copies.append((target, outputs[-1]))
        if launch.run is not None:
            launch.run(inputs, outputs)
        for target, result in copies:
            target.copy_(result)
        return tuple(
            args[self.destinations[k]] if k in self.destinations else out
            for k, out in enumerate(outputs)
        )

    def _launch(self, device: torch.device, sizes: dict[str, int]) -> _Launch:
        """What every call on `device` at `sizes` does alike, worked out on the first."""
        layouts = self._output_layouts(sizes)
        runner = run = None
        if any(0 not in shape for shape, _ in layouts):  # an empty output needs no kernel
            runner = self._runner(self._backend_for(device))
            bind = getattr(runner, "bind", None)
            # Outputs come from the launch's own allocations (or donated inputs checked by
            # _reusable) in the kernel's layouts: the kernel need not check them again.
            run = (
                bind(sizes, outputs_checked=True)
                if bind is not None
                else functools.partial(_run, runner, sizes)
            )
        in_place = getattr(runner, "in_place", None) or {}
        allocate = getattr(runner, "allocate", None) if device.type == "cpu" else None
        outputs = []
        for k, (b, (shape, stride)) in enumerate(zip(self.kernel.outputs, layouts)):
            shape, stride, dtype = tuple(shape), tuple(stride), b.dtype
            extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
            if allocate is not None and extent * dtype.itemsize >= KEEP_NBYTES:
                fresh = functools.partial(allocate, k, shape, stride, dtype)
            elif device.type == "cpu" and _EMPTY_STRIDED_CPU is not None:
                fresh = functools.partial(_EMPTY_STRIDED_CPU, shape, stride, dtype)
            else:
                fresh = functools.partial(
                    torch.empty_strided, shape, stride, dtype=dtype, device=device
                )
            outputs.append((shape, stride, dtype, in_place.get(k), fresh))
        launch = _Launch(outputs=tuple(outputs), run=run)
        if len(self._launches) >= SIZES_KEPT:
            self._launches.clear()
        self._launches[(device, *sizes.values()) if self._symbol_slots else device] = launch
        return launch

    def _output_layouts(
        self, sizes: dict[str, int]
    ) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Each output's (shape, strides) at `sizes` (worked out once per launch, `_launch`)."""
        if self._layout_of is None:
            self._layout_of = layout_function(self.kernel.outputs)
        return self._layout_of(sizes)


def _outputs(
    launch: _Launch, inputs: Sequence[torch.Tensor], donated: frozenset[int]
) -> tuple[torch.Tensor, ...]:
    """Allocate the outputs and run the launch. An input nothing reads afterwards may take
    an output in place of fresh memory, which costs page faults on first touch (more than a
    pointwise kernel's own time); a backend may also hand out memory of its own
    (CppKernel.allocate)."""
    outputs = []
    for shape, stride, dtype, donor, allocate in launch.outputs:
        if donor in donated and _reusable(inputs[donor], shape, stride, dtype):
            outputs.append(inputs[donor])
        else:
            outputs.append(allocate())
    if launch.run is not None:
        launch.run(inputs, outputs)
    return tuple(outputs)


def _fast_call(
    launch: _Launch, donated: frozenset[int]
) -> Callable[[Sequence[torch.Tensor]], tuple[torch.Tensor, ...]]:
    """`_outputs` for one launch, specialised: a single output with no input to take over
    (the usual kernel) is one allocation and one run (1 us a call less than `_outputs`)."""
    run = launch.run
    if run is not None and len(launch.outputs) == 1:
        donor, allocate = launch.outputs[0][3:]
        if donor is None or donor not in donated:

            def single(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
                output = allocate()
                run(inputs, (output,))
                return (output,)

            return single
    return functools.partial(_outputs, launch, donated=donated)


def _run(runner: object, sizes: dict[str, int], inputs, outputs) -> None:
    runner(inputs, outputs, sizes)


def _reusable(
    tensor: torch.Tensor, shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype
) -> bool:
    """The tensor owns its whole storage and has exactly the output's layout."""
    return (
        tensor.dtype == dtype
        and tensor._base is None
        and tensor.storage_offset() == 0
        and tuple(tensor.shape) == shape
        and tensor.stride() == stride
        and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    )


def prefetch_kernels(gm: torch.fx.GraphModule) -> None:
    """Start compiling every FusedKernel of `gm` for the device of the graph's inputs, side
    by side in the background, so that the compiler runs while Dynamo finishes the graph
    and a graph's kernels build in parallel rather than one by one at their first calls."""
    device = next(
        (
            n.meta["val"].device
            for n in gm.graph.nodes
            if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
        ),
        torch.device("cpu"),
    )
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, FusedKernel):
            node.target.prefetch(device)


def mark_donated_inputs(gm: torch.fx.GraphModule) -> None:
    """Tell each FusedKernel of `gm` which of its inputs nothing reads after it.

    An input is donated when its node's only user is the kernel (which reads it through
    one argument) and the node's tensor owns fresh memory no other value aliases: the
    output of another FusedKernel, or of an ATen op that returns new tensors (no view, no
    alias annotation, no mutation). Graph inputs and graph outputs are never donated.
    """
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, FusedKernel):
            node.target.donated_inputs = frozenset(
                k
                for k, arg in enumerate(node.args)
                if isinstance(arg, torch.fx.Node)
                and set(arg.users) == {node}
                and node.args.count(arg) == 1
                and arg not in node.kwargs.values()
                and owns_fresh_memory(arg)
            )


def owns_fresh_memory(node: torch.fx.Node) -> bool:
    """The node's tensor is memory of its own that no other value aliases: an output of a
    FusedKernel, of a call target that says so (`memopt_fresh`), or of an ATen op that
    returns new tensors (no view, no alias annotation, no mutation)."""
    if node.op != "call_function":
        return False
    if getattr(node.target, "memopt_fresh", False):
        return True
    if node.target is operator.getitem:
        source = node.args[0]
        return isinstance(source, torch.fx.Node) and isinstance(source.target, FusedKernel)
    return returns_fresh_memory(node)
