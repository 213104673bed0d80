"""memopt.profile: every kernel of the compiled program timed, beside its modelled bytes."""

from __future__ import annotations

import json

import pytest
import torch

import memopt
from memopt.cli import main
from memopt.driver import machine as machine_module
from memopt.driver import profile as profile_module
from memopt.driver.machine import Machine
from memopt.reports.measured import format_profile

# A fixed machine, so a test does not spend seconds measuring one: 10 GB/s read, 8 GB/s
# copied (4 GB/s written), 100 GFLOP/s.
MACHINE = Machine("test machine", 2, 10e9, 8e9, 100e9)


@pytest.fixture
def fixed_machine(monkeypatch):
    monkeypatch.setattr(profile_module, "measured_machine", lambda: MACHINE)


def program(x, w):
    return torch.relu(x @ w).sum(1) * 2  # a library matmul, then a generated reduction


def test_every_kernel_is_timed_and_named_as_the_analysis_names_it(fixed_machine):
    x, w = torch.randn(64, 32), torch.randn(32, 48)
    result = memopt.profile(program, x, w, rounds=3, compare=False)
    analysis = memopt.analyze(program, x, w)
    assert [k.record.name for k in result.kernels] == [k.name for k in analysis.kernels]
    assert {k.record.kind for k in result.kernels} == {k.kind for k in analysis.kernels}
    for kernel in result.kernels:
        assert kernel.seconds > 0
        assert kernel.achieved_bytes_per_s == kernel.record.nbytes / kernel.seconds
        roof = kernel.record.read_bytes / 10e9 + kernel.record.write_bytes / 4e9
        assert kernel.bandwidth_fraction(MACHINE) == pytest.approx(roof / kernel.seconds)
        flops = kernel.record.flops / kernel.seconds
        assert kernel.compute_fraction(MACHINE) == pytest.approx(flops / 100e9)
    assert result.inductor_seconds is None and result.memopt_seconds > 0
    assert result.speedup_vs_eager > 0
    text = format_profile(result)
    assert "inference.k0" in text and "(measured" in text
    data = result.to_dict()
    assert data["program"]["label"] == "measured"
    (first, *_) = data["kernels"]
    assert first["ms"]["label"] == "measured" and first["read_bytes"]["label"] == "modelled"
    assert first["achieved_gbps"]["label"] == "derived"


def test_training_times_the_forward_and_the_backward(fixed_machine):
    w = torch.randn(32, 48, requires_grad=True)
    result = memopt.profile(program, torch.randn(64, 32), w, training=True, rounds=2, compare=False)
    graphs = {k.record.name.split(".k")[0] for k in result.kernels}
    assert graphs == {"forward", "backward"}


def test_the_machine_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(machine_module, "_BUFFER_NBYTES", 4 * 2**20)
    monkeypatch.setattr(machine_module, "_MATMUL_SIZE", 64)
    first = machine_module.measured_machine()
    assert first.read_bytes_per_s > 0 and first.copy_bytes_per_s > 0
    assert first.fp32_flops_per_s > 0 and first.threads == torch.get_num_threads()
    (cached,) = (tmp_path / "machine").glob("*.json")
    assert json.loads(cached.read_text())["label"] == "measured"
    monkeypatch.setattr(machine_module, "measure_machine", lambda: pytest.fail("measured twice"))
    assert machine_module.measured_machine() == first


def test_cli_profile_prints_the_kernel_table(fixed_machine, tmp_path, capsys):
    target = tmp_path / "target.py"
    target.write_text(
        "import torch\n\n\n"
        "def example():\n"
        "    return (lambda x: torch.softmax(x, -1) * 2), (torch.randn(16, 64),)\n"
    )
    out = tmp_path / "profile.json"
    argv = ["profile", str(target), "--no-inductor", "--rounds", "2", "--json", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"memopt profile: {target}")
    assert "inference.k0" in captured.out and "reduction" in captured.out
    assert json.loads(out.read_text())["kernels"][0]["kernel"] == "inference.k0"
