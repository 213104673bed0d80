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
    _SASS_BRANCH,
    _SASS_LABEL,
    gcn_loop_regions,
    loop_regions,
    split_accesses,
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
def test_a_looped_reduction_is_counted_once_an_iteration(device):
    looped, persistent = compile_launches(
        [_launch(lambda: examples.softmax(8, 8192)), _launch(lambda: examples.softmax(8, 1024))],
        device,
    )
    assert looped.has_loop and not looped.pipelined
    # Two programs of four rows, eight 1024-wide blocks a row, in each of the three passes.
    assert looped.trips == (16, 16, 16)
    # The max, the sum and the normalized store each read the row again: three reads, one
    # write, where the cost model counts one of each (the rows come again from L2).
    row_bytes = 8 * 8192 * 4
    assert looped.static_bytes == 4 * row_bytes
    assert offline.traffic_ratio(looped, 2 * row_bytes) == 2.0
    assert not persistent.has_loop and persistent.static_bytes == 2 * 8 * 1024 * 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_traffic_is_its_tiles_once_an_iteration(device, causal):
    batch, heads, seq, dim = 2, 4, 256, 64
    q, k, v, out = (torch.empty(batch, heads, seq, dim, dtype=torch.float16, device="meta")
                    for _ in range(4))  # fmt: skip
    lse = torch.empty(batch, heads, seq, dtype=torch.float32, device="meta")
    with recording_launches() as launches:
        attention(q, k, v, None, causal, None, out, lse)
    (planned,) = launches
    (compiled,) = compile_launches(launches, device)
    assert compiled.pipelined  # counted on the same kernel without software pipelining
    block_m, block_n = planned.constexprs["BLOCK_M"], planned.constexprs["BLOCK_N"]
    ends = [min(seq, (t + 1) * block_m) if causal else seq for t in range(seq // block_m)]
    visits = batch * heads * sum(-(-end // block_n) for end in ends)
    assert planned.trips == (visits,)
    # A program loads its query tile, stores its output tile and, from every lane, its
    # row's fp32 logsumexp; each iteration loads one key and one value tile.
    per_program = 2 * block_m * dim * 2 + compiled.threads * 4
    assert compiled.static_bytes == planned.grid * per_program + visits * 2 * block_n * dim * 2


@pytest.mark.parametrize("device", DEVICES)
def test_matmul_template_traffic_is_its_tiles_once_a_k_step(device):
    import memopt
    from memopt.driver.gpu import graph_launches

    m, k, n = 256, 64, 256
    x, w = torch.randn(m, k).half(), torch.randn(k, n).half()
    analysis = memopt.analyze(lambda x, w: torch.relu(x @ w), x, w, backend="triton")
    ((_name, kind, modelled, (planned,), _sectors),) = graph_launches(analysis.graphs[0])
    assert kind == "matmul"
    (compiled,) = compile_launches([planned], device)
    tiles = planned.constexprs
    block_m, block_n, block_k = tiles["BLOCK_M"], tiles["BLOCK_N"], tiles["BLOCK_K"]
    assert planned.grid == (m // block_m) * (n // block_n)
    assert planned.trips == (planned.grid * (k // block_k),)
    # Each k step loads an A and a B tile; each program stores its C tile once.
    expected = planned.trips[0] * (block_m + block_n) * block_k * 2 + m * n * 2
    assert compiled.static_bytes == expected
    # A is read once per column of tiles, B once per row of tiles: 4/3 of the modelled
    # bytes, which count each operand once.
    assert modelled == (m * k + k * n + m * n) * 2
    assert offline.traffic_ratio(compiled, modelled) == pytest.approx(4 / 3)


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
    assert loop_regions(sass, _SASS_LABEL, _SASS_BRANCH)
    straight = sass.replace("@!P5 BRA `(.L_x_1) ;", "NOP ;")
    assert not loop_regions(straight, _SASS_LABEL, _SASS_BRANCH)  # only the trap is left
    (body,) = loop_regions(sass, _SASS_LABEL, _SASS_BRANCH)
    assert list(body) == [1, 2, 3]  # the label, the load, the branch back


def test_amd_loops_are_llvm_s_loop_blocks_not_backward_branches():
    gcn = "\n".join(
        [
            "\ts_branch .LBB0_6",
            ".LBB0_5:                                ;   in Loop: Header=BB0_6 Depth=1",
            "\tbuffer_load_dwordx4 v[4:7], v3, s[20:23], 0 offen",  # the body, above the header
            ".LBB0_6:                                ; =>This Inner Loop Header: Depth=1",
            "\ts_cbranch_execz .LBB0_8",
            "; %bb.7:                                ;   in Loop: Header=BB0_6 Depth=1",
            ".LBB0_8:                                ;   in Loop: Header=BB0_6 Depth=1",
            "\ts_branch .LBB0_5",
            "; %bb.9:",
            "\tbuffer_store_dwordx2 v[0:1], v16, s[84:87], 0 offen",
            ".LBB0_10:",
            "\ts_cbranch_scc0 .LBB0_5",  # a cold block branching back: not a loop of its own
        ]
    )
    regions, nested = gcn_loop_regions(gcn)
    assert [sorted(r) for r in regions] == [[1, 2, 3, 4, 5, 6, 7]] and not nested
    found = [(2, "load", 128), (9, "store", 64)]
    assert split_accesses(found, regions) == {
        "outside": {"load": {}, "store": {64: 1}},
        "loops": [{"load": {128: 1}, "store": {}}],
    }
    inner = gcn.replace("Header=BB0_6 Depth=1\n.LBB0_8", "Header=BB0_6 Depth=2\n.LBB0_8")
    assert gcn_loop_regions(inner)[1]  # nested: not counted


def test_accesses_are_split_by_loop_and_nested_loops_are_not_counted():
    found = [(0, "load", 128), (2, "load", 128), (3, "store", 32), (6, "load", 64)]
    split = split_accesses(found, [range(5, 8), range(1, 4)])
    assert split == {
        "outside": {"load": {128: 1}, "store": {}},
        "loops": [{"load": {128: 1}, "store": {32: 1}}, {"load": {64: 1}, "store": {}}],
    }
    assert split_accesses(found, [range(1, 8), range(2, 4)]) is None


def _kernel(fn_name: str = "k", **fields) -> CompiledKernel:
    """A compiled sm_90 launch for the h100 model: one program of one 32-lane warp with
    nothing loaded or stored, spill-free at full occupancy, but for `fields`."""
    num_warps = fields.pop("num_warps", 1)
    defaults = dict(
        grid=1, registers=32, stack_bytes=0, spill_bytes=0, shared_bytes=0, occupancy=1.0,
        loads={}, stores={}, has_loop=False, device="h100",
    )  # fmt: skip
    return CompiledKernel(
        fn_name, "sm_90", num_warps=num_warps, threads=32 * num_warps, **{**defaults, **fields}
    )


def test_static_bytes_count_every_lane_of_every_program():
    result = _kernel(grid=10, num_warps=4, loads={128: 2, 32: 1}, stores={128: 1})
    assert result.static_bytes == (2 * 16 + 4 + 16) * 128 * 10
    traffic = {
        "outside": {"load": {32: 1}, "store": {128: 1}},
        "loops": [{"load": {128: 2}, "store": {}}],
    }
    looped = dataclasses.replace(result, has_loop=True, traffic=traffic, trips=(70,))
    assert looped.static_bytes == ((4 + 16) * 10 + 2 * 16 * 70) * 128
    assert dataclasses.replace(looped, trips=()).static_bytes is None  # trips not known
    assert dataclasses.replace(looped, trips=(7, 7)).static_bytes is None  # loops differ
    assert dataclasses.replace(looped, traffic=None).static_bytes is None  # nested loops
    assert dataclasses.replace(result, error="ptxas failed").static_bytes is None


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


# -- bandwidth: loads in flight (Little's law) ------------------------------------------


def _row(compiled: CompiledKernel, num_stages=None):
    from memopt.driver.gpu import GpuKernel

    planned = Launch("k.py", "k", compiled.grid, (), {}, compiled.num_warps, num_stages)
    return GpuKernel("inference.k0", "pointwise", planned, compiled, None)


def test_a_launch_draws_the_bandwidth_its_loads_in_flight_cover():
    from memopt.compiler.devices import get_device

    h100 = get_device("h100")
    assert h100.bytes_in_flight == pytest.approx(3.35e12 * 375e-9)
    few = _kernel(grid=10, num_warps=4, loads={128: 2}, stores={128: 1})
    # Ten programs, each with two 16-byte loads a lane outstanding: far from enough.
    assert _row(few).bandwidth_share == pytest.approx(10 * 2 * 16 * 128 / h100.bytes_in_flight)
    # A full grid at full occupancy: 16 programs an SM on 132 SMs hold 8.6 MB in flight.
    assert _row(dataclasses.replace(few, grid=100_000)).bandwidth_share == 1.0
    # Occupancy bounds the resident programs: a quarter of them, a quarter of the bytes.
    quarter = dataclasses.replace(few, grid=100_000, occupancy=0.25, loads={32: 1})
    resident = 0.25 * 64 / 4 * 132
    assert _row(quarter).bandwidth_share == pytest.approx(resident * 4 * 128 / h100.bytes_in_flight)
    # A pipelined loop keeps num_stages - 1 iterations' loads ahead (3 stages: two bodies).
    traffic = {"outside": {"load": {}, "store": {}}, "loops": [{"load": {128: 1}, "store": {}}]}
    looped = dataclasses.replace(
        few, loads={128: 3}, has_loop=True, traffic=traffic, trips=(40,), pipelined=True
    )
    assert _row(looped, num_stages=3).bandwidth_share == pytest.approx(
        10 * 2 * 16 * 128 / h100.bytes_in_flight
    )
    assert _row(dataclasses.replace(looped, pipelined=False)).bandwidth_share == pytest.approx(
        10 * 16 * 128 / h100.bytes_in_flight
    )
    assert _row(dataclasses.replace(few, loads={})).bandwidth_share == 1.0  # stores only
    # No program fits (too much shared memory: occupancy 0): no share is modelled.
    assert _row(dataclasses.replace(few, occupancy=0.0)).bandwidth_share == 1.0


def test_predict_gives_a_kernel_only_the_bandwidth_its_compiled_launches_draw():
    import memopt

    # 256 rows of 768 in four-row programs: 64 programs for 132 SMs.
    x = torch.randn(256, 768).half()
    layer_norm = torch.nn.LayerNorm(768).half()
    plain = memopt.analyze(layer_norm, x, backend="triton", device="h100")
    compiled = memopt.analyze(layer_norm, x, backend="triton", device="h100", compile_for="h100")
    shares = compiled.bandwidth_shares("h100")
    assert shares and all(0 < s <= 1 for s in shares.values())
    assert min(shares.values()) < 1
    assert compiled.predict("h100") == pytest.approx(
        sum(k.seconds("h100", shares.get(k.name, 1.0)) for k in compiled.kernels)
    )
    assert compiled.predict("h100") > plain.predict("h100")
    assert compiled.bandwidth_shares("a100") == {}  # compiled for another device: no share
    assert compiled.predict("a100") == pytest.approx(plain.predict("a100"))


def test_a_kernel_of_several_launches_is_weighed_against_its_bytes_together(monkeypatch):
    import memopt
    from memopt.driver import gpu

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (torch.randn(1, 2, 64, 32, requires_grad=True) for _ in range(3))
    analysis = memopt.analyze(sdpa, q, k, v, training=True, backend="triton")
    statics = iter(range(1000, 100_000, 1000))

    def fake(launches, device, timeout_s=600.0):  # one lane of one program, n one-byte loads
        return [_kernel(p.fn_name, loads={8: next(statics)}) for p in launches]

    monkeypatch.setattr(gpu, "compile_launches", fake)
    rows = gpu.compile_for_gpu(analysis, "h100")
    backward = [r for r in rows if r.kernel.startswith("backward")]
    assert [r.launch.fn_name for r in backward] == [
        "memopt_attention_bwd_dkdv",
        "memopt_attention_bwd_dq",
    ]
    modelled = next(k.nbytes for k in analysis.kernels if k.name == backward[0].kernel)
    together = sum(r.compiled.static_bytes for r in backward) / modelled
    assert all(r.modelled_bytes is None for r in backward)
    assert [r.traffic_ratio for r in backward] == [pytest.approx(together)] * 2
