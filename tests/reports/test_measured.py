"""The measured section: `memopt.report(..., measure=True)`, its JSON, and the roofline."""

from __future__ import annotations

import json
import re

import pytest
import sympy
import torch

import memopt
from memopt.cli import main
from memopt.driver import profile as profile_module
from memopt.driver.machine import Machine
from memopt.driver.profile import KernelTiming, Profile
from memopt.driver.results import KernelRecord
from memopt.reports import measured as measured_module
from memopt.reports.measured import roofline_svg
from tests.reports.test_reports import _chromium, rendered_dom, validate

# A fixed machine, so no test spends seconds measuring one: 10 GB/s read, 8 GB/s copied,
# 100 GFLOP/s; the ridge is at 10 FLOPs per byte.
MACHINE = Machine("test machine", 2, 10e9, 8e9, 100e9)


def program(x, w):
    return torch.relu(x @ w).sum(1) * 2  # a library matmul, then a generated reduction


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("measured")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(profile_module, "measured_machine", lambda: MACHINE)
        return memopt.report(
            program,
            torch.randn(64, 32),
            torch.randn(32, 48),
            out=out,
            measure=True,
            rounds=2,
            inductor=False,
        )


def test_the_json_carries_every_kernel_measured_and_validates(written):
    data = json.loads(written.json.read_text())
    validate(data)
    measured = data["measured"]
    assert measured["machine"] == {**MACHINE.to_dict()}
    assert measured["program"]["inductor_ms"] is None and measured["program"]["memopt_ms"] > 0
    kernels = [k["kernel"] for k in measured["kernels"]]
    assert kernels == [k.name for k in written.analysis.kernels]
    for entry, record in zip(measured["kernels"], written.analysis.kernels):
        assert entry["read_bytes"] == {"value": record.read_bytes, "label": "modelled"}
        assert entry["ms"]["label"] == "measured" and entry["ms"]["value"] > 0


def test_the_page_has_the_section_the_roofline_and_the_kernel_table(written):
    page = written.index.read_text()
    assert '<a href="#measured">measured</a>' in page
    section = page[page.index('<h2 id="measured">') : page.index('<h2 id="ledger">')]
    assert "test machine, 2 threads: read 10.0 GB/s" in section
    assert section.count('<circle class="kernel"') == len(written.analysis.kernels)
    rows = re.findall(r"<tr><td>(\w+\.k\d+)</td>", section)
    assert sorted(rows) == sorted(k.name for k in written.analysis.kernels)
    assert "http" not in section.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_a_report_without_measure_has_no_measured_section(tmp_path):
    result = memopt.report(program, torch.randn(8, 4), torch.randn(4, 8), out=tmp_path)
    assert 'id="measured"' not in result.index.read_text()
    assert "measured" not in json.loads(result.json.read_text())


def _record(name: str, read: int, write: int, flops: int) -> KernelRecord:
    zero = sympy.Integer(0)
    return KernelRecord(
        name, "pointwise", "inference", (), (), read, write, flops, zero, zero, zero
    )


def _profile(*kernels: KernelTiming) -> Profile:
    return Profile("t", False, MACHINE, 1, 1.0, 1.0, None, 1.0, None, list(kernels))


def _points(svg: str) -> dict[str, tuple[float, float, str]]:
    found = re.findall(
        r'cx="([\d.]+)" cy="([\d.]+)" r="[\d.]+" fill="([^"]+)"[^>]*><title>(\S+)', svg
    )
    return {name: (float(x), float(y), fill) for x, y, fill, name in found}


def _on_roof(svg: str, x: float) -> float:
    """The y of the roof polyline at x (linear between its vertices, as drawn)."""
    (points,) = re.findall(r'<polyline class="roof"[^>]* points="([^"]+)"', svg)
    vertices = [tuple(map(float, p.split(","))) for p in points.split()]
    for (x0, y0), (x1, y1) in zip(vertices, vertices[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise AssertionError(f"{x} is off the roof")


def test_a_kernel_at_the_roof_is_drawn_on_it_and_a_slower_one_below():
    # 1 MB read at 10 GB/s takes 100 us: a kernel measured at exactly that is on the memory
    # roof; at 1 FLOP per byte it is left of the ridge (10 FLOPs per byte).
    on_roof = KernelTiming(_record("k.on", 10**6, 0, 10**6), 1e-4)
    slow = KernelTiming(_record("k.slow", 10**6, 0, 10**6), 1e-3)  # 10% of bandwidth
    compute = KernelTiming(_record("k.peak", 10**6, 0, 10**9), 1e-2)  # 100 GFLOP/s: the peak
    copy = KernelTiming(_record("k.copy", 10**6, 0, 0), 1e-4)  # no FLOPs: hollow, at the edge
    svg = roofline_svg(_profile(on_roof, slow, compute, copy))
    points = _points(svg)
    x, y, fill = points["k.on"]
    assert y == pytest.approx(_on_roof(svg, x), abs=0.2) and fill != "none"
    x_slow, y_slow, _ = points["k.slow"]
    assert x_slow == x and y_slow > y + 20  # a decade below, in SVG's downward y
    x, y, _ = points["k.peak"]
    assert x > points["k.on"][0] and y == pytest.approx(_on_roof(svg, x), abs=0.2)
    x, y, fill = points["k.copy"]
    assert fill == "none" and x == measured_module._LEFT
    assert y == pytest.approx(_on_roof(svg, x), abs=0.2)  # at the full bandwidth, so on it


def test_cli_report_measure_writes_the_section(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(profile_module, "measured_machine", lambda: MACHINE)
    target = tmp_path / "target.py"
    target.write_text(
        "import torch\n\n\n"
        "def example():\n"
        "    return (lambda x: torch.softmax(x, -1) * 2), (torch.randn(16, 64),)\n"
    )
    out = tmp_path / "report"
    argv = ["report", str(target), "--measure", "--no-inductor", "--rounds", "2", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Eager" in printed or "eager" in printed
    assert f"memopt profile: {target}" in printed and "inference.k0" in printed
    assert 'id="roofline"' in (out / "index.html").read_text()
    validate(json.loads((out / "analysis.json").read_text()))


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium installed")
def test_the_measured_section_renders_in_headless_chromium(written):
    dom = rendered_dom(written.index)
    assert "Measured on this machine" in dom and 'id="measured-kernels"' in dom
    svg = dom[dom.index('<svg id="roofline"') : dom.index("</svg>")]
    assert svg.count('<circle class="kernel"') == len(written.analysis.kernels)
    assert '<polyline class="roof"' in svg
