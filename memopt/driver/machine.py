"""The machine the program runs on, measured: memory bandwidth and compute peak (CPU).

`measured_machine()` times, with torch on this process's threads:
- read bandwidth: `torch.sum` over a 256 MiB float32 tensor (bytes read / time);
- copy bandwidth: `dst.copy_(src)` of 256 MiB (bytes read + bytes written / time);
- compute peak: a 2048 x 2048 x 2048 float32 matmul (2*M*N*K / time), on the faster of
  ATen's and oneDNN's GEMM (backends/runtime/gemm.py);
each the best of several runs after a warm-up (best, not median: the machine's capability,
not its noise). The result is cached in `$MEMOPT_CACHE_DIR/machine-<key>.json`, keyed by the
processor, the thread count and the torch version, so it is measured once per machine.
Every figure is *measured*.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from memopt.backends.cache import cache_dir, machine_key, processor, write_atomically
from memopt.backends.runtime.gemm import onednn_addmm
from memopt.backends.runtime.linear import onednn_enabled

_BUFFER_NBYTES = 256 * 2**20  # far past any last-level cache of this class of machine
_MATMUL_SIZE = 2048
_RUNS = 7


@dataclass(frozen=True)
class Machine:
    """What this machine sustains (measured), and what it is."""

    description: str
    threads: int
    read_bytes_per_s: float
    copy_bytes_per_s: float  # read + write
    fp32_flops_per_s: float

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "label": "measured"}


def _best_seconds(run: Callable[[], object]) -> float:
    run()  # warm-up: first touch of fresh memory, thread pool start
    best = float("inf")
    for _ in range(_RUNS):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def _bandwidths() -> tuple[float, float]:
    """(read, copy) bytes per second over buffers no cache holds."""
    source = torch.ones(_BUFFER_NBYTES // 4, dtype=torch.float32)
    target = torch.empty(_BUFFER_NBYTES // 4, dtype=torch.float32)
    read = _BUFFER_NBYTES / _best_seconds(lambda: source.sum())
    copy = 2 * _BUFFER_NBYTES / _best_seconds(lambda: target.copy_(source))
    return read, copy


def measure_machine() -> Machine:
    """Measure this machine now (about a second)."""
    with torch.device("cpu"):  # real float32 CPU tensors whatever the caller's defaults
        read, copy = _bandwidths()
        a = torch.randn(_MATMUL_SIZE, _MATMUL_SIZE, dtype=torch.float32)
        b = torch.randn(_MATMUL_SIZE, _MATMUL_SIZE, dtype=torch.float32)
        seconds = _best_seconds(lambda: a @ b)
        if onednn_enabled():  # the faster of the two CPU GEMM libraries (runtime/gemm.py)
            seconds = min(seconds, _best_seconds(lambda: onednn_addmm(None, a, b)))
    flops = 2 * _MATMUL_SIZE**3 / seconds
    return Machine(processor(), torch.get_num_threads(), read, copy, flops)


def measured_machine(refresh: bool = False) -> Machine:
    """This machine's figures, from the cache where it has them (else measured and cached)."""
    # "-2": figures measured since the compute peak is the faster GEMM library's
    path = cache_dir("machine") / f"{machine_key()}-2.json"
    if not refresh:
        try:
            data = json.loads(path.read_text())
            return Machine(**{k: v for k, v in data.items() if k != "label"})
        except (OSError, ValueError, TypeError):
            pass
    machine = measure_machine()
    write_atomically(path, json.dumps(machine.to_dict(), indent=1).encode())
    return machine
