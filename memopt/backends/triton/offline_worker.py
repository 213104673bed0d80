"""Compile recorded Triton launches for real GPU targets, in a process of its own.

Run as `python -m memopt.backends.triton.offline_worker` with TRITON_INTERPRET unset (the
interpreter patches triton.language in-process, after which the real compiler fails; see
offline.py). Reads a JSON list of jobs on stdin and writes one JSON result a line, in order.

A job names a cached kernel module, its function, the launch's arguments (tensors as their
dtype), constexprs and options, and a target (`{"backend": "cuda", "arch": 90,
"warp_size": 32}`). The function is specialized as Triton's launcher specializes it (a
tensor is 16-byte aligned, an int divisible by 16 is marked so, an int equal to 1 is a
constant), compiled to machine code, and read back:

- NVIDIA: `cuobjdump -res-usage` on the cubin (registers, stack, shared, local) and
  `nvdisasm` for the SASS: global memory instructions (LDG, STG, LDGSTS, atomics) by width;
- AMD: the AMDGCN text's metadata (VGPRs, spills, scratch, LDS, the compiler's occupancy)
  and its global and buffer memory instructions by width.

A loop is a backward branch in NVIDIA's SASS, and a block LLVM's comments place in a loop in
AMDGCN (where cold blocks branch back without looping). The memory instructions are counted outside
every loop and inside each one (`traffic`), so that the caller can weigh each loop's body by
its trip count; a kernel with `tl.dot` loops is counted on a second compile without software
pipelining (see `compile_job`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Memory instructions to their width in bits, by suffix (SASS: LDG.E.128, STG.E.U16;
# AMDGCN: global_load_dwordx4, buffer_store_short).
_SASS_WIDTH = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}
_GCN_WIDTH = {
    "dwordx4": 128,
    "dwordx3": 96,
    "dwordx2": 64,
    "dword": 32,
    "b128": 128,
    "b96": 96,
    "b64": 64,
    "b32": 32,
    "short": 16,
    "ushort": 16,
    "sshort": 16,
    "short_d16": 16,
    "short_d16_hi": 16,
    "b16": 16,
    "d16_b16": 16,
    "ubyte": 8,
    "sbyte": 8,
    "byte": 8,
    "b8": 8,
}
_SASS_GLOBAL = re.compile(r"\b(LDG|STG|LDGSTS|ATOMG|ATOM|RED)\b((?:\.[A-Z0-9_]+)*)")
_SASS_LABEL = re.compile(r"^(\.L_x_\d+):")
_SASS_BRANCH = re.compile(r"\bBRA\b.*?\((\.L_x_\d+)\)")
_GCN_GLOBAL = re.compile(r"^\s*(global|buffer)_(load|store|atomic)_(\w+)")


def loop_regions(code: str, label: re.Pattern[str], branch: re.Pattern[str]) -> list[range]:
    """The lines of each loop of NVIDIA's SASS: from a label to the last branch back to it
    (ptxas lays a loop's body out between its head and its back edge). A branch to the line
    just above it is the trap after the last EXIT (NVIDIA's padding), not a loop."""
    seen: dict[str, int] = {}
    ends: dict[int, int] = {}
    for number, line in enumerate(code.splitlines()):
        if (match := label.match(line)) is not None:
            seen[match.group(1)] = number
        elif (match := branch.search(line)) is not None:
            target = seen.get(match.group(1))
            if target is not None and target < number - 1:
                ends[target] = number
    return [range(start, end + 1) for start, end in ends.items()]


# A block's first line (`.LBB0_5:` with a label, `; %bb.7:` without) and LLVM's loop comment.
_GCN_BLOCK = re.compile(r"^(?:\.LBB|; %bb\.)(\w+):")
_GCN_LOOP = re.compile(r";\s*(?:=>This Inner Loop Header|in Loop: Header=BB(\w+)).*Depth=(\d+)")


def gcn_loop_regions(asm: str) -> tuple[list[set[int]], bool]:
    """The lines of each loop of AMDGCN text, from LLVM's own block comments (`=>This Inner
    Loop Header: Depth=1`, `in Loop: Header=BB0_6 Depth=1`), and whether any loop nests.
    Branches cannot tell: LLVM places cold blocks after the code that branches back from
    them, and may put a loop's body above its header."""
    loops: dict[str, set[int]] = {}
    nested = False
    current: set[int] | None = None
    for number, line in enumerate(asm.splitlines()):
        if (block := _GCN_BLOCK.match(line)) is not None:
            match = _GCN_LOOP.search(line)
            if match is None:
                current = None
            else:
                header, depth = match.groups()
                nested |= int(depth) > 1
                current = loops.setdefault(header or block.group(1), set())
        if current is not None:
            current.add(number)
    return list(loops.values()), nested


Accesses = dict[str, dict[int, int]]  # {"load" | "store": {width in bits: instructions}}


def _count(found: list[tuple[int, str, int]], lines: range | None = None) -> Accesses:
    counted: Accesses = {"load": {}, "store": {}}
    for number, kind, width in found:
        if lines is None or number in lines:
            counted[kind][width] = counted[kind].get(width, 0) + 1
    return counted


def split_accesses(
    found: list[tuple[int, str, int]], regions: list[range] | list[set[int]]
) -> dict | None:
    """The memory instructions outside every loop and inside each loop (each region: its
    lines), loops in code order, from (line, kind, width) triples; None when loops overlap
    (nested: not counted)."""
    regions = sorted(regions, key=min)
    inside = {number for region in regions for number in region}
    if len(inside) != sum(len(region) for region in regions):
        return None
    return {
        "outside": _count([f for f in found if f[0] not in inside]),
        "loops": [_count(found, region) for region in regions],
    }


def _nvidia_tools() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _specialize(fn, job: dict, backend_cls) -> tuple[dict, dict, dict]:
    """signature, constexprs and attrs of the launch, as Triton's launcher would make them."""
    import torch
    from triton._C.libtriton import native_specialize_impl

    args = list(job["args"])
    signature: dict[str, str] = {}
    constexprs: dict[str, object] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = job["constexprs"][name]
            continue
        arg = args.pop(0)
        if isinstance(arg, dict) and "tensor" in arg:
            value = torch.empty(1, dtype=getattr(torch, arg["tensor"]))  # 64-byte aligned
        elif isinstance(arg, dict) and "float" in arg:
            value = float(arg["float"])
        else:
            value = arg
        kind, spec = native_specialize_impl(backend_cls, value, False, True, True)
        if kind == "constexpr":
            signature[name] = "constexpr"
            constexprs[name] = spec
            continue
        signature[name] = kind
        if spec:
            attrs[(index,)] = backend_cls.parse_attr(spec)
    return signature, constexprs, attrs


def _ptxas_spills(log: str) -> int:
    """Spill stores plus loads, in bytes, from ptxas's -v log (Triton runs ptxas with -v)."""
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return sum(int(stores) + int(loads) for stores, loads in found)


def _nvidia(compiled, threads: int, log: str) -> dict:
    tools = _nvidia_tools()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run(
            [str(tools / "cuobjdump"), "-res-usage", str(cubin)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sass = subprocess.run(
            [str(tools / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    found = []
    for number, line in enumerate(sass.splitlines()):
        for op, suffix in _SASS_GLOBAL.findall(line):
            parts = suffix.strip(".").split(".") if suffix else []
            width = next((_SASS_WIDTH[p] for p in parts if p in _SASS_WIDTH), 32)
            found.append((number, "load" if op in ("LDG", "LDGSTS") else "store", width))
    regions = loop_regions(sass, _SASS_LABEL, _SASS_BRANCH)
    return {
        "registers": int(fields.get("REG", 0)),
        "stack_bytes": int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0)),
        "spill_bytes": _ptxas_spills(log),
        "shared_bytes": max(int(compiled.metadata.shared), int(fields.get("SHARED", 0))),
        "waves_per_simd": None,
        "accesses": _count(found),
        "has_loop": bool(regions),
        "traffic": split_accesses(found, regions),
        "threads": threads,
    }


def _amd(compiled, threads: int, log: str) -> dict:
    asm = compiled.asm["amdgcn"]

    def metadata(key: str) -> int:
        match = re.search(rf"^\s*\.{key}:\s+(\d+)", asm, re.M)
        return int(match.group(1)) if match else 0

    scratch = re.search(r"; ScratchSize: (\d+)", asm)
    occupancy = re.search(r"; Occupancy: (\d+)", asm)
    found = []
    for number, line in enumerate(asm.splitlines()):
        if (match := _GCN_GLOBAL.match(line)) is not None:
            _space, op, rest = match.groups()
            width = _GCN_WIDTH.get(rest, 32)
            found.append((number, "store" if op == "store" else "load", width))
    regions, nested = gcn_loop_regions(asm)
    return {
        "registers": metadata("vgpr_count"),
        "stack_bytes": int(scratch.group(1)) if scratch else metadata("private_segment_fixed_size"),
        # VGPR spills go to scratch memory (4 bytes a lane each); SGPR spills go to VGPR
        # lanes, not memory.
        "spill_bytes": 4 * metadata("vgpr_spill_count"),
        "shared_bytes": max(int(compiled.metadata.shared), metadata("group_segment_fixed_size")),
        "waves_per_simd": int(occupancy.group(1)) if occupancy else None,
        "accesses": _count(found),
        "has_loop": bool(regions),
        "traffic": None if nested else split_accesses(found, regions),
        "threads": threads,
    }


def compile_job(job: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    target = job["target"]
    name = f"memopt_offline_{Path(job['source_path']).stem}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, job["source_path"])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # Triton reads the kernel's source through it
        spec.loader.exec_module(module)
    fn = getattr(module, job["fn_name"])
    if target["backend"] == "cuda":
        from triton.backends.nvidia.compiler import CUDABackend as backend_cls
    else:
        from triton.backends.amd.compiler import HIPBackend as backend_cls
    signature, constexprs, attrs = _specialize(fn, job, backend_cls)
    options = {"num_warps": job["num_warps"]}
    if job.get("num_stages") is not None:
        options["num_stages"] = job["num_stages"]
    gpu = GPUTarget(target["backend"], target["arch"], target["warp_size"])
    threads = job["num_warps"] * target["warp_size"]
    read = _nvidia if target["backend"] == "cuda" else _amd

    def build(options: dict) -> dict:
        source = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # ptxas's -v log (TRITON_DUMP_PTXAS_LOG)
            compiled = triton.compile(source, target=gpu, options=options)
        return read(compiled, threads, log.getvalue())

    start = time.perf_counter()
    result = build(options)
    compile_s = time.perf_counter() - start
    source_text = Path(job["source_path"]).read_text()
    result["pipelined"] = False
    if result["has_loop"] and options.get("num_stages") != 1 and "tl.dot(" in source_text:
        # Software pipelining issues the first iterations' tile loads ahead of the loop and
        # predicates off (NVIDIA) or peels (AMD) the last ones: the loop's body is then not
        # one iteration's traffic. The same kernel without it loads each iteration's tiles
        # in the body, once: its loops are counted instead (same tiles, same bytes).
        result["traffic"] = build({**options, "num_stages": 1})["traffic"]
        result["pipelined"] = True
    return {"error": None, **result, "compile_s": round(compile_s, 3)}


def main() -> None:
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit(
            "offline_worker: TRITON_INTERPRET is set; the real compilers need it unset"
        )
    jobs = json.load(sys.stdin)
    for job in jobs:
        try:
            result = compile_job(job)
        except Exception as error:  # noqa: BLE001 - a kernel that fails to compile is a finding
            detail = traceback.format_exception_only(type(error), error)[-1].strip()
            result = {"error": detail[:2000]}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
