"""The Triton kernels, compiled by the real GPU compilers for sm_90 and gfx942 (no GPU needed).

The compile runs in a worker process without TRITON_INTERPRET (backends/triton/offline.py);
results are cached by source hash in MEMOPT_CACHE_DIR, so a rerun compiles nothing.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import triton_corpus

from memopt.backends.triton import offline
from memopt.backends.triton.attention import attention
from memopt.backends.triton.launching import Launch, recording_launches
from memopt.backends.triton.offline import (
    GFX942,
    SM_90,
    CompiledKernel,
    arch_for,
    compile_launches,
    occupancy,
)
from memopt.backends.triton.offline_worker import (
    _GCN_BRANCH,
    _GCN_LABEL,
    _SASS_BRANCH,
    _SASS_LABEL,
    has_loop,
)
from memopt.backends.triton.runtime import TritonKernel, block_sizes, num_warps, render
from memopt.backends.triton.sectors import kernel_sectors
from memopt.compiler import kernel_ir as ir
from memopt.compiler.kernel_ir import Kernel, Store
from memopt.errors import OptionError

import kernel_examples as examples

DEVICES = ["h100", "mi300x"]  # sm_90 and gfx942


def _launch(build) -> Launch:
    (planned,) = triton_corpus._kernel_launches(build)
    return planned


# -- every kernel the suite renders ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_every_rendered_kernel_compiles_without_spills_and_with_vector_loads(device):
    corpus = triton_corpus.corpus()
    kinds = {name.split("_")[0] for name, _, _ in corpus}
    assert {"softmax", "attention", "gpt2", "column", "transposed"} <= kinds
    compiled = compile_launches([planned for _, planned, _ in corpus], device, timeout_s=900)
    failures = []
    for (name, planned, contiguous), result in zip(corpus, compiled):
        if result.error:
            failures.append(f"{name}: failed to compile: {result.error}")
        elif result.spill_bytes or result.stack_bytes:
            failures.append(
                f"{name}: {result.spill_bytes} B spilled, {result.stack_bytes} B of stack "
                f"({result.registers} registers, {planned.constexprs}, {result.num_warps} warps)"
            )
        elif contiguous and result.widest_load_bits != 128:
            failures.append(f"{name}: contiguous loads only {result.loads} (bits: count)")
    assert not failures, "\n".join(failures)
    # Every dtype and both directions of attention are in the corpus.
    names = " ".join(name for name, _, _ in corpus)
    for part in ("fp32", "fp16", "bf16", "bwd_dkdv", "bwd_dq", "fwd", "training", "inference"):
        assert part in names


@pytest.mark.parametrize("device", DEVICES)
def test_dequantizing_matmuls_compile_without_spills(device):
    """The precision pass's Triton kernel, every weight format, decode and prefill shapes."""
    corpus = triton_corpus.quantized_launches()
    assert len(corpus) == 8
    compiled = compile_launches([planned for _, planned in corpus], device, timeout_s=600)
    for (name, _), result in zip(corpus, compiled):
        assert not result.error, f"{name}: {result.error}"
        assert result.spill_bytes == 0 and result.stack_bytes == 0, (name, result.registers)
        assert result.has_loop  # the K loop


@pytest.mark.parametrize("device", DEVICES)
def test_static_traffic_of_streaming_kernels_is_the_modelled_traffic(device):
    # Full blocks, no broadcast operand: each lane loads and stores its own elements once.
    cases = {
        "softmax 64x1024 fp32": (lambda: examples.softmax(64, 1024), 2 * 64 * 1024 * 4),
        "sigmoid(x) * y, 64Ki fp16": (
            lambda: examples.mixed_precision(65536, torch.float16),
            3 * 65536 * 2,
        ),
    }
    launches = [_launch(build) for build, _ in cases.values()]
    for (name, (_, modelled)), result in zip(cases.items(), compile_launches(launches, device)):
        assert not result.has_loop, name
        assert result.static_bytes == modelled, (name, result.loads, result.stores)
        assert offline.traffic_ratio(result, modelled) == 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_a_looped_reduction_is_seen_as_a_loop(device):
    looped, persistent = compile_launches(
        [_launch(lambda: examples.softmax(8, 8192)), _launch(lambda: examples.softmax(8, 1024))],
        device,
    )
    assert looped.has_loop and looped.static_bytes is None
    assert not persistent.has_loop and persistent.static_bytes == 2 * 8 * 1024 * 4


def test_results_are_cached_by_source_and_launch(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOPT_CACHE_DIR", str(tmp_path))
    planned = _launch(lambda: examples.add_broadcast(64, 64))
    (first,) = compile_launches([planned], "h100")
    assert first.error is None and first.registers > 0

    def no_worker(*args, **kwargs):
        raise AssertionError("a cached result started a worker")

    monkeypatch.setattr(offline, "_run_workers", no_worker)
    (again,) = compile_launches([planned], "h100")
    assert again == first
    other = dataclasses.replace(planned, num_warps=planned.num_warps * 2)
    with pytest.raises(AssertionError, match="started a worker"):
        compile_launches([other], "h100")  # another launch: not the cached result


def test_a_kernel_that_fails_to_compile_is_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOPT_CACHE_DIR", str(tmp_path))
    source = tmp_path / "broken.py"
    source.write_text(
        "import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
        "def broken(x, BLOCK: tl.constexpr):\n    tl.store(x + tl.arange(0, BLOCK), no_such)\n"
    )
    planned = Launch(str(source), "broken", 1, (torch.empty(4, device="meta"),), {"BLOCK": 4}, 1)
    (result,) = compile_launches([planned], "h100")
    assert result.error is not None and "no_such" in result.error
    assert not list((tmp_path / "triton" / "offline").glob("*.json"))  # failures not cached


def test_the_worker_refuses_to_run_with_the_interpreter_on():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "memopt.backends.triton.offline_worker"],
        input="[]",
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode != 0 and "TRITON_INTERPRET" in done.stderr


# -- launch configurations -------------------------------------------------------------


def test_recording_gives_the_gpu_launch_and_runs_nothing():
    kernel, inputs, _, sizes = examples.softmax(64, 1000)
    compiled = TritonKernel(kernel)
    out = torch.full((64, 1000), 7.0)
    with recording_launches() as launches:
        compiled(inputs, [out], sizes)  # CPU tensors: the interpreter's launch, recorded
    assert torch.equal(out, torch.full((64, 1000), 7.0))
    (cpu,) = launches
    gpu = _launch(lambda: examples.softmax(64, 1000))
    numels = {"xnumel": 64, "rnumel": 1000}
    assert cpu.constexprs == block_sizes(compiled.rendered, numels, on_gpu=False)
    assert gpu.constexprs == block_sizes(compiled.rendered, numels, on_gpu=True)
    assert gpu.constexprs == {"XBLOCK": 4, "RBLOCK": 1024}
    assert gpu.num_warps == num_warps(gpu.constexprs) == 16  # 8 elements a thread
    assert gpu.grid == 16


def test_warps_give_eight_elements_a_thread_within_bounds():
    assert num_warps({"XBLOCK": 1024}) == 4
    assert num_warps({"XBLOCK": 4, "RBLOCK": 1024}) == 16
    assert num_warps({"XBLOCK": 64}) == 1
    assert num_warps({"XBLOCK": 64, "RBLOCK": 4096}) == 16  # at most 16


@pytest.mark.parametrize(
    "dtype, precision", [(torch.float32, "ieee"), (torch.float16, "tf32"), (torch.bfloat16, "tf32")]
)
def test_fp32_dots_on_a_gpu_are_ieee_not_tf32(dtype, precision):
    # Triton's default on NVIDIA is TF32, which rounds fp32 operands to 10 bits; eager
    # does not (torch.backends.cuda.matmul.allow_tf32 is off by default).
    q = torch.empty(1, 2, 128, 64, dtype=dtype, device="meta")
    with recording_launches() as launches:
        attention(q, q, q, out=torch.empty_like(q))
    (planned,) = launches
    assert planned.constexprs["DOT_PRECISION"] == precision
    cpu = torch.randn(1, 2, 16, 16).to(dtype)
    with recording_launches() as launches:
        attention(cpu, cpu, cpu)
    assert launches[0].constexprs["DOT_PRECISION"] == "ieee"  # the interpreter


# -- occupancy and the machine-code readers --------------------------------------------


def test_occupancy_follows_the_sm_and_cu_limits():
    assert occupancy(SM_90, 32, 0, 4) == 1.0  # 16 blocks of 4 warps
    assert occupancy(SM_90, 255, 0, 4) == 8 / 64  # 8192 registers a warp: 2 blocks
    assert occupancy(SM_90, 32, 200 * 1024, 4) == 4 / 64  # one block fits the shared memory
    assert occupancy(GFX942, 128, 0, 4, waves=4) == 0.5
    assert occupancy(GFX942, 64, 48 * 1024, 2, waves=8) == 2 / 4 / 8  # 1 workgroup a CU


def test_unknown_devices_are_named():
    assert arch_for("h100") is SM_90 and arch_for("mi300x") is GFX942
    with pytest.raises(OptionError, match="'cpu'.*h100"):
        arch_for("cpu")


def test_loops_are_backward_branches_and_the_exit_trap_is_not():
    sass = "\n".join(
        [
            "        /*0170*/ @P0 BRA `(.L_x_0) ;",
            ".L_x_1:",
            "        /*0180*/ LDG.E.128 R4, desc[UR4][R2.64] ;",
            "        /*0550*/ @!P5 BRA `(.L_x_1) ;",
            ".L_x_0:",
            "        /*0600*/ EXIT ;",
            ".L_x_5:",
            "        /*0610*/ BRA `(.L_x_5);",
        ]
    )
    assert has_loop(sass, _SASS_LABEL, _SASS_BRANCH)
    straight = sass.replace("@!P5 BRA `(.L_x_1) ;", "NOP ;")
    assert not has_loop(straight, _SASS_LABEL, _SASS_BRANCH)  # only the trap is left
    gcn = ".LBB0_1:\n\tglobal_load_dwordx4 v[0:3], v4, s[0:1]\n\ts_cbranch_scc1 .LBB0_1\n"
    assert has_loop(gcn, _GCN_LABEL, _GCN_BRANCH)
    assert not has_loop("\ts_cbranch_scc1 .LBB0_2\n.LBB0_2:\n", _GCN_LABEL, _GCN_BRANCH)


def test_static_bytes_count_every_lane_of_every_program():
    result = CompiledKernel(
        "k", "sm_90", grid=10, num_warps=4, threads=128, registers=32, stack_bytes=0,
        spill_bytes=0, shared_bytes=0, occupancy=1.0, loads={128: 2, 32: 1}, stores={128: 1},
        has_loop=False,
    )  # fmt: skip
    assert result.static_bytes == (2 * 16 + 4 + 16) * 128 * 10
    assert dataclasses.replace(result, has_loop=True).static_bytes is None


# -- coalescing: 32-byte sectors --------------------------------------------------------


def _strided_copy(rows: int, cols: int, step: int):
    """out[i, j] = x[i, step * j]: a strided view read by a pointwise kernel (no tile can
    make it contiguous: the lanes' stride is `step` elements in the only block dimension)."""
    i0, i1 = examples.i0, examples.i1
    value = ir.load("in0", cols * step * i0 + step * i1, torch.float32)
    kernel = Kernel(
        "strided_copy",
        (examples.buf("in0", torch.float32, (rows, cols), (cols * step, step)),),
        (examples.buf("out0", torch.float32, (rows, cols)),),
        (examples.S(rows), examples.S(cols)),
        (),
        (Store("out0", cols * i0 + i1, value),),
    )
    return kernel, [torch.randn(rows, cols * step)[:, ::step]], [], {}


@pytest.mark.parametrize(
    "build, read_factor",
    [
        (lambda: examples.transposed_read(512, 256), 1),  # tiled: both sides contiguous
        (lambda: _strided_copy(256, 512, 2), 2),  # every other element: 8 of each 32 B used
        (lambda: _strided_copy(256, 64, 16), 8),  # a 64 B stride: one element a sector
    ],
    ids=["transposed", "stride2", "stride16"],
)
def test_sector_bytes_follow_the_lanes_stride_and_agree_with_the_compiled_loads(build, read_factor):
    kernel, *_rest, sizes = build()
    rendered = render(kernel)
    (read, write) = kernel_sectors(kernel, rendered, sizes)
    assert read.sector_bytes == read_factor * read.nbytes
    assert write.sector_bytes == write.nbytes
    (planned,) = triton_corpus._kernel_launches(build)
    (compiled,) = compile_launches([planned], "h100")
    if read_factor == 1:
        assert compiled.widest_load_bits == 128  # coalesced: full-width loads
    else:
        assert compiled.widest_load_bits == 32  # a lane's element is not next to its neighbour's
