"""Compile C++ sources to shared libraries, cached on disk by source hash, loaded with ctypes.

The cache key hashes the source, the compiler (path and version), the flags and the CPU's
feature flags (`-march=native` code is only valid on a CPU like the one that built it).
Each entry is `<key>.so` with `<key>.sha256`, the checksum of the library's bytes, and the
source `<key>.cpp` for reading. Every file is written to a temporary name in the cache
directory and renamed into place (`os.replace` is atomic), so two processes compiling the
same kernel never see a half-written file, and a library another process has loaded is
never modified in place (its inode is replaced, not rewritten). An entry whose checksum
does not match, or that the loader rejects, is compiled again.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from memopt.backends.cache import cache_dir as backend_cache_dir
from memopt.backends.cache import write_atomically
from memopt.backends.cpp.prelude import MVEC_BINARY_FUNCTIONS, MVEC_FUNCTIONS, PRELUDE


class CompilerNotFound(RuntimeError):
    """No C++ compiler at the configured path (`$CXX`, else `g++`)."""


class CompileError(RuntimeError):
    """The C++ compiler rejected a source; the message ends with its diagnostics."""


# Flags that change meaning stay; the optional ones are dropped if the compiler rejects
# them. None of them changes results: no -ffast-math (NaN, infinities and rounding must
# match torch), -fno-math-errno only stops libm calls from setting errno (nobody reads it),
# -fno-trapping-math lets the vectorizer evaluate both sides of a select (ATen is built
# with both), -fwrapv makes integer overflow wrap as torch's integer ops do.
REQUIRED_FLAGS = ("-shared", "-fPIC")
OPTIONAL_FLAGS = (
    "-O3",
    "-march=native",
    # 512-bit vectors where the CPU has them (GCC defaults to 256 on AVX-512 parts); no
    # effect elsewhere. Measured: layer_norm + GELU 21 -> 15 ms on an Ice Lake Xeon.
    "-mprefer-vector-width=512",
    "-fopenmp",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fwrapv",
    "-std=c++17",
    "-Wl,--no-undefined",  # a missing symbol fails the build, not the load
)
# SIMD math from glibc's libmvec: used when it links (see prelude.py).
MVEC_FLAGS = ("-DMO_USE_MVEC", "-lmvec")

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}
# Builds started ahead of their first call (`prefetch`), by cache key. A graph's kernels
# compile side by side (one compiler process per core) while Dynamo finishes the graph,
# instead of one after another at their first calls.
_pending: dict[str, concurrent.futures.Future[Path]] = {}
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def compiler() -> str:
    """The C++ compiler's path: `$CXX` if set, else `g++` on PATH. CompilerNotFound if none."""
    name = os.environ.get("CXX") or "g++"
    path = shutil.which(name)
    if path is None:
        raise CompilerNotFound(f"no C++ compiler {name!r} found (set CXX to one)")
    return path


def cache_dir() -> Path:
    """`$MEMOPT_CACHE_DIR/cpp`, else `~/.cache/memopt/cpp`; created on first use."""
    return backend_cache_dir("cpp")


@dataclass(frozen=True)
class Toolchain:
    """A compiler with the flags it accepts, probed once per compiler and cached on disk."""

    path: str
    version: str
    flags: tuple[str, ...]

    @property
    def uses_mvec(self) -> bool:
        return "-DMO_USE_MVEC" in self.flags


def toolchain() -> Toolchain:
    """The configured compiler and the flags it accepts (probed once per process and
    compiler; the result is also recorded in the cache directory for later processes)."""
    path = compiler()
    tools = _toolchains.get(path)
    if tools is None:
        tools = _toolchains[path] = _toolchain(path, cache_dir())
    return tools


_toolchains: dict[str, Toolchain] = {}


def _toolchain(path: str, directory: Path) -> Toolchain:
    version = _run([path, "-dumpfullversion", "-dumpversion"]).stdout.strip().splitlines()
    version_text = version[0] if version else "unknown"
    stat = os.stat(path)
    candidates = "\0".join((*OPTIONAL_FLAGS, *MVEC_FLAGS))
    identity = f"{path}\0{version_text}\0{stat.st_size}\0{stat.st_mtime_ns}\0{cpu_identity()}"
    probe_key = _digest(f"{identity}\0{candidates}\0{_probe_source()}")
    record = directory / f"toolchain-{probe_key[:16]}.json"
    try:
        flags = tuple(json.loads(record.read_text())["flags"])
    except (OSError, ValueError, KeyError, TypeError):
        flags = _probe_flags(path, directory)
        write_atomically(record, json.dumps({"compiler": path, "flags": list(flags)}).encode())
    return Toolchain(path, version_text, flags)


def _probe_source() -> str:
    # Each libmvec function in a loop the vectorizer must vectorize: if the library lacks
    # one, the link fails (--no-undefined) and the probe drops libmvec.
    calls = " + ".join(f"{name}f(x[i])" for name in MVEC_FUNCTIONS)
    calls += " + " + " + ".join(f"{name}f(x[i], x[i])" for name in MVEC_BINARY_FUNCTIONS)
    return (
        PRELUDE
        + '\nextern "C" void probe(const float* x, float* y, int64_t n) {\n'
        + "  #pragma omp parallel for simd\n"
        + f"  for (int64_t i = 0; i < n; ++i) y[i] = {calls} + mo_h2f(mo_f2h(x[i]));\n"
        + "}\n"
    )


def _probe_flags(path: str, directory: Path) -> tuple[str, ...]:
    """The optional flags (and libmvec) the compiler accepts, found by compiling a probe."""
    source = _probe_source()

    def accepts(flags: tuple[str, ...]) -> bool:
        try:
            _remove(_compile_to(path, flags, source, directory))
        except CompileError:
            return False
        return True

    everything = (*OPTIONAL_FLAGS, *MVEC_FLAGS)
    if accepts(everything):
        return everything
    kept = tuple(flag for flag in OPTIONAL_FLAGS if accepts((flag,)))
    if accepts((*kept, *MVEC_FLAGS)):
        kept += MVEC_FLAGS
    return kept


@functools.lru_cache(maxsize=1)
def cpu_identity() -> str:
    """The CPU's model and feature flags: what -march=native compiles for."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def prefetch(source: str) -> None:
    """Start building `source` in the background (a no-op if it is loaded or under way).

    `library(source)` later waits for it. A failed build is not reported here: `library`
    builds again and raises the compiler's error where the kernel is first needed.
    """
    tools = toolchain()
    directory = cache_dir()
    key = cache_key(source, tools)
    with _lock:
        if key in _loaded or key in _pending:
            return
        _pending[key] = in_background(ensure_built, source, key, tools, directory)


def in_background(build_fn: Callable[..., Path], *args: object) -> concurrent.futures.Future[Path]:
    """Run a build on the build threads (one per core); the caller waits on the future."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=os.cpu_count() or 1, thread_name_prefix="memopt-cpp-build"
            )
        return _pool.submit(build_fn, *args)


def library(source: str) -> tuple[ctypes.CDLL, Path]:
    """The loaded library built from `source` and the path of its source file.

    Compiles on a cache miss (or waits for a `prefetch` of it); CompilerNotFound or
    CompileError if that fails.
    """
    tools = toolchain()
    directory = cache_dir()
    key = cache_key(source, tools)
    source_path = directory / f"{key}.cpp"
    with _lock:
        pending = _pending.pop(key, None)
    if pending is not None:
        # Its library is then in the cache (found intact below); a failure is rebuilt below
        # so that the error is raised here, in the caller's thread.
        concurrent.futures.wait([pending])
    with _lock:
        loaded = _loaded.get(key)
        if loaded is not None:
            return loaded, source_path
        library_path = ensure_built(source, key, tools, directory)
        try:
            loaded = ctypes.CDLL(str(library_path))
        except OSError:
            # Readable bytes with a matching checksum that the loader still rejects (a
            # library built against a runtime that has since changed): build it again.
            _remove(library_path)
            library_path = ensure_built(source, key, tools, directory)
            loaded = ctypes.CDLL(str(library_path))
        _loaded[key] = loaded
    return loaded, source_path


def entry_point(source: str, name: str, argtypes: tuple, restype: object) -> ctypes._CFuncPtr:
    """Function `name` of the library built from `source`, with its ctypes signature."""
    loaded, _ = library(source)
    entry = getattr(loaded, name)
    entry.argtypes = argtypes
    entry.restype = restype
    return entry


def entry_address(source: str, name: str) -> int:
    """The address of function `name` of the library built from `source` (a native
    launcher's packed entry: `int32_t f(void* const* pointers, const int64_t* scalars)`)."""
    loaded, _ = library(source)
    return ctypes.cast(getattr(loaded, name), ctypes.c_void_p).value


def cache_key(source: str, tools: Toolchain) -> str:
    """The hash naming a library: source, compiler, flags and the CPU it is built for."""
    return _digest("\0".join([source, tools.path, tools.version, *tools.flags, cpu_identity()]))


def ensure_built(source: str, key: str, tools: Toolchain, directory: Path) -> Path:
    """`<key>.so` in the cache, compiled unless an intact one is there already."""
    library_path = directory / f"{key}.so"
    checksum_path = directory / f"{key}.sha256"
    source_path = directory / f"{key}.cpp"
    if _intact(library_path, checksum_path):
        if not source_path.exists():
            write_atomically(source_path, source.encode())
        return library_path
    write_atomically(source_path, source.encode())
    built = _compile_to(tools.path, tools.flags, source, directory)
    checksum = _file_digest(built)
    os.replace(built, library_path)
    write_atomically(checksum_path, checksum.encode())
    return library_path


def _intact(library_path: Path, checksum_path: Path) -> bool:
    """The library exists and its bytes hash to the recorded checksum (not truncated)."""
    try:
        expected = checksum_path.read_text().strip()
        return bool(expected) and _file_digest(library_path) == expected
    except OSError:
        return False


def _compile_to(path: str, flags: tuple[str, ...], source: str, directory: Path) -> Path:
    """Compile `source` into a fresh temporary library in `directory`; return its path."""
    linker = tuple(f for f in flags if f.startswith("-l"))
    options = tuple(f for f in flags if not f.startswith("-l"))
    fd, source_tmp = tempfile.mkstemp(suffix=".cpp", prefix=".build-", dir=directory)
    with os.fdopen(fd, "w") as handle:
        handle.write(source)
    fd, output = tempfile.mkstemp(suffix=".so", prefix=".build-", dir=directory)
    os.close(fd)
    command = [path, *REQUIRED_FLAGS, *options, source_tmp, "-o", output, *linker]
    try:
        result = _run(command)
    finally:
        _remove(Path(source_tmp))
    if result.returncode != 0:
        _remove(Path(output))
        diagnostics = (result.stderr or result.stdout).strip()[-4000:]
        raise CompileError(f"{' '.join(command)} failed:\n{diagnostics}")
    return Path(output)


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as error:  # the compiler vanished or is not executable
        raise CompilerNotFound(f"cannot run {command[0]}: {error}") from error


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_digest(path: Path) -> str:
    return _digest_bytes(path.read_bytes())
