"""The on-disk kernel cache every backend writes into: one directory per backend, files
written atomically (a reader sees the old file or the whole new one, never a part)."""

from __future__ import annotations

import hashlib
import os
import platform
import tempfile
from pathlib import Path


def cache_dir(backend: str) -> Path:
    """`$MEMOPT_CACHE_DIR/<backend>`, else `~/.cache/memopt/<backend>`; created on first use."""
    root = os.environ.get("MEMOPT_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "memopt"
    path = base / backend
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` under a temporary name in the same directory, then rename."""
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def processor() -> str:
    """The processor's model name (/proc/cpuinfo), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """A key for what is measured once per machine: the processor, torch's thread count and
    torch's version."""
    import torch

    identity = f"{processor()}|{torch.get_num_threads()}|{torch.__version__}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]
