"""Running the compiled program next to eager: outputs compared, run time measured.

Shared by `memopt ablate --run` (a check and a median time per configuration) and
`memopt bisect` (does the program compiled with fuel=k still compute what eager does?).

The program is compiled the way `torch.compile(fn, backend="memopt")` compiles it, except
that one CompileSession serves every graph Dynamo hands over, so fuel counts the rewrite
decisions of the whole program in the order `memopt.analyze` counts them, graph breaks
included.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.utils._pytree as pytree

from memopt.compiler.capture import aot_backend, backward_seeds, clone_inputs, fresh_entry
from memopt.config import Config
from memopt.driver.dynamo import CompileSession
from memopt.passes.output_error import difference


def compile_program(fn: Callable, options: Mapping[str, object], dynamic: bool = False) -> Callable:
    """`fn` compiled by memopt with `options`, as a fresh Dynamo entry (no shared cache)."""
    session = CompileSession(Config.from_options(options))
    return torch.compile(
        fresh_entry(fn), backend=aot_backend(session.compile_graph, session.hooks), dynamic=dynamic
    )


def run_step(
    program: Callable, fn: object, inputs: Sequence[object], training: bool
) -> tuple[list[torch.Tensor | None], float]:
    """One step of `program` on copies of `inputs`: its tensors and the seconds it took.

    The tensors are the outputs and, when training, the gradients (seeded with ones) of the
    parameters and inputs that require grad, computed with `torch.autograd.grad` so no
    `.grad` is touched. The RNG is seeded with 0 and restored afterwards, so eager and
    compiled runs draw the same random numbers where they draw them in the same order.
    """
    args = clone_inputs(inputs)
    leaves = _grad_leaves(fn, args) if training else []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        start = time.perf_counter()
        if training:
            with torch.enable_grad():
                output = program(*args)
                outs, seeds = backward_seeds(output)
                grads = (
                    torch.autograd.grad(outs, leaves, seeds, allow_unused=True) if leaves else ()
                )
        else:
            with torch.no_grad():
                output = program(*args)
            grads = ()
        elapsed_s = time.perf_counter() - start
    tensors: list[torch.Tensor | None] = [
        t.detach() for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)
    ]
    tensors.extend(grads)
    return tensors, elapsed_s


def _grad_leaves(fn: object, args: Sequence[object]) -> list[torch.Tensor]:
    params = (
        [p for p in fn.parameters() if p.requires_grad] if isinstance(fn, torch.nn.Module) else []
    )
    return params + [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def mismatch(
    expected: Sequence[torch.Tensor | None], actual: Sequence[torch.Tensor | None]
) -> str | None:
    """None when `actual` matches `expected` within the dtype's tolerances, else the first
    difference, in one line (torch.testing.assert_close's defaults per dtype; NaN == NaN)."""
    if len(expected) != len(actual):
        return f"{len(actual)} tensors where eager gives {len(expected)}"
    for index, (want, got) in enumerate(zip(expected, actual)):
        if want is None or got is None:
            if (want is None) != (got is None):
                return f"tensor {index}: a gradient is missing on one side"
            continue
        try:
            torch.testing.assert_close(got, want, equal_nan=True)
        except AssertionError as error:
            lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
            detail = "; ".join(lines[:3])
            return f"tensor {index}: {detail}"
    return None


def relative_error(
    expected: Sequence[torch.Tensor | None], actual: Sequence[torch.Tensor | None]
) -> float:
    """The largest `max |actual - expected| / max |expected|` over the floating tensors
    (the precision pass's measure: non-finite values that differ are infinitely wrong)."""
    worst = 0.0
    for want, got in zip(expected, actual):
        if want is None or got is None or not want.is_floating_point() or want.numel() == 0:
            continue
        diff, scale = difference(want.float(), got.float())
        worst = max(worst, diff / scale if scale else (0.0 if diff == 0 else math.inf))
    return worst


def run_and_check(
    program: Callable,
    fn: object,
    inputs: Sequence[object],
    training: bool,
    expected: Sequence[torch.Tensor | None],
) -> str | None:
    """Run `program` once (compiling it) and compare with `expected`; an exception is a
    difference too (reported by its type and first line)."""
    try:
        actual, _ = run_step(program, fn, inputs, training)
    except Exception as error:  # noqa: BLE001 - a crash is a finding, reported in one line
        lines = str(error).strip().splitlines()
        return f"raised {type(error).__name__}" + (f": {lines[0]}" if lines else "")
    return mismatch(expected, actual)


def median_ms(
    program: Callable, fn: object, inputs: Sequence[object], training: bool, repeats: int
) -> float:
    """Median wall time of `repeats` steps, in milliseconds (measured; run after a warm-up)."""
    times = [run_step(program, fn, inputs, training)[1] for _ in range(max(repeats, 1))]
    return statistics.median(times) * 1e3
