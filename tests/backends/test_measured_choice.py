"""memopt's own CPU kernels chosen per machine by measurement: the GEMVs (runtime/gemv.py,
option cpu_gemv), decode attention (runtime/decode_attention.py) and causal attention
(runtime/causal_attention.py; both option cpu_attention). Each measures once, caches the
times by machine and chooses by gemm.choose's rule; each source builds without OpenMP."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch

from memopt.backends.cache import cache_dir, machine_key
from memopt.backends.cpp import attention, causal_attention, quantized
from memopt.backends.runtime import causal_attention as causal
from memopt.backends.runtime import decode_attention, gemm, gemv
from memopt.config import Config
from memopt.errors import OptionError


@dataclass(frozen=True)
class Library:
    module: ModuleType
    source: str  # the kernels' C++ source
    choose: object  # choice -> "aten" or "memopt"
    cache: str  # the cache file's name
    option: str
    timed: str  # what the warning of a failed measurement names
    small: dict[str, object]  # module attributes that make the measurement quick

    def path(self):
        return cache_dir("machine") / f"{self.cache}-{machine_key()}.json"


LIBRARIES = {
    "gemv": Library(
        gemv, quantized.SOURCE, gemv.gemv_library, "gemv", "cpu_gemv", "CPU GEMV kernels",
        {"SHAPES": ((1, 64, 32, 0), (2, 32, 64, 1))},
    ),
    "attention": Library(
        decode_attention, attention.SOURCE, decode_attention.attention_library, "attention",
        "cpu_attention",
        "CPU decode attention kernels",
        {"SHAPES": ((4, 2, 64, 64), (2, 2, 40, 32)), "_WEIGHT_NBYTES": 1 << 20},
    ),
    "causal attention": Library(
        causal, causal_attention.SOURCE, causal.causal_attention_library, "causal-attention",
        "cpu_attention", "CPU causal attention kernels",
        {"SHAPES": ((4, 2, 40, 64), (2, 2, 33, 32))},
    ),
}  # fmt: skip


@pytest.fixture(params=list(LIBRARIES))
def library(request, monkeypatch, tmp_path) -> Library:
    monkeypatch.setenv("MEMOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gemm, "_MEASURED", {})
    return LIBRARIES[request.param]


def test_auto_measures_once_caches_and_reads_the_machines_choice(monkeypatch, library):
    """Under a float64 default dtype and a meta default device too: the measurement times
    real float32 CPU tensors."""
    for name, value in library.small.items():
        monkeypatch.setattr(library.module, name, value)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.device("meta"):
            choice = library.choose("auto")
    finally:
        torch.set_default_dtype(default)
    record = json.loads(library.path().read_text())
    assert record["label"] == "measured" and record["library"] == choice
    assert len(record["ratios"]) == 2 and all(t > 0 for t in record["other_s"])
    # The cache's times decide: memopt's kernels 2x faster, then 2x slower on one shape.
    for ratios, want in (([2.0, 2.0], "memopt"), ([2.0, 0.5], "aten")):
        monkeypatch.setattr(gemm, "_MEASURED", {})
        library.path().write_text(json.dumps({**record, "ratios": ratios}))
        monkeypatch.setattr(library.module, "measure", lambda: pytest.fail("measured again"))
        assert library.choose("auto") == want


def test_a_failed_measurement_keeps_aten_and_says_so(monkeypatch, library):
    def measure():
        raise RuntimeError("nothing today")

    monkeypatch.setattr(library.module, "measure", measure)
    with pytest.warns(UserWarning, match=f"timing the {library.timed} failed.*nothing today"):
        assert library.choose("auto") == "aten"


def test_an_unknown_choice_is_an_error_naming_the_choices(library):
    with pytest.raises(ValueError, match="'blas'.*auto, aten, memopt"):
        library.choose("blas")
    with pytest.raises(
        OptionError, match=f"unknown {library.option} 'blas'; valid choices: aten, auto"
    ):
        Config.from_options({library.option: "blas"})


def test_the_kernels_build_without_openmp(library, tmp_path):
    """build.py drops -fopenmp where the compiler rejects it: the source then needs no
    OpenMP symbol (one thread)."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++")
    source = tmp_path / "kernels.cpp"
    source.write_text(library.source)
    built = subprocess.run(
        [compiler, "-O1", "-shared", "-fPIC", "-Wl,--no-undefined", str(source), "-o",
         str(tmp_path / "kernels.so")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
