"""The executor: runs an optimized graph and keeps eager's contract on its outputs.

The optimized graph's nodes are ATen ops and library calls (matmul, convolution, the
fused ATen attention ops) and the passes' call targets: FusedKernel (a generated kernel,
compiled on first call by the backend it runs on, runtime/kernels.py) and the backends'
attention kernels. The graph module's own code calls them in order; the executor adds
what eager's contract needs around it (outputs in eager's layouts, the check against
the unoptimized graph) and, once per graph, tells each FusedKernel which inputs it may
write over and starts its compile in the background.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

import sympy
import torch
import torch.fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from memopt.backends.runtime.extern import (
    describe_libraries,
    plan_library_calls,
    point_libraries,
)
from memopt.backends.runtime.kernels import mark_donated_inputs, prefetch_kernels
from memopt.backends.runtime.program import straight_line
from memopt.backends.runtime.tape import (
    CAPTURE_AFTER,
    CAPTURES,
    MISSES,
    NOT_RUN,
    Tape,
    refusal,
)
from memopt.backends.runtime.timing import _ACTIVE, active_timer
from memopt.compiler.graph import META_KEY, TensorMeta, evaluate, tensor_meta

# Whether plain calls of a graph replay a tape of its launches after CAPTURE_AFTER calls
# (runtime/tape.py); False runs the program on every call.
REPLAY = True


def output_nodes(gm: torch.fx.GraphModule) -> list[object]:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = output.args[0]
    return list(values) if isinstance(values, (list, tuple)) else [values]


def output_layouts(gm: torch.fx.GraphModule) -> list[TensorMeta | None]:
    return [tensor_meta(n) if isinstance(n, torch.fx.Node) else None for n in output_nodes(gm)]


def bind_symbols(gm: torch.fx.GraphModule, args: Sequence[object]) -> dict[sympy.Symbol, int]:
    """Values of the symbols in the graph's input sizes, read off the actual arguments."""
    bindings: dict[sympy.Symbol, int] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, args):
        meta = node.meta.get(META_KEY)
        if isinstance(meta, TensorMeta) and isinstance(value, torch.Tensor):
            for expr, actual in zip((*meta.shape, *meta.stride), (*value.shape, *value.stride())):
                if isinstance(expr, sympy.Symbol):
                    bindings[expr] = int(actual)
        elif isinstance(value, (int, torch.SymInt)) and "val" in node.meta:
            expr = node.meta["val"]
            if isinstance(expr, torch.SymInt) and isinstance(expr.node.expr, sympy.Symbol):
                bindings[expr.node.expr] = int(value)
    return bindings


class CompiledGraph:
    """A callable over the optimized graph, as AOTAutograd's compilers must return.

    - Outputs whose layout a pass changed are copied back into eager's layout.
    - With a `reference` (check=True), the first call also runs the unoptimized graph and
      compares; on a mismatch it warns and runs the unoptimized graph from then on.
    """

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        name: str,
        eager_layouts: list[TensorMeta | None],
        reference: torch.fx.GraphModule | None = None,
        cpu_gemm: str = "aten",
        cpu_gemv: str = "aten",
        cpu_attention: str = "aten",
    ) -> None:
        self.gm = gm
        self.name = name
        self.reference = reference
        # Boxed: AOTAutograd passes the arguments as one list. An instance attribute, so that
        # the wrappers Dynamo puts around backward compilers (functools.wraps) keep it.
        self._boxed_call = True
        final = output_layouts(gm)
        self.restride = [
            eager
            if eager is not None and mine is not None and eager.stride != mine.stride
            else None
            for eager, mine in zip(eager_layouts, final)
        ]
        self.any_restride = any(r is not None for r in self.restride)
        # Nothing to do around the graph's own code: no check pending, no output to restride.
        self._plain = reference is None and not self.any_restride
        mark_donated_inputs(gm)
        # Before the kernel compiler starts: cpu_gemm "auto" may time the GEMM libraries.
        # Recompiles the graph's code: its forward is read after.
        libraries = (cpu_gemm, cpu_gemv, cpu_attention)
        plan_library_calls(gm, *libraries)
        if reference is not None and point_libraries(reference, *libraries):
            # The check compares memopt's passes, not libraries: the unoptimized graph runs
            # its GEMMs and attention where the optimized one does (they sum in another order).
            reference.recompile()
        self.libraries = describe_libraries(gm, *libraries)  # for verbose output
        prefetch_kernels(gm)
        self._forward = _compiled_forward(gm)
        # A plain call's runner (`_replay`): counts the calls before the tape's capture, then
        # replays it (runtime/tape.py); None for graphs that get no tape.
        self._calls = self._misses = self._captures = 0
        self._addresses: list[object] | None = None  # the tensor arguments' memory, so far
        self._moved: set[int] = set()  # positions whose memory differed between calls
        self._tape: Tape | None = None
        # why this graph has no tape (the last capture's reason), for verbose output
        self.no_tape = "replay is off (executor.REPLAY)" if not REPLAY else refusal(gm)
        self._replay = self._before_tape if self.no_tape is None else None
        self.verbose = False  # say what each capture made (set by the Dynamo backend)

    def __getstate__(self) -> dict:
        """A copy counts its calls again and makes a tape of its own (a tape's pointers are
        the original's memory)."""
        state = dict(self.__dict__)
        state.update(_tape=None, _calls=0, _misses=0, _captures=0, _addresses=None, _moved=set())
        state["_replay"] = "before" if self._replay is not None or self._tape is not None else None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._replay == "before":
            self._replay = self._before_tape

    def __call__(self, *args: object) -> list[object]:
        # AOTAutograd calls compiled graphs boxed (one list it may free) on most paths and
        # unboxed on some; graph inputs are tensors and ints, never lists, so both are clear.
        if len(args) == 1 and type(args[0]) is list:
            args = args[0]
        if self._plain and not _ACTIVE:  # no check pending, no restride, no timer
            replay = self._replay
            if replay is not None:
                return replay(args)
            # forward, not __call__: a graph module has no hooks, and nn.Module's call
            # machinery costs microseconds on every call.
            return self._forward(*args)
        return self._run(list(args))

    def _before_tape(self, args: Sequence[object]) -> list[object]:
        """A plain call before the tape: the program, and on the CAPTURE_AFTER + 1st call
        the capture, which runs the graph for this call and makes its tape (or finds it
        gets none: then the program runs from here on)."""
        self._calls += 1
        addresses = [a.data_ptr() if isinstance(a, torch.Tensor) else None for a in args]
        if self._addresses is not None:
            self._moved |= {k for k, (a, b) in enumerate(zip(addresses, self._addresses)) if a != b}
        self._addresses = addresses
        if self._calls <= CAPTURE_AFTER:
            return self._forward(*args)
        self._replay = None
        self._captures += 1
        try:
            tape, outputs = Tape.capture(self.gm, args, self._moved)
        except BaseException:  # the graph's own error (as the program raises it): count anew
            self._calls, self._addresses, self._moved = 0, None, set()
            self._replay = self._before_tape if self._captures < CAPTURES else None
            raise
        if isinstance(tape, Tape):
            self._tape, self.no_tape = tape, None
            self._replay = self._from_tape
            said = f"a tape of {tape.launches} launches and {tape.python_calls} Python calls"
        else:
            self.no_tape = f"no tape: {tape}"
            said = self.no_tape
        if self.verbose:
            print(f"memopt: {self.name} graph, call {self._calls}: {said}", file=sys.stderr)
        return self._forward(*args) if outputs is NOT_RUN else outputs

    def _from_tape(self, args: Sequence[object]) -> list[object]:
        outputs = self._tape(args)
        if outputs is not None:
            self._misses = 0
            return outputs
        self._misses += 1
        if self._misses >= MISSES:  # these arguments keep differing from the tape's: count
            self._tape = None  # the calls again for a new one, if captures are left
            self._calls = self._misses = 0
            self._addresses, self._moved = None, set()
            self._replay = self._before_tape if self._captures < CAPTURES else None
        return self._forward(*args)

    def _run(self, args: list[object]) -> list[object]:
        if self.reference is not None:
            return self._checked_call(args)
        timer = active_timer()
        if timer is not None:  # memopt.profile: every kernel timed, node by node
            outputs = list(timer.run(self.gm, self.name, args))
        else:
            outputs = list(self._forward(*args))
        if not self.any_restride:
            return outputs
        bindings = bind_symbols(self.gm, args)
        for index, layout in enumerate(self.restride):
            if layout is not None and isinstance(outputs[index], torch.Tensor):
                outputs[index] = _in_layout(outputs[index], layout, bindings)
        return outputs

    def _checked_call(self, args: list[object]) -> list[object]:
        reference, self.reference = self.reference, None
        self._plain = not self.any_restride
        saved_args = [_copy(a) for a in args]
        with torch.random.fork_rng(devices=[]):
            expected = reference(*saved_args)
        actual = self._run(args)
        for index, (want, got) in enumerate(zip(expected, actual)):
            if isinstance(want, torch.Tensor):
                try:
                    torch.testing.assert_close(got, want, equal_nan=True)
                except AssertionError as error:
                    first = str(error).strip().splitlines()[0]
                    warnings.warn(
                        f"memopt: check failed on {self.name} graph, output {index}: {first}; "
                        "running this graph unoptimized (ATen) from now on",
                        stacklevel=2,
                    )
                    print(f"memopt: check failed on {self.name} graph: {first}", file=sys.stderr)
                    self.gm = reference
                    self._tape = self._replay = None
                    # fx's own forward: nothing of the optimized path runs any more
                    self._forward = _compiled_forward(reference, program=False)
                    self.any_restride = False
                    self._plain = True
                    return list(expected)
        return actual


def _compiled_forward(gm: torch.fx.GraphModule, program: bool = True):
    """The graph as straight-line Python (runtime/program.py), or where that cannot run it,
    fx's generated forward, bound: a lazy graph module's code generated now (its stand-in
    forward goes through nn.Module's call machinery on every call)."""
    _LazyGraphModule.force_recompile(gm)
    return (straight_line(gm) if program else None) or gm.forward


def _copy(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(
            value.shape, value.stride(), dtype=value.dtype, device=value.device
        ).copy_(value)
    return value


def _in_layout(value: torch.Tensor, layout: TensorMeta, bindings: dict) -> torch.Tensor:
    try:
        stride = [evaluate(s, bindings) for s in layout.stride]
    except ValueError:
        return value  # a stride depends on a size we cannot read off the inputs: keep as is
    out = torch.empty_strided(value.shape, stride, dtype=value.dtype, device=value.device)
    return out.copy_(value)
