"""Python's cyclic garbage collector, paused while memopt compiles.

Compiling a graph allocates millions of small objects that live until the compile ends
(fx nodes and their copies, fake tensors, sympy expressions, fusion's groups). Python's
generational collector counts those allocations and, every so often, scans every object
the process holds for cycles: a full scan takes a quarter of a second or more next to a
real model, and a GPT-2 training compile triggered 17 of them, a third of its compile time
(measured: `bench/compile.py`, docs/architecture.md, "Compile time").

`paused()` turns the collector off for the span of a compile and back on after, as it
was. Reference counting still frees every object that is not in a cycle; the cycles made
during the compile (an fx graph and its nodes point at each other) wait for the next
collection after it. Nesting is safe: only the outermost `paused()` turns it back on.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """The cyclic collector off inside the block (see the module doc)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
