"""The Triton kernels compiled by the real GPU compilers, offline: no GPU needed.

Triton compiles for a named target on a machine without one, down to machine code (cubin
for NVIDIA, hsaco for AMD). `compile_launches` does it for recorded launches (see
`launching.recording_launches`: the exact block sizes and warps a GPU launch would use) and
reads back what the compiler made of each kernel: registers, stack (spills), shared memory,
the occupancy those allow on the device, and the global memory instructions by width.

The compiles run in a worker process (`offline_worker.py`) whose environment has no
TRITON_INTERPRET: the interpreter, which the tests and CPU launches use, patches
triton.language in-process and the real compiler then fails. Results are cached on disk by
the hash of the kernel source, the launch, the target and Triton's version, so a kernel is
compiled once per machine.

Every figure here is *compiled*: read from the machine code for the target, not measured on
a GPU and not modelled.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from memopt.backends.cache import write_atomically
from memopt.backends.triton.launching import Launch, cache_dir, wavefronts
from memopt.errors import unknown


@dataclass(frozen=True)
class GpuArch:
    """A compile target and the per-multiprocessor limits its occupancy is bounded by.

    NVIDIA limits per SM from the CUDA C++ Programming Guide's table of compute
    capabilities; AMD's from the CDNA3 ISA guide (512 VGPRs a lane per SIMD for wave64,
    8 waves per SIMD, 4 SIMDs and 64 KiB of LDS per CU).
    """

    label: str  # "sm_90", "gfx942"
    backend: str  # Triton's: "cuda" or "hip"
    arch: int | str
    warp_size: int
    max_warps: int  # resident warps (wavefronts) per SM (CU)
    registers: int  # 32-bit registers per SM; AMD: VGPRs per lane per SIMD
    shared_bytes: int  # shared memory (LDS) per SM (CU) usable by blocks
    max_blocks: int  # resident blocks (workgroups) per SM (CU)


SM_80 = GpuArch("sm_80", "cuda", 80, 32, 64, 65536, 164 * 1024, 32)
SM_89 = GpuArch("sm_89", "cuda", 89, 32, 48, 65536, 100 * 1024, 24)
SM_90 = GpuArch("sm_90", "cuda", 90, 32, 64, 65536, 228 * 1024, 32)
GFX942 = GpuArch("gfx942", "hip", "gfx942", 64, 32, 512, 64 * 1024, 32)

# memopt's device models (compiler/devices.py) that Triton has a target for.
ARCHS: dict[str, GpuArch] = {
    "h100": SM_90,
    "h200": SM_90,
    "a100": SM_80,
    "l4": SM_89,
    "rtx4090": SM_89,
    "mi300x": GFX942,
}


def arch_for(device: str) -> GpuArch:
    """The compile target of a device model; a clear error for one without a GPU target."""
    if device not in ARCHS:
        raise unknown("GPU device for offline compilation", device, sorted(ARCHS))
    return ARCHS[device]


@dataclass(frozen=True)
class CompiledKernel:
    """What the real compiler made of one launch (figures *compiled*, per program).

    `loads` / `stores`: global memory instructions in the machine code, {width in bits:
    count}; each runs once per thread (lane) of the program. `has_loop`: the code loops, so
    those counts are not per program. `traffic`: the same instructions outside every loop
    (`"outside"`) and in each loop's body (`"loops"`, in code order), {"load"|"store":
    {width: count}}; counted without software pipelining where the kernel had it
    (`pipelined`; offline_worker.compile_job); None when its loops nest. `trips`: the launch's
    iterations of each source loop, over the whole grid (Launch.trips). `error`: the
    compiler's message when it failed (then every figure is 0).
    """

    fn_name: str
    arch: str
    grid: int
    num_warps: int
    threads: int  # per program: num_warps x the warp size
    registers: int  # per thread (AMD: VGPRs)
    stack_bytes: int  # per thread: the stack frame (spills and local arrays; AMD: scratch)
    spill_bytes: int  # per thread: register spills (NVIDIA: stores + loads; AMD: VGPRs x 4)
    shared_bytes: int  # per program
    occupancy: float  # resident warps / the maximum, from registers, shared memory, warps
    loads: dict[int, int]
    stores: dict[int, int]
    has_loop: bool
    error: str | None = None
    compile_s: float = 0.0  # the compile's own time, when it was not cached
    device: str = ""  # the device model it was compiled for ("h100")
    traffic: dict[str, object] | None = None
    trips: tuple[int, ...] = ()
    pipelined: bool = False

    @property
    def spills(self) -> bool:
        return self.spill_bytes > 0

    @property
    def widest_load_bits(self) -> int:
        return max(self.loads, default=0)

    @property
    def static_bytes(self) -> int | None:
        """Global bytes its memory instructions move over the grid: every lane of every
        program running each instruction outside the loops once, and each loop body's
        instructions once an iteration (masked tails included). None for a loop whose trips
        are not known or whose machine code has loops the source has not (or nested ones),
        and for a failed compile."""
        if self.error:
            return None
        if not self.has_loop:
            return lane_bytes(self.loads, self.stores) * self.threads * self.grid
        loops = self.traffic["loops"] if self.traffic is not None else None
        if loops is None or len(loops) != len(self.trips):
            return None
        outside = self.traffic["outside"]
        total = lane_bytes(outside["load"], outside["store"]) * self.grid
        for body, trips in zip(loops, self.trips):
            total += lane_bytes(body["load"], body["store"]) * trips
        return total * self.threads

    def to_dict(self) -> dict[str, object]:
        return {
            "fn_name": self.fn_name,
            "device": self.device,
            "arch": self.arch,
            "grid": self.grid,
            "num_warps": self.num_warps,
            "registers": self.registers,
            "stack_bytes": self.stack_bytes,
            "spill_bytes": self.spill_bytes,
            "shared_bytes": self.shared_bytes,
            "occupancy": self.occupancy,
            "loads": {str(k): v for k, v in sorted(self.loads.items())},
            "stores": {str(k): v for k, v in sorted(self.stores.items())},
            "has_loop": self.has_loop,
            "trips": list(self.trips),
            "pipelined": self.pipelined,
            "static_bytes": self.static_bytes,
            "error": self.error,
        }


def lane_bytes(loads: dict[int, int], stores: dict[int, int]) -> int:
    """Bytes one lane moves running each of these instructions once ({width in bits: count})."""
    return sum(bits // 8 * n for counts in (loads, stores) for bits, n in counts.items())


def occupancy(
    arch: GpuArch, registers: int, shared_bytes: int, num_warps: int, waves=None
) -> float:
    """Resident warps over the maximum, as the limits of `arch` allow one program's use.

    NVIDIA: registers are allocated per warp in units of 256, blocks are limited by warps,
    registers, shared memory and the block count. AMD: the compiler's own waves per SIMD
    (`waves`, from VGPRs), then LDS per CU; a workgroup's waves spread over the 4 SIMDs.
    """
    if arch.backend == "hip":
        per_simd: float = min(8, waves or arch.registers // max(8, -(-registers // 8) * 8))
        if shared_bytes:
            groups = min(arch.max_blocks, arch.shared_bytes // shared_bytes)
            per_simd = min(per_simd, groups * num_warps / 4)
        return per_simd / 8
    per_warp = -(-max(registers, 1) * arch.warp_size // 256) * 256
    blocks = min(
        arch.max_blocks,
        arch.max_warps // num_warps,
        arch.registers // (per_warp * num_warps),
        arch.shared_bytes // shared_bytes if shared_bytes else arch.max_blocks,
    )
    return blocks * num_warps / arch.max_warps


def _describe_arg(arg: object) -> object:
    if isinstance(arg, torch.Tensor):
        return {"tensor": str(arg.dtype).removeprefix("torch.")}
    if isinstance(arg, bool):
        return arg
    if isinstance(arg, int):
        return int(arg)
    if isinstance(arg, float):
        return {"float": arg}
    raise TypeError(f"a launch argument of type {type(arg).__name__} cannot be compiled offline")


def job_of(planned: Launch, arch: GpuArch) -> dict:
    """The worker's description of one launch for one target."""
    return {
        "source_path": planned.source_path,
        "fn_name": planned.fn_name,
        "args": [_describe_arg(a) for a in planned.args],
        "constexprs": {
            k: v if isinstance(v, (bool, str)) else int(v) for k, v in planned.constexprs.items()
        },
        "num_warps": wavefronts(planned.num_warps or 4, arch.warp_size),
        "num_stages": planned.num_stages,
        "target": {"backend": arch.backend, "arch": arch.arch, "warp_size": arch.warp_size},
    }


def _triton_version() -> str:
    import triton

    return triton.__version__


# The worker's result format: part of every cache key, so older results are not misread.
RESULT_FORMAT = 5


def _key(job: dict) -> str:
    source = Path(job["source_path"]).read_text()
    described = json.dumps({**job, "source_path": None}, sort_keys=True)
    text = f"{source}\n{described}\n{_triton_version()}\n{RESULT_FORMAT}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _cache_path(key: str) -> Path:
    path = cache_dir() / "offline"
    path.mkdir(parents=True, exist_ok=True)
    return path / f"{key}.json"


def _start_worker(jobs: list[dict]) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated
    env["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas's spill figures (the worker reads them)
    # Past Triton's own cache: a cached binary comes without ptxas's log, and two launches
    # that specialize alike (head dims 80 and 128 are both "divisible by 16") would share it.
    env["TRITON_ALWAYS_COMPILE"] = "1"
    with tempfile.TemporaryFile("w+") as jobs_file:  # the worker keeps its own handle
        json.dump(jobs, jobs_file)
        jobs_file.seek(0)
        return subprocess.Popen(
            [sys.executable, "-m", "memopt.backends.triton.offline_worker"],
            stdin=jobs_file,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )


def _run_workers(jobs: list[dict], workers: int, timeout_s: float) -> list[dict]:
    """Compile `jobs` in `workers` processes side by side (round-robin shares), in order."""
    shares = [jobs[k::workers] for k in range(workers)]
    processes = [_start_worker(share) for share in shares]
    outputs = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=timeout_s)
            lines = [line for line in out.splitlines() if line.startswith("{")]
            outputs.append((process.returncode, lines, err))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for (code, lines, err), share in zip(outputs, shares):
        if code != 0 or len(lines) != len(share):
            raise RuntimeError(
                f"the offline Triton compiler worker failed (exit {code}): {err.strip()[-2000:]}"
            )
    results: list[dict] = [{}] * len(jobs)
    for k, (_code, lines, _err) in enumerate(outputs):
        for position, line in zip(range(k, len(jobs), workers), lines):
            results[position] = json.loads(line)
    return results


def compile_launches(
    launches: Sequence[Launch],
    device: str,
    timeout_s: float = 600.0,
    workers: int | None = None,
) -> list[CompiledKernel]:
    """Compile each launch for `device`'s target, one CompiledKernel per launch.

    Results are cached on disk; the misses compile in `workers` processes (default: one a
    core, at most 4). `timeout_s` bounds the whole compile: past it, an error.
    """
    arch = arch_for(device)
    jobs = [job_of(planned, arch) for planned in launches]
    keys = [_key(job) for job in jobs]
    results: dict[str, dict] = {}
    missing: dict[str, dict] = {}
    for key, job in zip(keys, jobs):
        path = _cache_path(key)
        if path.exists():
            results[key] = json.loads(path.read_text())
        else:
            missing[key] = job
    if missing:
        count = max(1, min(workers or min(4, os.cpu_count() or 1), len(missing)))
        compiled = _run_workers(list(missing.values()), count, timeout_s)
        for key, result in zip(missing, compiled):
            results[key] = result
            if result.get("error") is None:  # failures are retried: they may be transient
                write_atomically(_cache_path(key), json.dumps(result).encode())
    return [
        _compiled(planned, job, results[key], arch, device)
        for planned, job, key in zip(launches, jobs, keys)
    ]


def _compiled(
    planned: Launch, job: dict, result: dict, arch: GpuArch, device: str
) -> CompiledKernel:
    num_warps = job["num_warps"]
    launch = {
        "fn_name": planned.fn_name,
        "arch": arch.label,
        "grid": planned.grid,
        "num_warps": num_warps,
        "threads": num_warps * arch.warp_size,
        "device": device,
    }
    if result.get("error"):
        return CompiledKernel(
            **launch,
            registers=0,
            stack_bytes=0,
            spill_bytes=0,
            shared_bytes=0,
            occupancy=0.0,
            loads={},
            stores={},
            has_loop=False,
            error=result["error"],
        )
    accesses = result["accesses"]
    return CompiledKernel(
        **launch,
        registers=result["registers"],
        stack_bytes=result["stack_bytes"],
        spill_bytes=result["spill_bytes"],
        shared_bytes=result["shared_bytes"],
        occupancy=occupancy(
            arch, result["registers"], result["shared_bytes"], num_warps, result["waves_per_simd"]
        ),
        loads={int(k): v for k, v in accesses["load"].items()},
        stores={int(k): v for k, v in accesses["store"].items()},
        has_loop=result["has_loop"],
        compile_s=result.get("compile_s", 0.0),
        traffic=_int_widths(result["traffic"]),
        trips=tuple(planned.trips),
        pipelined=result["pipelined"],
    )


def _int_widths(traffic: dict | None) -> dict | None:
    """The worker's traffic record with its widths as ints again (JSON keys are strings)."""
    if traffic is None:
        return None

    def widths(counts: dict) -> dict[str, dict[int, int]]:
        return {kind: {int(k): v for k, v in counts[kind].items()} for kind in ("load", "store")}

    return {"outside": widths(traffic["outside"]), "loops": [widths(b) for b in traffic["loops"]]}


def traffic_ratio(compiled: CompiledKernel, modelled_bytes: int) -> float | None:
    """Static bytes over modelled bytes (None when the static bytes are not known, or the
    compile failed); 1.0 means the machine code moves what the cost model counts, masked
    tails aside. Above 1 for a tiled kernel: its programs read shared operands again (a
    matmul's A once per column of tiles), from L2 when it holds them; the modelled bytes
    count each buffer once."""
    static = compiled.static_bytes
    if static is None or compiled.error or not modelled_bytes:
        return None
    return static / modelled_bytes


__all__ = [
    "ARCHS",
    "CompiledKernel",
    "GpuArch",
    "arch_for",
    "compile_launches",
    "lane_bytes",
    "occupancy",
    "traffic_ratio",
]
